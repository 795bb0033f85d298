//! The dataset catalog: what every dataset version is, where it came from, and what was done to it.
//!
//! A dataset is a named release; each ingest publishes a new *version* of it with its tables, columns
//! (type, role, de-identification action, DP bounds), provenance (provider, source system, extraction time,
//! legal basis, consent scope), coverage (persons, time span) and the ingest report. Versions become
//! visible in one transaction ([`CatalogStore::publish`]), so a reader never sees half a version.
//!
//! [`SqliteCatalog`] is the embedded default (one `enclave.db` in the data directory); the
//! [`CatalogStore`] trait is the seam for a shared server database. The catalog holds metadata only:
//! never a row value, never key material.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed.
    #[error("catalog database: {0}")]
    Db(#[from] rusqlite::Error),
    /// No such dataset (or version).
    #[error("unknown dataset '{0}'")]
    UnknownDataset(String),
    /// A version with this label exists already.
    #[error("dataset '{dataset}' already has a version '{version}'")]
    VersionExists {
        /// Dataset.
        dataset: String,
        /// Version label.
        version: String,
    },
    /// A stored report could not be encoded or decoded.
    #[error("catalog report encoding: {0}")]
    Json(#[from] serde_json::Error),
    /// A version's card figures were released already (once per version).
    #[error(
        "the card figures of '{dataset}' version '{version}' were released already (or are being released)"
    )]
    CardReleased {
        /// Dataset.
        dataset: String,
        /// Version label.
        version: String,
    },
}

/// A version's DP-released card figures, as stored: who released them, when, under what budget, and the
/// figures themselves (`enclave::card` writes and reads them; the catalog keeps them opaque).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardRelease {
    /// Dataset.
    pub dataset: String,
    /// Version label.
    pub version: String,
    /// The board member who released them.
    pub released_by: String,
    /// When (RFC 3339).
    pub released_at: String,
    /// The released figures.
    pub figures: serde_json::Value,
}

/// Result with the catalog [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a version came from and under what terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The contributing provider (hospital) ID.
    pub provider: String,
    /// The system the export came from (`synthea-csv`, `fhir-r4-ndjson`, …).
    pub source_system: String,
    /// When the export was read (RFC 3339).
    pub extracted_at: String,
    /// The legal basis for processing.
    pub legal_basis: String,
    /// What the patients consented to, or the basis that replaces consent.
    pub consent_scope: String,
    /// The de-identification profile applied.
    pub profile: String,
}

/// Who and what period a version covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Coverage {
    /// Distinct persons released.
    pub persons: u64,
    /// Earliest released event date (after shifting or generalisation).
    pub time_start: Option<String>,
    /// Latest released event date.
    pub time_end: Option<String>,
}

/// One released column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnEntry {
    /// Output name.
    pub name: String,
    /// Arrow data type, as text (`Utf8`, `Int32`, `Date32`, …).
    pub data_type: String,
    /// identifier | quasi_identifier | sensitive | value.
    pub role: String,
    /// The de-identification applied (`keep`, `pseudonymize`, `generalize: year`, …).
    pub action: String,
    /// Public lower clamping bound for DP.
    pub lower: Option<f64>,
    /// Public upper clamping bound for DP.
    pub upper: Option<f64>,
    /// Public domain of a categorical column (every value a group key can take).
    #[serde(default)]
    pub domain: Option<Vec<String>>,
}

/// One released table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Canonical name.
    pub name: String,
    /// Its file, relative to the version's storage directory.
    pub file: String,
    /// Rows written.
    pub rows: u64,
    /// Its columns in order.
    pub columns: Vec<ColumnEntry>,
    /// At most how many rows of this table one person contributes to a DP query: declared by the profile
    /// (and enforced at ingest), or chosen from the data under DP (then `chosen` says how). `None`:
    /// bounded by the version's `max_contributions`.
    #[serde(default)]
    pub max_rows_per_person: Option<u32>,
    /// How a data-chosen bound was released: the quantile of rows per person and the ε it cost.
    #[serde(default)]
    pub chosen: Option<ChosenBound>,
}

/// A contribution bound chosen from the data under DP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChosenBound {
    /// The quantile of rows per person released (e.g. 0.99).
    pub quantile: f64,
    /// The ε its private quantile cost (charged to the dataset's `catalog` budget).
    pub epsilon: f64,
}

impl ColumnEntry {
    /// The action as a rule, without what applying it to the rows gave (counts of persons recoded or
    /// values withheld follow the first `;` and are exact figures: the board's only).
    pub fn action_rule(&self) -> &str {
        self.action.split(';').next().unwrap_or("").trim()
    }
}

impl TableEntry {
    /// How many rows of this table one person contributes to a DP query at most.
    pub fn contribution_bound(&self, max_contributions: u32) -> u32 {
        self.max_rows_per_person.unwrap_or(max_contributions).max(1)
    }

    /// The bound for means (AVG, VARIANCE, STDDEV). A bound chosen from the data is a high quantile of
    /// rows per person, so that totals lose little to truncation; a mean loses little to a smaller one
    /// (every row of a person weighs the same, so truncation only reweighs persons) and its noise grows
    /// with the bound, so means use the smaller of the chosen bound and `max_contributions`. A declared
    /// bound is a fact about the table (enforced at ingest) and serves both.
    pub fn mean_bound(&self, max_contributions: u32) -> u32 {
        let k = self.contribution_bound(max_contributions);
        if self.chosen.is_some() {
            k.min(max_contributions.max(1))
        } else {
            k
        }
    }
}

/// A version about to be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewVersion {
    /// Dataset name.
    pub dataset: String,
    /// Version label.
    pub version: String,
    /// Storage directory of the version, relative to the data directory.
    pub storage_path: String,
    /// ID of the version's (wrapped) data key.
    pub key_id: String,
    /// Provenance.
    pub provenance: Provenance,
    /// Coverage.
    pub coverage: Coverage,
    /// Rows one person may contribute to a DP query.
    pub max_contributions: u32,
    /// Privacy accounting of queries on this version: `basic` ((ε, δ)) or `zcdp` (ρ).
    #[serde(default = "basic")]
    pub accounting: String,
    /// Tables.
    pub tables: Vec<TableEntry>,
    /// The ingest report (JSON).
    pub report: serde_json::Value,
}

fn basic() -> String {
    "basic".into()
}

impl NewVersion {
    /// The table called `name`.
    pub fn table(&self, name: &str) -> Option<&TableEntry> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// How many rows of table `name` one person contributes to a DP query at most (the version's
    /// `max_contributions` for a table it does not have).
    pub fn contribution_bound(&self, name: &str) -> u32 {
        self.table(name).map_or(self.max_contributions.max(1), |t| {
            t.contribution_bound(self.max_contributions)
        })
    }

    /// Whether ingest made sure no person has more rows of table `name` than its bound (a bound the
    /// profile declared: extra rows were quarantined). Otherwise a query may leave rows out.
    pub fn bound_enforced(&self, name: &str) -> bool {
        self.table(name)
            .is_some_and(|t| t.max_rows_per_person.is_some() && t.chosen.is_none())
    }

    /// The bound of table `name` for means (see [`TableEntry::mean_bound`]).
    pub fn mean_bound(&self, name: &str) -> u32 {
        self.table(name).map_or(self.max_contributions.max(1), |t| {
            t.mean_bound(self.max_contributions)
        })
    }
}

/// A published version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionEntry {
    /// Everything that was published.
    #[serde(flatten)]
    pub version: NewVersion,
    /// When it was published (RFC 3339).
    pub published_at: String,
}

/// One line of `catalog list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Dataset name.
    pub name: String,
    /// Number of versions.
    pub versions: u64,
    /// Latest version label.
    pub latest: String,
    /// Providers that contributed.
    pub providers: Vec<String>,
    /// Persons in the latest version.
    pub persons: u64,
    /// Rows over all tables of the latest version.
    pub rows: u64,
}

/// The catalog's storage interface.
pub trait CatalogStore: Send + Sync {
    /// Makes a version visible, with all its tables and columns, in one transaction.
    fn publish(&self, version: &NewVersion) -> Result<()>;
    /// Every dataset, by name.
    fn list(&self) -> Result<Vec<DatasetSummary>>;
    /// One version (the latest when `version` is `None`).
    fn version(&self, dataset: &str, version: Option<&str>) -> Result<VersionEntry>;
    /// Every version of a dataset, oldest first.
    fn versions(&self, dataset: &str) -> Result<Vec<VersionEntry>>;
    /// The label the next automatic version gets (`1`, `2`, …).
    fn next_version_label(&self, dataset: &str) -> Result<String>;
}

/// The embedded SQLite catalog.
pub struct SqliteCatalog {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS catalog_datasets (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS catalog_versions (
    id INTEGER PRIMARY KEY,
    dataset TEXT NOT NULL REFERENCES catalog_datasets(name),
    version TEXT NOT NULL,
    seq INTEGER NOT NULL,
    storage_path TEXT NOT NULL,
    key_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    source_system TEXT NOT NULL,
    extracted_at TEXT NOT NULL,
    legal_basis TEXT NOT NULL,
    consent_scope TEXT NOT NULL,
    profile TEXT NOT NULL,
    persons INTEGER NOT NULL,
    time_start TEXT,
    time_end TEXT,
    max_contributions INTEGER NOT NULL,
    accounting TEXT NOT NULL DEFAULT 'basic',
    report TEXT NOT NULL,
    published_at TEXT NOT NULL,
    UNIQUE (dataset, version)
);
CREATE TABLE IF NOT EXISTS catalog_tables (
    version_id INTEGER NOT NULL REFERENCES catalog_versions(id),
    name TEXT NOT NULL,
    file TEXT NOT NULL,
    rows INTEGER NOT NULL,
    PRIMARY KEY (version_id, name)
);
CREATE TABLE IF NOT EXISTS catalog_columns (
    version_id INTEGER NOT NULL,
    table_name TEXT NOT NULL,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    data_type TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    lower REAL,
    upper REAL,
    domain TEXT,
    PRIMARY KEY (version_id, table_name, name),
    FOREIGN KEY (version_id, table_name) REFERENCES catalog_tables(version_id, name)
);
CREATE TABLE IF NOT EXISTS catalog_card_releases (
    version_id INTEGER PRIMARY KEY REFERENCES catalog_versions(id),
    released_by TEXT NOT NULL,
    released_at TEXT NOT NULL,
    figures TEXT NOT NULL
);
";

/// Opens the enclave's SQLite database at `path` the one way every part does (catalog, keystore, ledger
/// and audit log share the file): write-ahead log, `synchronous = FULL` (a committed transaction survives
/// a power cut), foreign keys enforced, and a 30 s wait for the write lock instead of failing at once.
pub fn open_database(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

impl SqliteCatalog {
    /// Opens (and creates if needed) the catalog tables in the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteCatalog> {
        let conn = open_database(path)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(SqliteCatalog {
            conn: Mutex::new(conn),
        })
    }

    /// Claims a version's card release before it runs (one statement: of two at once, one claims it);
    /// a version claimed or released already is refused.
    pub fn claim_card_release(&self, dataset: &str, version: &str, by: &str) -> Result<()> {
        self.with(|conn| {
            let id = version_id(conn, dataset, version)?;
            let claimed = conn.execute(
                "INSERT INTO catalog_card_releases (version_id, released_by, released_at, figures)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT(version_id) DO NOTHING",
                params![id, by, chrono::Utc::now().to_rfc3339(), PENDING],
            )?;
            if claimed == 0 {
                return Err(Error::CardReleased {
                    dataset: dataset.to_owned(),
                    version: version.to_owned(),
                });
            }
            Ok(())
        })
    }

    /// Gives up a claim whose release failed (a released card stays).
    pub fn unclaim_card_release(&self, dataset: &str, version: &str) -> Result<()> {
        self.with(|conn| {
            let id = version_id(conn, dataset, version)?;
            conn.execute(
                "DELETE FROM catalog_card_releases WHERE version_id = ?1 AND figures = ?2",
                params![id, PENDING],
            )?;
            Ok(())
        })
    }

    /// Keeps the figures of a claimed release.
    pub fn put_card_release(&self, release: &CardRelease) -> Result<()> {
        let figures = serde_json::to_string(&release.figures)?;
        self.with(|conn| {
            let id = version_id(conn, &release.dataset, &release.version)?;
            let stored = conn.execute(
                "UPDATE catalog_card_releases SET released_by = ?2, released_at = ?3, figures = ?4
                 WHERE version_id = ?1 AND figures = ?5",
                params![
                    id,
                    release.released_by,
                    release.released_at,
                    figures,
                    PENDING
                ],
            )?;
            if stored == 0 {
                return Err(Error::CardReleased {
                    dataset: release.dataset.clone(),
                    version: release.version.clone(),
                });
            }
            Ok(())
        })
    }

    /// A version's released card figures, if they were released.
    pub fn card_release(&self, dataset: &str, version: &str) -> Result<Option<CardRelease>> {
        self.with(|conn| {
            let id = version_id(conn, dataset, version)?;
            let row: Option<(String, String, String)> = conn
                .query_row(
                    "SELECT released_by, released_at, figures FROM catalog_card_releases
                     WHERE version_id = ?1 AND figures <> ?2",
                    params![id, PENDING],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            row.map(|(released_by, released_at, figures)| {
                Ok(CardRelease {
                    dataset: dataset.to_owned(),
                    version: version.to_owned(),
                    released_by,
                    released_at,
                    figures: serde_json::from_str(&figures)?,
                })
            })
            .transpose()
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // A poisoned lock only means another thread panicked mid-call; SQLite's own transaction rolled back.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    fn load_version(conn: &Connection, id: i64) -> Result<VersionEntry> {
        let (mut entry, published_at) = conn.query_row(
            "SELECT dataset, version, storage_path, key_id, provider, source_system, extracted_at, legal_basis,
                    consent_scope, profile, persons, time_start, time_end, max_contributions, report, published_at,
                    accounting
             FROM catalog_versions WHERE id = ?1",
            [id],
            |r| {
                let report: String = r.get(14)?;
                Ok((
                    NewVersion {
                        dataset: r.get(0)?,
                        version: r.get(1)?,
                        storage_path: r.get(2)?,
                        key_id: r.get(3)?,
                        provenance: Provenance {
                            provider: r.get(4)?,
                            source_system: r.get(5)?,
                            extracted_at: r.get(6)?,
                            legal_basis: r.get(7)?,
                            consent_scope: r.get(8)?,
                            profile: r.get(9)?,
                        },
                        coverage: Coverage { persons: r.get(10)?, time_start: r.get(11)?, time_end: r.get(12)? },
                        max_contributions: r.get(13)?,
                        accounting: r.get(16)?,
                        tables: Vec::new(),
                        report: serde_json::Value::String(report),
                    },
                    r.get::<_, String>(15)?,
                ))
            },
        )?;
        if let serde_json::Value::String(text) = &entry.report {
            entry.report = serde_json::from_str(text)?;
        }
        let mut tables = conn.prepare(
            "SELECT name, file, rows, max_rows_per_person, bound_quantile, bound_epsilon FROM catalog_tables
             WHERE version_id = ?1 ORDER BY rowid",
        )?;
        let mut columns = conn.prepare(
            "SELECT name, data_type, role, action, lower, upper, domain FROM catalog_columns
             WHERE version_id = ?1 AND table_name = ?2 ORDER BY position",
        )?;
        let table_rows = tables
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, Option<u32>>(3)?,
                    r.get::<_, Option<f64>>(4)?
                        .zip(r.get::<_, Option<f64>>(5)?)
                        .map(|(quantile, epsilon)| ChosenBound { quantile, epsilon }),
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        for (name, file, rows, max_rows_per_person, chosen) in table_rows {
            let cols = columns
                .query_map(params![id, name], |r| {
                    Ok(ColumnEntry {
                        name: r.get(0)?,
                        data_type: r.get(1)?,
                        role: r.get(2)?,
                        action: r.get(3)?,
                        lower: r.get(4)?,
                        upper: r.get(5)?,
                        domain: r
                            .get::<_, Option<String>>(6)?
                            .and_then(|d| serde_json::from_str(&d).ok()),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            entry.tables.push(TableEntry {
                name,
                file,
                rows,
                columns: cols,
                max_rows_per_person,
                chosen,
            });
        }
        Ok(VersionEntry {
            version: entry,
            published_at,
        })
    }
}

/// Columns added after the first release, added to older databases on open.
const ADDED_COLUMNS: [(&str, &str, &str); 5] = [
    (
        "catalog_versions",
        "accounting",
        "TEXT NOT NULL DEFAULT 'basic'",
    ),
    ("catalog_columns", "domain", "TEXT"),
    ("catalog_tables", "max_rows_per_person", "INTEGER"),
    ("catalog_tables", "bound_quantile", "REAL"),
    ("catalog_tables", "bound_epsilon", "REAL"),
];

/// The `figures` of a card release that was claimed and has not finished.
const PENDING: &str = "pending";

/// The row id of a dataset's version.
fn version_id(conn: &Connection, dataset: &str, version: &str) -> Result<i64> {
    conn.query_row(
        "SELECT id FROM catalog_versions WHERE dataset = ?1 AND version = ?2",
        [dataset, version],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| Error::UnknownDataset(dataset.to_owned()))
}

fn migrate(conn: &Connection) -> Result<()> {
    for (table, column, decl) in ADDED_COLUMNS {
        let present = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

impl CatalogStore for SqliteCatalog {
    fn publish(&self, v: &NewVersion) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let now = chrono::Utc::now().to_rfc3339();
            tx.execute(
                "INSERT INTO catalog_datasets (name, created_at) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                params![v.dataset, now],
            )?;
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT id FROM catalog_versions WHERE dataset = ?1 AND version = ?2",
                    params![v.dataset, v.version],
                    |r| r.get(0),
                )
                .optional()?;
            if exists.is_some() {
                return Err(Error::VersionExists { dataset: v.dataset.clone(), version: v.version.clone() });
            }
            let seq: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM catalog_versions WHERE dataset = ?1",
                [&v.dataset],
                |r| r.get(0),
            )?;
            let p = &v.provenance;
            tx.execute(
                "INSERT INTO catalog_versions (dataset, version, seq, storage_path, key_id, provider, source_system,
                    extracted_at, legal_basis, consent_scope, profile, persons, time_start, time_end,
                    max_contributions, report, published_at, accounting)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                params![
                    v.dataset, v.version, seq, v.storage_path, v.key_id, p.provider, p.source_system,
                    p.extracted_at, p.legal_basis, p.consent_scope, p.profile, v.coverage.persons,
                    v.coverage.time_start, v.coverage.time_end, v.max_contributions,
                    serde_json::to_string(&v.report)?, now, v.accounting
                ],
            )?;
            let id = tx.last_insert_rowid();
            for t in &v.tables {
                tx.execute(
                    "INSERT INTO catalog_tables (version_id, name, file, rows, max_rows_per_person,
                        bound_quantile, bound_epsilon) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        id,
                        t.name,
                        t.file,
                        t.rows,
                        t.max_rows_per_person,
                        t.chosen.map(|c| c.quantile),
                        t.chosen.map(|c| c.epsilon)
                    ],
                )?;
                for (pos, c) in t.columns.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO catalog_columns (version_id, table_name, position, name, data_type, role, action,
                            lower, upper, domain) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                        params![
                            id, t.name, pos, c.name, c.data_type, c.role, c.action, c.lower, c.upper,
                            c.domain.as_ref().map(serde_json::to_string).transpose()?
                        ],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn list(&self) -> Result<Vec<DatasetSummary>> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT d.name, COUNT(v.id), (SELECT id FROM catalog_versions WHERE dataset = d.name ORDER BY seq DESC LIMIT 1)
                 FROM catalog_datasets d JOIN catalog_versions v ON v.dataset = d.name GROUP BY d.name ORDER BY d.name",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?, r.get::<_, i64>(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::new();
            for (name, versions, latest_id) in rows {
                let latest = Self::load_version(conn, latest_id)?;
                let mut providers = conn
                    .prepare("SELECT DISTINCT provider FROM catalog_versions WHERE dataset = ?1 ORDER BY provider")?
                    .query_map([&name], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                providers.dedup();
                out.push(DatasetSummary {
                    name,
                    versions,
                    latest: latest.version.version.clone(),
                    providers,
                    persons: latest.version.coverage.persons,
                    rows: latest.version.tables.iter().map(|t| t.rows).sum(),
                });
            }
            Ok(out)
        })
    }

    fn version(&self, dataset: &str, version: Option<&str>) -> Result<VersionEntry> {
        self.with(|conn| {
            let id: Option<i64> = match version {
                Some(v) => conn
                    .query_row(
                        "SELECT id FROM catalog_versions WHERE dataset = ?1 AND version = ?2",
                        params![dataset, v],
                        |r| r.get(0),
                    )
                    .optional()?,
                None => conn
                    .query_row(
                        "SELECT id FROM catalog_versions WHERE dataset = ?1 ORDER BY seq DESC LIMIT 1",
                        [dataset],
                        |r| r.get(0),
                    )
                    .optional()?,
            };
            let id = id.ok_or_else(|| Error::UnknownDataset(match version {
                Some(v) => format!("{dataset}@{v}"),
                None => dataset.to_owned(),
            }))?;
            Self::load_version(conn, id)
        })
    }

    fn versions(&self, dataset: &str) -> Result<Vec<VersionEntry>> {
        self.with(|conn| {
            let ids = conn
                .prepare("SELECT id FROM catalog_versions WHERE dataset = ?1 ORDER BY seq")?
                .query_map([dataset], |r| r.get::<_, i64>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            if ids.is_empty() {
                return Err(Error::UnknownDataset(dataset.to_owned()));
            }
            ids.into_iter()
                .map(|id| Self::load_version(conn, id))
                .collect()
        })
    }

    fn next_version_label(&self, dataset: &str) -> Result<String> {
        self.with(|conn| {
            let n: i64 = conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM catalog_versions WHERE dataset = ?1",
                [dataset],
                |r| r.get(0),
            )?;
            Ok(n.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: &str) -> NewVersion {
        NewVersion {
            dataset: "cohort".into(),
            version: version.into(),
            storage_path: format!("datasets/cohort/{version}"),
            key_id: format!("dk-{version}"),
            provenance: Provenance {
                provider: "H1".into(),
                source_system: "synthea-csv".into(),
                extracted_at: "2026-11-25T00:00:00Z".into(),
                legal_basis: "test".into(),
                consent_scope: "research".into(),
                profile: "hipaa-safe-harbor".into(),
            },
            coverage: Coverage {
                persons: 3,
                time_start: Some("2001".into()),
                time_end: Some("2020".into()),
            },
            max_contributions: 10,
            accounting: "basic".into(),
            tables: vec![TableEntry {
                name: "patients".into(),
                file: "patients.parquet".into(),
                rows: 3,
                columns: vec![ColumnEntry {
                    name: "person_id".into(),
                    data_type: "Utf8".into(),
                    role: "identifier".into(),
                    action: "pseudonymize".into(),
                    lower: None,
                    upper: None,
                    domain: Some(vec!["a".into()]),
                }],
                max_rows_per_person: Some(1),
                chosen: Some(ChosenBound {
                    quantile: 0.99,
                    epsilon: 0.1,
                }),
            }],
            report: serde_json::json!({"rows_in": 3}),
        }
    }

    #[test]
    fn a_database_from_before_the_added_columns_is_migrated_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("enclave.db");
        let old_schema = SCHEMA
            .replace("    accounting TEXT NOT NULL DEFAULT 'basic',\n", "")
            .replace("    domain TEXT,\n", "");
        assert_ne!(old_schema, SCHEMA);
        Connection::open(&db)
            .expect("open")
            .execute_batch(&old_schema)
            .expect("old schema");
        let cat = SqliteCatalog::open(&db).expect("migrates");
        cat.publish(&sample("1"))
            .expect("publish into a migrated database");
        assert_eq!(
            cat.version("cohort", None)
                .expect("read")
                .version
                .accounting,
            "basic"
        );
    }

    #[test]
    fn a_card_release_is_claimed_once_and_reads_back_only_when_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cat = SqliteCatalog::open(&dir.path().join("enclave.db")).expect("open");
        cat.publish(&sample("1")).expect("publish");
        assert!(matches!(
            cat.claim_card_release("nope", "1", "carol"),
            Err(Error::UnknownDataset(_))
        ));
        cat.claim_card_release("cohort", "1", "carol")
            .expect("claim");
        // A second release at the same time is refused; the pending one is not a release yet.
        assert!(matches!(
            cat.claim_card_release("cohort", "1", "dave"),
            Err(Error::CardReleased { .. })
        ));
        assert_eq!(cat.card_release("cohort", "1").expect("read"), None);
        // A failed release gives the claim back.
        cat.unclaim_card_release("cohort", "1").expect("unclaim");
        cat.claim_card_release("cohort", "1", "carol")
            .expect("claim again");
        let release = CardRelease {
            dataset: "cohort".into(),
            version: "1".into(),
            released_by: "carol".into(),
            released_at: "2026-11-26T00:00:00Z".into(),
            figures: serde_json::json!({"persons": {"value": 10.0}}),
        };
        cat.put_card_release(&release).expect("store");
        assert_eq!(
            cat.card_release("cohort", "1").expect("read"),
            Some(release.clone())
        );
        // Released: no second claim, no second store, and an unclaim leaves it.
        assert!(cat.claim_card_release("cohort", "1", "dave").is_err());
        assert!(cat.put_card_release(&release).is_err());
        cat.unclaim_card_release("cohort", "1").expect("no-op");
        assert_eq!(
            cat.card_release("cohort", "1").expect("read"),
            Some(release)
        );
    }

    #[test]
    fn publish_then_read_back_and_refuse_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cat = SqliteCatalog::open(&dir.path().join("enclave.db")).expect("open");
        assert_eq!(cat.next_version_label("cohort").expect("label"), "1");
        cat.publish(&sample("1")).expect("publish");
        cat.publish(&sample("2")).expect("publish");
        assert!(matches!(
            cat.publish(&sample("2")),
            Err(Error::VersionExists { .. })
        ));
        let latest = cat.version("cohort", None).expect("latest");
        assert_eq!(latest.version, sample("2"));
        assert_eq!(
            cat.version("cohort", Some("1")).expect("v1").version,
            sample("1")
        );
        let list = cat.list().expect("list");
        assert_eq!((list.len(), list[0].versions, list[0].rows), (1, 2, 3));
        assert!(matches!(
            cat.version("nope", None),
            Err(Error::UnknownDataset(_))
        ));
        assert_eq!(cat.next_version_label("cohort").expect("label"), "3");
    }
}
