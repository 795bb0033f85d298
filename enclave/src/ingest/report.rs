//! The ingest report: rows in, written, quarantined and suppressed per table, persons, k-anonymity, the
//! action applied to each column, and timings; printed for the provider and kept in the catalog.

use std::collections::BTreeMap;

use serde::Serialize;

/// Row accounting of one table.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RowCounts {
    /// Rows read from the export.
    pub rows_in: u64,
    /// Rows written.
    pub written: u64,
    /// Rows quarantined.
    pub quarantined: u64,
    /// Rows withheld because k-anonymity suppressed their person.
    pub suppressed: u64,
}

impl RowCounts {
    pub(super) fn add(&mut self, o: &RowCounts) {
        self.rows_in += o.rows_in;
        self.written += o.written;
        self.quarantined += o.quarantined;
        self.suppressed += o.suppressed;
    }

    /// True when every row is accounted for.
    pub fn balanced(&self) -> bool {
        self.rows_in == self.written + self.quarantined + self.suppressed
    }
}

/// Persons in the export and what became of them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PersonCounts {
    /// Valid patients read.
    pub in_export: u64,
    /// Patients released.
    pub released: u64,
    /// Patients suppressed by k-anonymity.
    pub suppressed: u64,
    /// Patients whose person_id comes from a (validated) national ID, so they link across providers.
    pub linked_by_national_id: u64,
}

/// The k-anonymity outcome.
#[derive(Debug, Clone, Serialize)]
pub struct KAnonReport {
    /// k the profile requires.
    pub k_required: u32,
    /// Smallest released class.
    pub k_reached: u64,
    /// Classes released.
    pub classes: u64,
    /// Extra generalisation level per quasi-identifier.
    pub generalisation_levels: BTreeMap<String, u8>,
    /// Persons suppressed.
    pub suppressed_persons: u64,
    /// Per quasi-identifier, persons recoded locally (a wider band or a withheld value) above the
    /// global level.
    #[serde(default)]
    pub recoded_persons: BTreeMap<String, u64>,
    /// Per quasi-identifier, released persons whose value is withheld.
    #[serde(default)]
    pub withheld_values: BTreeMap<String, u64>,
}

/// One column's treatment.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnAction {
    /// Output column.
    pub column: String,
    /// Role.
    pub role: String,
    /// What was done.
    pub action: String,
}

/// The ingest report: counts and actions only, never a value.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    /// Dataset.
    pub dataset: String,
    /// Version label.
    pub version: String,
    /// Provider.
    pub provider: String,
    /// Profile.
    pub profile: String,
    /// Detected source system.
    pub source_system: String,
    /// Start (RFC 3339).
    pub started_at: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Peak resident memory of the ingesting process, KiB (Linux; 0 where unknown).
    #[serde(default)]
    pub peak_rss_kib: u64,
    /// Files read.
    pub files_read: Vec<String>,
    /// Files not read, with why.
    pub files_skipped: BTreeMap<String, String>,
    /// FHIR resources outside the model, by type (not ingested).
    pub resources_not_modelled: BTreeMap<String, u64>,
    /// Per-table accounting.
    pub tables: BTreeMap<String, RowCounts>,
    /// All tables.
    pub totals: RowCounts,
    /// Quarantine reasons with counts.
    pub quarantine_reasons: BTreeMap<String, u64>,
    /// Persons.
    pub persons: PersonCounts,
    /// k-anonymity.
    pub k_anonymity: Option<KAnonReport>,
    /// Free-text placeholders inserted, per kind.
    pub scrubbed: BTreeMap<String, u64>,
    /// Scrubbed spans kept in their context for the provider's review (the version's encrypted
    /// `review.parquet`, read with `enclave catalog review`), per kind.
    #[serde(default)]
    pub review_sample: BTreeMap<String, u64>,
    /// Values outside a column's declared domain, per `table.column`: mapped to its `other` key, or
    /// their rows quarantined.
    pub out_of_domain: BTreeMap<String, deidentify::OutOfDomain>,
    /// Event times withheld because they fell inside the person's released birth band (and would have
    /// narrowed it), per `table.column`.
    #[serde(default)]
    pub withheld_event_times: BTreeMap<String, u64>,
    /// Re-identification risk of the released tables.
    pub risk: Option<deidentify::RiskReport>,
    /// Date shift window (days, ±).
    pub date_shift_days: u32,
    /// Per table, every released column and its treatment.
    pub actions: BTreeMap<String, Vec<ColumnAction>>,
}

impl IngestReport {
    /// The human summary.
    pub fn summary(&self) -> String {
        let t = &self.totals;
        let mut s = format!(
            "ingested {}@{} from provider {} under profile {} ({})\n",
            self.dataset, self.version, self.provider, self.profile, self.source_system
        );
        s += &format!(
            "rows in {} = written {} + quarantined {} + suppressed {}{}\n",
            t.rows_in,
            t.written,
            t.quarantined,
            t.suppressed,
            if t.balanced() { "" } else { "  (UNBALANCED)" }
        );
        for (name, c) in &self.tables {
            s += &format!(
                "  {name:<13} in {:>9}  written {:>9}  quarantined {:>7}  suppressed {:>7}\n",
                c.rows_in, c.written, c.quarantined, c.suppressed
            );
        }
        s += &format!(
            "persons: {} in export, {} released, {} suppressed, {} linked by national ID\n",
            self.persons.in_export,
            self.persons.released,
            self.persons.suppressed,
            self.persons.linked_by_national_id
        );
        if let Some(k) = &self.k_anonymity {
            s += &format!(
                "k-anonymity: required k = {}, reached k = {} over {} classes",
                k.k_required, k.k_reached, k.classes
            );
            let lv: Vec<String> = k
                .generalisation_levels
                .iter()
                .filter(|(_, l)| **l > 0)
                .map(|(c, l)| format!("{c} +{l}"))
                .collect();
            if !lv.is_empty() {
                s += &format!("; generalised further: {}", lv.join(", "));
            }
            let local: Vec<String> = k
                .recoded_persons
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| {
                    let w = k.withheld_values.get(c).copied().unwrap_or(0);
                    format!("{c} {n} ({w} withheld)")
                })
                .collect();
            if !local.is_empty() {
                s += &format!("; recoded locally: {}", local.join(", "));
            }
            s += &format!("; {} persons suppressed\n", k.suppressed_persons);
        }
        if !self.withheld_event_times.is_empty() {
            let parts: Vec<String> = self
                .withheld_event_times
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            s += &format!(
                "event times withheld inside the person's birth band: {}\n",
                parts.join(", ")
            );
        }
        if let Some(r) = &self.risk {
            s += &r.summary();
        }
        if !self.scrubbed.is_empty() {
            let parts: Vec<String> = self
                .scrubbed
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            s += &format!("free text: placeholders inserted: {}\n", parts.join(", "));
            let sampled: u64 = self.review_sample.values().sum();
            s += &format!(
                "  a sample of {sampled} in their context (up to {} per type) is in the encrypted review file: enclave catalog review {}\n",
                deidentify::REVIEW_PER_KIND,
                self.dataset
            );
        }
        for (column, n) in &self.out_of_domain {
            s += &format!(
                "outside the declared domain: {column}: {} mapped to its `other` key, {} rows quarantined\n",
                n.mapped, n.quarantined
            );
        }
        if !self.quarantine_reasons.is_empty() {
            s += "quarantined rows by reason:\n";
            for (r, n) in &self.quarantine_reasons {
                s += &format!("  {n:>7}  {r}\n");
            }
        }
        if !self.files_skipped.is_empty() {
            s += &format!(
                "{} file(s) not ingested (see report.json)\n",
                self.files_skipped.len()
            );
        }
        if !self.resources_not_modelled.is_empty() {
            let parts: Vec<String> = self
                .resources_not_modelled
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            s += &format!(
                "FHIR resources outside the model (not ingested): {}\n",
                parts.join(", ")
            );
        }
        s += &format!(
            "took {:.1}s ({:.0} rows/s)\n",
            self.seconds,
            t.rows_in as f64 / self.seconds.max(1e-9)
        );
        s
    }
}

/// The process's peak resident memory so far, KiB (`VmHWM`; 0 where /proc is not there).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
