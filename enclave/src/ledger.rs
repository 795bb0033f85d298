//! The privacy-budget ledger: budgets per principal × dataset, charged together with the audit record.
//!
//! [`Ledger::charge`] runs one `BEGIN IMMEDIATE` SQLite transaction: it reads what is left, refuses if the
//! cost does not fit, else adds the cost to what is spent, and appends the audit record (released or
//! refused) — then commits with `synchronous = FULL`. Only after that returns may an answer be released.
//! `IMMEDIATE` takes the write lock first, so concurrent charges, from threads or processes, are serialised
//! and can never overspend; a crash before the commit loses the charge and the answer together, a crash
//! after it loses only the answer.

use std::path::Path;
use std::sync::Mutex;

use ring::signature::Ed25519KeyPair;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::audit::{self, Draft, Record, from_units, to_units};
use crate::dp::Rule;
use crate::keys::Keystore;
use crate::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS budgets (
    principal TEXT NOT NULL,
    dataset TEXT NOT NULL,
    epsilon INTEGER NOT NULL,
    delta INTEGER NOT NULL,
    rho INTEGER,
    spent_epsilon INTEGER NOT NULL DEFAULT 0,
    spent_delta INTEGER NOT NULL DEFAULT 0,
    spent_rho INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    expires_at TEXT,
    PRIMARY KEY (principal, dataset)
);";

/// Key ID of the audit signing key in the keystore.
pub const AUDIT_SIGNING_KEY_ID: &str = "audit-signing";

/// The privacy cost of one query.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Cost {
    /// ε under basic composition (for zCDP datasets: the (ε, δ) equivalent, informative only).
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// ρ (zCDP datasets; 0 otherwise). When non-zero, the charge is against the ρ budget.
    pub rho: f64,
}

/// One budget and what is spent of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    /// Principal (researcher).
    pub principal: String,
    /// Dataset.
    pub dataset: String,
    /// ε granted.
    pub epsilon: f64,
    /// δ granted.
    pub delta: f64,
    /// ρ granted (zCDP), if any.
    pub rho: Option<f64>,
    /// ε spent.
    pub spent_epsilon: f64,
    /// δ spent.
    pub spent_delta: f64,
    /// ρ spent.
    pub spent_rho: f64,
    /// When the grant ends (RFC 3339, UTC); none: it does not.
    pub expires_at: Option<String>,
}

impl Budget {
    /// ε left.
    pub fn epsilon_left(&self) -> f64 {
        (self.epsilon - self.spent_epsilon).max(0.0)
    }

    /// Whether the grant has ended at `now` (a stored time that does not parse counts as ended).
    pub fn expired(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.expires_at.as_deref().is_some_and(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map_or(true, |t| t.with_timezone(&chrono::Utc) <= now)
        })
    }
}

/// A released query's record and the budget after it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Charged {
    /// The audit record.
    pub record: Record,
    /// The budget after the charge.
    pub budget: Budget,
}

/// The ledger over the enclave database.
pub struct Ledger {
    conn: Mutex<Connection>,
    signer: Ed25519KeyPair,
}

impl Ledger {
    /// Opens the ledger and audit log in `db`; the audit signing key comes from (or is created in) the keystore.
    pub fn open(db: &Path, keystore: &Keystore) -> Result<Ledger> {
        let conn = catalog::open_database(db)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(audit::SCHEMA)?;
        conn.execute_batch(crate::access::SCHEMA)?;
        add_column_if_missing(
            &conn,
            "access_requests",
            "approvals_at_filing",
            "INTEGER NOT NULL DEFAULT 1",
        )?;
        // The audit viewer's filters (user, outcome, time) read the newest records first.
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS audit_log_principal ON audit_log (principal, seq);
             CREATE INDEX IF NOT EXISTS audit_log_outcome ON audit_log (outcome, seq);
             CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);",
        )?;
        // Databases made before these columns existed gain them (empty: no expiry, no peer).
        add_column_if_missing(&conn, "budgets", "expires_at", "TEXT")?;
        // The access grant a budget comes from (none: set by hand with `budget set`).
        add_column_if_missing(&conn, "budgets", "grant_id", "INTEGER")?;
        for column in ["peer", "session", "decision"] {
            add_column_if_missing(&conn, "audit_log", column, "TEXT NOT NULL DEFAULT ''")?;
        }
        let seed = match keystore.get(AUDIT_SIGNING_KEY_ID) {
            Ok(s) => s,
            Err(Error::Key(_)) => {
                let s = crate::keys::random_secret()?;
                keystore.put(
                    AUDIT_SIGNING_KEY_ID,
                    "audit checkpoint signing (Ed25519 seed)",
                    &s,
                )?;
                s
            }
            Err(e) => return Err(e),
        };
        let signer = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .map_err(|_| Error::Key("the audit signing seed is not a valid Ed25519 seed".into()))?;
        audit::register_public_key(&conn, &signer)?;
        Ok(Ledger {
            conn: Mutex::new(conn),
            signer,
        })
    }

    /// The audit public key (hex), for verification outside the enclave.
    pub fn public_key_hex(&self) -> String {
        use ring::signature::KeyPair;
        hex::encode(self.signer.public_key().as_ref())
    }

    /// [`Ledger::set_budget_until`] with no end date.
    pub fn set_budget(
        &self,
        by: &str,
        principal: &str,
        dataset: &str,
        epsilon: f64,
        delta: f64,
        rho: Option<f64>,
    ) -> Result<Budget> {
        self.set_budget_until(by, principal, dataset, epsilon, delta, rho, None)
    }

    /// Sets (or changes) the total granted to a principal on a dataset, and when the grant ends (none:
    /// never); what is spent stays spent. The change and the audit record that says who made it, and the
    /// old and new amounts and end dates, commit together, so `audit verify` can check every budget
    /// against its audited grants. Queries under an ended grant are refused (rule `access`).
    #[allow(clippy::too_many_arguments)]
    pub fn set_budget_until(
        &self,
        by: &str,
        principal: &str,
        dataset: &str,
        epsilon: f64,
        delta: f64,
        rho: Option<f64>,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Budget> {
        if principal.trim().is_empty() || by.trim().is_empty() {
            return Err(Error::Config(
                "principal and the granting user must not be empty".into(),
            ));
        }
        if delta >= 1.0 {
            return Err(Error::Config("delta must be below 1".into()));
        }
        let (e, d) = (to_units(epsilon)?, to_units(delta)?);
        let r = rho.map(to_units).transpose()?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let budget = grant_in(
            &tx,
            &self.signer,
            &audit::Via::local(&format!("grant by {by}")),
            principal,
            dataset,
            [e, d, r.unwrap_or(-1)],
            expires_at,
            None,
        )?;
        tx.commit()?;
        Ok(budget)
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn signer(&self) -> &Ed25519KeyPair {
        &self.signer
    }

    /// One budget.
    pub fn budget(&self, principal: &str, dataset: &str) -> Result<Option<Budget>> {
        Ok(read_budget(&self.conn(), principal, dataset)?)
    }

    /// Every budget, or those of one principal.
    pub fn budgets(&self, principal: Option<&str>) -> Result<Vec<Budget>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT principal, dataset, epsilon, delta, rho, spent_epsilon, spent_delta, spent_rho, expires_at FROM budgets
             WHERE ?1 IS NULL OR principal = ?1 ORDER BY principal, dataset",
        )?;
        let rows = stmt
            .query_map([principal], budget_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Checks, charges and records one query in one transaction. On refusal (no budget, or not enough left)
    /// the refusal is recorded and [`Error::Refused`] returned.
    pub fn charge(&self, draft: &Draft, cost: Cost) -> Result<Charged> {
        let units = cost_units(cost)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let budget = read_budget(&tx, &draft.principal, &draft.dataset)?;
        let refusal = match &budget {
            None => Some((
                Rule::Budget,
                format!(
                    "{} has no privacy budget on dataset '{}'",
                    draft.principal, draft.dataset
                ),
            )),
            Some(b) if b.expired(chrono::Utc::now()) => Some((
                Rule::Access,
                format!(
                    "the grant of {} on dataset '{}' ended at {}",
                    draft.principal,
                    draft.dataset,
                    b.expires_at.as_deref().unwrap_or("")
                ),
            )),
            Some(b) => {
                let raw = raw_budget(&tx, &draft.principal, &draft.dataset)?
                    .ok_or_else(|| Error::Internal("budget vanished".into()))?;
                if units[2] > 0 {
                    match raw.rho {
                        None => Some((
                            Rule::Budget,
                            format!(
                                "dataset '{}' is charged in ρ but this budget has no ρ",
                                draft.dataset
                            ),
                        )),
                        Some(total) if raw.spent_rho + units[2] > total => Some((
                            Rule::Budget,
                            format!(
                                "budget exhausted: {:.6} ρ left, query needs {:.6}",
                                from_units(total - raw.spent_rho),
                                cost.rho
                            ),
                        )),
                        // Approximate zCDP (private key selection) also spends δ.
                        Some(_) if raw.spent_delta + units[1] > raw.delta => Some((
                            Rule::Budget,
                            format!(
                                "budget exhausted: {:.3e} δ left, query needs {:.3e}",
                                (b.delta - b.spent_delta).max(0.0),
                                cost.delta
                            ),
                        )),
                        Some(_) => None,
                    }
                } else if raw.spent_epsilon + units[0] > raw.epsilon {
                    Some((
                        Rule::Budget,
                        format!(
                            "budget exhausted: {:.6} ε left, query needs {:.6}",
                            b.epsilon_left(),
                            cost.epsilon
                        ),
                    ))
                } else if raw.spent_delta + units[1] > raw.delta {
                    Some((
                        Rule::Budget,
                        format!(
                            "budget exhausted: {:.3e} δ left, query needs {:.3e}",
                            (b.delta - b.spent_delta).max(0.0),
                            cost.delta
                        ),
                    ))
                } else {
                    None
                }
            }
        };
        if let Some((rule, message)) = refusal {
            let record = audit::append(
                &tx,
                &self.signer,
                draft,
                [0, 0, 0],
                "refused",
                &format!("{rule}: {message}"),
            )?;
            tx.commit()?;
            return Err(Error::Refused {
                rule,
                message,
                receipt: record.receipt().map(Box::new),
            });
        }
        add_spent(&tx, draft, units)?;
        let record = audit::append(&tx, &self.signer, draft, units, "released", "")?;
        let budget = read_budget(&tx, &draft.principal, &draft.dataset)?
            .ok_or_else(|| Error::Internal("budget vanished".into()))?;
        tx.commit()?;
        Ok(Charged { record, budget })
    }

    /// Records an accepted query that failed while running: its planned cost is charged (capped at what
    /// is left, so concurrent queries still never overspend), with outcome `failed`. A failure that could
    /// only depend on the data must not be a free answer. `why` (a limit hit, or a failure) is the
    /// record's reason.
    pub fn charge_failure(&self, draft: &Draft, cost: Cost, why: &str) -> Result<Record> {
        let units = cost_units(cost)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let charged = match raw_budget(&tx, &draft.principal, &draft.dataset)? {
            Some(raw) => [
                units[0].min((raw.epsilon - raw.spent_epsilon).max(0)),
                units[1].min((raw.delta - raw.spent_delta).max(0)),
                units[2].min((raw.rho.unwrap_or(0) - raw.spent_rho).max(0)),
            ],
            None => [0, 0, 0],
        };
        add_spent(&tx, draft, charged)?;
        let rec = audit::append(
            &tx,
            &self.signer,
            draft,
            charged,
            "failed",
            &format!("execution: {why}"),
        )?;
        tx.commit()?;
        Ok(rec)
    }

    /// Records a refusal for a rule other than the budget (nothing is charged).
    pub fn refuse(&self, draft: &Draft, rule: &str, message: &str) -> Result<Record> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rec = audit::append(
            &tx,
            &self.signer,
            draft,
            [0, 0, 0],
            "refused",
            &format!("{rule}: {message}"),
        )?;
        tx.commit()?;
        Ok(rec)
    }

    /// Records `event` and runs `f` in the same transaction: `f`'s writes and the audit record commit
    /// together or not at all (the gateway's user and session tables use it, so no account change or
    /// sign-in goes unrecorded). `detail` is the record's `rule` field.
    pub fn record_event<T>(
        &self,
        draft: &Draft,
        event: audit::Event,
        detail: &str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<(T, Record)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        let rec = audit::append(&tx, &self.signer, draft, [0, 0, 0], event.name(), detail)?;
        tx.commit()?;
        Ok((out, rec))
    }

    /// The last `n` audit records.
    pub fn tail(&self, n: usize) -> Result<Vec<Record>> {
        audit::tail(&self.conn(), n)
    }

    /// Up to `limit` audit records matching `filter`, newest first ([`audit::search`]).
    pub fn search(&self, filter: &audit::Filter, limit: usize) -> Result<Vec<Record>> {
        audit::search(&self.conn(), filter, limit)
    }

    /// Verifies the audit log against `public_key_hex` (the key exported at init).
    pub fn verify(&self, public_key_hex: &str) -> Result<audit::Verified> {
        audit::verify(&self.conn(), public_key_hex)
    }

    /// The latest signed head of the audit log (none while it is empty): what the board keeps outside.
    pub fn head(&self) -> Result<Option<audit::SignedHead>> {
        audit::latest_head(&self.conn())
    }

    /// Checks a witness or receipt against the log ([`audit::verify_head`]).
    pub fn verify_head(&self, public_key_hex: &str, head: &audit::SignedHead) -> Result<()> {
        audit::verify_head(&self.conn(), public_key_hex, head)
    }
}

/// A cost in pico-units: ε, δ, ρ.
fn cost_units(cost: Cost) -> Result<[i64; 3]> {
    Ok([
        to_units(cost.epsilon)?,
        to_units(cost.delta)?,
        to_units(cost.rho)?,
    ])
}

/// Sets `principal`'s totals on `dataset` to `units` (ε, δ, ρ in pico-units; ρ −1: no ρ budget) and its
/// end, owned by access grant `grant` (none: set by hand), inside the caller's transaction, and appends the
/// `granted` record that says so (its amount fields carry the new totals, which `audit verify` checks every
/// budget against). What is spent stays spent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grant_in(
    tx: &rusqlite::Transaction<'_>,
    signer: &Ed25519KeyPair,
    via: &audit::Via,
    principal: &str,
    dataset: &str,
    units: [i64; 3],
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    grant: Option<i64>,
) -> Result<Budget> {
    let before = read_budget(tx, principal, dataset)?;
    let expires = expires_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let rho = (units[2] >= 0).then_some(units[2]);
    tx.execute(
        "INSERT INTO budgets (principal, dataset, epsilon, delta, rho, updated_at, expires_at, grant_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (principal, dataset) DO UPDATE SET epsilon = ?3, delta = ?4, rho = ?5, updated_at = ?6,
         expires_at = ?7, grant_id = ?8",
        params![
            principal,
            dataset,
            units[0],
            units[1],
            rho,
            chrono::Utc::now().to_rfc3339(),
            expires,
            grant
        ],
    )?;
    let amounts = |b: Option<(f64, f64, Option<f64>, Option<String>)>| match b {
        None => "none".to_owned(),
        Some((e, d, r, x)) => format!(
            "ε {e}, δ {d}, ρ {}{}",
            r.map_or("none".to_owned(), |r| r.to_string()),
            x.map_or(String::new(), |x| format!(", until {x}"))
        ),
    };
    // The grant's end and owner, as `audit verify` reads them back (the amounts are the record's costs).
    let terms = audit::grant_terms(expires.as_deref(), grant);
    let draft = Draft {
        principal: principal.to_owned(),
        via: via.clone(),
        dataset: dataset.to_owned(),
        sql: format!(
            "budget set: {} → {}",
            amounts(before.map(|b| (b.epsilon, b.delta, b.rho, b.expires_at))),
            amounts(Some((
                from_units(units[0]),
                from_units(units[1]),
                rho.map(from_units),
                expires
            )))
        ),
        ..Draft::default()
    };
    audit::append(tx, signer, &draft, units, "granted", &terms)?;
    read_budget(tx, principal, dataset)?
        .ok_or_else(|| Error::Internal("budget vanished after upsert".into()))
}

/// Adds `units` (ε, δ, ρ) to what the draft's principal has spent on its dataset.
fn add_spent(tx: &Connection, draft: &Draft, units: [i64; 3]) -> Result<()> {
    tx.execute(
        "UPDATE budgets SET spent_epsilon = spent_epsilon + ?3, spent_delta = spent_delta + ?4, spent_rho = spent_rho + ?5
         WHERE principal = ?1 AND dataset = ?2",
        params![draft.principal, draft.dataset, units[0], units[1], units[2]],
    )?;
    Ok(())
}

pub(crate) struct RawBudget {
    pub(crate) epsilon: i64,
    pub(crate) delta: i64,
    pub(crate) rho: Option<i64>,
    pub(crate) spent_epsilon: i64,
    pub(crate) spent_delta: i64,
    pub(crate) spent_rho: i64,
}

pub(crate) fn raw_budget(
    conn: &Connection,
    principal: &str,
    dataset: &str,
) -> Result<Option<RawBudget>> {
    Ok(conn.query_row(
        "SELECT epsilon, delta, rho, spent_epsilon, spent_delta, spent_rho FROM budgets WHERE principal = ?1 AND dataset = ?2",
        params![principal, dataset],
        |r| {
            Ok(RawBudget {
                epsilon: r.get(0)?,
                delta: r.get(1)?,
                rho: r.get(2)?,
                spent_epsilon: r.get(3)?,
                spent_delta: r.get(4)?,
                spent_rho: r.get(5)?,
            })
        },
    )
    .optional()?)
}

fn add_column_if_missing(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<()> {
    let present: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        params![table, column],
        |r| r.get(0),
    )?;
    if !present {
        // Table, column and declaration are this module's constants, never input.
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

fn budget_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Budget> {
    Ok(Budget {
        principal: r.get(0)?,
        dataset: r.get(1)?,
        epsilon: from_units(r.get(2)?),
        delta: from_units(r.get(3)?),
        rho: r.get::<_, Option<i64>>(4)?.map(from_units),
        spent_epsilon: from_units(r.get(5)?),
        spent_delta: from_units(r.get(6)?),
        spent_rho: from_units(r.get(7)?),
        expires_at: r.get(8)?,
    })
}

pub(crate) fn read_budget(
    conn: &Connection,
    principal: &str,
    dataset: &str,
) -> rusqlite::Result<Option<Budget>> {
    conn.query_row(
        "SELECT principal, dataset, epsilon, delta, rho, spent_epsilon, spent_delta, spent_rho, expires_at FROM budgets
         WHERE principal = ?1 AND dataset = ?2",
        params![principal, dataset],
        budget_row,
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::keys::MasterKey;

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, key) = (dir.path().join("enclave.db"), dir.path().join("master.key"));
        MasterKey::create(&key).expect("key");
        (dir, db, key)
    }

    fn epsilon(e: f64) -> Cost {
        Cost {
            epsilon: e,
            ..Cost::default()
        }
    }

    fn draft(principal: &str, sql: &str) -> Draft {
        Draft {
            principal: principal.into(),
            via: audit::Via::local("test"),
            dataset: "cohort".into(),
            version: "1".into(),
            sql: sql.into(),
            plan_hash: "p".into(),
        }
    }

    #[test]
    fn a_budget_of_one_answers_two_queries_of_point_four_and_refuses_the_third() {
        let (_d, db, key) = setup();
        let ks = Keystore::open(&db, &key).expect("ks");
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        ledger
            .set_budget("test", "alice", "cohort", 1.0, 1e-6, None)
            .expect("set");
        let c = epsilon(0.4);
        ledger.charge(&draft("alice", "q1"), c).expect("first");
        let second = ledger.charge(&draft("alice", "q2"), c).expect("second");
        assert!((second.budget.epsilon_left() - 0.2).abs() < 1e-12);
        let third = ledger.charge(&draft("alice", "q3"), c).expect_err("third");
        assert_eq!(
            third.to_string(),
            "refused by rule 'budget': budget exhausted: 0.200000 ε left, query needs 0.400000"
        );
        assert!(
            matches!(
                ledger.charge(&draft("bob", "q"), c),
                Err(Error::Refused { .. })
            ),
            "no budget, no answer"
        );
        let tail = ledger.tail(10).expect("tail");
        assert_eq!(
            tail.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>(),
            ["granted", "released", "released", "refused", "refused"]
        );
        let v = ledger.verify(&ledger.public_key_hex()).expect("verifies");
        assert_eq!(v.records, 5);
    }

    #[test]
    fn tenths_add_up_exactly() {
        let (_d, db, key) = setup();
        let ks = Keystore::open(&db, &key).expect("ks");
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        ledger
            .set_budget("test", "alice", "cohort", 0.3, 0.0, None)
            .expect("set");
        for i in 0..3 {
            ledger
                .charge(&draft("alice", &format!("q{i}")), epsilon(0.1))
                .expect("fits");
        }
        assert!(ledger.charge(&draft("alice", "q4"), epsilon(0.1)).is_err());
    }

    #[test]
    fn sixty_four_racing_connections_never_overspend() {
        let (_d, db, key) = setup();
        let ks = Arc::new(Keystore::open(&db, &key).expect("ks"));
        Ledger::open(&db, &ks)
            .expect("ledger")
            .set_budget("test", "alice", "cohort", 1.0, 0.0, None)
            .expect("set");
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (db, ks) = (db.clone(), ks.clone());
                std::thread::spawn(move || {
                    // Each thread has its own connection, as separate processes would.
                    let ledger = Ledger::open(&db, &ks).expect("ledger");
                    ledger
                        .charge(&draft("alice", &format!("q{i}")), epsilon(0.1))
                        .is_ok()
                })
            })
            .collect();
        let released = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .filter(|ok| *ok)
            .count();
        assert_eq!(released, 10);
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        let v = ledger.verify(&ledger.public_key_hex()).expect("verifies");
        assert_eq!(v.records, 65, "one grant and 64 queries");
        assert_eq!(
            ledger
                .budget("alice", "cohort")
                .expect("b")
                .expect("some")
                .spent_epsilon,
            1.0
        );
    }

    #[test]
    fn an_ended_grant_refuses_and_the_record_says_who_from_where() {
        let (_d, db, key) = setup();
        let ks = Keystore::open(&db, &key).expect("ks");
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        let now = chrono::Utc::now();
        ledger
            .set_budget_until(
                "board",
                "alice",
                "cohort",
                1.0,
                1e-6,
                None,
                Some(now + chrono::Duration::hours(1)),
            )
            .expect("budget");
        let mut d = draft("alice", "q1");
        d.via = audit::Via {
            origin: "http".into(),
            peer: "[::1]:5000".into(),
            session: "0011223344556677".into(),
            decision: "allow: researchers-query-under-an-active-grant".into(),
        };
        ledger.charge(&d, epsilon(0.1)).expect("before the end");
        ledger
            .set_budget_until(
                "board",
                "alice",
                "cohort",
                1.0,
                1e-6,
                None,
                Some(now - chrono::Duration::seconds(1)),
            )
            .expect("ended");
        let b = ledger.budget("alice", "cohort").expect("b").expect("some");
        assert!(b.expired(now));
        match ledger.charge(&d, epsilon(0.1)) {
            Err(Error::Refused {
                rule: Rule::Access,
                message,
                receipt,
            }) => {
                assert!(message.contains("ended"), "{message}");
                let receipt = receipt.expect("the refusal is on the record");
                ledger
                    .verify_head(&ledger.public_key_hex(), &receipt)
                    .expect("its receipt holds");
            }
            other => panic!("expected an access refusal, got {other:?}"),
        }
        let tail = ledger.tail(4).expect("tail");
        assert_eq!(
            tail[1].draft.via, d.via,
            "peer, session and decision are stored"
        );
        assert!(
            tail[2].draft.sql.contains("until"),
            "the grant record names the end: {}",
            tail[2].draft.sql
        );
        assert_eq!(tail[3].outcome, "refused");
        ledger.verify(&ledger.public_key_hex()).expect("verifies");
        // Peer, session and decision are covered by the hash.
        tamper(
            &db,
            "UPDATE audit_log SET peer = '10.0.0.1:1' WHERE seq = 2",
        );
        assert!(ledger.verify(&ledger.public_key_hex()).is_err());
        // Lifting the end date reopens the grant.
        ledger
            .set_budget("board", "alice", "cohort", 1.0, 1e-6, None)
            .expect("no end");
        assert!(
            !ledger
                .budget("alice", "cohort")
                .expect("b")
                .expect("some")
                .expired(now)
        );
    }

    fn tamper(db: &Path, sql: &str) {
        Connection::open(db)
            .expect("open")
            .execute_batch(sql)
            .expect("tamper");
    }

    #[test]
    fn a_failure_after_execution_is_charged_capped_at_what_is_left_and_verifies() {
        let (_d, db, key) = setup();
        let ks = Keystore::open(&db, &key).expect("ks");
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        ledger
            .set_budget("test", "alice", "cohort", 1.0, 1e-6, None)
            .expect("budget");
        ledger
            .charge(&draft("alice", "q1"), epsilon(0.75))
            .expect("charged");
        let rec = ledger
            .charge_failure(
                &draft("alice", "q2"),
                epsilon(0.5),
                "the query failed while running; its cost was charged",
            )
            .expect("recorded");
        assert_eq!(rec.outcome, "failed");
        assert_eq!(from_units(rec.cost_epsilon), 0.25, "capped at what is left");
        let b = ledger.budget("alice", "cohort").expect("b").expect("some");
        assert_eq!(b.spent_epsilon, 1.0);
        assert!(matches!(
            ledger.charge(&draft("alice", "q3"), epsilon(0.1)),
            Err(Error::Refused {
                rule: Rule::Budget,
                ..
            })
        ));
        let v = ledger.verify(&ledger.public_key_hex()).expect("verifies");
        assert_eq!(v.records, 4);
    }

    #[test]
    fn a_grant_is_audited_and_a_budget_changed_behind_the_ledger_fails_verification() {
        let (_d, db2, key) = setup();
        let keystore = Keystore::open(&db2, &key).expect("ks");
        let ledger = Ledger::open(&db2, &keystore).expect("ledger");
        ledger
            .set_budget("carol", "alice", "cohort", 1.0, 1e-6, None)
            .expect("grant");
        ledger
            .set_budget("carol", "alice", "cohort", 2.5, 1e-6, Some(0.5))
            .expect("raise");
        let tail = ledger.tail(2).expect("tail");
        assert!(tail.iter().all(|r| r.outcome == "granted"));
        assert_eq!(tail[1].draft.via.origin, "grant by carol");
        assert!(
            tail[1]
                .draft
                .sql
                .contains("ε 1, δ 0.000001, ρ none → ε 2.5"),
            "{}",
            tail[1].draft.sql
        );
        ledger.verify(&ledger.public_key_hex()).expect("verifies");
        tamper(
            &db2,
            "UPDATE budgets SET epsilon = 100000000000000 WHERE principal = 'alice'",
        );
        let ledger = Ledger::open(&db2, &keystore).expect("ledger");
        match ledger.verify(&ledger.public_key_hex()) {
            Err(Error::AuditBroken { why, .. }) => {
                assert!(why.contains("last audited grant"), "{why}")
            }
            other => panic!("a budget raised in SQLite verified: {other:?}"),
        }
    }

    #[test]
    fn a_budget_whose_end_or_grant_changed_behind_the_ledger_fails_verification() {
        let end = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        for (what, sql) in [
            (
                "an end moved later",
                "UPDATE budgets SET expires_at = '2099-01-01T00:00:00Z'",
            ),
            ("an end removed", "UPDATE budgets SET expires_at = NULL"),
            ("handed to a grant", "UPDATE budgets SET grant_id = 7"),
        ] {
            let (_d, db, key) = setup();
            let keystore = Keystore::open(&db, &key).expect("ks");
            let ledger = Ledger::open(&db, &keystore).expect("ledger");
            ledger
                .set_budget_until("carol", "alice", "cohort", 1.0, 1e-6, None, Some(end))
                .expect("grant");
            let granted = ledger.tail(1).expect("tail").remove(0);
            assert_eq!(granted.rule, "until 2030-01-01T00:00:00Z, grant none");
            ledger.verify(&ledger.public_key_hex()).expect("verifies");
            tamper(&db, sql);
            let ledger = Ledger::open(&db, &keystore).expect("ledger");
            match ledger.verify(&ledger.public_key_hex()) {
                Err(Error::AuditBroken { why, .. }) => {
                    assert!(
                        why.contains("end or grant of the budget of alice"),
                        "{what}: {why}"
                    )
                }
                other => panic!("{what} verified: {other:?}"),
            }
        }
    }

    #[test]
    fn editing_deleting_or_reordering_a_record_is_found_and_named() {
        for (what, sql, seq) in [
            (
                "edit",
                "UPDATE audit_log SET sql = 'SELECT 1' WHERE seq = 7",
                7,
            ),
            ("delete", "DELETE FROM audit_log WHERE seq = 5", 5),
            (
                "reorder",
                "UPDATE audit_log SET seq = -1 WHERE seq = 3; UPDATE audit_log SET seq = 3 WHERE seq = 4; UPDATE audit_log SET seq = 4 WHERE seq = -1",
                3,
            ),
            (
                "rewrite after checkpoint",
                "UPDATE audit_log SET rule = 'x' WHERE seq = 32",
                32,
            ),
        ] {
            let (_d, db, key) = setup();
            let ks = Keystore::open(&db, &key).expect("ks");
            let ledger = Ledger::open(&db, &ks).expect("ledger");
            ledger
                .set_budget("test", "alice", "cohort", 100.0, 0.0, None)
                .expect("set");
            for i in 0..40 {
                ledger
                    .charge(
                        &draft("alice", &format!("SELECT COUNT(*) -- {i}")),
                        epsilon(0.0),
                    )
                    .expect("charge");
            }
            ledger
                .verify(&ledger.public_key_hex())
                .expect("clean log verifies");
            tamper(&db, sql);
            match ledger.verify(&ledger.public_key_hex()) {
                Err(Error::AuditBroken { seq: s, .. }) => assert_eq!(s, seq, "{what}"),
                other => panic!("{what}: expected a broken chain, got {other:?}"),
            }
        }
    }

    /// A fresh ledger in which alice has `epsilon` on `cohort`.
    fn alice_with_budget(epsilon: f64) -> (tempfile::TempDir, std::path::PathBuf, Ledger) {
        let (d, db, key) = setup();
        let ks = Keystore::open(&db, &key).expect("ks");
        let ledger = Ledger::open(&db, &ks).expect("ledger");
        ledger
            .set_budget("test", "alice", "cohort", epsilon, 0.0, None)
            .expect("set");
        (d, db, ledger)
    }

    #[test]
    fn the_audit_search_filters_exactly_and_pages_back() {
        let (_d, _db, ledger) = alice_with_budget(10.0);
        for i in 0..3 {
            ledger
                .charge(&draft("alice", &format!("q{i}")), epsilon(0.1))
                .expect("charge");
        }
        let on = |principal: &str, dataset: &str| Draft {
            dataset: dataset.into(),
            ..draft(principal, "step")
        };
        for (who, dataset) in [("bob", "x_y, other"), ("bob", "xzy"), ("carol", "a%b")] {
            ledger
                .refuse(&on(who, dataset), "access", "no")
                .expect("refuse");
        }
        let find = |f: audit::Filter| -> Vec<i64> {
            ledger
                .search(&f, 100)
                .expect("search")
                .iter()
                .map(|r| r.seq)
                .collect()
        };
        let dataset = |d: &str| audit::Filter {
            dataset: Some(d.into()),
            ..Default::default()
        };
        // Record 1 is the grant; 2–4 alice's queries; 5–7 the refusals. Newest first.
        assert_eq!(find(audit::Filter::default()), [7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(find(dataset("x_y")), [5], "a list item, `_` not a wildcard");
        assert_eq!(find(dataset("other")), [5]);
        assert_eq!(find(dataset("a%b")), [7]);
        assert!(find(dataset("x%")).is_empty(), "`%` is not a wildcard");
        assert!(find(dataset("x_y, ot")).is_empty());
        assert_eq!(find(dataset("cohort")), [4, 3, 2, 1]);
        let f = audit::Filter {
            user: Some("alice".into()),
            outcome: Some("released".into()),
            ..Default::default()
        };
        assert_eq!(find(f.clone()), [4, 3, 2]);
        assert_eq!(
            find(audit::Filter {
                before: Some(3),
                ..f.clone()
            }),
            [2]
        );
        let future = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
        assert!(
            find(audit::Filter {
                since: Some(future.clone()),
                ..Default::default()
            })
            .is_empty()
        );
        assert_eq!(
            find(audit::Filter {
                until: Some(future),
                ..f
            }),
            [4, 3, 2]
        );
    }

    #[test]
    fn every_record_is_signed_and_its_receipt_holds_until_the_log_is_changed_under_it() {
        let (_d, db, ledger) = alice_with_budget(10.0);
        let pk = ledger.public_key_hex();
        let receipts: Vec<audit::SignedHead> = (0..6)
            .map(|i| {
                let charged = ledger
                    .charge(&draft("alice", &format!("q{i}")), epsilon(0.1))
                    .expect("charge");
                charged.record.receipt().expect("signed as appended")
            })
            .collect();
        let refused = ledger
            .refuse(&draft("bob", "q"), "access", "no grant")
            .expect("refuse");
        assert!(refused.receipt().expect("signed").signed_by(&pk));
        let head = ledger.head().expect("head").expect("some");
        assert_eq!(head.seq, 8);
        assert_eq!(
            ledger.tail(1).expect("tail")[0].receipt(),
            Some(head.clone())
        );
        for r in receipts.iter().chain([&head]) {
            ledger.verify_head(&pk, r).expect("holds");
        }
        // Another key's signature, or the right signature over another record, is not a receipt.
        let mut forged = receipts[2].clone();
        forged.seq = 2;
        let other = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).expect("key");
        let foreign = audit::SignedHead {
            signature: hex::encode(
                other
                    .sign(
                        format!(
                            "rwd-enclave audit checkpoint v1\n{}\n{}",
                            head.seq, head.hash
                        )
                        .as_bytes(),
                    )
                    .as_ref(),
            ),
            ..head.clone()
        };
        for bad in [forged, foreign] {
            match ledger.verify_head(&pk, &bad) {
                Err(Error::AuditBroken { why, .. }) => {
                    assert!(why.contains("not the enclave's"), "{why}")
                }
                other => panic!("a forged head verified: {other:?}"),
            }
        }
        // A record deleted from the middle, or rewritten, fails its receipt.
        tamper(&db, "DELETE FROM audit_log WHERE seq = 3");
        tamper(&db, "UPDATE audit_log SET sql = 'SELECT 0' WHERE seq = 5");
        for (r, why) in [(&receipts[1], "gone"), (&receipts[3], "rewritten")] {
            match ledger.verify_head(&pk, r) {
                Err(Error::AuditBroken { seq, why: w }) => {
                    assert_eq!(seq, r.seq);
                    assert!(w.contains(why), "{w}");
                }
                other => panic!("a receipt of a changed record verified: {other:?}"),
            }
        }
    }

    #[test]
    fn a_tail_rewritten_with_its_chain_recomputed_and_its_signatures_deleted_fails() {
        let (_d, db, ledger) = alice_with_budget(10.0);
        let pk = ledger.public_key_hex();
        for i in 0..3 {
            ledger
                .charge(&draft("alice", &format!("q{i}")), epsilon(0.5))
                .expect("charge");
        }
        let witness = ledger.tail(2).expect("tail")[0].receipt().expect("signed");
        assert_eq!(witness.seq, 3);
        // The newest record made free, its hash recomputed, its signature gone, the budget to match.
        let mut newest = ledger.tail(1).expect("tail").remove(0);
        newest.cost_epsilon = 0;
        newest.hash = newest.compute_hash();
        tamper(
            &db,
            &format!(
                "UPDATE audit_log SET cost_epsilon = 0, hash = '{}' WHERE seq = 4;
                 DELETE FROM audit_checkpoints WHERE seq = 4;
                 UPDATE budgets SET spent_epsilon = 1000000000000 WHERE principal = 'alice';",
                newest.hash
            ),
        );
        ledger
            .verify_head(&pk, &witness)
            .expect("the witness's record is untouched");
        match ledger.verify(&pk) {
            Err(Error::AuditBroken { seq: 4, why }) => {
                assert!(why.contains("no signature"), "{why}")
            }
            other => panic!("a rewritten tail verified: {other:?}"),
        }
        assert!(ledger.head().is_err(), "no head is handed out for it");
        // A record's contents changed with its stored hash kept: its receipt fails.
        tamper(&db, "UPDATE audit_log SET sql = 'SELECT 2' WHERE seq = 3");
        match ledger.verify_head(&pk, &witness) {
            Err(Error::AuditBroken { seq: 3, why }) => assert!(why.contains("rewritten"), "{why}"),
            other => panic!("an edited record's receipt verified: {other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn spent_never_exceeds_the_budget(budget in 0.0f64..5.0, costs in proptest::collection::vec(0.0f64..1.5, 1..30)) {
            let (_d, db, key) = setup();
            let ks = Keystore::open(&db, &key).expect("ks");
            let ledger = Ledger::open(&db, &ks).expect("ledger");
            ledger.set_budget("test", "p", "cohort", budget, 0.0, None).expect("set");
            let total = to_units(budget).expect("units");
            let mut spent = 0i64;
            for (i, c) in costs.iter().enumerate() {
                let cost = to_units(*c).expect("units");
                let got = ledger.charge(&draft("p", &format!("q{i}")), epsilon(*c));
                prop_assert_eq!(got.is_ok(), spent + cost <= total);
                if got.is_ok() { spent += cost; }
                let b = ledger.budget("p", "cohort").expect("b").expect("some");
                prop_assert!(b.spent_epsilon <= b.epsilon);
            }
        }
    }
}
