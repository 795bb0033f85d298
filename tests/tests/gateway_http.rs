//! The HTTP JSON API through the real `enclave serve` on demo data: two-factor sessions (a missing, a
//! wrong and a replayed code refused), a DP answer with its metadata, refusals for a row-level query,
//! without a grant, under an ended grant and past the budget, the datasets list without row counts, the
//! curl example, and malformed, oversized, half-open and slow clients that are cut while the server keeps
//! answering. Every request is in the audit log with user, protocol, peer, session and Cedar's decision,
//! and `enclave audit verify` passes.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use enclave_e2e::{Scratch, Server, code_at, code_now, http, parse_response, raw_exchange};
use serde_json::{Value, json};

const QUERY: &str = "SELECT p.gender, COUNT(*) AS n FROM encounters e JOIN patients p ON e.person_id = p.person_id GROUP BY p.gender";

fn sign_in(addr: std::net::SocketAddr, user: &str, token: &str, totp: &str) -> (u16, Value) {
    http(
        addr,
        "POST",
        "/api/v1/session",
        None,
        Some(&json!({"user": user, "token": token, "totp": totp})),
    )
}

fn rule(body: &Value) -> &str {
    body["error"]["rule"].as_str().unwrap_or("")
}

/// `POST /api/v1/query` with `body`.
fn post_query(addr: std::net::SocketAddr, session: &str, body: &Value) -> (u16, Value) {
    http(addr, "POST", "/api/v1/query", Some(session), Some(body))
}

fn query(addr: std::net::SocketAddr, session: &str, sql: &str, epsilon: f64) -> (u16, Value) {
    post_query(
        addr,
        session,
        &json!({"dataset": "demo-cohort", "sql": sql, "epsilon": epsilon}),
    )
}

/// A normal query still answers (the server survived whatever came before).
fn still_answers(addr: std::net::SocketAddr, session: &str) {
    let (status, body) = query(addr, session, "SELECT COUNT(*) AS n FROM patients", 0.01);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_http_api_answers_refuses_and_records_every_request() {
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    let (alice_token, alice_totp) = s.add_user("data", "alice", "researcher");
    let (bob_token, bob_totp) = s.add_user("data", "bob", "researcher");
    let (carol_token, carol_totp) = s.add_user("data", "carol", "researcher");
    let (dave_token, dave_totp) = s.add_user("data", "dave", "researcher");
    s.enclave(
        "data",
        &[
            "budget",
            "set",
            "alice",
            "demo-cohort",
            "--epsilon",
            "1.0",
            "--expires",
            "2999-12-31",
        ],
    );
    // Changed without --expires, a grant keeps its end.
    s.enclave(
        "data",
        &["budget", "set", "alice", "demo-cohort", "--epsilon", "1.0"],
    );
    s.enclave(
        "data",
        &[
            "budget",
            "set",
            "carol",
            "demo-cohort",
            "--epsilon",
            "1.0",
            "--expires",
            "2020-01-01",
        ],
    );
    s.enclave(
        "data",
        &["budget", "set", "dave", "demo-cohort", "--epsilon", "1.0"],
    );
    let mut server = Server::start(
        s.path(),
        "data",
        &["--read-timeout", "2", "--max-request-bytes", "4096"],
    );
    let addr = server.http;

    // The OpenAPI document needs no session.
    let (status, doc) = http(addr, "GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api/v1/query"].is_object());

    // Sign-in: no code, a wrong code, the right one, the same one again.
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/session",
        None,
        Some(&json!({"user": "alice", "token": alice_token})),
    );
    assert_eq!((status, rule(&body)), (400, "request"), "{body}");
    let code = code_now(&alice_totp);
    let wrong = format!(
        "{:06}",
        (code.parse::<u32>().expect("code") + 1) % 1_000_000
    );
    let (status, body) = sign_in(addr, "alice", &alice_token, &wrong);
    assert_eq!((status, rule(&body)), (401, "credentials"), "{body}");
    // The refused sign-in is on the record: its signed receipt comes with the refusal.
    assert_eq!(
        body["error"]["receipt"]["signature"].as_str().map(str::len),
        Some(128),
        "{body}"
    );
    let (status, body) = sign_in(addr, "alice", &alice_token, &code);
    assert_eq!(status, 201, "{body}");
    let alice = body["session"].as_str().expect("session").to_owned();
    let alice_id = body["session_id"].as_str().expect("id").to_owned();
    assert!(
        !body.to_string().contains(&alice_token),
        "the token is not echoed"
    );
    let (status, body) = sign_in(addr, "alice", &alice_token, &code);
    assert_eq!((status, rule(&body)), (401, "replayed-code"), "{body}");

    // No session, a forged one.
    let (status, body) = query(addr, "", "SELECT COUNT(*) FROM patients", 0.1);
    assert_eq!((status, rule(&body)), (401, "session"), "{body}");
    let (status, body) = query(
        addr,
        "forged-session-value",
        "SELECT COUNT(*) FROM patients",
        0.1,
    );
    assert_eq!((status, rule(&body)), (401, "session"), "{body}");

    // A DP answer with its metadata.
    let (status, body) = query(addr, &alice, QUERY, 0.2);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["columns"], json!(["gender", "n"]));
    assert!(!body["rows"].as_array().expect("rows").is_empty());
    assert_eq!(body["noise"][0]["column"], "n");
    assert!(body["noise"][0]["scale"].as_f64().expect("scale") > 0.0);
    assert!((body["cost"]["epsilon"].as_f64().expect("cost") - 0.2).abs() < 1e-9);
    assert!((body["budget"]["spent_epsilon"].as_f64().expect("spent") - 0.2).abs() < 1e-9);
    assert!(body["audit_seq"].as_i64().is_some());
    assert_eq!(body["receipt"]["seq"], body["audit_seq"], "{body}");
    assert_eq!(
        body["receipt"]["signature"].as_str().map(str::len),
        Some(128),
        "a signed receipt: {body}"
    );

    // Refused as written: row-level, unknown dataset; neither costs anything.
    let (status, body) = query(addr, &alice, "SELECT * FROM patients", 0.1);
    assert_eq!((status, rule(&body)), (422, "row-level"), "{body}");
    let receipt = &body["error"]["receipt"];
    assert!(
        receipt["seq"].as_i64().is_some_and(|s| s > 1),
        "a refusal carries its receipt: {body}"
    );
    assert_eq!(
        receipt["signature"].as_str().map(str::len),
        Some(128),
        "{body}"
    );
    let (status, body) = post_query(
        addr,
        &alice,
        &json!({"dataset": "no-such", "sql": "SELECT COUNT(*) FROM patients"}),
    );
    // An unknown dataset is refused as one without a grant: its existence is not told.
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    // The request names one dataset, the tables another: refused by the front door.
    let (status, body) = post_query(
        addr,
        &alice,
        &json!({"dataset": "demo-cohort", "sql": "SELECT COUNT(*) FROM other.patients"}),
    );
    assert_eq!((status, rule(&body)), (404, "catalog"), "{body}");
    // Without a dataset field, the tables' schema names it.
    let (status, body) = post_query(
        addr,
        &alice,
        &json!({"sql": "SELECT COUNT(*) AS n FROM \"demo-cohort\".patients", "epsilon": 0.01}),
    );
    assert_eq!(status, 200, "{body}");

    // Datasets and budget: what alice may query, no row counts.
    let (status, body) = http(addr, "GET", "/api/v1/datasets", Some(&alice), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["name"], "demo-cohort");
    assert!(body[0]["tables"].as_array().is_some_and(|t| !t.is_empty()));
    let text = body.to_string();
    assert!(
        !text.contains("\"rows\"") && !text.contains("persons"),
        "{text}"
    );
    let (status, body) = http(addr, "GET", "/api/v1/budget", Some(&alice), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["expires_at"], "3000-01-01T00:00:00Z");

    // Without a grant; under an ended grant. Neither sees the dataset in its list.
    let (status, body) = sign_in(addr, "bob", &bob_token, &code_now(&bob_totp));
    assert_eq!(status, 201, "{body}");
    let bob = body["session"].as_str().expect("session").to_owned();
    let (status, body) = query(addr, &bob, QUERY, 0.1);
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    assert_eq!(
        http(addr, "GET", "/api/v1/datasets", Some(&bob), None).1,
        json!([])
    );
    let (status, body) = sign_in(addr, "carol", &carol_token, &code_now(&carol_totp));
    assert_eq!(status, 201, "{body}");
    let carol = body["session"].as_str().expect("session").to_owned();
    let (status, body) = query(addr, &carol, QUERY, 0.1);
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");

    // Budget exhaustion: 0.2 spent of 1.0, then 0.85 does not fit.
    let (status, body) = query(addr, &alice, QUERY, 0.85);
    assert_eq!((status, rule(&body)), (403, "budget"), "{body}");

    // Bad input: not JSON, the wrong content type, unknown fields, an oversized body, garbage bytes, a
    // half-open request, a slow-loris client. The server answers a normal query after each.
    let (status, body) = parse_status(&raw_request(
        addr,
        "POST",
        "/api/v1/query",
        &alice,
        "application/json",
        b"{not json",
    ));
    assert_eq!((status, rule(&body)), (400, "request"), "{body}");
    still_answers(addr, &alice);
    let (status, body) = parse_status(&raw_request(
        addr,
        "POST",
        "/api/v1/query",
        &alice,
        "text/plain",
        b"{}",
    ));
    assert_eq!((status, rule(&body)), (400, "request"), "{body}");
    let (status, body) = post_query(
        addr,
        &alice,
        &json!({"dataset": "demo-cohort", "sql": "SELECT 1", "as": "bob"}),
    );
    assert_eq!((status, rule(&body)), (400, "request"), "{body}");
    let big = json!({"dataset": "demo-cohort", "sql": "x".repeat(10_000)}).to_string();
    let (status, body) = parse_status(&raw_request(
        addr,
        "POST",
        "/api/v1/query",
        &alice,
        "application/json",
        big.as_bytes(),
    ));
    assert_eq!((status, rule(&body)), (400, "request"), "{body}");
    still_answers(addr, &alice);
    let garbage = raw_exchange(addr, b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n");
    assert!(
        garbage.is_empty() || String::from_utf8_lossy(&garbage).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&garbage)
    );
    let huge_header = format!(
        "GET /api/v1/budget HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let (status, _) = parse_response(&raw_exchange(addr, huge_header.as_bytes()));
    assert!(status == 0 || status == 431 || status == 400, "{status}");
    still_answers(addr, &alice);
    // Half-open: headers promise a body that never comes; slow-loris: headers trickle in. Both are cut
    // after the read timeout (2 s here), with the connection closed.
    let started = std::time::Instant::now();
    let half = raw_exchange(
        addr,
        format!("POST /api/v1/query HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {alice}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").as_bytes(),
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the half-open request was cut"
    );
    let (status, body) = parse_status(&half);
    assert!(status == 400 || status == 0, "{status} {body}");
    let started = std::time::Instant::now();
    {
        let mut slow = std::net::TcpStream::connect(addr).expect("connect");
        slow.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut cut = false;
        // A complete, valid request (it would be answered 200) sent over about 5 s, past the 2 s limit.
        let auth = format!("Authorization: Bearer {alice}\r\n");
        for piece in [
            "GET /api/v1/bud",
            "get HTTP/1.1\r\n",
            "Host: e\r\n",
            auth.as_str(),
            "X-C: 3\r\n",
            "Connection: close\r\n",
            "\r\n",
        ] {
            if slow.write_all(piece.as_bytes()).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(900));
        }
        if !cut {
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut slow, &mut rest);
            assert!(
                !String::from_utf8_lossy(&rest).contains("200 OK"),
                "a slow client is not served"
            );
        }
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    still_answers(addr, &alice);
    assert!(server.running(), "the server stays up");

    // The curl example runs as written.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/http.sh");
    let out = std::process::Command::new("bash")
        .arg(&example)
        .env("ENCLAVE_URL", format!("http://{addr}"))
        .env("ENCLAVE_USER", "dave")
        .env("ENCLAVE_TOKEN", &dave_token)
        .env("ENCLAVE_TOTP", code_now(&dave_totp))
        .env("ENCLAVE_DATASET", "demo-cohort")
        .output()
        .expect("run examples/http.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"columns\"") && stdout.contains("spent_epsilon"),
        "{stdout}"
    );

    // A second session for alice with the next code: a code for a later step is still fresh.
    let next = code_at(&alice_totp, SystemTime::now() + Duration::from_secs(30));
    let (status, body) = sign_in(addr, "alice", &alice_token, &next);
    assert_eq!(status, 201, "{body}");

    // SIGHUP re-reads the policies: with the query policy removed, alice is denied at once.
    let policy = s.path().join("data/policies/default.cedar");
    let original = std::fs::read_to_string(&policy).expect("policy");
    let without_queries = original.replace(
        "@id(\"researchers-query-under-an-active-grant\")\npermit",
        "@id(\"researchers-query-under-an-active-grant\")\nforbid",
    );
    assert_ne!(without_queries, original);
    std::fs::write(&policy, without_queries).expect("edit policy");
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = query(addr, &alice, QUERY, 0.01);
    assert_eq!((status, rule(&body)), (403, "access"), "{body}");
    std::fs::write(&policy, original).expect("restore policy");
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    still_answers(addr, &alice);
    drop(server);

    // The audit log: every query with user, protocol, peer, session and Cedar's decision.
    s.enclave("data", &["audit", "verify"]);
    let records = s.audit_records("data", 500);
    let http_queries: Vec<&Value> = records
        .iter()
        .filter(|r| r["origin"] == "http" && !r["sql"].as_str().unwrap_or("").is_empty())
        .collect();
    for r in &http_queries {
        assert!(
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{r}"
        );
        assert!(!r["session"].as_str().unwrap_or("").is_empty(), "{r}");
    }
    let released = http_queries
        .iter()
        .find(|r| r["outcome"] == "released" && r["principal"] == "alice" && r["sql"] == QUERY)
        .expect("alice's answer is recorded");
    assert_eq!(released["session"], alice_id.as_str());
    assert_eq!(
        released["decision"],
        "allow [researchers-query-under-an-active-grant]"
    );
    for who in ["bob", "carol"] {
        let denied = http_queries
            .iter()
            .find(|r| r["principal"] == who)
            .unwrap_or_else(|| panic!("{who}'s denial is recorded"));
        assert_eq!(denied["outcome"], "refused");
        assert!(
            denied["decision"]
                .as_str()
                .is_some_and(|d| d.starts_with("deny")),
            "{denied}"
        );
        assert!(
            denied["rule"]
                .as_str()
                .is_some_and(|r| r.starts_with("access")),
            "{denied}"
        );
    }
    for rule_name in ["row-level", "budget", "access"] {
        assert!(
            http_queries.iter().any(|r| r["principal"] == "alice"
                && r["rule"].as_str().is_some_and(|r| r.starts_with(rule_name))),
            "alice's {rule_name} refusal is recorded"
        );
    }
    assert!(
        http_queries.iter().any(|r| r["decision"]
            .as_str()
            .is_some_and(|d| d.starts_with("deny"))
            && r["principal"] == "alice"),
        "the denial under the edited policy is recorded"
    );
    let sign_ins: Vec<&Value> = records
        .iter()
        .filter(|r| r["origin"] == "http" && r["sql"] == "")
        .collect();
    for outcome in ["signed-in", "sign-in-refused"] {
        assert!(
            sign_ins
                .iter()
                .any(|r| r["outcome"] == outcome && r["principal"] == "alice"),
            "{outcome}"
        );
    }
}

fn raw_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: e\r\nConnection: close\r\nAuthorization: Bearer {bearer}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_exchange(addr, &req)
}

fn parse_status(raw: &[u8]) -> (u16, Value) {
    let (status, body) = parse_response(raw);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}
