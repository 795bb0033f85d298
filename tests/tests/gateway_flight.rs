//! Arrow Flight SQL through the real `enclave serve` on demo data, with real clients: ADBC's Flight SQL
//! driver from Python (pandas, polars; `tests/clients/flight_adbc.py`: a DP answer with its metadata,
//! the catalog, a prepared statement, and refusals without the TOTP code, with a wrong and a replayed
//! one, for a row-level query, without a grant, under an ended grant and past the budget), and
//! arrow-flight's Rust client for what ADBC does not expose: a ticket is good once, for its own session
//! only, and a forged one is refused and recorded. Malformed and oversized messages leave the server
//! answering. The audit log has every request with user, protocol, peer and Cedar's decision.

use std::time::{Duration, SystemTime};

use arrow_flight::Ticket;
use arrow_flight::sql::client::FlightSqlServiceClient;
use enclave_e2e::{
    Scratch, Server, assert_gateway_records, client_python, code_at, code_now, env_value,
    raw_exchange,
};
use futures::TryStreamExt as _;

const QUERY: &str = "SELECT COUNT(*) AS n FROM \"demo-cohort\".patients";

async fn client(addr: std::net::SocketAddr) -> FlightSqlServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    FlightSqlServiceClient::new(channel)
}

/// Fetches a ticket's answer: its rows, or why not.
async fn fetch(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    ticket: Ticket,
) -> Result<usize, arrow_flight::error::FlightError> {
    let batches: Vec<_> = client.do_get(ticket).await?.try_collect().await?;
    Ok(batches.iter().map(|b| b.num_rows()).sum())
}

fn denied(text: &str) -> bool {
    (text.contains("PermissionDenied") || text.contains("permission denied"))
        && text.contains("rule 'ticket'")
}

#[test]
fn flight_sql_answers_real_clients_and_tickets_are_single_use() {
    let python = client_python();
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    let env = s.add_researchers(
        "data",
        "demo-cohort",
        &[
            (
                "alice",
                Some(&["--epsilon", "2.0", "--expires", "2999-12-31"]),
            ),
            ("bob", None),
            (
                "carol",
                Some(&["--epsilon", "1.0", "--expires", "2020-01-01"]),
            ),
            ("erin", Some(&["--epsilon", "0.15"])),
            ("dave", Some(&["--epsilon", "1.0"])),
        ],
    );
    let var = |name: &str| env_value(&env, name);
    let mut server = Server::start(
        s.path(),
        "data",
        &["--max-request-bytes", "8192", "--read-timeout", "2"],
    );
    let addr = server.flight;

    // Real clients: ADBC from Python.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/flight_adbc.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .env("ENCLAVE_FLIGHT", format!("grpc://{addr}"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run the ADBC client");
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
        "prepared statement",
        "catalog lists",
        "row-level",
        "no grant",
        "ended grant",
        "exhausted budget",
    ] {
        assert!(stdout.contains(check), "{check} missing from:\n{stdout}");
    }

    // Tickets, through arrow-flight's client.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut dave = client(addr).await;
        let password = format!(
            "{}:{}",
            var("ENCLAVE_DAVE_TOKEN"),
            code_now(&var("ENCLAVE_DAVE_TOTP"))
        );
        dave.handshake("dave", &password).await.expect("handshake");
        let info = dave.execute(QUERY.into(), None).await.expect("execute");
        let ticket = info.endpoint[0].ticket.clone().expect("ticket");
        assert!(
            !String::from_utf8_lossy(&ticket.ticket).contains("SELECT"),
            "the ticket is not the SQL"
        );
        assert_eq!(
            fetch(&mut dave, ticket.clone()).await.expect("the answer"),
            1
        );
        // Replayed, forged, and another session's ticket.
        let again = fetch(&mut dave, ticket.clone()).await;
        assert!(
            again.as_ref().is_err_and(|e| denied(&format!("{e:?}"))),
            "a used ticket is refused: {again:?}"
        );
        let forged = Ticket::new(b"\x0a\x04abcd".to_vec());
        let forged = fetch(&mut dave, forged).await;
        assert!(
            forged.as_ref().is_err_and(|e| denied(&format!("{e:?}"))),
            "a forged ticket is refused: {forged:?}"
        );
        let info = dave.execute(QUERY.into(), None).await.expect("execute");
        let ticket = info.endpoint[0].ticket.clone().expect("ticket");
        let mut other = client(addr).await;
        let next = code_at(
            &var("ENCLAVE_DAVE_TOTP"),
            SystemTime::now() + Duration::from_secs(30),
        );
        other
            .handshake("dave", &format!("{}:{next}", var("ENCLAVE_DAVE_TOKEN")))
            .await
            .expect("second session");
        let stolen = fetch(&mut other, ticket.clone()).await;
        assert!(
            stolen.as_ref().is_err_and(|e| denied(&format!("{e:?}"))),
            "another session's ticket is refused: {stolen:?}"
        );
        let after = fetch(&mut dave, ticket).await;
        assert!(
            after.as_ref().is_err_and(|e| denied(&format!("{e:?}"))),
            "a ticket shown by another session is spent: {after:?}"
        );

        // Malformed and oversized: garbage bytes on the port, a bad HTTP/2 frame, a silent client and one
        // that trickles its preface (both cut after the 2 s first-bytes timeout), an oversized query;
        // then a normal one.
        let garbage = raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage",
        );
        assert!(!String::from_utf8_lossy(&garbage).contains("200 OK"));
        {
            use std::io::Write as _;
            let mut bad = std::net::TcpStream::connect(addr).expect("connect");
            bad.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\xff\xff\xff\xff\xff\xff")
                .expect("write");
        }
        for trickle in [&b""[..], b"PRI * HT"] {
            let started = std::time::Instant::now();
            let _ = raw_exchange(addr, trickle);
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a silent or slow client is cut ({:?})",
                started.elapsed()
            );
        }
        let big = format!(
            "SELECT COUNT(*) AS n FROM \"demo-cohort\".patients WHERE gender <> '{}'",
            "x".repeat(20_000)
        );
        assert!(
            dave.execute(big, None).await.is_err(),
            "an oversized message is refused"
        );
        let info = dave
            .execute(QUERY.into(), None)
            .await
            .expect("still answers");
        assert_eq!(info.endpoint.len(), 1);
    });
    assert!(server.running(), "the server stays up");
    drop(server);

    s.enclave("data", &["audit", "verify"]);
    let records = s.audit_records("data", 500);
    let flight = assert_gateway_records(
        &records,
        "flight",
        "demo-cohort",
        "alice",
        "alice",
        &[
            ("alice", "row-level"),
            ("bob", "access"),
            ("carol", "access"),
            ("erin", "budget"),
        ],
    );
    let tickets = flight
        .iter()
        .filter(|r| r["rule"].as_str().is_some_and(|x| x.starts_with("ticket")))
        .count();
    assert!(
        tickets >= 3,
        "replayed, forged and stolen tickets are recorded ({tickets})"
    );
}

/// `examples/notebook.ipynb` runs top to bottom under nbclient against a real server (ADBC, pandas, polars,
/// matplotlib), so the example cannot rot.
#[test]
fn the_example_notebook_runs() {
    let python = client_python();
    let s = Scratch::new();
    s.enclave("data", &["demo", "--patients", "60"]);
    let (token, secret) = s.add_user("data", "nina", "researcher");
    s.enclave(
        "data",
        &["budget", "set", "nina", "demo-cohort", "--epsilon", "1.0"],
    );
    let server = Server::start(s.path(), "data", &[]);
    let notebook =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/notebook.ipynb");
    let runner = "import sys, nbformat, nbclient\n\
        nb = nbformat.read(sys.argv[1], as_version=4)\n\
        nbclient.NotebookClient(nb, timeout=180, kernel_name='python3').execute()\n\
        for cell in nb.cells:\n\
        \x20   for out in cell.get('outputs', []):\n\
        \x20       print(out.get('text', '') or out.get('data', {}).get('text/plain', ''))\n";
    let out = std::process::Command::new(&python)
        .args(["-c", runner])
        .arg(&notebook)
        .env("ENCLAVE_FLIGHT", format!("grpc://{}", server.flight))
        .env("ENCLAVE_USER", "nina")
        .env("ENCLAVE_TOKEN", &token)
        .env("ENCLAVE_TOTP", code_now(&secret))
        .env("MPLBACKEND", "Agg")
        .output()
        .expect("run nbclient");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("spent of 1"),
        "the budget left is shown:\n{stdout}"
    );
    assert!(
        stdout.contains("mean_cost_ci_low"),
        "the grouped average has its intervals:\n{stdout}"
    );
}
