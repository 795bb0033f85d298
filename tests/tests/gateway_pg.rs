//! The Postgres wire listener through the real `enclave serve` on demo data, with real clients: psql (its
//! meta-commands `\dt`, `\d`, `\d+`, `\dn`, `\l` and queries; sign-in without the TOTP code, with a wrong
//! and a replayed one), psycopg 3 from Python (`tests/clients/pg_psycopg.py`: both query protocols, pandas,
//! DBeaver's and SQLAlchemy's connect-time catalog queries, every refusal), and `examples/psql.sh`.
//! Malformed, oversized, half-open and slow clients are cut and the server keeps answering. The audit log
//! has every request with user, protocol, peer and Cedar's decision, and verifies.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use enclave_e2e::{
    Scratch, Server, assert_gateway_records, client_python, code_at, code_now, env_value,
};
use serde_json::Value;

const QUERY: &str = "SELECT gender, COUNT(*) AS n FROM patients GROUP BY gender";

/// Runs psql with `password` against the listener, each of `commands` as a `-c`.
fn psql(addr: SocketAddr, user: &str, password: &str, database: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args(["--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["-U", user, "-d", database])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().expect("run psql (Debian's postgresql-client)")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: &Output) -> String {
    let all = text(out);
    assert!(out.status.success(), "psql failed:\n{all}");
    assert!(!all.contains("ERROR"), "{all}");
    all
}

fn refused(out: &Output, rule: &str) -> String {
    let all = text(out);
    assert!(!out.status.success(), "expected a refusal:\n{all}");
    assert!(all.contains(&format!("rule '{rule}'")), "{rule}:\n{all}");
    all
}

/// The Postgres startup message for `user` on `database`.
fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// Sends `bytes` and reads whatever comes back until the server closes or 15 s pass.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (out, started.elapsed())
}

#[test]
fn postgres_clients_are_answered_refused_and_recorded() {
    let python = client_python();
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    // psycopg's users (alice, bob, carol, erin), the example's (dave) and psql's (pat, ben, cora, eve):
    // each TOTP code signs in once, so the clients do not share users.
    let env = s.add_researchers(
        "data",
        "demo-cohort",
        &[
            (
                "alice",
                Some(&["--epsilon", "3.0", "--expires", "2999-12-31"]),
            ),
            ("bob", None),
            (
                "carol",
                Some(&["--epsilon", "1.0", "--expires", "2020-01-01"]),
            ),
            ("erin", Some(&["--epsilon", "0.15"])),
            ("dave", Some(&["--epsilon", "1.0"])),
            ("pat", Some(&["--epsilon", "2.0"])),
            ("ben", None),
            (
                "cora",
                Some(&["--epsilon", "1.0", "--expires", "2020-01-01"]),
            ),
            ("eve", Some(&["--epsilon", "0.15"])),
        ],
    );
    let var = |name: &str| env_value(&env, name);
    let mut server = Server::start(
        s.path(),
        "data",
        &["--max-request-bytes", "8192", "--read-timeout", "2"],
    );
    let addr = server.pg;
    let token = |u: &str| var(&format!("ENCLAVE_{}_TOKEN", u.to_uppercase()));
    let secret = |u: &str| var(&format!("ENCLAVE_{}_TOTP", u.to_uppercase()));

    // psql: sign-in without the TOTP code, with a wrong one, the right one, the same one again.
    refused(
        &psql(addr, "pat", &token("pat"), "demo-cohort", &["SELECT 1"]),
        "session",
    );
    let code = code_now(&secret("pat"));
    let wrong = format!(
        "{:06}",
        (code.parse::<u32>().expect("code") + 1) % 1_000_000
    );
    let refusal = refused(
        &psql(
            addr,
            "pat",
            &format!("{}:{wrong}", token("pat")),
            "demo-cohort",
            &["SELECT 1"],
        ),
        "credentials",
    );
    // The refused sign-in's receipt comes in the error's DETAIL.
    assert!(refusal.contains("DETAIL:  receipt: {\"seq\":"), "{refusal}");
    let password = format!("{}:{code}", token("pat"));
    let catalog = ok(&psql(
        addr,
        "pat",
        &password,
        "demo-cohort",
        &[
            "\\dt",
            "\\dt+",
            "\\d encounters",
            "\\d+ patients",
            "\\dn",
            "\\l",
            "\\d",
        ],
    ));
    for shown in [
        "demo-cohort | encounters",
        "Table \"demo-cohort.encounters\"",
        "double precision",
        "role: quasi_identifier",
        "List of schemas",
        "List of databases",
    ] {
        assert!(catalog.contains(shown), "{shown} missing from:\n{catalog}");
    }
    assert!(
        !catalog.contains("not supported"),
        "psql's catalog queries are all answered:\n{catalog}"
    );
    refused(
        &psql(addr, "pat", &password, "demo-cohort", &["SELECT 1"]),
        "replayed-code",
    );

    // A DP answer with its NOTICE; the session from the first sign-in is a password too.
    let next = code_at(
        &secret("pat"),
        std::time::SystemTime::now() + Duration::from_secs(30),
    );
    let login: Value = serde_json::from_str(&s.enclave(
        "data",
        &[
            "login",
            "--user",
            "pat",
            "--token",
            &token("pat"),
            "--totp",
            &next,
            "--json",
        ],
    ))
    .expect("login JSON");
    let session = login["session"].as_str().expect("session").to_owned();
    let answer = ok(&psql(addr, "pat", &session, "demo-cohort", &[QUERY]));
    for shown in [
        "n_ci_low",
        "NOTICE:",
        "cost: ε 0.100000",
        "budget left",
        "audit record #",
        "receipt: {\"seq\":",
    ] {
        assert!(answer.contains(shown), "{shown} missing from:\n{answer}");
    }
    // Qualified by the dataset from another database; SET search_path picks the default dataset.
    ok(&psql(
        addr,
        "pat",
        &session,
        "postgres",
        &["SELECT COUNT(*) AS n FROM \"demo-cohort\".patients"],
    ));
    ok(&psql(
        addr,
        "pat",
        &session,
        "postgres",
        &[
            "SET search_path TO \"demo-cohort\"",
            "SELECT COUNT(*) AS n FROM patients",
        ],
    ));
    // Refusals: row-level, another dataset's schema, two queries in one message, a write. The engine's
    // refusal carries its signed receipt in the error's DETAIL.
    let row_level = refused(
        &psql(
            addr,
            "pat",
            &session,
            "demo-cohort",
            &["SELECT * FROM patients"],
        ),
        "row-level",
    );
    assert!(
        row_level.contains("DETAIL:  receipt: {\"seq\":"),
        "{row_level}"
    );
    refused(
        &psql(
            addr,
            "pat",
            &session,
            "demo-cohort",
            &["SELECT COUNT(*) FROM patients; SELECT COUNT(*) FROM encounters"],
        ),
        "statement",
    );
    let write = text(&psql(
        addr,
        "pat",
        &session,
        "demo-cohort",
        &["DELETE FROM patients"],
    ));
    assert!(
        write.contains("ERROR") && write.contains("rule '"),
        "{write}"
    );
    // psql for the other users: no grant, an ended grant, an exhausted budget.
    let signed = |u: &str| format!("{}:{}", token(u), code_now(&secret(u)));
    refused(
        &psql(addr, "ben", &signed("ben"), "demo-cohort", &[QUERY]),
        "access",
    );
    refused(
        &psql(addr, "cora", &signed("cora"), "demo-cohort", &[QUERY]),
        "access",
    );
    let eve = text(&psql(
        addr,
        "eve",
        &signed("eve"),
        "demo-cohort",
        &[QUERY, QUERY],
    ));
    assert!(
        eve.contains("n_ci_low") && eve.contains("rule 'budget'"),
        "{eve}"
    );

    // psycopg 3.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/pg_psycopg.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("ENCLAVE_PG", addr.to_string())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run the psycopg client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "no TOTP code",
        "wrong TOTP",
        "replayed TOTP",
        "DP answer",
        "extended protocol",
        "SET enclave.epsilon",
        "bind parameters",
        "DBeaver",
        "row-level",
        "no grant",
        "ended grant",
        "exhausted budget",
    ] {
        assert!(stdout.contains(check), "{check} missing from:\n{stdout}");
    }

    // Bad input: garbage, a bad protocol version, a message announcing 1 GiB, a half-open startup and
    // a trickling one (both cut after the 2 s read timeout), a query past the size limit; the server
    // answers a normal query after each.
    let (garbage, _) = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!String::from_utf8_lossy(&garbage).contains("200"));
    let mut bad_version = startup("dave", "demo-cohort");
    bad_version[4] = 9;
    let (answer, _) = exchange(addr, &bad_version);
    assert!(
        answer.first() != Some(&b'R'),
        "no sign-in for a bad version"
    );
    // A query before the password: cut, never answered.
    let mut early = startup("dave", "demo-cohort");
    early.extend_from_slice(b"Q\x00\x00\x00\x0dSELECT 1\x00");
    let (answer, elapsed) = exchange(addr, &early);
    assert!(
        elapsed < Duration::from_secs(10),
        "cut at once ({elapsed:?})"
    );
    assert!(!answer.contains(&b'T'), "no row description before sign-in");
    let mut huge = startup("dave", "demo-cohort");
    huge.extend_from_slice(b"p\x40\x00\x00\x00");
    let (answer, elapsed) = exchange(addr, &huge);
    assert!(
        elapsed < Duration::from_secs(10),
        "cut at once ({elapsed:?})"
    );
    assert!(
        !String::from_utf8_lossy(&answer).contains("AuthenticationOk"),
        "no sign-in"
    );
    for partial in [&startup("dave", "demo-cohort")[..7], &b"\x00"[..]] {
        let (_, elapsed) = exchange(addr, partial);
        assert!(
            elapsed < Duration::from_secs(10),
            "a half-open startup is cut ({elapsed:?})"
        );
    }
    {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut cut = false;
        for b in startup("dave", "demo-cohort") {
            if s.write_all(&[b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            if started.elapsed() > Duration::from_secs(12) {
                break;
            }
        }
        let mut rest = Vec::new();
        let closed = s.read_to_end(&mut rest).is_ok() || cut;
        assert!(
            closed && started.elapsed() < Duration::from_secs(15),
            "a trickling client is cut ({:?})",
            started.elapsed()
        );
    }
    let big = format!(
        "SELECT COUNT(*) AS n FROM patients WHERE gender <> '{}'",
        "x".repeat(20_000)
    );
    let oversized = text(&psql(addr, "pat", &session, "demo-cohort", &[&big]));
    assert!(oversized.contains("rule 'request'"), "{oversized}");
    ok(&psql(addr, "pat", &session, "demo-cohort", &[QUERY]));

    // The example script runs as written.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/psql.sh");
    let out = Command::new("bash")
        .arg(&example)
        .env("ENCLAVE_PG_HOST", addr.ip().to_string())
        .env("ENCLAVE_PG_PORT", addr.port().to_string())
        .env("ENCLAVE_USER", "dave")
        .env("ENCLAVE_TOKEN", token("dave"))
        .env("ENCLAVE_TOTP", code_now(&secret("dave")))
        .env("ENCLAVE_DATASET", "demo-cohort")
        .output()
        .expect("run examples/psql.sh");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("mean_cost_ci_low") && all.contains("cost: ε 0.200000"),
        "{all}"
    );
    assert!(server.running(), "the server stays up");
    drop(server);

    // The audit log: every pg request with user, protocol, peer, session and Cedar's decision.
    s.enclave("data", &["audit", "verify"]);
    let records = s.audit_records("data", 1000);
    assert_gateway_records(
        &records,
        "pg",
        "demo-cohort",
        "pat",
        "pat",
        &[
            ("pat", "row-level"),
            ("alice", "row-level"),
            ("bob", "access"),
            ("carol", "access"),
            ("erin", "budget"),
            ("ben", "access"),
            ("cora", "access"),
            ("eve", "budget"),
            ("pat", "statement"),
            ("alice", "parameters"),
        ],
    );
}
