//! The de-identifying transform: source records in, de-identified Arrow record batches out.
//!
//! Two passes. [`Deidentifier::add_patient`] sees every patient first: it validates the national ID, forms
//! the keyed `person_id` and the date shift, keeps the identifiers the scrubber needs, and collects the
//! quasi-identifiers. [`Deidentifier::finish_patients`] runs k-anonymity. Then
//! [`Deidentifier::transform`] maps every row of every table through the profile into a [`TableOutput`],
//! or says why it was quarantined or suppressed.

use std::collections::BTreeMap;

use ahash::AHashMap as HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use chrono::{Datelike, NaiveDate, NaiveDateTime, TimeDelta};
use policies::schema::{PATIENT_REF, PERSON_ID};
use policies::{
    Action, ColumnRule, ColumnType, Generalization, LinkKey, Profile, Table, TimeGrain,
};

use crate::ids::validate_national_id;
use crate::kanon::{KAnonOutcome, anonymize, climb, latest_day, level_of};
use crate::keys::Pseudonymizer;
use crate::read::SourceRecord;
use crate::risk::{Cell, Measured, RiskMeter, RiskReport, SingledOut, Withhold};
use crate::scrub::{AgeRule, KnownIdentifiers, PatternCache, PhiKind, ScrubCounts, scrub};
use crate::value::Value;

/// Scrubbed spans kept per placeholder type for the provider's review.
pub const REVIEW_PER_KIND: usize = 25;

/// One scrubbed span in its context (original text: for an encrypted file only).
pub struct ReviewItem {
    /// Table of the text.
    pub table: Table,
    /// The placeholder put there.
    pub kind: PhiKind,
    /// The text it replaced.
    pub found: String,
    /// Up to 40 bytes before it.
    pub before: String,
    /// Up to 40 bytes after it.
    pub after: String,
}

/// A reservoir sample per placeholder type (Vitter's algorithm R), so the review sees the whole run.
#[derive(Default)]
struct ReviewSampler {
    items: Vec<ReviewItem>,
    seen: BTreeMap<PhiKind, u64>,
    state: u64,
}

impl ReviewSampler {
    fn next(&mut self) -> u64 {
        if self.state == 0 {
            use std::hash::BuildHasher;
            self.state = std::hash::RandomState::new().hash_one(0u8) | 1;
        }
        // xorshift64*: the sample's choice needs no cryptographic strength.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn offer(&mut self, table: Table, text: &str, spans: &[(usize, usize, PhiKind)]) {
        for &(s, e, kind) in spans {
            let n = {
                let seen = self.seen.entry(kind).or_default();
                *seen += 1;
                *seen
            };
            let slot = if n as usize <= REVIEW_PER_KIND {
                None
            } else {
                let j = self.next() % n;
                if j as usize >= REVIEW_PER_KIND {
                    continue;
                }
                Some(j as usize)
            };
            let from = text.floor_char_boundary(s.saturating_sub(40));
            let to = text.ceil_char_boundary((e + 40).min(text.len()));
            let item = ReviewItem {
                table,
                kind,
                found: text[s..e].to_owned(),
                before: text[from..s].to_owned(),
                after: text[e..to].to_owned(),
            };
            match slot {
                None => self.items.push(item),
                Some(j) => {
                    // The j-th kept item of this kind is replaced.
                    if let Some(old) = self.items.iter_mut().filter(|i| i.kind == kind).nth(j) {
                        *old = item;
                    }
                }
            }
        }
    }
}

/// One output value.
#[derive(Debug, Clone)]
pub enum Out {
    /// Null.
    Null,
    /// Text.
    Str(String),
    /// 32-bit integer (years).
    I32(i32),
    /// 64-bit integer.
    I64(i64),
    /// Float.
    F64(f64),
    /// Days since the epoch.
    Date(i32),
    /// Microseconds since the epoch (UTC).
    Ts(i64),
}

impl PartialEq for Out {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Out::Null, Out::Null) => true,
            (Out::Str(a), Out::Str(b)) => a == b,
            (Out::I32(a), Out::I32(b)) | (Out::Date(a), Out::Date(b)) => a == b,
            (Out::I64(a), Out::I64(b)) | (Out::Ts(a), Out::Ts(b)) => a == b,
            (Out::F64(a), Out::F64(b)) => a.to_bits() == b.to_bits(),
            _ => false,
        }
    }
}
impl Eq for Out {}
impl std::hash::Hash for Out {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match self {
            Out::Null => {}
            Out::Str(s) => s.hash(h),
            Out::I32(v) | Out::Date(v) => v.hash(h),
            Out::I64(v) | Out::Ts(v) => v.hash(h),
            Out::F64(v) => v.to_bits().hash(h),
        }
    }
}
impl PartialOrd for Out {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Out::Str(a), Out::Str(b)) => a.partial_cmp(b),
            (Out::I32(a), Out::I32(b)) | (Out::Date(a), Out::Date(b)) => a.partial_cmp(b),
            (Out::I64(a), Out::I64(b)) | (Out::Ts(a), Out::Ts(b)) => a.partial_cmp(b),
            (Out::F64(a), Out::F64(b)) => a.partial_cmp(b),
            (Out::Null, Out::Null) => Some(std::cmp::Ordering::Equal),
            (Out::Null, _) => Some(std::cmp::Ordering::Less),
            (_, Out::Null) => Some(std::cmp::Ordering::Greater),
            _ => None,
        }
    }
}

const EPOCH: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid constant date");

pub(crate) fn days_from_date(d: NaiveDate) -> i32 {
    i32::try_from((d - EPOCH).num_days()).unwrap_or(i32::MAX)
}

pub(crate) fn date_from_days(days: i32) -> Option<NaiveDate> {
    EPOCH.checked_add_signed(TimeDelta::days(i64::from(days)))
}

fn micros(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp_micros()
}

/// Why a row is not written.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Invalid: goes to the quarantine with this reason.
    Quarantine(String),
    /// Valid, but its person was suppressed by k-anonymity.
    Suppressed,
}

/// What pass two needs of one person. Kept for every person of the export, so kept small: the
/// identifiers the scrubber needs wait in the [`KnownStore`] (an encrypted spill file during an ingest).
struct Person {
    /// The keyed pseudonym's 16 bytes (released as 32 hex digits).
    person_id: [u8; 16],
    shift_days: i64,
    /// Handle of the person's known identifiers in the store.
    known: u32,
    suppressed: bool,
    /// Its ID occurred twice: quarantined, not part of k-anonymity or the counts.
    duplicate: bool,
    /// Its quasi-identifiers' levels after k-anonymity (four bits a column).
    levels: u64,
    /// Its k-anonymity class.
    class: u32,
    /// The last day its released birth value can stand for (days since 1970, in the birth column's own
    /// shifted or unshifted time; `i32::MIN`: no limit): an event dated earlier would narrow it, so it
    /// is withheld.
    birth_latest: i32,
    /// Another record of a person registered earlier (two source IDs, one national ID): it takes that
    /// person's k-anonymity outcome, and its patients row is not released again.
    alias: bool,
    /// The person it is (itself, or the earlier record of an alias).
    canonical: u32,
    /// What ages in the person's text may say, given how their birth value is released.
    ages: AgeRule,
    /// The birth year is top-coded (the person is at least the profile's `top_code_age`).
    top_coded: bool,
}

impl Person {
    /// A person as pass one registers them: released, unranked, with no birth limit yet.
    fn new(person_id: [u8; 16], shift_days: i64, known: u32, canonical: u32) -> Person {
        Person {
            person_id,
            shift_days,
            known,
            suppressed: false,
            duplicate: false,
            levels: 0,
            class: 0,
            birth_latest: i32::MIN,
            alias: false,
            canonical,
            ages: AgeRule::Coarse,
            top_coded: false,
        }
    }
}

/// Where pass one keeps each person's known identifiers (names, IDs, phone, address, dates) until pass
/// two scrubs that person's notes. [`MemoryKnownStore`] keeps them in memory; the enclave's ingest passes
/// an encrypted spill file, so that memory does not grow with them.
pub trait KnownStore {
    /// Stores one person's record and returns its handle.
    fn put(&mut self, record: &[u8]) -> Result<u32, String>;
    /// The record stored under `handle`.
    fn get(&mut self, handle: u32) -> Result<Vec<u8>, String>;
}

/// Known identifiers kept in memory.
#[derive(Default)]
pub struct MemoryKnownStore(Vec<Box<[u8]>>);

impl KnownStore for MemoryKnownStore {
    fn put(&mut self, record: &[u8]) -> Result<u32, String> {
        self.0.push(record.into());
        u32::try_from(self.0.len() - 1).map_err(|_| "more than 2^32 persons".to_owned())
    }
    fn get(&mut self, handle: u32) -> Result<Vec<u8>, String> {
        self.0
            .get(handle as usize)
            .map(|r| r.to_vec())
            .ok_or_else(|| format!("no known identifiers under handle {handle}"))
    }
}

/// A person's known identifiers as one record: per value its kind, length and bytes; per date a marker
/// and its day number.
fn encode_known(values: &[(&str, PhiKind)], dates: &[NaiveDate]) -> Vec<u8> {
    let mut out = Vec::new();
    for (v, kind) in values {
        // Identifiers are short; anything past 64 KiB is not one a note could hold either.
        let bytes = &v.as_bytes()[..v.len().min(u16::MAX.into())];
        out.push(kind.code());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    for d in dates {
        out.push(DATE_MARK);
        out.extend_from_slice(&days_from_date(*d).to_le_bytes());
    }
    out
}

const DATE_MARK: u8 = 0xff;

fn decode_known(mut record: &[u8]) -> KnownIdentifiers {
    let mut k = KnownIdentifiers::default();
    while let Some((&tag, rest)) = record.split_first() {
        let Some((head, rest)) = rest.split_first_chunk::<4>() else {
            break;
        };
        if tag == DATE_MARK {
            if let Some(d) = date_from_days(i32::from_le_bytes(*head)) {
                k.add_date(d);
            }
            record = rest;
            continue;
        }
        let len = u32::from_le_bytes(*head) as usize;
        let (Some(kind), Some(bytes)) = (PhiKind::from_code(tag), rest.get(..len)) else {
            break;
        };
        k.add(&String::from_utf8_lossy(bytes), kind);
        record = &rest[len..];
    }
    k.seal();
    k
}

/// One released column and what was done to it (for the catalog and the report).
#[derive(Debug, Clone, PartialEq)]
pub struct ReleasedColumn {
    /// Output name.
    pub name: String,
    /// Arrow type.
    pub data_type: String,
    /// Role.
    pub role: String,
    /// Action, with any k-anonymity generalisation level.
    pub action: String,
    /// DP bounds.
    pub bounds: Option<(f64, f64)>,
    /// Public domain (categorical columns).
    pub domain: Option<Vec<String>>,
}

/// One released column: where it comes from and how.
struct OutColumn {
    field: Field,
    source: usize,
    rule: ColumnRule,
    /// Position in the k-anonymity quasi-identifier list, if it is one.
    qi: Option<usize>,
}

/// Values of one column outside its declared domain, and what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutOfDomain {
    /// Mapped to the column's `other` key.
    pub mapped: u64,
    /// Their rows quarantined.
    pub quarantined: u64,
}

/// What the reading thread does ahead of the transform: the pattern spans of the text columns the profile
/// scrubs (the same for every person), so the transform has only the person's own identifiers and age
/// rule to add ([`Deidentifier::prescan`]).
pub struct Prescan {
    scrubbed: BTreeMap<Table, Vec<usize>>,
    pseudonymized: BTreeMap<Table, Vec<(usize, &'static str)>>,
    cache: PatternCache,
    keys: Pseudonymizer,
    provider: String,
    last_token: HashMap<&'static str, (String, String)>,
}

impl Prescan {
    /// Finds the pattern spans of the record's scrubbed text values and the pseudonyms of its
    /// pseudonymized values.
    pub fn apply(&mut self, rec: &mut SourceRecord) {
        if let Some(columns) = self.scrubbed.get(&rec.table) {
            for &i in columns {
                if let Some(text) = rec
                    .values
                    .get(i)
                    .and_then(Option::as_ref)
                    .and_then(Value::as_text)
                {
                    rec.ahead.patterns.push((i, self.cache.pattern_spans(text)));
                }
            }
        }
        if let Some(columns) = self.pseudonymized.get(&rec.table) {
            for &(i, column) in columns {
                if let Some(v) = rec.values.get(i).and_then(Option::as_ref) {
                    let token = cached_token(
                        &mut self.last_token,
                        &self.keys,
                        &self.provider,
                        column,
                        &text_of(v),
                    );
                    rec.ahead.tokens.push((i, token));
                }
            }
        }
    }
}

/// The pseudonym of `value` in `column`, from `last` when the column's previous value was the same (rows
/// of one encounter come together).
fn cached_token(
    last: &mut HashMap<&'static str, (String, String)>,
    keys: &Pseudonymizer,
    provider: &str,
    column: &'static str,
    value: &str,
) -> String {
    if let Some((v, t)) = last.get(column)
        && v == value
    {
        return t.clone();
    }
    let t = keys.token(column, provider, value);
    last.insert(column, (value.to_owned(), t.clone()));
    t
}

/// The de-identifying transform for one ingest run.
pub struct Deidentifier {
    profile: Profile,
    keys: Pseudonymizer,
    provider: String,
    reference: NaiveDate,
    people: Vec<Person>,
    /// Each person's quasi-identifiers, from pass one until k-anonymity has run.
    pending_qi: Vec<Vec<Out>>,
    /// Valid persons by a 128-bit keyed hash of their source ID (the IDs themselves are not kept).
    by_source: HashMap<u128, u32>,
    /// Source IDs whose patient row was quarantined, with the reason.
    quarantined_sources: HashMap<u128, String>,
    source_hashers: (std::hash::RandomState, std::hash::RandomState),
    /// The last source ID looked up and its person (rows of one person mostly come together).
    last_source: (String, Option<u32>),
    known_store: Box<dyn KnownStore + Send>,
    outputs: BTreeMap<Table, (SchemaRef, Vec<OutColumn>)>,
    kanon: Option<KAnonOutcome>,
    scrub_counts: ScrubCounts,
    cached_matcher: Option<(usize, KnownIdentifiers)>,
    /// Pattern spans of recurring short texts.
    pattern_cache: PatternCache,
    /// The last value and token per pseudonymized column: rows of one encounter come together.
    last_token: std::cell::RefCell<HashMap<&'static str, (String, String)>>,
    national_id_linked: u64,
    /// The output row under construction (after the person column), reused from row to row.
    row_buf: Vec<Out>,
    /// Values outside a column's declared domain, per `table.column` and what became of them.
    out_of_domain: BTreeMap<String, OutOfDomain>,
    /// Rows written per (table, person_id), for the tables whose rows per person the profile bounds
    /// (keyed by the released person_id: two source IDs can link to one person).
    rows_per_person: HashMap<(Table, [u8; 16]), u32>,
    /// Event times withheld because they would narrow the person's released birth value, per
    /// `table.column`.
    withheld_events: BTreeMap<String, u64>,
    /// The birth column is released shifted.
    birth_shifted: bool,
    /// Patients rows written per k-anonymity class (the check that what was written is what was counted).
    written_classes: HashMap<u32, u64>,
    /// A sample of scrubbed spans in their context, for the provider's review.
    review: ReviewSampler,
    /// The risk figures, from the end of pass one.
    risk: Option<RiskMeter>,
    /// The tables whose singled-out values are being withheld, and which.
    withholding: HashMap<Table, Withhold>,
    /// Released person_id → person, for measuring rows read back.
    person_index: HashMap<[u8; 16], u32>,
}

impl Deidentifier {
    /// Prepares a transform. `reference` is the date ages are computed at (the extraction date).
    pub fn new(
        profile: Profile,
        keys: Pseudonymizer,
        provider: &str,
        reference: NaiveDate,
    ) -> Deidentifier {
        let qis = profile
            .k_anonymity
            .as_ref()
            .map(|k| k.quasi_identifiers.clone())
            .unwrap_or_default();
        let mut outputs = BTreeMap::new();
        for table in Table::ALL {
            let mut cols = Vec::new();
            let person = table.column_index(PATIENT_REF).unwrap_or(0);
            let person_rule = ColumnRule {
                column: PATIENT_REF,
                ty: ColumnType::Text,
                action: Action::Pseudonymize,
                role: policies::Role::Identifier,
                bounds: None,
                output: PERSON_ID.to_owned(),
                domain: None,
                other: None,
                k_exempt: None,
                time_exempt: None,
            };
            cols.push(OutColumn {
                field: Field::new(PERSON_ID, DataType::Utf8, false),
                source: person,
                rule: person_rule,
                qi: None,
            });
            for rule in profile.rules(table) {
                if rule.action == Action::Drop || rule.column == PATIENT_REF {
                    continue;
                }
                let dt = output_type(rule);
                let qi = (table == Table::Patients)
                    .then(|| qis.iter().position(|q| q == &rule.output))
                    .flatten();
                let source = table.column_index(rule.column).unwrap_or(0);
                cols.push(OutColumn {
                    field: Field::new(&rule.output, dt, true),
                    source,
                    rule: rule.clone(),
                    qi,
                });
            }
            let schema = Arc::new(Schema::new(
                cols.iter().map(|c| c.field.clone()).collect::<Vec<_>>(),
            ));
            outputs.insert(table, (schema, cols));
        }
        let birth_shifted = profile.date_shift_days > 0
            && profile
                .rule(Table::Patients, "birth_date")
                .is_some_and(|r| matches!(r.action, Action::DateShift | Action::TruncateTime(_)));
        Deidentifier {
            profile,
            keys,
            provider: provider.to_owned(),
            reference,
            people: Vec::new(),
            pending_qi: Vec::new(),
            by_source: HashMap::new(),
            quarantined_sources: HashMap::new(),
            source_hashers: Default::default(),
            last_source: (String::new(), None),
            known_store: Box::new(MemoryKnownStore::default()),
            outputs,
            kanon: None,
            scrub_counts: ScrubCounts::new(),
            cached_matcher: None,
            pattern_cache: PatternCache::default(),
            last_token: std::cell::RefCell::new(HashMap::new()),
            national_id_linked: 0,
            row_buf: Vec::new(),
            rows_per_person: HashMap::new(),
            out_of_domain: BTreeMap::new(),
            withheld_events: BTreeMap::new(),
            birth_shifted,
            written_classes: HashMap::new(),
            review: ReviewSampler::default(),
            risk: None,
            withholding: HashMap::new(),
            person_index: HashMap::new(),
        }
    }

    /// True when a column's times are released moved by the person's shift.
    fn shifted(&self, rule: &ColumnRule) -> bool {
        self.profile.date_shift_days > 0
            && matches!(rule.action, Action::DateShift | Action::TruncateTime(_))
    }

    /// The scrubbing work a reading thread can do ahead, for this profile.
    pub fn prescan(&self) -> Prescan {
        let mut scrubbed: BTreeMap<Table, Vec<usize>> = BTreeMap::new();
        let mut pseudonymized: BTreeMap<Table, Vec<(usize, &'static str)>> = BTreeMap::new();
        for (t, (_, cols)) in &self.outputs {
            for c in &cols[1..] {
                match c.rule.action {
                    Action::Scrub => scrubbed.entry(*t).or_default().push(c.source),
                    Action::Pseudonymize => pseudonymized
                        .entry(*t)
                        .or_default()
                        .push((c.source, c.rule.column)),
                    _ => {}
                }
            }
        }
        Prescan {
            scrubbed,
            pseudonymized,
            cache: PatternCache::default(),
            keys: self.keys.clone(),
            provider: self.provider.clone(),
            last_token: HashMap::new(),
        }
    }

    /// The profile in force.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The output schema of a table.
    pub fn schema(&self, table: Table) -> SchemaRef {
        self.outputs[&table].0.clone()
    }

    /// What was done to each released column of a table.
    pub fn column_actions(&self, table: Table) -> Vec<ReleasedColumn> {
        self.outputs[&table]
            .1
            .iter()
            .map(|c| {
                let mut action = match &c.rule.action {
                    Action::Generalize(g) => format!("generalize: {g}"),
                    Action::Coarsen(co) => format!("{}: {co}", c.rule.action.name()),
                    Action::TruncateTime(g) if self.profile.date_shift_days > 0 => {
                        format!("date_shift, truncated to the {g}")
                    }
                    Action::TruncateTime(g) => format!("truncated to the {g}"),
                    a => a.name().to_owned(),
                };
                if let Some((i, k)) = c.qi.zip(self.kanon.as_ref()) {
                    if let Some(level @ 1..) = k.levels.get(i).copied() {
                        action.push_str(&format!("; k-anonymity generalisation level {level}"));
                    }
                    if let Some(n @ 1..) = k.recoded.get(i).copied() {
                        let withheld = k.withheld.get(i).copied().unwrap_or(0);
                        action.push_str(&format!(
                            "; recoded locally for {n} persons ({withheld} withheld)"
                        ));
                    }
                }
                if let Some(n) = self
                    .withheld_events
                    .get(&format!("{table}.{}", c.rule.column))
                {
                    action.push_str(&format!("; {n} withheld inside the person's birth band"));
                }
                if let Some(why) = &c.rule.k_exempt {
                    action.push_str(&format!("; outside k-anonymity: {why}"));
                }
                if let Some(why) = &c.rule.time_exempt {
                    action.push_str(&format!("; finer than the profile's time precision: {why}"));
                }
                ReleasedColumn {
                    name: c.field.name().clone(),
                    data_type: c.field.data_type().to_string(),
                    role: c.rule.role.name().to_owned(),
                    action,
                    bounds: c.rule.bounds,
                    domain: c.rule.domain.clone(),
                }
            })
            .collect()
    }

    /// First pass: registers one patient. An invalid patient is remembered, and its rows quarantined later.
    pub fn add_patient(&mut self, rec: &SourceRecord) {
        let Some(source_id) = rec.text(PATIENT_REF) else {
            return;
        };
        let key = self.source_key(source_id);
        let duplicate = "duplicate patient ID in the export";
        if let Some(i) = self.by_source.remove(&key) {
            // Both rows of a duplicated ID are quarantined; the first one's person leaves the release.
            self.people[i as usize].suppressed = true;
            self.people[i as usize].duplicate = true;
            self.quarantined_sources.insert(key, duplicate.into());
            return;
        }
        if let Some(why) = self.quarantined_sources.get_mut(&key) {
            *why = duplicate.into();
            return;
        }
        match self.person_for(rec, source_id) {
            Ok((p, qi)) => {
                self.people.push(p);
                self.pending_qi.push(qi);
                self.by_source.insert(
                    key,
                    u32::try_from(self.people.len() - 1).unwrap_or(u32::MAX),
                );
            }
            Err(reason) => {
                self.quarantined_sources.insert(key, reason);
            }
        }
    }

    /// Uses `store` for the persons' known identifiers (before the first `add_patient`).
    pub fn with_known_store(mut self, store: Box<dyn KnownStore + Send>) -> Deidentifier {
        self.known_store = store;
        self
    }

    fn source_key(&self, source_id: &str) -> u128 {
        use std::hash::BuildHasher;
        let (a, b) = &self.source_hashers;
        (u128::from(a.hash_one(source_id)) << 64) | u128::from(b.hash_one(source_id))
    }

    fn person_for(
        &mut self,
        rec: &SourceRecord,
        source_id: &str,
    ) -> Result<(Person, Vec<Out>), String> {
        let mut person_id = None;
        for key in &self.profile.link_on {
            match key {
                LinkKey::NationalId => {
                    if let Some(raw) = rec.text("national_id") {
                        let (norm, _) =
                            validate_national_id(raw).map_err(|e| format!("national_id: {e}"))?;
                        person_id = Some(self.keys.person_from_national_id(&norm));
                        self.national_id_linked += 1;
                        break;
                    }
                }
                LinkKey::PatientId => {
                    person_id = Some(self.keys.person_from_local_id(&self.provider, source_id));
                    break;
                }
            }
        }
        let person_id = person_id.ok_or("no identifier to link on")?;
        let birth = rec.get("birth_date").and_then(Value::as_date);
        if birth.is_some_and(|b| b > self.reference) {
            return Err("birth_date: in the future".into());
        }
        let mut known = Vec::new();
        for (col, kind) in [
            ("first_name", PhiKind::Name),
            ("middle_name", PhiKind::Name),
            ("last_name", PhiKind::Name),
            ("maiden_name", PhiKind::Name),
            ("mrn", PhiKind::Id),
            ("national_id", PhiKind::Id),
            ("drivers_license", PhiKind::Id),
            ("passport", PhiKind::Id),
            ("insurance_id", PhiKind::Id),
            ("phone", PhiKind::Phone),
            ("email", PhiKind::Email),
            ("address", PhiKind::Address),
            ("city", PhiKind::Address),
            ("zip", PhiKind::Zip),
            (PATIENT_REF, PhiKind::Id),
        ] {
            if let Some(t) = rec.text(col) {
                known.push((t, kind));
            }
        }
        let known_dates: Vec<NaiveDate> = ["birth_date", "death_date"]
            .iter()
            .filter_map(|c| rec.get(c).and_then(Value::as_date))
            .collect();
        let known = self
            .known_store
            .put(&encode_known(&known, &known_dates))
            .map_err(|e| format!("cannot keep the known identifiers: {e}"))?;
        let shift_days = self
            .keys
            .shift_days(&person_id, self.profile.date_shift_days);
        let mut id = [0u8; 16];
        hex::decode_to_slice(&person_id, &mut id).map_err(|_| "pseudonym is not 16 bytes")?;
        let person = Person::new(
            id,
            shift_days,
            known,
            u32::try_from(self.people.len()).unwrap_or(u32::MAX),
        );
        let mut person = person;
        let n_qi = self
            .profile
            .k_anonymity
            .as_ref()
            .map_or(0, |k| k.quasi_identifiers.len());
        let mut qi = vec![Out::Null; n_qi];
        let cols = &self.outputs[&Table::Patients].1;
        for c in cols.iter().skip(1) {
            if c.qi.is_none() && c.rule.domain.is_none() && c.rule.column != "birth_date" {
                continue;
            }
            let mut v = self.apply(
                &c.rule,
                rec.values[c.source].as_ref(),
                &person,
                &mut ScrubCounts::new(),
            )?;
            // The domain check of pass two, made here, so that k-anonymity counts only rows it releases.
            if let (Some(domain), Out::Str(value)) = (&c.rule.domain, &v)
                && !domain.contains(value)
            {
                match &c.rule.other {
                    Some(other) => v = Out::Str(other.clone()),
                    None => {
                        self.out_of_domain
                            .entry(format!("{}.{}", Table::Patients, c.rule.column))
                            .or_default()
                            .quarantined += 1;
                        return Err(format!(
                            "{}: a value outside the column's declared domain (the profile's domain list; declare `other` to map such values to a key)",
                            c.rule.column
                        ));
                    }
                }
            }
            if c.rule.column == "birth_date" {
                person.birth_latest = self
                    .latest_birth(&v, 0, &c.rule)
                    .map_or(i32::MIN, days_from_date);
                person.top_coded = match (&c.rule.action, &v, birth) {
                    (
                        Action::Generalize(Generalization::Year {
                            top_code_age: Some(t),
                        }),
                        _,
                        Some(b),
                    ) => age_at(b, self.reference) >= *t,
                    (Action::Generalize(Generalization::AgeBand { .. }), Out::Str(band), _) => {
                        band.ends_with('+')
                    }
                    _ => false,
                };
                person.ages = age_rule(&v, 0, person.top_coded);
            }
            if let Some(i) = c.qi {
                qi[i] = v;
            }
        }
        Ok((person, qi))
    }

    /// Ends the first pass: runs k-anonymity over the registered patients.
    pub fn finish_patients(&mut self) -> Option<&KAnonOutcome> {
        // Two records of one person (their national ID links them): the later one is an alias.
        let mut first: HashMap<[u8; 16], u32> = HashMap::new();
        for (i, p) in self.people.iter_mut().enumerate() {
            if p.duplicate {
                continue;
            }
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let canonical = *first.entry(p.person_id).or_insert(i);
            if canonical != i {
                p.alias = true;
                p.canonical = canonical;
            }
        }
        self.risk = Some(self.risk_meter());
        let Some(k) = self.profile.k_anonymity.clone() else {
            self.copy_to_aliases();
            return None;
        };
        // The birth column's place in the record: event dates must not narrow its released value.
        let birth = self.outputs[&Table::Patients]
            .1
            .iter()
            .find(|c| c.rule.column == "birth_date")
            .and_then(|c| Some((c.qi?, c.rule.clone())));
        // The quasi-identifiers are needed for this step only.
        let mut all_qi = std::mem::take(&mut self.pending_qi).into_iter();
        let mut eligible: Vec<usize> = Vec::new();
        let mut rows: Vec<Vec<Out>> = Vec::new();
        for (i, p) in self.people.iter().enumerate() {
            let qi = all_qi.next().unwrap_or_default();
            if !p.duplicate && !p.alias {
                eligible.push(i);
                rows.push(qi);
            }
        }
        let outcome = anonymize(&rows, k.k, k.max_suppression_ratio);
        for (j, &i) in eligible.iter().enumerate() {
            let levels = outcome.person_levels[j];
            let latest = birth
                .as_ref()
                .and_then(|(b, rule)| self.latest_birth(&rows[j][*b], level_of(levels, *b), rule));
            let p = &mut self.people[i];
            p.suppressed = outcome.suppressed[j];
            p.levels = levels;
            p.class = outcome.class_of[j];
            if let Some((b, _)) = &birth {
                p.birth_latest = latest.map_or(i32::MIN, days_from_date);
                p.ages = age_rule(&rows[j][*b], level_of(levels, *b), p.top_coded);
            }
        }
        self.kanon = Some(outcome);
        self.copy_to_aliases();
        self.kanon.as_ref()
    }

    /// An alias takes its person's k-anonymity outcome.
    fn copy_to_aliases(&mut self) {
        for i in 0..self.people.len() {
            if self.people[i].alias {
                let c = &self.people[self.people[i].canonical as usize];
                let (suppressed, levels, class, birth, ages) =
                    (c.suppressed, c.levels, c.class, c.birth_latest, c.ages);
                let p = &mut self.people[i];
                p.suppressed = suppressed;
                p.levels = levels;
                p.class = class;
                p.birth_latest = birth;
                p.ages = ages;
            }
        }
    }

    /// The last day a released birth value (at its k-anonymity level) can stand for.
    fn latest_birth(&self, v: &Out, level: u8, rule: &ColumnRule) -> Option<NaiveDate> {
        match (&rule.action, v) {
            (Action::Generalize(Generalization::AgeBand { .. }), Out::Str(band)) if level == 0 => {
                let youngest: u32 = band.split(['-', '+']).next()?.parse().ok()?;
                self.reference
                    .checked_sub_months(chrono::Months::new(youngest.saturating_mul(12)))
            }
            _ => latest_day(v, level),
        }
    }

    /// What the risk report measures in each table: its own quasi-identifier columns, and every released
    /// column but the person's, pseudonyms, scrubbed text and the k-anonymity record.
    fn risk_meter(&self) -> RiskMeter {
        let tables = self
            .outputs
            .iter()
            .map(|(table, (_, cols))| {
                let mut row_qis = Vec::new();
                let mut measured = Vec::new();
                for (index, c) in cols[1..].iter().enumerate() {
                    let rule = &c.rule;
                    // A row's quasi-identifiers beyond its person's k-anonymity class: an event table's
                    // own, and any the profile leaves out of the record (or all, without k-anonymity).
                    if rule.role == policies::Role::QuasiIdentifier && c.qi.is_none() {
                        row_qis.push(index);
                    }
                    if matches!(rule.action, Action::Pseudonymize | Action::Scrub)
                        || rule.role == policies::Role::Identifier
                        || c.qi.is_some()
                    {
                        continue;
                    }
                    // A shifted time is compared on its time of day, the part the shift keeps; a shifted
                    // date keeps nothing an outsider could match without the person's shift.
                    let shifted = self.shifted(rule);
                    let shifted_date = shifted && rule.ty == ColumnType::Date;
                    measured.push(Measured {
                        name: rule.output.clone(),
                        index,
                        enforced: (rule.role == policies::Role::Value || rule.ty.is_temporal())
                            && !shifted_date,
                        time_of_day: shifted && !shifted_date,
                    });
                }
                (*table, row_qis, measured)
            })
            .collect();
        RiskMeter::new(self.people.len(), tables)
    }

    /// Per table, the value and time columns whose written values single out their person (a value no
    /// other person holds), with how many rows hold such values.
    pub fn singled_out(&self) -> Vec<(Table, Vec<SingledOut>)> {
        let Some(meter) = &self.risk else {
            return Vec::new();
        };
        Table::ALL
            .into_iter()
            .map(|t| (t, meter.singled_out(t)))
            .filter(|(_, s)| !s.is_empty())
            .collect()
    }

    /// Starts withholding `table`'s singled-out values: its written batches go through
    /// [`Deidentifier::withhold_batch`] again, and the table is measured anew from them.
    pub fn begin_withholding(&mut self, table: Table) {
        if self.person_index.is_empty() {
            self.person_index = self
                .people
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.suppressed && !p.alias)
                .map(|(i, p)| (p.person_id, u32::try_from(i).unwrap_or(u32::MAX)))
                .collect();
        }
        if let Some(meter) = self.risk.as_mut() {
            self.withholding.insert(table, meter.withhold(table));
        }
    }

    /// A written batch of `table` (given to [`Deidentifier::begin_withholding`] before), with its
    /// singled-out values withheld (null); the table's figures follow its rows. Several tables can be
    /// withheld at once, their batches interleaved.
    pub fn withhold_batch(
        &mut self,
        table: Table,
        batch: &RecordBatch,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let (Some(w), Some(meter)) = (self.withholding.get(&table), self.risk.as_mut()) else {
            return Ok(batch.clone());
        };
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for (i, time_of_day, hashes) in &w.columns {
            let Some(col) = columns.get(i + 1) else {
                continue;
            };
            let mask: arrow::array::BooleanArray = (0..rows)
                .map(|r| {
                    let v = Cell::at(col.as_ref(), r);
                    Some(v != Cell::Null && hashes.contains(&meter.hash_value(v, *time_of_day)))
                })
                .collect();
            columns[i + 1] = arrow::compute::nullif(col.as_ref(), &mask)?;
        }
        let out = RecordBatch::try_new(batch.schema(), columns)?;
        if !w.measure_again && !w.count_classes {
            return Ok(out);
        }
        let ids = out
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| arrow::error::ArrowError::SchemaError("person_id is not text".into()))?;
        let mut row = Vec::with_capacity(out.num_columns());
        for r in 0..rows {
            let mut id = [0u8; 16];
            let person = hex::decode_to_slice(ids.value(r), &mut id)
                .ok()
                .and_then(|()| self.person_index.get(&id).copied());
            let Some(idx) = person else { continue };
            let class = self.people[idx as usize].class;
            if w.measure_again {
                row.clear();
                row.extend(out.columns()[1..].iter().map(|c| out_at(c.as_ref(), r)));
                meter.record(table, idx as usize, class, &row);
            } else {
                let key = meter.record_key(
                    class,
                    w.row_qis.iter().map(|&i| {
                        out.columns()
                            .get(i + 1)
                            .map_or(Cell::Null, |c| Cell::at(c.as_ref(), r))
                    }),
                );
                meter.count_record(table, key);
            }
        }
        Ok(out)
    }

    /// The risk report of everything written so far (call after the last row).
    pub fn risk_report(&mut self) -> Option<RiskReport> {
        let limit = self.profile.risk.max_unique_ratio;
        self.risk.take().map(|m| m.finish(limit))
    }

    /// Persons registered, released (not suppressed), and linked through a national ID.
    pub fn person_counts(&self) -> (u64, u64, u64) {
        let valid = self
            .people
            .iter()
            .filter(|p| !p.duplicate && !p.alias)
            .count() as u64;
        let released = self
            .people
            .iter()
            .filter(|p| !p.suppressed && !p.alias)
            .count() as u64;
        (valid, released, self.national_id_linked)
    }

    /// Values outside a declared domain so far, per `table.column`.
    pub fn out_of_domain(&self) -> &BTreeMap<String, OutOfDomain> {
        &self.out_of_domain
    }

    /// The sample of scrubbed spans in their context (up to [`REVIEW_PER_KIND`] per placeholder type,
    /// drawn uniformly from all of a run's), for the provider to review: it holds the original text
    /// around each placeholder, so it goes only to an encrypted file.
    pub fn review_sample(&self) -> &[ReviewItem] {
        &self.review.items
    }

    /// The smallest k-anonymity class among the patients rows written (`None` before any): at least the
    /// profile's k, or something released a row k-anonymity did not count.
    pub fn smallest_written_class(&self) -> Option<u64> {
        self.written_classes.values().copied().min()
    }

    /// Event times withheld so far because they would narrow a person's released birth value, per
    /// `table.column`.
    pub fn withheld_events(&self) -> &BTreeMap<String, u64> {
        &self.withheld_events
    }

    /// Placeholder counts of all scrubbing so far.
    pub fn scrub_counts(&self) -> &ScrubCounts {
        &self.scrub_counts
    }

    /// Second pass: transforms one row into `out` (which must be this table's output).
    pub fn transform(&mut self, rec: &SourceRecord, out: &mut TableOutput) -> Result<(), Skip> {
        let table = rec.table;
        let source_id = value_at(rec, Positions::get(table).patient)
            .and_then(Value::as_text)
            .ok_or_else(|| Skip::Quarantine("missing patient reference".into()))?;
        let found = if self.last_source.0 == source_id {
            self.last_source.1
        } else {
            let found = self.by_source.get(&self.source_key(source_id)).copied();
            self.last_source.0.clear();
            self.last_source.0.push_str(source_id);
            self.last_source.1 = found;
            found
        };
        let idx = match found {
            Some(i) => i as usize,
            None => {
                return Err(Skip::Quarantine(
                    match self.quarantined_sources.get(&self.source_key(source_id)) {
                        Some(why) if table == Table::Patients => why.clone(),
                        Some(why) => format!("its patient was quarantined ({why})"),
                        None => "refers to a patient not among the export's valid patients".into(),
                    },
                ));
            }
        };
        if self.people[idx].suppressed {
            return Err(Skip::Suppressed);
        }
        if table == Table::Patients && self.people[idx].alias {
            return Err(Skip::Quarantine(
                "another patients record of the same person (linked through the national ID): a person has one demographic row".into(),
            ));
        }
        validate_row(rec).map_err(Skip::Quarantine)?;
        if let Some(&bound) = self.profile.dp.rows_per_person.get(&table) {
            let key = (table, self.people[idx].person_id);
            let n = self.rows_per_person.entry(key).or_insert(0);
            if *n >= bound {
                return Err(Skip::Quarantine(format!(
                    "the person already has {bound} {table} row(s), the most the profile allows (dp.rows_per_person)"
                )));
            }
            *n += 1;
        }
        let (_, cols) = &self.outputs[&table];
        let person = &self.people[idx];
        // The person column comes first and is written from the person directly; the buffer is reused.
        let mut row = std::mem::take(&mut self.row_buf);
        row.clear();
        let mut counts = ScrubCounts::new();
        for c in &cols[1..] {
            let v = rec.values[c.source].as_ref();
            let mut o = if c.rule.action == Action::Scrub {
                match v.and_then(Value::as_text) {
                    None => Out::Null,
                    Some(text) => {
                        if self.cached_matcher.as_ref().map(|(i, _)| *i) != Some(idx) {
                            let record = match self.known_store.get(person.known) {
                                Ok(r) => r,
                                Err(e) => {
                                    self.row_buf = row;
                                    return Err(Skip::Quarantine(format!(
                                        "its patient's known identifiers are unreadable ({e})"
                                    )));
                                }
                            };
                            let mut known = decode_known(&record);
                            known.ages = person.ages;
                            self.cached_matcher = Some((idx, known));
                        }
                        let none = KnownIdentifiers::default();
                        let known = self.cached_matcher.as_ref().map_or(&none, |(_, k)| k);
                        let spans = match rec.ahead.patterns.iter().find(|(i, _)| *i == c.source) {
                            Some((_, found)) => crate::scrub::with_patterns(text, known, found),
                            None => self.pattern_cache.phi_spans(text, known),
                        };
                        self.review.offer(table, text, &spans);
                        Out::Str(crate::scrub::render(text, &spans, &mut counts))
                    }
                }
            } else if let Some((_, token)) = (c.rule.action == Action::Pseudonymize)
                .then(|| rec.ahead.tokens.iter().find(|(i, _)| *i == c.source))
                .flatten()
            {
                Out::Str(token.clone())
            } else {
                match self.apply(&c.rule, v, person, &mut counts) {
                    Ok(o) => o,
                    Err(reason) => {
                        self.row_buf = row;
                        return Err(Skip::Quarantine(reason));
                    }
                }
            };
            if let (Some(domain), Out::Str(value)) = (&c.rule.domain, &o)
                && !domain.contains(value)
            {
                let seen = self
                    .out_of_domain
                    .entry(format!("{table}.{}", c.rule.column))
                    .or_default();
                match &c.rule.other {
                    Some(other) => {
                        seen.mapped += 1;
                        o = Out::Str(other.clone());
                    }
                    None => {
                        seen.quarantined += 1;
                        self.row_buf = row;
                        return Err(Skip::Quarantine(format!(
                            "{table}.{}: a value outside the column's declared domain (the profile's domain list; declare `other` to map such values to a key)",
                            c.rule.column
                        )));
                    }
                }
            }
            if let Some(i) = c.qi
                && self.kanon.is_some()
            {
                o = climb(&o, level_of(person.levels, i));
            }
            if table != Table::Patients
                && person.birth_latest != i32::MIN
                && let Some(grain) = c.rule.released_grain()
                && event_latest(&o, grain).is_some_and(|d| {
                    narrows(
                        (d, self.shifted(&c.rule)),
                        (person.birth_latest, self.birth_shifted),
                        self.profile.date_shift_days,
                    )
                })
            {
                // An event dated inside the person's released birth band would narrow it.
                o = Out::Null;
                *self
                    .withheld_events
                    .entry(format!("{table}.{}", c.rule.column))
                    .or_default() += 1;
            }
            row.push(o);
        }
        for (k, n) in counts {
            *self.scrub_counts.entry(k).or_default() += n;
        }
        if let Some(meter) = self.risk.as_mut() {
            meter.record(table, person.canonical as usize, person.class, &row);
        }
        if table == Table::Patients {
            *self.written_classes.entry(person.class).or_default() += 1;
        }
        out.push_for_person(&person.person_id, &row);
        self.row_buf = row;
        Ok(())
    }

    fn token(&self, column: &'static str, value: &str) -> String {
        cached_token(
            &mut self.last_token.borrow_mut(),
            &self.keys,
            &self.provider,
            column,
            value,
        )
    }

    fn apply(
        &self,
        rule: &ColumnRule,
        v: Option<&Value>,
        person: &Person,
        counts: &mut ScrubCounts,
    ) -> Result<Out, String> {
        let Some(v) = v else { return Ok(Out::Null) };
        Ok(match (&rule.action, v) {
            (Action::Keep, v) => plain(v),
            (Action::Pseudonymize, v) => Out::Str(self.token(rule.column, &text_of(v))),
            (Action::DateShift, Value::Date(d)) => Out::Date(days_from_date(
                d.checked_add_signed(TimeDelta::days(person.shift_days))
                    .ok_or_else(|| out_of_range(rule))?,
            )),
            (Action::DateShift, Value::Timestamp(t)) => Out::Ts(micros(
                t.checked_add_signed(TimeDelta::days(person.shift_days))
                    .ok_or_else(|| out_of_range(rule))?,
            )),
            (Action::Generalize(Generalization::Year { top_code_age }), v) => {
                let d = v
                    .as_date()
                    .ok_or_else(|| format!("{}: not a date", rule.column))?;
                let mut year = d.year();
                if let Some(top) = top_code_age {
                    // Everyone this old or older shares one birth year: the latest year such a person has.
                    let oldest = self.reference.year() - i32::try_from(*top).unwrap_or(90);
                    if age_at(d, self.reference) >= *top {
                        year = oldest;
                    }
                }
                Out::I32(year)
            }
            (Action::Generalize(Generalization::Month), v) => {
                let d = v
                    .as_date()
                    .ok_or_else(|| format!("{}: not a date", rule.column))?;
                Out::Date(days_from_date(
                    NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap_or(d),
                ))
            }
            (Action::Generalize(Generalization::AgeBand { width, top }), v) => {
                let d = v
                    .as_date()
                    .ok_or_else(|| format!("{}: not a date", rule.column))?;
                let age = age_at(d, self.reference);
                if age >= *top {
                    Out::Str(format!("{top}+"))
                } else {
                    let lo = age - age % width.max(&1);
                    Out::Str(format!("{lo}-{}", lo + width.max(&1) - 1))
                }
            }
            (Action::Generalize(Generalization::Zip3), v) => {
                Out::Str(zip3(&text_of(v), &self.profile.restricted_zip3))
            }
            (Action::Coarsen(c), Value::Float(f)) => c.apply(*f).map_or(Out::Null, Out::F64),
            (Action::Coarsen(c), Value::Int(i)) => {
                c.apply(*i as f64).map_or(Out::Null, |f| Out::I64(f as i64))
            }
            (Action::TruncateTime(grain), Value::Timestamp(t)) => Out::Ts(
                grain.truncate_micros(micros(
                    t.checked_add_signed(TimeDelta::days(person.shift_days))
                        .ok_or_else(|| out_of_range(rule))?,
                )),
            ),
            (Action::Scrub, Value::Text(t)) => {
                Out::Str(scrub(t, &KnownIdentifiers::default(), counts))
            }
            (Action::Drop, _) => Out::Null,
            (a, _) => {
                return Err(format!(
                    "{}: {} does not apply to this value",
                    rule.column,
                    a.name()
                ));
            }
        })
    }
}

/// The Arrow schema of a table's source columns as read, before de-identification (the ingest
/// benchmark's baseline, `crate::baseline`; never leaves this crate).
pub(crate) fn plain_schema(table: Table) -> SchemaRef {
    let fields: Vec<Field> = table
        .columns()
        .iter()
        .map(|c| {
            let rule = ColumnRule {
                column: c.name,
                ty: c.ty,
                action: Action::Keep,
                role: policies::Role::Sensitive,
                bounds: None,
                output: c.name.to_owned(),
                domain: None,
                other: None,
                k_exempt: None,
                time_exempt: None,
            };
            Field::new(c.name, output_type(&rule), true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// One written cell as a value (the types `output_type` gives).
fn out_at(array: &dyn arrow::array::Array, i: usize) -> Out {
    use arrow::array::{
        Date32Array, Float64Array, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    if array.is_null(i) {
        return Out::Null;
    }
    let any = array.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Out::Str(a.value(i).to_owned())
    } else if let Some(a) = any.downcast_ref::<Float64Array>() {
        Out::F64(a.value(i))
    } else if let Some(a) = any.downcast_ref::<Int64Array>() {
        Out::I64(a.value(i))
    } else if let Some(a) = any.downcast_ref::<Int32Array>() {
        Out::I32(a.value(i))
    } else if let Some(a) = any.downcast_ref::<Date32Array>() {
        Out::Date(a.value(i))
    } else if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
        Out::Ts(a.value(i))
    } else {
        Out::Null
    }
}

/// What ages in a person's text may say, given their birth value as released at `level`.
fn age_rule(birth: &Out, level: u8, top_coded: bool) -> AgeRule {
    match (top_coded, birth, level) {
        (true, _, _) => AgeRule::TopCoded,
        // Only a birth value released as it is: an age and a note's date would narrow a band.
        (false, Out::I32(_) | Out::Date(_), 0) => AgeRule::Exact,
        _ => AgeRule::Coarse,
    }
}

/// The last day (since 1970) a released time can stand for, by the grain it is released at.
fn event_latest(o: &Out, grain: TimeGrain) -> Option<i32> {
    let end_of = |d: NaiveDate, months: u32| {
        d.checked_add_months(chrono::Months::new(months))
            .and_then(|n| n.pred_opt())
            .map(days_from_date)
    };
    match o {
        Out::I32(year) => NaiveDate::from_ymd_opt(*year, 12, 31).map(days_from_date),
        Out::Date(days) => match grain {
            TimeGrain::Year => end_of(
                NaiveDate::from_ymd_opt(date_from_days(*days)?.year(), 1, 1)?,
                12,
            ),
            TimeGrain::Month => {
                let d = date_from_days(*days)?;
                end_of(NaiveDate::from_ymd_opt(d.year(), d.month(), 1)?, 1)
            }
            _ => Some(*days),
        },
        Out::Ts(micros) => i32::try_from(micros.div_euclid(86_400_000_000)).ok(),
        _ => None,
    }
}

fn out_of_range(rule: &ColumnRule) -> String {
    format!("{}: the date is out of range once shifted", rule.column)
}

/// Whether an event released as `(last day, shifted)` narrows a birth released as `(last day, shifted)`.
/// Both moved by the person's one shift compare as they are; when only one is, an outsider knows the
/// shift only to within `window` days, so that one's real last day may be `window` days later.
fn narrows(event: (i32, bool), birth: (i32, bool), window: u32) -> bool {
    if event.1 == birth.1 {
        return event.0 < birth.0;
    }
    let real =
        |(day, shifted): (i32, bool)| i64::from(day) + if shifted { i64::from(window) } else { 0 };
    real(event) < real(birth)
}

fn age_at(birth: NaiveDate, at: NaiveDate) -> u32 {
    let mut age = at.year() - birth.year();
    if (at.month(), at.day()) < (birth.month(), birth.day()) {
        age -= 1;
    }
    u32::try_from(age.max(0)).unwrap_or(0)
}

fn zip3(zip: &str, restricted: &std::collections::BTreeSet<String>) -> String {
    let digits: String = zip.chars().filter(char::is_ascii_digit).collect();
    if !(digits.len() == 5 || digits.len() == 9 || digits.len() == 7) {
        return "000".into();
    }
    let z3 = &digits[..3];
    if restricted.contains(z3) {
        "000".into()
    } else {
        z3.to_owned()
    }
}

fn text_of(v: &Value) -> std::borrow::Cow<'_, str> {
    match v {
        Value::Text(s) => std::borrow::Cow::Borrowed(s),
        Value::Date(d) => d.to_string().into(),
        Value::Timestamp(t) => t.to_string().into(),
        Value::Float(f) => f.to_string().into(),
        Value::Int(i) => i.to_string().into(),
    }
}

fn plain(v: &Value) -> Out {
    match v {
        Value::Text(s) => Out::Str(s.clone()),
        Value::Date(d) => Out::Date(days_from_date(*d)),
        Value::Timestamp(t) => Out::Ts(micros(*t)),
        Value::Float(f) => Out::F64(*f),
        Value::Int(i) => Out::I64(*i),
    }
}

fn output_type(rule: &ColumnRule) -> DataType {
    match (&rule.action, rule.ty) {
        (Action::Generalize(Generalization::Year { .. }), _) => DataType::Int32,
        (Action::Generalize(Generalization::Month), _) => DataType::Date32,
        (Action::Generalize(_) | Action::Pseudonymize | Action::Scrub, _) => DataType::Utf8,
        (_, ColumnType::Text) => DataType::Utf8,
        (_, ColumnType::Date) => DataType::Date32,
        (_, ColumnType::Timestamp) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        (_, ColumnType::Float) => DataType::Float64,
        (_, ColumnType::Int) => DataType::Int64,
    }
}

/// Where the row checks and the transform find their columns in one table's source records: looked up
/// once per table, not by name for every row.
struct Positions {
    /// The patient reference.
    patient: Option<usize>,
    /// The columns a row must have a value in.
    required: Vec<(Option<usize>, &'static str)>,
    code: Option<usize>,
    start: Option<usize>,
    stop: Option<usize>,
}

impl Positions {
    fn of(table: Table) -> Positions {
        let required: &[&'static str] = match table {
            Table::Patients => &[],
            Table::Encounters => &["encounter_id", "start"],
            Table::Conditions => &["start", "code"],
            Table::Observations => &["date", "code"],
            Table::Medications => &["start", "code"],
            Table::Procedures => &["start", "code"],
            Table::Notes => &["date", "text"],
        };
        Positions {
            patient: table.column_index(PATIENT_REF),
            required: required
                .iter()
                .map(|c| (table.column_index(c), *c))
                .collect(),
            code: table.column_index("code"),
            start: table.column_index("start"),
            stop: table.column_index("stop"),
        }
    }

    /// The positions of `table`'s columns.
    fn get(table: Table) -> &'static Positions {
        static ALL: LazyLock<[Positions; 7]> = LazyLock::new(|| Table::ALL.map(Positions::of));
        let i = Table::ALL.iter().position(|t| *t == table).unwrap_or(0);
        &ALL[i]
    }
}

/// The value at `position` of `rec`, if any.
fn value_at(rec: &SourceRecord, position: Option<usize>) -> Option<&Value> {
    position.and_then(|i| rec.values.get(i)?.as_ref())
}

/// Row checks beyond parsing: required fields and code systems.
fn validate_row(rec: &SourceRecord) -> Result<(), String> {
    let at = Positions::get(rec.table);
    if let Some((_, missing)) = at
        .required
        .iter()
        .find(|(i, _)| value_at(rec, *i).is_none())
    {
        return Err(format!("missing {missing}"));
    }
    if let Some(code) = value_at(rec, at.code).and_then(Value::as_text) {
        let ok = match rec.table {
            Table::Observations => {
                is_loinc(code)
                    || (2..=8).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_uppercase())
            }
            Table::Conditions | Table::Procedures | Table::Encounters => {
                (5..=18).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
            }
            Table::Medications => {
                (1..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
            }
            _ => true,
        };
        if !ok {
            let system = match rec.table {
                Table::Observations => "LOINC",
                Table::Medications => "RxNorm",
                _ => "SNOMED CT",
            };
            return Err(format!("code is not a valid {system} code"));
        }
    }
    let date = |i: Option<usize>| value_at(rec, i).and_then(Value::as_date);
    if let (Some(start), Some(stop)) = (date(at.start), date(at.stop))
        && stop < start
    {
        return Err("stop is before start".into());
    }
    Ok(())
}

/// A LOINC code: 1–7 digits, a hyphen, and its mod-10 check digit.
fn is_loinc(code: &str) -> bool {
    let Some((body, check)) = code.split_once('-') else {
        return false;
    };
    if body.is_empty()
        || body.len() > 7
        || check.len() != 1
        || !body.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    let digits: Vec<u32> = body.bytes().map(|b| u32::from(b - b'0')).collect();
    // Mod 10 (Luhn-like) as LOINC defines it: double every other digit from the right, starting with the last.
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 0 {
                let x = d * 2;
                x / 10 + x % 10
            } else {
                *d
            }
        })
        .sum();
    check
        .parse::<u32>()
        .is_ok_and(|c| c == (10 - sum % 10) % 10)
}

enum ColBuilder {
    Utf8(StringBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

/// Accumulates output rows of one table into Arrow record batches.
pub struct TableOutput {
    schema: SchemaRef,
    builders: Vec<ColBuilder>,
    rows: usize,
}

impl TableOutput {
    /// An empty accumulator for `schema`.
    pub fn new(schema: SchemaRef) -> TableOutput {
        let builders = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Int32 => ColBuilder::I32(Int32Builder::new()),
                DataType::Int64 => ColBuilder::I64(Int64Builder::new()),
                DataType::Float64 => ColBuilder::F64(Float64Builder::new()),
                DataType::Date32 => ColBuilder::Date(Date32Builder::new()),
                DataType::Timestamp(..) => {
                    ColBuilder::Ts(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
                }
                _ => ColBuilder::Utf8(StringBuilder::new()),
            })
            .collect();
        TableOutput {
            schema,
            builders,
            rows: 0,
        }
    }

    /// Rows buffered.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends a row whose first column is the person's ID and whose other columns are `rest`.
    fn push_for_person(&mut self, person_id: &[u8; 16], rest: &[Out]) {
        let mut hex = [0u8; 32];
        if let (Some(ColBuilder::Utf8(b)), Ok(())) = (
            self.builders.first_mut(),
            hex::encode_to_slice(person_id, &mut hex),
        ) {
            b.append_value(std::str::from_utf8(&hex).unwrap_or_default());
        }
        Self::append(&mut self.builders[1..], rest);
        self.rows += 1;
    }

    fn append(builders: &mut [ColBuilder], row: &[Out]) {
        for (b, v) in builders.iter_mut().zip(row) {
            match (b, v) {
                (ColBuilder::Utf8(b), Out::Str(s)) => b.append_value(s),
                (ColBuilder::I32(b), Out::I32(x)) => b.append_value(*x),
                (ColBuilder::I64(b), Out::I64(x)) => b.append_value(*x),
                (ColBuilder::F64(b), Out::F64(x)) => b.append_value(*x),
                (ColBuilder::Date(b), Out::Date(x)) => b.append_value(*x),
                (ColBuilder::Ts(b), Out::Ts(x)) => b.append_value(*x),
                (ColBuilder::Utf8(b), _) => b.append_null(),
                (ColBuilder::I32(b), _) => b.append_null(),
                (ColBuilder::I64(b), _) => b.append_null(),
                (ColBuilder::F64(b), _) => b.append_null(),
                (ColBuilder::Date(b), _) => b.append_null(),
                (ColBuilder::Ts(b), _) => b.append_null(),
            }
        }
    }

    /// Appends a source row unchanged (the baseline in `crate::baseline`, whose batches only ever go to a
    /// sink; never leaves this crate).
    pub(crate) fn push_source(&mut self, rec: &SourceRecord) {
        let row: Vec<Out> = rec
            .values
            .iter()
            .map(|v| v.as_ref().map_or(Out::Null, plain))
            .collect();
        Self::append(&mut self.builders, &row);
        self.rows += 1;
    }

    /// Takes the buffered rows as one record batch.
    pub fn take_batch(&mut self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(|b| match b {
                ColBuilder::Utf8(b) => Arc::new(b.finish()) as ArrayRef,
                ColBuilder::I32(b) => Arc::new(b.finish()),
                ColBuilder::I64(b) => Arc::new(b.finish()),
                ColBuilder::F64(b) => Arc::new(b.finish()),
                ColBuilder::Date(b) => Arc::new(b.finish()),
                ColBuilder::Ts(b) => Arc::new(b.finish()),
            })
            .collect();
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loinc_check_digits_and_zip3() {
        assert!(is_loinc("8302-2") && is_loinc("2339-0") && is_loinc("4548-4"));
        assert!(!is_loinc("8302-3") && !is_loinc("X-1"));
        let restricted = ["036".to_owned()].into_iter().collect();
        assert_eq!(zip3("02155", &restricted), "021");
        assert_eq!(zip3("03601", &restricted), "000");
        assert_eq!(zip3("123-4567", &restricted), "123");
        assert_eq!(zip3("", &restricted), "000");
        assert_eq!(
            age_at(
                NaiveDate::from_ymd_opt(1936, 12, 1).expect("d"),
                NaiveDate::from_ymd_opt(2026, 11, 25).expect("d")
            ),
            89
        );
    }

    use crate::read::Origin;

    fn record(table: Table, values: &[(&str, Value)]) -> SourceRecord {
        let mut row = vec![None; table.columns().len()];
        for (c, v) in values {
            row[table.column_index(c).expect("column")] = Some(v.clone());
        }
        SourceRecord {
            table,
            values: row,
            ahead: crate::read::Ahead::default(),
            origin: Origin {
                file: "test".into(),
                line: 1,
                byte: 0,
            },
        }
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("date")
    }

    fn patient(id: &str, national: Option<&str>, gender: &str, born: NaiveDate) -> SourceRecord {
        let mut v = vec![
            ("patient_id", Value::Text(id.into())),
            ("gender", Value::Text(gender.into())),
            ("birth_date", Value::Date(born)),
            ("zip", Value::Text("02139".into())),
        ];
        if let Some(n) = national {
            v.push(("national_id", Value::Text(n.into())));
        }
        record(Table::Patients, &v)
    }

    fn deidentifier(profile: &str) -> Deidentifier {
        Deidentifier::new(
            Profile::load(profile).expect("profile"),
            Pseudonymizer::new(&crate::LinkageKey::from_bytes([7; 32])),
            "H1",
            date(2026, 11, 26),
        )
    }

    /// A released patient's (gender, birth year).
    type Released = (Option<String>, Option<i32>);

    /// Writes every patients row and returns the released (gender, birth year) pairs, and the rows
    /// quarantined.
    fn released(d: &mut Deidentifier, rows: &[SourceRecord]) -> (Vec<Released>, usize) {
        let mut out = TableOutput::new(d.schema(Table::Patients));
        let mut quarantined = 0;
        for r in rows {
            if let Err(Skip::Quarantine(_)) = d.transform(r, &mut out) {
                quarantined += 1;
            }
        }
        let batch = out.take_batch().expect("batch");
        let gender = batch.column_by_name("gender").expect("gender");
        let year = batch.column_by_name("birth_year").expect("birth_year");
        let rows = (0..batch.num_rows())
            .map(|i| {
                let g = match out_at(gender.as_ref(), i) {
                    Out::Str(s) => Some(s),
                    _ => None,
                };
                let y = match out_at(year.as_ref(), i) {
                    Out::I32(y) => Some(y),
                    _ => None,
                };
                (g, y)
            })
            .collect();
        (rows, quarantined)
    }

    #[test]
    fn a_patient_outside_a_domain_is_left_out_before_k_anonymity_counts() {
        // Four identical persons and a fifth whose gender is outside the declared domain: counted, the
        // five would form one class with gender withheld, and the fifth row then quarantined would leave 4.
        let mut d = deidentifier("hipaa-safe-harbor");
        let mut rows: Vec<SourceRecord> = (0..4)
            .map(|i| patient(&format!("p{i}"), None, "M", date(1970, 1, 1)))
            .collect();
        rows.push(patient("p4", None, "X", date(1970, 1, 1)));
        for r in &rows {
            d.add_patient(r);
        }
        d.finish_patients();
        let (out, quarantined) = released(&mut d, &rows);
        assert_eq!(quarantined, 1, "the out-of-domain patient");
        assert!(out.is_empty(), "four persons are fewer than k = 5: {out:?}");
        assert_eq!(d.out_of_domain()["patients.gender"].quarantined, 1);
    }

    #[test]
    fn two_records_of_one_person_count_once_and_release_one_row() {
        // Five records, two of them one person (same national ID): four persons, fewer than k.
        let mut d = deidentifier("hipaa-safe-harbor");
        let nhs = ["9434765919", "9434765870", "9434765862", "9434765854"];
        let mut rows: Vec<SourceRecord> = (0..4)
            .map(|i| patient(&format!("p{i}"), Some(nhs[i]), "F", date(1970, 1, 1)))
            .collect();
        rows.push(patient("p0-again", Some(nhs[0]), "F", date(1970, 1, 1)));
        for r in &rows {
            d.add_patient(r);
        }
        d.finish_patients();
        assert_eq!(d.person_counts().0, 4, "four persons");
        let (out, _) = released(&mut d, &rows);
        assert!(out.is_empty(), "four persons are fewer than k = 5: {out:?}");
        // With a fifth person, all five are released, and the alias's row is not released twice.
        let mut d = deidentifier("hipaa-safe-harbor");
        rows.push(patient("p5", None, "F", date(1970, 1, 1)));
        for r in &rows {
            d.add_patient(r);
        }
        d.finish_patients();
        let (out, quarantined) = released(&mut d, &rows);
        assert_eq!((out.len(), quarantined), (5, 1));
        assert_eq!(d.smallest_written_class(), Some(5));
    }

    #[test]
    fn work_done_ahead_gives_the_rows_the_transform_gives_alone() {
        let notes = || {
            (0..6).flat_map(|i| {
                [0, 1].map(|j| {
                    record(
                        Table::Notes,
                        &[
                            ("note_id", Value::Text(format!("n{i}-{j}"))),
                            ("patient_id", Value::Text(format!("p{i}"))),
                            ("encounter_id", Value::Text(format!("e{i}"))),
                            (
                                "date",
                                Value::Timestamp(date(2023, 1, 27).and_hms_opt(9, j, 0).expect("t")),
                            ),
                            (
                                "text",
                                Value::Text(format!(
                                    "Seen 2023-01-27 with her son Ken. Call 555-810-72{i}{j}. Aged 9{i}."
                                )),
                            ),
                        ],
                    )
                })
            })
        };
        let patients: Vec<SourceRecord> = (0..6)
            .map(|i| patient(&format!("p{i}"), None, "F", date(1930, 1, 1)))
            .collect();
        let run = |ahead: bool| {
            let mut d = deidentifier("hipaa-safe-harbor");
            for r in &patients {
                d.add_patient(r);
            }
            d.finish_patients();
            let mut prescan = d.prescan();
            let mut out = TableOutput::new(d.schema(Table::Notes));
            for mut r in notes() {
                if ahead {
                    prescan.apply(&mut r);
                    assert!(!r.ahead.patterns.is_empty() && !r.ahead.tokens.is_empty());
                }
                d.transform(&r, &mut out).expect("released");
            }
            (out.take_batch().expect("batch"), d.scrub_counts().clone())
        };
        let (alone, alone_counts) = run(false);
        let (ahead, ahead_counts) = run(true);
        assert_eq!(alone.num_rows(), 12);
        assert_eq!(alone, ahead);
        assert_eq!(alone_counts, ahead_counts);
        assert_eq!(alone_counts.get(&PhiKind::AgeOver89), Some(&12));
    }

    #[test]
    fn a_date_shifted_out_of_range_is_refused_not_a_panic() {
        let d = deidentifier("jp-pseudonymized-medical");
        let person = Person::new([0; 16], 10, 0, 0);
        let end = NaiveDate::MAX.and_hms_opt(23, 0, 0).expect("time");
        for (table, column, value) in [
            (Table::Encounters, "start", Value::Timestamp(end)),
            (Table::Observations, "date", Value::Timestamp(end)),
            (Table::Conditions, "start", Value::Date(NaiveDate::MAX)),
            (Table::Patients, "death_date", Value::Date(NaiveDate::MAX)),
        ] {
            let rule = d.profile().rule(table, column).expect("rule").clone();
            let e = d
                .apply(&rule, Some(&value), &person, &mut ScrubCounts::new())
                .expect_err("cannot be shifted past the end of time");
            assert!(
                e.contains("out of range once shifted"),
                "{table}.{column}: {e}"
            );
        }
    }

    #[test]
    fn ages_stay_only_beside_a_birth_value_released_as_it_is() {
        let day = days_from_date(date(1955, 6, 1));
        assert_eq!(age_rule(&Out::I32(1955), 0, false), AgeRule::Exact);
        assert_eq!(age_rule(&Out::Date(day), 0, false), AgeRule::Exact);
        for level in 1..=4 {
            assert_eq!(
                age_rule(&Out::I32(1955), level, false),
                AgeRule::Coarse,
                "year level {level}"
            );
            assert_eq!(
                age_rule(&Out::Date(day), level, false),
                AgeRule::Coarse,
                "date level {level}"
            );
        }
        assert_eq!(
            age_rule(&Out::Null, 0, false),
            AgeRule::Coarse,
            "a withheld birth value"
        );
        assert_eq!(age_rule(&Out::I32(1936), 0, true), AgeRule::TopCoded);
    }

    #[test]
    fn events_narrow_a_birth_band_in_the_outsiders_time() {
        // Same shift on both: compared as released.
        assert!(narrows((100, true), (200, true), 180));
        assert!(!narrows((200, true), (200, true), 180));
        // Shifted birth, unshifted event: the birth's real last day may be 180 days later.
        assert!(narrows((250, false), (200, true), 180));
        assert!(!narrows((380, false), (200, true), 180));
        // Unshifted birth, shifted event: the event's real day may be 180 days later.
        assert!(!narrows((100, true), (200, false), 180));
        assert!(narrows((10, true), (200, false), 180));
    }

    #[test]
    fn known_identifiers_survive_their_record() {
        let date = NaiveDate::from_ymd_opt(1950, 3, 9).expect("date");
        let record = encode_known(
            &[
                ("Sumiko254", PhiKind::Name),
                ("555-810-7203", PhiKind::Phone),
                ("MRN00123456", PhiKind::Id),
            ],
            &[date],
        );
        let mut store = MemoryKnownStore::default();
        let handle = store.put(&record).expect("put");
        let known = decode_known(&store.get(handle).expect("get"));
        let text = "Sumiko (born 03/09/1950, MRN00123456) called from 555.810.7203.";
        let out = crate::scrub::scrub(text, &known, &mut ScrubCounts::new());
        assert_eq!(out, "[NAME] (born [DATE], [ID]) called from [PHONE].");
        assert!(store.get(handle + 1).is_err());
    }
}
