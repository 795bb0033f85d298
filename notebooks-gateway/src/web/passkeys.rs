//! The web UI's passkey endpoints: the account page (a user's passkeys, register and remove) and the
//! JSON calls `/ui/static/passkey.js` makes for the two WebAuthn ceremonies. Registering needs the
//! session and its CSRF token (header `X-CSRF-Token`); a passkey sign-in needs the sign-in page's nonce
//! (header `X-Sign-In-Nonce`, matching its cookie), so another site cannot start or finish either.
//! Refusals are JSON (`{"error": {"rule", "message"}}`), for the script to show.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use enclave::audit::Via;
use serde::Deserialize;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::{
    ClientAddr, PageError, PageResult, Signed, Ui, blocking, checked_form, cookie, csrf_holds,
    html, pages, peer, same_secret, see_other, signed_in, to_sign_in, with_session,
};
use crate::http::AppError;
use crate::service::{GatewayError, Peer};

/// The script, compiled in.
pub(super) const SCRIPT: &str = include_str!("passkey.js");

type JsonResult = Result<Response, AppError>;

/// The audit context of a passkey step: the protocol and the address as counted for rate limits.
fn via(peer: &Peer) -> Via {
    Via {
        origin: peer.protocol.name().to_owned(),
        peer: peer.address_group(),
        ..Via::default()
    }
}

fn refused(rule: &str, message: &str) -> AppError {
    AppError(crate::service::refused(rule, message))
}

/// The signed-in caller of a JSON call, whose `X-CSRF-Token` header must be the session's (a call
/// without it is refused and recorded, like a form).
async fn signed_json(
    ui: &Ui,
    addr: ClientAddr,
    headers: &HeaderMap,
    what: &'static str,
) -> Result<Signed, AppError> {
    let signed = signed_in(ui, headers)
        .ok_or_else(|| AppError(GatewayError::Auth(crate::auth::AuthError::Session)))?;
    let given = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !csrf_holds(&signed.session, given) {
        let error = ui
            .gateway
            .refuse_off_thread(
                &signed.caller,
                &peer(addr),
                &format!("web call: {what}"),
                "csrf",
                "the request did not carry this session's CSRF token; reload the page",
            )
            .await;
        return Err(AppError(error));
    }
    Ok(signed)
}

/// A sign-in call's nonce header must match the sign-in page's cookie.
fn sign_in_nonce(ui: &Ui, headers: &HeaderMap) -> Result<(), AppError> {
    let nonce = cookie(headers, ui.signin_cookie()).unwrap_or("");
    let given = headers
        .get("x-sign-in-nonce")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if nonce.is_empty() || !same_secret(nonce, given) {
        return Err(refused(
            "csrf",
            "the sign-in page has expired or the request came from another site; load it again",
        ));
    }
    Ok(())
}

async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(GatewayError::Internal))
        .map_err(AppError)
}

fn json(value: &serde_json::Value) -> Response {
    axum::Json(value).into_response()
}

/// The account page: the caller's passkeys, with the forms to register and remove them.
pub(super) async fn account(State(ui): State<Ui>, headers: HeaderMap) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let gateway = Arc::clone(&ui.gateway);
    let user = signed.caller.user.clone();
    let keys = blocking(&signed.caller, move || {
        Ok(gateway.accounts().passkeys(&user)?)
    })
    .await?;
    Ok(html(pages::account(&signed.caller, &signed.csrf, &keys)))
}

pub(super) async fn remove(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    checked_form(&ui, &signed, addr, &headers, body, "remove a passkey").await?;
    let id = crate::http::path_text(id).map_err(|e| PageError::new(e, Some(&signed.caller)))?;
    let gateway = Arc::clone(&ui.gateway);
    let caller = signed.caller.clone();
    blocking(&signed.caller, move || {
        Ok(gateway
            .accounts()
            .remove_passkey(&caller, &id, &via(&peer(addr)))?)
    })
    .await?;
    Ok(see_other("/ui/account"))
}

/// Starts registering a passkey: `{"ceremony", "options"}` for `navigator.credentials.create`.
pub(super) async fn register_start(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
) -> JsonResult {
    let signed = signed_json(&ui, addr, &headers, "start a passkey registration").await?;
    let gateway = Arc::clone(&ui.gateway);
    let (ceremony, options) = off_thread(move || {
        Ok(gateway
            .accounts()
            .start_passkey_registration(&signed.caller)?)
    })
    .await?;
    Ok(json(
        &serde_json::json!({"ceremony": ceremony, "options": options}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterFinish {
    ceremony: String,
    label: String,
    /// The current TOTP code (a step-up: a session alone cannot add a passkey).
    totp: String,
    credential: RegisterPublicKeyCredential,
}

/// Finishes a registration with the authenticator's answer: `{"id", "label", …}`.
pub(super) async fn register_finish(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> JsonResult {
    let signed = signed_json(&ui, addr, &headers, "finish a passkey registration").await?;
    let finish: RegisterFinish = crate::http::json_body(&ui.gateway, &headers, body).await?;
    let gateway = Arc::clone(&ui.gateway);
    let info = off_thread(move || {
        Ok(gateway.accounts().finish_passkey_registration(
            &signed.caller,
            &finish.ceremony,
            &finish.label,
            &finish.totp,
            &finish.credential,
            &via(&peer(addr)),
        )?)
    })
    .await?;
    Ok(json(
        &serde_json::to_value(info).map_err(|_| AppError(GatewayError::Internal))?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInStart {
    user: String,
}

/// Starts a passkey sign-in for a name: `{"ceremony", "options"}` for `navigator.credentials.get`.
pub(super) async fn sign_in_start(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> JsonResult {
    sign_in_nonce(&ui, &headers)?;
    let start: SignInStart = crate::http::json_body(&ui.gateway, &headers, body).await?;
    let gateway = Arc::clone(&ui.gateway);
    let (ceremony, options) = off_thread(move || {
        Ok(gateway
            .accounts()
            .start_passkey_sign_in(start.user.trim(), &peer(addr).address_group())?)
    })
    .await?;
    Ok(json(
        &serde_json::json!({"ceremony": ceremony, "options": options}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInFinish {
    ceremony: String,
    credential: PublicKeyCredential,
}

/// Finishes a passkey sign-in: the session cookie is set and `{"redirect": "/ui/"}` returned.
pub(super) async fn sign_in_finish(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> JsonResult {
    sign_in_nonce(&ui, &headers)?;
    let finish: SignInFinish = crate::http::json_body(&ui.gateway, &headers, body).await?;
    let gateway = Arc::clone(&ui.gateway);
    let session = off_thread(move || {
        let p = peer(addr);
        Ok(gateway.accounts().finish_passkey_sign_in(
            &finish.ceremony,
            &finish.credential,
            &p.address_group(),
            p.protocol.name(),
            std::time::SystemTime::now(),
        )?)
    })
    .await?;
    Ok(with_session(
        &ui,
        json(&serde_json::json!({"redirect": "/ui/"})),
        &session.session,
    ))
}

pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}
