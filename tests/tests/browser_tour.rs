//! The board's web UI in Debian's Chromium (headless, driven by Python Playwright against
//! `/usr/bin/chromium`; nothing is downloaded): passkey registration and sign-in on a virtual WebAuthn
//! authenticator, a researcher's TOTP sign-in and access request, the board's approval with a smaller
//! budget and an earlier expiry, the researcher's Flight SQL query (ADBC) answered and then refused after
//! revocation, the audit page and its verify button. The script is `tests/clients/browser_tour.py`; it
//! saves a screenshot of every page (into `ENCLAVE_TOUR_DIR` when set — `docs/tour/` regenerates the
//! README's tour — else under the target directory).

use enclave_e2e::{Scratch, Server, client_python};

#[test]
fn the_board_and_a_researcher_walk_through_the_web_ui_in_chromium() {
    let chromium = std::env::var("ENCLAVE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (.ci/run does)"
    );
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    let (board_token, board_totp) = s.add_user("data", "board", "board");
    let (alice_token, alice_totp) = s.add_user("data", "alice", "researcher");
    let server = Server::start(s.path(), "data", &[]);

    let shots = std::env::var_os("ENCLAVE_TOUR_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-tour"),
        std::path::PathBuf::from,
    );
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).expect("screenshot directory");
    let clients = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    let out = std::process::Command::new(client_python())
        .arg(clients.join("browser_tour.py"))
        .current_dir(&clients)
        .env("PYTHONPATH", &clients)
        .env(
            "ENCLAVE_URL",
            format!("http://localhost:{}", server.http.port()),
        )
        .env("ENCLAVE_FLIGHT", format!("grpc://{}", server.flight))
        .env("ENCLAVE_DATASET", "demo-cohort")
        .env("ENCLAVE_SCREENSHOTS", &shots)
        .env("ENCLAVE_CHROMIUM", &chromium)
        .env("ENCLAVE_BOARD_TOKEN", &board_token)
        .env("ENCLAVE_BOARD_TOTP", &board_totp)
        .env("ENCLAVE_ALICE_TOKEN", &alice_token)
        .env("ENCLAVE_ALICE_TOTP", &alice_totp)
        .output()
        .expect("run the browser tour");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "browser tour failed:\n{stdout}\n{stderr}"
    );
    for check in [
        "ok: the board member registered a passkey",
        "ok: the board member signed in with the passkey alone",
        "ok: the researcher signed in with TOTP and filed a request",
        "ok: the board approved",
        "ok: the researcher's Flight SQL query is answered",
        "ok: after revocation the query is refused",
        "ok: the budget pages chart the spending",
        "the verify button reports the chain intact",
        "ok: removing the passkey ended the session it opened",
    ] {
        assert!(stdout.contains(check), "missing {check:?} in:\n{stdout}");
    }

    // What the browser did is on the record, and the chain verifies from the host too.
    let records = s.audit_records("data", 200);
    let outcomes: Vec<&str> = records
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    for outcome in [
        "passkey-added",
        "passkey-removed",
        "access-requested",
        "access-approved",
        "grant-revoked",
        "released",
    ] {
        assert!(outcomes.contains(&outcome), "{outcome} in {outcomes:?}");
    }
    let passkey_sign_in = records.iter().any(|r| {
        r["outcome"] == "signed-in"
            && r["principal"] == "board"
            && r["rule"]
                .as_str()
                .is_some_and(|d| d.ends_with("by passkey"))
    });
    assert!(passkey_sign_in, "no passkey sign-in record: {records:?}");
    let verified = s.enclave("data", &["audit", "verify"]);
    assert!(verified.contains("verif"), "{verified}");

    // Every page was saved.
    let saved = std::fs::read_dir(&shots)
        .expect("screenshots")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .count();
    assert!(saved >= 17, "{saved} screenshots in {}", shots.display());
}
