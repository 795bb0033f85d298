//! The provider ingest: export in, de-identified encrypted dataset version out, catalogued atomically.
//!
//! 1. The profile and any mapping are parsed and checked before a row is read.
//! 2. Pass one reads only patients: person keys, date shifts, scrub lists, k-anonymity.
//! 3. Pass two streams every row through the transform into batches held in memory up to the staging
//!    budget ([`IngestOptions::stage_memory`]), past it into one encrypted scratch Parquet file per table
//!    in a staging directory; bad rows go to an encrypted quarantine file with their reason. Each table is
//!    then written once in its final encoding, two at a time, its singled-out values withheld.
//! 4. Files are fsynced, the staging directory is renamed into place, and the version is published in one
//!    catalog transaction. A run that dies before that leaves nothing visible; re-running works.
//!
//! The scrubbed spans' review sample goes to the encrypted `review.parquet` (`REVIEW_FILE`).
//!
//! Beside it: `report` (the figures the provider reads), `quarantine` (rows held back, with why),
//! `spill` (identifiers between the passes, under a key only this process has), `progress` (stderr: each
//! pass's share of the input's bytes, rows/s and time left), `writer` (the thread that encodes and
//! encrypts while this one de-identifies).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::StringArray;
use arrow::datatypes::{DataType, Field, Schema};
use catalog::{CatalogStore, ColumnEntry, Coverage, NewVersion, Provenance, TableEntry};
use deidentify::{
    Deidentifier, Item, LinkageKey, Pass, Pseudonymizer, Skip, SourceFile, TableOutput,
};
use policies::{CsvMapping, Profile, Table};

mod progress;
mod quarantine;
mod report;
mod spill;
mod writer;

pub use report::{ColumnAction, IngestReport, KAnonReport, PersonCounts, RowCounts, peak_rss_kib};

use progress::Progress;
use quarantine::Quarantine;
use spill::KnownSpill;
use writer::{Span, Staged, TableWriters};

use crate::datadir::DataDir;
use crate::keys::{Keystore, Secret};
use crate::storage::{Encoding, EncryptedWriter};
use crate::{Error, Result};

/// Rows buffered per table before they are handed to the Parquet writer.
const BATCH_ROWS: usize = 8192;

/// The default of [`IngestOptions::stage_memory`]: 256 MiB.
pub const DEFAULT_STAGE_MEMORY: usize = 256 << 20;

/// What to ingest and how.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Provider (hospital) ID.
    pub provider: String,
    /// Dataset name.
    pub dataset: String,
    /// Export file or directory.
    pub input: PathBuf,
    /// Profile name or file.
    pub profile: String,
    /// Version label (default: next number).
    pub version: Option<String>,
    /// Extra CSV mapping file.
    pub mapping: Option<PathBuf>,
    /// Fail when more than this share of rows is quarantined (default: the profile's).
    pub max_quarantine_ratio: Option<f64>,
    /// Consent scope recorded in the catalog.
    pub consent_scope: String,
    /// Report progress on stderr: a bar with rows/s on a terminal, a plain line every few seconds otherwise.
    pub progress: bool,
    /// Bytes of de-identified batches held in memory between pass two and the final write; past it,
    /// the tables holding most are staged as encrypted scratch files (and read back once).
    pub stage_memory: usize,
    /// Test builds only: release values that single out their person as they are, and never fail on
    /// them (the DP engine's tests compare answers with exact figures over a few synthetic persons).
    #[cfg(feature = "danger-test-hooks")]
    pub danger_keep_unique_values: bool,
}

impl IngestOptions {
    /// Options with the defaults: next version label, built-in mappings, the profile's quarantine limit,
    /// no progress output.
    pub fn new(
        provider: &str,
        dataset: &str,
        input: impl Into<PathBuf>,
        profile: &str,
    ) -> IngestOptions {
        IngestOptions {
            provider: provider.to_owned(),
            dataset: dataset.to_owned(),
            input: input.into(),
            profile: profile.to_owned(),
            version: None,
            mapping: None,
            max_quarantine_ratio: None,
            consent_scope: "secondary use for research under the profile's legal basis".into(),
            progress: false,
            stage_memory: DEFAULT_STAGE_MEMORY,
            #[cfg(feature = "danger-test-hooks")]
            danger_keep_unique_values: false,
        }
    }
}

struct TableSink {
    output: TableOutput,
    counts: RowCounts,
}

/// The staging directory of one run: removed when the run ends, whatever way it ends (after a publish it
/// is gone already, renamed into place).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs one ingest. Returns the report of the published version.
pub fn ingest(
    dir: &DataDir,
    keystore: &Keystore,
    catalog: &dyn CatalogStore,
    opts: &IngestOptions,
) -> Result<IngestReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    validate_name("dataset", &opts.dataset)?;
    validate_name("provider", &opts.provider)?;
    // Everything that can be wrong with the configuration is found before the first row.
    #[allow(unused_mut)]
    let mut profile = Profile::load(&opts.profile)?;
    #[cfg(feature = "danger-test-hooks")]
    if opts.danger_keep_unique_values {
        profile.risk.max_unique_ratio = 1.0;
    }
    let mut mappings = Vec::new();
    if let Some(m) = &opts.mapping {
        let text = std::fs::read_to_string(m).map_err(|e| Error::io(m, e))?;
        mappings.extend(CsvMapping::parse_file(&text, &m.display().to_string())?);
    }
    mappings.extend(CsvMapping::synthea());
    let discovery = deidentify::discover(&opts.input, &mappings)?;
    let version = match &opts.version {
        Some(v) => v.clone(),
        None => catalog.next_version_label(&opts.dataset)?,
    };
    validate_name("version", &version)?;
    if catalog.version(&opts.dataset, Some(&version)).is_ok() {
        return Err(Error::Config(format!(
            "dataset '{}' already has a version '{version}'",
            opts.dataset
        )));
    }
    let max_quarantine = opts
        .max_quarantine_ratio
        .unwrap_or(profile.max_quarantine_ratio);

    let linkage = keystore.linkage_key()?;
    let keys = Pseudonymizer::new(&LinkageKey::from_bytes(*linkage));
    let staging = Staging(dir.staging_dir(&opts.dataset, &version)?);
    let mut spill_path = staging.0.clone().into_os_string();
    spill_path.push(".known");
    let spill = KnownSpill::create(Path::new(&spill_path))?;
    let mut deid = Deidentifier::new(
        profile.clone(),
        keys,
        &opts.provider,
        started_at.date_naive(),
    )
    .with_known_store(Box::new(spill));
    let progress = Progress::new(opts.progress);
    let mut unmodelled = BTreeMap::new();
    // The scrub patterns compile on the second core while pass one reads patients on this one.
    let warming = std::thread::spawn(deidentify::warm_up);

    // Pass one: patients.
    let first: Vec<&SourceFile> = discovery
        .files
        .iter()
        .filter(|f| f.may_hold_patients())
        .collect();
    let (bases, total) = byte_bases(&first);
    progress.phase("pass 1/2: patients", total);
    for (file, base) in first.into_iter().zip(bases) {
        deidentify::read_file_ahead(
            file,
            Pass::PatientsOnly,
            &mut BTreeMap::new(),
            &mut [],
            &mut |item| {
                if let Item::Record(rec) = item {
                    progress.tick(base + rec.origin.byte, 1);
                    deid.add_patient(rec);
                }
                Ok(())
            },
        )?;
    }
    let kanon = deid.finish_patients().cloned();
    // A panic there would be a pattern that does not compile; the unit tests compile every one.
    let _ = warming.join();

    // Pass two: everything, into staging.
    let (key_id, data_key) = keystore.new_data_key(&format!("{}@{version}", opts.dataset))?;
    let result = write_version(
        &mut deid,
        &discovery.files,
        &staging.0,
        (&key_id, &data_key),
        opts.stage_memory,
        &progress,
        &mut unmodelled,
    );
    progress.finish();
    let PassTwo {
        mut sinks,
        mut staged,
        reasons: quarantine_reasons,
        unrecognised,
    } = result?;
    let review_sample = write_review(&deid, &staging.0, &key_id, &data_key)?;

    // Values no other person holds are withheld from the value and time columns, unless a column has
    // so many that its coarsening is too fine: then the run fails below, naming it.
    let limit = profile.risk.max_unique_ratio;
    let singled = deid.singled_out();
    let too_fine = singled
        .iter()
        .flat_map(|(_, cols)| cols)
        .any(|c| c.rows as f64 > limit * c.values as f64);
    #[cfg(feature = "danger-test-hooks")]
    let too_fine = too_fine || opts.danger_keep_unique_values;
    let mut rewrite: Vec<Rewrite> = sinks
        .keys()
        .map(|table| Rewrite {
            table: *table,
            withhold: !too_fine && singled.iter().any(|(t, _)| t == table),
            staged: staged.remove(table).unwrap_or_default(),
        })
        .collect();
    // Largest first, so the last table to finish is a small one.
    rewrite.sort_by_key(|r| std::cmp::Reverse(sinks.get(&r.table).map_or(0, |(c, _)| c.written)));
    for (table, span) in finish_tables(&mut deid, &staging.0, rewrite, &key_id, &data_key)? {
        if let Some((_, s)) = sinks.get_mut(&table) {
            *s = span;
        }
    }

    let mut tables = BTreeMap::new();
    let mut totals = RowCounts::default();
    let mut span: (Option<String>, Option<String>) = (None, None);
    for (t, (counts, s)) in &sinks {
        totals.add(counts);
        tables.insert(t.name().to_owned(), *counts);
        if *t != Table::Patients {
            span.0 = [span.0.take(), s.0.clone()].into_iter().flatten().min();
            span.1 = [span.1.take(), s.1.clone()].into_iter().flatten().max();
        }
    }
    if unrecognised > 0 {
        // Rows whose table could not even be told (unparseable JSON, no resourceType).
        let c = RowCounts {
            rows_in: unrecognised,
            quarantined: unrecognised,
            ..RowCounts::default()
        };
        totals.add(&c);
        tables.insert("unrecognised".to_owned(), c);
    }
    let (in_export, released, linked) = deid.person_counts();
    let qis = profile
        .k_anonymity
        .as_ref()
        .map(|k| k.quasi_identifiers.clone())
        .unwrap_or_default();
    let report = IngestReport {
        dataset: opts.dataset.clone(),
        version: version.clone(),
        provider: opts.provider.clone(),
        profile: profile.name.clone(),
        source_system: discovery.source_system.clone(),
        started_at: started_at.to_rfc3339(),
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kib: report::peak_rss_kib(),
        files_read: discovery
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect(),
        files_skipped: discovery
            .skipped
            .iter()
            .map(|(p, r)| (p.display().to_string(), r.clone()))
            .collect(),
        resources_not_modelled: unmodelled,
        tables,
        totals,
        quarantine_reasons,
        persons: PersonCounts {
            in_export,
            released,
            suppressed: in_export - released,
            linked_by_national_id: linked,
        },
        k_anonymity: profile
            .k_anonymity
            .as_ref()
            .zip(kanon.as_ref())
            .map(|(k, o)| KAnonReport {
                k_required: k.k,
                k_reached: o.k_reached,
                classes: o.classes,
                generalisation_levels: qis.iter().cloned().zip(o.levels.iter().copied()).collect(),
                suppressed_persons: o.suppressed.iter().filter(|s| **s).count() as u64,
                recoded_persons: qis.iter().cloned().zip(o.recoded.iter().copied()).collect(),
                withheld_values: qis
                    .iter()
                    .cloned()
                    .zip(o.withheld.iter().copied())
                    .collect(),
            }),
        withheld_event_times: deid.withheld_events().clone(),
        review_sample,
        risk: deid.risk_report(),
        out_of_domain: deid.out_of_domain().clone(),
        scrubbed: deid
            .scrub_counts()
            .iter()
            .map(|(k, n)| (k.label().to_owned(), *n))
            .collect(),
        date_shift_days: profile.date_shift_days,
        actions: Table::ALL
            .iter()
            .map(|t| {
                let cols = deid
                    .column_actions(*t)
                    .into_iter()
                    .map(|c| ColumnAction {
                        column: c.name,
                        role: c.role,
                        action: c.action,
                    })
                    .collect();
                (t.name().to_owned(), cols)
            })
            .collect(),
    };

    let ratio = report.totals.quarantined as f64 / report.totals.rows_in.max(1) as f64;
    if ratio > max_quarantine {
        return Err(Error::QuarantineLimit {
            ratio,
            limit: max_quarantine,
            summary: report.summary(),
        });
    }
    if let (Some(k), Some(smallest)) = (&profile.k_anonymity, deid.smallest_written_class())
        && smallest < u64::from(k.k)
    {
        return Err(Error::KAnonymity {
            k: k.k,
            smallest,
            summary: report.summary(),
        });
    }
    if let Some(risk) = report.risk.as_ref().filter(|r| !r.over_limit.is_empty()) {
        let columns: Vec<String> = risk
            .over_limit
            .iter()
            .map(|(c, r)| {
                format!(
                    "{:.2} % of {c}'s values are held by one person only",
                    r * 100.0
                )
            })
            .collect();
        return Err(Error::RiskLimit {
            columns: columns.join(", "),
            limit: risk.max_unique_ratio,
            summary: report.summary(),
        });
    }
    write_synced(
        &staging.0.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_synced(&staging.0.join("report.txt"), report.summary().as_bytes())?;
    sync_dir(&staging.0)?;

    let relative = format!("datasets/{}/{}", opts.dataset, version);
    let target = dir.root().join(&relative);
    dir.publish_dir(&staging.0, &target)?;

    // Bounds the profile leaves open are chosen from the data under DP, charged before publishing.
    let open: Vec<Table> = Table::ALL
        .iter()
        .copied()
        .filter(|t| !profile.dp.rows_per_person.contains_key(t))
        .collect();
    let chosen = match profile.dp.chosen_bounds {
        Some(how) => crate::bounds::choose(
            &crate::bounds::Publishing {
                by: &opts.provider,
                dataset: &opts.dataset,
                version: &version,
                dir: &target,
            },
            std::sync::Arc::new(dir.keystore()?),
            &dir.ledger(keystore)?,
            &open,
            how,
        )
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&target);
        })?,
        None => Vec::new(),
    };
    let chosen_of = |t: &Table| chosen.iter().find(|(c, _)| c == t).map(|(_, k)| *k);

    let catalog_tables = Table::ALL
        .iter()
        .map(|t| TableEntry {
            name: t.name().to_owned(),
            file: format!("{}.parquet", t.name()),
            rows: sinks.get(t).map_or(0, |(c, _)| c.written),
            max_rows_per_person: profile
                .dp
                .rows_per_person
                .get(t)
                .copied()
                .or_else(|| chosen_of(t)),
            chosen: chosen_of(t)
                .and(profile.dp.chosen_bounds)
                .map(|how| catalog::ChosenBound {
                    quantile: how.quantile,
                    epsilon: how.epsilon,
                }),
            columns: deid
                .column_actions(*t)
                .into_iter()
                .map(|c| ColumnEntry {
                    name: c.name,
                    data_type: c.data_type,
                    role: c.role,
                    action: c.action,
                    lower: c.bounds.map(|b| b.0),
                    upper: c.bounds.map(|b| b.1),
                    domain: c.domain,
                })
                .collect(),
        })
        .collect();
    let published = catalog.publish(&NewVersion {
        dataset: opts.dataset.clone(),
        version: version.clone(),
        storage_path: relative,
        key_id,
        provenance: Provenance {
            provider: opts.provider.clone(),
            source_system: discovery.source_system.clone(),
            extracted_at: started_at.to_rfc3339(),
            legal_basis: profile.legal_basis.clone(),
            consent_scope: opts.consent_scope.clone(),
            profile: profile.name.clone(),
        },
        coverage: Coverage {
            persons: released,
            time_start: span.0,
            time_end: span.1,
        },
        max_contributions: profile.dp.max_contributions,
        accounting: profile.dp.accounting.name().to_owned(),
        tables: catalog_tables,
        report: serde_json::to_value(&report)?,
    });
    if let Err(e) = published {
        let _ = std::fs::remove_dir_all(&target);
        return Err(e.into());
    }
    Ok(report)
}

type Sinks = BTreeMap<Table, (RowCounts, Span)>;

/// What pass two wrote.
struct PassTwo {
    /// Per table, its row counts (and a span the final rewrite sets).
    sinks: Sinks,
    /// Per table, its de-identified batches: in memory, or in its scratch file.
    staged: BTreeMap<Table, Staged>,
    /// Quarantined rows per reason.
    reasons: BTreeMap<String, u64>,
    /// Rows whose table could not even be told.
    unrecognised: u64,
}

fn write_version(
    deid: &mut Deidentifier,
    files: &[SourceFile],
    staging: &Path,
    (key_id, key): (&str, &Secret),
    stage_memory: usize,
    progress: &Progress,
    unmodelled: &mut BTreeMap<String, u64>,
) -> Result<PassTwo> {
    let mut sinks = BTreeMap::new();
    let mut writers = BTreeMap::new();
    for t in Table::ALL {
        let schema = deid.schema(t);
        // Held in memory, or past the budget staged as scratch: every table is written again in its
        // final encoding once all its rows are known.
        let (path, schema_, key_id, key) = (
            staging.join(format!("{}.parquet", t.name())),
            schema.clone(),
            key_id.to_owned(),
            key.clone(),
        );
        let spill =
            move || EncryptedWriter::create_as(&path, schema_, &key_id, &key, Encoding::Scratch);
        writers.insert(
            t,
            writer::Sink::Held {
                spill: Box::new(spill),
            },
        );
        sinks.insert(
            t,
            TableSink {
                output: TableOutput::new(schema),
                counts: RowCounts::default(),
            },
        );
    }
    // Encoding and encryption run on the second core while this thread reads and de-identifies.
    let mut writers = TableWriters::start(writers, stage_memory)?;
    let qschema = Arc::new(Schema::new(
        ["table", "origin", "reason", "raw"]
            .map(|n| Field::new(n, DataType::Utf8, false))
            .to_vec(),
    ));
    let mut quarantine = Quarantine {
        writer: EncryptedWriter::create(
            &staging.join("quarantine.parquet"),
            qschema.clone(),
            key_id,
            key,
        )?,
        rows: Vec::new(),
        schema: qschema,
    };
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut orphan_quarantined = 0u64;
    let (bases, total) = byte_bases(&files.iter().collect::<Vec<_>>());
    progress.phase("pass 2/2: de-identifying", total);
    let mut seen = 0u64;
    // One thread parses; two find the scrubbed texts' pattern spans and the pseudonyms (notes are
    // mostly pattern matching); this one transforms; another encodes and encrypts.
    let (mut first, mut second) = (deid.prescan(), deid.prescan());
    let mut first = |rec: &mut deidentify::SourceRecord| first.apply(rec);
    let mut second = |rec: &mut deidentify::SourceRecord| second.apply(rec);
    for (file, base) in files.iter().zip(bases) {
        tracing::info!(file = %file.path().display(), "reading");
        let preparers: &mut [&mut (dyn FnMut(&mut deidentify::SourceRecord) + Send)] =
            &mut [&mut first, &mut second];
        deidentify::read_file_ahead(file, Pass::All, unmodelled, preparers, &mut |item| {
            seen += 1;
            if seen.is_multiple_of(1024) {
                let at = match &item {
                    Item::Record(rec) => rec.origin.byte,
                    Item::Rejected(r) => r.origin.byte,
                };
                progress.tick(base + at, 1024);
            }
            match item {
                Item::Record(rec) => {
                    let sink = sinks
                        .get_mut(&rec.table)
                        .ok_or_else(|| deidentify::Error::Sink("no sink".into()))?;
                    sink.counts.rows_in += 1;
                    match deid.transform(rec, &mut sink.output) {
                        Ok(()) => {
                            sink.counts.written += 1;
                            if sink.output.len() >= BATCH_ROWS {
                                flush(rec.table, sink, &mut writers)
                                    .map_err(|e| deidentify::Error::Sink(e.to_string()))?;
                            }
                        }
                        Err(Skip::Suppressed) => sink.counts.suppressed += 1,
                        Err(Skip::Quarantine(reason)) => {
                            sink.counts.quarantined += 1;
                            *reasons
                                .entry(format!("{}: {reason}", rec.table))
                                .or_default() += 1;
                            quarantine
                                .push(
                                    Some(rec.table),
                                    rec.origin.to_string(),
                                    reason,
                                    rec.render(),
                                )
                                .map_err(|e| deidentify::Error::Sink(e.to_string()))?;
                        }
                    }
                }
                Item::Rejected(r) => {
                    match r.table.and_then(|t| sinks.get_mut(&t)) {
                        Some(sink) => {
                            sink.counts.rows_in += 1;
                            sink.counts.quarantined += 1;
                        }
                        None => orphan_quarantined += 1,
                    }
                    let label = r.table.map_or("unknown", Table::name);
                    *reasons.entry(format!("{label}: {}", r.reason)).or_default() += 1;
                    quarantine
                        .push(
                            r.table,
                            r.origin.to_string(),
                            r.reason.clone(),
                            r.raw.clone(),
                        )
                        .map_err(|e| deidentify::Error::Sink(e.to_string()))?;
                }
            }
            Ok(())
        })?;
        tracing::info!(rows = seen, "read {}", file.path().display());
    }
    quarantine.flush()?;
    quarantine.writer.finish()?;
    for (t, sink) in &mut sinks {
        flush(*t, sink, &mut writers)?;
    }
    let mut written = writers.finish()?;
    let mut staged = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (t, sink) in sinks {
        let (span, s) = written.remove(&t).unwrap_or_default();
        staged.insert(t, s);
        out.insert(t, (sink.counts, span));
    }
    Ok(PassTwo {
        sinks: out,
        staged,
        reasons,
        unrecognised: orphan_quarantined,
    })
}

/// Writes the sample of scrubbed spans in their context (original text) to the version's encrypted
/// `review.parquet`, for the provider to check what scrubbing took; returns the items per placeholder.
fn write_review(
    deid: &Deidentifier,
    staging: &Path,
    key_id: &str,
    key: &Secret,
) -> Result<BTreeMap<String, u64>> {
    let schema = Arc::new(Schema::new(
        ["table", "placeholder", "found", "before", "after"]
            .map(|n| Field::new(n, DataType::Utf8, false))
            .to_vec(),
    ));
    let sample = deid.review_sample();
    let column = |f: &dyn Fn(&deidentify::ReviewItem) -> &str| {
        Arc::new(sample.iter().map(|i| Some(f(i))).collect::<StringArray>())
            as Arc<dyn arrow::array::Array>
    };
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema.clone(),
        vec![
            column(&|i| i.table.name()),
            column(&|i| i.kind.label()),
            column(&|i| &i.found),
            column(&|i| &i.before),
            column(&|i| &i.after),
        ],
    )?;
    let mut writer = EncryptedWriter::create(&staging.join(REVIEW_FILE), schema, key_id, key)?;
    writer.write(&batch)?;
    writer.finish()?;
    let mut counts = BTreeMap::new();
    for i in sample {
        *counts.entry(i.kind.label().to_owned()).or_default() += 1;
    }
    Ok(counts)
}

/// The version's file of scrubbed spans in their context.
pub const REVIEW_FILE: &str = "review.parquet";

/// Where each file starts in a pass's bytes, and the pass's total.
fn byte_bases(files: &[&SourceFile]) -> (Vec<u64>, u64) {
    let mut total = 0u64;
    let bases = files
        .iter()
        .map(|f| {
            let base = total;
            total += std::fs::metadata(f.path()).map_or(0, |m| m.len());
            base
        })
        .collect();
    (bases, total)
}

fn flush(table: Table, sink: &mut TableSink, writers: &mut TableWriters) -> Result<()> {
    if sink.output.is_empty() {
        return Ok(());
    }
    writers.write(table, sink.output.take_batch()?)
}

/// One staged table to write in its final encoding.
struct Rewrite {
    table: Table,
    /// Its singled-out values are withheld on the way.
    withhold: bool,
    /// Where its batches are.
    staged: Staged,
}

/// Rewrites the staged tables in their final encoding ([`finish_table`]), two at a time in the order
/// given (one table's rewrite alone leaves a core idle half the time). Returns each table's coverage
/// span. The first error stops both (the other at its next batch) and is the answer.
fn finish_tables(
    deid: &mut Deidentifier,
    staging: &Path,
    tables: Vec<Rewrite>,
    key_id: &str,
    key: &Secret,
) -> Result<Vec<(Table, Span)>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    for t in &tables {
        if t.withhold {
            deid.begin_withholding(t.table);
        }
    }
    let deid = std::sync::Mutex::new(deid);
    let queue = std::sync::Mutex::new(tables.into_iter());
    let first_error = std::sync::Mutex::new(None);
    let failed = AtomicBool::new(false);
    let poisoned = || Error::Internal("a rewriting thread panicked".into());
    let spans = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<(Table, Span)>> {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::SeqCst) {
                        let Some(t) = queue.lock().map_err(|_| poisoned())?.next() else {
                            break;
                        };
                        match finish_table(&deid, staging, t, key_id, key, &failed) {
                            Ok(span) => done.push(span),
                            Err(e) => {
                                // Kept before the flag is raised, so the other worker's "stopped" is
                                // never the answer.
                                if let Ok(mut first) = first_error.lock() {
                                    first.get_or_insert(e);
                                }
                                failed.store(true, Ordering::SeqCst);
                                break;
                            }
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        let mut spans = Vec::new();
        for worker in workers {
            spans.extend(worker.join().map_err(|_| poisoned())??);
        }
        Ok::<_, Error>(spans)
    })?;
    match first_error.into_inner().map_err(|_| poisoned())? {
        Some(e) => Err(e),
        None => Ok(spans),
    }
}

/// Rewrites a staged table (held in memory, or scratch-encoded in its file) in its final encoding; with
/// `withhold`, its singled-out values are withheld on the way (through the transform, which measures it
/// again). Returns its coverage span.
fn finish_table(
    deid: &std::sync::Mutex<&mut Deidentifier>,
    staging: &Path,
    Rewrite {
        table,
        withhold,
        staged,
    }: Rewrite,
    key_id: &str,
    key: &Secret,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(Table, Span)> {
    let path = staging.join(format!("{}.parquet", table.name()));
    let rewritten = staging.join(format!("{}.parquet.final", table.name()));
    let lock = || {
        deid.lock()
            .map_err(|_| Error::Internal("a rewriting thread panicked".into()))
    };
    let schema = lock()?.schema(table);
    let start = |plain: Vec<String>| -> Result<TableWriters> {
        let encoding = Encoding::Final { plain };
        let writer = EncryptedWriter::create_as(&rewritten, schema.clone(), key_id, key, encoding)?;
        TableWriters::start(
            BTreeMap::from([(table, writer::Sink::File(Box::new(writer)))]),
            0,
        )
    };
    let mut started: Option<TableWriters> = None;
    // Decoding (of a scratch file) on one thread, withholding on this one, encoding on the writer's.
    type Batches = Box<dyn Iterator<Item = Result<arrow::record_batch::RecordBatch>> + Send>;
    let batches: Batches = match staged {
        Staged::Empty => Box::new(std::iter::empty()),
        Staged::Memory(held) => Box::new(held.into_iter().map(Ok)),
        Staged::File => {
            Box::new(crate::storage::read_encrypted(&path, key)?.map(|b| b.map_err(Error::from)))
        }
    };
    std::thread::scope(|scope| -> Result<()> {
        let (to_withhold, decoded) = std::sync::mpsc::sync_channel(2);
        scope.spawn(move || {
            for batch in batches {
                if to_withhold.send(batch).is_err() {
                    break;
                }
            }
        });
        for batch in decoded {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::Internal("another table's rewrite failed".into()));
            }
            let batch = batch?;
            let batch = if withhold {
                lock()?.withhold_batch(table, &batch)?
            } else {
                batch
            };
            let writers = match &mut started {
                Some(w) => w,
                // The first batch says which text columns hold mostly distinct values.
                None => started.insert(start(mostly_distinct(&batch))?),
            };
            writers.write(table, batch)?;
        }
        Ok(())
    })?;
    let writers = match started {
        Some(w) => w,
        None => start(Vec::new())?,
    };
    let (span, _) = writers.finish()?.remove(&table).unwrap_or_default();
    std::fs::rename(&rewritten, &path).map_err(|e| Error::io(&path, e))?;
    Ok((table, span))
}

/// The text columns of `batch` (a table's first) whose values are mostly distinct (IDs, free text): a
/// dictionary would only cost time before Parquet gives it up, so they are written plain.
fn mostly_distinct(batch: &arrow::record_batch::RecordBatch) -> Vec<String> {
    use arrow::array::{Array, AsArray};
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter_map(|(field, column)| {
            let text = column.as_string_opt::<i32>()?;
            let present = text.len() - text.null_count();
            let distinct: std::collections::HashSet<&str> = text.iter().flatten().collect();
            (present >= 1024 && distinct.len() * 2 > present).then(|| field.name().clone())
        })
        .collect()
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} '{name}' must be 1-64 of A-Z a-z 0-9 . _ - (not starting with .)"
        )))
    }
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use deidentify::KnownStore;

    #[test]
    fn only_text_columns_of_mostly_distinct_values_go_without_a_dictionary() {
        use arrow::array::{Int64Array, RecordBatch};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("code", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
            Field::new("sparse", DataType::Utf8, true),
            Field::new("empty", DataType::Utf8, true),
        ]));
        let rows = 4096;
        let id: StringArray = (0..rows).map(|i| Some(format!("id-{i}"))).collect();
        let code: StringArray = (0..rows).map(|i| Some(format!("c{}", i % 40))).collect();
        let n: Int64Array = (0..rows as i64).collect();
        // Distinct where present, but present in fewer than 1,024 rows: too few to judge.
        let sparse: StringArray = (0..rows)
            .map(|i| (i % 8 == 0).then(|| format!("s{i}")))
            .collect();
        let empty: StringArray = (0..rows).map(|_| None::<String>).collect();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(id),
                Arc::new(code),
                Arc::new(n),
                Arc::new(sparse),
                Arc::new(empty),
            ],
        )
        .expect("batch");
        assert_eq!(mostly_distinct(&batch), vec!["id".to_owned()]);
    }

    #[test]
    fn the_known_identifier_spill_is_ciphertext_and_goes_away() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x.known");
        let mut spill = KnownSpill::create(&path).expect("create");
        let records: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("Person{i} Family{i} 555-0{i:04}").into_bytes())
            .collect();
        let handles: Vec<u32> = records.iter().map(|r| spill.put(r).expect("put")).collect();
        for i in [1999usize, 0, 777, 1998] {
            assert_eq!(spill.get(handles[i]).expect("get"), records[i]);
        }
        let bytes = std::fs::read(&path).expect("read");
        assert!(bytes.len() > 2000 * 16, "every record is on disk");
        assert!(
            !bytes.windows(7).any(|w| w == b"Person1"),
            "no plaintext in the file"
        );
        drop(spill);
        assert!(!path.exists(), "deleted with the run");
    }
}
