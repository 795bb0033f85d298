//! Access requests and grants through the real `enclave serve` and `enclave access`: a researcher files a
//! request over HTTP and cannot approve it herself (403, recorded with a receipt); a board member approves
//! it with a smaller budget and an earlier end, which the researcher's budget then shows and her query
//! runs under; a four-eyes dataset needs a second, different member; a revoked grant refuses the next
//! query; a rejected request stays rejected; malformed bodies and paths get our own errors; the host
//! commands refuse names without the step's role; every step is in the audit log, which verifies.

use enclave_e2e::{Scratch, Server, code_at, code_now, http};
use serde_json::{Value, json};

const QUERY: &str = "SELECT COUNT(*) AS n FROM patients";

/// A time in the next TOTP window (the server accepts one step ahead; this window's code may be spent).
fn next_window() -> std::time::SystemTime {
    std::time::SystemTime::now() + std::time::Duration::from_secs(30)
}

fn rule(body: &Value) -> &str {
    body["error"]["rule"].as_str().unwrap_or("")
}

fn session(addr: std::net::SocketAddr, user: &str, token: &str, totp: &str) -> String {
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/session",
        None,
        Some(&json!({"user": user, "token": token, "totp": code_now(totp)})),
    );
    assert_eq!(status, 201, "{body}");
    body["session"].as_str().expect("session").to_owned()
}

fn query(addr: std::net::SocketAddr, session: &str) -> (u16, Value) {
    http(
        addr,
        "POST",
        "/api/v1/query",
        Some(session),
        Some(&json!({"dataset": "demo-cohort", "sql": QUERY, "epsilon": 0.05})),
    )
}

fn file(addr: std::net::SocketAddr, session: &str, epsilon: f64, days: u32) -> i64 {
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/access-requests",
        Some(session),
        Some(&json!({
            "project": "Sepsis <b>outcomes</b>",
            "purpose": "Estimate 30-day mortality after sepsis.\nBy age band.",
            "datasets": ["demo-cohort"],
            "epsilon": epsilon,
            "days": days,
        })),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "pending");
    assert_eq!(body["project"], "Sepsis <b>outcomes</b>", "kept as written");
    body["id"].as_i64().expect("id")
}

fn post(addr: std::net::SocketAddr, session: &str, path: &str, body: Value) -> (u16, Value) {
    http(addr, "POST", path, Some(session), Some(&body))
}

#[test]
fn requests_become_grants_that_queries_run_under_until_they_are_revoked() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    let (alice_token, alice_totp) = s.add_user("data", "alice", "researcher");
    let (bob_token, bob_totp) = s.add_user("data", "bob", "board");
    let (carol_token, carol_totp) = s.add_user("data", "carol", "board");
    let server = Server::start(s.path(), "data", &[]);
    let addr = server.http;
    let alice = session(addr, "alice", &alice_token, &alice_totp);
    let bob = session(addr, "bob", &bob_token, &bob_totp);

    // Before any grant: refused.
    let (status, body) = query(addr, &alice);
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");

    let first = file(addr, &alice, 1.0, 30);
    // The researcher cannot take the board's steps: 403, recorded, with its receipt.
    let (status, body) = post(
        addr,
        &alice,
        &format!("/api/v1/access-requests/{first}/approve"),
        json!({}),
    );
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    assert!(body["error"]["receipt"]["signature"].is_string(), "{body}");
    let (status, body) = post(
        addr,
        &alice,
        "/api/v1/datasets/demo-cohort/approvals-required",
        json!({"approvals": 1}),
    );
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    // An unknown number looks the same to her as one she may not touch: no probing.
    let (status, body) = post(
        addr,
        &alice,
        "/api/v1/access-requests/99999/approve",
        json!({}),
    );
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    // Nor may a board member file a request.
    let (status, body) = post(
        addr,
        &bob,
        "/api/v1/access-requests",
        json!({"project": "p", "purpose": "q", "datasets": ["demo-cohort"], "epsilon": 1.0, "days": 1}),
    );
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");

    // More than was asked is refused; a smaller budget and an earlier end are granted.
    let (status, body) = post(
        addr,
        &bob,
        &format!("/api/v1/access-requests/{first}/approve"),
        json!({"epsilon": 2.0}),
    );
    assert_eq!((status, rule(&body)), (422, "access-terms"), "{body}");
    let (status, body) = post(
        addr,
        &bob,
        &format!("/api/v1/access-requests/{first}/approve"),
        json!({"epsilon": 0.5, "days": 10}),
    );
    assert_eq!(status, 200, "{body}");
    let grant = body["grant_id"].as_i64().expect("granted");
    assert_eq!(body["grant"]["approved_by"], json!(["bob"]));
    let (_, budgets) = http(addr, "GET", "/api/v1/budget", Some(&alice), None);
    assert_eq!(budgets[0]["dataset"], "demo-cohort", "{budgets}");
    assert_eq!(budgets[0]["epsilon"], 0.5, "{budgets}");
    let end = chrono::DateTime::parse_from_rfc3339(budgets[0]["expires_at"].as_str().expect("end"))
        .expect("time");
    let hours = (end.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_hours();
    assert!((9 * 24..=10 * 24).contains(&hours), "{hours} hours");
    let (status, body) = query(addr, &alice);
    assert_eq!(status, 200, "{body}");
    // A decided request stays decided.
    let (status, body) = post(
        addr,
        &bob,
        &format!("/api/v1/access-requests/{first}/reject"),
        json!({"reason": "changed my mind"}),
    );
    assert_eq!((status, rule(&body)), (409, "access-state"), "{body}");

    // Four-eyes: two different board members, the strictest terms.
    let (status, body) = post(
        addr,
        &bob,
        "/api/v1/datasets/demo-cohort/approvals-required",
        json!({"approvals": 2}),
    );
    assert_eq!(status, 200, "{body}");
    let second = file(addr, &alice, 1.0, 30);
    let approve = format!("/api/v1/access-requests/{second}/approve");
    let (status, body) = post(addr, &bob, &approve, json!({"epsilon": 0.8}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["grant_id"], Value::Null, "{body}");
    assert_eq!(body["request"]["approvals_required"], 2);
    let (status, body) = post(addr, &bob, &approve, json!({}));
    assert_eq!((status, rule(&body)), (403, "four-eyes"), "{body}");
    let carol = session(addr, "carol", &carol_token, &carol_totp);
    let (status, body) = post(addr, &carol, &approve, json!({"days": 5}));
    assert_eq!(status, 200, "{body}");
    let four_eyes = body["grant_id"].as_i64().expect("granted");
    assert_eq!(body["grant"]["epsilon"], 0.8);
    assert_eq!(body["grant"]["days"], 5);
    let (_, grants) = http(addr, "GET", "/api/v1/grants", Some(&alice), None);
    let status_of = |id: i64| {
        grants
            .as_array()
            .expect("grants")
            .iter()
            .find(|g| g["id"] == id)
            .map(|g| g["status"].clone())
    };
    assert_eq!(status_of(four_eyes), Some(json!("active")), "{grants}");
    assert_eq!(status_of(grant), Some(json!("superseded")), "{grants}");

    // Revoked: the next query is refused.
    let (status, body) = post(
        addr,
        &carol,
        &format!("/api/v1/grants/{four_eyes}/revoke"),
        json!({"reason": "the ethics approval was withdrawn"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "revoked");
    let (status, body) = query(addr, &alice);
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    let (status, body) = post(
        addr,
        &carol,
        &format!("/api/v1/grants/{four_eyes}/revoke"),
        json!({"reason": "again"}),
    );
    assert_eq!((status, rule(&body)), (409, "access-state"), "{body}");

    // Rejected with a reason.
    let third = file(addr, &alice, 1.0, 30);
    let (status, body) = post(
        addr,
        &carol,
        &format!("/api/v1/access-requests/{third}/reject"),
        json!({"reason": "the purpose does not need patient-level linkage"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "rejected");
    let (status, body) = post(
        addr,
        &bob,
        &format!("/api/v1/access-requests/{third}/approve"),
        json!({}),
    );
    assert_eq!((status, rule(&body)), (409, "access-state"), "{body}");

    // Malformed bodies and paths: our own errors, nothing recorded for them.
    for (path, body, want) in [
        (
            "/api/v1/access-requests/abc/approve",
            json!({}),
            (400, "request"),
        ),
        (
            "/api/v1/access-requests/-1/approve",
            json!({}),
            (400, "request"),
        ),
        (
            "/api/v1/access-requests/%FF/approve",
            json!({}),
            (400, "request"),
        ),
        (
            "/api/v1/access-requests/99999/approve",
            json!({}),
            (404, "access-unknown"),
        ),
        (
            "/api/v1/grants/99999/revoke",
            json!({"reason": "x"}),
            (404, "access-unknown"),
        ),
        (
            "/api/v1/access-requests/1/approve",
            json!({"epsilon": "NaN"}),
            (400, "request"),
        ),
        (
            "/api/v1/access-requests/1/approve",
            json!({"eps": 1}),
            (400, "request"),
        ),
        ("/api/v1/grants/1/revoke", json!({}), (400, "request")),
    ] {
        let (status, got) = post(addr, &bob, path, body);
        assert_eq!((status, rule(&got)), want, "{path}: {got}");
    }
    let (status, body) = post(
        addr,
        &alice,
        "/api/v1/access-requests",
        json!({"project": "p", "purpose": "q", "datasets": ["nope"], "epsilon": 1e300, "days": 1}),
    );
    assert_eq!((status, rule(&body)), (422, "access-request"), "{body}");

    // Lists: the researcher sees hers, the board sees all.
    let (_, mine) = http(addr, "GET", "/api/v1/access-requests", Some(&alice), None);
    assert_eq!(mine.as_array().map(Vec::len), Some(3), "{mine}");
    let (_, all) = http(addr, "GET", "/api/v1/access-requests", Some(&bob), None);
    assert_eq!(all.as_array().map(Vec::len), Some(3), "{all}");
    drop(server);

    // On the host: names without the step's role are refused; the lists match.
    let host = |args: &[&str], token: &str, code: &str| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--token", token, "--totp", code]);
        all.iter().map(|a| a.to_string()).collect::<Vec<String>>()
    };
    let third_id = third.to_string();
    let args = host(
        &["access", "approve", &third_id, "--by", "alice"],
        &alice_token,
        "000000",
    );
    let refused = s.enclave_fails("data", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        refused.contains("not an enabled board account"),
        "{refused}"
    );
    let request = [
        "access",
        "request",
        "--project",
        "Host",
        "--purpose",
        "q",
        "--dataset",
        "demo-cohort",
        "--epsilon",
        "0.3",
        "--days",
        "7",
        "--as",
    ];
    let mut as_bob = request.to_vec();
    as_bob.push("bob");
    let args = host(&as_bob, &bob_token, "000000");
    let refused = s.enclave_fails("data", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        refused.contains("not an enabled researcher account"),
        "{refused}"
    );
    // A board member's name is not enough: the step needs their factors.
    let code = code_at(&bob_totp, next_window());
    let args = host(
        &[
            "access", "reject", &third_id, "--by", "bob", "--reason", "x",
        ],
        "not-bobs-token",
        &code,
    );
    let refused = s.enclave_fails("data", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(refused.contains("credentials"), "{refused}");
    // The refused sign-in is on the record; the command prints its receipt.
    assert!(refused.contains("receipt: {\"seq\":"), "{refused}");
    let listed: Value =
        serde_json::from_str(&s.enclave("data", &["access", "list", "--json"])).expect("json");
    assert_eq!(listed, all);
    // The next window's code: this window's was spent signing in over HTTP.
    let code = code_at(&alice_totp, next_window());
    let mut as_alice = request.to_vec();
    as_alice.push("alice");
    let args = host(&as_alice, &alice_token, &code);
    let out = s.enclave("data", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("[pending]"), "{out}");

    // Every step is recorded, and the log verifies.
    let outcomes: Vec<String> = s
        .audit_records("data", 200)
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or("").to_owned())
        .collect();
    for want in [
        "access-requested",
        "access-approved",
        "access-rejected",
        "grant-revoked",
        "approvals-required",
        "granted",
    ] {
        assert!(outcomes.iter().any(|o| o == want), "{want} in {outcomes:?}");
    }
    let verified = s.enclave("data", &["audit", "verify"]);
    assert!(verified.contains("audit log verifies"), "{verified}");
}
