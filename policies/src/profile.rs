//! De-identification profiles: one action per canonical column, parsed and checked before any row is read.
//!
//! A profile file is TOML. Top-level keys set the person key, the date-shift window, the restricted postal
//! areas and k-anonymity; one table per canonical table (`[patients]`, `[encounters]`, …) gives each column
//! `{ action = …, role = …, … }`. A column with no rule is an error: nothing passes through by default.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::coarsen::{Coarsening, Grid, TimeGrain};
use crate::schema::{ColumnType, PATIENT_REF, Table};
use crate::{Error, Result, line_of};

/// What happens to one column.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The column is not written.
    Drop,
    /// The value is written unchanged.
    Keep,
    /// The value is replaced by a keyed HMAC token, stable for the same value and provider.
    Pseudonymize,
    /// The date is moved by the person's shift (one shift per person, same in every table).
    DateShift,
    /// The value is coarsened.
    Generalize(Generalization),
    /// Free text with the person's own identifiers and pattern-found PHI replaced by typed placeholders.
    Scrub,
    /// A number coarsened: `round`, `bin`, `top_code` or `bottom_code`.
    Coarsen(Coarsening),
    /// A timestamp truncated to a grain (day, hour or minute) after the person's date shift.
    TruncateTime(TimeGrain),
}

impl Action {
    /// The action's name as written in a profile.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Drop => "drop",
            Action::Keep => "keep",
            Action::Pseudonymize => "pseudonymize",
            Action::DateShift => "date_shift",
            Action::Generalize(_) => "generalize",
            Action::Scrub => "scrub",
            Action::Coarsen(c) => match (&c.grid, c.top_code, c.bottom_code) {
                (Grid::Exact, Some(_), None) => "top_code",
                (Grid::Exact, None, _) => "bottom_code",
                (Grid::Exact, Some(_), Some(_)) => "top_code and bottom_code",
                (Grid::Bins(_), _, _) => "bin",
                _ => "round",
            },
            Action::TruncateTime(_) => "truncate_time",
        }
    }
}

/// How a `generalize` action coarsens a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Generalization {
    /// A date to its year; with `top_code_age`, birth years of people that old or older at the reference
    /// date collapse into one value (the latest such year), so no age above the limit can be read off.
    Year {
        /// Ages at or above this are one category (90 for HIPAA Safe Harbor).
        top_code_age: Option<u32>,
    },
    /// A date to the first day of its month.
    Month,
    /// A birth date to an age band at the reference date (`"40-44"`), with a top band (`"90+"`).
    AgeBand {
        /// Band width in years.
        width: u32,
        /// First age of the open top band.
        top: u32,
    },
    /// A postal code to its first three digits; restricted areas and malformed codes become `"000"`.
    Zip3,
}

impl fmt::Display for Generalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Generalization::Year {
                top_code_age: Some(a),
            } => write!(f, "year (ages {a}+ top-coded)"),
            Generalization::Year { top_code_age: None } => f.write_str("year"),
            Generalization::Month => f.write_str("month"),
            Generalization::AgeBand { width, top } => {
                write!(f, "age band of {width} years, {top}+ top band")
            }
            Generalization::Zip3 => f.write_str("3-digit postal area, restricted areas to 000"),
        }
    }
}

/// What a column is, for disclosure control and the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Identifies a person directly.
    Identifier,
    /// Identifies a person in combination with other columns.
    QuasiIdentifier,
    /// Clinical content that must be protected but does not identify.
    Sensitive,
    /// A measurement, count or amount.
    Value,
}

impl Role {
    /// The role's name as written in a profile.
    pub fn name(self) -> &'static str {
        match self {
            Role::Identifier => "identifier",
            Role::QuasiIdentifier => "quasi_identifier",
            Role::Sensitive => "sensitive",
            Role::Value => "value",
        }
    }
}

/// The rule for one source column.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnRule {
    /// Canonical source column.
    pub column: &'static str,
    /// Its source type.
    pub ty: ColumnType,
    /// What happens to it.
    pub action: Action,
    /// Its role.
    pub role: Role,
    /// Public clamping bounds for DP (numeric columns only).
    pub bounds: Option<(f64, f64)>,
    /// Output column name (defaults to the source name).
    pub output: String,
    /// Public domain of a categorical column: every value a group key over it can take. Declared, never
    /// derived from data, so DP queries can release every key (empty ones too) without key selection.
    pub domain: Option<Vec<String>>,
    /// The domain key a value outside the domain becomes (`other = "Other"`); without it, a row with
    /// such a value is quarantined. Either way the ingest report counts them per column.
    pub other: Option<String>,
    /// Why a quasi-identifier is left out of the k-anonymity record (`k_exempt = "…"`); the report and
    /// the catalog print it.
    pub k_exempt: Option<String>,
    /// Why a time is released finer than `risk.time_precision` (`time_exempt = "…"`); printed likewise.
    pub time_exempt: Option<String>,
}

impl ColumnRule {
    /// How finely a temporal column is released (`None` for other columns and dropped ones).
    pub fn released_grain(&self) -> Option<TimeGrain> {
        if !self.ty.is_temporal() {
            return None;
        }
        Some(match &self.action {
            Action::Drop | Action::Pseudonymize | Action::Scrub | Action::Coarsen(_) => {
                return None;
            }
            Action::Generalize(Generalization::Year { .. } | Generalization::AgeBand { .. }) => {
                TimeGrain::Year
            }
            Action::Generalize(Generalization::Month) => TimeGrain::Month,
            Action::Generalize(Generalization::Zip3) => return None,
            Action::TruncateTime(g) => *g,
            Action::Keep | Action::DateShift if self.ty == ColumnType::Date => TimeGrain::Day,
            Action::Keep | Action::DateShift => TimeGrain::Second,
        })
    }
}

/// Re-identification limits checked at ingest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RiskLimits {
    /// Largest share of a value or time column's values that may be held by one person only. Such values
    /// single their person out and are withheld; above this share the column's coarsening is too fine,
    /// and the run fails naming it.
    pub max_unique_ratio: f64,
    /// Finest grain a time may be released at unless its rule says why (`time_exempt`).
    pub time_precision: TimeGrain,
}

/// Which identifier a person's keyed `person_id` is computed from (first present wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKey {
    /// The national / insurance ID: links one patient across providers.
    NationalId,
    /// The provider's own patient ID: links within one provider only.
    PatientId,
}

/// k-anonymity requirement over the patients table's quasi-identifiers.
#[derive(Debug, Clone, PartialEq)]
pub struct KAnonymity {
    /// Every released combination of quasi-identifier values is shared by at least k persons.
    pub k: u32,
    /// Output columns of `patients` that form the quasi-identifier.
    pub quasi_identifiers: Vec<String>,
    /// Generalise further (one column a step at a time) while more than this share of persons would be
    /// suppressed; then suppress what still violates k.
    pub max_suppression_ratio: f64,
}

/// DP defaults declared by the profile for datasets ingested under it.
#[derive(Debug, Clone, PartialEq)]
pub struct DpDefaults {
    /// Rows one person may contribute to a query, per table unless the table declares its own bound.
    pub max_contributions: u32,
    /// Tables whose rows per person the profile bounds (`patients = 1`): the engine bounds each by its
    /// own figure, and ingest quarantines a person's rows beyond it.
    pub rows_per_person: BTreeMap<Table, u32>,
    /// For the tables without a declared bound: choose each one's rows per person from the data at
    /// publish time, under DP (`[dp] bound_quantile`, `bound_epsilon`). `None`: `max_contributions`.
    pub chosen_bounds: Option<ChosenBounds>,
    /// How privacy loss is accounted: `basic` ((ε, δ), basic composition, Laplace) or `zcdp`
    /// (ρ, Gaussian; composes far better over many queries).
    pub accounting: DpAccounting,
}

/// How a table's rows per person are chosen from the data: the `quantile` (e.g. 0.99) of the rows each
/// person has, released by opendp's private quantile at `epsilon` per table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChosenBounds {
    /// Which quantile of rows per person, in (0, 1).
    pub quantile: f64,
    /// ε spent per table on choosing it.
    pub epsilon: f64,
}

/// A dataset's privacy accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpAccounting {
    /// (ε, δ) under basic composition.
    Basic,
    /// Zero-concentrated DP, costs in ρ.
    Zcdp,
}

impl DpAccounting {
    /// The name stored in the catalog.
    pub fn name(self) -> &'static str {
        match self {
            DpAccounting::Basic => "basic",
            DpAccounting::Zcdp => "zcdp",
        }
    }
}

/// A validated de-identification profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Short name (`hipaa-safe-harbor`).
    pub name: String,
    /// One-line description.
    pub description: String,
    /// The legal basis the profile implements.
    pub legal_basis: String,
    /// Person key order.
    pub link_on: Vec<LinkKey>,
    /// Dates are shifted by a per-person offset in `[-n, n]` days (0: no shifting).
    pub date_shift_days: u32,
    /// 3-digit postal areas that are released as `000`.
    pub restricted_zip3: BTreeSet<String>,
    /// k-anonymity requirement, if any.
    pub k_anonymity: Option<KAnonymity>,
    /// Largest share of quarantined input rows before the run fails (a CLI flag overrides it).
    pub max_quarantine_ratio: f64,
    /// DP defaults.
    pub dp: DpDefaults,
    /// Re-identification limits.
    pub risk: RiskLimits,
    tables: BTreeMap<Table, Vec<ColumnRule>>,
}

impl Profile {
    /// The rules of one table, in canonical column order.
    pub fn rules(&self, table: Table) -> &[ColumnRule] {
        self.tables.get(&table).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The rule of one column.
    pub fn rule(&self, table: Table, column: &str) -> Option<&ColumnRule> {
        self.rules(table).iter().find(|r| r.column == column)
    }

    /// Parses and validates a profile. `file` is used in error messages only.
    pub fn parse(text: &str, file: &str) -> Result<Profile> {
        let raw: RawProfile = toml::from_str(text).map_err(|e| Error::Invalid {
            file: file.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            reason: e.message().to_owned(),
        })?;
        Validator { text, file }.profile(raw)
    }

    /// Loads a profile by built-in name or from a file path.
    pub fn load(name_or_path: &str) -> Result<Profile> {
        if let Some((file, text)) = crate::builtin_profile(name_or_path) {
            return Profile::parse(text, file);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(Error::UnknownProfile {
                name: name_or_path.to_owned(),
                known: crate::BUILTIN_PROFILES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            file: path.display().to_string(),
            source,
        })?;
        Profile::parse(&text, &path.display().to_string())
    }
}

/// The widest date-shift window a profile may ask for (ten years each way).
pub const MAX_DATE_SHIFT_DAYS: u32 = 3650;

/// Columns of `patients` that identify a person in combination wherever they are released: a profile
/// that releases one must say so (role `quasi_identifier`), so k-anonymity cannot overlook it.
const NATURAL_QUASI_IDENTIFIERS: [&str; 13] = [
    "birth_date",
    "death_date",
    "gender",
    "race",
    "ethnicity",
    "marital",
    "state",
    "zip",
    "county",
    "city",
    "birthplace",
    "lat",
    "lon",
];

/// Most quasi-identifiers a k-anonymity record may have (each person's generalisation levels are packed
/// four bits a column into 64 bits).
pub const MAX_QUASI_IDENTIFIERS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    description: String,
    legal_basis: String,
    link_on: Spanned<Vec<String>>,
    #[serde(default)]
    date_shift_days: u32,
    #[serde(default)]
    restricted_zip3: Vec<Spanned<String>>,
    k_anonymity: Option<Spanned<RawK>>,
    #[serde(default = "default_quarantine_ratio")]
    max_quarantine_ratio: Spanned<f64>,
    #[serde(default)]
    dp: RawDp,
    #[serde(default)]
    risk: RawRisk,
    patients: Option<Spanned<RawTable>>,
    encounters: Option<Spanned<RawTable>>,
    conditions: Option<Spanned<RawTable>>,
    observations: Option<Spanned<RawTable>>,
    medications: Option<Spanned<RawTable>>,
    procedures: Option<Spanned<RawTable>>,
    notes: Option<Spanned<RawTable>>,
}

type RawTable = BTreeMap<Spanned<String>, Spanned<RawRule>>;

impl RawProfile {
    fn take_tables(&mut self) -> [(Table, Option<Spanned<RawTable>>); 7] {
        [
            (Table::Patients, self.patients.take()),
            (Table::Encounters, self.encounters.take()),
            (Table::Conditions, self.conditions.take()),
            (Table::Observations, self.observations.take()),
            (Table::Medications, self.medications.take()),
            (Table::Procedures, self.procedures.take()),
            (Table::Notes, self.notes.take()),
        ]
    }
}

fn default_quarantine_ratio() -> Spanned<f64> {
    Spanned::new(0..0, 0.05)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK {
    k: u32,
    quasi_identifiers: Vec<String>,
    #[serde(default = "default_suppression")]
    max_suppression_ratio: f64,
}

fn default_suppression() -> f64 {
    0.05
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDp {
    max_contributions: u32,
    #[serde(default)]
    accounting: Option<String>,
    #[serde(default)]
    rows_per_person: BTreeMap<String, u32>,
    #[serde(default)]
    bound_quantile: Option<f64>,
    #[serde(default)]
    bound_epsilon: Option<f64>,
}

impl Default for RawDp {
    fn default() -> Self {
        RawDp {
            max_contributions: 10,
            accounting: None,
            rows_per_person: BTreeMap::new(),
            bound_quantile: None,
            bound_epsilon: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRisk {
    #[serde(default = "default_unique_ratio")]
    max_unique_ratio: f64,
    #[serde(default = "default_time_precision")]
    time_precision: String,
}

impl Default for RawRisk {
    fn default() -> Self {
        RawRisk {
            max_unique_ratio: default_unique_ratio(),
            time_precision: default_time_precision(),
        }
    }
}

fn default_unique_ratio() -> f64 {
    0.05
}

fn default_time_precision() -> String {
    "day".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: String,
    role: Role,
    to: Option<String>,
    top_code_age: Option<u32>,
    width: Option<u32>,
    top: Option<u32>,
    bounds: Option<[f64; 2]>,
    #[serde(rename = "as")]
    output: Option<String>,
    domain: Option<Vec<String>>,
    other: Option<String>,
    step: Option<f64>,
    digits: Option<u32>,
    edges: Option<Vec<f64>>,
    at: Option<f64>,
    top_code: Option<f64>,
    bottom_code: Option<f64>,
    k_exempt: Option<String>,
    time_exempt: Option<String>,
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn err<T>(&self, offset: usize, reason: impl Into<String>) -> Result<T> {
        Err(Error::Invalid {
            file: self.file.to_owned(),
            line: line_of(self.text, offset),
            reason: reason.into(),
        })
    }

    fn profile(&self, mut raw: RawProfile) -> Result<Profile> {
        let mut link_on = Vec::new();
        for key in raw.link_on.get_ref() {
            link_on.push(match key.as_str() {
                "national_id" => LinkKey::NationalId,
                "patient_id" => LinkKey::PatientId,
                other => {
                    return self.err(
                        raw.link_on.span().start,
                        format!(
                            "link_on: unknown key '{other}' (expected national_id or patient_id)"
                        ),
                    );
                }
            });
        }
        if !link_on.contains(&LinkKey::PatientId) {
            return self.err(
                raw.link_on.span().start,
                "link_on must end with patient_id so every person gets a key",
            );
        }
        if raw.date_shift_days > MAX_DATE_SHIFT_DAYS {
            return self.err(
                0,
                format!("date_shift_days must be at most {MAX_DATE_SHIFT_DAYS}"),
            );
        }
        let mut restricted = BTreeSet::new();
        for z in &raw.restricted_zip3 {
            if z.get_ref().len() != 3 || !z.get_ref().bytes().all(|b| b.is_ascii_digit()) {
                return self.err(
                    z.span().start,
                    format!("restricted_zip3: '{}' is not three digits", z.get_ref()),
                );
            }
            restricted.insert(z.get_ref().clone());
        }
        let ratio = *raw.max_quarantine_ratio.get_ref();
        if !(0.0..=1.0).contains(&ratio) {
            return self.err(
                raw.max_quarantine_ratio.span().start,
                "max_quarantine_ratio must be within 0..=1",
            );
        }
        if raw.dp.max_contributions == 0 {
            return self.err(0, "dp.max_contributions must be at least 1");
        }
        let accounting = match raw.dp.accounting.as_deref() {
            None | Some("basic") => DpAccounting::Basic,
            Some("zcdp") => DpAccounting::Zcdp,
            Some(other) => {
                return self.err(0, format!("dp.accounting: '{other}' is not basic or zcdp"));
            }
        };

        let mut rows_per_person = BTreeMap::new();
        for (name, n) in &raw.dp.rows_per_person {
            let Some(t) = Table::ALL.into_iter().find(|t| t.name() == name) else {
                return self.err(0, format!("dp.rows_per_person: no table '{name}'"));
            };
            if *n == 0 {
                return self.err(0, format!("dp.rows_per_person.{name} must be at least 1"));
            }
            rows_per_person.insert(t, *n);
        }

        let chosen_bounds = match (raw.dp.bound_quantile, raw.dp.bound_epsilon) {
            (None, None) => None,
            (Some(quantile), Some(epsilon))
                if quantile > 0.0 && quantile < 1.0 && (1e-6..=10.0).contains(&epsilon) =>
            {
                Some(ChosenBounds { quantile, epsilon })
            }
            _ => {
                return self.err(
                    0,
                    "dp.bound_quantile (within (0, 1)) and dp.bound_epsilon (within [1e-6, 10]) go together",
                );
            }
        };

        let Some(time_precision) = TimeGrain::from_name(&raw.risk.time_precision) else {
            return self.err(
                0,
                format!(
                    "risk.time_precision: '{}' is not year, month, day, hour, minute or second",
                    raw.risk.time_precision
                ),
            );
        };
        let max_unique_ratio = raw.risk.max_unique_ratio;
        if !(0.0..=1.0).contains(&max_unique_ratio) {
            return self.err(0, "risk.max_unique_ratio must be within 0..=1");
        }
        let risk = RiskLimits {
            max_unique_ratio,
            time_precision,
        };

        let mut tables = BTreeMap::new();
        let mut offsets: BTreeMap<(Table, &'static str), usize> = BTreeMap::new();
        for (table, section) in raw.take_tables() {
            let Some(section) = section else {
                return self.err(
                    0,
                    format!("no [{table}] section: every table needs its rules"),
                );
            };
            let at = section.span().start;
            let mut rules = Vec::new();
            for (column, rule) in section.into_inner() {
                let r = self.rule(table, &column, &rule, raw.date_shift_days, time_precision)?;
                offsets.insert((table, r.column), column.span().start);
                rules.push(r);
            }
            for def in table.columns() {
                if def.name != PATIENT_REF
                    && !rules.iter().any(|r: &ColumnRule| r.column == def.name)
                {
                    return self.err(
                        at,
                        format!(
                            "[{table}] has no rule for column '{}': every column needs an action",
                            def.name
                        ),
                    );
                }
            }
            rules.sort_by_key(|r| table.column_index(r.column));
            let mut outputs = BTreeSet::new();
            for r in rules.iter().filter(|r| r.action != Action::Drop) {
                if !outputs.insert(r.output.as_str())
                    || (r.output == crate::schema::PERSON_ID && r.column != PATIENT_REF)
                {
                    return self.err(
                        offsets.get(&(table, r.column)).copied().unwrap_or(at),
                        format!("[{table}] releases two columns named '{}'", r.output),
                    );
                }
            }
            tables.insert(table, rules);
        }

        let k_anonymity = match raw.k_anonymity {
            None => None,
            Some(k) => {
                let span = k.span().start;
                let k = k.into_inner();
                if k.k < 2 {
                    return self.err(span, "k_anonymity.k must be at least 2");
                }
                if !(0.0..=1.0).contains(&k.max_suppression_ratio) {
                    return self.err(
                        span,
                        "k_anonymity.max_suppression_ratio must be within 0..=1",
                    );
                }
                if k.quasi_identifiers.is_empty() {
                    return self.err(span, "k_anonymity.quasi_identifiers is empty");
                }
                for qi in &k.quasi_identifiers {
                    let rule = tables[&Table::Patients]
                        .iter()
                        .find(|r| &r.output == qi && r.action != Action::Drop);
                    match rule {
                        None => {
                            return self.err(
                                span,
                                format!(
                                    "k_anonymity: '{qi}' is not a released column of [patients]"
                                ),
                            );
                        }
                        Some(r) if r.role != Role::QuasiIdentifier => {
                            return self.err(
                                span,
                                format!("k_anonymity: '{qi}' must have role quasi_identifier"),
                            );
                        }
                        Some(_) => {}
                    }
                }
                if k.quasi_identifiers.len() > MAX_QUASI_IDENTIFIERS {
                    return self.err(
                        span,
                        format!("k_anonymity: at most {MAX_QUASI_IDENTIFIERS} quasi-identifiers"),
                    );
                }
                Some(KAnonymity {
                    k: k.k,
                    quasi_identifiers: k.quasi_identifiers,
                    max_suppression_ratio: k.max_suppression_ratio,
                })
            }
        };
        // Every released quasi-identifier is in the k-anonymity record, or its rule says why not.
        let listed = |r: &ColumnRule| {
            k_anonymity
                .as_ref()
                .is_some_and(|k| k.quasi_identifiers.contains(&r.output))
        };
        for (table, rules) in &tables {
            for r in rules {
                if r.role != Role::QuasiIdentifier
                    || r.action == Action::Drop
                    || r.k_exempt.is_some()
                    || (*table == Table::Patients && listed(r))
                {
                    continue;
                }
                let at = offsets.get(&(*table, r.column)).copied().unwrap_or(0);
                let why = if *table == Table::Patients {
                    "is not in k_anonymity.quasi_identifiers"
                } else {
                    "is outside [patients], so it cannot be in the per-person k-anonymity record"
                };
                return self.err(
                    at,
                    format!(
                        "{table}.{}: role quasi_identifier, but it {why}; add it there, or say in `k_exempt` why it is left out",
                        r.column
                    ),
                );
            }
        }

        Ok(Profile {
            name: raw.name,
            description: raw.description,
            legal_basis: raw.legal_basis,
            link_on,
            date_shift_days: raw.date_shift_days,
            restricted_zip3: restricted,
            k_anonymity,
            max_quarantine_ratio: ratio,
            dp: DpDefaults {
                max_contributions: raw.dp.max_contributions,
                rows_per_person,
                chosen_bounds,
                accounting,
            },
            risk,
            tables,
        })
    }

    fn rule(
        &self,
        table: Table,
        column: &Spanned<String>,
        rule: &Spanned<RawRule>,
        shift: u32,
        grain: TimeGrain,
    ) -> Result<ColumnRule> {
        let at = column.span().start;
        let Some(index) = table.column_index(column.get_ref()) else {
            return self.err(
                at,
                format!(
                    "[{table}] has no column '{}' (columns: {})",
                    column.get_ref(),
                    table
                        .columns()
                        .iter()
                        .map(|c| c.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        };
        let def = table.columns()[index];
        let raw = rule.get_ref();
        let name = def.name;
        let ty = def.ty;
        let action = match (raw.action.as_str(), raw.to.as_deref()) {
            ("drop", None) => Action::Drop,
            ("keep", None) => Action::Keep,
            ("pseudonymize", None) => Action::Pseudonymize,
            ("date_shift", None) => Action::DateShift,
            ("scrub", None) => Action::Scrub,
            ("generalize", Some("year")) => Action::Generalize(Generalization::Year {
                top_code_age: raw.top_code_age,
            }),
            ("generalize", Some("month")) => Action::Generalize(Generalization::Month),
            ("generalize", Some("age_band")) => Action::Generalize(Generalization::AgeBand {
                width: raw.width.unwrap_or(5),
                top: raw.top.unwrap_or(90),
            }),
            ("generalize", Some("zip3")) => Action::Generalize(Generalization::Zip3),
            ("truncate_time", Some(to)) => match TimeGrain::from_name(to) {
                Some(g @ (TimeGrain::Day | TimeGrain::Hour | TimeGrain::Minute)) => {
                    Action::TruncateTime(g)
                }
                _ => {
                    return self.err(
                        at,
                        format!("{table}.{name}: truncate_time needs to = day | hour | minute, got {to:?}"),
                    );
                }
            },
            ("round" | "bin" | "top_code" | "bottom_code", None) => {
                Action::Coarsen(self.coarsening(table, name, at, raw)?)
            }
            ("generalize", other) => {
                return self.err(at, format!(
                    "{table}.{name}: generalize needs to = year | month | age_band | zip3, got {other:?}"
                ));
            }
            (a, Some(_)) if a != "generalize" => {
                return self.err(
                    at,
                    format!("{table}.{name}: 'to' only goes with generalize"),
                );
            }
            (other, _) => {
                return self.err(at, format!(
                    "{table}.{name}: unknown action '{other}' (drop, keep, pseudonymize, date_shift, generalize, scrub, round, bin, top_code, bottom_code, truncate_time)"
                ));
            }
        };
        let numeric_fields = [raw.step, raw.at, raw.top_code, raw.bottom_code]
            .iter()
            .any(Option::is_some)
            || raw.digits.is_some()
            || raw.edges.is_some();
        if numeric_fields && !matches!(action, Action::Coarsen(_)) {
            return self.err(
                at,
                format!(
                    "{table}.{name}: step, digits, edges, at, top_code and bottom_code go with round, bin, top_code and bottom_code only"
                ),
            );
        }
        let type_ok = match &action {
            Action::Drop | Action::Keep => true,
            Action::Pseudonymize | Action::Scrub => ty == ColumnType::Text,
            Action::DateShift => ty.is_temporal(),
            Action::Generalize(Generalization::Zip3) => ty == ColumnType::Text,
            Action::Generalize(_) => ty.is_temporal(),
            Action::Coarsen(c) => {
                ty == ColumnType::Float || (ty == ColumnType::Int && c.is_integral())
            }
            Action::TruncateTime(_) => ty == ColumnType::Timestamp,
        };
        if !type_ok {
            return self.err(
                at,
                format!(
                    "{table}.{name}: action {} does not apply to a {ty:?} column",
                    action.name()
                ),
            );
        }
        if name == PATIENT_REF && action != Action::Pseudonymize {
            return self.err(
                at,
                format!(
                    "{table}.{name}: the patient reference is always pseudonymized into person_id"
                ),
            );
        }
        if raw.role == Role::Identifier && !matches!(action, Action::Drop | Action::Pseudonymize) {
            return self.err(
                at,
                format!(
                    "{table}.{name}: an identifier must be dropped or pseudonymized, not '{}'",
                    action.name()
                ),
            );
        }
        if action == Action::DateShift && shift == 0 {
            return self.err(
                at,
                format!("{table}.{name}: date_shift needs date_shift_days > 0"),
            );
        }
        let bounds = match raw.bounds {
            None => None,
            Some([lo, hi]) => {
                if !ty.is_numeric() || !matches!(action, Action::Keep | Action::Coarsen(_)) {
                    return self.err(
                        at,
                        format!(
                            "{table}.{name}: bounds go on kept or coarsened numeric columns only"
                        ),
                    );
                }
                if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                    return self.err(
                        at,
                        format!("{table}.{name}: bounds must be finite with low < high"),
                    );
                }
                if let Action::Coarsen(c) = &action {
                    // Clamping to the bounds must keep a coarsened value on the grid: the bounds are
                    // values the coarsening releases.
                    if c.apply(lo) != Some(lo) || c.apply(hi) != Some(hi) {
                        return self.err(
                            at,
                            format!(
                                "{table}.{name}: bounds [{lo}, {hi}] coarsen to [{}, {}]: declare bounds the coarsening releases (on its grid)",
                                c.apply(lo).unwrap_or(f64::NAN),
                                c.apply(hi).unwrap_or(f64::NAN)
                            ),
                        );
                    }
                }
                Some((lo, hi))
            }
        };
        let rule_grain = ColumnRule {
            column: name,
            ty,
            action: action.clone(),
            role: raw.role,
            bounds: None,
            output: String::new(),
            domain: None,
            other: None,
            k_exempt: None,
            time_exempt: None,
        }
        .released_grain();
        if let Some(g) = rule_grain
            && g > grain
            && raw.time_exempt.is_none()
        {
            return self.err(
                at,
                format!(
                    "{table}.{name}: released to the {g}, finer than risk.time_precision = \"{grain}\"; coarsen it (truncate_time, generalize) or say why in `time_exempt`"
                ),
            );
        }
        for (field, why) in [
            ("k_exempt", &raw.k_exempt),
            ("time_exempt", &raw.time_exempt),
        ] {
            if why.as_deref().is_some_and(|r| r.trim().is_empty()) {
                return self.err(at, format!("{table}.{name}: {field} is empty"));
            }
        }
        if raw.k_exempt.is_some() && raw.role != Role::QuasiIdentifier {
            return self.err(
                at,
                format!("{table}.{name}: k_exempt goes on quasi-identifiers only"),
            );
        }
        if raw.time_exempt.is_some() && rule_grain.is_none_or(|g| g <= grain) {
            return self.err(
                at,
                format!("{table}.{name}: time_exempt goes on times released finer than risk.time_precision only"),
            );
        }
        if raw.role == Role::QuasiIdentifier && action == Action::Scrub {
            return self.err(
                at,
                format!("{table}.{name}: a quasi-identifier cannot be scrubbed free text (its released value would differ from the one k-anonymity counts)"),
            );
        }
        if table == Table::Patients
            && NATURAL_QUASI_IDENTIFIERS.contains(&name)
            && action != Action::Drop
            && !matches!(raw.role, Role::QuasiIdentifier | Role::Identifier)
        {
            return self.err(
                at,
                format!("{table}.{name}: a released {name} identifies in combination: its role is quasi_identifier (or identifier), not {}", raw.role.name()),
            );
        }
        let generalize_fields =
            raw.top_code_age.is_some() || raw.width.is_some() || raw.top.is_some();
        let fits = match &action {
            Action::Generalize(Generalization::Year { .. }) => {
                raw.width.is_none() && raw.top.is_none()
            }
            Action::Generalize(Generalization::AgeBand { .. }) => raw.top_code_age.is_none(),
            _ => !generalize_fields,
        };
        if !fits {
            return self.err(
                at,
                format!("{table}.{name}: top_code_age goes with generalize to = year, width and top with to = age_band"),
            );
        }
        let domain = match &raw.domain {
            None => None,
            Some(values) => {
                let mut sorted = values.clone();
                sorted.sort();
                sorted.dedup();
                if action != Action::Keep || ty != ColumnType::Text || raw.role == Role::Identifier
                {
                    return self.err(at, format!("{table}.{name}: a domain goes on kept, non-identifier text columns only"));
                }
                if values.is_empty() || values.len() > 1000 || sorted.len() != values.len() {
                    return self.err(
                        at,
                        format!("{table}.{name}: a domain lists 1 to 1000 distinct values"),
                    );
                }
                Some(values.clone())
            }
        };
        let other = match (&raw.other, &domain) {
            (None, _) => None,
            (Some(o), Some(d)) if d.contains(o) => Some(o.clone()),
            (Some(o), _) => {
                return self.err(
                    at,
                    format!(
                        "{table}.{name}: other = \"{o}\" must be one of the column's domain values"
                    ),
                );
            }
        };
        let output = if name == PATIENT_REF {
            crate::schema::PERSON_ID.to_owned()
        } else {
            raw.output.clone().unwrap_or_else(|| name.to_owned())
        };
        Ok(ColumnRule {
            column: name,
            ty,
            action,
            role: raw.role,
            bounds,
            output,
            domain,
            other,
            k_exempt: raw.k_exempt.clone(),
            time_exempt: raw.time_exempt.clone(),
        })
    }

    /// The coarsening of a `round`, `bin`, `top_code` or `bottom_code` rule.
    fn coarsening(&self, table: Table, name: &str, at: usize, raw: &RawRule) -> Result<Coarsening> {
        let action = raw.action.as_str();
        let finite = |what: &str, v: Option<f64>| match v {
            Some(x) if !x.is_finite() => {
                self.err(at, format!("{table}.{name}: {what} must be finite"))
            }
            _ => Ok(v),
        };
        if raw.at.is_some() && !matches!(action, "top_code" | "bottom_code") {
            return self.err(
                at,
                format!("{table}.{name}: 'at' goes with top_code or bottom_code"),
            );
        }
        if (raw.step.is_some() || raw.digits.is_some()) && action != "round" {
            return self.err(
                at,
                format!("{table}.{name}: 'step' and 'digits' go with round"),
            );
        }
        if raw.edges.is_some() && action != "bin" {
            return self.err(at, format!("{table}.{name}: 'edges' go with bin"));
        }
        let mut top = finite("top_code", raw.top_code)?;
        let mut bottom = finite("bottom_code", raw.bottom_code)?;
        let grid = match action {
            "round" => match (raw.step, raw.digits) {
                (Some(step), None) if step.is_finite() && step > 0.0 => Grid::Step(step),
                (None, Some(d)) if (1..=15).contains(&d) => Grid::Significant(d),
                _ => {
                    return self.err(
                        at,
                        format!("{table}.{name}: round needs either step (> 0) or digits (1 to 15 significant digits)"),
                    );
                }
            },
            "bin" => {
                let edges = raw.edges.clone().unwrap_or_default();
                if edges.len() < 2
                    || edges.len() > 1000
                    || !edges.iter().all(|e| e.is_finite())
                    || !edges.windows(2).all(|w| w[0] < w[1])
                {
                    return self.err(
                        at,
                        format!(
                            "{table}.{name}: bin needs 2 to 1000 finite edges in ascending order"
                        ),
                    );
                }
                Grid::Bins(edges)
            }
            code => {
                let Some(v) = finite("at", raw.at)? else {
                    return self.err(
                        at,
                        format!("{table}.{name}: {code} needs at = the code value"),
                    );
                };
                let slot = if code == "top_code" {
                    &mut top
                } else {
                    &mut bottom
                };
                if slot.is_some() {
                    return self.err(at, format!("{table}.{name}: {code} is given twice"));
                }
                *slot = Some(v);
                Grid::Exact
            }
        };
        if let (Some(b), Some(t)) = (bottom, top)
            && b >= t
        {
            return self.err(
                at,
                format!("{table}.{name}: bottom_code must be below top_code"),
            );
        }
        Ok(Coarsening {
            grid,
            bottom_code: bottom,
            top_code: top,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_cover_every_column() {
        for (name, _) in crate::BUILTIN_PROFILES {
            let p = Profile::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            for t in Table::ALL {
                for def in t.columns() {
                    if def.name != PATIENT_REF {
                        assert!(
                            p.rule(t, def.name).is_some(),
                            "{name}: {t}.{} has no rule",
                            def.name
                        );
                    }
                }
            }
            assert!(p.k_anonymity.is_some());
        }
    }

    #[test]
    fn safe_harbor_drops_or_pseudonymizes_every_direct_identifier() {
        let p = Profile::load("hipaa-safe-harbor").expect("builtin");
        for col in [
            "mrn",
            "national_id",
            "drivers_license",
            "passport",
            "insurance_id",
            "first_name",
            "middle_name",
            "last_name",
            "maiden_name",
            "address",
            "city",
            "county",
            "lat",
            "lon",
            "phone",
            "email",
            "birthplace",
        ] {
            let r = p.rule(Table::Patients, col).expect("rule");
            assert!(
                matches!(r.action, Action::Drop | Action::Pseudonymize),
                "{col}: {:?}",
                r.action
            );
        }
        assert_eq!(
            p.rule(Table::Notes, "text").map(|r| &r.action),
            Some(&Action::Scrub)
        );
        assert!(p.restricted_zip3.contains("036"));
    }

    fn with_line(text: &str, edit: impl Fn(&str) -> String) -> Error {
        let edited = edit(text);
        Profile::parse(&edited, "p.toml").expect_err("must be refused")
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let (_, text) = crate::builtin_profile("hipaa-safe-harbor").expect("builtin");
        let e = with_line(text, |t| {
            t.replacen(
                "email = { action = \"drop\"",
                "email = { action = \"keep\"",
                1,
            )
        });
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with("email ="))
            .expect("email rule")
            + 1;
        assert_eq!(
            e.to_string(),
            format!(
                "p.toml:{line}: patients.email: an identifier must be dropped or pseudonymized, not 'keep'"
            )
        );
        let e = with_line(text, |t| t.replacen("email = {", "e_mail = {", 1));
        assert!(e.to_string().contains("has no column 'e_mail'"), "{e}");
        let e = with_line(text, |t| {
            t.replacen("action = \"scrub\"", "action = \"shred\"", 1)
        });
        assert!(e.to_string().contains("unknown action 'shred'"), "{e}");
        let e = with_line(text, |t| t.replacen("k = 5", "k = \"five\"", 1));
        assert!(e.to_string().starts_with("p.toml:"), "{e}");
        let e = with_line(text, |t| {
            t.lines()
                .filter(|l| !l.trim_start().starts_with("email ="))
                .collect::<Vec<_>>()
                .join("\n")
        });
        assert!(e.to_string().contains("no rule for column 'email'"), "{e}");
        let e = with_line(text, |t| {
            t.replacen(
                "rows_per_person = { patients = 1 }",
                "rows_per_person = { patient = 1 }",
                1,
            )
        });
        assert!(
            e.to_string()
                .contains("dp.rows_per_person: no table 'patient'"),
            "{e}"
        );
        let e = with_line(text, |t| {
            t.replacen(
                "rows_per_person = { patients = 1 }",
                "rows_per_person = { patients = 0 }",
                1,
            )
        });
        assert!(e.to_string().contains("must be at least 1"), "{e}");
        let e = with_line(text, |t| {
            t.replacen(
                "\"Psychiatry\"] }",
                "\"Psychiatry\"], other = \"Misc\" }",
                1,
            )
        });
        assert!(
            e.to_string()
                .contains("must be one of the column's domain values"),
            "{e}"
        );
    }

    fn refused(text: &str, edit: (&str, &str)) -> String {
        assert!(text.contains(edit.0), "the edit applies: {}", edit.0);
        Profile::parse(&text.replacen(edit.0, edit.1, 1), "p.toml")
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn coarsening_rules_parse_and_odd_ones_are_refused() {
        let (_, text) = crate::builtin_profile("hipaa-safe-harbor").expect("builtin");
        let p = Profile::parse(text, "p.toml").expect("parses");
        let Some(Action::Coarsen(c)) = p.rule(Table::Encounters, "total_cost").map(|r| &r.action)
        else {
            panic!("total_cost is coarsened");
        };
        assert_eq!(c.apply(12_345.67), Some(12_000.0));
        let expenses = r#"healthcare_expenses = { action = "round", digits = 1, role = "value", bounds = [0.0, 5000000.0] }"#;
        let with = |rule: &str| refused(text, (expenses, rule));
        for (rule, why) in [
            (
                r#"healthcare_expenses = { action = "round", role = "value" }"#,
                "either step (> 0) or digits",
            ),
            (
                r#"healthcare_expenses = { action = "round", step = 0.0, role = "value" }"#,
                "either step",
            ),
            (
                r#"healthcare_expenses = { action = "round", step = nan, role = "value" }"#,
                "either step",
            ),
            (
                r#"healthcare_expenses = { action = "round", step = 1.0, digits = 2, role = "value" }"#,
                "either step",
            ),
            (
                r#"healthcare_expenses = { action = "round", digits = 0, role = "value" }"#,
                "digits (1 to 15",
            ),
            (
                r#"healthcare_expenses = { action = "bin", edges = [10.0, 5.0], role = "value" }"#,
                "ascending",
            ),
            (
                r#"healthcare_expenses = { action = "bin", edges = [1.0], role = "value" }"#,
                "2 to 1000 finite edges",
            ),
            (
                r#"healthcare_expenses = { action = "bin", edges = [0.0, inf], role = "value" }"#,
                "finite edges",
            ),
            (
                r#"healthcare_expenses = { action = "top_code", role = "value" }"#,
                "needs at =",
            ),
            (
                r#"healthcare_expenses = { action = "top_code", at = 10.0, top_code = 5.0, role = "value" }"#,
                "given twice",
            ),
            (
                r#"healthcare_expenses = { action = "round", digits = 2, top_code = 5.0, bottom_code = 9.0, role = "value" }"#,
                "below top_code",
            ),
            (
                r#"healthcare_expenses = { action = "keep", top_code = 5.0, role = "value" }"#,
                "go with round, bin",
            ),
            (
                r#"healthcare_expenses = { action = "round", edges = [0.0, 1.0], digits = 2, role = "value" }"#,
                "'edges' go with bin",
            ),
            (
                r#"healthcare_expenses = { action = "round", digits = 2, role = "value", bounds = [0.0, 4999999.0] }"#,
                "coarsen to [0, 5000000]",
            ),
            (
                r#"healthcare_expenses = { action = "round", step = 1000.0, role = "value", bounds = [1.0, 5000000.0] }"#,
                "coarsen to [0, 5000000]",
            ),
        ] {
            let e = with(rule);
            assert!(e.contains(why), "{rule}: {e}");
            assert!(e.starts_with("p.toml:"), "{e}");
        }
        // Integer columns take integral coarsenings only; text columns none.
        let dispenses =
            r#"dispenses = { action = "keep", role = "value", bounds = [0.0, 1000.0] }"#;
        let e = refused(
            text,
            (
                dispenses,
                r#"dispenses = { action = "round", step = 0.5, role = "value" }"#,
            ),
        );
        assert!(e.contains("does not apply to a Int column"), "{e}");
        Profile::parse(
            &text.replacen(dispenses, r#"dispenses = { action = "top_code", at = 100.0, bottom_code = 0.0, role = "value", bounds = [0.0, 100.0] }"#, 1),
            "p.toml",
        )
        .expect("an integral top code on an integer column");
        let e = refused(
            text,
            (
                r#"note_type = { action = "keep""#,
                r#"note_type = { action = "round", digits = 2"#,
            ),
        );
        assert!(e.contains("does not apply to a Text column"), "{e}");
    }

    #[test]
    fn every_quasi_identifier_is_in_the_record_or_says_why() {
        let (_, text) = crate::builtin_profile("hipaa-safe-harbor").expect("builtin");
        let listed = r#""marital", "state"]"#;
        let e = refused(text, (listed, r#""marital"]"#));
        assert!(
            e.contains("patients.state: role quasi_identifier, but it is not in k_anonymity.quasi_identifiers"),
            "{e}"
        );
        let state = r#"state = { action = "keep", role = "quasi_identifier" }"#;
        let why = r#"state = { action = "keep", role = "quasi_identifier", k_exempt = "one state in this export" }"#;
        let p = Profile::parse(
            &text
                .replacen(listed, r#""marital"]"#, 1)
                .replacen(state, why, 1),
            "p.toml",
        )
        .expect("a stated k_exempt lets it out");
        assert_eq!(
            p.rule(Table::Patients, "state")
                .and_then(|r| r.k_exempt.as_deref()),
            Some("one state in this export")
        );
        let e = refused(
            text,
            (
                state,
                r#"state = { action = "keep", role = "quasi_identifier", k_exempt = " " }"#,
            ),
        );
        assert!(e.contains("k_exempt is empty"), "{e}");
        // An event table's quasi-identifier cannot be in the per-person record: it must say why.
        let start = r#"start = { action = "generalize", to = "year", role = "quasi_identifier", k_exempt = "#;
        let e = refused(
            text,
            (
                start,
                r#"start = { action = "generalize", to = "year", role = "quasi_identifier", unused = "#,
            ),
        );
        assert!(e.contains("unknown field"), "{e}");
        let plain = text.replacen(
            r#"start = { action = "generalize", to = "year", role = "quasi_identifier", k_exempt = "event years, many per person: not part of the per-person record; released as years, and withheld where they would narrow the released birth year" }"#,
            r#"start = { action = "generalize", to = "year", role = "quasi_identifier" }"#,
            1,
        );
        let e = Profile::parse(&plain, "p.toml")
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("encounters.start: role quasi_identifier, but it is outside [patients]"),
            "{e}"
        );
    }

    #[test]
    fn rules_that_would_let_a_quasi_identifier_slip_are_refused() {
        let (_, text) = crate::builtin_profile("hipaa-safe-harbor").expect("builtin");
        let death = r#"death_date = { action = "generalize", to = "year", role = "quasi_identifier", as = "death_year" }"#;
        for (edit, why) in [
            (
                (
                    death,
                    r#"death_date = { action = "generalize", to = "year", role = "quasi_identifier", as = "birth_year" }"#,
                ),
                "[patients] releases two columns named 'birth_year'",
            ),
            (
                (
                    death,
                    r#"death_date = { action = "generalize", to = "year", role = "quasi_identifier", as = "person_id" }"#,
                ),
                "two columns named 'person_id'",
            ),
            (
                (
                    r#"zip = { action = "generalize", to = "zip3", role = "quasi_identifier""#,
                    r#"zip = { action = "generalize", to = "zip3", role = "sensitive""#,
                ),
                "patients.zip: a released zip identifies in combination",
            ),
            (
                (
                    r#"birthplace = { action = "drop", role = "identifier" }"#,
                    r#"birthplace = { action = "scrub", role = "quasi_identifier", k_exempt = "free text" }"#,
                ),
                "a quasi-identifier cannot be scrubbed",
            ),
            (
                (
                    r#"marital = { action = "keep", role = "quasi_identifier" }"#,
                    r#"marital = { action = "keep", role = "quasi_identifier", top = 90 }"#,
                ),
                "top_code_age goes with generalize to = year",
            ),
            (
                (
                    r#"healthcare_coverage = { action = "round", digits = 1,"#,
                    r#"healthcare_coverage = { action = "round", digits = 1, top_code_age = 90,"#,
                ),
                "top_code_age goes with generalize to = year",
            ),
            (
                (
                    r#"note_type = { action = "keep", role = "sensitive" }"#,
                    r#"note_type = { action = "keep", role = "sensitive", k_exempt = "x" }"#,
                ),
                "k_exempt goes on quasi-identifiers only",
            ),
            (
                (
                    r#"note_type = { action = "keep", role = "sensitive" }"#,
                    r#"note_type = { action = "keep", role = "sensitive", time_exempt = "x" }"#,
                ),
                "time_exempt goes on times released finer",
            ),
            (
                ("date_shift_days = 0", "date_shift_days = 4000000000"),
                "date_shift_days must be at most 3650",
            ),
        ] {
            let e = refused(text, edit);
            assert!(e.contains(why), "{edit:?}: {e}");
        }
    }

    #[test]
    fn times_finer_than_the_profile_allows_need_a_reason() {
        let (_, text) = crate::builtin_profile("jp-pseudonymized-medical").expect("builtin");
        let p = Profile::parse(text, "p.toml").expect("parses");
        assert_eq!(p.risk.time_precision, TimeGrain::Hour);
        assert_eq!(
            p.rule(Table::Notes, "date").map(|r| &r.action),
            Some(&Action::TruncateTime(TimeGrain::Hour))
        );
        let note = r#"date = { action = "truncate_time", to = "hour", role = "sensitive" }  # shifted with the person, to the hour
note_type"#;
        let e = refused(
            text,
            (
                note,
                "date = { action = \"date_shift\", role = \"sensitive\" }\nnote_type",
            ),
        );
        assert!(
            e.contains(
                "notes.date: released to the second, finer than risk.time_precision = \"hour\""
            ),
            "{e}"
        );
        let minute = "date = { action = \"truncate_time\", to = \"minute\", role = \"sensitive\", time_exempt = \"medication timing studies\" }\nnote_type";
        Profile::parse(&text.replacen(note, minute, 1), "p.toml")
            .expect("a stated reason allows minutes");
        let e = refused(
            text,
            (
                note,
                "date = { action = \"truncate_time\", to = \"week\", role = \"sensitive\" }\nnote_type",
            ),
        );
        assert!(
            e.contains("truncate_time needs to = day | hour | minute"),
            "{e}"
        );
        let e = refused(
            text,
            (
                "time_precision = \"hour\"",
                "time_precision = \"fortnight\"",
            ),
        );
        assert!(e.contains("risk.time_precision: 'fortnight'"), "{e}");
        let e = refused(text, ("max_unique_ratio = 0.5", "max_unique_ratio = 1.5"));
        assert!(e.contains("max_unique_ratio must be within 0..=1"), "{e}");
        let (_, hipaa) = crate::builtin_profile("hipaa-safe-harbor").expect("builtin");
        let p = Profile::parse(hipaa, "p.toml").expect("parses");
        for t in Table::ALL {
            for r in p.rules(t) {
                assert!(
                    r.released_grain().is_none_or(|g| g == TimeGrain::Year),
                    "Safe Harbor releases {t}.{} to the {:?}",
                    r.column,
                    r.released_grain()
                );
            }
        }
    }

    #[test]
    fn unknown_profile_lists_the_builtin_ones() {
        let e = Profile::load("no-such-profile").expect_err("unknown");
        assert!(e.to_string().contains("hipaa-safe-harbor"), "{e}");
    }
}
