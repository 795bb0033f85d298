//! `enclave bench ingest`: ingest throughput and peak memory against plain Parquet writing of the same rows.
//!
//! Each phase runs in its own child process so its peak RSS (`VmHWM`) is its own. The baseline reads the
//! same CSV with the same reader and encodes every source column as plain Parquet, untransformed, into a
//! sink that keeps nothing (so no identifiable row is ever at rest, and the baseline pays no disk I/O,
//! which only makes the comparison stricter); the ingest
//! phase is the real pipeline (two passes, de-identification, scrubbing, k-anonymity, encryption, fsync,
//! catalog). Both run at the full size and at a quarter of it, to show how memory grows with input: up to
//! the ingest's staging budget (the de-identified rows held between the passes), then no further.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use catalog::CatalogStore;

use crate::demo::{DemoFormat, DemoOptions};
use enclave::baseline::{BENCH_PROVIDER, BENCH_SCOPE, Baseline};
use enclave::ingest::{IngestOptions, ingest};
use enclave::{DataDir, Error, Result};

/// Figures of one phase.
#[derive(Debug, Clone)]
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

/// Runs one phase. The plain baseline runs in this process (its peak RSS measured from a reset of the
/// high-water mark, `/proc/self/clear_refs`); ingest runs as the real `enclave ingest` command in a process
/// of its own, whose JSON report carries its time and peak memory.
fn run_phase(name: &str, input: &Path, out: &Path) -> Result<PhaseFigures> {
    if name == "plain" {
        // "5" resets VmHWM to the current RSS; where that is not possible the figure is the process's.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let started = Instant::now();
        let encoded = deidentify::baseline::encode_to_sink(
            input,
            &policies::CsvMapping::synthea(),
            enclave::storage::ROW_GROUP_ROWS,
            enclave::storage::ROW_GROUP_BYTES,
        )?;
        return Ok(PhaseFigures {
            rows: encoded.rows,
            observation_rows: encoded.per_table.get("observations").copied().unwrap_or(0),
            seconds: started.elapsed().as_secs_f64(),
            peak_rss_kib: enclave::ingest::peak_rss_kib(),
        });
    }
    let exe = std::env::current_exe().map_err(|e| Error::Io("current_exe".into(), e))?;
    let run = |args: &[&std::ffi::OsStr]| -> Result<String> {
        let output = std::process::Command::new(&exe)
            .args(args)
            .env_remove("ENCLAVE_MASTER_KEY_FILE")
            .env_remove("ENCLAVE_DATA_DIR")
            .output()
            .map_err(|e| Error::Io("enclave".into(), e))?;
        if !output.status.success() {
            return Err(Error::Internal(format!(
                "enclave {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    run(&[os("--data-dir"), out.as_os_str(), os("init")])?;
    let report: serde_json::Value = serde_json::from_str(&run(&[
        os("--data-dir"),
        out.as_os_str(),
        os("ingest"),
        os("--provider"),
        os(BENCH_PROVIDER),
        os("--dataset"),
        os("bench"),
        os("--input"),
        input.as_os_str(),
        os("--profile"),
        os("hipaa-safe-harbor"),
        os("--consent-scope"),
        os(BENCH_SCOPE),
        os("--json"),
    ])?)?;
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok(PhaseFigures {
        rows: u(&report["totals"]["rows_in"]),
        observation_rows: u(&report["tables"]["observations"]["rows_in"]),
        seconds: report["seconds"].as_f64().unwrap_or(f64::NAN),
        peak_rss_kib: u(&report["peak_rss_kib"]),
    })
}

/// The whole benchmark: generate, measure both phases at two sizes, print the figures.
pub fn ingest_bench(
    patients: usize,
    work_dir: Option<PathBuf>,
    runs: usize,
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
    out!(
        "enclave bench ingest: Synthea-style CSV, profile hipaa-safe-harbor; ingest runs as `enclave ingest` in its own process\n"
    );
    out!(
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
        let mut best: [Option<PhaseFigures>; 2] = [None, None];
        for _ in 0..runs.max(1) {
            for (slot, phase) in best.iter_mut().zip(["plain", "ingest"]) {
                let _ = std::fs::remove_dir_all(&plain_out);
                let _ = std::fs::remove_dir_all(&data);
                let figures = run_phase(
                    phase,
                    &input,
                    if phase == "plain" { &plain_out } else { &data },
                )?;
                if slot.as_ref().is_none_or(|b| figures.seconds < b.seconds) {
                    *slot = Some(figures);
                }
            }
        }
        let [Some(plain), Some(real)] = best else {
            return Err(Error::Internal("no run of the benchmark finished".into()));
        };
        let (pr, ir) = (
            plain.rows as f64 / plain.seconds,
            real.rows as f64 / real.seconds,
        );
        out!(
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
    out!(
        "\nratio = ingest rows/s ÷ plain rows/s (target ≥ 50 %), each the fastest of {runs} runs; MiB = peak RSS of that\n\
         phase; plain = the same readers\n\
         encoding every row as read into Parquet (Snappy) written to a sink: nothing is stored"
    );
    out!(
        "(ingest memory grows with the input up to its staging budget, {} MiB of de-identified rows held",
        enclave::ingest::DEFAULT_STAGE_MEMORY >> 20
    );
    out!(
        " between the passes (`--stage-memory-mib`; past it the largest tables are staged as encrypted scratch"
    );
    out!(
        " files), then stays flat: rows stream in batches of 8192 and row groups of at most {} rows or {} MiB; what grows is the",
        enclave::storage::ROW_GROUP_ROWS,
        enclave::storage::ROW_GROUP_BYTES >> 20
    );
    out!(
        " per-patient index, ~100 bytes a patient: pseudonym, date shift, flags, hashed source ID; the known"
    );
    out!(" identifiers the scrubber needs wait in an encrypted spill file)");
    Ok(())
}

// ---- enclave bench dp ----------------------------------------------------------------------------------

/// One benchmark query as principal `bench`, ε = 1.
fn answer_at_epsilon_1(
    rt: &tokio::runtime::Runtime,
    engine: &enclave::dp::DpEngine,
    dataset: &str,
    sql: &str,
) -> Result<enclave::dp::DpAnswer> {
    rt.block_on(engine.answer(
        "bench",
        dataset,
        sql,
        &enclave::dp::QueryOptions {
            epsilon: Some(1.0),
            delta: None,
            via: enclave::audit::Via::local("bench"),
            ..Default::default()
        },
    ))
}

/// The median of some durations, in seconds.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `enclave bench dp`: plain DataFusion over the same encrypted files (decrypting, as the engine does) against the whole DP path
/// (decrypt, bound, aggregate, noise, ledger, audit), and the enclave against SmartNoise SQL.
pub fn dp_bench(
    patients: usize,
    work_dir: Option<PathBuf>,
    runs: usize,
    smartnoise: bool,
    today: chrono::NaiveDate,
) -> Result<()> {
    let work = work_dir.unwrap_or_else(|| std::env::temp_dir().join("enclave-bench-dp"));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("runtime".into(), e))?;
    let export = work.join(format!("export-{patients}"));
    if !export.join("manifest.json").exists() {
        out!("generating {patients} patients …");
        crate::demo::generate(&DemoOptions {
            patients,
            out: export.clone(),
            format: DemoFormat::Csv,
            seed: 7,
            inject_errors: 0.0,
            today,
        })?;
    }
    let dir = DataDir::new(work.join(format!("data-{patients}")));
    let keystore;
    if !dir.db().exists() {
        dir.init()?;
        keystore = dir.keystore()?;
        out!("ingesting …");
        let r = ingest(
            &dir,
            &keystore,
            &dir.catalog()?,
            &IngestOptions {
                consent_scope: BENCH_SCOPE.into(),
                progress: true,
                ..IngestOptions::new(
                    BENCH_PROVIDER,
                    "bench",
                    export.join("csv"),
                    "hipaa-safe-harbor",
                )
            },
        )?;
        out!("{}", r.summary());
    } else {
        keystore = dir.keystore()?;
    }
    drop(keystore);
    let engine = enclave::dp::DpEngine::open(&dir)?;
    let version = dir.catalog()?.version("bench", None)?;
    engine
        .ledger()
        .set_budget("bench", "bench", "bench", 1e6, 0.5, None)?;
    let rows: u64 = version
        .version
        .tables
        .iter()
        .filter(|t| t.name == "observations")
        .map(|t| t.rows)
        .sum();
    let k = f64::from(version.version.max_contributions);
    // The first query of a version builds the per-person contribution index of the tables it reads.
    let t0 = Instant::now();
    answer_at_epsilon_1(
        &rt,
        &engine,
        "bench",
        "SELECT COUNT(*) FROM observations o JOIN patients p ON p.person_id = o.person_id",
    )?;
    out!(
        "\nfirst DP query of the version, building the per-person contribution index of observations and patients (once per version): {:.3} s",
        t0.elapsed().as_secs_f64()
    );
    out!(
        "\nplain DataFusion vs the DP engine, {rows} observation rows, median of {runs} runs, ε = 1 per query\n"
    );
    out!(
        "{:<34} {:>10} {:>10} {:>7}",
        "query",
        "plain s",
        "DP s",
        "ratio"
    );
    let clamp = "CASE WHEN value_numeric < 0.0 THEN 0.0 WHEN value_numeric > 1000.0 THEN 1000.0 ELSE value_numeric END";
    let queries = [
        ("grouped COUNT", "SELECT category, COUNT(*) AS n FROM observations GROUP BY category".to_owned(), "SELECT category, COUNT(*) AS n FROM observations GROUP BY category".to_owned(), 0.0),
        (
            "grouped AVG with clamping",
            "SELECT category, AVG(value_numeric) AS v FROM observations GROUP BY category".to_owned(),
            format!("SELECT category, AVG({clamp}) AS v FROM observations GROUP BY category"),
            1000.0,
        ),
        (
            "grouped COUNT with WHERE",
            "SELECT category, COUNT(*) AS n FROM observations WHERE value_numeric > 100.0 GROUP BY category".to_owned(),
            "SELECT category, COUNT(*) AS n FROM observations WHERE value_numeric > 100.0 GROUP BY category".to_owned(),
            0.0,
        ),
        (
            "two-table join",
            "SELECT p.gender, COUNT(*) AS n FROM observations o JOIN patients p ON p.person_id = o.person_id GROUP BY p.gender".to_owned(),
            "SELECT p.gender, COUNT(*) AS n FROM observations o JOIN patients p ON p.person_id = o.person_id GROUP BY p.gender".to_owned(),
            0.0,
        ),
    ];
    let mut scale_lines = Vec::new();
    for (name, dp_sql, plain_sql, bound) in &queries {
        let plain_times: Vec<f64> = (0..runs)
            .map(|_| {
                rt.block_on(async {
                    let t0 = Instant::now();
                    let baseline = Baseline::open(&dir, "bench").await?;
                    let ctx = baseline.context();
                    ctx.sql(plain_sql).await?.collect().await?;
                    Ok::<f64, Error>(t0.elapsed().as_secs_f64())
                })
            })
            .collect::<Result<_>>()?;
        let mut last = None;
        let mut dp_times = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            let a = answer_at_epsilon_1(&rt, &engine, "bench", dp_sql)?;
            dp_times.push(t0.elapsed().as_secs_f64());
            last = Some(a);
        }
        let (p, d) = (median(plain_times), median(dp_times));
        out!("{name:<34} {p:>10.3} {d:>10.3} {:>6.2}×", d / p);
        if let Some(a) = last {
            for (what, n) in &a.cost_split {
                // The formula, from first principles: Laplace b = Δ / ε for the ε this mechanism was
                // charged, with Δ from k and the bounds [0, M]: k for counts, k·M for a SUM, k·M/2 for
                // AVG's sum (taken of values centred on M/2); the truncation estimate's rows left out
                // 3k, its rows 4k.
                let delta = if what == "truncation (rows left out)" {
                    3.0 * k
                } else if what == "truncation (rows)" {
                    4.0 * k
                } else if what.ends_with("(sum)") {
                    k * bound / 2.0
                } else if what.starts_with("sum") {
                    k * bound
                } else {
                    k
                };
                scale_lines.push(format!(
                    "{name:<28} {what:<34} {:>8.4} {:>12.3} {:>12.3}",
                    n.epsilon,
                    n.scale,
                    delta / n.epsilon
                ));
            }
        }
    }
    out!("\ndeclared noise scale beside the Laplace formula Δ/ε for each mechanism (k = {k}):");
    out!(
        "{:<28} {:<34} {:>8} {:>12} {:>12}",
        "query",
        "mechanism",
        "ε",
        "declared b",
        "formula b"
    );
    for l in scale_lines {
        out!("{l}");
    }
    if smartnoise {
        smartnoise_comparison(&work, runs.max(20), &rt)?;
    }
    Ok(())
}

const DEPARTMENTS: [&str; 8] = [
    "Cardiology",
    "Emergency",
    "General Medicine",
    "Obstetrics",
    "Oncology",
    "Orthopedics",
    "Pediatrics",
    "Psychiatry",
];

/// Grouped COUNT(*) + AVG(length of stay) by department on 100k encounters of 20k patients (5 each, so the
/// bound of 5 rows per person keeps every row), ε = 1 in total, through the enclave and SmartNoise SQL.
fn smartnoise_comparison(work: &Path, runs: usize, rt: &tokio::runtime::Runtime) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let dir_export = work.join("sn-export");
    std::fs::create_dir_all(&dir_export).map_err(|e| Error::io(&dir_export, e))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (mut patients, mut encounters) = (
        String::from("Id,BIRTHDATE,GENDER,FIRST,LAST,ZIP\n"),
        String::from("Id,START,STOP,PATIENT,DEPARTMENT,ENCOUNTERCLASS\n"),
    );
    let mut sn_csv = String::from("person_id,department,los\n");
    let mut truth: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let base = chrono::NaiveDate::from_ymd_opt(2024, 1, 1)
        .and_then(|d| d.and_hms_opt(8, 0, 0))
        .unwrap_or_default();
    for p in 0..20_000 {
        patients += &format!(
            "p{p},{}-0{}-1{},{},N{p},F{p},02139\n",
            1930 + p % 90,
            1 + p % 9,
            p % 10,
            if p % 2 == 0 { "F" } else { "M" }
        );
        for e in 0..5 {
            let dept = DEPARTMENTS[rng.random_range(0..8)];
            let los: f64 = (-3.0 * rng.random_range(1e-9..1.0f64).ln()).min(40.0);
            let los = (los * 24.0).round() / 24.0;
            let start = base + chrono::Duration::days(rng.random_range(0..700));
            let stop = start + chrono::Duration::hours((los * 24.0) as i64);
            encounters += &format!(
                "e{p}-{e},{},{},p{p},{dept},inpatient\n",
                start.format("%Y-%m-%dT%H:%M:%SZ"),
                stop.format("%Y-%m-%dT%H:%M:%SZ")
            );
            sn_csv += &format!("p{p},{dept},{los}\n");
            let t = truth.entry(dept).or_default();
            t.0 += 1.0;
            t.1 += los.min(30.0);
        }
    }
    std::fs::write(dir_export.join("patients.csv"), patients)
        .map_err(|e| Error::io(&dir_export, e))?;
    std::fs::write(dir_export.join("encounters.csv"), encounters)
        .map_err(|e| Error::io(&dir_export, e))?;
    std::fs::write(work.join("sn-encounters.csv"), sn_csv).map_err(|e| Error::io(work, e))?;
    let profile = work.join("bench-profile.toml");
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor")
        .ok_or_else(|| Error::Internal("builtin profile".into()))?;
    std::fs::write(
        &profile,
        text.replace("max_contributions = 10", "max_contributions = 5"),
    )
    .map_err(|e| Error::io(&profile, e))?;
    let dir = DataDir::new(work.join("sn-data"));
    let _ = std::fs::remove_dir_all(dir.root());
    dir.init()?;
    ingest(
        &dir,
        &dir.keystore()?,
        &dir.catalog()?,
        &IngestOptions {
            consent_scope: BENCH_SCOPE.into(),
            ..IngestOptions::new(
                BENCH_PROVIDER,
                "sn",
                dir_export,
                &profile.display().to_string(),
            )
        },
    )?;
    let engine = enclave::dp::DpEngine::open(&dir)?;
    engine
        .ledger()
        .set_budget("bench", "bench", "sn", 1e6, 0.5, None)?;
    let sql = "SELECT department, COUNT(*) AS n, AVG(length_of_stay_days) AS los FROM encounters GROUP BY department";
    let (mut ours, mut times) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = Instant::now();
        let a = answer_at_epsilon_1(rt, &engine, "sn", sql)?;
        times.push(t0.elapsed().as_secs_f64());
        let depts = arrow::compute::cast(a.batch.column(0), &arrow::datatypes::DataType::Utf8)?;
        let depts = depts
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| Error::Internal("utf8".into()))?;
        let nums = |i: usize| -> Result<Vec<f64>> {
            let c = arrow::compute::cast(a.batch.column(i), &arrow::datatypes::DataType::Float64)?;
            Ok(c.as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .map(|f| f.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
                .unwrap_or_default())
        };
        let (n, los) = (nums(1)?, nums(2)?);
        ours.push(
            (0..a.batch.num_rows())
                .map(|r| (depts.value(r).to_owned(), (n[r], los[r])))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    let venv = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache/enclave-bench-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        out!(
            "\ncreating {} and installing smartnoise-sql …",
            venv.display()
        );
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "smartnoise-sql", "pandas"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            return Err(Error::Config(
                "could not install smartnoise-sql into the benchmark venv".into(),
            ));
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/smartnoise_compare.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([
            "--csv",
            &work.join("sn-encounters.csv").display().to_string(),
            "--metadata",
            &work.join("sn-meta.yaml").display().to_string(),
        ])
        .args([
            "--epsilon",
            "1.0",
            "--max-ids",
            "5",
            "--upper",
            "30",
            "--runs",
            &runs.to_string(),
        ])
        .output()
        .map_err(|e| Error::Io("smartnoise".into(), e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "smartnoise script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let sn: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sn_times: Vec<f64> = sn["times"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default();
    let (ours_t, sn_t) = (median(times), median(sn_times));
    out!(
        "\nCOUNT(*) + AVG(length of stay) by department: 100,000 encounters, 20,000 patients, ≤ 5 rows each, ε = 1 in total, {runs} runs"
    );
    out!(
        "median time per query: enclave {:.3} s, SmartNoise SQL {:.3} s ({:.1}× faster); SmartNoise reports ε = {:.3}",
        ours_t,
        sn_t,
        sn_t / ours_t,
        sn["epsilon"].as_f64().unwrap_or(f64::NAN)
    );
    out!(
        "\n{:<18} {:>7} {:>9} {:>9} {:>9} {:>9} | {:>6} {:>8} {:>8} {:>8} {:>8}",
        "department",
        "true n",
        "ours bias",
        "ours sd",
        "SN bias",
        "SN sd",
        "los",
        "ours b",
        "ours sd",
        "SN b",
        "SN sd"
    );
    let stats = |xs: Vec<f64>, truth: f64| {
        let xs: Vec<f64> = xs.into_iter().filter(|x| x.is_finite()).collect();
        let m = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let sd =
            (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len().max(2) - 1) as f64).sqrt();
        (m - truth, sd)
    };
    for (dept, (n, sum)) in &truth {
        let mean = sum / n;
        let pick = |v: &[BTreeMap<String, (f64, f64)>], f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
            v.iter().filter_map(|m| m.get(*dept).map(f)).collect()
        };
        let sn_rows: Vec<BTreeMap<String, (f64, f64)>> = sn["answers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        m.as_object()
                            .map(|o| {
                                o.iter()
                                    .map(|(k, v)| {
                                        (
                                            k.clone(),
                                            (
                                                v["n"].as_f64().unwrap_or(f64::NAN),
                                                v["los"].as_f64().unwrap_or(f64::NAN),
                                            ),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (ob, os) = stats(pick(&ours, |x| x.0), *n);
        let (sb, ss) = stats(pick(&sn_rows, |x| x.0), *n);
        let (lb, ls) = stats(pick(&ours, |x| x.1), mean);
        let (slb, sls) = stats(pick(&sn_rows, |x| x.1), mean);
        out!(
            "{dept:<18} {n:>7.0} {ob:>9.2} {os:>9.2} {sb:>9.2} {ss:>9.2} | {mean:>6.3} {lb:>8.3} {ls:>8.3} {slb:>8.3} {sls:>8.3}"
        );
    }
    Ok(())
}

// ---- enclave bench accuracy ----------------------------------------------------------------------------

/// Summary of one released figure's error over repeated runs, relative to a reference value.
struct ErrorStats {
    bias: f64,
    sd: f64,
    rmse: f64,
}

fn error_stats(values: &[f64], reference: f64) -> ErrorStats {
    let n = values.len().max(1) as f64;
    let errors: Vec<f64> = values.iter().map(|v| v - reference).collect();
    let bias = errors.iter().sum::<f64>() / n;
    let sd = (errors.iter().map(|e| (e - bias).powi(2)).sum::<f64>() / n).sqrt();
    let rmse = (errors.iter().map(|e| e * e).sum::<f64>() / n).sqrt();
    let scale = reference.abs().max(f64::MIN_POSITIVE);
    ErrorStats {
        bias: bias / scale,
        sd: sd / scale,
        rmse: rmse / scale,
    }
}

/// Writes the accuracy benchmark's export: 20,000 patients with a skewed number of encounters each (one
/// or two for most, dozens for a few; ~100,000 in all) and, for the first 2,000, ~60 observations each.
pub(crate) fn accuracy_export(dir: &Path) -> Result<()> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    let mut patients = String::from("Id,BIRTHDATE,GENDER,FIRST,LAST,ZIP\n");
    let mut encounters = String::from("Id,START,STOP,PATIENT,DEPARTMENT,ENCOUNTERCLASS\n");
    let mut observations =
        String::from("DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n");
    let base = chrono::NaiveDate::from_ymd_opt(2024, 1, 1)
        .and_then(|d| d.and_hms_opt(8, 0, 0))
        .unwrap_or_default();
    for p in 0..20_000 {
        patients += &format!(
            "p{p},{}-0{}-1{},{},N{p},F{p},02139\n",
            1930 + p % 90,
            1 + p % 9,
            p % 10,
            if p % 2 == 0 { "F" } else { "M" }
        );
        // Skewed: a geometric count with mean ~5 (most patients have one to three encounters).
        let n = 1
            + (-4.0 * rng.random_range(1e-9..1.0f64).ln())
                .floor()
                .min(80.0) as usize;
        for e in 0..n {
            let dept = DEPARTMENTS[rng.random_range(0..8)];
            let los: f64 = (-3.0 * rng.random_range(1e-9..1.0f64).ln()).min(40.0);
            let start = base + chrono::Duration::days(rng.random_range(0..700));
            let stop = start + chrono::Duration::hours((los * 24.0) as i64);
            encounters += &format!(
                "e{p}-{e},{},{},p{p},{dept},inpatient\n",
                start.format("%Y-%m-%dT%H:%M:%SZ"),
                stop.format("%Y-%m-%dT%H:%M:%SZ")
            );
        }
        if p < 2_000 {
            for _ in 0..rng.random_range(30..91) {
                observations += &format!(
                    "2024-01-01T10:00:00Z,p{p},e{p}-0,laboratory,2339-0,Glucose,{},mg/dL,numeric\n",
                    rng.random_range(60..200)
                );
            }
        }
    }
    for (name, text) in [
        ("patients.csv", patients),
        ("encounters.csv", encounters),
        ("observations.csv", observations),
    ] {
        std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Reference figures computed from the decrypted rows with plain DataFusion: per group key (or `""`),
/// the true value and the value after bounding each person to `k` rows by weight.
async fn accuracy_reference(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> Result<BTreeMap<String, f64>> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let mut out = BTreeMap::new();
    for b in &batches {
        let keys = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let keys = keys
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| Error::Internal("utf8".into()))?;
        let vals = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Float64)?;
        let vals = vals
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .ok_or_else(|| Error::Internal("f64".into()))?;
        for r in 0..b.num_rows() {
            out.insert(keys.value(r).to_owned(), vals.value(r));
        }
    }
    Ok(out)
}

/// `enclave bench accuracy`: how far DP answers land from the true value and from the bounded value
/// (each person cut to k rows' worth), for a grouped COUNT and AVG over ~100k encounters of 20k patients
/// with a skewed number of rows each, and COUNT(*) over a table with ~60 rows per person, at ε = 1.
pub fn accuracy_bench(work_dir: Option<PathBuf>, runs: usize) -> Result<()> {
    let work = work_dir.unwrap_or_else(|| std::env::temp_dir().join("enclave-bench-accuracy"));
    let export = work.join("export");
    if !export.join("patients.csv").exists() {
        out!("generating the skewed export …");
        accuracy_export(&export)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("runtime".into(), e))?;
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor")
        .ok_or_else(|| Error::Internal("builtin profile".into()))?;
    out!(
        "\nDP answers at ε = 1 against the true value and against the bounded value, {runs} runs; relative to the reference\n"
    );
    out!(
        "{:<44} {:>4} {:>10} {:>10} | {:>10} {:>10} {:>10}",
        "figure",
        "k",
        "bias/true",
        "RMSE/true",
        "bias/bnd",
        "sd/bnd",
        "RMSE/bnd"
    );
    // Fixed bounds, then bounds chosen from the data under DP (the 99th percentile of rows per person,
    // ε = 0.1 per table from the catalog budget).
    for fixed in [Some(5u32), Some(10), Some(20), Some(60), None] {
        let label = fixed.map_or("dp".to_owned(), |k| k.to_string());
        let dir = DataDir::new(work.join(format!("data-k{label}")));
        if !dir.db().exists() {
            let profile = work.join(format!("profile-k{label}.toml"));
            let dp = match fixed {
                Some(k) => format!("max_contributions = {k}"),
                None => "max_contributions = 10\nbound_quantile = 0.99\nbound_epsilon = 0.1".into(),
            };
            std::fs::write(&profile, text.replace("max_contributions = 10", &dp))
                .map_err(|e| Error::io(&profile, e))?;
            dir.init()?;
            ingest(
                &dir,
                &dir.keystore()?,
                &dir.catalog()?,
                &IngestOptions {
                    consent_scope: BENCH_SCOPE.into(),
                    ..IngestOptions::new(
                        BENCH_PROVIDER,
                        "acc",
                        &export,
                        &profile.display().to_string(),
                    )
                },
            )?;
        }
        let version = dir.catalog()?.version("acc", None)?;
        let bound_of = |table: &str| version.version.contribution_bound(table);
        // The same figures computed exactly, and bounded by weight as the engine bounds them.
        let references = rt.block_on(async {
            let baseline = Baseline::open(&dir, "acc").await?;
            let ctx = baseline.context();
            let weighted = |table: &str, kf: u32| {
                let kf = f64::from(kf);
                format!(
                    "(SELECT *, CASE WHEN n <= {kf} THEN 1.0 ELSE {kf} / n END AS w FROM {table} \
                     JOIN (SELECT person_id AS pid, CAST(COUNT(*) AS DOUBLE) AS n FROM {table} GROUP BY person_id) c \
                     ON person_id = pid)"
                )
            };
            let los = "CASE WHEN length_of_stay_days > 30.0 THEN 30.0 ELSE length_of_stay_days END";
            let e = weighted("encounters", bound_of("encounters"));
            let em = weighted("encounters", version.version.mean_bound("encounters"));
            let o = weighted("observations", bound_of("observations"));
            Ok::<_, Error>([
                (
                    "COUNT(*) by department",
                    accuracy_reference(ctx, "SELECT department, COUNT(*) FROM encounters GROUP BY department").await?,
                    accuracy_reference(ctx, &format!("SELECT department, SUM(w) FROM {e} AS x GROUP BY department")).await?,
                ),
                (
                    "AVG(length_of_stay_days) by department",
                    accuracy_reference(ctx, &format!("SELECT department, AVG({los}) FROM encounters GROUP BY department")).await?,
                    accuracy_reference(ctx, &format!("SELECT department, SUM(w * {los}) / SUM(w) FROM {em} AS x GROUP BY department")).await?,
                ),
                (
                    "COUNT(*) of observations (~60 per person)",
                    accuracy_reference(ctx, "SELECT '', COUNT(*) FROM observations").await?,
                    accuracy_reference(ctx, &format!("SELECT '', SUM(w) FROM {o} AS x")).await?,
                ),
            ])
        })?;
        let engine = enclave::dp::DpEngine::open(&dir)?;
        engine
            .ledger()
            .set_budget("bench", "bench", "acc", 1e6, 0.5, None)?;
        let queries = [
            "SELECT department, COUNT(*) AS v FROM encounters GROUP BY department",
            "SELECT department, AVG(length_of_stay_days) AS v FROM encounters GROUP BY department",
            "SELECT '' AS g, COUNT(*) AS v FROM observations",
        ];
        let tables = ["encounters", "encounters", "observations"];
        for (((name, truth, bounded), sql), table) in references.iter().zip(queries).zip(tables) {
            let k = if sql.contains("AVG") {
                version.version.mean_bound(table)
            } else {
                bound_of(table)
            };
            let k = if fixed.is_some() {
                k.to_string()
            } else {
                format!("{k}*")
            };
            let mut released: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for _ in 0..runs {
                let sql = sql.replace("SELECT '' AS g, ", "SELECT ");
                let a = answer_at_epsilon_1(&rt, &engine, "acc", &sql)?;
                let grouped = a.batch.num_columns() == 2;
                let vals = arrow::compute::cast(
                    a.batch.column(a.batch.num_columns() - 1),
                    &arrow::datatypes::DataType::Float64,
                )?;
                let vals = vals
                    .as_any()
                    .downcast_ref::<arrow::array::Float64Array>()
                    .ok_or_else(|| Error::Internal("f64".into()))?
                    .clone();
                let keys = if grouped {
                    let k =
                        arrow::compute::cast(a.batch.column(0), &arrow::datatypes::DataType::Utf8)?;
                    let k = k
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .ok_or_else(|| Error::Internal("utf8".into()))?
                        .clone();
                    (0..arrow::array::Array::len(&k))
                        .map(|r| k.value(r).to_owned())
                        .collect()
                } else {
                    vec![String::new()]
                };
                for (r, key) in keys.into_iter().enumerate() {
                    released.entry(key).or_default().push(vals.value(r));
                }
            }
            // Averaged over the groups (each group's error relative to its own reference).
            let mut sums = [0.0f64; 5];
            let mut groups = 0.0f64;
            for (key, values) in &released {
                let (Some(t), Some(b)) = (truth.get(key), bounded.get(key)) else {
                    continue;
                };
                let (vt, vb) = (error_stats(values, *t), error_stats(values, *b));
                for (s, x) in sums
                    .iter_mut()
                    .zip([vt.bias, vt.rmse, vb.bias, vb.sd, vb.rmse])
                {
                    *s += x;
                }
                groups += 1.0;
            }
            let [bt, rt_, bb, sb, rb] = sums.map(|s| 100.0 * s / groups.max(1.0));
            out!("{name:<44} {k:>4} {bt:>9.2}% {rt_:>9.2}% | {bb:>9.2}% {sb:>9.2}% {rb:>9.2}%");
        }
    }
    out!(
        "\nbias/true is the truncation: each person counts for at most k rows' worth. k* = the bound chosen from the\n\
         data under DP at ingest (99th percentile of rows per person, ε = 0.1 per table, from the catalog budget);\n\
         means (AVG) use the smaller of it and the dataset's max_contributions (10)."
    );
    Ok(())
}
