//! `enclave bench gateway`: the researchers' gateway under load. 20 users, each with 10 concurrent Arrow
//! Flight SQL clients, send 2,000 queries in all (a grouped COUNT over ~90,000 encounters) to the real
//! Flight SQL listener on loopback (two-factor sessions, Cedar, the DP engine, the ledger, the audit
//! log), and the same clients send the same query to plain DataFusion behind a minimal Flight SQL server
//! over the same (decrypted) files: the protocol and privacy overhead. It prints throughput and p50/p99
//! latency of both, and checks that no budget was overspent and that every query has exactly one audit
//! record. Budgets are set so that each user's last few queries are refused: the refusals are part of the
//! load and must be recorded too.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use catalog::CatalogStore as _;
use enclave::baseline::{BENCH_PROVIDER, BENCH_SCOPE, Baseline};
use enclave::ingest::{IngestOptions, ingest};
use enclave::{DataDir, Error, Result};
use futures::{Stream, TryStreamExt};
use notebooks_gateway::auth::{Accounts, Role};
use notebooks_gateway::service::{Gateway, Limits, Peer, Protocol};
use prost::Message as _;
use tonic::{Request, Response, Status};

const USERS: usize = 20;
const CLIENTS_PER_USER: usize = 10;
const QUERIES: usize = 2_000;
/// Queries of the one-client run.
const SOLO_QUERIES: usize = 200;
const DATASET: &str = "gw";
/// The DP query (its tables named by the dataset's schema) and the plain one.
const DP_SQL: &str = "SELECT department, COUNT(*) AS n FROM gw.encounters GROUP BY department";
const PLAIN_SQL: &str = "SELECT department, COUNT(*) AS n FROM encounters GROUP BY department";
/// The engine's default ε per query; each user's budget leaves their last few queries refused.
const EPSILON: f64 = 0.1;
const ANSWERED_PER_USER: usize = 95;

/// Plain DataFusion behind Flight SQL: runs the statement at `GetFlightInfo`, hands its batches out once
/// at `DoGet` (the shape of arrow-flight's example server, with no sign-in and no privacy).
struct Plain {
    ctx: datafusion::prelude::SessionContext,
    waiting: Mutex<HashMap<u64, Vec<RecordBatch>>>,
    next: AtomicU64,
}

type DoGetStream =
    Pin<Box<dyn Stream<Item = std::result::Result<arrow_flight::FlightData, Status>> + Send>>;

#[tonic::async_trait]
impl FlightSqlService for Plain {
    type FlightService = Plain;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let failed = |e: datafusion::error::DataFusionError| Status::internal(e.to_string());
        let frame = self.ctx.sql(&query.query).await.map_err(failed)?;
        let schema = frame.schema().as_arrow().clone();
        let batches = frame.collect().await.map_err(failed)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, batches);
        let ticket = TicketStatementQuery {
            statement_handle: id.to_be_bytes().to_vec().into(),
        };
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(
                FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
            )
            .with_descriptor(request.into_inner());
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let id = <[u8; 8]>::try_from(ticket.statement_handle.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| Status::invalid_argument("ticket"))?;
        let batches = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| Status::not_found("ticket"))?;
        let stream: DoGetStream = Box::pin(
            FlightDataEncoderBuilder::new()
                .build(futures::stream::iter(batches.into_iter().map(Ok)))
                .map_err(|e| Status::internal(e.to_string())),
        );
        Ok(Response::new(stream))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Latencies (seconds, sorted) and wall time of one run.
struct Run {
    latencies: Vec<f64>,
    wall: f64,
    failures: usize,
}

impl Run {
    fn quantile(&self, q: f64) -> f64 {
        let n = self.latencies.len();
        if n == 0 {
            return f64::NAN;
        }
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        self.latencies[i]
    }

    fn print(&self, name: &str) {
        out!(
            "{name:<34} {:>10.0} {:>10.2} {:>10.2} {:>9}",
            self.latencies.len() as f64 / self.wall,
            1000.0 * self.quantile(0.5),
            1000.0 * self.quantile(0.99),
            self.failures
        );
    }
}

/// Sends `queries` queries from `tokens.len() × per_user` concurrent clients, each with its own
/// connection; a refused query counts as a failure (its latency is kept: it is an answer too).
async fn load(
    addr: std::net::SocketAddr,
    tokens: &[Option<String>],
    per_user: usize,
    queries: usize,
    sql: &str,
) -> Result<Run> {
    let clients = tokens.len() * per_user;
    let per_client = queries / clients;
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..clients {
        let token = tokens[c / per_user].clone();
        let sql = sql.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(addr, token).await?;
            let mut out = Vec::new();
            let mut failures = 0;
            for _ in 0..per_client {
                let t0 = Instant::now();
                if ask(&mut client, &sql).await.is_err() {
                    failures += 1;
                }
                out.push(t0.elapsed().as_secs_f64());
            }
            Ok::<_, Error>((out, failures))
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t
            .await
            .map_err(|e| Error::Internal(format!("client task: {e}")))??;
        latencies.extend(l);
        failures += f;
    }
    let wall = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok(Run {
        latencies,
        wall,
        failures,
    })
}

/// `enclave bench gateway`.
pub fn gateway_bench(work_dir: Option<PathBuf>) -> Result<()> {
    let work = work_dir.unwrap_or_else(|| std::env::temp_dir().join("enclave-bench-gateway"));
    let export = work.join("export");
    if !export.join("patients.csv").exists() {
        out!("generating 20,000 patients with ~100,000 encounters …");
        crate::bench::accuracy_export(&export)?;
    }
    let dir = fresh_data_dir(&work, "gateway")?;
    out!("ingesting …");
    let report = ingest(
        &dir,
        &dir.keystore()?,
        &dir.catalog()?,
        &IngestOptions {
            consent_scope: BENCH_SCOPE.into(),
            ..IngestOptions::new(BENCH_PROVIDER, DATASET, &export, "hipaa-safe-harbor")
        },
    )?;
    let encounters: u64 = dir
        .catalog()?
        .version(DATASET, None)?
        .version
        .tables
        .iter()
        .filter(|t| t.name == "encounters")
        .map(|t| t.rows)
        .sum();
    out!("{}", report.summary());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("runtime".into(), e))?;
    let gw_error = |e: notebooks_gateway::service::GatewayError| Error::Internal(e.to_string());
    let auth_error = |e: notebooks_gateway::auth::AuthError| Error::Internal(e.to_string());

    // Users, their grants, and a session each (token and the current TOTP code).
    let accounts = Accounts::open(&dir, Duration::from_secs(3600)).map_err(auth_error)?;
    let limits = Limits {
        per_user: CLIENTS_PER_USER,
        total: USERS * CLIENTS_PER_USER,
        ..Limits::default()
    };
    let gateway =
        Arc::new(Gateway::open(&dir, limits, Duration::from_secs(3600)).map_err(gw_error)?);
    let ledger = dir.ledger(&dir.keystore()?)?;
    let peer = Peer {
        protocol: Protocol::Flight,
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let mut sessions = Vec::new();
    let granted = EPSILON * ANSWERED_PER_USER as f64 + EPSILON / 2.0;
    for u in 0..USERS {
        let name = format!("bench-user-{u:02}");
        let added = accounts
            .add("bench", &name, Role::Researcher)
            .map_err(auth_error)?;
        ledger.set_budget("bench", &name, DATASET, granted, 1e-6, None)?;
        let session = sign_in(&gateway, &name, &added, &peer)?;
        sessions.push((name, Some(session)));
    }
    let solo_session = {
        let name = "bench-solo";
        let added = accounts
            .add("bench", name, Role::Researcher)
            .map_err(auth_error)?;
        ledger.set_budget("bench", name, DATASET, 1e6, 1e-6, None)?;
        Some(sign_in(&gateway, name, &added, &peer)?)
    };
    let before = ledger.tail(1)?.first().map_or(0, |r| r.seq);

    let (enclave_solo, plain_solo, enclave_run, plain_run) = rt.block_on(async {
        // The enclave's Flight SQL listener.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Io("bind".into(), e))?;
        let enclave_addr = listener
            .local_addr()
            .map_err(|e| Error::Io("addr".into(), e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let g = Arc::clone(&gateway);
        let served = tokio::spawn(async move {
            let _ = notebooks_gateway::flight::serve(listener, g, None, async {
                let _ = stopped.await;
            })
            .await;
        });
        // Plain DataFusion over the same files.
        let plain = Plain {
            ctx: Baseline::open(&dir, DATASET).await?.context().clone(),
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Io("bind".into(), e))?;
        let plain_addr = listener
            .local_addr()
            .map_err(|e| Error::Io("addr".into(), e))?;
        let (plain_stop, plain_stopped) = tokio::sync::oneshot::channel::<()>();
        let plain_served = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(FlightServiceServer::new(plain))
                .serve_with_incoming_shutdown(
                    // No Nagle delay, as on the enclave's own listener.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = plain_stopped.await;
                    },
                )
                .await;
        });

        // Warm both (the engine's first query of a version builds its contribution index): one query
        // each, outside the figures (the enclave's is in the audit count below).
        let warm = ask(
            &mut connect(enclave_addr, sessions[0].1.clone()).await?,
            DP_SQL,
        )
        .await;
        let plain_warm = ask(&mut connect(plain_addr, None).await?, PLAIN_SQL).await;
        if let Err(e) = warm.and(plain_warm) {
            return Err(Error::Internal(format!("the warm-up query failed: {e}")));
        }

        // One client alone: the latency of a query when nothing else runs.
        let solo = [solo_session.clone()];
        let enclave_solo = load(enclave_addr, &solo, 1, SOLO_QUERIES, DP_SQL).await?;
        let plain_solo = load(plain_addr, &[None], 1, SOLO_QUERIES, PLAIN_SQL).await?;
        // The load.
        let tokens: Vec<Option<String>> = sessions.iter().map(|(_, s)| s.clone()).collect();
        let enclave_run = load(enclave_addr, &tokens, CLIENTS_PER_USER, QUERIES, DP_SQL).await?;
        let plain_run = load(
            plain_addr,
            &vec![None; USERS],
            CLIENTS_PER_USER,
            QUERIES,
            PLAIN_SQL,
        )
        .await?;
        let _ = stop.send(());
        let _ = plain_stop.send(());
        let _ = served.await;
        let _ = plain_served.await;
        Ok::<_, Error>((enclave_solo, plain_solo, enclave_run, plain_run))
    })?;

    let header = || {
        out!(
            "{:<34} {:>10} {:>10} {:>10} {:>9}",
            "server",
            "queries/s",
            "p50 ms",
            "p99 ms",
            "refused"
        )
    };
    out!(
        "\none Flight SQL client alone, {SOLO_QUERIES} queries: grouped COUNT over {encounters} encounters\n"
    );
    header();
    enclave_solo.print("enclave (2FA session, Cedar, DP)");
    plain_solo.print("plain DataFusion Flight SQL");
    out!(
        "\n{USERS} users × {CLIENTS_PER_USER} concurrent Flight SQL clients, {QUERIES} queries on loopback \
         (latency includes waiting behind the other {} clients; the enclave runs each query in one \
         partition, the plain server with DataFusion's defaults)\n",
        USERS * CLIENTS_PER_USER - 1
    );
    header();
    enclave_run.print("enclave (2FA session, Cedar, DP)");
    plain_run.print("plain DataFusion Flight SQL");
    let ratio = (enclave_run.latencies.len() as f64 / enclave_run.wall)
        / (plain_run.latencies.len() as f64 / plain_run.wall);
    out!(
        "\nthroughput under load: {:.0} % of the plain server's (target ≥ 50 %); p50 of a query alone: {:.2} ms (target < 20 ms)",
        100.0 * ratio,
        1000.0 * enclave_solo.quantile(0.5)
    );

    // No budget overspent, and exactly one audit record per query (the warm-up query's excluded).
    let mut overspent = 0;
    let mut answered = 0usize;
    for (name, _) in &sessions {
        let b = ledger
            .budget(name, DATASET)?
            .ok_or_else(|| Error::Internal(format!("{name} has no budget")))?;
        if b.spent_epsilon > b.epsilon + 1e-9 {
            overspent += 1;
        }
        answered += (b.spent_epsilon / EPSILON).round() as usize;
    }
    let records: Vec<_> = ledger
        .tail(4 * QUERIES)?
        .into_iter()
        .filter(|r| {
            r.seq > before
                && r.draft.dataset == DATASET
                && r.draft.via.origin == "flight"
                && r.draft.principal.starts_with("bench-user-")
        })
        .collect();
    let released = records.iter().filter(|r| r.outcome == "released").count();
    let refused = records.iter().filter(|r| r.outcome != "released").count();
    out!(
        "budgets overspent: {overspent} of {USERS}; audit records for the {} queries: {} ({released} released, {refused} refused); \
         answers charged: {answered} (the warm-up's included)",
        QUERIES,
        records.len().saturating_sub(1)
    );
    ledger.verify(&ledger.public_key_hex())?;
    if overspent > 0 || records.len() != QUERIES + 1 || answered != released {
        return Err(Error::Internal(
            "the gateway overspent a budget or a query's audit record is missing or doubled".into(),
        ));
    }
    out!("no budget overspent; one audit record per query; the audit log verifies");
    Ok(())
}

/// A fresh, initialised data directory `<work>/data` with the default policies, so the budgets and the
/// audit log are this run's alone: one that `enclave bench <bench>` made (marked so) is removed; anything
/// else there is refused.
pub(crate) fn fresh_data_dir(work: &std::path::Path, bench: &str) -> Result<DataDir> {
    let dir = DataDir::new(work.join("data"));
    let mark = work.join(format!("data.bench-{bench}"));
    if dir.root().exists() {
        if !mark.exists() {
            return Err(Error::Config(format!(
                "{} exists and was not made by this benchmark: choose another --work-dir",
                dir.root().display()
            )));
        }
        std::fs::remove_dir_all(dir.root()).map_err(|e| Error::io(dir.root(), e))?;
    }
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    std::fs::write(&mark, format!("made by enclave bench {bench}\n"))
        .map_err(|e| Error::io(&mark, e))?;
    dir.init()?;
    notebooks_gateway::authz::write_defaults(&dir.root().join("policies"))
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(dir)
}

/// Opens a session for a new user with their token and current TOTP code.
pub(crate) fn sign_in(
    gateway: &Gateway,
    name: &str,
    added: &notebooks_gateway::auth::NewUser,
    peer: &Peer,
) -> Result<String> {
    let secret = data_encoding::BASE32_NOPAD
        .decode(added.totp_secret.as_bytes())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let step = notebooks_gateway::auth::totp_step(SystemTime::now());
    let code = format!("{:06}", notebooks_gateway::auth::totp_code(&secret, step));
    let session = gateway
        .sign_in(name, &added.token, &code, peer)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(session.session)
}

/// A Flight SQL client on its own connection, with `token` as its Bearer session.
async fn connect(
    addr: std::net::SocketAddr,
    token: Option<String>,
) -> Result<FlightSqlServiceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Error::Internal(format!("connect: {e}")))?;
    let mut client = FlightSqlServiceClient::new(channel);
    if let Some(t) = token {
        client.set_token(t);
    }
    Ok(client)
}

/// One query: `GetFlightInfo`, then its ticket's `DoGet`.
async fn ask(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> std::result::Result<(), arrow_flight::error::FlightError> {
    let info = client.execute(sql.to_owned(), None).await?;
    let ticket = info
        .endpoint
        .first()
        .and_then(|e| e.ticket.clone())
        .unwrap_or_default();
    let _: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
    Ok(())
}
