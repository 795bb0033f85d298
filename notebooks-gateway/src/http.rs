//! The HTTP JSON listener (axum on hyper): sessions, queries, datasets, budgets, access requests and grants,
//! and the OpenAPI document.
//!
//! | route | body | answer |
//! | --- | --- | --- |
//! | `POST /api/v1/session` | `{"user","token","totp"}` | `{"session","session_id","expires_at"}` |
//! | `POST /api/v1/query` | `{"dataset","sql","epsilon"?,"delta"?}` | the JSON of `enclave sql --json` |
//! | `GET /api/v1/datasets` | | the datasets the caller may query (columns, never row counts) |
//! | `GET /api/v1/budget` | | the caller's budgets |
//! | `POST /api/v1/access-requests` | `{"project","purpose","datasets","epsilon","delta"?,"days"}` | the request |
//! | `GET /api/v1/access-requests[/{id}]` | | the caller's requests, or those they may decide |
//! | `POST /api/v1/access-requests/{id}/approve` | `{"epsilon"?,"days"?}` | `{"grant_id","request","grant"}` |
//! | `POST /api/v1/access-requests/{id}/reject` | `{"reason"}` | the request |
//! | `GET /api/v1/grants` | | the caller's grants, or those they may manage |
//! | `POST /api/v1/grants/{id}/revoke` | `{"reason"}` | the grant |
//! | `POST /api/v1/datasets/{name}/approvals-required` | `{"approvals"}` | the setting |
//! | `GET /api/v1/openapi.json` | | the OpenAPI 3.1 document of these routes |
//!
//! Every API route but the session and the document takes `Authorization: Bearer <session>`. Errors
//! are one [`AppError`], `{"error": {"rule", "message", "receipt"}}` with a status from the error's
//! class; request bodies are parsed here (not by axum's extractors) so a malformed one gets our message,
//! not a parser's. The same listener serves the web UI under `/ui/` (`crate::web`: cookie sessions and
//! HTML pages).
//!
//! The accept loop is ours: each connection has a header-read timeout (a slow-loris client is cut), a
//! body-read timeout, a size limit, and the server holds at most a fixed number of connections.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::auth::Caller;
use crate::service::{ErrorKind, Gateway, GatewayError, Peer, Protocol, QueryRequest};

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Connections held at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// The one error type of the HTTP API: a status and a safe message naming the rule.
#[derive(Debug)]
pub struct AppError(pub GatewayError);

impl From<GatewayError> for AppError {
    fn from(e: GatewayError) -> Self {
        AppError(e)
    }
}

impl AppError {
    /// The HTTP status of `error`.
    pub(crate) fn status_of(error: &GatewayError) -> StatusCode {
        if let GatewayError::BadRequest(_) = error {
            return StatusCode::BAD_REQUEST;
        }
        match error.kind() {
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = AppError::status_of(&self.0);
        let body = serde_json::json!({
            "error": {"rule": self.0.rule(), "message": self.0.to_string(), "receipt": self.0.receipt()}
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult = Result<Response, AppError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionBody {
    user: String,
    token: String,
    totp: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    #[serde(default)]
    dataset: String,
    sql: String,
    epsilon: Option<f64>,
    delta: Option<f64>,
}

/// The client's address, put on each connection's requests by the accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

fn peer(addr: PeerAddr) -> Peer {
    Peer {
        protocol: Protocol::Http,
        addr: addr.0,
    }
}

/// Reads and parses a JSON body within the size limit and the read timeout.
pub(crate) async fn json_body<T: serde::de::DeserializeOwned>(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, AppError> {
    let bad = |m: &str| AppError(GatewayError::BadRequest(m.to_owned()));
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim() == "application/json");
    if !is_json {
        return Err(bad("send the body as Content-Type: application/json"));
    }
    let limit = gateway.limits().max_request_bytes;
    let read = axum::body::to_bytes(body, limit);
    let bytes = match tokio::time::timeout(gateway.limits().read_timeout, read).await {
        Err(_) => return Err(bad("the body did not arrive in time")),
        Ok(Err(_)) => {
            return Err(bad(&format!(
                "the body is larger than {limit} bytes, or was cut off"
            )));
        }
        Ok(Ok(b)) => b,
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde's category and position only: never echo the body back.
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "is not valid JSON"
            }
            _ => "does not have this endpoint's fields and types (see /api/v1/openapi.json)",
        };
        bad(&format!(
            "the body {what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// The caller behind `Authorization: Bearer <session>`.
fn bearer(gateway: &Gateway, headers: &HeaderMap) -> Result<Caller, AppError> {
    let session = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(AppError(GatewayError::Auth(
            crate::auth::AuthError::Session,
        )))?;
    Ok(gateway.caller(session)?)
}

fn json(value: &impl serde::Serialize) -> Response {
    axum::Json(value).into_response()
}

async fn session(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let b: SessionBody = json_body(&gateway, &headers, body).await?;
    let g = gateway.clone();
    // Sign-in writes to SQLite (fsync): off the async workers.
    let new =
        tokio::task::spawn_blocking(move || g.sign_in(&b.user, &b.token, &b.totp, &peer(addr)))
            .await
            .map_err(|_| AppError(GatewayError::Internal))??;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "session": new.session, "session_id": new.id, "expires_at": new.expires_at,
        })),
    )
        .into_response())
}

async fn query(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let b: QueryBody = json_body(&gateway, &headers, body).await?;
    let request = QueryRequest {
        dataset: b.dataset,
        sql: b.sql,
        epsilon: b.epsilon,
        delta: b.delta,
    };
    let answer = gateway.query(&caller, &peer(addr), &request).await?;
    Ok(json(&answer.to_json()))
}

async fn datasets(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    Ok(json(&gateway.datasets(&caller)?))
}

async fn budget(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    Ok(json(&gateway.budgets(&caller)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessRequestBody {
    project: String,
    purpose: String,
    datasets: Vec<String>,
    epsilon: f64,
    delta: Option<f64>,
    days: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    epsilon: Option<f64>,
    days: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalsBody {
    approvals: u32,
}

/// The path segment, or our own refusal (never axum's rejection text).
pub(crate) fn path_text(p: Result<Path<String>, PathRejection>) -> Result<String, GatewayError> {
    p.map(|Path(t)| t)
        .map_err(|_| GatewayError::BadRequest("the path is not valid percent-encoded UTF-8".into()))
}

/// A request or grant number from the path: digits only (axum's own rejection text never reaches a user).
pub(crate) fn path_number(p: Result<Path<String>, PathRejection>) -> Result<i64, GatewayError> {
    let text = path_text(p)?;
    text.parse::<i64>()
        .ok()
        .filter(|n| *n > 0 && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            GatewayError::BadRequest("the number in the path is not a positive integer".into())
        })
}

/// Runs a step that writes to SQLite (fsync) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, AppError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| AppError(GatewayError::Internal))??)
}

async fn request_access(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let b: AccessRequestBody = json_body(&gateway, &headers, body).await?;
    let new = enclave::access::NewRequest {
        project: b.project,
        purpose: b.purpose,
        datasets: b.datasets,
        epsilon: b.epsilon,
        delta: b.delta,
        days: b.days,
    };
    let request = blocking(move || gateway.request_access(&caller, &peer(addr), &new)).await?;
    Ok((StatusCode::CREATED, axum::Json(request)).into_response())
}

async fn access_requests(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    Ok(json(&gateway.access_requests(&caller)?))
}

async fn access_request(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let id = path_number(id)?;
    let request = blocking(move || gateway.access_request(&caller, &peer(addr), id)).await?;
    Ok(json(&request))
}

async fn approve(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let id = path_number(id)?;
    let b: ApproveBody = json_body(&gateway, &headers, body).await?;
    let decision =
        blocking(move || gateway.approve_access(&caller, &peer(addr), id, b.epsilon, b.days))
            .await?;
    Ok(json(&serde_json::json!({
        "grant_id": decision.grant.as_ref().map(|g| g.id),
        "request": decision.request,
        "grant": decision.grant,
    })))
}

async fn reject(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let id = path_number(id)?;
    let b: ReasonBody = json_body(&gateway, &headers, body).await?;
    let request =
        blocking(move || gateway.reject_access(&caller, &peer(addr), id, &b.reason)).await?;
    Ok(json(&request))
}

async fn grants(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    Ok(json(&gateway.grants(&caller)?))
}

async fn revoke(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let id = path_number(id)?;
    let b: ReasonBody = json_body(&gateway, &headers, body).await?;
    let grant = blocking(move || gateway.revoke_grant(&caller, &peer(addr), id, &b.reason)).await?;
    Ok(json(&grant))
}

/// A dataset's metadata as JSON-LD (HealthDCAT-AP or Croissant), for every signed-in caller, like its
/// card; its counts are the DP-released card figures, so a card not released yet is refused.
async fn metadata(
    gateway: Arc<Gateway>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    format: enclave::metadata::Format,
) -> ApiResult {
    bearer(&gateway, &headers)?;
    let name = path_text(name)?;
    let doc = blocking(move || {
        use catalog::CatalogStore as _;
        let catalog = gateway.catalog();
        let v = match catalog.version(&name, None) {
            Ok(v) => v,
            Err(catalog::Error::UnknownDataset(_)) => {
                return Err(crate::service::refused(
                    "catalog",
                    format!("no dataset '{name}' in the catalog"),
                ));
            }
            Err(e) => return Err(crate::service::internal(e)),
        };
        let release = catalog
            .card_release(&name, &v.version.version)
            .map_err(crate::service::internal)?
            .and_then(|r| enclave::card::figures(&r).map(|f| (r, f)));
        let Some((release, figures)) = release else {
            return Err(crate::service::refused(
                "card",
                format!(
                    "the card of '{name}' version {} is not released yet (a board member releases its DP figures first)",
                    v.version.version
                ),
            ));
        };
        let publisher = enclave::metadata::Publisher {
            base_url: gateway
                .accounts()
                .public_url()
                .unwrap_or("http://localhost/")
                .to_owned(),
        };
        enclave::metadata::export(&v, &release, &figures, &publisher, format)
            .map_err(GatewayError::from)
    })
    .await?;
    let mut response = json(&doc);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/ld+json"),
    );
    Ok(response)
}

async fn healthdcat_ap(
    State(gateway): State<Arc<Gateway>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult {
    metadata(
        gateway,
        name,
        headers,
        enclave::metadata::Format::HealthDcatAp,
    )
    .await
}

async fn croissant(
    State(gateway): State<Arc<Gateway>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult {
    metadata(gateway, name, headers, enclave::metadata::Format::Croissant).await
}

async fn approvals_required(
    State(gateway): State<Arc<Gateway>>,
    Extension(addr): Extension<PeerAddr>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let caller = bearer(&gateway, &headers)?;
    let b: ApprovalsBody = json_body(&gateway, &headers, body).await?;
    let name = path_text(name)?;
    let dataset = name.clone();
    blocking(move || gateway.set_approvals_required(&caller, &peer(addr), &dataset, b.approvals))
        .await?;
    Ok(json(
        &serde_json::json!({"dataset": name, "approvals": b.approvals}),
    ))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> AppError {
    AppError(GatewayError::Refused {
        rule: "route".into(),
        message: "no such endpoint (see /api/v1/openapi.json)".into(),
        receipt: None,
    })
}

/// The API's routes over `gateway`, and the web UI's (`crate::web`).
pub fn router(gateway: Arc<Gateway>, endpoints: crate::web::Endpoints) -> Router {
    let tls = endpoints.tls;
    let ui = crate::web::router(Arc::clone(&gateway), endpoints);
    Router::new()
        .route("/api/v1/session", post(session))
        .route("/api/v1/query", post(query))
        .route("/api/v1/datasets", get(datasets))
        .route("/api/v1/budget", get(budget))
        .route(
            "/api/v1/access-requests",
            get(access_requests).post(request_access),
        )
        .route("/api/v1/access-requests/{id}", get(access_request))
        .route("/api/v1/access-requests/{id}/approve", post(approve))
        .route("/api/v1/access-requests/{id}/reject", post(reject))
        .route("/api/v1/grants", get(grants))
        .route("/api/v1/grants/{id}/revoke", post(revoke))
        .route(
            "/api/v1/datasets/{name}/approvals-required",
            post(approvals_required),
        )
        .route("/api/v1/datasets/{name}/healthdcat-ap", get(healthdcat_ap))
        .route("/api/v1/datasets/{name}/croissant", get(croissant))
        .route("/api/v1/openapi.json", get(openapi))
        .with_state(gateway)
        .merge(ui)
        .fallback(not_found)
        .layer(axum::middleware::map_response(move |response| {
            transport_headers(response, tls)
        }))
}

/// Every response, API ones included, is read as the type it declares (a JSON answer can never be run
/// as a script by a page that allows this origin's scripts); under TLS, browsers are told to come back
/// over TLS only (HSTS, a year: no later visit can be downgraded to plain HTTP and its cookies read).
async fn transport_headers(mut response: Response, tls: bool) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    endpoints: crate::web::Endpoints,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let read_timeout = gateway.limits().read_timeout;
    let router = router(gateway, endpoints);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    while let Some((stream, addr, permit)) =
        crate::conn::next_connection(&listener, &slots, shutdown.as_mut()).await
    {
        let service = hyper_util::service::TowerToHyperService::new(
            router.clone().layer(Extension(PeerAddr(addr))),
        );
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let http = || {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(read_timeout)
                    .max_buf_size(64 * 1024);
                b
            };
            let served = match tls {
                None => {
                    http()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
                // The handshake is held to the same timeout as a request's headers.
                Some(tls) => match tokio::time::timeout(read_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        http()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                    _ => return,
                },
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, %addr, "http connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_parses_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("json");
        let paths = doc["paths"].as_object().expect("paths");
        for route in [
            "/api/v1/session",
            "/api/v1/query",
            "/api/v1/datasets",
            "/api/v1/budget",
            "/api/v1/access-requests",
            "/api/v1/access-requests/{id}",
            "/api/v1/access-requests/{id}/approve",
            "/api/v1/access-requests/{id}/reject",
            "/api/v1/grants",
            "/api/v1/grants/{id}/revoke",
            "/api/v1/datasets/{name}/approvals-required",
            "/api/v1/datasets/{name}/healthdcat-ap",
            "/api/v1/datasets/{name}/croissant",
            "/api/v1/openapi.json",
        ] {
            assert!(paths.contains_key(route), "{route} is documented");
        }
        assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    }
}
