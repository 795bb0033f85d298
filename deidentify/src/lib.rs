//! De-identification: the only crate that sees identifiable rows.
//!
//! It reads provider exports (CSV with built-in Synthea or file-given mappings, FHIR R4 Bundle JSON and
//! bulk NDJSON) as canonical records ([`read`]; [`read_file_ahead`] parses, and finds scrub patterns and
//! pseudonyms with a [`Prescan`], on threads of their own), and transforms them under a validated
//! [`policies::Profile`] ([`transform`]): keyed pseudonyms and per-person date shifts ([`keys`]),
//! national-ID check digits ([`ids`]), generalisation and coarsening, free-text scrubbing ([`mod@scrub`]) and
//! k-anonymity ([`kanon`]), and measures the re-identification risk of what it releases ([`risk`]). What comes out is Arrow record batches with no direct identifier left; writing them
//! (encrypted) and cataloguing them is the `enclave` crate's job. It writes nothing itself: the persons'
//! known identifiers, kept between the two passes, go to a [`KnownStore`] the caller provides (in memory
//! by default; the enclave's ingest spills them to an encrypted file).

pub mod baseline;
pub mod ids;
pub mod kanon;
pub mod keys;
pub(crate) mod names;
pub mod read;
pub mod risk;
pub mod scrub;
pub mod transform;
pub mod value;

pub use keys::{LinkageKey, Pseudonymizer};
pub use read::{
    Ahead, Discovery, Item, Pass, Rejected, SourceFile, SourceRecord, discover, read_file,
    read_file_ahead,
};
pub use risk::{ColumnRisk, RiskReport, SingledOut, TableRisk};
pub use scrub::{AgeRule, KnownIdentifiers, PhiKind, ScrubCounts, phi_spans, scrub, warm_up};
pub use transform::{
    Deidentifier, KnownStore, MemoryKnownStore, OutOfDomain, Prescan, REVIEW_PER_KIND,
    ReleasedColumn, ReviewItem, Skip, TableOutput,
};

/// Errors that stop a whole run (a bad row is never one of these: it is quarantined).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    /// A CSV file's header could not be read.
    #[error("cannot read CSV {0}: {1}")]
    Csv(String, String),
    /// Nothing to ingest at the input path.
    #[error("no CSV, NDJSON or JSON export found at {0}")]
    NoInput(String),
    /// The consumer of rows failed (writing output, for example).
    #[error("{0}")]
    Sink(String),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> Error {
        Error::Io(path.display().to_string(), e)
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
