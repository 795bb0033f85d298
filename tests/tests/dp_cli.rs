//! The researcher's local path through the real binary: `enclave sql` spends exactly what it says,
//! refuses what the budget cannot pay, and every query is in an audit log that `enclave audit verify`
//! checks — and that fails, naming the record, when someone edits the database behind its back.

use std::path::Path;

use enclave_e2e::{Scratch, enclave, enclave_command, enclave_output};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

/// `enclave --data-dir enclave-data sql --as PRINCIPAL --dataset demo-cohort REST…`.
fn sql<'a>(principal: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--data-dir",
        "enclave-data",
        "sql",
        "--as",
        principal,
        "--dataset",
        "demo-cohort",
    ];
    args.extend_from_slice(rest);
    args
}

#[test]
fn sql_spends_its_epsilon_refuses_past_the_budget_and_the_audit_log_catches_tampering() {
    let s = Scratch::new();
    s.enclave("enclave-data", &["demo", "--patients", "60"]);
    let out = s.enclave(
        "enclave-data",
        &["budget", "set", "alice", "demo-cohort", "--epsilon", "1.0"],
    );
    assert!(out.contains("alice on demo-cohort: ε 1"), "{out}");
    let q = "SELECT department, COUNT(*) AS visits, AVG(base_cost) AS cost FROM encounters GROUP BY department ORDER BY department";

    let first = enclave(s.path(), &sql("alice", &["--epsilon", "0.4", q]));
    assert!(
        first.contains("cost: ε 0.400000") && first.contains("budget left: ε 0.600000"),
        "{first}"
    );
    assert!(
        first.contains("visits 95% CI") && first.contains("(8 rows)"),
        "{first}"
    );
    let second: serde_json::Value = serde_json::from_str(&enclave(
        s.path(),
        &sql("alice", &["--epsilon", "0.4", "--json", q]),
    ))
    .expect("json");
    assert_eq!(second["rows"].as_array().expect("rows").len(), 8);
    assert_eq!(
        second["columns"],
        serde_json::json!(["department", "visits", "cost"])
    );
    assert!((second["cost"]["epsilon"].as_f64().expect("eps") - 0.4).abs() < 1e-9);
    assert!(second["noise"][0]["scale"].as_f64().expect("scale") > 0.0);

    let third = enclave_output(s.path(), &sql("alice", &["--epsilon", "0.4", q]));
    assert!(!third.status.success());
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(
        err.contains(
            "refused by rule 'budget': budget exhausted: 0.200000 ε left, query needs 0.400000"
        ),
        "{err}"
    );
    // A refusal is on the record, and says so with its signed receipt (stderr; stdout too with --json).
    let receipt: serde_json::Value = serde_json::from_str(
        err.lines()
            .find_map(|l| l.strip_prefix("receipt: "))
            .expect("a receipt line"),
    )
    .expect("receipt json");
    assert_eq!(
        (
            receipt["seq"].as_i64(),
            receipt["signature"].as_str().map(str::len)
        ),
        (Some(4), Some(128)),
        "{err}"
    );
    let row_level = enclave_output(
        s.path(),
        &sql("alice", &["--json", "SELECT * FROM patients"]),
    );
    assert!(!row_level.status.success());
    assert!(String::from_utf8_lossy(&row_level.stderr).contains("rule 'row-level'"));
    let refusal: serde_json::Value =
        serde_json::from_slice(&row_level.stdout).expect("a JSON refusal");
    assert_eq!(refusal["error"]["rule"], "row-level", "{refusal}");
    assert_eq!(refusal["error"]["receipt"]["seq"], 5, "{refusal}");

    let verify = s.enclave("enclave-data", &["audit", "verify"]);
    assert!(verify.contains("audit log verifies: 5 records"), "{verify}");
    let tail = s.enclave("enclave-data", &["audit", "tail", "--json"]);
    let outcomes: Vec<String> = tail
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["outcome"]
                .as_str()
                .expect("o")
                .to_owned()
        })
        .collect();
    assert_eq!(
        outcomes,
        ["granted", "released", "released", "refused", "refused"]
    );

    for (name, sql, seq) in [
        (
            "edit",
            "UPDATE audit_log SET sql = 'SELECT 1' WHERE seq = 2",
            "record 2",
        ),
        ("delete", "DELETE FROM audit_log WHERE seq = 3", "record 3"),
        (
            "reorder",
            "UPDATE audit_log SET seq = 99 WHERE seq = 1; UPDATE audit_log SET seq = 1 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE seq = 99",
            "record 1",
        ),
    ] {
        let copy = s.path().join(format!("tampered-{name}"));
        copy_dir(&s.path().join("enclave-data"), &copy);
        rusqlite::Connection::open(copy.join("enclave.db"))
            .expect("open")
            .execute_batch(sql)
            .expect("tamper");
        let out = enclave_output(
            s.path(),
            &[
                "--data-dir",
                copy.to_str().expect("utf8"),
                "audit",
                "verify",
            ],
        );
        assert!(!out.status.success(), "{name}: verify must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("audit log broken at {seq}")),
            "{name}: {err}"
        );
    }
}

/// A crash after the charge and its audit record commit, before the answer is released, loses the answer
/// and nothing else: the budget is charged, the record says released, the log verifies, and the next query
/// goes on from there.
#[test]
fn a_crash_between_commit_and_release_loses_only_the_answer() {
    let s = Scratch::new();
    s.enclave("enclave-data", &["demo", "--patients", "40"]);
    s.enclave(
        "enclave-data",
        &["budget", "set", "bob", "demo-cohort", "--epsilon", "1.0"],
    );
    let q = "SELECT COUNT(*) AS n FROM patients";
    let args = sql("bob", &["--epsilon", "0.3", q]);
    let crashed = enclave_command(s.path(), &args)
        .env("ENCLAVE_DANGER_CRASH_AFTER_CHARGE", "1")
        .output()
        .expect("run");
    assert!(!crashed.status.success(), "the process died");
    assert!(
        crashed.stdout.is_empty(),
        "no answer left: {}",
        String::from_utf8_lossy(&crashed.stdout)
    );
    let budget: serde_json::Value =
        serde_json::from_str(&s.enclave("enclave-data", &["budget", "show", "bob", "--json"]))
            .expect("json");
    let spent = budget[0]["spent_epsilon"].as_f64().expect("spent");
    assert!(
        (spent - 0.3).abs() < 1e-9,
        "the charge is durable: {budget}"
    );
    let tail = s.enclave("enclave-data", &["audit", "tail", "--json"]);
    let last: serde_json::Value =
        serde_json::from_str(tail.lines().last().expect("a record")).expect("json");
    assert_eq!(last["outcome"], "released");
    assert_eq!(last["sql"], q);
    let verify = s.enclave("enclave-data", &["audit", "verify"]);
    assert!(verify.contains("audit log verifies: 2 records"), "{verify}");

    let next = enclave(s.path(), &args);
    assert!(next.contains("budget left: ε 0.400000"), "{next}");
}

/// Runs `enclave args…` in `cwd` with its standard output closed before it writes (a reader gone).
fn with_stdout_closed(cwd: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut child = enclave_command(cwd, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    child.wait_with_output().expect("wait")
}

/// `enclave sql … | head -0`: a reader that closes the pipe early causes no panic and stops nothing
/// half done (the answer was charged and audited before it was printed); the exit status says the
/// output was lost.
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    let s = Scratch::new();
    s.enclave("enclave-data", &["demo", "--patients", "40"]);
    s.enclave(
        "enclave-data",
        &["budget", "set", "carol", "demo-cohort", "--epsilon", "1.0"],
    );
    let args = sql(
        "carol",
        &["--epsilon", "0.1", "SELECT COUNT(*) AS n FROM patients"],
    );
    let out = with_stdout_closed(s.path(), &args);
    let err = String::from_utf8_lossy(&out.stderr);
    // The answer was charged and recorded, but nobody read it: said so, with SIGPIPE's exit status.
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(
        !err.contains("panicked") && err.contains("its output was closed by its reader"),
        "{err}"
    );
    let verify = s.enclave("enclave-data", &["audit", "verify"]);
    assert!(verify.contains("audit log verifies: 2 records"), "{verify}");
    // Every command's output, not only answers: `enclave catalog show … | head` and the like.
    for args in [
        &[
            "--data-dir",
            "enclave-data",
            "catalog",
            "show",
            "demo-cohort",
        ][..],
        &["--data-dir", "enclave-data", "audit", "tail"][..],
        &["--data-dir", "enclave-data", "audit", "verify"][..],
    ] {
        let out = with_stdout_closed(s.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(141) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A command whose output is cut off early still does all it does: `init` with its policies and
    // TLS pair, though its first line found nobody to read it.
    let out = with_stdout_closed(s.path(), &["--data-dir", "fresh", "init", "--self-signed"]);
    assert_eq!(out.status.code(), Some(141));
    assert!(
        s.path().join("fresh/policies/default.cedar").exists()
            && s.path().join("fresh/tls/cert.pem").exists()
    );
}

/// Someone with write access to the database deletes the last records (and their signatures) and lowers
/// the budget's spent amount to match: the log alone still verifies, but not against the signed head the
/// board keeps outside the enclave, and the researcher's receipt for a deleted query no longer verifies.
#[test]
fn a_log_cut_short_is_caught_by_the_boards_witness_and_the_researchers_receipt() {
    let s = Scratch::new();
    s.enclave("enclave-data", &["demo", "--patients", "60"]);
    s.enclave(
        "enclave-data",
        &["budget", "set", "alice", "demo-cohort", "--epsilon", "5.0"],
    );
    let q = "SELECT COUNT(*) AS n FROM patients";
    let mut receipts = Vec::new();
    for _ in 0..2 {
        let answer: serde_json::Value = serde_json::from_str(&enclave(
            s.path(),
            &sql("alice", &["--epsilon", "0.5", "--json", q]),
        ))
        .expect("json");
        let receipt = answer["receipt"].clone();
        assert_eq!(receipt["seq"], answer["audit_seq"], "{answer}");
        assert_eq!(receipt["signature"].as_str().map(str::len), Some(128));
        let path = s.path().join(format!("receipt-{}.json", receipt["seq"]));
        std::fs::write(&path, receipt.to_string()).expect("write receipt");
        receipts.push(path);
    }
    let witness = s.path().join("board-witness.json");
    let exported = s.enclave(
        "enclave-data",
        &["audit", "head", "--export", witness.to_str().expect("utf8")],
    );
    assert!(exported.contains("signed head of record 3"), "{exported}");
    let arg = |p: &Path| p.to_str().expect("utf8").to_owned();
    let (w, r2, r3) = (arg(&witness), arg(&receipts[0]), arg(&receipts[1]));
    let ok = s.enclave(
        "enclave-data",
        &[
            "audit",
            "verify",
            "--witness",
            &w,
            "--receipt",
            &r2,
            "--receipt",
            &r3,
        ],
    );
    assert!(
        ok.contains("audit log verifies: 3 records")
            && ok.contains("holds the board's witness (record 3)")
            && ok.contains("holds receipt of record 2"),
        "{ok}"
    );

    // The cut: the two queries' records and signatures go, and the budget "was never spent".
    rusqlite::Connection::open(s.path().join("enclave-data/enclave.db"))
        .expect("open")
        .execute_batch(
            "DELETE FROM audit_log WHERE seq >= 2; DELETE FROM audit_checkpoints WHERE seq >= 2;
             UPDATE budgets SET spent_epsilon = 0 WHERE principal = 'alice';",
        )
        .expect("tamper");
    let alone = s.enclave("enclave-data", &["audit", "verify"]);
    assert!(
        alone.contains("audit log verifies: 1 records"),
        "the log alone cannot tell: {alone}"
    );
    let failing = |args: &[&str]| {
        let mut all = vec!["--data-dir", "enclave-data", "audit", "verify"];
        all.extend_from_slice(args);
        let out = enclave_output(s.path(), &all);
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = failing(&["--witness", &w]);
    assert!(
        err.contains("audit log broken at record 2")
            && err.contains("records 2 to 3 are missing: the log ends at record 1"),
        "{err}"
    );
    // Nor is the cut log blessed by a fresh witness: the new head is handed out only after the old one.
    let next = s.path().join("next-witness.json");
    let refused = enclave_output(
        s.path(),
        &[
            "--data-dir",
            "enclave-data",
            "audit",
            "head",
            "--previous",
            &w,
            "--export",
            next.to_str().expect("utf8"),
        ],
    );
    assert!(!refused.status.success() && !next.exists());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("records 2 to 3 are missing"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let err = failing(&["--receipt", &r2]);
    assert!(
        err.contains("record 2 is missing: the log ends at record 1"),
        "{err}"
    );

    // A receipt whose hash or number was altered is not the enclave's.
    let mut forged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&receipts[0]).expect("read")).expect("json");
    forged["seq"] = 1.into();
    let forged_path = s.path().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).expect("write");
    let err = failing(&["--receipt", &arg(&forged_path)]);
    assert!(err.contains("not the enclave's audit key's"), "{err}");
}
