//! What every protocol does, in one place: sign in, resolve a session, list the datasets a caller may
//! query, show their budgets, and answer a query — after Cedar's decision, within the limits, through
//! the DP engine (which charges and audits before it returns). The listeners (`http`, and the Flight SQL
//! and Postgres ones) only translate their protocol to these calls and [`GatewayError`] to their own
//! error codes.
//!
//! - The principal of every query is the signed-in user ([`Caller`]); nobody names themselves.
//! - Each query's audit record carries the protocol, the peer address, the session id and Cedar's decision
//!   with the ids of the deciding policies; a denial, a limit hit and a refusal are recorded too.
//! - Errors name their rule and never carry engine internals (DataFusion messages, schemas, values).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use catalog::{CatalogStore, SqliteCatalog, VersionEntry};
use enclave::audit::{Draft, Via};
use enclave::dp::{DpAnswer, DpEngine, Prepared, QueryOptions};
use enclave::ledger::Budget;
use serde::Serialize;

use crate::auth::{Accounts, AuthError, Caller, NewSession};
use crate::authz::{Action, DatasetRef, GrantState, Policies, PolicyError};

/// The protocol a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP JSON.
    Http,
    /// Arrow Flight SQL.
    Flight,
    /// Postgres wire.
    Pg,
}

impl Protocol {
    /// Its name in audit records.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Flight => "flight",
            Protocol::Pg => "pg",
        }
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The protocol.
    pub protocol: Protocol,
    /// The client's address.
    pub addr: SocketAddr,
}

impl Peer {
    /// The address as recorded and as counted for rate limits: IPv4 as is, IPv6 by its /64 (one host
    /// usually holds a whole /64, so counting single addresses would let it rotate past the limit).
    pub fn address_group(&self) -> String {
        match self.addr.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let s = ip.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        }
    }
}

/// The gateway's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long one query may run.
    pub query_timeout: Duration,
    /// At most this many rows in one answer.
    pub max_groups: usize,
    /// Queries one user may have running at once.
    pub per_user: usize,
    /// Queries running at once, all users together.
    pub total: usize,
    /// Largest request body or SQL text accepted, in bytes.
    pub max_request_bytes: usize,
    /// How long a client may take to send a request's headers, or its body (a slower one is cut).
    pub read_timeout: Duration,
    /// Memory one query's execution may use (its own DataFusion memory pool), bytes.
    pub query_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            query_timeout: Duration::from_secs(60),
            max_groups: 10_000,
            per_user: 4,
            total: 64,
            max_request_bytes: 64 * 1024,
            read_timeout: Duration::from_secs(10),
            query_memory: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// Why a request was not answered. Every message names its rule and is safe to show.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Sign-in or session refused.
    #[error(transparent)]
    Auth(AuthError),
    /// The request was refused by a rule (authorization, the DP engine's rules, a limit).
    #[error("refused (rule '{rule}'): {message}")]
    Refused {
        /// The rule's stable name.
        rule: String,
        /// What to do about it.
        message: String,
        /// The signed head of the refusal's audit record (its receipt), where the engine recorded it.
        receipt: Option<Box<enclave::audit::SignedHead>>,
    },
    /// The request itself is malformed (before anything was decided).
    #[error("bad request (rule 'request'): {0}")]
    BadRequest(String),
    /// Something failed inside the enclave; the details are in its log, not here.
    #[error(
        "the enclave could not answer this request; nothing was released (see the operator's log)"
    )]
    Internal,
}

/// How a protocol should classify an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not signed in, or the sign-in failed.
    Unauthenticated,
    /// Signed in, but not allowed (authorization, budget).
    Forbidden,
    /// No such dataset.
    NotFound,
    /// The query or request is refused as written.
    Invalid,
    /// The request conflicts with the current state (a request already decided, a grant already revoked).
    Conflict,
    /// A rate or concurrency limit: try again later.
    Busy,
    /// The enclave failed.
    Internal,
}

impl GatewayError {
    /// The receipt of a refusal the audit log holds (none for other errors, or where it was not kept).
    pub fn receipt(&self) -> Option<&enclave::audit::SignedHead> {
        match self {
            GatewayError::Refused { receipt, .. } => receipt.as_deref(),
            GatewayError::Auth(e) => e.receipt(),
            _ => None,
        }
    }

    /// The error's class, for status codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GatewayError::Auth(e) => match e.cause() {
                AuthError::RateLimited => ErrorKind::Busy,
                AuthError::Enclave(_) => ErrorKind::Internal,
                AuthError::Account(_) | AuthError::Passkey(_) => ErrorKind::Invalid,
                _ => ErrorKind::Unauthenticated,
            },
            GatewayError::Refused { rule, .. } => match rule.as_str() {
                "access" | "budget" | "ticket" | "statement" | "four-eyes" | "csrf" => {
                    ErrorKind::Forbidden
                }
                "catalog" | "access-unknown" | "route" => ErrorKind::NotFound,
                "access-state" => ErrorKind::Conflict,
                "concurrency" => ErrorKind::Busy,
                _ => ErrorKind::Invalid,
            },
            GatewayError::BadRequest(_) => ErrorKind::Invalid,
            GatewayError::Internal => ErrorKind::Internal,
        }
    }

    /// What to tell the user, without the rule's name (for pages that show the rule apart).
    pub fn message(&self) -> String {
        match self {
            GatewayError::Refused { message, .. } => message.clone(),
            GatewayError::BadRequest(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// The rule's name.
    pub fn rule(&self) -> &str {
        match self {
            GatewayError::Auth(e) => match e.cause() {
                AuthError::Credentials => "credentials",
                AuthError::ReplayedCode => "replayed-code",
                AuthError::RateLimited => "rate-limit",
                AuthError::Session => "session",
                AuthError::Account(_) => "account",
                AuthError::Passkey(_) => "passkey",
                AuthError::Enclave(_) | AuthError::Recorded { .. } => "internal",
            },
            GatewayError::Internal => "internal",
            GatewayError::Refused { rule, .. } => rule,
            GatewayError::BadRequest(_) => "request",
        }
    }
}

impl From<AuthError> for GatewayError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Enclave(e) => internal(e),
            other => GatewayError::Auth(other),
        }
    }
}

impl From<enclave::Error> for GatewayError {
    fn from(e: enclave::Error) -> Self {
        match e {
            enclave::Error::Refused {
                rule,
                message,
                receipt,
            } => GatewayError::Refused {
                rule: rule.name().to_owned(),
                message,
                receipt,
            },
            enclave::Error::Access { rule, message } => GatewayError::Refused {
                rule: rule.name().to_owned(),
                message,
                receipt: None,
            },
            other => internal(other),
        }
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> GatewayError {
    tracing::error!(error = %e, "gateway request failed inside the enclave");
    GatewayError::Internal
}

pub(crate) fn refused(rule: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::Refused {
        rule: rule.to_owned(),
        message: message.into(),
        receipt: None,
    }
}

/// A refusal whose audit record is `record`: it carries the record's signed head as its receipt.
pub(crate) fn refused_with(
    rule: &str,
    message: impl Into<String>,
    record: &enclave::audit::Record,
) -> GatewayError {
    GatewayError::Refused {
        rule: rule.to_owned(),
        message: message.into(),
        receipt: record.receipt().map(Box::new),
    }
}

/// A dataset as a researcher sees it: what can be asked, never how many rows there are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetInfo {
    /// Its name (the schema in SQL).
    pub name: String,
    /// Its latest version.
    pub version: String,
    /// Who contributed it.
    pub provider: String,
    /// When it was published.
    pub published_at: String,
    /// `basic` ((ε, δ)) or `zcdp` (ρ).
    pub accounting: String,
    /// Its tables.
    pub tables: Vec<TableInfo>,
}

/// A table's columns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableInfo {
    /// Its name.
    pub name: String,
    /// Its columns.
    pub columns: Vec<ColumnInfo>,
}

/// A column's public description.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnInfo {
    /// Its name.
    pub name: String,
    /// Arrow type.
    pub data_type: String,
    /// identifier | quasi_identifier | sensitive | value.
    pub role: String,
    /// Public clamping bounds for DP, if any.
    pub lower: Option<f64>,
    /// Upper bound.
    pub upper: Option<f64>,
    /// Public domain of a categorical column.
    pub domain: Option<Vec<String>>,
}

impl DatasetInfo {
    fn of(v: &VersionEntry) -> DatasetInfo {
        let e = &v.version;
        DatasetInfo {
            name: e.dataset.clone(),
            version: e.version.clone(),
            provider: e.provenance.provider.clone(),
            published_at: v.published_at.clone(),
            accounting: e.accounting.clone(),
            tables: e
                .tables
                .iter()
                .map(|t| TableInfo {
                    name: t.name.clone(),
                    columns: t
                        .columns
                        .iter()
                        .map(|c| ColumnInfo {
                            name: c.name.clone(),
                            data_type: c.data_type.clone(),
                            role: c.role.clone(),
                            lower: c.lower,
                            upper: c.upper,
                            domain: c.domain.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// A query as a protocol received it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRequest {
    /// The dataset it runs on; empty: the schema its tables name (`FROM demo.encounters`).
    pub dataset: String,
    /// The SQL, as received.
    pub sql: String,
    /// ε (or ρ) to spend; the engine's default when none.
    pub epsilon: Option<f64>,
    /// δ for private key selection.
    pub delta: Option<f64>,
}

/// Running queries, per user and in total.
#[derive(Default)]
struct Running {
    per_user: HashMap<String, usize>,
    total: usize,
}

/// A claimed query slot, given back on drop.
struct Slot {
    running: Arc<Mutex<Running>>,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        r.total = r.total.saturating_sub(1);
        if let Some(n) = r.per_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.per_user.remove(&self.user);
            }
        }
    }
}

/// The gateway over one data directory.
pub struct Gateway {
    engine: DpEngine,
    accounts: Accounts,
    policies: Policies,
    catalog: SqliteCatalog,
    limits: Limits,
    running: Arc<Mutex<Running>>,
    audit_key: std::path::PathBuf,
}

impl Gateway {
    /// Opens the gateway on an initialised data directory (its `policies/` must validate).
    pub fn open(
        dir: &enclave::DataDir,
        limits: Limits,
        session_lifetime: Duration,
    ) -> Result<Gateway, GatewayError> {
        let policies = Policies::open(&dir.root().join("policies")).map_err(|e| match e {
            PolicyError::Io(..) => refused(
                "policies",
                "the data directory has no policies/ (run `enclave init` again to write the defaults)",
            ),
            other => refused("policies", other.to_string()),
        })?;
        Ok(Gateway {
            // Many queries at once: each in one partition, the cores shared among them.
            engine: DpEngine::open(dir)?
                .with_memory_limit(limits.query_memory)
                .with_partitions(1),
            accounts: Accounts::open(dir, session_lifetime)?,
            policies,
            catalog: dir.catalog()?,
            limits,
            running: Arc::new(Mutex::new(Running::default())),
            audit_key: dir.audit_public_key_path(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The ledger (budgets, grants, the audit log).
    pub(crate) fn ledger(&self) -> &enclave::ledger::Ledger {
        self.engine.ledger()
    }

    /// The audit public key exported at `enclave init` (what verification checks against).
    pub(crate) fn audit_key_path(&self) -> &std::path::Path {
        &self.audit_key
    }

    /// The catalog.
    pub(crate) fn catalog(&self) -> &SqliteCatalog {
        &self.catalog
    }

    /// The DP engine (for the card figures a board member releases).
    pub(crate) fn engine(&self) -> &DpEngine {
        &self.engine
    }

    /// The policies (so a listener can force a re-read, e.g. on SIGHUP).
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Opens a session with the user's token and current TOTP code.
    pub fn sign_in(
        &self,
        user: &str,
        token: &str,
        code: &str,
        peer: &Peer,
    ) -> Result<NewSession, GatewayError> {
        Ok(self.accounts.sign_in(
            user,
            token,
            code,
            &peer.address_group(),
            peer.protocol.name(),
            SystemTime::now(),
        )?)
    }

    /// Ends the session behind `secret` (recorded with the peer).
    pub fn sign_out(&self, secret: &str, peer: &Peer) -> Result<(), GatewayError> {
        let via = Via {
            origin: peer.protocol.name().to_owned(),
            peer: peer.addr.to_string(),
            ..Via::default()
        };
        Ok(self.accounts.sign_out(secret, &via)?)
    }

    /// The accounts, sessions and passkeys.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// The caller a session secret belongs to.
    pub fn caller(&self, session: &str) -> Result<Caller, GatewayError> {
        Ok(self.accounts.session(session, SystemTime::now())?)
    }

    /// The caller behind a password: a session secret, or `<token>:<totp>` with the user's name
    /// (which opens a session in one step). Flight's Basic handshake and pg's password use it.
    pub fn caller_from_password(
        &self,
        user: &str,
        password: &str,
        peer: &Peer,
    ) -> Result<(Caller, Option<NewSession>), GatewayError> {
        match password.rsplit_once(':') {
            Some((token, code)) if code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()) => {
                let new = self.sign_in(user, token, code, peer)?;
                let caller = self.caller(&new.session)?;
                Ok((caller, Some(new)))
            }
            _ => {
                let caller = self.caller(password)?;
                if caller.user != user {
                    return Err(GatewayError::Auth(AuthError::Session));
                }
                Ok((caller, None))
            }
        }
    }

    pub(crate) fn via(caller: &Caller, peer: &Peer, decision: String) -> Via {
        Via {
            origin: peer.protocol.name().to_owned(),
            peer: peer.addr.to_string(),
            session: caller.session_id.clone(),
            decision,
        }
    }

    /// Cedar's decision on `caller` querying `dataset` now.
    fn decide_query(
        &self,
        caller: &Caller,
        version: &VersionEntry,
    ) -> Result<(bool, String), GatewayError> {
        let grant = self
            .engine
            .ledger()
            .budget(&caller.user, &version.version.dataset)?
            .map(|b| GrantState {
                expires_at: b.expires_at.as_deref().map_or(i64::MAX, |t| {
                    chrono::DateTime::parse_from_rfc3339(t).map_or(i64::MIN, |t| t.timestamp())
                }),
            });
        let verdict = self
            .policies
            .current()
            .decide(
                caller,
                None,
                Action::Query,
                DatasetRef {
                    name: &version.version.dataset,
                    provider: &version.version.provenance.provider,
                },
                grant,
                SystemTime::now(),
            )
            .map_err(internal)?;
        Ok((verdict.allowed, verdict.summary()))
    }

    /// The datasets `caller` may query now (Cedar allows it), newest version of each; never a row count.
    pub fn datasets(&self, caller: &Caller) -> Result<Vec<DatasetInfo>, GatewayError> {
        let mut out = Vec::new();
        for summary in self.catalog.list().map_err(internal)? {
            let version = self
                .catalog
                .version(&summary.name, None)
                .map_err(internal)?;
            if self.decide_query(caller, &version)?.0 {
                out.push(DatasetInfo::of(&version));
            }
        }
        Ok(out)
    }

    /// The caller's budgets.
    pub fn budgets(&self, caller: &Caller) -> Result<Vec<Budget>, GatewayError> {
        Ok(self.engine.ledger().budgets(Some(&caller.user))?)
    }

    /// Checks the request's shape before anything is decided, and names its dataset: the request's, else
    /// the schema its tables name.
    fn resolve(&self, request: &QueryRequest) -> Result<QueryRequest, GatewayError> {
        if request.sql.len() > self.limits.max_request_bytes {
            return Err(GatewayError::BadRequest(format!(
                "the SQL is longer than {} bytes",
                self.limits.max_request_bytes
            )));
        }
        let mut resolved = request.clone();
        if resolved.dataset.is_empty() {
            resolved.dataset = enclave::dp::dataset_named_in(&request.sql).ok_or_else(|| {
                GatewayError::BadRequest(
                    "name the dataset as the tables' schema (SELECT … FROM \"my-dataset\".encounters) or choose a default one for the session".into(),
                )
            })?;
        }
        Ok(resolved)
    }

    /// Records a refusal the listener decided (a forged ticket, an unknown statement, no room): nothing
    /// is charged, and the record says who, from where and why. Returns the refusal to send.
    pub fn record_refusal(
        &self,
        caller: &Caller,
        peer: &Peer,
        what: &str,
        rule: &str,
        message: &str,
    ) -> GatewayError {
        let draft = Draft::query(
            &caller.user,
            &Self::via(caller, peer, String::new()),
            "",
            what,
        );
        match self.engine.ledger().refuse(&draft, rule, message) {
            Ok(record) => refused_with(rule, message, &record),
            Err(e) => e.into(),
        }
    }

    /// [`Gateway::record_refusal`] from async code: the record (which waits for the disk) is made on the
    /// blocking pool, not an async worker.
    pub async fn refuse_off_thread(
        self: &Arc<Self>,
        caller: &Caller,
        peer: &Peer,
        what: &str,
        rule: &str,
        message: &str,
    ) -> GatewayError {
        let (gateway, caller, peer) = (Arc::clone(self), caller.clone(), *peer);
        let (what, rule, message) = (what.to_owned(), rule.to_owned(), message.to_owned());
        tokio::task::spawn_blocking(move || {
            gateway.record_refusal(&caller, &peer, &what, &rule, &message)
        })
        .await
        .unwrap_or(GatewayError::Internal)
    }

    /// Authorizes the query: the dataset's latest version and Cedar's decision (a denial is recorded).
    fn authorize(
        &self,
        caller: &Caller,
        peer: &Peer,
        request: &QueryRequest,
    ) -> Result<Via, GatewayError> {
        // An unknown dataset and one the caller may not query get the same refusal: whether a dataset
        // exists is not the caller's to learn from it.
        let refuse = |decision: String| -> Result<Via, GatewayError> {
            let message = format!(
                "no dataset '{}' that {} may query (it does not exist, or there is no active, unexpired grant on it)",
                request.dataset, caller.user
            );
            let via = Self::via(caller, peer, decision);
            let draft = Draft::query(&caller.user, &via, &request.dataset, &request.sql);
            let record = self.engine.ledger().refuse(&draft, "access", &message)?;
            Err(refused_with("access", message, &record))
        };
        let version = match self.catalog.version(&request.dataset, None) {
            Ok(v) => v,
            Err(catalog::Error::UnknownDataset(_)) => {
                return refuse("deny [no such dataset]".into());
            }
            Err(e) => return Err(internal(e)),
        };
        let (allowed, decision) = self.decide_query(caller, &version)?;
        if !allowed {
            return refuse(decision);
        }
        let via = Self::via(caller, peer, decision);
        Ok(via)
    }

    /// Claims a running-query slot for `caller`, or records and refuses the query.
    fn claim(
        &self,
        caller: &Caller,
        via: &Via,
        request: &QueryRequest,
    ) -> Result<Slot, GatewayError> {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mine = r.per_user.get(&caller.user).copied().unwrap_or(0);
        let message = if mine >= self.limits.per_user {
            Some(format!(
                "{} already has {mine} queries running, the most one user may; wait for one to finish",
                caller.user
            ))
        } else if r.total >= self.limits.total {
            Some(
                "the enclave is answering as many queries as it may at once; try again shortly"
                    .into(),
            )
        } else {
            None
        };
        if let Some(message) = message {
            drop(r);
            let draft = Draft::query(&caller.user, via, &request.dataset, &request.sql);
            let record = self
                .engine
                .ledger()
                .refuse(&draft, "concurrency", &message)?;
            return Err(refused_with("concurrency", message, &record));
        }
        r.total += 1;
        *r.per_user.entry(caller.user.clone()).or_insert(0) += 1;
        Ok(Slot {
            running: Arc::clone(&self.running),
            user: caller.user.clone(),
        })
    }

    /// Answers a query for the signed-in `caller`: Cedar decides, the limits apply, the engine checks,
    /// runs, charges and records it. Every outcome is in the audit log when this returns.
    ///
    /// The engine runs as a task of its own: a client that goes away (a closed connection, a gRPC
    /// deadline) cannot cancel a query between its run and its charge, which would make a data-dependent
    /// outcome (how long it ran) free. The query finishes, is charged and recorded, and its answer is
    /// dropped.
    pub async fn query(
        self: &Arc<Self>,
        caller: &Caller,
        peer: &Peer,
        request: &QueryRequest,
    ) -> Result<DpAnswer, GatewayError> {
        // Cedar, the catalog and the limits, and the record of a refusal among them (which waits for
        // the disk), on the blocking pool rather than an async worker.
        let gateway = Arc::clone(self);
        let (asked, who, from) = (request.clone(), caller.clone(), *peer);
        let (request, via, slot) = tokio::task::spawn_blocking(move || {
            let request = gateway.resolve(&asked)?;
            let via = gateway.authorize(&who, &from, &request)?;
            let slot = gateway.claim(&who, &via, &request)?;
            Ok::<_, GatewayError>((request, via, slot))
        })
        .await
        .map_err(internal)??;
        let options = QueryOptions {
            epsilon: request.epsilon,
            delta: request.delta,
            via,
            timeout: Some(self.limits.query_timeout),
            max_groups: Some(self.limits.max_groups),
        };
        let gateway = Arc::clone(self);
        let user = caller.user.clone();
        let run = tokio::spawn(async move {
            let _slot = slot;
            gateway
                .engine
                .answer(&user, &request.dataset, &request.sql, &options)
                .await
        });
        Ok(run.await.map_err(internal)??)
    }

    /// Checks and plans a query without running or charging it (prepared statements): the request with
    /// its dataset named, the answer's columns and what it would cost. Authorization is decided as for
    /// [`Gateway::query`]; a denial or refusal is recorded (free), an accepted statement is recorded when
    /// it runs.
    pub async fn prepare(
        self: &Arc<Self>,
        caller: &Caller,
        peer: &Peer,
        request: &QueryRequest,
    ) -> Result<(QueryRequest, Prepared), GatewayError> {
        let gateway = Arc::clone(self);
        let (asked, who, from) = (request.clone(), caller.clone(), *peer);
        let (request, via) = tokio::task::spawn_blocking(move || {
            let request = gateway.resolve(&asked)?;
            let via = gateway.authorize(&who, &from, &request)?;
            Ok::<_, GatewayError>((request, via))
        })
        .await
        .map_err(internal)??;
        let options = QueryOptions {
            epsilon: request.epsilon,
            delta: request.delta,
            via,
            ..QueryOptions::default()
        };
        match self
            .engine
            .prepare(&caller.user, &request.dataset, &request.sql, &options)
            .await
        {
            Ok(prepared) => Ok((request, prepared)),
            Err(enclave::Error::Refused { rule, message, .. }) => {
                // The engine records nothing for a prepare; a refusal is still a request on record.
                let draft =
                    Draft::query(&caller.user, &options.via, &request.dataset, &request.sql);
                let record = self.engine.refuse(draft, rule.name(), &message).await?;
                Err(enclave::Error::Refused {
                    rule,
                    message,
                    receipt: record.receipt().map(Box::new),
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A shared gateway.
pub type SharedGateway = Arc<Gateway>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_are_grouped_by_their_64_and_ipv4_mapped_ones_as_ipv4() {
        let peer = |s: &str| Peer {
            protocol: Protocol::Http,
            addr: s.parse().expect("addr"),
        };
        assert_eq!(peer("10.1.2.3:5").address_group(), "10.1.2.3");
        assert_eq!(
            peer("[2001:db8:1:2:aaaa::1]:5").address_group(),
            peer("[2001:db8:1:2:ffff::9]:7").address_group()
        );
        assert_ne!(
            peer("[2001:db8:1:2::1]:5").address_group(),
            peer("[2001:db8:1:3::1]:5").address_group()
        );
        assert_eq!(peer("[::ffff:10.1.2.3]:5").address_group(), "10.1.2.3");
    }

    #[test]
    fn errors_name_their_rule_and_class() {
        let e = GatewayError::from(enclave::Error::Refused {
            rule: enclave::dp::Rule::RowLevel,
            message: "m".into(),
            receipt: None,
        });
        assert_eq!((e.rule(), e.kind()), ("row-level", ErrorKind::Invalid));
        let e = GatewayError::from(enclave::Error::Internal("secret detail".into()));
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(
            GatewayError::from(AuthError::RateLimited).kind(),
            ErrorKind::Busy
        );
    }
}
