//! User management for whoever administers the enclave (Cedar's `administer` on the platform): the
//! account list with each account's passkeys, adding an account, disabling one, and resetting an
//! account's factors (new token and TOTP secret, passkeys removed, sessions ended). New secrets are shown
//! once, on the answer to the form that made them (served `no-store`), and never stored in clear. Every
//! change is an audit record naming the board member's session and address.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;

use super::{
    ClientAddr, PageError, PageResult, Ui, bad, blocking, board_form, html, pages, peer,
    require_board, see_other, signed_in, to_sign_in,
};
use crate::auth::Role;
use crate::http::path_text;
use crate::service::Gateway;

/// Runs an account change as `signed`'s board member, off the async workers, recorded through their
/// session and address.
async fn as_member<T: Send + 'static>(
    ui: &Ui,
    signed: &super::Signed,
    addr: ClientAddr,
    change: impl FnOnce(
        &crate::auth::Accounts,
        &crate::auth::Caller,
        &enclave::audit::Via,
    ) -> Result<T, crate::auth::AuthError>
    + Send
    + 'static,
) -> Result<T, PageError> {
    let gateway = Arc::clone(&ui.gateway);
    let caller = signed.caller.clone();
    blocking(&signed.caller, move || {
        let via = Gateway::via(&caller, &peer(addr), String::new());
        Ok(change(gateway.accounts(), &caller, &via)?)
    })
    .await
}

/// The account list with the forms.
pub(super) async fn list(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    require_board(&ui, &signed, addr, "manage users").await?;
    let gateway = Arc::clone(&ui.gateway);
    let users = blocking(&signed.caller, move || {
        let accounts = gateway.accounts();
        let mut out = Vec::new();
        for u in accounts.list()? {
            let passkeys = accounts.passkeys(&u.user)?.len();
            out.push((u, passkeys));
        }
        Ok(out)
    })
    .await?;
    Ok(html(pages::users(&signed.caller, &signed.csrf, &users)))
}

/// Adds an account; the answer shows its secrets once.
pub(super) async fn add(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let form = board_form(&ui, &signed, addr, &headers, body, "add a user").await?;
    let role = Role::parse(form.get("role").unwrap_or(""))
        .map_err(|e| PageError::new(e.into(), Some(&signed.caller)))?;
    let name = form.text("user").trim().to_owned();
    let new = as_member(&ui, &signed, addr, move |accounts, caller, via| {
        accounts.add_via(&caller.user, &name, role, via)
    })
    .await?;
    Ok(html(pages::new_secrets(
        &signed.caller,
        &signed.csrf,
        &new,
        "added",
    )))
}

/// Disables an account (its sessions end).
pub(super) async fn disable(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    board_form(&ui, &signed, addr, &headers, body, "disable a user").await?;
    let name = path_text(name).map_err(|e| PageError::new(e, Some(&signed.caller)))?;
    if name == signed.caller.user {
        return Err(PageError::new(
            bad("you cannot disable your own account here (another board member can)"),
            Some(&signed.caller),
        ));
    }
    as_member(&ui, &signed, addr, move |accounts, _, via| {
        accounts.disable_via(&name, via)
    })
    .await?;
    Ok(see_other("/ui/users"))
}

/// Resets an account's factors; the answer shows the new secrets once.
pub(super) async fn reset(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    board_form(&ui, &signed, addr, &headers, body, "reset a user's factors").await?;
    let name = path_text(name).map_err(|e| PageError::new(e, Some(&signed.caller)))?;
    let new = as_member(&ui, &signed, addr, move |accounts, caller, via| {
        accounts.reset_factors(&caller.user, &name, via)
    })
    .await?;
    Ok(html(pages::new_secrets(
        &signed.caller,
        &signed.csrf,
        &new,
        "reset",
    )))
}
