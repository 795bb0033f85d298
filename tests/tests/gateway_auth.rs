//! Two-factor sign-in through the real binary: `enclave users add` prints a token and a TOTP secret once,
//! `enclave login` opens a session with both and refuses the same code twice, neither secret is stored in
//! clear, and every step is in an audit log that verifies.

use enclave_e2e::{Scratch, code_now, enclave_output, scan_bytes};

#[test]
fn users_sign_in_with_token_and_code_once_and_every_step_is_audited() {
    let s = Scratch::new();
    s.enclave("data", &["init"]);
    let added: serde_json::Value = serde_json::from_str(&s.enclave(
        "data",
        &[
            "users",
            "add",
            "alice",
            "--role",
            "researcher",
            "--by",
            "admin",
            "--json",
        ],
    ))
    .expect("JSON");
    let token = added["token"].as_str().expect("token").to_owned();
    let secret = added["totp_secret"].as_str().expect("secret").to_owned();
    assert!(
        added["otpauth_uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("otpauth://totp/") && u.contains(&secret))
    );
    // A second account of the same name, and an unknown role, are refused.
    for args in [
        ["users", "add", "alice", "--role", "board"],
        ["users", "add", "eve", "--role", "root"],
    ] {
        let mut all = vec!["--data-dir", "data"];
        all.extend_from_slice(&args);
        assert!(!enclave_output(s.path(), &all).status.success(), "{args:?}");
    }

    let login = |code: &str| {
        enclave_output(
            s.path(),
            &[
                "--data-dir",
                "data",
                "login",
                "--user",
                "alice",
                "--token",
                &token,
                "--totp",
                code,
                "--json",
            ],
        )
    };
    let code = code_now(&secret);
    let first = login(&code);
    // The code can roll over between computing and using it: then the next one is fresh.
    let (first, code) = if first.status.success() {
        (first, code)
    } else {
        let code = code_now(&secret);
        (login(&code), code)
    };
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let session: serde_json::Value = serde_json::from_slice(&first.stdout).expect("JSON");
    assert!(session["session"].as_str().is_some_and(|t| t.len() >= 40));
    let again = login(&code);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("rule 'replayed-code'"));
    let wrong = login("000000");
    assert!(!wrong.status.success());

    // Neither the token, the secret nor the session is in the data directory in clear.
    let needles = vec![
        token.clone(),
        secret.clone(),
        session["session"].as_str().expect("session").to_owned(),
    ];
    assert_eq!(scan_bytes(&s.path().join("data"), &needles), vec![]);

    let listed: serde_json::Value =
        serde_json::from_str(&s.enclave("data", &["users", "list", "--json"])).expect("JSON");
    assert_eq!(listed[0]["user"], "alice");
    assert_eq!(listed[0]["disabled"], false);
    s.enclave("data", &["users", "disable", "alice", "--by", "admin"]);
    let out = s.enclave("data", &["audit", "verify"]);
    assert!(out.contains("audit log verifies: 5 records"), "{out}");
    let tail = s.enclave("data", &["audit", "tail", "-n", "10"]);
    for outcome in [
        "user-added",
        "signed-in",
        "sign-in-refused",
        "user-disabled",
    ] {
        assert!(tail.contains(outcome), "{outcome} missing from:\n{tail}");
    }
}

/// `enclave init` writes the default Cedar policies beside the database, `enclave policies check` validates
/// them, and a policy that does not fit the schema is refused with its reason.
#[test]
fn init_writes_the_default_policies_and_check_validates_them() {
    let s = Scratch::new();
    s.enclave("data", &["init"]);
    let out = s.enclave("data", &["policies", "check"]);
    assert!(
        out.contains("researchers-query-under-an-active-grant")
            && out.contains("board-manages-grants-and-reads-the-audit-log")
            && out.contains("providers-ingest-into-their-own-datasets"),
        "{out}"
    );
    std::fs::write(
        s.path().join("data/policies/extra.cedar"),
        "@id(\"open-everything\")\npermit (principal, action, resource) when { resource.secret == true };\n",
    )
    .expect("write");
    let bad = enclave_output(s.path(), &["--data-dir", "data", "policies", "check"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("do not validate"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
