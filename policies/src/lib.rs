//! The de-identification policy model: the canonical tables, the typed profiles that say what happens to
//! every column, and the CSV column mappings. The default profiles ship inside this crate (`profiles/`).
//!
//! Everything here is parsed and validated up front ("parse, don't validate"): a [`Profile`] that exists
//! has one known action for every canonical column, identifiers are never kept, and bounds are sane. An
//! invalid file is refused with its path, line and reason before the pipeline reads a single row.

pub mod coarsen;
pub mod mapping;
pub mod profile;
pub mod schema;

pub use coarsen::{Coarsening, Grid, TimeGrain};
pub use mapping::CsvMapping;
pub use profile::{
    Action, ChosenBounds, ColumnRule, DpAccounting, Generalization, KAnonymity, LinkKey, Profile,
    RiskLimits, Role,
};
pub use schema::{ColumnType, Table};

/// The profiles compiled into the binary: `(name, file text)`.
pub const BUILTIN_PROFILES: [(&str, &str); 2] = [
    (
        "hipaa-safe-harbor",
        include_str!("../profiles/hipaa-safe-harbor.toml"),
    ),
    (
        "jp-pseudonymized-medical",
        include_str!("../profiles/jp-pseudonymized-medical.toml"),
    ),
];

/// The built-in profile with this name, as `(file name, text)`.
pub fn builtin_profile(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "hipaa-safe-harbor" => Some(("profiles/hipaa-safe-harbor.toml", BUILTIN_PROFILES[0].1)),
        "jp-pseudonymized-medical" => Some((
            "profiles/jp-pseudonymized-medical.toml",
            BUILTIN_PROFILES[1].1,
        )),
        _ => None,
    }
}

/// Errors from loading profiles and mappings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is not a valid profile or mapping.
    #[error("{file}:{line}: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Neither a built-in profile nor an existing file.
    #[error("unknown profile '{name}': not a file, and not one of the built-in profiles ({known})")]
    UnknownProfile {
        /// What was asked for.
        name: String,
        /// The built-in names.
        known: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
