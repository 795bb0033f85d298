//! The enclave core: keys, encrypted storage, the ingest pipeline, the DP engine with its budget ledger
//! and audit log. The `enclave` command, the demo generator and the benchmarks are in `enclave/cli`.
//!
//! ```text
//!  provider export ─► deidentify::read ─► deidentify::transform ─► storage::EncryptedWriter ─► catalog
//!   (CSV / FHIR)       canonical rows      profile actions,          Parquet modular encryption   one
//!                                          k-anonymity, scrubbing    (data key per version,       transaction
//!                                                                     wrapped by the master key)
//! ```
//!
//! Design goals, in order: no plaintext patient row at rest outside the provider's own files; no key
//! material in logs, errors or Parquet metadata (the footer carries only a key ID); fail closed on any
//! malformed configuration or input (bad rows go to the encrypted quarantine with a reason); memory
//! bounded by batch and row-group size, not by input size (what grows is ~100 bytes a patient; the
//! identifiers the scrubber needs wait in an encrypted spill file); nothing about a row leaves except
//! through `dp::DpEngine::answer`, charged and audited before it returns. A researcher's query reaches
//! DataFusion only as a validated syntax tree and rewritten plans, never as text built from what they
//! wrote, and every expression it may evaluate is total (`dp/total.rs`), so no row can make it fail.
//! Test hooks that weaken a protection (noise off, abort after charge, a decrypting session for the
//! tests to inspect what ingest wrote) compile only with the `danger-test-hooks` feature, which only the
//! tests enable. Besides `answer`, only `baseline` reads rows, and only of datasets a benchmark made.

pub mod access;
pub mod audit;
#[cfg(feature = "bench")]
pub mod baseline;
pub mod bounds;
pub mod card;
pub mod datadir;
pub mod dp;
pub mod ingest;
pub mod keys;
pub mod ledger;
pub mod metadata;
pub mod storage;

pub use datadir::DataDir;

/// Errors of the enclave core. Expected errors (bad configuration, bad input, wrong key) are distinct
/// from [`Error::Internal`], which means an invariant broke.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration or arguments are wrong.
    #[error("{0}")]
    Config(String),
    /// A key could not be found or opened.
    #[error("key error: {0}")]
    Key(String),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The profile or mapping is invalid.
    #[error(transparent)]
    Policy(#[from] policies::Error),
    /// The export could not be read.
    #[error(transparent)]
    Input(#[from] deidentify::Error),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    /// Too many rows were quarantined.
    #[error("{:.2}% of rows were quarantined, above the limit of {:.2}%; nothing was published\n{summary}", ratio * 100.0, limit * 100.0)]
    QuarantineLimit {
        /// Share quarantined.
        ratio: f64,
        /// Allowed share.
        limit: f64,
        /// The run's summary.
        summary: String,
    },
    /// The patients rows written fall into a class smaller than k (an internal check: what pass two
    /// wrote must be what k-anonymity counted).
    #[error(
        "k-anonymity check failed: a released class has {smallest} persons, fewer than k = {k}; nothing was published\n{summary}"
    )]
    KAnonymity {
        /// The profile's k.
        k: u32,
        /// The smallest class written.
        smallest: u64,
        /// The run's summary.
        summary: String,
    },
    /// A released column would single out more persons than the profile allows.
    #[error(
        "re-identification risk above the profile's limit (risk.max_unique_ratio = {limit}): {columns}; coarsen them (round, bin, top_code, truncate_time) or drop them; nothing was published\n{summary}"
    )]
    RiskLimit {
        /// The columns over the limit, with their share of persons singled out.
        columns: String,
        /// The limit.
        limit: f64,
        /// The run's summary.
        summary: String,
    },
    /// Parquet failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Arrow failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// DataFusion failed.
    #[error("query: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// JSON encoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A query was refused; `rule` names the rule (`budget`, `row-level`, …).
    #[error("refused by rule '{rule}': {message}")]
    Refused {
        /// The rule.
        rule: dp::Rule,
        /// What the user needs to know.
        message: String,
        /// The signed head of the refusal's audit record, once it is recorded (its receipt).
        receipt: Option<Box<audit::SignedHead>>,
    },
    /// A step of the access workflow was refused; `rule` names the rule (`four-eyes`, `access-state`, …).
    #[error("refused by rule '{rule}': {message}")]
    Access {
        /// The rule.
        rule: access::Rule,
        /// What the user needs to know.
        message: String,
    },
    /// The audit log does not verify.
    #[error("audit log broken at record {seq}: {why}")]
    AuditBroken {
        /// The first record that does not fit (0: the log's key itself).
        seq: i64,
        /// What is wrong with it.
        why: String,
    },
    /// An invariant broke.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Error {
        Error::Io(path.display().to_string(), e)
    }
}

/// Result with the enclave [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
