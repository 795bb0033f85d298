//! The board's and researchers' web UI, served under `/ui/` on the HTTP listener: server-rendered pages
//! (`pages`) that work without JavaScript, over the same gateway calls as the API.
//!
//! - **Sessions**: the sign-in form takes the API token and the current TOTP code (two factors) and puts
//!   the gateway session in a cookie that is `HttpOnly`, `SameSite=Strict`, `Path=/` and, under TLS,
//!   `Secure` and named with the `__Host-` prefix (no other host or plain-HTTP page can set it; the
//!   HTTP listener adds HSTS under TLS). The form itself is protected by a double-submit nonce (cookie and field must match).
//! - **CSRF**: every state-changing form carries a token derived from the session secret (HMAC-SHA-256),
//!   checked in constant time; a post without it is refused (rule `csrf`) and recorded.
//! - **Output**: every value is escaped by maud; the only unescaped markup is this crate's own constants.
//!   Every response carries a strict Content-Security-Policy (scripts, styles and fetches only from this
//!   origin — the one script is `/ui/static/passkey.js` — no inline code, no framing, forms only to this
//!   origin), `nosniff`, `no-referrer` and `no-store`.
//! - **Passkeys** (`passkeys`): the account page registers them; the sign-in page offers them beside
//!   the token-and-code form. They are the only part that needs JavaScript.
//! - **Authorization**: Cedar, as for the API — each step on a request or grant asks about its datasets
//!   (`request_access`, `manage_grants`), the board's pages that span datasets (`administer` on the
//!   platform) ask about the enclave; a denial is a 403 page and an audit record. Dataset cards are
//!   catalog metadata shown to every signed-in user (researchers find datasets before they ask); their
//!   exact counts and the ingest report are shown only to whoever administers the enclave.

mod budgets;
mod chart;
mod pages;
mod passkeys;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use catalog::CatalogStore;
use maud::Markup;
use ring::hmac;

use crate::auth::Caller;
use crate::authz::Action;
use crate::service::{Gateway, GatewayError, Peer, Protocol};

/// The session cookie's name (under TLS with the `__Host-` prefix: [`Ui::session_cookie`]).
const SESSION_COOKIE: &str = "enclave_session";
/// The sign-in form's nonce cookie (under TLS with the `__Host-` prefix: [`Ui::signin_cookie`]).
const SIGNIN_COOKIE: &str = "enclave_signin";
/// The stylesheet, compiled in.
const STYLESHEET: &str = include_str!("app.css");
/// What every UI response may load and do.
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Where the UI runs: whether its listener has TLS (cookies are then `Secure`) and the listeners a
/// researcher connects to (for the connection snippets).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// The HTTP listener uses TLS.
    pub tls: bool,
    /// The HTTP listener's address.
    pub http: Option<SocketAddr>,
    /// The Flight SQL listener's address.
    pub flight: Option<SocketAddr>,
    /// The Postgres listener's address.
    pub pg: Option<SocketAddr>,
}

/// The UI's state: the gateway and where it listens.
#[derive(Clone)]
pub struct Ui {
    gateway: Arc<Gateway>,
    endpoints: Arc<Endpoints>,
}

use crate::http::{PeerAddr as ClientAddr, path_number, path_text};

impl Ui {
    /// The session cookie's name. Under TLS it carries the `__Host-` prefix, which browsers accept only
    /// from a secure origin, with `Secure`, `Path=/` and no `Domain`: no sibling host and no plain-HTTP
    /// page can plant or shadow it.
    fn session_cookie(&self) -> &'static str {
        if self.endpoints.tls {
            "__Host-enclave_session"
        } else {
            SESSION_COOKIE
        }
    }

    /// The sign-in nonce cookie's name (prefixed under TLS like [`Ui::session_cookie`]).
    fn signin_cookie(&self) -> &'static str {
        if self.endpoints.tls {
            "__Host-enclave_signin"
        } else {
            SIGNIN_COOKIE
        }
    }

    /// A `Set-Cookie` value for `name` (HttpOnly, SameSite=Strict, `Path=/`; `Secure` under TLS).
    fn set_cookie(&self, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
        set_cookie(name, value, max_age, self.endpoints.tls)
    }
}

/// The UI's routes (merged into the HTTP listener's router).
pub fn router(gateway: Arc<Gateway>, endpoints: Endpoints) -> Router {
    let ui = Ui {
        gateway,
        endpoints: Arc::new(endpoints),
    };
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(home))
        .route("/ui/static/app.css", get(stylesheet))
        .route("/ui/sign-in", get(sign_in_form).post(sign_in))
        .route("/ui/sign-out", post(sign_out))
        .route("/ui/static/passkey.js", get(passkeys::script))
        .route("/ui/static/icon.svg", get(icon))
        .route("/ui/account", get(passkeys::account))
        .route("/ui/account/passkeys/{id}/remove", post(passkeys::remove))
        .route(
            "/ui/passkeys/register/start",
            post(passkeys::register_start),
        )
        .route(
            "/ui/passkeys/register/finish",
            post(passkeys::register_finish),
        )
        .route("/ui/passkey/sign-in/start", post(passkeys::sign_in_start))
        .route("/ui/passkey/sign-in/finish", post(passkeys::sign_in_finish))
        .route("/ui/datasets", get(datasets))
        .route("/ui/datasets/{name}", get(dataset))
        .route("/ui/datasets/{name}/release", post(release_card))
        .route("/ui/requests", get(requests).post(file_request))
        .route("/ui/requests/{id}/approve", post(approve))
        .route("/ui/requests/{id}/reject", post(reject))
        .route("/ui/grants", get(grants))
        .route("/ui/users", get(users::list).post(users::add))
        .route("/ui/users/{name}/disable", post(users::disable))
        .route("/ui/users/{name}/reset", post(users::reset))
        .route("/ui/budgets", get(budgets::index))
        .route("/ui/budgets/researchers/{user}", get(budgets::researcher))
        .route("/ui/budgets/datasets/{name}", get(budgets::dataset))
        .route("/ui/grants/{id}/revoke", post(revoke))
        .route("/ui/audit", get(audit))
        .route("/ui/audit/verify", post(verify))
        .route("/ui/audit/head", get(head))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(ui)
}

async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A page or a refusal rendered as one.
pub(crate) struct PageError {
    status: StatusCode,
    error: GatewayError,
}

impl PageError {
    /// The refusal as a page (the caller, where known, is for the handlers' symmetry only).
    fn new(error: GatewayError, _caller: Option<&Caller>) -> PageError {
        PageError {
            status: crate::http::AppError::status_of(&error),
            error,
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = pages::error_page(self.status, &self.error);
        (self.status, html(page)).into_response()
    }
}

type PageResult = Result<Response, PageError>;

fn html(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

fn peer(addr: ClientAddr) -> Peer {
    Peer {
        protocol: Protocol::Http,
        addr: addr.0,
    }
}

/// One cookie's value from the request.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

fn set_cookie(name: &str, value: &str, max_age: Option<u64>, secure: bool) -> HeaderValue {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        c.push_str("; Secure");
    }
    // The value is base64url or hex made here, never input.
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// What a session's CSRF token is the HMAC-SHA-256 of, under the session secret.
const CSRF_LABEL: &[u8] = b"enclave ui csrf v1";

/// The CSRF token of a session (hex).
fn csrf_token(session: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, session.as_bytes());
    hex::encode(hmac::sign(&key, CSRF_LABEL).as_ref())
}

/// Whether `given` is the session's CSRF token (ring's constant-time tag check).
fn csrf_holds(session: &str, given: &str) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, session.as_bytes());
    hex::decode(given).is_ok_and(|tag| hmac::verify(&key, CSRF_LABEL, &tag).is_ok())
}

/// Whether two secrets are equal, compared as SHA-256 digests (timing reveals nothing of the secrets).
fn same_secret(a: &str, b: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest(a).as_ref() == digest(b).as_ref()
}

/// The signed-in caller, their session secret and its CSRF token, from the cookie.
struct Signed {
    caller: Caller,
    session: String,
    csrf: String,
}

fn signed_in(ui: &Ui, headers: &HeaderMap) -> Option<Signed> {
    let secret = cookie(headers, ui.session_cookie())?;
    let caller = ui.gateway.caller(secret).ok()?;
    Some(Signed {
        caller,
        session: secret.to_owned(),
        csrf: csrf_token(secret),
    })
}

/// Where a request without a valid session goes.
fn to_sign_in() -> Response {
    Redirect::to("/ui/sign-in").into_response()
}

/// A form body: `application/x-www-form-urlencoded`, within the size limit and the read timeout.
struct Form(Vec<(String, String)>);

impl Form {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn text(&self, name: &str) -> String {
        self.get(name).unwrap_or("").to_owned()
    }
}

fn bad(message: &str) -> GatewayError {
    GatewayError::BadRequest(message.to_owned())
}

async fn read_form(ui: &Ui, headers: &HeaderMap, body: Body) -> Result<Form, GatewayError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().unwrap_or("").trim() == "application/x-www-form-urlencoded"
        });
    if !is_form {
        return Err(bad("send the form as application/x-www-form-urlencoded"));
    }
    let limit = ui.gateway.limits().max_request_bytes;
    let read = axum::body::to_bytes(body, limit);
    let bytes = match tokio::time::timeout(ui.gateway.limits().read_timeout, read).await {
        Ok(Ok(b)) => b,
        _ => {
            return Err(bad(&format!(
                "the form is larger than {limit} bytes, was cut off, or did not arrive in time"
            )));
        }
    };
    Ok(Form(
        form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    ))
}

/// Reads a form posted by a signed-in caller and checks its CSRF token; a post without the right one
/// is refused and recorded.
async fn checked_form(
    ui: &Ui,
    signed: &Signed,
    addr: ClientAddr,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<Form, PageError> {
    let form = read_form(ui, headers, body)
        .await
        .map_err(|e| PageError::new(e, Some(&signed.caller)))?;
    let given = form.get("csrf").unwrap_or("");
    if !csrf_holds(&signed.session, given) {
        let error = ui
            .gateway
            .refuse_off_thread(
                &signed.caller,
                &peer(addr),
                &format!("web form: {what}"),
                "csrf",
                "the form did not carry this session's CSRF token; reload the page and submit it again",
            )
            .await;
        return Err(PageError::new(error, Some(&signed.caller)));
    }
    Ok(form)
}

/// Runs a gateway call that writes to SQLite (fsync) off the async workers.
async fn blocking<T: Send + 'static>(
    caller: &Caller,
    f: impl FnOnce() -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, PageError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(GatewayError::Internal))
        .map_err(|e| PageError::new(e, Some(caller)))
}

/// A query string's pairs.
fn query_pairs(q: Option<String>) -> Form {
    Form(
        form_urlencoded::parse(q.unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Whether Cedar lets `caller` administer the enclave (the board's pages that span datasets).
fn administers(ui: &Ui, caller: &Caller) -> bool {
    ui.gateway
        .policies()
        .current()
        .decide_platform(caller, Action::Administer)
        .is_ok_and(|v| v.allowed)
}

/// A board member's form post: its CSRF token checked (rule `csrf`), then Cedar's `administer` (403),
/// each refusal recorded; `what` names the step in both.
async fn board_form(
    ui: &Ui,
    signed: &Signed,
    addr: ClientAddr,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<Form, PageError> {
    let form = checked_form(ui, signed, addr, headers, body, what).await?;
    require_board(ui, signed, addr, what).await?;
    Ok(form)
}

/// Refuses (403, recorded) a caller Cedar does not let administer the enclave.
async fn require_board(
    ui: &Ui,
    signed: &Signed,
    addr: ClientAddr,
    what: &str,
) -> Result<(), PageError> {
    if administers(ui, &signed.caller) {
        return Ok(());
    }
    let message = format!("{} may not {what} (board members only)", signed.caller.user);
    let error = ui
        .gateway
        .refuse_off_thread(&signed.caller, &peer(addr), what, "access", &message)
        .await;
    Err(PageError::new(error, Some(&signed.caller)))
}

/// The caller's own latest audit records (their queries, refusals and steps).
fn own_history(
    ui: &Ui,
    caller: &Caller,
    n: usize,
) -> Result<Vec<enclave::audit::Record>, GatewayError> {
    let filter = enclave::audit::Filter {
        user: Some(caller.user.clone()),
        ..Default::default()
    };
    Ok(ui.gateway.ledger().search(&filter, n)?)
}

/// The latest version of every dataset whose name, provider, legal basis, consent scope, tables or
/// columns contain `search` (any case; empty: all), by name.
fn catalog_cards(ui: &Ui, search: &str) -> Result<Vec<catalog::VersionEntry>, GatewayError> {
    let needle = search.trim().to_lowercase();
    let catalog = ui.gateway.catalog();
    let mut out = Vec::new();
    for summary in catalog.list().map_err(crate::service::internal)? {
        let v = catalog
            .version(&summary.name, None)
            .map_err(crate::service::internal)?;
        let p = &v.version.provenance;
        let hit = needle.is_empty()
            || [
                &v.version.dataset,
                &p.provider,
                &p.legal_basis,
                &p.consent_scope,
                &p.profile,
            ]
            .iter()
            .any(|t| t.to_lowercase().contains(&needle))
            || v.version.tables.iter().any(|t| {
                t.name.to_lowercase().contains(&needle)
                    || t.columns
                        .iter()
                        .any(|c| c.name.to_lowercase().contains(&needle))
            });
        if hit {
            out.push(v);
        }
    }
    Ok(out)
}

/// `audit verify` against the public key exported at `enclave init`: `Ok` with what was checked, or
/// what is broken.
fn audit_verify(gateway: &Gateway) -> Result<String, String> {
    let key = std::fs::read_to_string(gateway.audit_key_path())
        .map_err(|_| "the audit public key exported at init cannot be read".to_owned())?;
    match gateway.ledger().verify(key.trim()) {
        Ok(v) => Ok(format!(
            "the chain is intact: the audit log verifies, {} records, every one signed, budgets match their grants and queries",
            v.records
        )),
        Err(enclave::Error::AuditBroken { seq, why }) => {
            Err(format!("the audit log is broken at record {seq}: {why}"))
        }
        Err(e) => {
            tracing::error!(error = %e, "audit verification failed to run");
            Err("the verification could not run (see the operator's log)".to_owned())
        }
    }
}

/// The signed head of a log that verifies, as `enclave audit head` writes it (with the public key): the
/// board's witness to keep outside the enclave. A log that does not verify gets no head.
fn audit_head(gateway: &Gateway) -> Result<String, GatewayError> {
    audit_verify(gateway).map_err(|why| crate::service::refused("audit", why))?;
    let head = gateway.ledger().head()?.ok_or_else(|| {
        crate::service::refused("audit", "the audit log is empty: there is no head yet")
    })?;
    let mut json = serde_json::to_value(&head).map_err(crate::service::internal)?;
    json["public_key"] = gateway.ledger().public_key_hex().into();
    Ok(serde_json::to_string_pretty(&json).map_err(crate::service::internal)? + "\n")
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// The site's icon: a shield, drawn here.
const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\">\
<path d=\"M16 2 4 7v8c0 7.5 5.1 13.4 12 15 6.9-1.6 12-7.5 12-15V7z\" fill=\"#1f5fa8\"/>\
<path d=\"m10 16 4 4 8-9\" stroke=\"#fff\" stroke-width=\"3\" fill=\"none\"/></svg>";

async fn icon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        ICON,
    )
        .into_response()
}

async fn sign_in_form(State(ui): State<Ui>) -> PageResult {
    let nonce =
        hex::encode(crate::auth::random_bytes::<16>().map_err(|e| PageError::new(e.into(), None))?);
    let mut response = html(pages::sign_in(&nonce, None));
    response.headers_mut().insert(
        header::SET_COOKIE,
        ui.set_cookie(ui.signin_cookie(), &nonce, Some(600)),
    );
    Ok(response)
}

async fn sign_in(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let form = read_form(&ui, &headers, body)
        .await
        .map_err(|e| PageError::new(e, None))?;
    let nonce = cookie(&headers, ui.signin_cookie()).unwrap_or("");
    let given = form.get("nonce").unwrap_or("");
    if nonce.is_empty() || !same_secret(nonce, given) {
        return Err(PageError::new(
            crate::service::refused(
                "csrf",
                "the sign-in form has expired or came from another site; load it again",
            ),
            None,
        ));
    }
    let (user, token, code) = (form.text("user"), form.text("token"), form.text("totp"));
    let gateway = Arc::clone(&ui.gateway);
    let signed = tokio::task::spawn_blocking(move || {
        gateway.sign_in(user.trim(), token.trim(), code.trim(), &peer(addr))
    })
    .await
    .unwrap_or(Err(GatewayError::Internal));
    match signed {
        Ok(session) => Ok(with_session(&ui, see_other("/ui/"), &session.session)),
        Err(e) => {
            // The form again, with the refusal; the nonce stays valid for another try.
            let status = crate::http::AppError::status_of(&e);
            Ok((status, html(pages::sign_in(nonce, Some(&e)))).into_response())
        }
    }
}

/// `response` with the new session's cookie set and the sign-in nonce's cleared (both sign-in forms).
fn with_session(ui: &Ui, mut response: Response, session: &str) -> Response {
    let h = response.headers_mut();
    h.append(
        header::SET_COOKIE,
        ui.set_cookie(ui.session_cookie(), session, None),
    );
    h.append(
        header::SET_COOKIE,
        ui.set_cookie(ui.signin_cookie(), "", Some(0)),
    );
    response
}

async fn sign_out(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    checked_form(&ui, &signed, addr, &headers, body, "sign out").await?;
    let gateway = Arc::clone(&ui.gateway);
    let secret = signed.session.clone();
    blocking(&signed.caller, move || {
        gateway.sign_out(&secret, &peer(addr))
    })
    .await?;
    let mut response = see_other("/ui/sign-in");
    response.headers_mut().insert(
        header::SET_COOKIE,
        ui.set_cookie(ui.session_cookie(), "", Some(0)),
    );
    Ok(response)
}

async fn home(State(ui): State<Ui>, headers: HeaderMap) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let c = &signed.caller;
    let err = |e| PageError::new(e, Some(c));
    let view = pages::Home {
        budgets: ui.gateway.budgets(c).map_err(err)?,
        grants: ui.gateway.grants(c).map_err(err)?,
        datasets: ui.gateway.datasets(c).map_err(err)?,
        requests: ui.gateway.access_requests(c).map_err(err)?,
        history: own_history(&ui, c, 20).map_err(err)?,
        board: administers(&ui, c),
        endpoints: &ui.endpoints,
        host: headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost"),
    };
    Ok(html(pages::home(&signed.caller, &signed.csrf, &view)))
}

async fn datasets(State(ui): State<Ui>, headers: HeaderMap, RawQuery(q): RawQuery) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let search = query_pairs(q).text("q");
    let list = catalog_cards(&ui, &search).map_err(|e| PageError::new(e, Some(&signed.caller)))?;
    Ok(html(pages::datasets(
        &signed.caller,
        &signed.csrf,
        &search,
        &list,
    )))
}

async fn dataset(
    State(ui): State<Ui>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let err = |e| PageError::new(e, Some(&signed.caller));
    let name = path_text(name).map_err(err)?;
    let versions = match ui.gateway.catalog().versions(&name) {
        Ok(v) if !v.is_empty() => v,
        Ok(_) | Err(catalog::Error::UnknownDataset(_)) => {
            return Err(err(crate::service::refused(
                "catalog",
                format!("no dataset '{name}' in the catalog"),
            )));
        }
        Err(e) => return Err(err(crate::service::internal(e))),
    };
    let board = administers(&ui, &signed.caller);
    let release = match versions.last() {
        Some(latest) => ui
            .gateway
            .catalog()
            .card_release(&name, &latest.version.version)
            .map_err(|e| err(crate::service::internal(e)))?
            .and_then(|r| enclave::card::figures(&r).map(|f| (r, f))),
        None => None,
    };
    Ok(html(pages::dataset(
        &signed.caller,
        &signed.csrf,
        &versions,
        board,
        release.as_ref(),
    )))
}

/// A board member releases the latest version's card figures under a catalog budget (Cedar decides,
/// as for the board's other cross-dataset pages; the queries are charged and audited).
async fn release_card(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let form = board_form(&ui, &signed, addr, &headers, body, "release card figures").await?;
    let err = |e| PageError::new(e, Some(&signed.caller));
    let name = path_text(name).map_err(err)?;
    let epsilon: f64 = form
        .get("epsilon")
        .and_then(|e| e.trim().parse().ok())
        .ok_or_else(|| err(bad("ε must be a number")))?;
    let via = crate::service::Gateway::via(&signed.caller, &peer(addr), String::new());
    // A task of its own: a browser that goes away cannot stop a release between its claim and its
    // figures (which would leave the version claimed and unreleasable).
    let (gateway, dataset, member) = (
        Arc::clone(&ui.gateway),
        name.clone(),
        signed.caller.user.clone(),
    );
    tokio::spawn(async move {
        enclave::card::release(
            gateway.engine(),
            gateway.catalog(),
            &dataset,
            &member,
            epsilon,
            &via,
        )
        .await
    })
    .await
    .map_err(|_| err(GatewayError::Internal))?
    .map_err(|e| err(card_error(e)))?;
    Ok(see_other(&format!(
        "/ui/datasets/{}",
        pages::urlencode(&name)
    )))
}

/// A card release's refusal as the rule it broke.
fn card_error(e: enclave::Error) -> GatewayError {
    match e {
        enclave::Error::Catalog(catalog::Error::UnknownDataset(name)) => {
            crate::service::refused("catalog", format!("no dataset '{name}' in the catalog"))
        }
        enclave::Error::Catalog(e @ catalog::Error::CardReleased { .. }) => {
            crate::service::refused("card", e.to_string())
        }
        enclave::Error::Config(message) => crate::service::refused("card", message),
        other => GatewayError::from(other),
    }
}

async fn requests(State(ui): State<Ui>, headers: HeaderMap) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let c = &signed.caller;
    let err = |e| PageError::new(e, Some(c));
    let list = ui.gateway.access_requests(c).map_err(err)?;
    let names = catalog_cards(&ui, "").map_err(err)?;
    Ok(html(pages::requests(
        c,
        &signed.csrf,
        &list,
        &names,
        administers(&ui, c),
    )))
}

async fn file_request(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let form = checked_form(&ui, &signed, addr, &headers, body, "request access").await?;
    let c = signed.caller.clone();
    let number = |name: &str| -> Result<f64, PageError> {
        form.text(name)
            .trim()
            .parse::<f64>()
            .map_err(|_| PageError::new(bad(&format!("{name} must be a number")), Some(&c)))
    };
    let new = enclave::access::NewRequest {
        project: form.text("project"),
        purpose: form.text("purpose"),
        datasets: form.all("datasets"),
        epsilon: number("epsilon")?,
        delta: None,
        days: form
            .text("days")
            .trim()
            .parse::<u32>()
            .map_err(|_| PageError::new(bad("days must be a whole number"), Some(&c)))?,
    };
    let gateway = Arc::clone(&ui.gateway);
    blocking(&signed.caller, move || {
        gateway.request_access(&c, &peer(addr), &new)
    })
    .await?;
    Ok(see_other("/ui/requests"))
}

async fn approve(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let c = signed.caller.clone();
    let id = path_number(id).map_err(|e| PageError::new(e, Some(&c)))?;
    let form = checked_form(&ui, &signed, addr, &headers, body, "approve a request").await?;
    let optional = |name: &str| form.get(name).map(str::trim).filter(|v| !v.is_empty());
    let epsilon = optional("epsilon")
        .map(|v| v.parse::<f64>())
        .transpose()
        .map_err(|_| PageError::new(bad("ε must be a number"), Some(&c)))?;
    let days = optional("days")
        .map(|v| v.parse::<u32>())
        .transpose()
        .map_err(|_| PageError::new(bad("days must be a whole number"), Some(&c)))?;
    let gateway = Arc::clone(&ui.gateway);
    let caller = c.clone();
    blocking(&c, move || {
        gateway.approve_access(&caller, &peer(addr), id, epsilon, days)
    })
    .await?;
    Ok(see_other("/ui/requests"))
}

async fn reject(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let c = signed.caller.clone();
    let id = path_number(id).map_err(|e| PageError::new(e, Some(&c)))?;
    let form = checked_form(&ui, &signed, addr, &headers, body, "reject a request").await?;
    let reason = form.text("reason");
    let gateway = Arc::clone(&ui.gateway);
    let caller = c.clone();
    blocking(&c, move || {
        gateway.reject_access(&caller, &peer(addr), id, &reason)
    })
    .await?;
    Ok(see_other("/ui/requests"))
}

async fn grants(State(ui): State<Ui>, headers: HeaderMap) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let c = &signed.caller;
    let list = ui
        .gateway
        .grants(c)
        .map_err(|e| PageError::new(e, Some(c)))?;
    Ok(html(pages::grants(
        c,
        &signed.csrf,
        &list,
        administers(&ui, c),
    )))
}

async fn revoke(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let c = signed.caller.clone();
    let id = path_number(id).map_err(|e| PageError::new(e, Some(&c)))?;
    let form = checked_form(&ui, &signed, addr, &headers, body, "revoke a grant").await?;
    let reason = form.text("reason");
    let gateway = Arc::clone(&ui.gateway);
    let caller = c.clone();
    blocking(&c, move || {
        gateway.revoke_grant(&caller, &peer(addr), id, &reason)
    })
    .await?;
    Ok(see_other("/ui/grants"))
}

async fn head(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    require_board(&ui, &signed, addr, "download the audit log's signed head").await?;
    let gateway = Arc::clone(&ui.gateway);
    let text = blocking(&signed.caller, move || audit_head(&gateway)).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"audit-head.json\"",
            ),
        ],
        text,
    )
        .into_response())
}

/// The audit viewer's filter from the query string (empty fields ignored).
fn audit_filter(q: &Form) -> Result<enclave::audit::Filter, GatewayError> {
    let field = |name: &str| {
        q.get(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    // A date (UTC) or an RFC 3339 time; `until` a date means through that day.
    let time = |name: &str, day_after: bool| -> Result<Option<String>, GatewayError> {
        field(name)
            .map(|v| {
                chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| if day_after { d.succ_opt() } else { Some(d) })
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|t| t.and_utc())
                    .or_else(|| {
                        chrono::DateTime::parse_from_rfc3339(&v)
                            .ok()
                            .map(|t| t.with_timezone(&chrono::Utc))
                    })
                    // The stored form (microseconds, `Z`), so text order is time order.
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                    .ok_or_else(|| {
                        bad(&format!(
                            "{name} must be a date (YYYY-MM-DD) or an RFC 3339 time"
                        ))
                    })
            })
            .transpose()
    };
    Ok(enclave::audit::Filter {
        user: field("user"),
        dataset: field("dataset"),
        outcome: field("outcome"),
        since: time("since", false)?,
        until: time("until", true)?,
        before: field("before")
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| bad("before must be a record number"))
            })
            .transpose()?,
    })
}

/// Records per audit page.
const AUDIT_PAGE: usize = 100;

async fn audit(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    require_board(&ui, &signed, addr, "read the audit log").await?;
    let c = &signed.caller;
    let q = query_pairs(q);
    let filter = audit_filter(&q).map_err(|e| PageError::new(e, Some(c)))?;
    let records = ui
        .gateway
        .ledger()
        .search(&filter, AUDIT_PAGE)
        .map_err(|e| PageError::new(e.into(), Some(c)))?;
    Ok(html(pages::audit(c, &signed.csrf, &q, &records, None)))
}

async fn verify(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    require_board(&ui, &signed, addr, "verify the audit log").await?;
    checked_form(&ui, &signed, addr, &headers, body, "verify the audit log").await?;
    let c = signed.caller.clone();
    let gateway = Arc::clone(&ui.gateway);
    let outcome = blocking(&c, move || Ok(audit_verify(&gateway))).await?;
    let records = ui
        .gateway
        .ledger()
        .search(&enclave::audit::Filter::default(), AUDIT_PAGE)
        .map_err(|e| PageError::new(e.into(), Some(&c)))?;
    Ok(html(pages::audit(
        &c,
        &signed.csrf,
        &Form(Vec::new()),
        &records,
        Some(&outcome),
    )))
}
