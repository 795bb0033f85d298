//! The budget pages: a researcher's budgets with a chart of their spending over time (their own page,
//! or any researcher's for whoever administers the enclave), a dataset's budgets with every researcher's
//! spending on it (board), and the board's index of both. Spending is read from the audit log — the
//! record of every charge — so the chart is the ledger's own history, drawn on the server.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use enclave::audit::{Filter, Record, from_units};
use enclave::ledger::Budget;

use super::chart::{Series, spend_chart};
use super::{
    ClientAddr, PageError, PageResult, Ui, administers, blocking, html, pages, require_board,
    see_other, signed_in, to_sign_in,
};
use crate::http::path_text;
use crate::service::GatewayError;

/// Charges read for one chart at most (the newest; older ones are summed into the start).
const MAX_CHARGES: usize = 10_000;

fn internal(e: enclave::Error) -> GatewayError {
    GatewayError::from(e)
}

/// What a record charged, in the units its budget counts (ρ on zCDP datasets, else ε): answers and
/// refusals that were charged; a grant's record carries the amounts granted, not a charge.
fn charged(r: &Record) -> f64 {
    if r.outcome != "released" && r.outcome != "refused" {
        0.0
    } else if r.cost_rho > 0 {
        from_units(r.cost_rho)
    } else {
        from_units(r.cost_epsilon)
    }
}

fn seconds(at: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|d| d.timestamp())
}

/// One series per key (dataset or researcher): the cumulative charge after each record, oldest first,
/// starting from what was spent before the oldest record read (so a long history still ends at the
/// ledger's spent amount).
fn series_by(
    records: &[Record],
    budgets: &[Budget],
    key_of_record: impl Fn(&Record) -> String,
    key_of_budget: impl Fn(&Budget) -> String,
) -> Vec<Series> {
    let mut charges: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for r in records.iter().rev() {
        let cost = charged(r);
        if cost > 0.0
            && let Some(t) = seconds(&r.at)
        {
            charges.entry(key_of_record(r)).or_default().push((t, cost));
        }
    }
    let mut keys: Vec<String> = budgets.iter().map(&key_of_budget).collect();
    keys.extend(charges.keys().cloned());
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|key| {
            let budget = budgets.iter().find(|b| key_of_budget(b) == key);
            let (granted, spent) = budget.map_or((None, None), |b| match b.rho {
                Some(r) => (Some(r), Some(b.spent_rho)),
                None => (Some(b.epsilon), Some(b.spent_epsilon)),
            });
            let list = charges.remove(&key).unwrap_or_default();
            let read: f64 = list.iter().map(|c| c.1).sum();
            let mut total = spent.map_or(0.0, |s| (s - read).max(0.0));
            let points = list
                .into_iter()
                .map(|(t, c)| {
                    total += c;
                    (t, total)
                })
                .collect();
            Series {
                label: key,
                points,
                granted,
            }
        })
        .collect()
}

fn unit(budgets: &[Budget]) -> &'static str {
    match (
        budgets.iter().any(|b| b.rho.is_some()),
        budgets.iter().any(|b| b.rho.is_none()),
    ) {
        (true, false) => "ρ",
        (true, true) => "ε (ρ on zCDP datasets)",
        _ => "ε",
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The board's index of researchers and datasets with budgets; a researcher goes to their own page.
pub(super) async fn index(State(ui): State<Ui>, headers: HeaderMap) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    if !administers(&ui, &signed.caller) {
        return Ok(see_other(&format!(
            "/ui/budgets/researchers/{}",
            pages::urlencode(&signed.caller.user)
        )));
    }
    let gateway = Arc::clone(&ui.gateway);
    let all = blocking(&signed.caller, move || {
        gateway.ledger().budgets(None).map_err(internal)
    })
    .await?;
    Ok(html(pages::budgets_index(
        &signed.caller,
        &signed.csrf,
        &all,
    )))
}

/// A researcher's budgets and spending: their own, or anyone's for the board (403, recorded, else).
pub(super) async fn researcher(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    user: Result<Path<String>, PathRejection>,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    let err = |e| PageError::new(e, Some(&signed.caller));
    let user = path_text(user).map_err(err)?;
    if user != signed.caller.user {
        require_board(&ui, &signed, addr, "see another researcher's budgets").await?;
    }
    // Up to MAX_CHARGES records: read on the blocking pool.
    let (gateway, who) = (Arc::clone(&ui.gateway), user.clone());
    let (budgets, records) = blocking(&signed.caller, move || {
        let ledger = gateway.ledger();
        let budgets = ledger.budgets(Some(&who)).map_err(internal)?;
        let filter = Filter {
            user: Some(who),
            ..Filter::default()
        };
        let records = ledger.search(&filter, MAX_CHARGES).map_err(internal)?;
        Ok((budgets, records))
    })
    .await?;
    let series = series_by(
        &records,
        &budgets,
        |r| r.draft.dataset.clone(),
        |b| b.dataset.clone(),
    );
    let chart = spend_chart(
        &format!("{user}'s spending"),
        unit(&budgets),
        &series,
        now(),
    );
    Ok(html(pages::budgets_of(
        &signed.caller,
        &signed.csrf,
        &user,
        &budgets,
        chart,
    )))
}

/// A dataset's budgets and every researcher's spending on it (board).
pub(super) async fn dataset(
    State(ui): State<Ui>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> PageResult {
    let Some(signed) = signed_in(&ui, &headers) else {
        return Ok(to_sign_in());
    };
    require_board(&ui, &signed, addr, "see a dataset's budgets").await?;
    let err = |e| PageError::new(e, Some(&signed.caller));
    let name = path_text(name).map_err(err)?;
    // Up to MAX_CHARGES records: read on the blocking pool.
    let (gateway, wanted) = (Arc::clone(&ui.gateway), name.clone());
    let (budgets, records) = blocking(&signed.caller, move || {
        let ledger = gateway.ledger();
        let budgets: Vec<Budget> = ledger
            .budgets(None)
            .map_err(internal)?
            .into_iter()
            .filter(|b| b.dataset == wanted)
            .collect();
        let filter = Filter {
            dataset: Some(wanted.clone()),
            ..Filter::default()
        };
        let records: Vec<Record> = ledger
            .search(&filter, MAX_CHARGES)
            .map_err(internal)?
            .into_iter()
            .filter(|r| r.draft.dataset == wanted)
            .collect();
        Ok((budgets, records))
    })
    .await?;
    let series = series_by(
        &records,
        &budgets,
        |r| r.draft.principal.clone(),
        |b| b.principal.clone(),
    );
    let chart = spend_chart(
        &format!("Spending on {name}"),
        unit(&budgets),
        &series,
        now(),
    );
    Ok(html(pages::budgets_on(
        &signed.caller,
        &signed.csrf,
        &name,
        &budgets,
        chart,
    )))
}
