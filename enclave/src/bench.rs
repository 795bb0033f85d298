//! `enclave bench ingest`: ingest throughput and peak memory against plain Parquet writing of the same rows.
//!
//! Each phase runs in its own child process so its peak RSS (`VmHWM`) is its own. The baseline reads the
//! same CSV with the same reader and writes every source column unencrypted and untransformed; the ingest
//! phase is the real pipeline (two passes, de-identification, scrubbing, k-anonymity, encryption, fsync,
//! catalog). Both run at the full size and at a quarter of it, to show memory does not grow with input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use deidentify::{Item, Pass, TableOutput, danger_plain_schema};
use parquet::arrow::ArrowWriter;
use policies::{CsvMapping, Table};
use serde::{Deserialize, Serialize};

use crate::demo::{DemoFormat, DemoOptions};
use crate::ingest::{IngestOptions, ingest};
use crate::{DataDir, Error, Result};

/// Figures of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseFigures {
    /// Rows read (all tables).
    pub rows: u64,
    /// Observation rows read.
    pub observation_rows: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Peak resident memory of the process, KiB.
    pub peak_rss_kib: u64,
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs one phase in this process and prints its figures as one JSON line.
pub fn phase(name: &str, input: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    let (rows, observation_rows) = match name {
        "plain" => plain_parquet(input, out)?,
        "ingest" => {
            let dir = DataDir::new(out);
            dir.init()?;
            let report = ingest(
                &dir,
                &dir.keystore()?,
                &dir.catalog()?,
                &IngestOptions {
                    provider: "bench".into(),
                    dataset: "bench".into(),
                    input: input.to_owned(),
                    profile: "hipaa-safe-harbor".into(),
                    version: None,
                    mapping: None,
                    max_quarantine_ratio: None,
                    consent_scope: "benchmark".into(),
                    progress: false,
                },
            )?;
            (
                report.totals.rows_in,
                report.tables.get("observations").map_or(0, |c| c.rows_in),
            )
        }
        other => return Err(Error::Config(format!("unknown bench phase '{other}'"))),
    };
    let f = PhaseFigures {
        rows,
        observation_rows,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
    };
    println!("{}", serde_json::to_string(&f)?);
    Ok(())
}

fn plain_parquet(input: &Path, out: &Path) -> Result<(u64, u64)> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let discovery = deidentify::discover(input, &CsvMapping::synthea())?;
    let mut writers = BTreeMap::new();
    for t in Table::ALL {
        let schema = danger_plain_schema(t);
        let file = std::fs::File::create(out.join(format!("{}.parquet", t.name())))
            .map_err(|e| Error::io(out, e))?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_max_row_group_row_count(Some(crate::storage::ROW_GROUP_ROWS))
            .build();
        writers.insert(
            t,
            (
                TableOutput::new(schema.clone()),
                ArrowWriter::try_new(file, schema, Some(props))?,
            ),
        );
    }
    let (mut rows, mut obs) = (0u64, 0u64);
    for file in &discovery.files {
        deidentify::read_file(file, Pass::All, &mut BTreeMap::new(), &mut |item| {
            if let Item::Record(rec) = item {
                rows += 1;
                obs += u64::from(rec.table == Table::Observations);
                if let Some((buf, w)) = writers.get_mut(&rec.table) {
                    buf.danger_push_plain(&rec);
                    if buf.len() >= 8192 {
                        let batch = buf
                            .take_batch()
                            .map_err(|e| deidentify::Error::Sink(e.to_string()))?;
                        w.write(&batch)
                            .map_err(|e| deidentify::Error::Sink(e.to_string()))?;
                    }
                }
            }
            Ok(())
        })?;
    }
    for (_, (mut buf, mut w)) in writers {
        if !buf.is_empty() {
            w.write(&buf.take_batch()?)?;
        }
        w.into_inner()?.sync_all().map_err(|e| Error::io(out, e))?;
    }
    Ok((rows, obs))
}

fn run_phase(phase: &str, input: &Path, out: &Path) -> Result<PhaseFigures> {
    let exe = std::env::current_exe().map_err(|e| Error::Io("current_exe".into(), e))?;
    let output = std::process::Command::new(exe)
        .args(["bench", "phase", phase])
        .arg(input)
        .arg(out)
        .env_remove("ENCLAVE_MASTER_KEY_FILE")
        .output()
        .map_err(|e| Error::Io("bench phase".into(), e))?;
    if !output.status.success() {
        return Err(Error::Internal(format!(
            "bench phase {phase} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or(""))?)
}

/// The whole benchmark: generate, measure both phases at two sizes, print the figures.
pub fn ingest_bench(
    patients: usize,
    work_dir: Option<PathBuf>,
    today: chrono::NaiveDate,
) -> Result<()> {
    let tmp;
    let work = match work_dir {
        Some(w) => w,
        None => {
            tmp = std::env::temp_dir().join(format!("enclave-bench-{}", std::process::id()));
            tmp.clone()
        }
    };
    let sizes = [patients.div_ceil(4), patients];
    println!(
        "enclave bench ingest: Synthea-style CSV, profile hipaa-safe-harbor, each phase in its own process\n"
    );
    println!(
        "{:>9} {:>11} {:>12} | {:>12} {:>10} | {:>12} {:>10} | {:>6}",
        "patients",
        "rows",
        "obs rows",
        "plain rows/s",
        "plain MiB",
        "ingest rows/s",
        "ingest MiB",
        "ratio"
    );
    for n in sizes {
        let export = work.join(format!("export-{n}"));
        if !export.join("manifest.json").exists() {
            crate::demo::generate(&DemoOptions {
                patients: n,
                out: export.clone(),
                format: DemoFormat::Csv,
                seed: 7,
                inject_errors: 0.0,
                today,
            })?;
        }
        let input = export.join("csv");
        let plain_out = work.join(format!("plain-{n}"));
        let data = work.join(format!("data-{n}"));
        let _ = std::fs::remove_dir_all(&plain_out);
        let _ = std::fs::remove_dir_all(&data);
        let plain = run_phase("plain", &input, &plain_out)?;
        let real = run_phase("ingest", &input, &data)?;
        let (pr, ir) = (
            plain.rows as f64 / plain.seconds,
            real.rows as f64 / real.seconds,
        );
        println!(
            "{:>9} {:>11} {:>12} | {:>12.0} {:>10.1} | {:>12.0} {:>10.1} | {:>5.0}%",
            n,
            real.rows,
            real.observation_rows,
            pr,
            plain.peak_rss_kib as f64 / 1024.0,
            ir,
            real.peak_rss_kib as f64 / 1024.0,
            100.0 * ir / pr
        );
        let _ = std::fs::remove_dir_all(&plain_out);
        let _ = std::fs::remove_dir_all(&data);
    }
    println!(
        "\nratio = ingest rows/s ÷ plain rows/s (target ≥ 50 %); MiB = peak RSS of that phase's process"
    );
    println!(
        "(memory should stay flat from the small to the large input: rows stream in batches of 8192 and"
    );
    println!(
        " row groups of {} rows; only the per-patient index grows with the number of patients)",
        crate::storage::ROW_GROUP_ROWS
    );
    Ok(())
}
