//! Access requests and grants: the board's workflow in front of the budget ledger.
//!
//! A researcher files a request (project, purpose, datasets, ε per dataset, days); board members approve
//! it — possibly with a smaller ε and fewer days, never more than was asked — or reject it with a reason.
//! A dataset can require two approvals from different members (four-eyes); the grant then gets the
//! strictest terms the approvers gave. An approved request becomes one grant and, per dataset, the
//! researcher's budget in the ledger: the grant's ε left to spend (what was spent before stays spent)
//! until the grant's end. Revoking a grant ends its budgets at once and leaves nothing to spend; the next
//! query on any protocol is refused by the ledger (and by Cedar, which reads the budget's end).
//!
//! Every step writes its rows and its audit record in one transaction (`access-requested`,
//! `access-approved` per approval, `access-rejected`, `grant-revoked`, `approvals-required`, and a
//! `granted` record per budget it sets), so no decision goes unrecorded and `audit verify` checks each
//! budget's totals against the last `granted` record that set them (the grant's end is in that record's
//! text, not yet checked by `verify`). Who may take which step is decided by the caller (Cedar in the
//! gateway, the accounts' roles on the host); this module enforces what holds whoever asks: nobody
//! approves their own request, one member counts once, terms never exceed the request, a decided request
//! stays decided.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::audit::{self, Draft, Event, Via, from_units, to_units};
use crate::ledger::{Ledger, grant_in};
use crate::{Error, Result};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS access_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    researcher TEXT NOT NULL,
    project TEXT NOT NULL,
    purpose TEXT NOT NULL,
    datasets TEXT NOT NULL,
    epsilon INTEGER NOT NULL,
    delta INTEGER NOT NULL,
    days INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    created_at TEXT NOT NULL,
    decided_at TEXT,
    decided_by TEXT,
    reason TEXT,
    grant_id INTEGER,
    approvals_at_filing INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS access_approvals (
    request_id INTEGER NOT NULL REFERENCES access_requests(id),
    member TEXT NOT NULL,
    epsilon INTEGER NOT NULL,
    days INTEGER NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (request_id, member)
);
CREATE TABLE IF NOT EXISTS access_grants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER NOT NULL UNIQUE REFERENCES access_requests(id),
    researcher TEXT NOT NULL,
    project TEXT NOT NULL,
    datasets TEXT NOT NULL,
    epsilon INTEGER NOT NULL,
    delta INTEGER NOT NULL,
    days INTEGER NOT NULL,
    approved_by TEXT NOT NULL,
    granted_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked_at TEXT,
    revoked_by TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS access_rules (
    dataset TEXT PRIMARY KEY,
    approvals INTEGER NOT NULL CHECK (approvals IN (1, 2)),
    set_by TEXT NOT NULL,
    set_at TEXT NOT NULL
);";

/// The longest project name, in characters.
pub const MAX_PROJECT: usize = 200;
/// The longest purpose, reason or other free text, in characters.
pub const MAX_TEXT: usize = 4000;
/// The most datasets one request may name.
pub const MAX_DATASETS: usize = 50;
/// The longest a grant may last, in days.
pub const MAX_DAYS: u32 = 3650;
/// The largest ε a request may ask per dataset (the engine's own limit per query).
pub const MAX_EPSILON: f64 = 1e6;
/// The most a budget total may hold, in the ledger's units (what `to_units` accepts).
const MAX_UNITS: i64 = 9_000_000_000_000_000_000;
/// δ granted when a request names none.
pub const DEFAULT_DELTA: f64 = 1e-6;

/// Why a step of the workflow was refused. Each has a stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Rule {
    /// The request or decision is malformed (empty or overlong text, unknown dataset, ε or days out of range).
    Request,
    /// No such request or grant.
    Unknown,
    /// The request was already decided, or the grant already revoked.
    State,
    /// An approval asks more than the request (a larger ε, more days, a larger δ).
    Terms,
    /// Someone approves their own request, or approves the same request twice.
    FourEyes,
}

impl Rule {
    /// The rule's stable name.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Request => "access-request",
            Rule::Unknown => "access-unknown",
            Rule::State => "access-state",
            Rule::Terms => "access-terms",
            Rule::FourEyes => "four-eyes",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn refuse<T>(rule: Rule, message: impl Into<String>) -> Result<T> {
    Err(Error::Access {
        rule,
        message: message.into(),
    })
}

/// What a researcher asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    /// The project.
    pub project: String,
    /// What the data is for.
    pub purpose: String,
    /// The datasets (each in the catalog).
    pub datasets: Vec<String>,
    /// ε per dataset.
    pub epsilon: f64,
    /// δ per dataset ([`DEFAULT_DELTA`] when none).
    pub delta: Option<f64>,
    /// How long the grant should last.
    pub days: u32,
}

/// One board member's approval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Approval {
    /// Who approved.
    pub member: String,
    /// The ε they approved.
    pub epsilon: f64,
    /// The days they approved.
    pub days: u32,
    /// When (RFC 3339).
    pub at: String,
}

/// A request and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    /// Its number.
    pub id: i64,
    /// Who asked.
    pub researcher: String,
    /// The project.
    pub project: String,
    /// The purpose.
    pub purpose: String,
    /// The datasets.
    pub datasets: Vec<String>,
    /// ε asked per dataset.
    pub epsilon: f64,
    /// δ asked per dataset.
    pub delta: f64,
    /// Days asked.
    pub days: u32,
    /// `pending`, `approved` or `rejected`.
    pub status: String,
    /// When it was filed (RFC 3339).
    pub created_at: String,
    /// When it was decided.
    pub decided_at: Option<String>,
    /// Who rejected it, or the members who approved it (comma-separated).
    pub decided_by: Option<String>,
    /// The rejection's reason.
    pub reason: Option<String>,
    /// The grant it became.
    pub grant_id: Option<i64>,
    /// The approvals so far.
    pub approvals: Vec<Approval>,
    /// How many members must approve (the most any of its datasets requires).
    pub approvals_required: u32,
}

/// A grant: an approved request, as budgets in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    /// Its number.
    pub id: i64,
    /// The request it came from.
    pub request_id: i64,
    /// Who may query.
    pub researcher: String,
    /// The project.
    pub project: String,
    /// The datasets.
    pub datasets: Vec<String>,
    /// ε per dataset.
    pub epsilon: f64,
    /// δ per dataset.
    pub delta: f64,
    /// Days granted.
    pub days: u32,
    /// The members who approved it.
    pub approved_by: Vec<String>,
    /// When it was granted (RFC 3339).
    pub granted_at: String,
    /// When it ends (RFC 3339).
    pub expires_at: String,
    /// `active`, `expired`, `revoked`, or `superseded` (a later grant or `budget set` replaced every one
    /// of its budgets).
    pub status: String,
    /// When it was revoked.
    pub revoked_at: Option<String>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// Why.
    pub reason: Option<String>,
}

/// The outcome of an approval: the request, and its grant once enough members approved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The request after the approval.
    pub request: Request,
    /// The grant, when this approval completed it.
    pub grant: Option<Grant>,
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Whether `c` is invisible or changes the direction of text around it (zero-width characters, bidi
/// overrides and isolates, the byte-order mark): text with one reads differently than it is.
pub fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Checks free text: not blank, at most `max` characters, no control characters but newlines and tabs
/// (where `multiline`).
fn text(field: &str, value: &str, max: usize, multiline: bool) -> Result<String> {
    let value = value.trim();
    if value.is_empty() {
        return refuse(Rule::Request, format!("the {field} must not be empty"));
    }
    if value.chars().count() > max {
        return refuse(
            Rule::Request,
            format!("the {field} is longer than {max} characters"),
        );
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\t')))
    {
        return refuse(
            Rule::Request,
            format!("the {field} contains control characters"),
        );
    }
    // Direction overrides and invisible characters would make the text read differently than it is.
    if value.chars().any(is_invisible) {
        return refuse(
            Rule::Request,
            format!("the {field} contains invisible or direction-changing characters"),
        );
    }
    Ok(value.to_owned())
}

fn epsilon_units(epsilon: f64) -> Result<i64> {
    if !(epsilon.is_finite() && epsilon > 0.0 && epsilon <= MAX_EPSILON) {
        return refuse(
            Rule::Request,
            format!("ε must be a number above 0 and at most {MAX_EPSILON}"),
        );
    }
    let units = to_units(epsilon)?;
    if units == 0 {
        return refuse(Rule::Request, "ε is below the ledger's resolution (10⁻¹²)");
    }
    Ok(units)
}

fn delta_units(delta: f64) -> Result<i64> {
    if !(delta.is_finite() && (0.0..=0.5).contains(&delta)) {
        return refuse(Rule::Request, "δ must be a number within 0..=0.5");
    }
    to_units(delta)
}

fn check_days(days: u32) -> Result<()> {
    if !(1..=MAX_DAYS).contains(&days) {
        return refuse(Rule::Request, format!("days must be within 1..={MAX_DAYS}"));
    }
    Ok(())
}

/// ρ whose (ε, δ) equivalent is `epsilon` at `delta`: ρ-zCDP implies (ρ + 2√(ρ ln(1/δ)), δ)-DP [Bun &
/// Steinke 2016, Prop. 1.3], solved for ρ. A grant on a zCDP dataset is stated in ε like every other and
/// held in ρ.
pub fn rho_for(epsilon: f64, delta: f64) -> f64 {
    let l = (1.0 / delta).ln();
    // (√(L+ε) − √L)², written without subtracting two close roots: ε² / (√(L+ε) + √L)².
    (epsilon / ((l + epsilon).sqrt() + l.sqrt())).powi(2)
}

fn json_list(items: &[String]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

fn parse_list(text: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn event_draft(by: &str, via: &Via, datasets: &[String], what: String) -> Draft {
    Draft {
        principal: by.to_owned(),
        via: via.clone(),
        dataset: datasets.join(", "),
        sql: what,
        ..Draft::default()
    }
}

const SELECT_REQUEST: &str =
    "SELECT id, researcher, project, purpose, datasets, epsilon, delta, days, status,
    created_at, decided_at, decided_by, reason, grant_id, approvals_at_filing FROM access_requests";

fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Request> {
    Ok(Request {
        id: r.get(0)?,
        researcher: r.get(1)?,
        project: r.get(2)?,
        purpose: r.get(3)?,
        datasets: parse_list(&r.get::<_, String>(4)?)?,
        epsilon: from_units(r.get(5)?),
        delta: from_units(r.get(6)?),
        days: r.get(7)?,
        status: r.get(8)?,
        created_at: r.get(9)?,
        decided_at: r.get(10)?,
        decided_by: r.get(11)?,
        reason: r.get(12)?,
        grant_id: r.get(13)?,
        approvals: Vec::new(),
        approvals_required: r.get(14)?,
    })
}

/// Fills a request's approvals and how many it needs: the most its datasets required when it was filed
/// or require now (lowering a dataset's rule never lowers what a request filed under it needs).
fn complete(conn: &Connection, mut request: Request) -> Result<Request> {
    let mut stmt = conn.prepare_cached(
        "SELECT member, epsilon, days, at FROM access_approvals WHERE request_id = ?1 ORDER BY at, member",
    )?;
    request.approvals = stmt
        .query_map([request.id], |r| {
            Ok(Approval {
                member: r.get(0)?,
                epsilon: from_units(r.get(1)?),
                days: r.get(2)?,
                at: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    request.approvals_required = request
        .approvals_required
        .max(required(conn, &request.datasets)?);
    Ok(request)
}

fn read_request(conn: &Connection, id: i64) -> Result<Request> {
    let found = conn
        .query_row(
            &format!("{SELECT_REQUEST} WHERE id = ?1"),
            [id],
            request_row,
        )
        .optional()?;
    match found {
        Some(r) => complete(conn, r),
        None => refuse(Rule::Unknown, format!("no access request {id}")),
    }
}

/// How many approvals a request over `datasets` needs: the most any of them requires.
fn required(conn: &Connection, datasets: &[String]) -> Result<u32> {
    let mut stmt = conn.prepare_cached("SELECT approvals FROM access_rules WHERE dataset = ?1")?;
    let mut most = 1;
    for d in datasets {
        if let Some(n) = stmt.query_row([d], |r| r.get::<_, u32>(0)).optional()? {
            most = most.max(n);
        }
    }
    Ok(most)
}

const SELECT_GRANT: &str =
    "SELECT id, request_id, researcher, project, datasets, epsilon, delta, days,
    approved_by, granted_at, expires_at, revoked_at, revoked_by, reason,
    EXISTS (SELECT 1 FROM budgets b WHERE b.grant_id = access_grants.id) FROM access_grants";

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Grant> {
    let expires_at: String = r.get(10)?;
    let revoked_at: Option<String> = r.get(11)?;
    let owns_a_budget: bool = r.get(14)?;
    let status = if revoked_at.is_some() {
        "revoked"
    } else if chrono::DateTime::parse_from_rfc3339(&expires_at).map_or(true, |t| {
        t.with_timezone(&chrono::Utc) <= chrono::Utc::now()
    }) {
        "expired"
    } else if !owns_a_budget {
        "superseded"
    } else {
        "active"
    };
    Ok(Grant {
        id: r.get(0)?,
        request_id: r.get(1)?,
        researcher: r.get(2)?,
        project: r.get(3)?,
        datasets: parse_list(&r.get::<_, String>(4)?)?,
        epsilon: from_units(r.get(5)?),
        delta: from_units(r.get(6)?),
        days: r.get(7)?,
        approved_by: parse_list(&r.get::<_, String>(8)?)?,
        granted_at: r.get(9)?,
        expires_at,
        status: status.to_owned(),
        revoked_at,
        revoked_by: r.get(12)?,
        reason: r.get(13)?,
    })
}

fn read_grant(conn: &Connection, id: i64) -> Result<Grant> {
    match conn
        .query_row(&format!("{SELECT_GRANT} WHERE id = ?1"), [id], grant_row)
        .optional()?
    {
        Some(g) => Ok(g),
        None => refuse(Rule::Unknown, format!("no grant {id}")),
    }
}

/// The catalog facts an approval needs: each dataset's accounting (`zcdp` grants hold ρ).
fn accountings(
    catalog: &dyn catalog::CatalogStore,
    datasets: &[String],
) -> Result<Vec<(String, bool)>> {
    datasets
        .iter()
        .map(|d| match catalog.version(d, None) {
            Ok(v) => Ok((d.clone(), v.version.accounting == "zcdp")),
            Err(catalog::Error::UnknownDataset(_)) => {
                refuse(Rule::Request, format!("no dataset '{d}' in the catalog"))
            }
            Err(e) => Err(e.into()),
        })
        .collect()
}

impl Ledger {
    /// Files `researcher`'s request. Every dataset must be in the catalog.
    pub fn request_access(
        &self,
        catalog: &dyn catalog::CatalogStore,
        researcher: &str,
        via: &Via,
        new: &NewRequest,
    ) -> Result<Request> {
        let researcher = text("researcher", researcher, MAX_PROJECT, false)?;
        let project = text("project", &new.project, MAX_PROJECT, false)?;
        let purpose = text("purpose", &new.purpose, MAX_TEXT, true)?;
        if new.datasets.is_empty() || new.datasets.len() > MAX_DATASETS {
            return refuse(Rule::Request, format!("name 1 to {MAX_DATASETS} datasets"));
        }
        let mut datasets = Vec::with_capacity(new.datasets.len());
        for d in &new.datasets {
            let d = text("dataset name", d, MAX_PROJECT, false)?;
            if datasets.contains(&d) {
                return refuse(Rule::Request, format!("dataset '{d}' is named twice"));
            }
            datasets.push(d);
        }
        let zcdp = accountings(catalog, &datasets)?.into_iter().any(|(_, z)| z);
        let epsilon = epsilon_units(new.epsilon)?;
        let delta = delta_units(new.delta.unwrap_or(DEFAULT_DELTA))?;
        if zcdp && delta == 0 {
            return refuse(
                Rule::Request,
                "a zCDP dataset's grant is held in ρ with an (ε, δ) equivalent: ask a δ above 0",
            );
        }
        check_days(new.days)?;

        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let needed = required(&tx, &datasets)?;
        tx.execute(
            "INSERT INTO access_requests (researcher, project, purpose, datasets, epsilon, delta, days, status, created_at,
             approvals_at_filing) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9)",
            params![researcher, project, purpose, json_list(&datasets), epsilon, delta, new.days, now_text(), needed],
        )?;
        let id = tx.last_insert_rowid();
        let draft = event_draft(
            &researcher,
            via,
            &datasets,
            format!(
                "access request {id}: project {project:?}; purpose {purpose:?}; ε {} per dataset, δ {}, {} days",
                from_units(epsilon),
                from_units(delta),
                new.days
            ),
        );
        audit::append(
            &tx,
            self.signer(),
            &draft,
            [0, 0, 0],
            Event::AccessRequested.name(),
            &format!("request {id}"),
        )?;
        let request = read_request(&tx, id)?;
        tx.commit()?;
        Ok(request)
    }

    /// Requests, newest first: all, or one researcher's, optionally only those with `status`.
    pub fn access_requests(
        &self,
        researcher: Option<&str>,
        status: Option<&str>,
    ) -> Result<Vec<Request>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT_REQUEST} WHERE (?1 IS NULL OR researcher = ?1) AND (?2 IS NULL OR status = ?2) ORDER BY id DESC"
        ))?;
        let rows = stmt
            .query_map(params![researcher, status], request_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|r| complete(&conn, r)).collect()
    }

    /// One request.
    pub fn access_request(&self, id: i64) -> Result<Request> {
        read_request(&self.conn(), id)
    }

    /// Records `by`'s approval of request `id`, with at most the ε and days asked (none: as asked). When
    /// the request has as many approvals as its datasets require, it becomes a grant with the strictest
    /// terms approved, and the researcher's budget on each dataset is set to it.
    pub fn approve_access(
        &self,
        catalog: &dyn catalog::CatalogStore,
        by: &str,
        via: &Via,
        id: i64,
        epsilon: Option<f64>,
        days: Option<u32>,
    ) -> Result<Decision> {
        let by = text("approving member", by, MAX_PROJECT, false)?;
        // The catalog is read before the ledger's write lock is taken.
        let request = self.access_request(id)?;
        let accounting = accountings(catalog, &request.datasets)?;

        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let request = read_request(&tx, id)?;
        if request.status != "pending" {
            return refuse(
                Rule::State,
                format!("access request {id} is already {}", request.status),
            );
        }
        if request.researcher == by {
            return refuse(
                Rule::FourEyes,
                format!("{by} filed access request {id} and cannot approve it"),
            );
        }
        if request.approvals.iter().any(|a| a.member == by) {
            return refuse(
                Rule::FourEyes,
                format!(
                    "{by} has already approved access request {id}; another board member must approve it"
                ),
            );
        }
        // Amounts are compared and combined in the ledger's integer units, read as stored.
        let (asked, delta): (i64, i64) = tx.query_row(
            "SELECT epsilon, delta FROM access_requests WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let epsilon = match epsilon {
            Some(e) => epsilon_units(e)?,
            None => asked,
        };
        let days = days.unwrap_or(request.days);
        check_days(days)?;
        if epsilon > asked || days > request.days {
            return refuse(
                Rule::Terms,
                format!(
                    "an approval may grant at most what was asked (ε {}, {} days)",
                    request.epsilon, request.days
                ),
            );
        }
        let at = now_text();
        tx.execute(
            "INSERT INTO access_approvals (request_id, member, epsilon, days, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, by, epsilon, days, at],
        )?;
        let count = request.approvals.len() + 1;
        let needed = request.approvals_required as usize;
        audit::append(
            &tx,
            self.signer(),
            &event_draft(
                &by,
                via,
                &request.datasets,
                format!(
                    "access request {id} of {}: approval {count} of {needed}, ε {} per dataset, {days} days",
                    request.researcher,
                    from_units(epsilon)
                ),
            ),
            [0, 0, 0],
            Event::AccessApproved.name(),
            &format!("request {id}"),
        )?;
        let grant = if count >= needed {
            // The strictest terms any approver gave.
            let (e, n): (i64, u32) = tx.query_row(
                "SELECT MIN(epsilon), MIN(days) FROM access_approvals WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let mut members: Vec<String> =
                request.approvals.iter().map(|a| a.member.clone()).collect();
            members.push(by.clone());
            let granted_at = chrono::Utc::now();
            let expires = granted_at + chrono::Duration::days(i64::from(n));
            let text_time = |t: chrono::DateTime<chrono::Utc>| {
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            };
            tx.execute(
                "INSERT INTO access_grants (request_id, researcher, project, datasets, epsilon, delta, days, approved_by,
                 granted_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    id,
                    request.researcher,
                    request.project,
                    json_list(&request.datasets),
                    e,
                    delta,
                    n,
                    json_list(&members),
                    text_time(granted_at),
                    text_time(expires)
                ],
            )?;
            let grant_id = tx.last_insert_rowid();
            tx.execute(
                "UPDATE access_requests SET status = 'approved', decided_at = ?2, decided_by = ?3, grant_id = ?4
                 WHERE id = ?1",
                params![id, text_time(granted_at), members.join(", "), grant_id],
            )?;
            // The researcher's `granted` records name the grant, not the approvers' addresses and
            // sessions (those are in the `access-approved` records, which only the board reads).
            let grant_via = Via::local(&format!(
                "grant {grant_id} (access request {id}, approved by {})",
                members.join(", ")
            ));
            for (dataset, zcdp) in &accounting {
                // The grant's ε is what is left to spend from now: spent stays spent.
                let spent = crate::ledger::raw_budget(&tx, &request.researcher, dataset)?
                    .map_or([0, 0, 0], |b| [b.spent_epsilon, b.spent_delta, b.spent_rho]);
                if *zcdp && delta == 0 {
                    return refuse(
                        Rule::Terms,
                        format!(
                            "dataset '{dataset}' is accounted in zCDP, whose ε equivalent needs a δ above 0: the request asked δ = 0"
                        ),
                    );
                }
                let rho = if *zcdp {
                    to_units(rho_for(from_units(e), from_units(delta)))?
                } else {
                    -1
                };
                let total = |spent: i64, more: i64| {
                    spent
                        .checked_add(more)
                        .filter(|t| *t <= MAX_UNITS)
                        .ok_or_else(|| Error::Access {
                            rule: Rule::Terms,
                            message: format!(
                                "{}'s budget on '{dataset}' would exceed what the ledger holds",
                                request.researcher
                            ),
                        })
                };
                let units = [
                    total(spent[0], e)?,
                    total(spent[1], delta)?,
                    if rho < 0 { -1 } else { total(spent[2], rho)? },
                ];
                grant_in(
                    &tx,
                    self.signer(),
                    &grant_via,
                    &request.researcher,
                    dataset,
                    units,
                    Some(expires),
                    Some(grant_id),
                )?;
            }
            Some(read_grant(&tx, grant_id)?)
        } else {
            None
        };
        let request = read_request(&tx, id)?;
        tx.commit()?;
        Ok(Decision { request, grant })
    }

    /// Rejects request `id` with `reason`.
    pub fn reject_access(&self, by: &str, via: &Via, id: i64, reason: &str) -> Result<Request> {
        let by = text("rejecting member", by, MAX_PROJECT, false)?;
        let reason = text("reason", reason, MAX_TEXT, true)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let request = read_request(&tx, id)?;
        if request.status != "pending" {
            return refuse(
                Rule::State,
                format!("access request {id} is already {}", request.status),
            );
        }
        tx.execute(
            "UPDATE access_requests SET status = 'rejected', decided_at = ?2, decided_by = ?3, reason = ?4 WHERE id = ?1",
            params![id, now_text(), by, reason],
        )?;
        audit::append(
            &tx,
            self.signer(),
            &event_draft(
                &by,
                via,
                &request.datasets,
                format!(
                    "access request {id} of {} rejected: {reason:?}",
                    request.researcher
                ),
            ),
            [0, 0, 0],
            Event::AccessRejected.name(),
            &format!("request {id}"),
        )?;
        let request = read_request(&tx, id)?;
        tx.commit()?;
        Ok(request)
    }

    /// Revokes grant `id`: each budget it still owns ends now with nothing left to spend.
    pub fn revoke_grant(&self, by: &str, via: &Via, id: i64, reason: &str) -> Result<Grant> {
        let by = text("revoking member", by, MAX_PROJECT, false)?;
        let reason = text("reason", reason, MAX_TEXT, true)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let grant = read_grant(&tx, id)?;
        if grant.revoked_at.is_some() {
            return refuse(Rule::State, format!("grant {id} is already revoked"));
        }
        let now = chrono::Utc::now();
        tx.execute(
            "UPDATE access_grants SET revoked_at = ?2, revoked_by = ?3, reason = ?4 WHERE id = ?1",
            params![
                id,
                now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                by,
                reason
            ],
        )?;
        audit::append(
            &tx,
            self.signer(),
            &event_draft(
                &by,
                via,
                &grant.datasets,
                format!("grant {id} of {} revoked: {reason:?}", grant.researcher),
            ),
            [0, 0, 0],
            Event::GrantRevoked.name(),
            &format!("grant {id}"),
        )?;
        let revoke_via = Via::local(&format!("grant {id} revoked by {by}"));
        for dataset in &grant.datasets {
            let owned: Option<(i64, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT spent_epsilon, spent_delta, CASE WHEN rho IS NULL THEN NULL ELSE spent_rho END
                     FROM budgets WHERE principal = ?1 AND dataset = ?2 AND grant_id = ?3",
                    params![grant.researcher, dataset, id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((e, d, r)) = owned {
                // Totals down to what is spent, and the end now: refused by the ledger either way.
                grant_in(
                    &tx,
                    self.signer(),
                    &revoke_via,
                    &grant.researcher,
                    dataset,
                    [e, d, r.unwrap_or(-1)],
                    Some(now),
                    Some(id),
                )?;
            }
        }
        let grant = read_grant(&tx, id)?;
        tx.commit()?;
        Ok(grant)
    }

    /// Grants, newest first: all, or one researcher's.
    pub fn grants(&self, researcher: Option<&str>) -> Result<Vec<Grant>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT_GRANT} WHERE ?1 IS NULL OR researcher = ?1 ORDER BY id DESC"
        ))?;
        let rows = stmt
            .query_map([researcher], grant_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One grant.
    pub fn grant(&self, id: i64) -> Result<Grant> {
        read_grant(&self.conn(), id)
    }

    /// Sets how many board members must approve a request for `dataset` (1, or 2 for four-eyes). A pending
    /// request needs the larger of what its datasets required when it was filed and what they require now.
    pub fn set_approvals_required(
        &self,
        catalog: &dyn catalog::CatalogStore,
        by: &str,
        via: &Via,
        dataset: &str,
        approvals: u32,
    ) -> Result<()> {
        let by = text("board member", by, MAX_PROJECT, false)?;
        if !(1..=2).contains(&approvals) {
            return refuse(
                Rule::Request,
                "a dataset requires 1 or 2 approvals (2: four-eyes)",
            );
        }
        let datasets = [dataset.to_owned()];
        accountings(catalog, &datasets)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO access_rules (dataset, approvals, set_by, set_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (dataset) DO UPDATE SET approvals = ?2, set_by = ?3, set_at = ?4",
            params![dataset, approvals, by, now_text()],
        )?;
        audit::append(
            &tx,
            self.signer(),
            &event_draft(
                &by,
                via,
                &datasets,
                format!("requests for {dataset} need {approvals} approval(s)"),
            ),
            [0, 0, 0],
            Event::ApprovalsRequired.name(),
            &approvals.to_string(),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// How many approvals a request for `dataset` needs.
    pub fn approvals_required(&self, dataset: &str) -> Result<u32> {
        required(&self.conn(), &[dataset.to_owned()])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::keys::{Keystore, MasterKey};
    use crate::ledger::Cost;

    struct Fixture {
        _dir: tempfile::TempDir,
        db: std::path::PathBuf,
        key: std::path::PathBuf,
        ledger: Ledger,
        catalog: catalog::SqliteCatalog,
    }

    fn publish(catalog: &catalog::SqliteCatalog, name: &str, accounting: &str) {
        let version: catalog::NewVersion = serde_json::from_value(serde_json::json!({
            "dataset": name, "version": "1", "storage_path": format!("datasets/{name}/1"), "key_id": "dk",
            "provenance": {"provider": "H1", "source_system": "test", "extracted_at": "2026-11-25T00:00:00Z",
                "legal_basis": "test", "consent_scope": "research", "profile": "hipaa-safe-harbor"},
            "coverage": {"persons": 10, "time_start": null, "time_end": null},
            "max_contributions": 10, "accounting": accounting, "tables": [], "report": {}
        }))
        .expect("version");
        catalog::CatalogStore::publish(catalog, &version).expect("publish");
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, key) = (dir.path().join("enclave.db"), dir.path().join("master.key"));
        MasterKey::create(&key).expect("key");
        let ks = Keystore::open(&db, &key).expect("keystore");
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        let catalog = catalog::SqliteCatalog::open(&db).expect("catalog");
        publish(&catalog, "cohort", "basic");
        publish(&catalog, "icu", "basic");
        publish(&catalog, "registry", "zcdp");
        Fixture {
            _dir: dir,
            db,
            key,
            ledger,
            catalog,
        }
    }

    fn via() -> Via {
        Via::local("test")
    }

    fn ask(datasets: &[&str], epsilon: f64, days: u32) -> NewRequest {
        NewRequest {
            project: "Sepsis outcomes".into(),
            purpose: "Estimate 30-day mortality after sepsis by age band.".into(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            epsilon,
            delta: None,
            days,
        }
    }

    fn rule_of(e: Error) -> Rule {
        match e {
            Error::Access { rule, .. } => rule,
            other => panic!("expected an access refusal, got {other}"),
        }
    }

    fn query(principal: &str, dataset: &str) -> Draft {
        Draft {
            principal: principal.into(),
            via: via(),
            dataset: dataset.into(),
            version: "1".into(),
            sql: "SELECT COUNT(*) FROM patients".into(),
            plan_hash: "p".into(),
        }
    }

    /// Files alice's request for `datasets` and has bob approve it as asked: the grant.
    fn granted(f: &Fixture, datasets: &[&str], epsilon: f64) -> Grant {
        let r = f
            .ledger
            .request_access(&f.catalog, "alice", &via(), &ask(datasets, epsilon, 30))
            .expect("request");
        f.ledger
            .approve_access(&f.catalog, "bob", &via(), r.id, None, None)
            .expect("approve")
            .grant
            .expect("grant")
    }

    /// Charges alice's query on `dataset` at `epsilon`.
    fn spend(f: &Fixture, dataset: &str, epsilon: f64) -> Result<crate::ledger::Charged> {
        f.ledger.charge(
            &query("alice", dataset),
            Cost {
                epsilon,
                ..Cost::default()
            },
        )
    }

    fn outcomes(f: &Fixture) -> Vec<String> {
        f.ledger
            .tail(100)
            .expect("tail")
            .into_iter()
            .map(|r| r.outcome)
            .collect()
    }

    #[test]
    fn an_approval_with_smaller_terms_becomes_budgets_that_end_with_the_grant() {
        let f = fixture();
        let r = f
            .ledger
            .request_access(
                &f.catalog,
                "alice",
                &via(),
                &ask(&["cohort", "icu"], 2.0, 90),
            )
            .expect("request");
        assert_eq!((r.status.as_str(), r.approvals_required), ("pending", 1));
        let d = f
            .ledger
            .approve_access(&f.catalog, "bob", &via(), r.id, Some(0.5), Some(30))
            .expect("approve");
        let grant = d.grant.expect("one approval suffices");
        assert_eq!(d.request.status, "approved");
        assert_eq!(d.request.grant_id, Some(grant.id));
        assert_eq!((grant.epsilon, grant.days), (0.5, 30));
        assert_eq!(grant.status, "active");
        assert_eq!(grant.approved_by, vec!["bob".to_owned()]);
        let end = chrono::DateTime::parse_from_rfc3339(&grant.expires_at).expect("time");
        let days = (end.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_hours();
        assert!((29 * 24..=30 * 24).contains(&days), "{days} hours");
        for dataset in ["cohort", "icu"] {
            let b = f
                .ledger
                .budget("alice", dataset)
                .expect("read")
                .expect("set");
            assert_eq!((b.epsilon, b.delta, b.rho), (0.5, DEFAULT_DELTA, None));
            assert_eq!(b.expires_at.as_deref(), Some(grant.expires_at.as_str()));
        }
        assert!(
            f.ledger
                .budget("alice", "registry")
                .expect("read")
                .is_none()
        );
        assert_eq!(
            outcomes(&f),
            ["access-requested", "access-approved", "granted", "granted"]
        );
        // The researcher's grant records name the grant and the approvers, not their sessions.
        let busy = Via {
            origin: "http".into(),
            peer: "10.0.0.9:4711".into(),
            session: "s-1".into(),
            decision: "allow [board]".into(),
        };
        let r2 = f
            .ledger
            .request_access(&f.catalog, "alice", &via(), &ask(&["cohort"], 1.0, 30))
            .expect("request");
        f.ledger
            .approve_access(&f.catalog, "carol", &busy, r2.id, None, None)
            .expect("approve");
        let records = f.ledger.tail(2).expect("tail");
        assert_eq!(
            records[0].draft.via.peer, "10.0.0.9:4711",
            "the approval keeps its peer"
        );
        assert_eq!(records[1].outcome, "granted");
        assert!(records[1].draft.via.peer.is_empty() && records[1].draft.via.session.is_empty());
        assert!(
            records[1].draft.via.origin.contains("approved by carol"),
            "{:?}",
            records[1].draft.via
        );
        f.ledger
            .verify(&f.ledger.public_key_hex())
            .expect("the log verifies");
        // Decided is decided.
        let again = f
            .ledger
            .approve_access(&f.catalog, "carol", &via(), r.id, None, None)
            .expect_err("approved already");
        assert_eq!(rule_of(again), Rule::State);
        let reject = f
            .ledger
            .reject_access("carol", &via(), r.id, "too late")
            .expect_err("approved already");
        assert_eq!(rule_of(reject), Rule::State);
    }

    #[test]
    fn nobody_approves_their_own_request_or_more_than_was_asked() {
        let f = fixture();
        let r = f
            .ledger
            .request_access(&f.catalog, "alice", &via(), &ask(&["cohort"], 1.0, 30))
            .expect("request");
        let own = f
            .ledger
            .approve_access(&f.catalog, "alice", &via(), r.id, None, None)
            .expect_err("own");
        assert_eq!(rule_of(own), Rule::FourEyes);
        for (e, d) in [
            (Some(1.000001), None),
            (None, Some(31)),
            (Some(2.0), Some(60)),
        ] {
            let more = f
                .ledger
                .approve_access(&f.catalog, "bob", &via(), r.id, e, d)
                .expect_err("more than asked");
            assert_eq!(rule_of(more), Rule::Terms);
        }
        for (e, d) in [
            (Some(0.0), None),
            (Some(-1.0), None),
            (Some(f64::NAN), None),
            (Some(f64::INFINITY), None),
            (Some(1e-13), None),
            (None, Some(0)),
        ] {
            let bad = f
                .ledger
                .approve_access(&f.catalog, "bob", &via(), r.id, e, d)
                .expect_err("bad terms");
            assert_eq!(rule_of(bad), Rule::Request, "{e:?} {d:?}");
        }
        let unknown = f
            .ledger
            .approve_access(&f.catalog, "bob", &via(), r.id + 100, None, None)
            .expect_err("unknown");
        assert_eq!(rule_of(unknown), Rule::Unknown);
        // None of it left a trace but the request: still pending, nothing granted.
        assert_eq!(
            f.ledger.access_request(r.id).expect("read").status,
            "pending"
        );
        assert!(f.ledger.budgets(None).expect("budgets").is_empty());
        assert_eq!(outcomes(&f), ["access-requested"]);
    }

    #[test]
    fn four_eyes_needs_two_different_members_and_grants_the_strictest_terms() {
        let f = fixture();
        f.ledger
            .set_approvals_required(&f.catalog, "bob", &via(), "icu", 2)
            .expect("four-eyes");
        assert_eq!(f.ledger.approvals_required("icu").expect("read"), 2);
        assert_eq!(f.ledger.approvals_required("cohort").expect("read"), 1);
        let r = f
            .ledger
            .request_access(
                &f.catalog,
                "alice",
                &via(),
                &ask(&["cohort", "icu"], 2.0, 90),
            )
            .expect("request");
        assert_eq!(r.approvals_required, 2, "the strictest dataset decides");
        let first = f
            .ledger
            .approve_access(&f.catalog, "bob", &via(), r.id, Some(1.5), Some(60))
            .expect("first");
        assert!(first.grant.is_none());
        assert_eq!(first.request.status, "pending");
        assert_eq!(first.request.approvals.len(), 1);
        assert!(f.ledger.budgets(None).expect("budgets").is_empty());
        let twice = f
            .ledger
            .approve_access(&f.catalog, "bob", &via(), r.id, None, None)
            .expect_err("twice");
        assert_eq!(rule_of(twice), Rule::FourEyes);
        // Lowering the dataset's rule does not lower what a request filed under it needs.
        f.ledger
            .set_approvals_required(&f.catalog, "bob", &via(), "icu", 1)
            .expect("lower");
        assert_eq!(
            f.ledger
                .access_request(r.id)
                .expect("read")
                .approvals_required,
            2
        );
        let still = f
            .ledger
            .approve_access(&f.catalog, "bob", &via(), r.id, None, None)
            .expect_err("still two");
        assert_eq!(rule_of(still), Rule::FourEyes);
        let second = f
            .ledger
            .approve_access(&f.catalog, "carol", &via(), r.id, Some(1.8), Some(20))
            .expect("second");
        let grant = second.grant.expect("two approvals");
        assert_eq!(
            (grant.epsilon, grant.days),
            (1.5, 20),
            "the strictest of both"
        );
        assert_eq!(grant.approved_by, ["bob", "carol"]);
        for bad in [0, 3] {
            let e = f
                .ledger
                .set_approvals_required(&f.catalog, "bob", &via(), "icu", bad)
                .expect_err("1 or 2");
            assert_eq!(rule_of(e), Rule::Request);
        }
        let unknown = f
            .ledger
            .set_approvals_required(&f.catalog, "bob", &via(), "nope", 2)
            .expect_err("unknown dataset");
        assert_eq!(rule_of(unknown), Rule::Request);
    }

    #[test]
    fn concurrent_approvals_from_two_processes_grant_once() {
        let f = fixture();
        f.ledger
            .set_approvals_required(&f.catalog, "bob", &via(), "icu", 2)
            .expect("four-eyes");
        for members in [["bob", "bob"], ["bob", "carol"]] {
            let r = f
                .ledger
                .request_access(&f.catalog, "alice", &via(), &ask(&["icu"], 1.0, 30))
                .expect("request");
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let handles: Vec<_> = members
                .into_iter()
                .map(|m| {
                    let (db, key, barrier) = (f.db.clone(), f.key.clone(), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        let ks = Keystore::open(&db, &key).expect("keystore");
                        let ledger = Ledger::open(&db, &ks).expect("ledger");
                        let catalog = catalog::SqliteCatalog::open(&db).expect("catalog");
                        barrier.wait();
                        ledger.approve_access(&catalog, m, &Via::local("test"), r.id, None, None)
                    })
                })
                .collect();
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect();
            let ok = results.iter().filter(|r| r.is_ok()).count();
            let granted = results
                .iter()
                .filter(|r| matches!(r, Ok(d) if d.grant.is_some()))
                .count();
            if members[0] == members[1] {
                assert_eq!((ok, granted), (1, 0), "one member counts once");
            } else {
                assert_eq!((ok, granted), (2, 1), "two members, one grant");
            }
        }
        f.ledger
            .verify(&f.ledger.public_key_hex())
            .expect("the log verifies");
    }

    #[test]
    fn a_revoked_grant_leaves_nothing_to_spend_and_refuses_the_next_query() {
        let f = fixture();
        let grant = granted(&f, &["cohort"], 1.0);
        spend(&f, "cohort", 0.25).expect("a query under the grant");
        let revoked = f
            .ledger
            .revoke_grant("bob", &via(), grant.id, "the project ended early")
            .expect("revoke");
        assert_eq!(revoked.status, "revoked");
        assert_eq!(revoked.revoked_by.as_deref(), Some("bob"));
        let b = f
            .ledger
            .budget("alice", "cohort")
            .expect("read")
            .expect("kept");
        assert_eq!(
            (b.epsilon, b.spent_epsilon),
            (0.25, 0.25),
            "spent stays, nothing left"
        );
        assert!(b.expired(chrono::Utc::now() + chrono::Duration::seconds(1)));
        let refused = spend(&f, "cohort", 0.01).expect_err("revoked");
        assert!(matches!(refused, Error::Refused { .. }), "{refused}");
        let again = f
            .ledger
            .revoke_grant("bob", &via(), grant.id, "twice")
            .expect_err("revoked already");
        assert_eq!(rule_of(again), Rule::State);
        let unknown = f
            .ledger
            .revoke_grant("bob", &via(), grant.id + 1, "none")
            .expect_err("unknown");
        assert_eq!(rule_of(unknown), Rule::Unknown);
        let blank = f
            .ledger
            .revoke_grant("bob", &via(), grant.id, "  ")
            .expect_err("a reason is required");
        assert_eq!(rule_of(blank), Rule::Request);
        f.ledger
            .verify(&f.ledger.public_key_hex())
            .expect("the log verifies");
    }

    #[test]
    fn a_new_grant_adds_to_what_is_spent_and_supersedes_the_old_one() {
        let f = fixture();
        let old = granted(&f, &["cohort"], 1.0);
        spend(&f, "cohort", 0.75).expect("spend");
        let new = granted(&f, &["cohort"], 2.0);
        let b = f
            .ledger
            .budget("alice", "cohort")
            .expect("read")
            .expect("set");
        assert_eq!(
            (b.epsilon, b.spent_epsilon, b.epsilon_left()),
            (2.75, 0.75, 2.0)
        );
        assert_eq!(f.ledger.grant(old.id).expect("old").status, "superseded");
        assert_eq!(f.ledger.grant(new.id).expect("new").status, "active");
        // Revoking the superseded grant touches no budget.
        f.ledger
            .revoke_grant("bob", &via(), old.id, "tidy")
            .expect("revoke the old one");
        let after = f
            .ledger
            .budget("alice", "cohort")
            .expect("read")
            .expect("set");
        assert_eq!(after, b);
        f.ledger
            .verify(&f.ledger.public_key_hex())
            .expect("the log verifies");
    }

    #[test]
    fn a_grant_on_a_zcdp_dataset_holds_the_rho_whose_equivalent_is_the_epsilon() {
        let f = fixture();
        let r = f
            .ledger
            .request_access(&f.catalog, "alice", &via(), &ask(&["registry"], 1.0, 30))
            .expect("request");
        f.ledger
            .approve_access(&f.catalog, "bob", &via(), r.id, None, None)
            .expect("approve");
        let b = f
            .ledger
            .budget("alice", "registry")
            .expect("read")
            .expect("set");
        let rho = b.rho.expect("a ρ budget");
        let equivalent = rho + 2.0 * (rho * (1.0 / b.delta).ln()).sqrt();
        assert!((equivalent - 1.0).abs() < 1e-9, "{equivalent}");
        for (e, d) in [(0.01, 1e-9), (10.0, 1e-6), (1e5, 0.5)] {
            let rho = rho_for(e, d);
            let back = rho + 2.0 * (rho * (1.0 / d).ln()).sqrt();
            assert!((back - e).abs() <= 1e-9 * e.max(1.0), "{e} {d}: {back}");
        }
    }

    #[test]
    fn malformed_requests_are_refused_and_leave_no_trace() {
        let f = fixture();
        let ok = ask(&["cohort"], 1.0, 30);
        let cases: Vec<(&str, NewRequest)> = vec![
            (
                "blank project",
                NewRequest {
                    project: " \t".into(),
                    ..ok.clone()
                },
            ),
            (
                "control character",
                NewRequest {
                    project: "a\u{7}b".into(),
                    ..ok.clone()
                },
            ),
            (
                "newline in project",
                NewRequest {
                    project: "a\nb".into(),
                    ..ok.clone()
                },
            ),
            (
                "long project",
                NewRequest {
                    project: "p".repeat(MAX_PROJECT + 1),
                    ..ok.clone()
                },
            ),
            (
                "long purpose",
                NewRequest {
                    purpose: "é".repeat(MAX_TEXT + 1),
                    ..ok.clone()
                },
            ),
            (
                "no datasets",
                NewRequest {
                    datasets: vec![],
                    ..ok.clone()
                },
            ),
            (
                "unknown dataset",
                NewRequest {
                    datasets: vec!["nope".into()],
                    ..ok.clone()
                },
            ),
            (
                "quoted dataset",
                NewRequest {
                    datasets: vec!["cohort'--".into()],
                    ..ok.clone()
                },
            ),
            (
                "twice",
                NewRequest {
                    datasets: vec!["cohort".into(), "cohort".into()],
                    ..ok.clone()
                },
            ),
            (
                "too many",
                NewRequest {
                    datasets: (0..=MAX_DATASETS).map(|i| format!("d{i}")).collect(),
                    ..ok.clone()
                },
            ),
            (
                "zero ε",
                NewRequest {
                    epsilon: 0.0,
                    ..ok.clone()
                },
            ),
            (
                "NaN ε",
                NewRequest {
                    epsilon: f64::NAN,
                    ..ok.clone()
                },
            ),
            (
                "huge ε",
                NewRequest {
                    epsilon: 1e7,
                    ..ok.clone()
                },
            ),
            (
                "negative δ",
                NewRequest {
                    delta: Some(-1e-9),
                    ..ok.clone()
                },
            ),
            (
                "large δ",
                NewRequest {
                    delta: Some(0.6),
                    ..ok.clone()
                },
            ),
            (
                "zero days",
                NewRequest {
                    days: 0,
                    ..ok.clone()
                },
            ),
            (
                "many days",
                NewRequest {
                    days: MAX_DAYS + 1,
                    ..ok.clone()
                },
            ),
        ];
        for (what, request) in cases {
            let e = f
                .ledger
                .request_access(&f.catalog, "alice", &via(), &request)
                .expect_err(what);
            assert_eq!(rule_of(e), Rule::Request, "{what}");
        }
        let blank = f
            .ledger
            .request_access(&f.catalog, "", &via(), &ok)
            .expect_err("no researcher");
        assert_eq!(rule_of(blank), Rule::Request);
        assert!(
            f.ledger
                .access_requests(None, None)
                .expect("list")
                .is_empty()
        );
        assert!(outcomes(&f).is_empty());
        // A purpose may span lines; text is kept as written, trimmed.
        let r = f
            .ledger
            .request_access(
                &f.catalog,
                "alice",
                &via(),
                &NewRequest {
                    purpose: "  line one\n\tline two <b>x</b>  ".into(),
                    ..ok
                },
            )
            .expect("request");
        assert_eq!(r.purpose, "line one\n\tline two <b>x</b>");
        assert_eq!(
            f.ledger
                .access_requests(Some("alice"), Some("pending"))
                .expect("list")
                .len(),
            1
        );
        assert!(
            f.ledger
                .access_requests(Some("bob"), None)
                .expect("list")
                .is_empty()
        );
    }
}
