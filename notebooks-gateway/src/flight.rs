//! The Arrow Flight SQL listener (arrow-flight's `FlightSqlService` on tonic).
//!
//! - **Sign-in**: a Basic handshake with the user's name and, as password, `<token>:<totp>` (opens a
//!   session) or a session secret; the handshake answers `authorization: Bearer <session>`, which every
//!   later call carries (ADBC does this by itself).
//! - **Queries** run when their `FlightInfo` is asked for (`CommandStatementQuery`, or a prepared
//!   statement): charged once, recorded, and the answer kept under a ticket. The ticket is an opaque
//!   random handle bound to the session that asked, good once and for [`TICKET_LIFETIME`]: never the SQL.
//!   A ticket that is unknown, used, expired or presented by another session gets `PERMISSION_DENIED`
//!   and an audit record.
//! - **Answers** are the DP columns plus, for each noisy column `c`, `c_ci_low` and `c_ci_high` (95 %);
//!   the schema's metadata has `enclave.noise` (scales and methods), `enclave.cost`, `enclave.budget`,
//!   `enclave.truncation`, `enclave.audit_seq` and `enclave.receipt` (JSON), and each noisy field
//!   `enclave.noise_scale`.
//! - **Catalog**: one catalog, `enclave`; its schemas are the datasets the caller may query now (Cedar),
//!   their tables with column types; never row counts.
//! - **Datasets**: a query names its dataset as its tables' schema (`FROM "demo-cohort".encounters`), or
//!   the call header `x-enclave-dataset` gives a default.
//! - Parameters of prepared statements, updates, ingest, transactions and Substrait are refused.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery, ProstMessageExt,
    SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use base64::Engine as _;
use futures::{Stream, TryStreamExt};
use prost::Message as _;
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, Caller};
use crate::service::{ErrorKind, Gateway, GatewayError, Peer, Protocol, QueryRequest};

/// How long an answer waits for its `DoGet`.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(600);

/// Answers waiting for their `DoGet`, all sessions together; more are refused (before they run) until
/// some are fetched.
pub const MAX_WAITING: usize = 10_000;

/// Answers waiting for their `DoGet` per session, and open prepared statements per session.
pub const MAX_WAITING_PER_SESSION: usize = 32;

/// How long a prepared statement stays open without being closed.
pub const STATEMENT_LIFETIME: Duration = Duration::from_secs(3600);

/// The one catalog name the datasets are listed under.
pub const CATALOG: &str = "enclave";

/// The call header that names a default dataset.
pub const DATASET_HEADER: &str = "x-enclave-dataset";

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// An answer waiting for its `DoGet`.
struct Waiting {
    session_id: String,
    at: Instant,
    batch: RecordBatch,
}

/// A prepared statement.
struct Statement {
    session_id: String,
    at: Instant,
    request: QueryRequest,
}

/// The Flight SQL service over a gateway.
pub struct FlightSql {
    gateway: Arc<Gateway>,
    waiting: Mutex<HashMap<String, Waiting>>,
    statements: Mutex<HashMap<String, Statement>>,
}

fn status(e: GatewayError) -> Status {
    let message = e.to_string();
    let mut status = match e.kind() {
        ErrorKind::Unauthenticated => Status::unauthenticated(message),
        ErrorKind::Forbidden => Status::permission_denied(message),
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::Conflict => Status::failed_precondition(message),
        ErrorKind::Invalid => Status::invalid_argument(message),
        ErrorKind::Busy => Status::resource_exhausted(message),
        ErrorKind::Internal => Status::internal(message),
    };
    // A recorded refusal's receipt travels in the status's metadata (JSON: hex and digits only).
    if let Some(value) = e
        .receipt()
        .and_then(|r| serde_json::to_string(r).ok())
        .and_then(|json| json.parse::<tonic::metadata::MetadataValue<_>>().ok())
    {
        status.metadata_mut().insert("enclave-receipt", value);
    }
    status
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "flight request failed inside the enclave");
    status(GatewayError::Internal)
}

fn handle() -> Result<String, Status> {
    let mut b = [0u8; 32];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| internal("no randomness"))?;
    Ok(hex::encode(b))
}

fn batch_stream(schema: SchemaRef, batches: Vec<RecordBatch>) -> Stream_<arrow_flight::FlightData> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(internal);
    Box::pin(stream)
}

/// A catalog listing's one batch as a `DoGet` stream.
fn listing<E: std::fmt::Display>(
    schema: SchemaRef,
    batch: Result<RecordBatch, E>,
) -> Result<Response<Stream_<arrow_flight::FlightData>>, Status> {
    Ok(Response::new(batch_stream(
        schema,
        vec![batch.map_err(internal)?],
    )))
}

/// The answer as Flight sends it: the DP columns, each noisy column's 95 % interval as two more, and the
/// answer's metadata on the schema.
pub fn answer_batch(answer: &enclave::dp::DpAnswer) -> Result<RecordBatch, GatewayError> {
    let schema = answer.batch.schema();
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut f = f.as_ref().clone();
            if let Some(n) = answer.noise.iter().find(|n| &n.column == f.name()) {
                let mut m = f.metadata().clone();
                m.insert("enclave.noise_scale".into(), n.scale.to_string());
                f = f.with_metadata(m);
            }
            f
        })
        .collect();
    let mut columns: Vec<ArrayRef> = answer.batch.columns().to_vec();
    for n in &answer.noise {
        for (suffix, pick) in [("ci_low", 0usize), ("ci_high", 1)] {
            fields.push(Field::new(
                format!("{}_{suffix}", n.column),
                DataType::Float64,
                true,
            ));
            let values: Float64Array = n
                .intervals
                .iter()
                .map(|&(lo, hi)| {
                    let v = if pick == 0 { lo } else { hi };
                    (!v.is_nan()).then_some(v)
                })
                .collect();
            columns.push(Arc::new(values));
        }
    }
    let json = |v: &serde_json::Value| v.to_string();
    let full = answer.to_json();
    let noise: Vec<serde_json::Value> = answer
        .noise
        .iter()
        .map(|n| serde_json::json!({"column": n.column, "scale": n.scale, "method": n.method}))
        .collect();
    let metadata: HashMap<String, String> = [
        ("enclave.noise", json(&serde_json::Value::from(noise))),
        ("enclave.cost", json(&full["cost"])),
        ("enclave.budget", json(&full["budget"])),
        ("enclave.truncation", json(&full["truncation"])),
        ("enclave.audit_seq", answer.audit_seq.to_string()),
        ("enclave.receipt", json(&full["receipt"])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    RecordBatch::try_new(schema, columns).map_err(|e| {
        tracing::error!(error = %e, "answer batch");
        GatewayError::Internal
    })
}

/// The schema of a prepared statement's answer (as [`answer_batch`] will build it, without metadata).
pub(crate) fn prepared_schema(p: &enclave::dp::Prepared) -> Schema {
    let mut fields: Vec<Field> = p
        .schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for c in &p.noisy_columns {
        for suffix in ["ci_low", "ci_high"] {
            fields.push(Field::new(format!("{c}_{suffix}"), DataType::Float64, true));
        }
    }
    Schema::new(fields)
}

impl FlightSql {
    /// The service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> FlightSql {
        FlightSql {
            gateway,
            waiting: Mutex::new(HashMap::new()),
            statements: Mutex::new(HashMap::new()),
        }
    }

    /// The caller of a call: its Bearer session, and where it came from.
    fn caller<T>(&self, request: &Request<T>) -> Result<(Caller, Peer), Status> {
        let peer = peer_of(request)?;
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(session) = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
        {
            let caller = self.gateway.caller(session.trim()).map_err(status)?;
            return Ok((caller, peer));
        }
        // Basic credentials open a session only through the handshake (off the async workers).
        Err(status(GatewayError::Auth(AuthError::Session)))
    }

    /// Runs a query for its `FlightInfo`: charged now, its answer kept under a fresh ticket.
    async fn run(
        &self,
        caller: &Caller,
        peer: &Peer,
        request: &QueryRequest,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        // Room for the answer is checked before the query runs (and is charged): a full store refuses
        // for free, rather than losing a charged answer.
        let room = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.retain(|_, w| w.at.elapsed() < TICKET_LIFETIME);
            let mine = waiting
                .values()
                .filter(|w| w.session_id == caller.session_id)
                .count();
            mine < MAX_WAITING_PER_SESSION && waiting.len() < MAX_WAITING
        };
        if !room {
            let message = "too many answers are waiting to be fetched; fetch them (DoGet) first";
            return Err(status(
                self.gateway
                    .refuse_off_thread(caller, peer, &request.sql, "concurrency", message)
                    .await,
            ));
        }
        let answer = self
            .gateway
            .query(caller, peer, request)
            .await
            .map_err(status)?;
        let batch = answer_batch(&answer).map_err(status)?;
        let handle = handle()?;
        {
            // Checked above; racing queries of one session may pass the check together and go a few
            // over, never unboundedly (each also holds a concurrency slot while it runs).
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.insert(
                handle.clone(),
                Waiting {
                    session_id: caller.session_id.clone(),
                    at: Instant::now(),
                    batch: batch.clone(),
                },
            );
        }
        let ticket = TicketStatementQuery {
            statement_handle: handle.into_bytes().into(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(batch.schema().as_ref())
            .map_err(internal)?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor)
            .with_total_records(i64::try_from(batch.num_rows()).unwrap_or(-1))
            .with_ordered(true);
        Ok(Response::new(info))
    }

    /// The default dataset of a call (its `x-enclave-dataset` header).
    fn default_dataset<T>(request: &Request<T>) -> String {
        request
            .metadata()
            .get(DATASET_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim()
            .to_owned()
    }

    /// A `FlightInfo` whose ticket is the command itself (catalog listings: no query, nothing charged;
    /// the listing is decided again, for the caller, at `DoGet`).
    fn listing_info(
        command: &impl ProstMessageExt,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(command.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(internal)?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    fn datasets(&self, caller: &Caller) -> Result<Vec<crate::service::DatasetInfo>, Status> {
        self.gateway.datasets(caller).map_err(status)
    }
}

/// The peer of a call.
fn peer_of<T>(request: &Request<T>) -> Result<Peer, Status> {
    let addr = request
        .remote_addr()
        .ok_or_else(|| internal("a Flight call without a peer address"))?;
    Ok(Peer {
        protocol: Protocol::Flight,
        addr,
    })
}

/// `Basic base64(user:password)` → (user, password).
fn basic(header: &str) -> Option<(String, String)> {
    let encoded = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    // Go's Flight client (under ADBC) sends it unpadded (RawStdEncoding); others padded.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Parses an Arrow type from the catalog's text (`Utf8`, `Int64`, `Date32`, `Float64`, …); other types
/// are shown as text.
fn data_type(name: &str) -> DataType {
    match name {
        "Boolean" => DataType::Boolean,
        "Int8" => DataType::Int8,
        "Int16" => DataType::Int16,
        "Int32" => DataType::Int32,
        "Int64" => DataType::Int64,
        "UInt32" => DataType::UInt32,
        "UInt64" => DataType::UInt64,
        "Float32" => DataType::Float32,
        "Float64" => DataType::Float64,
        "Date32" => DataType::Date32,
        "Date64" => DataType::Date64,
        "LargeUtf8" => DataType::LargeUtf8,
        "Utf8View" => DataType::Utf8View,
        _ => DataType::Utf8,
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Stream_<HandshakeResponse>>, Status> {
        let peer = peer_of(&request)?;
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (user, password) = basic(header).ok_or_else(|| {
            Status::unauthenticated(
                "sign-in refused (rule 'credentials'): send Basic credentials: your user name, and as password <token>:<totp> or a session",
            )
        })?;
        let gateway = self.gateway.clone();
        let (caller, new) = tokio::task::spawn_blocking(move || {
            gateway.caller_from_password(&user, &password, &peer)
        })
        .await
        .map_err(internal)?
        .map_err(status)?;
        let session = match new {
            Some(n) => n.session,
            // The password was a session: it stays the bearer.
            None => basic(header).map(|(_, p)| p).unwrap_or_default(),
        };
        tracing::debug!(user = %caller.user, session = %caller.session_id, "flight handshake");
        let out = HandshakeResponse {
            protocol_version: 0,
            payload: session.clone().into_bytes().into(),
        };
        let mut response: Response<Stream_<HandshakeResponse>> =
            Response::new(Box::pin(futures::stream::iter([Ok(out)])));
        let value = format!("Bearer {session}")
            .parse()
            .map_err(|_| internal("session header"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (caller, peer) = self.caller(&request)?;
        let q = QueryRequest {
            dataset: Self::default_dataset(&request),
            sql: query.query,
            epsilon: None,
            delta: None,
        };
        let descriptor = request.into_inner();
        self.run(&caller, &peer, &q, descriptor).await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (caller, peer) = self.caller(&request)?;
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).into_owned();
        let q = {
            let statements = self.statements.lock().unwrap_or_else(|p| p.into_inner());
            match statements.get(&handle) {
                Some(s)
                    if s.session_id == caller.session_id && s.at.elapsed() < STATEMENT_LIFETIME =>
                {
                    Some(s.request.clone())
                }
                _ => None,
            }
        };
        let Some(q) = q else {
            let message = "this prepared statement is unknown, closed, or another session's";
            return Err(status(
                self.gateway
                    .refuse_off_thread(
                        &caller,
                        &peer,
                        "flight prepared statement",
                        "statement",
                        message,
                    )
                    .await,
            ));
        };
        self.run(&caller, &peer, &q, request.into_inner()).await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (caller, peer) = self.caller(&request)?;
        let handle = String::from_utf8_lossy(&ticket.statement_handle).into_owned();
        // Taken out whoever presents it: a ticket is good once, and one shown by another session is
        // spent.
        let taken = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle);
        match taken {
            Some(w) if w.session_id == caller.session_id && w.at.elapsed() < TICKET_LIFETIME => {
                Ok(Response::new(batch_stream(w.batch.schema(), vec![w.batch])))
            }
            _ => {
                let message = "this ticket is unknown, already used, expired, or another session's";
                Err(status(
                    self.gateway
                        .refuse_off_thread(&caller, &peer, "flight ticket", "ticket", message)
                        .await,
                ))
            }
        }
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        _message: Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (caller, peer) = self.caller(&request)?;
        let message = "this ticket is not one the enclave issued";
        Err(status(
            self.gateway
                .refuse_off_thread(&caller, &peer, "flight ticket", "ticket", message)
                .await,
        ))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.into_builder().schema();
        Self::listing_info(&query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        listing(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder().schema();
        Self::listing_info(&query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (caller, _) = self.caller(&request)?;
        let mut builder = query.into_builder();
        for d in self.datasets(&caller)? {
            builder.append(CATALOG, d.name);
        }
        listing(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder().schema();
        Self::listing_info(&query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (caller, _) = self.caller(&request)?;
        let mut builder = query.into_builder();
        for d in self.datasets(&caller)? {
            for t in &d.tables {
                let schema = Schema::new(
                    t.columns
                        .iter()
                        .map(|c| Field::new(&c.name, data_type(&c.data_type), true))
                        .collect::<Vec<_>>(),
                );
                builder
                    .append(CATALOG, &d.name, &t.name, "TABLE", &schema)
                    .map_err(internal)?;
            }
        }
        listing(builder.schema(), builder.build())
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (caller, peer) = self.caller(&request)?;
        let q = QueryRequest {
            dataset: Self::default_dataset(&request),
            sql: query.query,
            epsilon: None,
            delta: None,
        };
        let (resolved, prepared) = self
            .gateway
            .prepare(&caller, &peer, &q)
            .await
            .map_err(status)?;
        let schema = prepared_schema(&prepared);
        let IpcMessage(dataset_schema) =
            SchemaAsIpc::new(&schema, &arrow_ipc::writer::IpcWriteOptions::default())
                .try_into()
                .map_err(internal)?;
        let handle = handle()?;
        let mut statements = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        statements.retain(|_, st| st.at.elapsed() < STATEMENT_LIFETIME);
        let mine = statements
            .values()
            .filter(|st| st.session_id == caller.session_id)
            .count();
        if mine >= MAX_WAITING_PER_SESSION || statements.len() >= MAX_WAITING {
            return Err(Status::resource_exhausted(
                "refused (rule 'concurrency'): too many open prepared statements; close some",
            ));
        }
        statements.insert(
            handle.clone(),
            Statement {
                session_id: caller.session_id,
                at: Instant::now(),
                request: resolved,
            },
        );
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let (caller, _) = self.caller(&request)?;
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).into_owned();
        let mut statements = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        if statements
            .get(&handle)
            .is_some_and(|s| s.session_id == caller.session_id)
        {
            statements.remove(&handle);
        }
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<arrow_flight::sql::server::PeekableFlightDataStream>,
    ) -> Result<arrow_flight::sql::DoPutPreparedStatementResult, Status> {
        self.caller(&request)?;
        Err(Status::invalid_argument(
            "refused (rule 'parameters'): query parameters are not supported; write the values into the query",
        ))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Serves Flight SQL on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let limits = gateway.limits();
    let service = FlightServiceServer::new(FlightSql::new(gateway))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(64 * 1024 * 1024);
    tonic::transport::Server::builder()
        .timeout(limits.query_timeout + limits.read_timeout)
        .max_concurrent_streams(64)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(limits.read_timeout))
        .max_frame_size(None)
        .add_service(service)
        .serve_with_incoming_shutdown(
            crate::conn::incoming(listener, limits.read_timeout, tls),
            shutdown,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:tok:123456")
        );
        assert_eq!(
            basic(&header),
            Some(("alice".to_owned(), "tok:123456".to_owned()))
        );
        let unpadded = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode("bob:s")
        );
        assert_eq!(basic(&unpadded), Some(("bob".to_owned(), "s".to_owned())));
        assert_eq!(basic("Basic !!!"), None);
        assert_eq!(basic("Bearer x"), None);
    }
}
