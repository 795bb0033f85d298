//! The Postgres wire listener (pgwire): psql, psycopg, DBeaver and any libpq or JDBC client reach the DP
//! engine through it, over the simple and the extended query protocols.
//!
//! - **Sign-in**: the password is a session (`enclave login`) or `<token>:<totp>` (which opens one); it
//!   is asked for in clear text, so off loopback the listener needs TLS. The session is checked again at
//!   every statement (an expired session or a disabled user ends the connection).
//! - **Datasets are schemas**: `FROM demo.encounters`; an unqualified query runs on the connection's
//!   database (`psql -d demo`) or on the dataset named by `SET search_path TO demo`.
//! - **What a statement becomes**: a query on tables goes to the DP engine (one per message; its rows are
//!   the DP answer with each noisy column's 95 % interval as two more columns, and cost, budget, noise and
//!   the audit record come as a NOTICE first); a query on `pg_catalog` / `information_schema`, or on no
//!   table, is answered by [`catalog`] from metadata of the datasets the caller may query (never a row
//!   count or a value); `SET`, `SHOW`, `BEGIN`/`COMMIT`/`ROLLBACK`, `DISCARD`, `DEALLOCATE` are answered
//!   harmlessly; anything else goes to the engine, which refuses and records it. `SET enclave.epsilon`
//!   and `SET enclave.delta` choose what the next queries spend.
//! - **Guarded connections**: [`frames`] cuts oversized and stalled messages below the protocol library;
//!   sign-in must finish within the read timeout; the listener holds at most a fixed number of
//!   connections.

pub mod catalog;
pub mod frames;

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Schema};
use async_trait::async_trait;
use datafusion::sql::sqlparser::ast::{Expr, Set, Statement, Value};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use futures::sink::{Sink, SinkExt};
use futures::stream::StreamExt;
use pgwire::api::auth::{
    AuthDriver, ServerParameterProvider, StartupHandler, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, DEFAULT_NAME, METADATA_APPLICATION_NAME, METADATA_DATABASE,
    METADATA_USER, NoopHandler, PgWireConnectionState, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::extendedquery::{
    Close, CloseComplete, Parse, ParseComplete, TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT,
};
use pgwire::messages::response::NoticeResponse;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::server::{PgWireMessageServerCodec, process_error, process_message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::auth::{AuthError, Caller};
use crate::service::{ErrorKind, Gateway, GatewayError, Peer, Protocol, QueryRequest};

/// Connections held at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// Connections one client address may hold at once (more are closed at once).
pub const MAX_PER_ADDRESS: usize = 128;

/// Prepared statements one connection may hold.
pub const MAX_STATEMENTS: usize = 256;

/// Catalog queries answered at once, over all connections.
const CATALOG_AT_ONCE: usize = 8;

/// The version this listener reports (psql and drivers pick their catalog queries by it).
const SERVER_VERSION: &str = "16.6";

/// A signed-in connection's state, kept in its extensions.
struct Login {
    user: String,
    /// The session secret: resolved again at every statement.
    session: String,
    peer: Peer,
    /// The dataset unqualified queries run on.
    dataset: Mutex<String>,
    /// ε and δ the next queries spend (`SET enclave.epsilon`), the engine's default when none.
    epsilon: Mutex<Option<f64>>,
    delta: Mutex<Option<f64>>,
}

/// How many named statements a connection holds (in its extensions).
#[derive(Default)]
struct Statements(std::sync::atomic::AtomicUsize);

/// The handlers of one listener.
pub struct PgHandler {
    gateway: Arc<Gateway>,
    driver: AuthDriver<Parameters>,
    parser: Arc<StatementText>,
    catalog_slots: tokio::sync::Semaphore,
}

/// The parameters every connection is told at sign-in (and `SHOW` answers).
struct Parameters;

impl Parameters {
    fn fixed() -> Vec<(&'static str, &'static str)> {
        vec![
            ("server_version", SERVER_VERSION),
            ("server_version_num", "160006"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("is_superuser", "off"),
            ("default_transaction_read_only", "on"),
            ("transaction_read_only", "on"),
            ("in_hot_standby", "off"),
            ("transaction_isolation", "read committed"),
            ("default_transaction_isolation", "read committed"),
            ("max_identifier_length", "63"),
            ("lc_collate", "C"),
            ("lc_ctype", "C"),
        ]
    }
}

impl ServerParameterProvider for Parameters {
    fn server_parameters<C>(&self, client: &C) -> Option<HashMap<String, String>>
    where
        C: ClientInfo,
    {
        let mut p: HashMap<String, String> = Parameters::fixed()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("transaction_") && !k.starts_with("lc_"))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let meta = client.metadata();
        if let Some(user) = meta.get(METADATA_USER) {
            p.insert("session_authorization".into(), user.clone());
        }
        if let Some(app) = meta.get(METADATA_APPLICATION_NAME) {
            p.insert("application_name".into(), app.clone());
        }
        Some(p)
    }
}

/// The extended protocol's statement: its SQL text, kept as received.
#[derive(Debug, Default)]
pub struct StatementText;

#[async_trait]
impl QueryParser for StatementText {
    type Statement = String;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<String>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(Some(sql.to_owned()))
    }

    fn get_parameter_types(&self, _stmt: &String) -> PgWireResult<Vec<Type>> {
        Ok(Vec::new())
    }

    fn get_result_schema(
        &self,
        _stmt: &String,
        _format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(Vec::new())
    }
}

/// An error as the client sees it: the gateway's safe message, a SQLSTATE from its class.
fn pg_error(e: &GatewayError, fatal: bool) -> PgWireError {
    let code = match e {
        GatewayError::BadRequest(_) => "54000",
        _ => match e.kind() {
            ErrorKind::Unauthenticated => "28P01",
            ErrorKind::Forbidden => "42501",
            ErrorKind::NotFound => "42P01",
            ErrorKind::Conflict => "55000",
            ErrorKind::Invalid => "42000",
            ErrorKind::Busy => "53400",
            ErrorKind::Internal => "XX000",
        },
    };
    let severity = if fatal { "FATAL" } else { "ERROR" };
    let mut info = ErrorInfo::new(severity.to_owned(), code.to_owned(), e.to_string());
    // A recorded refusal's receipt travels in the error's DETAIL field.
    info.detail = e
        .receipt()
        .and_then(|r| serde_json::to_string(r).ok())
        .map(|json| format!("receipt: {json}"));
    PgWireError::UserError(Box::new(info))
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        code.to_owned(),
        message.into(),
    )))
}

/// What one statement is.
enum Kind {
    /// A query for the DP engine (and anything else the engine should refuse and record).
    Engine,
    /// A query on the catalog tables or on no table.
    Catalog(Box<Statement>),
    /// `SET name = value`.
    Set(String, Vec<Expr>),
    /// `SHOW name`.
    Show(String),
    /// BEGIN / COMMIT / ROLLBACK and the like: answered with a tag.
    Begin,
    End(&'static str),
    Tag(&'static str),
}

fn classify(statement: Statement) -> Kind {
    match statement {
        Statement::Query(ref q) if catalog::is_catalog_query(q) => {
            Kind::Catalog(Box::new(statement))
        }
        Statement::StartTransaction { .. } => Kind::Begin,
        Statement::Commit { .. } => Kind::End("COMMIT"),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => Kind::Tag("ROLLBACK"),
        Statement::Rollback { .. } => Kind::End("ROLLBACK"),
        Statement::Discard { .. } => Kind::Tag("DISCARD ALL"),
        Statement::Deallocate { .. } => Kind::Tag("DEALLOCATE"),
        Statement::Savepoint { .. } => Kind::Tag("SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => Kind::Tag("RELEASE"),
        Statement::Close { .. } => Kind::Tag("CLOSE CURSOR"),
        Statement::ShowVariable { variable } => Kind::Show(
            variable
                .iter()
                .map(|i| i.value.clone())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Statement::Set(Set::SingleAssignment {
            variable, values, ..
        }) => Kind::Set(
            variable
                .0
                .iter()
                .map(|p| {
                    p.as_ident()
                        .map_or_else(|| p.to_string(), |i| i.value.to_ascii_lowercase())
                })
                .collect::<Vec<_>>()
                .join("."),
            values,
        ),
        Statement::Set(Set::SetTimeZone { .. }) | Statement::Set(Set::SetNames { .. }) => {
            Kind::Tag("SET")
        }
        _ => Kind::Engine,
    }
}

/// The text of a `SET` value: a literal or a bare word.
fn set_value(values: &[Expr]) -> Option<String> {
    match values {
        [Expr::Value(v)] => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        [Expr::Identifier(i)] => Some(i.value.clone()),
        [Expr::UnaryOp { op, expr }] => {
            set_value(std::slice::from_ref(expr)).map(|v| format!("{op}{v}"))
        }
        _ => None,
    }
}

/// The pg type and the text or binary encoding of an Arrow column.
fn pg_type(t: &DataType) -> Type {
    match t {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 => Type::INT2,
        DataType::Int32 => Type::INT4,
        DataType::Int64 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        _ => Type::TEXT,
    }
}

/// The columns of `schema` as the client is told them, in the formats it asked for.
fn fields(schema: &Schema, formats: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format_of(formats, i),
            )
        })
        .collect()
}

/// The format asked for column `i` (a malformed list of formats falls back to text).
fn format_of(formats: &Format, i: usize) -> FieldFormat {
    match formats {
        Format::Individual(v) if i >= v.len() => FieldFormat::Text,
        f => f.format_for(i),
    }
}

/// Encodes `batches` as data rows under `fields`.
fn rows(
    fields: &Arc<Vec<FieldInfo>>,
    batches: &[RecordBatch],
) -> PgWireResult<Vec<PgWireResult<pgwire::messages::data::DataRow>>> {
    let mut out = Vec::new();
    for batch in batches {
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .zip(fields.iter())
            .map(|(c, f)| match pg_type(c.data_type()) == *f.datatype() {
                true => Ok(Arc::clone(c)),
                false => arrow::compute::cast(c, &DataType::Utf8),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| {
                tracing::error!(error = %e, "pg answer encoding");
                pg_error(&GatewayError::Internal, false)
            })?;
        for r in 0..batch.num_rows() {
            let mut encoder = DataRowEncoder::new(Arc::clone(fields));
            for c in &columns {
                encode(&mut encoder, c.as_ref(), r)?;
            }
            out.push(Ok(encoder.take_row()));
        }
    }
    Ok(out)
}

fn encode(encoder: &mut DataRowEncoder, c: &dyn Array, r: usize) -> PgWireResult<()> {
    use arrow::datatypes::*;
    let null = c.is_null(r);
    macro_rules! put {
        ($t:ty, $conv:expr) => {{
            let a = c.as_primitive::<$t>();
            let v = (!null).then(|| $conv(a.value(r)));
            encoder.encode_field(&v)
        }};
    }
    match c.data_type() {
        DataType::Boolean => {
            let v = (!null).then(|| c.as_boolean().value(r));
            encoder.encode_field(&v)
        }
        DataType::Int8 => put!(Int8Type, i16::from),
        DataType::Int16 => put!(Int16Type, |v: i16| v),
        DataType::Int32 => put!(Int32Type, |v: i32| v),
        DataType::Int64 => put!(Int64Type, |v: i64| v),
        DataType::UInt8 => put!(UInt8Type, i64::from),
        DataType::UInt16 => put!(UInt16Type, i64::from),
        DataType::UInt32 => put!(UInt32Type, i64::from),
        DataType::Float16 => put!(Float16Type, f32::from),
        DataType::Float32 => put!(Float32Type, |v: f32| v),
        DataType::Float64 => put!(Float64Type, |v: f64| v),
        DataType::Utf8 => {
            let v = (!null).then(|| c.as_string::<i32>().value(r));
            encoder.encode_field(&v)
        }
        _ => {
            let v = (!null)
                .then(|| arrow::util::display::array_value_to_string(c, r).unwrap_or_default());
            encoder.encode_field(&v)
        }
    }
}

fn query_response(
    schema: &Schema,
    batches: &[RecordBatch],
    formats: &Format,
    tag: &str,
) -> PgWireResult<Response> {
    let fields = Arc::new(fields(schema, formats));
    let rows = rows(&fields, batches)?;
    let mut response = QueryResponse::new(fields, futures::stream::iter(rows));
    response.set_command_tag(tag);
    Ok(Response::Query(response))
}

fn notice(message: String) -> PgWireBackendMessage {
    PgWireBackendMessage::NoticeResponse(NoticeResponse::from(ErrorInfo::new(
        "NOTICE".to_owned(),
        "00000".to_owned(),
        message,
    )))
}

fn login<C: ClientInfo>(client: &C) -> PgWireResult<Arc<Login>> {
    client
        .session_extensions()
        .get::<Login>()
        .ok_or_else(|| pg_error(&GatewayError::Auth(AuthError::Session), true))
}

/// A parameter's text (text format, or the binary integers and booleans drivers send).
fn parameter_text(
    portal: &Portal<String>,
    i: usize,
    value: &Option<bytes::Bytes>,
) -> PgWireResult<Option<String>> {
    let Some(b) = value else { return Ok(None) };
    if format_of(&portal.parameter_format, i) == FieldFormat::Text {
        return String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| user_error("22021", "a parameter is not UTF-8 (rule 'request')"));
    }
    let declared = portal.statement.parameter_types.get(i).cloned().flatten();
    let text = match (declared, b.len()) {
        (Some(t), 1) if t == Type::BOOL => (b[0] != 0).to_string(),
        (Some(t), 2) if t == Type::INT2 => i16::from_be_bytes([b[0], b[1]]).to_string(),
        (Some(t), 4) if t == Type::INT4 || t == Type::OID => {
            i32::from_be_bytes([b[0], b[1], b[2], b[3]]).to_string()
        }
        (Some(t), 8) if t == Type::INT8 => {
            i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).to_string()
        }
        _ => {
            return Err(user_error(
                "0A000",
                "send parameters in text format (rule 'request')",
            ));
        }
    };
    Ok(Some(text))
}

impl PgHandler {
    /// The handlers over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> PgHandler {
        PgHandler {
            gateway,
            driver: AuthDriver::new(Parameters),
            parser: Arc::new(StatementText),
            catalog_slots: tokio::sync::Semaphore::new(CATALOG_AT_ONCE),
        }
    }

    /// The caller behind a connection now (its session may have expired since sign-in).
    fn caller(&self, login: &Login) -> PgWireResult<Caller> {
        let caller = self
            .gateway
            .caller(&login.session)
            .map_err(|e| pg_error(&e, true))?;
        if caller.user != login.user {
            return Err(pg_error(&GatewayError::Auth(AuthError::Session), true));
        }
        Ok(caller)
    }

    /// Answers one statement. `text` is the statement's SQL as received (the engine parses it again);
    /// `parameters` are the extended protocol's, as text.
    async fn answer<C>(
        &self,
        client: &mut C,
        text: &str,
        kind: Kind,
        parameters: Vec<Option<String>>,
        formats: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let login = login(client)?;
        let caller = self.caller(&login)?;
        match kind {
            Kind::Begin => Ok(Response::TransactionStart(Tag::new("BEGIN"))),
            Kind::End(tag) => Ok(Response::TransactionEnd(Tag::new(tag))),
            Kind::Tag(tag) => Ok(Response::Execution(Tag::new(tag))),
            Kind::Set(name, values) => {
                self.set(&login, &name, &values)?;
                Ok(Response::Execution(Tag::new("SET")))
            }
            Kind::Show(name) => {
                let value = show(&login, &name)?;
                let schema = Schema::new(vec![arrow::datatypes::Field::new(
                    name,
                    DataType::Utf8,
                    true,
                )]);
                let batch = RecordBatch::try_new(
                    Arc::new(schema.clone()),
                    vec![Arc::new(arrow::array::StringArray::from(vec![value]))],
                )
                .map_err(|_| pg_error(&GatewayError::Internal, false))?;
                query_response(&schema, &[batch], formats, "SHOW")
            }
            Kind::Catalog(statement) => {
                let limit = self.gateway.limits().query_timeout;
                let busy = || {
                    pg_error(
                        &GatewayError::Refused {
                            rule: "concurrency".into(),
                            message: "the enclave is answering as many catalog queries as it may at once; try again shortly".into(),
                            receipt: None,
                        },
                        false,
                    )
                };
                let _slot = tokio::time::timeout(limit, self.catalog_slots.acquire())
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| busy())?;
                let view = self.catalog_view(&caller, &login)?;
                let answer = view
                    .run(&statement, &parameters, limit)
                    .await
                    .map_err(|e| pg_error(&e, false))?;
                if !answer.supported {
                    client
                        .send(notice(
                            "this catalog query is not supported here; it is answered with no rows \
                             (the enclave answers the catalog queries of psql, psycopg and DBeaver)"
                                .into(),
                        ))
                        .await?;
                }
                query_response(&answer.schema, &answer.batches, formats, "SELECT")
            }
            Kind::Engine => {
                if !parameters.is_empty() {
                    return Err(self.refuse_parameters(&caller, &login, text).await);
                }
                let request = self.request(&login, text);
                let answer = self
                    .gateway
                    .query(&caller, &login.peer, &request)
                    .await
                    .map_err(|e| pg_error(&e, false))?;
                client
                    .send(notice(answer.summary_lines().join("\n")))
                    .await?;
                let batch =
                    crate::flight::answer_batch(&answer).map_err(|e| pg_error(&e, false))?;
                query_response(&batch.schema(), &[batch], formats, "SELECT")
            }
        }
    }

    /// Records and refuses a DP query with bind parameters.
    async fn refuse_parameters(&self, caller: &Caller, login: &Login, sql: &str) -> PgWireError {
        let e = self
            .gateway
            .refuse_off_thread(
                caller,
                &login.peer,
                sql,
                "parameters",
                "DP queries take no bind parameters: write the values into the SQL",
            )
            .await;
        pg_error(&e, false)
    }

    /// The engine request for `sql`: on the dataset its tables name, else the connection's.
    fn request(&self, login: &Login, sql: &str) -> QueryRequest {
        let named = enclave::dp::dataset_named_in(sql).is_some();
        QueryRequest {
            dataset: if named {
                String::new()
            } else {
                lock(&login.dataset).clone()
            },
            sql: sql.to_owned(),
            epsilon: *lock(&login.epsilon),
            delta: *lock(&login.delta),
        }
    }

    fn catalog_view(&self, caller: &Caller, login: &Login) -> PgWireResult<catalog::CatalogView> {
        let datasets = self
            .gateway
            .datasets(caller)
            .map_err(|e| pg_error(&e, false))?;
        catalog::CatalogView::new(&datasets, &login.user, &lock(&login.dataset))
            .map_err(|e| pg_error(&e, false))
    }

    fn set(&self, login: &Login, name: &str, values: &[Expr]) -> PgWireResult<()> {
        let name = name.to_ascii_lowercase();
        let value = set_value(values);
        let number = |what: &str, most: f64| -> PgWireResult<Option<f64>> {
            match value.as_deref() {
                Some("default") | Some("DEFAULT") => Ok(None),
                Some(v) => match v.parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 0.0 && x <= most => Ok(Some(x)),
                    _ if most < f64::MAX => Err(user_error(
                        "22023",
                        format!("{what} must be a positive number up to {most} (rule 'request')"),
                    )),
                    _ => Err(user_error(
                        "22023",
                        format!("{what} must be a positive number (rule 'request')"),
                    )),
                },
                None => Err(user_error(
                    "22023",
                    format!("{what} must be a positive number (rule 'request')"),
                )),
            }
        };
        match name.as_str() {
            "enclave.epsilon" => *lock(&login.epsilon) = number("enclave.epsilon", f64::MAX)?,
            "enclave.delta" => *lock(&login.delta) = number("enclave.delta", 0.5)?,
            "search_path" => {
                // The first schema that is not a system one becomes the connection's dataset.
                if let Some(first) = values.iter().find_map(|v| {
                    set_value(std::slice::from_ref(v))
                        .filter(|s| s != "pg_catalog" && s != "public" && !s.starts_with('$'))
                }) {
                    *lock(&login.dataset) = first;
                }
            }
            other if other.starts_with("enclave.") => {
                return Err(user_error(
                    "42704",
                    format!(
                        "unrecognized configuration parameter \"{other}\" (the enclave's are enclave.epsilon and enclave.delta)"
                    ),
                ));
            }
            // Everything else a driver sets is accepted and has no effect.
            _ => {}
        }
        Ok(())
    }

    /// Answers every statement of a simple-protocol message.
    async fn simple<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let limit = self.gateway.limits().max_request_bytes;
        if query.len() > limit {
            return Err(pg_error(
                &GatewayError::BadRequest(format!("the SQL is longer than {limit} bytes")),
                false,
            ));
        }
        let statements = match Parser::parse_sql(&PostgreSqlDialect {}, query) {
            Ok(s) if !s.is_empty() => s,
            // Let the engine say what is wrong with it (and record it).
            _ => {
                let r = self
                    .answer(
                        client,
                        query,
                        Kind::Engine,
                        Vec::new(),
                        &Format::UnifiedText,
                    )
                    .await?;
                return Ok(vec![r]);
            }
        };
        let kinds: Vec<Kind> = statements.into_iter().map(classify).collect();
        if kinds.len() > 1 && kinds.iter().any(|k| matches!(k, Kind::Engine)) {
            let login = login(client)?;
            let caller = self.caller(&login)?;
            let e = self
                .gateway
                .refuse_off_thread(
                    &caller,
                    &login.peer,
                    query,
                    "statement",
                    "send one query per message (each is checked, charged and recorded on its own)",
                )
                .await;
            return Err(pg_error(&e, false));
        }
        let mut out = Vec::new();
        for kind in kinds {
            out.push(
                self.answer(client, query, kind, Vec::new(), &Format::UnifiedText)
                    .await?,
            );
        }
        Ok(out)
    }

    /// The statement's kind (one statement per extended-protocol message).
    fn kind_of(&self, sql: &str) -> PgWireResult<Kind> {
        let limit = self.gateway.limits().max_request_bytes;
        if sql.len() > limit {
            return Err(pg_error(
                &GatewayError::BadRequest(format!("the SQL is longer than {limit} bytes")),
                false,
            ));
        }
        match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
            Ok(mut s) if s.len() == 1 => Ok(classify(s.remove(0))),
            Ok(s) if s.len() > 1 => Err(user_error(
                "42601",
                "a prepared statement holds one statement (rule 'statement')",
            )),
            _ => Ok(Kind::Engine),
        }
    }

    /// The columns a statement's answer will have, without running it.
    async fn describe<C>(
        &self,
        client: &C,
        sql: &str,
        formats: &Format,
    ) -> PgWireResult<(Vec<Type>, Option<Vec<FieldInfo>>)>
    where
        C: ClientInfo,
    {
        let login = login(client)?;
        let caller = self.caller(&login)?;
        match self.kind_of(sql)? {
            Kind::Show(name) => Ok((
                Vec::new(),
                Some(vec![FieldInfo::new(
                    name,
                    None,
                    None,
                    Type::TEXT,
                    format_of(formats, 0),
                )]),
            )),
            Kind::Catalog(statement) => {
                let view = self.catalog_view(&caller, &login)?;
                let (params, schema) = view.describe(&statement).await;
                Ok((
                    params.iter().map(pg_type).collect(),
                    Some(fields(&schema, formats)),
                ))
            }
            Kind::Engine => {
                let placeholders = Parser::parse_sql(&PostgreSqlDialect {}, sql)
                    .ok()
                    .and_then(|mut s| (s.len() == 1).then(|| s.remove(0)))
                    .is_some_and(|s| catalog::placeholders(&s) > 0);
                if placeholders {
                    return Err(self.refuse_parameters(&caller, &login, sql).await);
                }
                let request = self.request(&login, sql);
                let (_, prepared) = self
                    .gateway
                    .prepare(&caller, &login.peer, &request)
                    .await
                    .map_err(|e| pg_error(&e, false))?;
                let schema = crate::flight::prepared_schema(&prepared);
                Ok((Vec::new(), Some(fields(&schema, formats))))
            }
            _ => Ok((Vec::new(), None)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `SHOW name`'s answer.
fn show(login: &Login, name: &str) -> PgWireResult<String> {
    // The parser gives `enclave.epsilon` as two words.
    let lower = name
        .to_ascii_lowercase()
        .replacen("enclave ", "enclave.", 1);
    match lower.as_str() {
        "search_path" => Ok(format!("{}, pg_catalog", lock(&login.dataset))),
        "enclave.epsilon" => Ok(lock(&login.epsilon).map_or("default".into(), |v| v.to_string())),
        "enclave.delta" => Ok(lock(&login.delta).map_or("default".into(), |v| v.to_string())),
        "session_authorization" => Ok(login.user.clone()),
        "transaction isolation level" => Ok("read committed".into()),
        "time zone" => Ok("UTC".into()),
        _ => Parameters::fixed()
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_owned())
            .ok_or_else(|| {
                user_error(
                    "42704",
                    format!("unrecognized configuration parameter \"{name}\""),
                )
            }),
    }
}

#[async_trait]
impl StartupHandler for PgHandler {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if client
                    .metadata()
                    .get(METADATA_USER)
                    .is_none_or(|u| u.is_empty())
                {
                    return Err(pg_error(&GatewayError::Auth(AuthError::Session), true));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
                Ok(())
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                let password = message.into_password()?.password;
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let peer = Peer {
                    protocol: Protocol::Pg,
                    addr: client.socket_addr(),
                };
                let gateway = Arc::clone(&self.gateway);
                let (u, p) = (user.clone(), password.clone());
                let signed_in = tokio::task::spawn_blocking(move || {
                    gateway.caller_from_password(&u, &p, &peer)
                })
                .await
                .map_err(|_| pg_error(&GatewayError::Internal, true))?
                .map_err(|e| pg_error(&e, true))?;
                let (_, new) = signed_in;
                let session = new.map_or(password, |n| n.session);
                let database = client
                    .metadata()
                    .get(METADATA_DATABASE)
                    .cloned()
                    .unwrap_or_default();
                client.session_extensions().insert(Login {
                    user,
                    session,
                    peer,
                    dataset: Mutex::new(database),
                    epsilon: Mutex::new(None),
                    delta: Mutex::new(None),
                });
                self.driver.complete_authentication(client, None).await
            }
            _ => Err(pg_error(&GatewayError::Auth(AuthError::Session), true)),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for PgHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.simple(client, query).await
    }
}

#[async_trait]
impl ExtendedQueryHandler for PgHandler {
    type Statement = String;
    type QueryParser = StatementText;

    fn query_parser(&self) -> Arc<StatementText> {
        Arc::clone(&self.parser)
    }

    /// Stores a statement, at most [`MAX_STATEMENTS`] named ones per connection.
    async fn on_parse<C>(&self, client: &mut C, message: Parse) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message
            .name
            .clone()
            .unwrap_or_else(|| DEFAULT_NAME.to_owned());
        let held = client
            .session_extensions()
            .get_or_insert_with(Statements::default);
        if client.portal_store().get_statement(&name).is_none() {
            if held.0.load(Ordering::Relaxed) >= MAX_STATEMENTS {
                return Err(user_error(
                    "53400",
                    format!(
                        "a connection holds at most {MAX_STATEMENTS} prepared statements; close some (rule 'statement')"
                    ),
                ));
            }
            held.0.fetch_add(1, Ordering::Relaxed);
        }
        match StoredStatement::parse(client, &message, self.query_parser()).await? {
            Some(statement) => client.portal_store().put_statement(Arc::new(statement)),
            None => client.portal_store().put_empty_statement(&name),
        }
        client
            .send(PgWireBackendMessage::ParseComplete(ParseComplete::new()))
            .await?;
        Ok(())
    }

    /// Closes a statement or portal (a closed statement frees its place).
    async fn on_close<C>(&self, client: &mut C, message: Close) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        match message.target_type {
            TARGET_TYPE_BYTE_STATEMENT => {
                if client.portal_store().get_statement(name).is_some() {
                    let held = client
                        .session_extensions()
                        .get_or_insert_with(Statements::default);
                    let _ = held
                        .0
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                }
                client.portal_store().rm_statement(name);
            }
            TARGET_TYPE_BYTE_PORTAL => client.portal_store().rm_portal(name),
            _ => {}
        }
        client
            .send(PgWireBackendMessage::CloseComplete(CloseComplete::new()))
            .await?;
        Ok(())
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        target: &StoredStatement<String>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (inferred, fields) = self
            .describe(client, &target.statement, &Format::UnifiedText)
            .await?;
        let n = inferred.len().max(target.parameter_types.len());
        let parameters = (0..n)
            .map(|i| {
                target
                    .parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .or_else(|| inferred.get(i).cloned())
                    .unwrap_or(Type::UNKNOWN)
            })
            .collect();
        Ok(DescribeStatementResponse::new(
            parameters,
            fields.unwrap_or_default(),
        ))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        target: &Portal<String>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (_, fields) = self
            .describe(
                client,
                &target.statement.statement,
                &target.result_column_format,
            )
            .await?;
        Ok(DescribePortalResponse::new(fields.unwrap_or_default()))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<String>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let sql = portal.statement.statement.clone();
        let kind = self.kind_of(&sql)?;
        let parameters = portal
            .parameters
            .iter()
            .enumerate()
            .map(|(i, v)| parameter_text(portal, i, v))
            .collect::<PgWireResult<Vec<_>>>()?;
        self.answer(client, &sql, kind, parameters, &portal.result_column_format)
            .await
    }
}

/// Reads the first bytes of a connection: SSL and GSS-encryption requests are answered (TLS when the
/// listener has it), and the stream is returned positioned at the startup message.
async fn negotiate(
    mut io: TcpStream,
    tls: Option<&TlsAcceptor>,
) -> io::Result<(Box<dyn Stream>, bool)> {
    const SSL_REQUEST: u32 = 80_877_103;
    const GSS_REQUEST: u32 = 80_877_104;
    loop {
        let mut head = [0u8; 8];
        // A TLS ClientHello first (direct TLS, libpq's sslnegotiation=direct).
        let n = io.peek(&mut head[..1]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head[0] == 0x16 {
            let Some(tls) = tls else {
                return Err(io::Error::other("direct TLS without a certificate"));
            };
            let stream = tls.accept(io).await?;
            return Ok((Box::new(stream), true));
        }
        // The first message's 8 bytes: a request code, or the start of the startup message.
        loop {
            let n = io.peek(&mut head).await?;
            if n == head.len() {
                break;
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        match (len, code) {
            (8, SSL_REQUEST) => {
                io.read_exact(&mut head).await?;
                match tls {
                    Some(tls) => {
                        io.write_all(b"S").await?;
                        let stream = tls.accept(io).await?;
                        return Ok((Box::new(stream), true));
                    }
                    None => io.write_all(b"N").await?,
                }
            }
            (8, GSS_REQUEST) => {
                io.read_exact(&mut head).await?;
                io.write_all(b"N").await?;
            }
            _ => return Ok((Box::new(io), false)),
        }
    }
}

/// A client's byte stream, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

fn signing_in_state(state: PgWireConnectionState) -> bool {
    matches!(
        state,
        PgWireConnectionState::AwaitingSslRequest
            | PgWireConnectionState::AwaitingStartup
            | PgWireConnectionState::AuthenticationInProgress
    )
}

/// Serves one connection to its end.
async fn connection(
    io: TcpStream,
    addr: std::net::SocketAddr,
    handler: Arc<PgHandler>,
    tls: Option<TlsAcceptor>,
) {
    let limits = handler.gateway.limits();
    let read_timeout = limits.read_timeout;
    let Ok(Ok((stream, secure))) =
        tokio::time::timeout(read_timeout, negotiate(io, tls.as_ref())).await
    else {
        return;
    };
    // A message may carry the SQL plus the protocol's framing and a few parameters.
    let max_message = limits.max_request_bytes + 16 * 1024;
    let signed_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guarded = frames::Framed::new(stream, max_message, read_timeout, Arc::clone(&signed_in));
    let client = pgwire::api::DefaultClient::new(addr, secure);
    let mut socket =
        tokio_util::codec::Framed::new(guarded, PgWireMessageServerCodec::<String>::new(client));
    socket.set_state(PgWireConnectionState::AwaitingStartup);
    if tls.is_some() && !secure {
        // The password would cross the network in the clear: refused before it is sent.
        let refusal = ErrorInfo::new(
            "FATAL".to_owned(),
            "28000".to_owned(),
            "this listener requires TLS (rule 'tls'): connect with sslmode=require or stricter"
                .to_owned(),
        );
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(PgWireBackendMessage::ErrorResponse(refusal.into())),
        )
        .await;
        return;
    }
    let noop = Arc::new(NoopHandler);
    let sign_in_by = tokio::time::sleep(read_timeout);
    tokio::pin!(sign_in_by);
    loop {
        let signing_in = signing_in_state(socket.state());
        let message = if signing_in {
            tokio::select! {
                () = &mut sign_in_by => return,
                m = socket.next() => m,
            }
        } else {
            socket.next().await
        };
        let message = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                // Oversized, stalled or malformed: say so if the client still listens, then close.
                tracing::debug!(error = %e, %addr, "pg connection cut");
                let refusal = user_error("08P01", format!("{e} (rule 'request')"));
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    socket.send(PgWireBackendMessage::ErrorResponse(
                        ErrorInfo::from(refusal).into(),
                    )),
                )
                .await;
                return;
            }
            None => return,
        };
        if matches!(
            message,
            PgWireFrontendMessage::Terminate(_) | PgWireFrontendMessage::CancelRequest(_)
        ) {
            return;
        }
        let extended = message.is_extended_query();
        let result = process_message(
            message,
            &mut socket,
            Arc::clone(&handler),
            Arc::clone(&handler),
            Arc::clone(&handler),
            Arc::clone(&noop),
            Arc::clone(&noop),
        )
        .await;
        if !signing_in_state(socket.state()) {
            signed_in.store(true, std::sync::atomic::Ordering::Release);
        }
        if let Err(e) = result {
            let fatal = e.is_fatal();
            if process_error(&mut socket, e, extended).await.is_err() || fatal {
                return;
            }
        }
    }
}

/// Serves the Postgres wire protocol on `listener` until `shutdown` resolves; with `tls`, clients
/// may (and off loopback must, see `enclave serve`) switch to TLS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = Arc::new(PgHandler::new(gateway));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    tokio::pin!(shutdown);
    while let Some((io, addr, permit)) =
        crate::conn::next_connection(&listener, &slots, shutdown.as_mut()).await
    {
        // One address holds at most a share of the connections, so it cannot lock everyone out.
        {
            let mut held = lock(&per_address);
            let n = held.entry(addr.ip()).or_insert(0);
            if *n >= MAX_PER_ADDRESS {
                drop(held);
                tracing::debug!(%addr, "pg connection refused: too many from one address");
                continue;
            }
            *n += 1;
        }
        let _ = io.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let tls = tls.clone();
        let per_address = Arc::clone(&per_address);
        tokio::spawn(async move {
            let _permit = permit;
            connection(io, addr, handler, tls).await;
            let mut held = lock(&per_address);
            if let Some(n) = held.get_mut(&addr.ip()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&addr.ip());
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_classified_from_their_syntax_tree() {
        let kind = |sql: &str| {
            classify(
                Parser::parse_sql(&PostgreSqlDialect {}, sql)
                    .expect("parses")
                    .remove(0),
            )
        };
        assert!(matches!(kind("BEGIN"), Kind::Begin));
        assert!(matches!(kind("COMMIT"), Kind::End("COMMIT")));
        assert!(matches!(kind("ROLLBACK"), Kind::End("ROLLBACK")));
        assert!(matches!(kind("SHOW search_path"), Kind::Show(n) if n == "search_path"));
        assert!(
            matches!(kind("SET enclave.epsilon = 0.5"), Kind::Set(n, _) if n == "enclave.epsilon")
        );
        assert!(matches!(
            kind("SET \"Enclave\".EPSILON = 0.5"),
            Kind::Set(n, _) if n == "enclave.epsilon"
        ));
        assert!(matches!(
            kind("SELECT count(*) FROM encounters"),
            Kind::Engine
        ));
        assert!(matches!(kind("SELECT * FROM demo.patients"), Kind::Engine));
        assert!(matches!(
            kind("INSERT INTO demo.patients VALUES (1)"),
            Kind::Engine
        ));
        assert!(matches!(
            kind("SELECT relname FROM pg_catalog.pg_class"),
            Kind::Catalog(_)
        ));
        assert!(matches!(kind("SELECT version()"), Kind::Catalog(_)));
        // A catalog table beside a data table is the engine's (which refuses the catalog table).
        assert!(matches!(
            kind("SELECT * FROM pg_catalog.pg_class, demo.patients"),
            Kind::Engine
        ));
    }

    #[test]
    fn set_values_are_read_from_literals_and_words() {
        let values = |sql: &str| match classify(
            Parser::parse_sql(&PostgreSqlDialect {}, sql)
                .expect("parses")
                .remove(0),
        ) {
            Kind::Set(_, v) => set_value(&v),
            _ => panic!("not a SET"),
        };
        assert_eq!(
            values("SET enclave.epsilon = 0.25").as_deref(),
            Some("0.25")
        );
        assert_eq!(
            values("SET enclave.epsilon TO '1e-3'").as_deref(),
            Some("1e-3")
        );
        assert_eq!(values("SET search_path TO demo").as_deref(), Some("demo"));
        assert_eq!(values("SET enclave.epsilon = -1").as_deref(), Some("-1"));
    }
}
