//! Readers for provider exports: Synthea-style (or mapped) CSV and FHIR R4 (Bundle JSON, bulk NDJSON).
//!
//! [`discover`] walks the input path and decides what each file is (CSV by its header, FHIR by
//! `resourceType`); [`read_file`] streams one file as canonical records through a callback, one at a time,
//! so memory stays bounded whatever the export's size; [`read_file_ahead`] does the same with the parsing
//! and per-record preparation on threads of their own. A record that cannot be parsed is handed on as a
//! [`Rejected`] item with its origin and reason — nothing is dropped silently.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use policies::mapping::{OBS_VALUE, OBS_VALUE_TYPE};
use policies::schema::PATIENT_REF;
use policies::{ColumnType, CsvMapping, Table};
use serde_json::Value as Json;

use crate::value::{Value, parse_value};
use crate::{Error, Result};

/// Where a record came from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Source file.
    pub file: Arc<str>,
    /// Line (CSV, NDJSON) or entry number (Bundle).
    pub line: u64,
    /// About where the record is in its file, in bytes (0 within a Bundle, which is read whole): for
    /// progress.
    pub byte: u64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One canonical source row (identifiable; never leaves the pipeline).
pub struct SourceRecord {
    /// Its table.
    pub table: Table,
    /// Values in the order of `table.columns()`.
    pub values: Vec<Option<Value>>,
    /// Where it came from.
    pub origin: Origin,
    /// Work done on it ahead of the transform, on another thread (see [`read_file_ahead`]).
    pub ahead: Ahead,
}

/// What a preparing thread found for a record ahead of the transform, by column index; the transform
/// works out anything not here itself.
#[derive(Debug, Clone, Default)]
pub struct Ahead {
    /// The pattern spans of its scrubbed text values.
    pub patterns: Vec<(usize, Box<[crate::scrub::Span]>)>,
    /// The pseudonyms of its pseudonymized values.
    pub tokens: Vec<(usize, String)>,
}

impl SourceRecord {
    /// The value of a column.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.table
            .column_index(column)
            .and_then(|i| self.values[i].as_ref())
    }

    /// The text of a column.
    pub fn text(&self, column: &str) -> Option<&str> {
        self.get(column).and_then(Value::as_text)
    }

    /// A rendering of the row for the (encrypted) quarantine.
    pub fn render(&self) -> String {
        let cols = self.table.columns();
        let mut obj = serde_json::Map::new();
        for (def, v) in cols.iter().zip(&self.values) {
            if let Some(v) = v {
                let j = match v {
                    Value::Text(s) => Json::String(s.clone()),
                    Value::Date(d) => Json::String(d.to_string()),
                    Value::Timestamp(t) => Json::String(t.to_string()),
                    Value::Float(f) => serde_json::Number::from_f64(*f)
                        .map(Json::Number)
                        .unwrap_or(Json::Null),
                    Value::Int(i) => Json::Number((*i).into()),
                };
                obj.insert(def.name.to_owned(), j);
            }
        }
        Json::Object(obj).to_string()
    }
}

/// A row that could not be read.
pub struct Rejected {
    /// Its table, when known.
    pub table: Option<Table>,
    /// Where it came from.
    pub origin: Origin,
    /// Why.
    pub reason: String,
    /// The raw text (kept only in the encrypted quarantine).
    pub raw: String,
}

/// What a reader hands on.
pub enum Item {
    /// A parsed row.
    Record(SourceRecord),
    /// A row that failed.
    Rejected(Rejected),
}

/// One input file and how to read it.
#[derive(Debug, Clone)]
pub enum SourceFile {
    /// A CSV file with its matched layout.
    Csv {
        /// Path.
        path: PathBuf,
        /// Layout.
        mapping: CsvMapping,
    },
    /// FHIR bulk NDJSON (one resource per line).
    Ndjson {
        /// Path.
        path: PathBuf,
    },
    /// FHIR JSON: a Bundle or a single resource.
    Json {
        /// Path.
        path: PathBuf,
    },
}

impl SourceFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            SourceFile::Csv { path, .. }
            | SourceFile::Ndjson { path }
            | SourceFile::Json { path } => path,
        }
    }

    /// True when this file can hold patient rows (read in the first pass).
    pub fn may_hold_patients(&self) -> bool {
        match self {
            SourceFile::Csv { mapping, .. } => mapping.table == Table::Patients,
            SourceFile::Ndjson { path } => first_resource_type(path).as_deref() == Some("Patient"),
            SourceFile::Json { .. } => true,
        }
    }
}

/// The result of looking at an input path.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// Files to read.
    pub files: Vec<SourceFile>,
    /// Files not read, with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// `synthea-csv`, `fhir-r4-ndjson`, `fhir-r4-bundle`, or a `+`-joined mix.
    pub source_system: String,
}

/// Finds and classifies the input files under `path` (a file or a directory, walked recursively).
pub fn discover(path: &Path, mappings: &[CsvMapping]) -> Result<Discovery> {
    let mut paths = Vec::new();
    walk(path, &mut paths)?;
    paths.sort();
    let mut d = Discovery::default();
    let mut kinds = std::collections::BTreeSet::new();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.ends_with(".csv") {
            let headers = csv_headers(&p)?;
            match mappings.iter().find(|m| m.matches(&headers)) {
                Some(m) => {
                    kinds.insert("csv");
                    d.files.push(SourceFile::Csv {
                        path: p,
                        mapping: m.clone(),
                    });
                }
                None => d.skipped.push((
                    p,
                    "CSV layout not recognised (no mapping matches its header)".into(),
                )),
            }
        } else if name.ends_with(".ndjson") {
            kinds.insert("fhir-r4-ndjson");
            d.files.push(SourceFile::Ndjson { path: p });
        } else if name.ends_with(".json") && name != "manifest.json" {
            kinds.insert("fhir-r4-bundle");
            d.files.push(SourceFile::Json { path: p });
        } else {
            d.skipped.push((p, "not a CSV, NDJSON or JSON file".into()));
        }
    }
    if d.files.is_empty() {
        return Err(Error::NoInput(path.display().to_string()));
    }
    d.source_system = kinds.into_iter().collect::<Vec<_>>().join("+");
    Ok(d)
}

fn walk(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        out.push(path.to_owned());
        return Ok(());
    }
    for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let entry = entry.map_err(|e| Error::io(path, e))?;
        let p = entry.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        walk(&p, out)?;
    }
    Ok(())
}

fn csv_headers(path: &Path) -> Result<Vec<String>> {
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::Csv(path.display().to_string(), e.to_string()))?;
    let h = r
        .headers()
        .map_err(|e| Error::Csv(path.display().to_string(), e.to_string()))?;
    Ok(h.iter()
        .map(|s| s.trim().trim_start_matches('\u{feff}').to_owned())
        .collect())
}

fn first_resource_type(path: &Path) -> Option<String> {
    let f = File::open(path).ok()?;
    let line = BufReader::new(f)
        .lines()
        .find_map(|l| l.ok().filter(|l| !l.trim().is_empty()))?;
    let v: Json = serde_json::from_str(&line).ok()?;
    v.get("resourceType")?.as_str().map(str::to_owned)
}

/// Which rows a pass wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Only patients (first pass: person index and k-anonymity).
    PatientsOnly,
    /// Everything.
    All,
}

/// Counts of FHIR resources outside the model, by type.
pub type Unmodelled = BTreeMap<String, u64>;

/// Items a reading thread hands over at once, and batches in flight at most.
const AHEAD_BATCH: usize = 256;
const AHEAD_BATCHES: usize = 8;

type Senders = Vec<std::sync::mpsc::SyncSender<Vec<Item>>>;
type Receivers = Vec<std::sync::mpsc::Receiver<Vec<Item>>>;

/// `n` bounded channels of batches.
fn channels(n: usize) -> (Senders, Receivers) {
    (0..n)
        .map(|_| std::sync::mpsc::sync_channel(AHEAD_BATCHES))
        .unzip()
}

/// [`read_file`] with the parsing on one thread and the preparing of records on others, one per entry
/// of `preparers` (batches go to them in turn): rows reach `sink` in the same order, a few batches
/// ahead at most (memory stays bounded). When `sink` fails, reading stops and its error is the answer.
///
/// `sink` sees each item by reference: spent batches go back to the parsing thread, which allocated
/// their values and so frees them cheaply (and reuses the batch), instead of the sink's thread.
pub fn read_file_ahead(
    file: &SourceFile,
    pass: Pass,
    unmodelled: &mut Unmodelled,
    preparers: &mut [&mut (dyn FnMut(&mut SourceRecord) + Send)],
    sink: &mut dyn FnMut(&Item) -> Result<()>,
) -> Result<()> {
    let lanes = preparers.len().max(1);
    let (to_prepare, parsed) = channels(lanes);
    let (to_sink, prepared) = channels(lanes);
    let (spent_tx, spent) = std::sync::mpsc::channel::<Vec<Item>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut found = Unmodelled::new();
            let mut batch = Vec::with_capacity(AHEAD_BATCH);
            let mut lane = 0;
            let read = read_file(file, pass, &mut found, &mut |item| {
                batch.push(item);
                if batch.len() == AHEAD_BATCH {
                    // A spent batch is emptied here (its values were allocated on this thread) and
                    // filled again; without one, a new batch is allocated.
                    let next = match spent.try_recv() {
                        Ok(mut old) => {
                            old.clear();
                            old
                        }
                        Err(_) => Vec::with_capacity(AHEAD_BATCH),
                    };
                    let full = std::mem::replace(&mut batch, next);
                    // A receiver is gone only when the sink failed: stop quietly, its error wins.
                    to_prepare[lane]
                        .send(full)
                        .map_err(|_| Error::Sink("the consumer stopped".into()))?;
                    lane = (lane + 1) % lanes;
                }
                Ok(())
            });
            // The rows read before an error are handed on too, as `read_file` would have.
            if !batch.is_empty() {
                let _ = to_prepare[lane].send(batch);
            }
            drop(to_prepare);
            // The rest of the spent batches are freed here too, until the sink's side is done.
            for old in spent {
                drop(old);
            }
            read.map(|()| found)
        });
        let mut lanes_in = parsed.into_iter().zip(to_sink);
        for prepare in preparers.iter_mut() {
            let Some((parsed, to_sink)) = lanes_in.next() else {
                break;
            };
            scope.spawn(move || {
                for mut batch in parsed {
                    for item in &mut batch {
                        if let Item::Record(rec) = item {
                            prepare(rec);
                        }
                    }
                    if to_sink.send(batch).is_err() {
                        break;
                    }
                }
            });
        }
        // Without preparers the one lane passes batches on as they are.
        for (parsed, to_sink) in lanes_in {
            scope.spawn(move || {
                for batch in parsed {
                    if to_sink.send(batch).is_err() {
                        break;
                    }
                }
            });
        }
        // Batches went to the lanes in turn, so they come back in turn: the first lane found closed
        // is the end of the file.
        let mut consumed = Ok(());
        for lane in (0..lanes).cycle() {
            let Ok(batch) = prepared[lane].recv() else {
                break;
            };
            consumed = batch.iter().try_for_each(&mut *sink);
            // Only the reader is gone here, which it never is before this side drops the sender.
            let _ = spent_tx.send(batch);
            if consumed.is_err() {
                break;
            }
        }
        drop(prepared);
        drop(spent_tx);
        let read = reader
            .join()
            .map_err(|_| Error::Sink("the reading thread panicked".into()))?;
        consumed?;
        for (k, n) in read? {
            *unmodelled.entry(k).or_default() += n;
        }
        Ok(())
    })
}

/// Streams one file's rows into `sink`.
pub fn read_file(
    file: &SourceFile,
    pass: Pass,
    unmodelled: &mut Unmodelled,
    sink: &mut dyn FnMut(Item) -> Result<()>,
) -> Result<()> {
    let origin_file: Arc<str> = Arc::from(file.path().display().to_string());
    match file {
        SourceFile::Csv { path, mapping } => {
            if pass == Pass::PatientsOnly && mapping.table != Table::Patients {
                return Ok(());
            }
            read_csv(path, mapping, origin_file, sink)
        }
        SourceFile::Ndjson { path } => {
            let f = File::open(path).map_err(|e| Error::io(path, e))?;
            // Bulk export files hold one resource type each: a line that is not JSON still belongs to it.
            let file_table = first_resource_type(path)
                .as_deref()
                .and_then(table_of_resource);
            let mut reader = BufReader::with_capacity(1 << 20, f);
            let mut line = String::new();
            let mut n = 0u64;
            let mut byte = 0u64;
            loop {
                line.clear();
                let read =
                    read_line_lossy(&mut reader, &mut line).map_err(|e| Error::io(path, e))?;
                if read == 0 {
                    break;
                }
                n += 1;
                byte += read as u64;
                if line.trim().is_empty() {
                    continue;
                }
                let origin = Origin {
                    file: origin_file.clone(),
                    line: n,
                    byte,
                };
                match serde_json::from_str::<Json>(&line) {
                    Ok(res) => resource(&res, origin, pass, unmodelled, sink)?,
                    Err(e) => sink(Item::Rejected(Rejected {
                        table: file_table,
                        origin,
                        reason: json_reason(&e),
                        raw: line.clone(),
                    }))?,
                }
            }
            Ok(())
        }
        SourceFile::Json { path } => {
            let mut text = String::new();
            File::open(path)
                .and_then(|mut f| f.read_to_string(&mut text))
                .map_err(|e| Error::io(path, e))?;
            let origin = Origin {
                file: origin_file.clone(),
                line: 1,
                byte: 0,
            };
            let doc: Json = match serde_json::from_str(&text) {
                Ok(d) => d,
                Err(e) => {
                    return sink(Item::Rejected(Rejected {
                        table: None,
                        origin,
                        reason: json_reason(&e),
                        raw: text,
                    }));
                }
            };
            if doc.get("resourceType").and_then(Json::as_str) == Some("Bundle") {
                let entries = doc
                    .get("entry")
                    .and_then(Json::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                // Patients first, so a bundle never refers to a patient the pipeline has not seen.
                let (patients, others): (Vec<_>, Vec<_>) =
                    entries.iter().enumerate().partition(|(_, e)| {
                        e.pointer("/resource/resourceType").and_then(Json::as_str)
                            == Some("Patient")
                    });
                for (i, entry) in patients.into_iter().chain(others) {
                    let origin = Origin {
                        file: origin_file.clone(),
                        line: i as u64 + 1,
                        byte: 0,
                    };
                    match entry.get("resource") {
                        Some(r) => resource(r, origin, pass, unmodelled, sink)?,
                        None => sink(Item::Rejected(Rejected {
                            table: None,
                            origin,
                            reason: "bundle entry without a resource".into(),
                            raw: entry.to_string(),
                        }))?,
                    }
                }
                Ok(())
            } else {
                resource(&doc, origin, pass, unmodelled, sink)
            }
        }
    }
}

/// A JSON error's kind and position, without the snippet serde_json may quote.
fn json_reason(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Eof => "invalid JSON (truncated)".to_owned(),
        c => format!("invalid JSON ({c:?} error near character {})", e.column()),
    }
}

fn read_line_lossy(r: &mut impl BufRead, out: &mut String) -> std::io::Result<usize> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf)?;
    out.push_str(&String::from_utf8_lossy(&buf));
    Ok(n)
}

fn read_csv(
    path: &Path,
    mapping: &CsvMapping,
    origin_file: Arc<str>,
    sink: &mut dyn FnMut(Item) -> Result<()>,
) -> Result<()> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::Csv(path.display().to_string(), e.to_string()))?;
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| Error::Csv(path.display().to_string(), e.to_string()))?
        .iter()
        .map(|s| s.trim().trim_start_matches('\u{feff}').to_owned())
        .collect();
    let table = mapping.table;
    // Header position → canonical column index (or an observation pseudo-column).
    enum Slot {
        Col(usize, ColumnType),
        ObsValue,
        ObsType,
        Ignored,
    }
    let slots: Vec<Slot> = headers
        .iter()
        .map(|h| {
            match mapping
                .columns
                .iter()
                .find(|(s, _)| s == h)
                .map(|(_, c)| c.as_str())
            {
                Some(OBS_VALUE) => Slot::ObsValue,
                Some(OBS_VALUE_TYPE) => Slot::ObsType,
                Some(c) => table
                    .column_index(c)
                    .map_or(Slot::Ignored, |i| Slot::Col(i, table.columns()[i].ty)),
                None => Slot::Ignored,
            }
        })
        .collect();
    let ncols = table.columns().len();
    let (num_idx, text_idx) = (
        table.column_index("value_numeric"),
        table.column_index("value_text"),
    );
    let mut rec = csv::ByteRecord::new();
    loop {
        let line = rdr.position().line() + 1;
        let byte = rdr.position().byte();
        let origin = || Origin {
            file: origin_file.clone(),
            line,
            byte,
        };
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                sink(Item::Rejected(Rejected {
                    table: Some(table),
                    origin: origin(),
                    reason: format!("CSV error: {e}"),
                    raw: String::new(),
                }))?;
                continue;
            }
        }
        let raw = || {
            rec.iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        let reject = |reason: String| {
            Item::Rejected(Rejected {
                table: Some(table),
                origin: origin(),
                reason,
                raw: raw(),
            })
        };
        if rec.len() != headers.len() {
            sink(reject(format!(
                "expected {} fields, found {} (broken quoting or a stray delimiter)",
                headers.len(),
                rec.len()
            )))?;
            continue;
        }
        let mut values: Vec<Option<Value>> = vec![None; ncols];
        let (mut obs_value, mut obs_type) = (None, None);
        let mut failure = None;
        for (slot, field) in slots.iter().zip(rec.iter()) {
            let Ok(text) = std::str::from_utf8(field) else {
                failure = Some("field is not valid UTF-8".to_owned());
                break;
            };
            match slot {
                Slot::Ignored => {}
                Slot::ObsValue => obs_value = Some(text),
                Slot::ObsType => obs_type = Some(text),
                Slot::Col(i, ty) => {
                    if table != Table::Notes && text.contains('\n') {
                        failure = Some("a field runs across lines (broken quoting)".to_owned());
                        break;
                    }
                    match parse_value(text, *ty) {
                        Ok(v) => values[*i] = v,
                        Err(e) => {
                            failure = Some(format!("{}: {e}", table.columns()[*i].name));
                            break;
                        }
                    }
                }
            }
        }
        if let (None, Some(v), Some(ni), Some(ti)) = (&failure, obs_value, num_idx, text_idx) {
            match split_obs_value(v, obs_type) {
                Ok((n, t)) => (values[ni], values[ti]) = (n, t),
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(reason) => sink(reject(reason))?,
            None => sink(Item::Record(derive(SourceRecord {
                ahead: Ahead::default(),
                table,
                values,
                origin: origin(),
            })))?,
        }
    }
    Ok(())
}

fn split_obs_value(v: &str, ty: Option<&str>) -> Result<(Option<Value>, Option<Value>), String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok((None, None));
    }
    let parsed = v.parse::<f64>().ok().filter(|f| f.is_finite());
    match (ty.map(str::trim), parsed) {
        (Some("numeric"), None) => Err("value: not a number but TYPE is numeric".into()),
        (Some("numeric") | None, Some(f)) => Ok((Some(Value::Float(f)), None)),
        _ => Ok((None, Some(Value::Text(v.to_owned())))),
    }
}

/// Fills the derived columns (the length of stay of an encounter, in days, from its own start and stop).
fn derive(mut rec: SourceRecord) -> SourceRecord {
    if rec.table == Table::Encounters {
        let ts = |c: &str| match rec.get(c) {
            Some(Value::Timestamp(t)) => Some(*t),
            _ => None,
        };
        if let (Some(start), Some(stop), Some(i)) = (
            ts("start"),
            ts("stop"),
            rec.table.column_index(policies::schema::LENGTH_OF_STAY),
        ) {
            let days = (stop - start).num_seconds() as f64 / 86_400.0;
            rec.values[i] = (days >= 0.0).then_some(Value::Float(days));
        }
    }
    rec
}

// ---- FHIR R4 -------------------------------------------------------------------------------------------

fn resource(
    r: &Json,
    origin: Origin,
    pass: Pass,
    unmodelled: &mut Unmodelled,
    sink: &mut dyn FnMut(Item) -> Result<()>,
) -> Result<()> {
    let rtype = r.get("resourceType").and_then(Json::as_str).unwrap_or("");
    let table = match table_of_resource(rtype) {
        Some(t) => t,
        None if rtype.is_empty() => {
            return sink(Item::Rejected(Rejected {
                table: None,
                origin,
                reason: "resource without resourceType".into(),
                raw: r.to_string(),
            }));
        }
        None => {
            if pass == Pass::All {
                *unmodelled.entry(rtype.to_owned()).or_default() += 1;
            }
            return Ok(());
        }
    };
    if pass == Pass::PatientsOnly && table != Table::Patients {
        return Ok(());
    }
    let mut rows = Vec::new();
    let result = fhir_rows(table, r, &mut rows);
    match result {
        Ok(()) => {
            for values in rows {
                sink(Item::Record(derive(SourceRecord {
                    ahead: Ahead::default(),
                    table,
                    values,
                    origin: origin.clone(),
                })))?;
            }
            Ok(())
        }
        Err(reason) => sink(Item::Rejected(Rejected {
            table: Some(table),
            origin,
            reason,
            raw: r.to_string(),
        })),
    }
}

/// The canonical table a FHIR resource type maps to.
fn table_of_resource(resource_type: &str) -> Option<Table> {
    Some(match resource_type {
        "Patient" => Table::Patients,
        "Encounter" => Table::Encounters,
        "Condition" => Table::Conditions,
        "Observation" => Table::Observations,
        "MedicationRequest" => Table::Medications,
        "Procedure" => Table::Procedures,
        "DocumentReference" => Table::Notes,
        _ => return None,
    })
}

struct RowBuilder {
    table: Table,
    values: Vec<Option<Value>>,
}

impl RowBuilder {
    fn new(table: Table) -> Self {
        RowBuilder {
            table,
            values: vec![None; table.columns().len()],
        }
    }

    fn set(&mut self, column: &str, text: Option<&str>) -> Result<(), String> {
        let Some(i) = self.table.column_index(column) else {
            return Ok(());
        };
        if let Some(t) = text {
            self.values[i] =
                parse_value(t, self.table.columns()[i].ty).map_err(|e| format!("{column}: {e}"))?;
        }
        Ok(())
    }

    fn set_value(&mut self, column: &str, v: Option<Value>) {
        if let Some(i) = self.table.column_index(column) {
            self.values[i] = v;
        }
    }
}

fn s<'a>(r: &'a Json, pointer: &str) -> Option<&'a str> {
    r.pointer(pointer).and_then(Json::as_str)
}

fn num_text(r: &Json, pointer: &str) -> Option<String> {
    r.pointer(pointer).and_then(|v| match v {
        Json::Number(n) => Some(n.to_string()),
        Json::String(s) => Some(s.clone()),
        _ => None,
    })
}

/// `Patient/abc`, `urn:uuid:abc` or `abc` → `abc`.
fn reference_id(reference: &str) -> &str {
    let r = reference.strip_prefix("urn:uuid:").unwrap_or(reference);
    r.rsplit('/').next().unwrap_or(r)
}

fn fhir_rows(table: Table, r: &Json, out: &mut Vec<Vec<Option<Value>>>) -> Result<(), String> {
    let mut b = RowBuilder::new(table);
    let subject = s(r, "/subject/reference")
        .or_else(|| s(r, "/patient/reference"))
        .map(reference_id);
    let encounter = s(r, "/encounter/reference")
        .or_else(|| s(r, "/context/encounter/0/reference"))
        .map(reference_id);
    if table != Table::Patients {
        b.set(PATIENT_REF, subject)?;
        b.set("encounter_id", encounter)?;
    }
    match table {
        Table::Patients => patient(r, &mut b)?,
        Table::Encounters => {
            b.set("encounter_id", s(r, "/id"))?;
            b.set("start", s(r, "/period/start"))?;
            b.set("stop", s(r, "/period/end"))?;
            b.set(
                "organization_id",
                s(r, "/serviceProvider/reference").map(reference_id),
            )?;
            b.set(
                "provider_id",
                s(r, "/participant/0/individual/reference").map(reference_id),
            )?;
            b.set(
                "department",
                s(r, "/serviceType/text").or_else(|| s(r, "/serviceType/coding/0/display")),
            )?;
            b.set("encounter_class", s(r, "/class/code"))?;
            b.set("code", s(r, "/type/0/coding/0/code"))?;
            b.set(
                "description",
                s(r, "/type/0/coding/0/display").or_else(|| s(r, "/type/0/text")),
            )?;
            b.set("reason_code", s(r, "/reasonCode/0/coding/0/code"))?;
            b.set("reason_description", s(r, "/reasonCode/0/coding/0/display"))?;
        }
        Table::Conditions => {
            b.set(
                "start",
                s(r, "/onsetDateTime").or_else(|| s(r, "/recordedDate")),
            )?;
            b.set("stop", s(r, "/abatementDateTime"))?;
            b.set("code", s(r, "/code/coding/0/code"))?;
            b.set(
                "description",
                s(r, "/code/coding/0/display").or_else(|| s(r, "/code/text")),
            )?;
        }
        Table::Observations => {
            b.set(
                "date",
                s(r, "/effectiveDateTime").or_else(|| s(r, "/issued")),
            )?;
            b.set("category", s(r, "/category/0/coding/0/code"))?;
            let components = r
                .get("component")
                .and_then(Json::as_array)
                .filter(|c| !c.is_empty());
            match components {
                None => {
                    observation_value(r, &mut b)?;
                    out.push(b.values);
                }
                Some(components) => {
                    // A panel (blood pressure) becomes one row per component, as Synthea's CSV has it.
                    for c in components {
                        let mut row = RowBuilder {
                            table,
                            values: b.values.clone(),
                        };
                        observation_value(c, &mut row)?;
                        out.push(row.values);
                    }
                }
            }
            return Ok(());
        }
        Table::Medications => {
            b.set("start", s(r, "/authoredOn"))?;
            b.set("code", s(r, "/medicationCodeableConcept/coding/0/code"))?;
            b.set(
                "description",
                s(r, "/medicationCodeableConcept/coding/0/display")
                    .or_else(|| s(r, "/medicationCodeableConcept/text")),
            )?;
            b.set(
                "dispenses",
                num_text(r, "/dispenseRequest/numberOfRepeatsAllowed").as_deref(),
            )?;
            b.set("reason_code", s(r, "/reasonCode/0/coding/0/code"))?;
            b.set("reason_description", s(r, "/reasonCode/0/coding/0/display"))?;
        }
        Table::Procedures => {
            b.set(
                "start",
                s(r, "/performedPeriod/start").or_else(|| s(r, "/performedDateTime")),
            )?;
            b.set("stop", s(r, "/performedPeriod/end"))?;
            b.set("code", s(r, "/code/coding/0/code"))?;
            b.set(
                "description",
                s(r, "/code/coding/0/display").or_else(|| s(r, "/code/text")),
            )?;
            b.set("reason_code", s(r, "/reasonCode/0/coding/0/code"))?;
            b.set("reason_description", s(r, "/reasonCode/0/coding/0/display"))?;
        }
        Table::Notes => {
            b.set("note_id", s(r, "/id"))?;
            b.set(
                "date",
                s(r, "/date").or_else(|| s(r, "/context/period/start")),
            )?;
            b.set(
                "note_type",
                s(r, "/type/coding/0/display").or_else(|| s(r, "/type/text")),
            )?;
            let mut text = String::new();
            for c in r
                .get("content")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                if let Some(data) = s(c, "/attachment/data") {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data.trim())
                        .map_err(|e| format!("text: attachment is not base64: {e}"))?;
                    text.push_str(&String::from_utf8_lossy(&bytes));
                }
            }
            b.set_value("text", (!text.is_empty()).then_some(Value::Text(text)));
        }
    }
    out.push(b.values);
    Ok(())
}

fn observation_value(r: &Json, b: &mut RowBuilder) -> Result<(), String> {
    b.set("code", s(r, "/code/coding/0/code"))?;
    b.set(
        "description",
        s(r, "/code/coding/0/display").or_else(|| s(r, "/code/text")),
    )?;
    if let Some(v) = num_text(r, "/valueQuantity/value") {
        b.set("value_numeric", Some(&v))?;
        b.set(
            "units",
            s(r, "/valueQuantity/unit").or_else(|| s(r, "/valueQuantity/code")),
        )?;
    } else {
        let text = s(r, "/valueCodeableConcept/coding/0/display")
            .or_else(|| s(r, "/valueCodeableConcept/text"))
            .or_else(|| s(r, "/valueString"));
        b.set("value_text", text)?;
    }
    Ok(())
}

fn patient(r: &Json, b: &mut RowBuilder) -> Result<(), String> {
    b.set("patient_id", s(r, "/id"))?;
    for id in r
        .get("identifier")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let code = s(id, "/type/coding/0/code");
        let system = s(id, "/system").unwrap_or("");
        let column = match code {
            Some("MR") => "mrn",
            Some("SS" | "NI" | "NH") => "national_id",
            Some("DL") => "drivers_license",
            Some("PPN") => "passport",
            Some("MB" | "SN" | "MC") => "insurance_id",
            _ if system.ends_with("us-ssn") || system.contains("nhs-number") => "national_id",
            _ => continue,
        };
        b.set(column, s(id, "/value"))?;
    }
    let names = r
        .get("name")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let official = names
        .iter()
        .find(|n| s(n, "/use") == Some("official"))
        .or(names.first());
    if let Some(n) = official {
        b.set("prefix", s(n, "/prefix/0"))?;
        b.set("first_name", s(n, "/given/0"))?;
        b.set("middle_name", s(n, "/given/1"))?;
        b.set("last_name", s(n, "/family"))?;
        b.set("suffix", s(n, "/suffix/0"))?;
    }
    if let Some(n) = names.iter().find(|n| s(n, "/use") == Some("maiden")) {
        b.set("maiden_name", s(n, "/family"))?;
    }
    b.set("birth_date", s(r, "/birthDate"))?;
    b.set("death_date", s(r, "/deceasedDateTime"))?;
    // FHIR's administrative gender, in the single-letter codes Synthea's CSV (and the domains) use.
    let gender = s(r, "/gender").map(|g| match g {
        "female" => "F",
        "male" => "M",
        "other" => "O",
        "unknown" => "U",
        other => other,
    });
    b.set("gender", gender)?;
    b.set(
        "marital",
        s(r, "/maritalStatus/coding/0/code").or_else(|| s(r, "/maritalStatus/text")),
    )?;
    for ext in r
        .get("extension")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let url = s(ext, "/url").unwrap_or("");
        let text = || {
            ext.get("extension")
                .and_then(Json::as_array)
                .and_then(|xs| xs.iter().find(|x| s(x, "/url") == Some("text")))
                .and_then(|x| s(x, "/valueString"))
        };
        if url.ends_with("us-core-race") {
            b.set("race", text())?;
        } else if url.ends_with("us-core-ethnicity") {
            b.set("ethnicity", text())?;
        } else if url.ends_with("patient-birthPlace") {
            let parts: Vec<&str> = ["city", "state", "country"]
                .iter()
                .filter_map(|k| s(ext, &format!("/valueAddress/{k}")))
                .collect();
            b.set(
                "birthplace",
                (!parts.is_empty()).then(|| parts.join(", ")).as_deref(),
            )?;
        } else if url.ends_with("patient-mothersMaidenName")
            && b.values[b.table.column_index("maiden_name").unwrap_or(0)].is_none()
        {
            b.set("maiden_name", s(ext, "/valueString"))?;
        }
    }
    if let Some(a) = r.pointer("/address/0") {
        let lines: Vec<&str> = a
            .get("line")
            .and_then(Json::as_array)
            .map(|l| l.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        b.set(
            "address",
            (!lines.is_empty()).then(|| lines.join(", ")).as_deref(),
        )?;
        b.set("city", s(a, "/city"))?;
        b.set("state", s(a, "/state"))?;
        b.set("county", s(a, "/district"))?;
        b.set("zip", s(a, "/postalCode"))?;
        for geo in a
            .get("extension")
            .and_then(Json::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            for x in geo
                .get("extension")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                match s(x, "/url") {
                    Some("latitude") => b.set("lat", num_text(x, "/valueDecimal").as_deref())?,
                    Some("longitude") => b.set("lon", num_text(x, "/valueDecimal").as_deref())?,
                    _ => {}
                }
            }
        }
    }
    for t in r
        .get("telecom")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        match s(t, "/system") {
            Some("phone") => b.set("phone", s(t, "/value"))?,
            Some("email") => b.set("email", s(t, "/value"))?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A patients CSV of `n` rows, every seventh with a birth date that does not parse.
    fn export(n: usize) -> (tempfile::TempDir, SourceFile) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut csv = String::from(
            "Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,LAST,SUFFIX,MAIDEN,MARITAL,RACE,\
             ETHNICITY,GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,ZIP,LAT,LON,HEALTHCARE_EXPENSES,\
             HEALTHCARE_COVERAGE\n",
        );
        for i in 0..n {
            let birth = if i % 7 == 3 {
                "not a date"
            } else {
                "1970-01-02"
            };
            csv.push_str(&format!(
                "p{i},{birth},,,,,,Ann,Lee,,,M,white,nonhispanic,F,,1 Main St,Town,Massachusetts,\
                 Middlesex,02155,42.1,-71.1,100.5,10.0\n"
            ));
        }
        std::fs::write(dir.path().join("patients.csv"), csv).expect("write");
        let found = discover(dir.path(), &CsvMapping::synthea()).expect("discover");
        let file = found.files.into_iter().next().expect("one file");
        (dir, file)
    }

    fn line(item: &Item) -> (bool, u64) {
        match item {
            Item::Record(r) => (true, r.origin.line),
            Item::Rejected(r) => (false, r.origin.line),
        }
    }

    #[test]
    fn reading_ahead_hands_on_what_reading_does_in_order() {
        let (_dir, file) = export(AHEAD_BATCH * AHEAD_BATCHES * 3 + 17);
        let mut direct = Vec::new();
        read_file(&file, Pass::All, &mut Unmodelled::new(), &mut |i| {
            direct.push(line(&i));
            Ok(())
        })
        .expect("read");
        let mut ahead = Vec::new();
        let (mut one, mut two) = (|_: &mut SourceRecord| {}, |_: &mut SourceRecord| {});
        read_file_ahead(
            &file,
            Pass::All,
            &mut Unmodelled::new(),
            &mut [&mut one, &mut two],
            &mut |i| {
                ahead.push(line(i));
                Ok(())
            },
        )
        .expect("read ahead");
        assert_eq!(direct.len(), AHEAD_BATCH * AHEAD_BATCHES * 3 + 17);
        assert!(direct.iter().any(|(ok, _)| !ok), "bad rows are handed on");
        assert_eq!(ahead, direct);
    }

    #[test]
    fn a_failing_sink_stops_reading_and_its_error_is_the_answer() {
        let (_dir, file) = export(AHEAD_BATCH * AHEAD_BATCHES * 4);
        let mut seen = 0;
        let err = read_file_ahead(
            &file,
            Pass::All,
            &mut Unmodelled::new(),
            &mut [],
            &mut |_| {
                seen += 1;
                if seen == 1000 {
                    return Err(Error::Sink("disk full".into()));
                }
                Ok(())
            },
        )
        .expect_err("fails");
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(seen, 1000, "nothing is handed on after the failure");
    }
}
