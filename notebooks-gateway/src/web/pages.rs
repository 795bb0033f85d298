//! The UI's pages as maud templates: every interpolated value is escaped; forms carry the session's
//! CSRF token; nothing here reads data or decides access (the handlers in `web` do).
//!
//! What a researcher sees of a dataset is metadata only: no person or row count, no exact coverage; the
//! board's view of a card adds the exact ingest report.

use axum::http::StatusCode;
use catalog::VersionEntry;
use enclave::access::{Grant, Request};
use enclave::audit::Record;
use enclave::ledger::Budget;
use maud::{DOCTYPE, Markup, html};

use super::{Endpoints, Form};
use crate::auth::{Caller, PasskeyInfo};
use crate::service::{DatasetInfo, GatewayError};

/// The page frame: title, navigation for the signed-in caller, and the sign-out form.
fn layout(title: &str, who: Option<(&Caller, &str)>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · RWD enclave" }
                link rel="stylesheet" href="/ui/static/app.css";
                link rel="icon" href="/ui/static/icon.svg" type="image/svg+xml";
            }
            body {
                header {
                    a.brand href="/ui/" { "RWD enclave" }
                    @if let Some((caller, csrf)) = who {
                        nav {
                            a href="/ui/" { "Home" }
                            a href="/ui/datasets" { "Datasets" }
                            a href="/ui/requests" { "Access requests" }
                            a href="/ui/grants" { "Grants" }
                            a href="/ui/budgets" { "Budgets" }
                            @if caller.role.name() == "board" {
                                a href="/ui/audit" { "Audit log" }
                                a href="/ui/users" { "Users" }
                            }
                            a href="/ui/account" { "Account" }
                        }
                        form.signout method="post" action="/ui/sign-out" {
                            input type="hidden" name="csrf" value=(csrf);
                            span.who { (caller.user) " (" (caller.role.name()) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

fn rule_of(e: &GatewayError) -> String {
    e.rule().to_owned()
}

/// The receipt of a recorded refusal: the record's number and chain hash (nothing where none was kept).
fn receipt_of(e: &GatewayError) -> Markup {
    html! {
        @if let Some(r) = e.receipt() {
            p.receipt {
                "Audit receipt: record " (r.seq) ". Keep it to check later that this is on the record ("
                code { "enclave audit verify --receipt FILE" } "): "
                code.receipt-json { (serde_json::to_string(r).unwrap_or_default()) }
            }
        }
    }
}

/// A refusal or failure as a page (the message names the rule; nothing internal).
pub(super) fn error_page(status: StatusCode, e: &GatewayError) -> Markup {
    let body = html! {
        p.error role="alert" {
            strong { "Refused (rule " code { (rule_of(e)) } "): " }
            (e.message())
        }
        (receipt_of(e))
        p { a href="/ui/" { "Back to the start page" } }
    };
    // No navigation: the error page has no CSRF token for the sign-out form; it links back.
    layout(status.canonical_reason().unwrap_or("Error"), None, body)
}

/// The sign-in form (two factors), with the refusal of a previous try.
pub(super) fn sign_in(nonce: &str, error: Option<&GatewayError>) -> Markup {
    let body = html! {
        @if let Some(e) = error {
            p.error role="alert" { strong { "Sign-in refused (rule " code { (rule_of(e)) } "): " } (e.message()) }
            (receipt_of(e))
        }
        form.card method="post" action="/ui/sign-in" {
            input type="hidden" name="nonce" value=(nonce);
            label { "User name" input type="text" name="user" autocomplete="username" required; }
            label { "API token" input type="password" name="token" autocomplete="current-password" required; }
            label { "Authenticator code (TOTP)"
                input type="text" name="totp" inputmode="numeric" pattern="[0-9]{6}" autocomplete="one-time-code" required;
            }
            button type="submit" { "Sign in" }
        }
        p.hint { "Two factors: the API token you were given and the current code of your authenticator app." }
        // Shown by the script where the browser offers passkeys (hidden without JavaScript).
        section.card #passkey-sign-in data-nonce=(nonce) hidden {
            h2 { "Sign in with a passkey" }
            label { "User name" input type="text" name="user" autocomplete="username webauthn"; }
            button type="button" { "Sign in with a passkey" }
            p data-status role="status" {}
            p.hint { "A passkey you registered is both factors: the device holding it and its fingerprint, face or PIN check." }
        }
        script src="/ui/static/passkey.js" defer {}
    };
    layout("Sign in", None, body)
}

/// The account page: the caller's passkeys, the form to remove each, and registration.
pub(super) fn account(caller: &Caller, csrf: &str, keys: &[PasskeyInfo]) -> Markup {
    let body = html! {
        h2 { "Passkeys" }
        @if keys.is_empty() {
            p { "No passkey yet. Register one to sign in with your device's fingerprint, face or PIN instead of the token and code." }
        } @else {
            table {
                thead { tr { th { "Label" } th { "Registered" } th { "Last used" } th {} } }
                tbody {
                    @for k in keys {
                        tr {
                            td { (k.label) }
                            td { (k.created_at) }
                            td { (k.last_used_at.as_deref().unwrap_or("never")) }
                            td {
                                form.inline method="post" action={ "/ui/account/passkeys/" (k.id) "/remove" } {
                                    (csrf_field(csrf))
                                    button type="submit" { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
        }
        section.card #passkey-register data-csrf=(csrf) hidden {
            h3 { "Register a passkey" }
            label { "Label (e.g. the device)" input type="text" name="label" maxlength="64" value="my device"; }
            label { "Your current authenticator code (TOTP), to confirm it is you"
                input type="text" name="totp" inputmode="numeric" pattern="[0-9]{6}" autocomplete="one-time-code";
            }
            button type="button" { "Register a passkey" }
            p data-status role="status" {}
        }
        noscript { p.hint { "Registering a passkey needs JavaScript; every other page works without it." } }
        script src="/ui/static/passkey.js" defer {}
        p.hint { "Token and authenticator code keep working as the fallback." }
    };
    layout("Your account", Some((caller, csrf)), body)
}

/// What the start page shows.
pub(super) struct Home<'a> {
    pub(super) budgets: Vec<Budget>,
    pub(super) grants: Vec<Grant>,
    pub(super) datasets: Vec<DatasetInfo>,
    pub(super) requests: Vec<Request>,
    pub(super) history: Vec<Record>,
    pub(super) board: bool,
    pub(super) endpoints: &'a Endpoints,
    pub(super) host: &'a str,
}

fn host_only(host: &str) -> &str {
    // `host:port` or `[v6]:port` → the host part.
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("localhost");
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The start page: a researcher's grants, budgets, datasets, connection snippets and own history; a board
/// member's pending queue.
pub(super) fn home(caller: &Caller, csrf: &str, v: &Home<'_>) -> Markup {
    let host = host_only(v.host);
    let pending = v.requests.iter().filter(|r| r.status == "pending").count();
    let body = html! {
        @if v.board {
            section {
                h2 { "Board" }
                p { (pending) " access request(s) waiting: " a href="/ui/requests" { "review the queue" } "." }
                p { a href="/ui/audit" { "Audit log and chain verification" } }
            }
        }
        section {
            h2 { "Your budgets" }
            @if v.budgets.is_empty() {
                p { "No budget yet. " a href="/ui/requests" { "Request access" } " to a dataset." }
            } @else {
                table {
                    thead { tr { th { "Dataset" } th { "ε granted" } th { "ε spent" } th { "ε left" } th { "Ends" } } }
                    tbody {
                        @for b in &v.budgets {
                            tr {
                                td { (b.dataset) }
                                td.num { (b.epsilon) }
                                td.num { (format!("{:.4}", b.spent_epsilon)) }
                                td.num { (format!("{:.4}", b.epsilon_left())) }
                                td { (b.expires_at.as_deref().unwrap_or("never")) }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Your grants" }
            (grant_table(&v.grants.iter().filter(|g| g.researcher == caller.user).cloned().collect::<Vec<_>>(), false, csrf))
        }
        section {
            h2 { "Datasets you may query now" }
            @if v.datasets.is_empty() {
                p { "None at the moment." }
            } @else {
                ul { @for d in &v.datasets { li { a href=(format!("/ui/datasets/{}", urlencode(&d.name))) { (d.name) } " (version " (d.version) ")" } } }
            }
        }
        section {
            h2 { "Connect" }
            p { "Sign in with your user name and, as the password, your API token, a colon and the current TOTP code." }
            @if let Some(f) = v.endpoints.flight {
                h3 { "Python: ADBC Flight SQL and pandas" }
                pre { code { (format!(
"import adbc_driver_flightsql.dbapi as flight_sql
conn = flight_sql.connect(\"{}://{host}:{}\",
    db_kwargs={{\"username\": \"{}\", \"password\": TOKEN + \":\" + TOTP_CODE}})
cur = conn.cursor()
cur.execute('SELECT COUNT(*) AS n FROM \"DATASET\".patients')
print(cur.fetch_arrow_table().to_pandas())",
                    if v.endpoints.tls { "grpc+tls" } else { "grpc" }, f.port(), caller.user)) } }
            }
            @if let Some(p) = v.endpoints.pg {
                h3 { "psql" }
                pre { code { (format!("psql \"host={host} port={} user={} dbname=DATASET{}\"\n# password: TOKEN:TOTP_CODE",
                    p.port(), caller.user, if v.endpoints.tls { " sslmode=verify-full" } else { "" })) } }
            }
            @if let Some(h) = v.endpoints.http {
                h3 { "HTTP (curl)" }
                pre { code { (format!(
"BASE={}://{host}:{}
SESSION=$(curl -s $BASE/api/v1/session -H 'Content-Type: application/json' \\
  -d '{{\"user\":\"{}\",\"token\":\"'$TOKEN'\",\"totp\":\"'$TOTP_CODE'\"}}' | jq -r .session)
curl -s $BASE/api/v1/query -H \"Authorization: Bearer $SESSION\" -H 'Content-Type: application/json' \\
    -d '{{\"dataset\":\"DATASET\",\"sql\":\"SELECT COUNT(*) AS n FROM patients\",\"epsilon\":0.1}}'",
                    if v.endpoints.tls { "https" } else { "http" }, h.port(), caller.user)) } }
            }
        }
        section {
            h2 { "Your latest activity" }
            (record_table(&v.history))
        }
    };
    layout(
        &format!("Welcome, {}", caller.user),
        Some((caller, csrf)),
        body,
    )
}

/// A path segment, percent-encoded (a space as `%20`: in a path, `+` is a plus).
pub(super) fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The dataset list with its search box.
pub(super) fn datasets(caller: &Caller, csrf: &str, search: &str, list: &[VersionEntry]) -> Markup {
    let body = html! {
        form.search method="get" action="/ui/datasets" {
            label { "Search names, providers, legal bases, tables and columns"
                input type="search" name="q" value=(search);
            }
            button type="submit" { "Search" }
        }
        @if list.is_empty() {
            p { "No dataset matches." }
        } @else {
            table {
                thead { tr { th { "Dataset" } th { "Latest version" } th { "Provider" } th { "Legal basis" } th { "Tables" } } }
                tbody {
                    @for v in list {
                        tr {
                            td { a href=(format!("/ui/datasets/{}", urlencode(&v.version.dataset))) { (v.version.dataset) } }
                            td { (v.version.version) " (" (v.published_at) ")" }
                            td { (v.version.provenance.provider) }
                            td { (v.version.provenance.legal_basis) }
                            td { (v.version.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")) }
                        }
                    }
                }
            }
        }
    };
    layout("Datasets", Some((caller, csrf)), body)
}

/// A released figure: the value and its 95 % interval.
fn figure(f: &enclave::card::Figure) -> Markup {
    html! {
        (format!("{:.0}", f.value))
        span.hint { (format!(" (95 % interval {:.0}–{:.0}; noise scale {:.1})", f.low, f.high, f.scale)) }
    }
}

/// The card figures released through the DP engine, shown to everyone; the board's form to release them.
fn released(
    name: &str,
    csrf: &str,
    release: Option<&(catalog::CardRelease, enclave::card::CardFigures)>,
    board: bool,
) -> Markup {
    html! {
        section.card {
            h2 { "Population and coverage (DP-released)" }
            @if let Some((r, f)) = release {
                p.hint { "Released through the DP engine under the catalog budget (ε " (f.epsilon) " over " (f.queries) " queries) by " (r.released_by) " at " (r.released_at) " for version " (r.version) ". Each figure is noisy; none is computed exactly from rows." }
                dl {
                    @if let Some(p) = &f.persons { dt { "Persons" } dd { (figure(p)) } }
                    @if let Some(all) = &f.records { dt { "Records" } dd { (figure(all)) } }
                    @if let Some(c) = &f.coverage { dt { "Event years" } dd { (c.first_year) " … " (c.last_year) span.hint { " (" (c.table) "." (c.column) ")" } } }
                    @for (table, fig) in &f.rows { dt { "Rows in " (table) } dd { (figure(fig)) } }
                }
                @for h in &f.histograms {
                    h3 { (h.table) "." (h.column) }
                    table {
                        thead { tr { th { "Value" } th { "Count (DP)" } } }
                        tbody { @for (value, fig) in &h.bins { tr { td { (value) } td.num { (figure(fig)) } } } }
                    }
                }
                @for s in &f.skipped { p.hint { "Not released: " (s) } }
            } @else {
                p { "Not released yet for the latest version." }
                @if board {
                    form.inline method="post" action=(format!("/ui/datasets/{}/release", urlencode(name))) {
                        (csrf_field(csrf))
                        label { "Catalog budget ε" input type="number" name="epsilon" step="any" min="0" max="10" value="1"; }
                        button type="submit" { "Release card figures" }
                    }
                    p.hint { "Once per version: persons, rows per table, event years and histograms of categorical columns, each a DP query charged to the catalog budget and audited." }
                }
            }
        }
    }
}

/// A dataset's card: its latest version's metadata, every version, the DP-released figures, and for the
/// board the exact report.
pub(super) fn dataset(
    caller: &Caller,
    csrf: &str,
    versions: &[VersionEntry],
    board: bool,
    release: Option<&(catalog::CardRelease, enclave::card::CardFigures)>,
) -> Markup {
    let Some(latest) = versions.last() else {
        return layout(
            "Dataset",
            Some((caller, csrf)),
            html! { p { "No version." } },
        );
    };
    let v = &latest.version;
    let p = &v.provenance;
    let body = html! {
        section.card {
            h2 { "Provenance" }
            dl {
                dt { "Provider" } dd { (p.provider) }
                dt { "Source system" } dd { (p.source_system) }
                dt { "Extracted" } dd { (p.extracted_at) }
                dt { "Legal basis" } dd { (p.legal_basis) }
                dt { "Consent scope" } dd { (p.consent_scope) }
                dt { "De-identification profile" } dd { (p.profile) }
                dt { "Privacy accounting" } dd { (if v.accounting == "zcdp" { "zCDP (ρ), shown with its (ε, δ) equivalent" } else { "(ε, δ), basic composition" }) }
                dt { "Rows per person in a query" } dd { "at most " (v.max_contributions) " unless a table declares its own bound" }
            }
            @if board {
                h3 { "Population and coverage (exact, board only)" }
                dl {
                    dt { "Persons" } dd { (v.coverage.persons) }
                    dt { "Events from" } dd { (v.coverage.time_start.as_deref().unwrap_or("—")) }
                    dt { "Events to" } dd { (v.coverage.time_end.as_deref().unwrap_or("—")) }
                }
            } @else {
                p.hint { "Person and row counts and the time coverage are not shown exactly to researchers: they are released only through the DP engine." }
            }
        }
        (released(&v.dataset, csrf, release, board))
        section {
            h2 { "Tables and columns" }
            @for t in &v.tables {
                h3 { (t.name) }
                p.hint {
                    @match t.max_rows_per_person {
                        Some(n) => { "Each person contributes at most " (n) " row(s) of this table to a query" @if t.chosen.is_some() { " (bound chosen under DP)" } "." }
                        None => { "Bounded by the version's rows per person." }
                    }
                    @if board { " Rows written: " (t.rows) "." }
                }
                table {
                    thead { tr { th { "Column" } th { "Type" } th { "Role" } th { "De-identification" } th { "DP bounds" } th { "Public domain" } } }
                    tbody {
                        @for c in &t.columns {
                            tr {
                                td { code { (c.name) } }
                                td { (c.data_type) }
                                td { (c.role) }
                                // What applying the action gave (persons recoded, values withheld) is exact: the board's only.
                                td { (if board { c.action.as_str() } else { c.action_rule() }) }
                                td { @match (c.lower, c.upper) { (Some(l), Some(u)) => { (l) " … " (u) } _ => { "—" } } }
                                td { @match &c.domain { Some(d) => { (d.len()) " keys: " (d.iter().take(12).cloned().collect::<Vec<_>>().join(", ")) @if d.len() > 12 { ", …" } } None => { "—" } } }
                            }
                        }
                    }
                }
            }
        }
        @if board {
            section {
                h2 { "Ingest report (exact, board only)" }
                pre.report { (serde_json::to_string_pretty(&v.report).unwrap_or_default()) }
            }
        }
        section {
            h2 { "Versions" }
            ul { @for e in versions.iter().rev() { li { (e.version.version) ", published " (e.published_at) ", profile " (e.version.provenance.profile) } } }
        }
        p { a href="/ui/requests" { "Request access to this dataset" } }
    };
    layout(
        &format!("Dataset {}", v.dataset),
        Some((caller, csrf)),
        body,
    )
}

fn request_rows(list: &[Request], board: bool, me: &str, csrf: &str) -> Markup {
    html! {
        table {
            thead { tr { th { "#" } th { "Researcher" } th { "Project and purpose" } th { "Datasets" } th { "Asked" } th { "Status" } @if board { th { "Decide" } } } }
            tbody {
                @for r in list {
                    tr {
                        td { (r.id) }
                        td { (r.researcher) }
                        td { strong { (r.project) } br; span.purpose { (r.purpose) } }
                        td { (r.datasets.join(", ")) }
                        td { "ε " (r.epsilon) ", " (r.days) " days" }
                        td {
                            (r.status)
                            @if r.status == "pending" { " (" (r.approvals.len()) " of " (r.approvals_required) " approvals)" }
                            @for a in &r.approvals { br; "approved by " (a.member) ": ε " (a.epsilon) ", " (a.days) " days" }
                            @if let Some(reason) = &r.reason { br; "reason: " (reason) }
                            @if let Some(g) = r.grant_id { br; "grant " (g) }
                        }
                        @if board {
                            td {
                                @if r.status == "pending" && r.researcher != me && !r.approvals.iter().any(|a| a.member == me) {
                                    form.inline method="post" action=(format!("/ui/requests/{}/approve", r.id)) {
                                        (csrf_field(csrf))
                                        label { "ε" input type="number" name="epsilon" step="any" min="0" max=(r.epsilon) value=(r.epsilon); }
                                        label { "days" input type="number" name="days" min="1" max=(r.days) value=(r.days); }
                                        button type="submit" { "Approve" }
                                    }
                                    form.inline method="post" action=(format!("/ui/requests/{}/reject", r.id)) {
                                        (csrf_field(csrf))
                                        label { "reason" input type="text" name="reason" required; }
                                        button type="submit" { "Reject" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The most recent decided requests the requests page lists.
const DECIDED_SHOWN: usize = 100;

/// Access requests: the researcher's form and their requests; the board's queue.
pub(super) fn requests(
    caller: &Caller,
    csrf: &str,
    list: &[Request],
    datasets: &[VersionEntry],
    board: bool,
) -> Markup {
    let (pending, mut decided): (Vec<Request>, Vec<Request>) =
        list.iter().cloned().partition(|r| r.status == "pending");
    let older = decided.len().saturating_sub(DECIDED_SHOWN);
    decided.truncate(DECIDED_SHOWN);
    let body = html! {
        @if !board {
            section.card {
                h2 { "New request" }
                form method="post" action="/ui/requests" {
                    (csrf_field(csrf))
                    label { "Project" input type="text" name="project" maxlength=(enclave::access::MAX_PROJECT) required; }
                    label { "Purpose" textarea name="purpose" rows="4" maxlength=(enclave::access::MAX_TEXT) required {} }
                    fieldset {
                        legend { "Datasets" }
                        @for d in datasets {
                            label.check { input type="checkbox" name="datasets" value=(d.version.dataset); " " (d.version.dataset) }
                        }
                    }
                    label { "ε per dataset" input type="number" name="epsilon" step="any" min="0" value="1"; }
                    label { "Days" input type="number" name="days" min="1" max=(enclave::access::MAX_DAYS) value="90"; }
                    button type="submit" { "Submit request" }
                }
            }
        }
        section {
            h2 { @if board { "Waiting for a decision" } @else { "Your pending requests" } }
            @if pending.is_empty() { p { "None." } } @else { (request_rows(&pending, board, &caller.user, csrf)) }
        }
        section {
            h2 { "Decided" }
            @if decided.is_empty() { p { "None." } } @else { (request_rows(&decided, false, &caller.user, csrf)) }
            @if older > 0 { p.hint { (older) " older decided request(s) are not shown (the audit log has every step)." } }
        }
    };
    layout("Access requests", Some((caller, csrf)), body)
}

fn grant_table(list: &[Grant], board: bool, csrf: &str) -> Markup {
    html! {
        @if list.is_empty() {
            p { "No grants." }
        } @else {
            table {
                thead { tr { th { "#" } th { "Researcher" } th { "Project" } th { "Datasets" } th { "ε per dataset" } th { "Ends" } th { "Status" } @if board { th { "Revoke" } } } }
                tbody {
                    @for g in list {
                        tr {
                            td { (g.id) }
                            td { (g.researcher) }
                            td { (g.project) }
                            td { (g.datasets.join(", ")) }
                            td.num { (g.epsilon) }
                            td { (g.expires_at) }
                            td {
                                (g.status) " (approved by " (g.approved_by.join(", ")) ")"
                                @if let (Some(by), Some(reason)) = (&g.revoked_by, &g.reason) { br; "revoked by " (by) ": " (reason) }
                            }
                            @if board {
                                td {
                                    @if g.revoked_at.is_none() {
                                        form.inline method="post" action=(format!("/ui/grants/{}/revoke", g.id)) {
                                            (csrf_field(csrf))
                                            label { "reason" input type="text" name="reason" required; }
                                            button type="submit" { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Grants, with the board's revoke forms.
pub(super) fn grants(caller: &Caller, csrf: &str, list: &[Grant], board: bool) -> Markup {
    layout(
        "Grants",
        Some((caller, csrf)),
        grant_table(list, board, csrf),
    )
}

fn record_table(records: &[Record]) -> Markup {
    html! {
        @if records.is_empty() {
            p { "No records." }
        } @else {
            table.audit {
                thead { tr { th { "#" } th { "When (UTC)" } th { "Who" } th { "Via" } th { "Dataset" } th { "What" } th { "Cost (ε)" } th { "Outcome" } } }
                tbody {
                    @for r in records {
                        tr {
                            td { (r.seq) }
                            td { (r.at) }
                            td { (r.draft.principal) }
                            td { (r.draft.via.origin) @if !r.draft.via.peer.is_empty() { br; small { (r.draft.via.peer) } } }
                            td { (r.draft.dataset) }
                            td { code { (r.draft.sql) } @if !r.draft.via.decision.is_empty() { br; small { (r.draft.via.decision) } } }
                            td.num { (enclave::audit::from_units(r.cost_epsilon)) }
                            td { (r.outcome) @if !r.rule.is_empty() { br; small { (r.rule) } } }
                        }
                    }
                }
            }
        }
    }
}

fn budget_rows(list: &[Budget], by_dataset: bool) -> Markup {
    html! {
        table {
            thead { tr {
                th { (if by_dataset { "Dataset" } else { "Researcher" }) }
                th { "Granted" } th { "Spent" } th { "Left" } th { "Ends" }
            } }
            tbody {
                @for b in list {
                    @let (granted, spent, unit) = match b.rho { Some(r) => (r, b.spent_rho, "ρ"), None => (b.epsilon, b.spent_epsilon, "ε") };
                    tr {
                        td {
                            @if by_dataset {
                                a href=(format!("/ui/budgets/datasets/{}", urlencode(&b.dataset))) { (b.dataset) }
                            } @else {
                                a href=(format!("/ui/budgets/researchers/{}", urlencode(&b.principal))) { (b.principal) }
                            }
                        }
                        td.num { (unit) " " (format!("{granted:.4}")) }
                        td.num { (format!("{spent:.4}")) }
                        td.num { (format!("{:.4}", (granted - spent).max(0.0))) }
                        td { (b.expires_at.as_deref().unwrap_or("—")) }
                    }
                }
            }
        }
    }
}

/// The board's index of budgets: by researcher and by dataset.
pub(super) fn budgets_index(caller: &Caller, csrf: &str, all: &[Budget]) -> Markup {
    let mut researchers: Vec<&str> = all.iter().map(|b| b.principal.as_str()).collect();
    researchers.sort_unstable();
    researchers.dedup();
    let mut datasets: Vec<&str> = all.iter().map(|b| b.dataset.as_str()).collect();
    datasets.sort_unstable();
    datasets.dedup();
    let body = html! {
        @if all.is_empty() { p { "No budget granted yet." } }
        h2 { "By researcher" }
        ul { @for r in &researchers { li { a href=(format!("/ui/budgets/researchers/{}", urlencode(r))) { (r) } } } }
        h2 { "By dataset" }
        ul { @for d in &datasets { li { a href=(format!("/ui/budgets/datasets/{}", urlencode(d))) { (d) } } } }
    };
    layout("Budgets", Some((caller, csrf)), body)
}

/// A researcher's budgets and their spending over time.
pub(super) fn budgets_of(
    caller: &Caller,
    csrf: &str,
    user: &str,
    budgets: &[Budget],
    chart: Markup,
) -> Markup {
    let body = html! {
        @if budgets.is_empty() { p { "No budget granted to " (user) " yet." } } @else { (budget_rows(budgets, true)) }
        h2 { "Spending over time" }
        (chart)
        p.hint { "Each step is a charged query or card release, from the audit log; dashed lines are the totals granted." }
    };
    layout(&format!("Budgets of {user}"), Some((caller, csrf)), body)
}

/// A dataset's budgets and every researcher's spending on it.
pub(super) fn budgets_on(
    caller: &Caller,
    csrf: &str,
    dataset: &str,
    budgets: &[Budget],
    chart: Markup,
) -> Markup {
    let body = html! {
        @if budgets.is_empty() { p { "No budget on " (dataset) " yet." } } @else { (budget_rows(budgets, false)) }
        h2 { "Spending over time" }
        (chart)
        p.hint { "Each step is a charged query, from the audit log; dashed lines are the totals granted." }
    };
    layout(&format!("Budgets on {dataset}"), Some((caller, csrf)), body)
}

/// The board's account list: role, state, passkeys, and the add, disable and reset forms.
pub(super) fn users(
    caller: &Caller,
    csrf: &str,
    users: &[(crate::auth::UserInfo, usize)],
) -> Markup {
    let body = html! {
        table {
            thead { tr { th { "User" } th { "Role" } th { "State" } th { "Passkeys" } th { "Created" } th {} } }
            tbody {
                @for (u, passkeys) in users {
                    tr {
                        td { (u.user) }
                        td { (u.role) }
                        td { (if u.disabled { "disabled" } else { "enabled" }) }
                        td.num { (passkeys) }
                        td { (u.created_at) " by " (u.created_by) }
                        td {
                            form.inline method="post" action=(format!("/ui/users/{}/reset", urlencode(&u.user))) {
                                (csrf_field(csrf))
                                button type="submit" { "Reset factors" }
                            }
                            @if !u.disabled && u.user != caller.user {
                                form.inline method="post" action=(format!("/ui/users/{}/disable", urlencode(&u.user))) {
                                    (csrf_field(csrf))
                                    button type="submit" { "Disable" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Add a user" }
        form.card method="post" action="/ui/users" {
            (csrf_field(csrf))
            label { "User name (a-z, 0-9, '.', '_', '-')" input type="text" name="user" maxlength="64" required; }
            label { "Role"
                select name="role" {
                    option value="researcher" { "researcher" }
                    option value="board" { "board" }
                    option value="provider" { "provider" }
                }
            }
            button type="submit" { "Add" }
        }
        p.hint { "A new account's API token and TOTP secret are shown once, on the next page; the enclave keeps only a salted hash of the token and the secret sealed under its key. Resetting factors issues new ones, removes the account's passkeys and ends its sessions." }
    };
    layout("Users", Some((caller, csrf)), body)
}

/// New secrets of an account, shown once.
pub(super) fn new_secrets(
    caller: &Caller,
    csrf: &str,
    new: &crate::auth::NewUser,
    what: &str,
) -> Markup {
    let body = html! {
        p.ok role="status" { "Account " (new.user) " (" (new.role.name()) ") " (what) ". Hand these over in person or through a secure channel: they are not shown again." }
        dl {
            dt { "API token" } dd { code { (new.token) } }
            dt { "TOTP secret (base32)" } dd { code { (new.totp_secret) } }
            dt { "Authenticator URI" } dd { code { (new.otpauth_uri) } }
        }
        p { a href="/ui/users" { "Back to users" } }
    };
    layout("New factors", Some((caller, csrf)), body)
}

/// The audit log viewer with its filters and the verify button (and its result).
pub(super) fn audit(
    caller: &Caller,
    csrf: &str,
    q: &Form,
    records: &[Record],
    verified: Option<&Result<String, String>>,
) -> Markup {
    let field = |name: &str| q.text(name);
    let next = records.last().map(|r| {
        let mut pairs = form_urlencoded::Serializer::new(String::new());
        for name in ["user", "dataset", "outcome", "since", "until"] {
            let v = field(name);
            if !v.is_empty() {
                pairs.append_pair(name, &v);
            }
        }
        pairs.append_pair("before", &r.seq.to_string());
        format!("/ui/audit?{}", pairs.finish())
    });
    let body = html! {
        @if let Some(outcome) = verified {
            @match outcome {
                Ok(m) => { p.ok role="status" { "✔ " (m) } }
                Err(m) => { p.error role="alert" { "✘ " (m) } }
            }
        }
        form.inline method="post" action="/ui/audit/verify" {
            (csrf_field(csrf))
            button type="submit" { "Verify chain" }
        }
        p.hint {
            a href="/ui/audit/head" download="audit-head.json" { "Download the signed head" }
            " (a log that verifies only): keep it outside the enclave; "
            code { "enclave audit verify --witness audit-head.json" }
            " then catches a log cut short."
        }
        form.search method="get" action="/ui/audit" {
            label { "User" input type="text" name="user" value=(field("user")); }
            label { "Dataset" input type="text" name="dataset" value=(field("dataset")); }
            label { "Outcome"
                select name="outcome" {
                    @for o in ["", "released", "refused", "failed", "granted"].into_iter()
                        .chain(enclave::audit::Event::ALL.iter().map(|e| e.name())) {
                        option value=(o) selected[field("outcome") == o] { (if o.is_empty() { "any" } else { o }) }
                    }
                }
            }
            label { "From" input type="text" name="since" placeholder="YYYY-MM-DD" value=(field("since")); }
            label { "Until" input type="text" name="until" placeholder="YYYY-MM-DD" value=(field("until")); }
            button type="submit" { "Filter" }
        }
        (record_table(records))
        @if let Some(href) = next {
            @if records.len() >= super::AUDIT_PAGE { p { a href=(href) { "Older records" } } }
        }
    };
    layout("Audit log", Some((caller, csrf)), body)
}
