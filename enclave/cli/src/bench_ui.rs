//! `enclave bench ui`: how long the web UI's pages take to render, served by the real HTTP listener
//! in-process over TCP, on a catalog with a dataset of 10 tables and an audit log of 10,000 records
//! (requests, approvals, grants, queries and refusals, each appended and signed as in use). Prints the
//! median and slowest of repeated loads per page, for a board member and a researcher.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use catalog::CatalogStore;
use enclave::audit::{Draft, Via};
use enclave::ledger::Cost;
use enclave::{Error, Result};
use notebooks_gateway::auth::{Accounts, Role};
use notebooks_gateway::service::{Gateway, Limits, Peer, Protocol};

const DATASET: &str = "bench-ui";
const TABLES: usize = 10;
const COLUMNS: usize = 25;
/// Loads per page.
const LOADS: usize = 20;

/// A catalog version with `TABLES` tables of `COLUMNS` columns (metadata only: the pages read no rows).
fn version() -> Result<catalog::NewVersion> {
    let tables: Vec<serde_json::Value> = (0..TABLES)
        .map(|t| {
            let columns: Vec<serde_json::Value> = (0..COLUMNS)
                .map(|c| {
                    serde_json::json!({
                        "name": format!("column_{c}"), "data_type": if c % 3 == 0 { "Utf8" } else { "Float64" },
                        "role": if c == 0 { "identifier" } else { "value" },
                        "action": if c == 0 { "pseudonymize" } else { "round: 2 significant digits" },
                        "lower": if c % 3 == 0 { serde_json::Value::Null } else { 0.0.into() },
                        "upper": if c % 3 == 0 { serde_json::Value::Null } else { 1000.0.into() },
                        "domain": if c % 3 == 0 && c > 0 {
                            serde_json::json!((0..40).map(|k| format!("code-{k}")).collect::<Vec<_>>())
                        } else { serde_json::Value::Null },
                    })
                })
                .collect();
            serde_json::json!({"name": format!("table_{t}"), "file": format!("table_{t}.parquet"),
                "rows": 100_000, "columns": columns, "max_rows_per_person": 5})
        })
        .collect();
    Ok(serde_json::from_value(serde_json::json!({
        "dataset": DATASET, "version": "1", "storage_path": format!("datasets/{DATASET}/1"), "key_id": "none",
        "provenance": {"provider": "bench-hospital", "source_system": "bench", "extracted_at": "2026-11-01T00:00:00Z",
            "legal_basis": "benchmark", "consent_scope": "benchmark", "profile": "hipaa-safe-harbor"},
        "coverage": {"persons": 20000, "time_start": "2001-01", "time_end": "2026-10"},
        "max_contributions": 10, "accounting": "basic", "tables": tables,
        "report": {"note": "synthetic catalog entry for the UI benchmark"}
    }))?)
}

/// One HTTP/1.1 exchange on a fresh connection: status and body.
fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: &str,
    form: &str,
) -> Result<(u16, String)> {
    let mut stream =
        std::net::TcpStream::connect(addr).map_err(|e| Error::Io(addr.to_string(), e))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nCookie: enclave_session={cookie}\r\n"
    );
    if method == "POST" {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{form}", form.len()));
    stream
        .write_all(req.as_bytes())
        .map_err(|e| Error::Io(addr.to_string(), e))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| Error::Io(addr.to_string(), e))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    page.find(marker)
        .map(|i| {
            page[i + marker.len()..]
                .chars()
                .take_while(|c| *c != '"')
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the benchmark in `work_dir` (a fresh data directory each run) with `records` audit records.
pub fn ui_bench(work_dir: Option<PathBuf>, records: usize) -> Result<()> {
    let work = work_dir.unwrap_or_else(|| std::env::temp_dir().join("enclave-bench-ui"));
    let dir = crate::bench_gateway::fresh_data_dir(&work, "ui")?;
    let catalog = dir.catalog()?;
    catalog.publish(&version()?)?;

    let auth = |e: notebooks_gateway::auth::AuthError| Error::Internal(e.to_string());
    let accounts = Accounts::open(&dir, Duration::from_secs(3600)).map_err(auth)?;
    let board = accounts
        .add("bench", "board-1", Role::Board)
        .map_err(auth)?;
    let second = accounts
        .add("bench", "board-2", Role::Board)
        .map_err(auth)?;
    let researcher = accounts
        .add("bench", "researcher-1", Role::Researcher)
        .map_err(auth)?;
    let _ = second;

    // The audit log: every tenth record a request (half of them approved, which adds an approval and a
    // grant record), the rest queries charged or refused, as in use.
    let keystore = dir.keystore()?;
    let ledger = dir.ledger(&keystore)?;
    let started = Instant::now();
    let via = Via::local("bench ui");
    let new = enclave::access::NewRequest {
        project: "Benchmark project".into(),
        purpose: "Render the pages over a realistic log.".into(),
        datasets: vec![DATASET.into()],
        epsilon: 1.0,
        delta: None,
        days: 365,
    };
    let mut appended = 0usize;
    let mut i = 0usize;
    while appended < records {
        if i.is_multiple_of(10) {
            let r = ledger.request_access(&catalog, "researcher-1", &via, &new)?;
            appended += 1;
            if i.is_multiple_of(20) && appended + 3 <= records {
                ledger.approve_access(&catalog, "board-1", &via, r.id, Some(1.0), None)?;
                appended += 2;
            }
        } else {
            let draft = Draft::query(
                "researcher-1",
                &via,
                DATASET,
                &format!(
                    "SELECT COUNT(*) FROM table_{} WHERE column_1 > {i}",
                    i % TABLES
                ),
            );
            if i.is_multiple_of(3) {
                ledger.refuse(&draft, "row-level", "the query would release rows")?;
            } else if ledger
                .charge(
                    &draft,
                    Cost {
                        epsilon: 0.001,
                        ..Cost::default()
                    },
                )
                .is_err()
            {
                // Out of budget: the refusal is recorded by the charge itself.
            }
            appended += 1;
        }
        i += 1;
    }
    let setup = started.elapsed();
    drop(ledger);
    out!(
        "audit log: {appended} records appended and signed in {:.1} s ({:.2} ms each, synchronous = FULL)",
        setup.as_secs_f64(),
        setup.as_secs_f64() * 1000.0 / appended.max(1) as f64
    );

    let gateway = std::sync::Arc::new(
        Gateway::open(&dir, Limits::default(), Duration::from_secs(3600))
            .map_err(|e| Error::Internal(e.to_string()))?,
    );
    let peer = Peer {
        protocol: Protocol::Http,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let sign_in = crate::bench_gateway::sign_in;
    let board_session = sign_in(&gateway, "board-1", &board, &peer)?;
    let researcher_session = sign_in(&gateway, "researcher-1", &researcher, &peer)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("runtime".into(), e))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| Error::Io("bind".into(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Io("bind".into(), e))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(notebooks_gateway::http::serve(
        listener,
        std::sync::Arc::clone(&gateway),
        None,
        notebooks_gateway::web::Endpoints {
            http: Some(addr),
            ..Default::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));

    out!(
        "{:<12} {:<44} {:>8} {:>10} {:>10}",
        "as",
        "page",
        "bytes",
        "median ms",
        "max ms"
    );
    let mut slowest = 0.0f64;
    let pages: [(&str, &str, &str); 15] = [
        ("board", &board_session, "/ui/"),
        ("board", &board_session, "/ui/datasets"),
        ("board", &board_session, "/ui/datasets?q=column_7"),
        ("board", &board_session, "/ui/datasets/bench-ui"),
        ("board", &board_session, "/ui/requests"),
        ("board", &board_session, "/ui/grants"),
        ("board", &board_session, "/ui/audit"),
        (
            "board",
            &board_session,
            "/ui/audit?outcome=refused&user=researcher-1",
        ),
        (
            "board",
            &board_session,
            "/ui/audit?dataset=bench-ui&before=5000",
        ),
        ("board", &board_session, "/ui/budgets"),
        ("board", &board_session, "/ui/budgets/datasets/bench-ui"),
        ("researcher", &researcher_session, "/ui/"),
        ("researcher", &researcher_session, "/ui/datasets/bench-ui"),
        ("researcher", &researcher_session, "/ui/requests"),
        (
            "researcher",
            &researcher_session,
            "/ui/budgets/researchers/researcher-1",
        ),
    ];
    for (who, cookie, path) in pages {
        let mut times = Vec::with_capacity(LOADS);
        let mut bytes = 0;
        for _ in 0..LOADS {
            let t = Instant::now();
            let (status, body) = fetch(addr, "GET", path, cookie, "")?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            if status != 200 {
                return Err(Error::Internal(format!("{path} answered {status}")));
            }
            bytes = body.len();
        }
        times.sort_by(f64::total_cmp);
        let (median, max) = (times[LOADS / 2], times[LOADS - 1]);
        slowest = slowest.max(median);
        out!("{who:<12} {path:<44} {bytes:>8} {median:>10.1} {max:>10.1}");
    }
    // The verify button checks every record's hash and signature: an action, timed apart from the pages.
    let (_, home) = fetch(addr, "GET", "/ui/", &board_session, "")?;
    let t = Instant::now();
    let (status, body) = fetch(
        addr,
        "POST",
        "/ui/audit/verify",
        &board_session,
        &format!("csrf={}", csrf_of(&home)),
    )?;
    let verify = t.elapsed().as_secs_f64() * 1000.0;
    if status != 200 || !body.contains("the chain is intact") {
        return Err(Error::Internal(format!("verify answered {status}")));
    }
    out!("board        POST /ui/audit/verify (whole chain)          {verify:>19.1}");
    out!(
        "slowest page median: {slowest:.1} ms ({} the 100 ms target) over {TABLES} tables × {COLUMNS} columns and {appended} audit records",
        if slowest < 100.0 { "within" } else { "ABOVE" }
    );
    let _ = stop.send(());
    let _ = rt.block_on(server);
    Ok(())
}
