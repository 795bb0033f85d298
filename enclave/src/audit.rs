//! The tamper-evident audit log: append-only records, each carrying the SHA-256 of the previous one, and
//! each signed as the chain's head (Ed25519) when it is appended.
//!
//! A signed head ([`SignedHead`]: record number, chain hash, signature) is the receipt of the answer or
//! refusal that record is about, and the board keeps the latest one outside the enclave as a witness
//! (`enclave audit head --export`): [`verify_head`] then detects a log cut short after it, even by someone
//! who also deleted the signatures and lowered the budgets to match.
//!
//! A record says who asked, from where, when, on which dataset version, the SQL, the plan's hash, the
//! privacy cost, and the outcome (released, or refused with the rule). Records are appended only inside the
//! ledger's transaction ([`crate::ledger`]), so a charge and its record commit together. [`verify`]
//! recomputes the chain and every signature (the newest record must carry one), cross-checks the budgets'
//! spent totals against the released records, and names the first record that does not fit.

use ring::digest::{SHA256, digest};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;

use crate::{Error, Result};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    principal TEXT NOT NULL,
    origin TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    session TEXT NOT NULL DEFAULT '',
    decision TEXT NOT NULL DEFAULT '',
    dataset TEXT NOT NULL,
    version TEXT NOT NULL,
    sql TEXT NOT NULL,
    plan_hash TEXT NOT NULL,
    cost_epsilon INTEGER NOT NULL,
    cost_delta INTEGER NOT NULL,
    cost_rho INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    rule TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_keys (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    public_key TEXT NOT NULL
);";

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Budget amounts are stored as whole pico-units (10⁻¹² ε, δ or ρ), so sums are exact.
pub const UNITS_PER: f64 = 1e12;

/// A privacy amount in pico-units. Converting from `f64` rounds to the nearest unit; a difference of
/// 10⁻¹² is far below any meaningful privacy loss, and it makes `0.1 + 0.1 + 0.1 == 0.3` hold exactly.
pub fn to_units(x: f64) -> Result<i64> {
    if !x.is_finite() || !(0.0..=9.0e6).contains(&x) {
        return Err(Error::Config(format!(
            "privacy amount {x} must be a finite number within 0..=9e6"
        )));
    }
    Ok((x * UNITS_PER).round() as i64)
}

/// Pico-units back to a number.
pub fn from_units(u: i64) -> f64 {
    u as f64 / UNITS_PER
}

/// Events other than queries and grants that the audit log records (nothing is charged for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A user account was created (who by, which role).
    UserAdded,
    /// A user account was disabled.
    UserDisabled,
    /// A session was opened after a sign-in with every factor right.
    SignedIn,
    /// A sign-in was refused (which rule: wrong credentials, replayed code, rate limit, disabled).
    SignInRefused,
    /// A session was ended by its user (signing out).
    SignedOut,
    /// A researcher filed an access request.
    AccessRequested,
    /// A board member approved an access request (one approval; the grant follows once enough agree).
    AccessApproved,
    /// A board member rejected an access request.
    AccessRejected,
    /// A board member revoked a grant.
    GrantRevoked,
    /// A board member set how many approvals a dataset's requests need.
    ApprovalsRequired,
    /// A user registered a passkey.
    PasskeyAdded,
    /// A user removed one of their passkeys.
    PasskeyRemoved,
    /// A board member gave an account new factors (token and TOTP secret; passkeys removed).
    FactorsReset,
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 13] = [
        Event::UserAdded,
        Event::UserDisabled,
        Event::SignedIn,
        Event::SignInRefused,
        Event::SignedOut,
        Event::AccessRequested,
        Event::AccessApproved,
        Event::AccessRejected,
        Event::GrantRevoked,
        Event::ApprovalsRequired,
        Event::PasskeyAdded,
        Event::PasskeyRemoved,
        Event::FactorsReset,
    ];

    /// The record's `outcome` for this event.
    pub fn name(self) -> &'static str {
        match self {
            Event::UserAdded => "user-added",
            Event::UserDisabled => "user-disabled",
            Event::SignedIn => "signed-in",
            Event::SignInRefused => "sign-in-refused",
            Event::SignedOut => "signed-out",
            Event::AccessRequested => "access-requested",
            Event::AccessApproved => "access-approved",
            Event::AccessRejected => "access-rejected",
            Event::GrantRevoked => "grant-revoked",
            Event::ApprovalsRequired => "approvals-required",
            Event::PasskeyAdded => "passkey-added",
            Event::PasskeyRemoved => "passkey-removed",
            Event::FactorsReset => "factors-reset",
        }
    }
}

/// Who asked through what: the protocol, the peer's address, the session and the authorization
/// decision. The gateway fills every field; local commands name themselves in `origin` only.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Via {
    /// The protocol or command (`cli`, `cli --as`, `http`, `flight`, `pg`, `grant by …`, `ingest by …`).
    pub origin: String,
    /// The client's address (`ip:port`), empty for local commands.
    pub peer: String,
    /// The public id of the session the request came in (never its secret), empty outside one.
    pub session: String,
    /// The authorization decision and the ids of the policies that decided it (`allow: …`, `deny: …`).
    pub decision: String,
}

impl Via {
    /// A local command's context: only its name.
    pub fn local(origin: &str) -> Via {
        Via {
            origin: origin.to_owned(),
            ..Via::default()
        }
    }
}

/// How a `granted` record states the budget's end and owning grant (its detail), for `verify` to compare
/// with the budget as stored.
pub(crate) fn grant_terms(expires_at: Option<&str>, grant: Option<i64>) -> String {
    format!(
        "until {}, grant {}",
        expires_at.unwrap_or("none"),
        grant.map_or("none".to_owned(), |g| g.to_string())
    )
}

/// What a new record says (the ledger adds the sequence number, time and hashes).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Draft {
    /// Who asked (the signed-in user, or the name an administrator gave on the enclave host).
    pub principal: String,
    /// Through what.
    #[serde(flatten)]
    pub via: Via,
    /// Dataset.
    pub dataset: String,
    /// Dataset version.
    pub version: String,
    /// The SQL as received.
    pub sql: String,
    /// SHA-256 of the normalised plan (empty when the query never got a plan).
    pub plan_hash: String,
}

impl Draft {
    /// A query's record, before its version and plan are known.
    pub fn query(principal: &str, via: &Via, dataset: &str, sql: &str) -> Draft {
        Draft {
            principal: principal.to_owned(),
            via: via.clone(),
            dataset: dataset.to_owned(),
            sql: sql.to_owned(),
            ..Draft::default()
        }
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// Position in the log, from 1.
    pub seq: i64,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// What was asked.
    #[serde(flatten)]
    pub draft: Draft,
    /// ε charged, in pico-units.
    pub cost_epsilon: i64,
    /// δ charged, in pico-units.
    pub cost_delta: i64,
    /// ρ charged, in pico-units (zCDP datasets).
    pub cost_rho: i64,
    /// `released`, `refused`, or `failed` (accepted, charged, failed while running).
    pub outcome: String,
    /// The refusal rule (empty when released).
    pub rule: String,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// Hash of this record.
    pub hash: String,
    /// The Ed25519 signature of the chain's head at this record (hex; empty for records appended before
    /// every record was signed).
    pub signature: String,
}

impl Record {
    /// The record's receipt: the chain's head it made, signed (none for an unsigned old record).
    pub fn receipt(&self) -> Option<SignedHead> {
        (!self.signature.is_empty()).then(|| SignedHead {
            seq: self.seq,
            hash: self.hash.clone(),
            signature: self.signature.clone(),
        })
    }
}

/// The chain's head at a record, signed by the enclave's audit key: a receipt for that record, and a
/// witness of the log's length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SignedHead {
    /// The record's number.
    pub seq: i64,
    /// The chain's hash at that record.
    pub hash: String,
    /// Ed25519 over `rwd-enclave audit checkpoint v1\n{seq}\n{hash}` (hex).
    pub signature: String,
}

impl SignedHead {
    /// Reads a receipt or witness (JSON, as `enclave audit head` writes it; other fields are ignored).
    pub fn from_json(text: &str) -> Result<SignedHead> {
        serde_json::from_str(text).map_err(|e| {
            Error::Config(format!(
                "not a signed audit head (JSON with seq, hash and signature): {e}"
            ))
        })
    }

    /// True when the signature is the key's over this record number and hash.
    pub fn signed_by(&self, public_key_hex: &str) -> bool {
        let (Ok(pk), Ok(sig)) = (hex::decode(public_key_hex), hex::decode(&self.signature)) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, pk)
            .verify(&checkpoint_message(self.seq, &self.hash), &sig)
            .is_ok()
    }
}

impl Record {
    /// The record's hash: SHA-256 over the previous hash and every field, length-prefixed.
    pub fn compute_hash(&self) -> String {
        let mut buf = Vec::with_capacity(256 + self.draft.sql.len());
        for field in [
            self.prev_hash.as_str(),
            &self.seq.to_string(),
            &self.at,
            &self.draft.principal,
            &self.draft.via.origin,
            &self.draft.dataset,
            &self.draft.version,
            &self.draft.sql,
            &self.draft.plan_hash,
            &self.cost_epsilon.to_string(),
            &self.cost_delta.to_string(),
            &self.cost_rho.to_string(),
            &self.outcome,
            &self.rule,
        ] {
            buf.extend_from_slice(&(field.len() as u64).to_be_bytes());
            buf.extend_from_slice(field.as_bytes());
        }
        // Peer, session and decision came later: a record without them hashes as records did before
        // (still verifiable); with any of them, all three are covered.
        let v = &self.draft.via;
        if !(v.peer.is_empty() && v.session.is_empty() && v.decision.is_empty()) {
            for field in [&v.peer, &v.session, &v.decision] {
                buf.extend_from_slice(&(field.len() as u64).to_be_bytes());
                buf.extend_from_slice(field.as_bytes());
            }
        }
        hex::encode(digest(&SHA256, &buf))
    }
}

fn checkpoint_message(seq: i64, hash: &str) -> Vec<u8> {
    format!("rwd-enclave audit checkpoint v1\n{seq}\n{hash}").into_bytes()
}

/// Appends a record inside the caller's transaction and signs the chain's head at it.
pub(crate) fn append(
    tx: &Transaction<'_>,
    signer: &Ed25519KeyPair,
    draft: &Draft,
    cost: [i64; 3],
    outcome: &str,
    rule: &str,
) -> Result<Record> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev_hash) = last.map_or((1, GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let mut rec = Record {
        seq,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        draft: draft.clone(),
        cost_epsilon: cost[0],
        cost_delta: cost[1],
        cost_rho: cost[2],
        outcome: outcome.to_owned(),
        rule: rule.to_owned(),
        prev_hash,
        hash: String::new(),
        signature: String::new(),
    };
    rec.hash = rec.compute_hash();
    tx.execute(
        "INSERT INTO audit_log (seq, at, principal, origin, dataset, version, sql, plan_hash, cost_epsilon, cost_delta,
            cost_rho, outcome, rule, prev_hash, hash, peer, session, decision)
            VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        params![
            rec.seq, rec.at, rec.draft.principal, rec.draft.via.origin, rec.draft.dataset, rec.draft.version,
            rec.draft.sql, rec.draft.plan_hash, rec.cost_epsilon, rec.cost_delta, rec.cost_rho, rec.outcome, rec.rule,
            rec.prev_hash, rec.hash, rec.draft.via.peer, rec.draft.via.session, rec.draft.via.decision
        ],
    )?;
    rec.signature = sign_checkpoint(tx, signer, seq, &rec.hash)?;
    Ok(rec)
}

/// Signs the head at `seq` and stores the signature; returns it (hex).
fn sign_checkpoint(
    conn: &Connection,
    signer: &Ed25519KeyPair,
    seq: i64,
    hash: &str,
) -> Result<String> {
    let sig = hex::encode(signer.sign(&checkpoint_message(seq, hash)).as_ref());
    conn.execute(
        "INSERT OR REPLACE INTO audit_checkpoints (seq, hash, signature, at) VALUES (?1, ?2, ?3, ?4)",
        params![seq, hash, sig, chrono::Utc::now().to_rfc3339()],
    )?;
    Ok(sig)
}

/// The newest record's signed head, as stored (nothing is signed here: a head signed now would bless
/// whatever the database holds), or `None` for an empty log. A newest record without its signature is
/// an error: records were changed or added after the last one the enclave signed.
pub(crate) fn latest_head(conn: &Connection) -> Result<Option<SignedHead>> {
    let mut stmt = conn.prepare(&format!("{SELECT_RECORD} ORDER BY l.seq DESC LIMIT 1"))?;
    let last = stmt.query_row([], read_record).optional()?;
    match last {
        None => Ok(None),
        Some(rec) => rec
            .receipt()
            .map(Some)
            .ok_or_else(|| unsigned_newest(rec.seq)),
    }
}

fn unsigned_newest(seq: i64) -> Error {
    Error::AuditBroken {
        seq,
        why:
            "the newest record carries no signature: records were changed or added after the last \
              one the enclave signed"
                .into(),
    }
}

/// Checks a signed head (a witness the board kept, or a receipt a researcher holds) against the log: the
/// signature must be the audit key's, and the log must hold that record with that hash. A log that ends
/// before it was cut short: the error names the missing records.
pub fn verify_head(conn: &Connection, public_key_hex: &str, head: &SignedHead) -> Result<()> {
    let broken = |seq: i64, why: String| Error::AuditBroken { seq, why };
    if !head.signed_by(public_key_hex) {
        return Err(broken(
            head.seq,
            "the signed head's signature is not the enclave's audit key's (forged or altered)"
                .into(),
        ));
    }
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_log", [], |r| {
        r.get(0)
    })?;
    let mut stmt = conn.prepare(&format!("{SELECT_RECORD} WHERE l.seq = ?1"))?;
    let stored = stmt
        .query_row([head.seq], read_record)
        .optional()?
        .map(|rec| rec.compute_hash());
    match stored {
        // The record's contents still hash to the signed value.
        Some(h) if h == head.hash => Ok(()),
        Some(_) => Err(broken(
            head.seq,
            "it differs from the signed head (the log was rewritten after it was signed)".into(),
        )),
        None if head.seq > last => {
            let missing = if head.seq == last + 1 {
                format!("record {} is missing", head.seq)
            } else {
                format!("records {} to {} are missing", last + 1, head.seq)
            };
            Err(broken(
                last + 1,
                format!(
                    "{missing}: the log ends at record {last}, but the enclave signed its head at \
                     record {} (truncated)",
                    head.seq
                ),
            ))
        }
        None => Err(broken(
            head.seq,
            "the signed head names it but it is gone (deleted)".into(),
        )),
    }
}

/// Stores the public key the checkpoints verify against (first time only) and returns it (hex).
pub(crate) fn register_public_key(conn: &Connection, signer: &Ed25519KeyPair) -> Result<String> {
    let pk = hex::encode(signer.public_key().as_ref());
    conn.execute(
        "INSERT OR IGNORE INTO audit_keys (id, public_key) VALUES (1, ?1)",
        [&pk],
    )?;
    let stored: String =
        conn.query_row("SELECT public_key FROM audit_keys WHERE id = 1", [], |r| {
            r.get(0)
        })?;
    if stored != pk {
        return Err(Error::Key(
            "the audit signing key does not match the registered public key".into(),
        ));
    }
    Ok(pk)
}

fn read_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        seq: r.get(0)?,
        at: r.get(1)?,
        draft: Draft {
            principal: r.get(2)?,
            via: Via {
                origin: r.get(3)?,
                peer: r.get(15)?,
                session: r.get(16)?,
                decision: r.get(17)?,
            },
            dataset: r.get(4)?,
            version: r.get(5)?,
            sql: r.get(6)?,
            plan_hash: r.get(7)?,
        },
        cost_epsilon: r.get(8)?,
        cost_delta: r.get(9)?,
        cost_rho: r.get(10)?,
        outcome: r.get(11)?,
        rule: r.get(12)?,
        prev_hash: r.get(13)?,
        hash: r.get(14)?,
        signature: r.get(18)?,
    })
}

const SELECT_RECORD: &str = "SELECT l.seq, l.at, l.principal, l.origin, l.dataset, l.version, l.sql,
    l.plan_hash, l.cost_epsilon, l.cost_delta, l.cost_rho, l.outcome, l.rule, l.prev_hash, l.hash, l.peer,
    l.session, l.decision, COALESCE(c.signature, '')
    FROM audit_log l LEFT JOIN audit_checkpoints c ON c.seq = l.seq AND c.hash = l.hash";

/// What the audit viewer filters on; every field optional, all given ones must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The record's principal, exactly.
    pub user: Option<String>,
    /// A dataset the record names (records of multi-dataset steps name several, comma-separated).
    pub dataset: Option<String>,
    /// The outcome, exactly (`released`, `refused`, `granted`, an event name).
    pub outcome: Option<String>,
    /// Records at or after this time (RFC 3339, compared as stored: UTC).
    pub since: Option<String>,
    /// Records before this time.
    pub until: Option<String>,
    /// Records numbered below this (for the next page).
    pub before: Option<i64>,
}

/// Up to `limit` records matching `filter`, newest first.
pub fn search(conn: &Connection, filter: &Filter, limit: usize) -> Result<Vec<Record>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT_RECORD} WHERE (?1 IS NULL OR l.principal = ?1)
           AND (?2 IS NULL OR l.dataset = ?2 OR (', ' || l.dataset || ', ') LIKE ('%, ' || ?3 || ', %') ESCAPE '\\')
           AND (?4 IS NULL OR l.outcome = ?4)
           AND (?5 IS NULL OR l.at >= ?5) AND (?6 IS NULL OR l.at < ?6)
           AND (?7 IS NULL OR l.seq < ?7)
         ORDER BY l.seq DESC LIMIT ?8"
    ))?;
    // The dataset is matched as a list item with LIKE's wildcards escaped: a name is never a pattern.
    let escaped = filter.dataset.as_deref().map(|d| {
        d.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    });
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let out = stmt
        .query_map(
            rusqlite::params![
                filter.user,
                filter.dataset,
                escaped,
                filter.outcome,
                filter.since,
                filter.until,
                filter.before,
                limit
            ],
            read_record,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(out)
}

/// The last `n` records, oldest first.
pub fn tail(conn: &Connection, n: usize) -> Result<Vec<Record>> {
    let mut stmt = conn.prepare(&format!("{SELECT_RECORD} ORDER BY l.seq DESC LIMIT ?1"))?;
    let mut out = stmt
        .query_map([n as i64], read_record)?
        .collect::<Result<Vec<_>, _>>()?;
    out.reverse();
    Ok(out)
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verified {
    /// Records checked.
    pub records: i64,
    /// Checkpoints whose signature verified.
    pub checkpoints: i64,
    /// Sequence number of the last signed checkpoint.
    pub last_checkpoint: Option<i64>,
}

/// Recomputes the chain and checkpoint signatures against `public_key_hex`, and checks every budget's spent
/// totals equal the sum of its released records. Returns the first problem as [`Error::AuditBroken`].
pub fn verify(conn: &Connection, public_key_hex: &str) -> Result<Verified> {
    let broken = |seq: i64, why: String| Error::AuditBroken { seq, why };
    let stored_pk: Option<String> = conn
        .query_row("SELECT public_key FROM audit_keys WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()?;
    if stored_pk.as_deref().is_some_and(|pk| pk != public_key_hex) {
        return Err(broken(
            0,
            "the database's audit public key differs from the one exported at init".into(),
        ));
    }
    let pk_bytes = hex::decode(public_key_hex)
        .map_err(|_| Error::Config("audit public key is not hex".into()))?;
    let public_key = UnparsedPublicKey::new(&ED25519, pk_bytes);

    let mut stmt = conn.prepare(&format!("{SELECT_RECORD} ORDER BY l.seq"))?;
    let mut rows = stmt.query([])?;
    let (mut expected_seq, mut prev) = (1i64, GENESIS.to_owned());
    let mut newest_signed = false;
    let mut hashes = std::collections::HashMap::new();
    let mut released: std::collections::HashMap<(String, String), [i64; 3]> =
        std::collections::HashMap::new();
    let mut granted: std::collections::HashMap<(String, String), [i64; 3]> =
        std::collections::HashMap::new();
    let mut terms: std::collections::HashMap<(String, String), String> =
        std::collections::HashMap::new();
    while let Some(row) = rows.next()? {
        let rec = read_record(row)?;
        if rec.seq != expected_seq {
            return Err(broken(
                expected_seq,
                format!(
                    "record {expected_seq} is missing (next present is {})",
                    rec.seq
                ),
            ));
        }
        if rec.prev_hash != prev {
            return Err(broken(rec.seq, "its previous-hash does not match the record before it (deleted, inserted or reordered)".into()));
        }
        if rec.compute_hash() != rec.hash {
            return Err(broken(
                rec.seq,
                "its contents do not match its hash (edited)".into(),
            ));
        }
        if rec.outcome == "released" || rec.outcome == "failed" {
            let e = released
                .entry((rec.draft.principal.clone(), rec.draft.dataset.clone()))
                .or_default();
            e[0] += rec.cost_epsilon;
            e[1] += rec.cost_delta;
            e[2] += rec.cost_rho;
        } else if rec.outcome == "granted" {
            let key = (rec.draft.principal.clone(), rec.draft.dataset.clone());
            granted.insert(
                key.clone(),
                [rec.cost_epsilon, rec.cost_delta, rec.cost_rho],
            );
            // Records from before the terms were recorded carry none: their budgets' ends go unchecked.
            if rec.rule.is_empty() {
                terms.remove(&key);
            } else {
                terms.insert(key, rec.rule.clone());
            }
        } else if Event::ALL.iter().any(|e| e.name() == rec.outcome) {
            if rec.cost_epsilon != 0 || rec.cost_delta != 0 || rec.cost_rho != 0 {
                return Err(broken(rec.seq, "an event record carries a cost".into()));
            }
        } else if rec.outcome != "refused" {
            return Err(broken(
                rec.seq,
                format!("unknown outcome '{}'", rec.outcome),
            ));
        }
        hashes.insert(rec.seq, rec.hash.clone());
        newest_signed = !rec.signature.is_empty();
        prev = rec.hash;
        expected_seq += 1;
    }
    let records = expected_seq - 1;
    // Each signature is checked below; the newest record must have one, or a rewritten or added tail
    // (with the signatures after its start deleted) would pass.
    if records > 0 && !newest_signed {
        return Err(unsigned_newest(records));
    }

    let mut checkpoints = 0;
    let mut last_checkpoint = None;
    let mut stmt =
        conn.prepare("SELECT seq, hash, signature FROM audit_checkpoints ORDER BY seq")?;
    let cps = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for cp in cps {
        let (seq, hash, sig) = cp?;
        let sig = hex::decode(&sig).unwrap_or_default();
        if public_key
            .verify(&checkpoint_message(seq, &hash), &sig)
            .is_err()
        {
            return Err(broken(
                seq,
                "its checkpoint signature does not verify".into(),
            ));
        }
        match hashes.get(&seq) {
            Some(h) if *h == hash => {}
            Some(_) => {
                return Err(broken(
                    seq,
                    "it differs from the signed checkpoint (rewritten after signing)".into(),
                ));
            }
            None => {
                return Err(broken(
                    seq,
                    "a signed checkpoint names it but it is gone (truncated)".into(),
                ));
            }
        }
        checkpoints += 1;
        last_checkpoint = Some(seq);
    }

    // Every charge is in the log: the budgets' spent totals equal the released records' costs.
    let mut stmt = conn.prepare(
        "SELECT principal, dataset, spent_epsilon, spent_delta, spent_rho, epsilon, delta, rho,
                expires_at, grant_id FROM budgets",
    )?;
    let budgets = stmt.query_map([], |r| {
        Ok((
            (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            [
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ],
            [
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?.unwrap_or(-1),
            ],
            grant_terms(
                r.get::<_, Option<String>>(8)?.as_deref(),
                r.get::<_, Option<i64>>(9)?,
            ),
        ))
    })?;
    for b in budgets {
        let (key, spent, total, end) = b?;
        // And its end and owning grant are those that grant recorded (a budget kept alive by moving its
        // end, or handed to another grant, in the database).
        if terms.get(&key).is_some_and(|t| *t != end) {
            return Err(broken(
                records,
                format!(
                    "the end or grant of the budget of {} on {} differs from its last audited grant (changed outside `budget set`)",
                    key.0, key.1
                ),
            ));
        }
        // Every grant is in the log: the budget's totals are those of its last audited grant.
        if granted.get(&key) != Some(&total) {
            return Err(broken(
                records,
                format!(
                    "the budget of {} on {} differs from its last audited grant (changed outside `budget set`)",
                    key.0, key.1
                ),
            ));
        }
        let logged = released.remove(&key).unwrap_or_default();
        if logged != spent {
            return Err(broken(
                records,
                format!(
                    "the budget of {} on {} has spent more or less than its released records account for",
                    key.0, key.1
                ),
            ));
        }
    }
    if let Some(((p, d), _)) = released.into_iter().find(|(_, c)| c.iter().any(|x| *x > 0)) {
        return Err(broken(
            records,
            format!("released records charge {p} on {d}, which has no budget"),
        ));
    }
    Ok(Verified {
        records,
        checkpoints,
        last_checkpoint,
    })
}
