//! The DP engine's guarantees, measured: noise matches its declared scale and intervals cover at their
//! stated rate; one person moves no released value by more than the declared sensitivity; concurrent
//! queries never overspend and every one is audited.

use std::path::Path;
use std::sync::Arc;

use enclave::DataDir;
use enclave::dp::{DpAnswer, DpEngine, QueryOptions};
use enclave::ingest::{IngestOptions, ingest};
use proptest::prelude::*;

/// Writes a Synthea-layout export: `values[p]` are person p's glucose observations.
fn export(dir: &Path, values: &[Vec<f64>]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut patients = String::from("Id,BIRTHDATE,GENDER,FIRST,LAST,ZIP\n");
    let mut obs =
        String::from("DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n");
    for (p, vs) in values.iter().enumerate() {
        patients += &format!("p{p},1980-01-{:02},F,Name{p},Family{p},02139\n", 1 + p % 28);
        for (i, v) in vs.iter().enumerate() {
            let category = if i % 2 == 0 {
                "laboratory"
            } else {
                "vital-signs"
            };
            obs += &format!(
                "2024-01-01T10:00:00Z,p{p},e{p},{category},2339-0,Glucose,{v},mg/dL,numeric\n"
            );
        }
    }
    std::fs::write(dir.join("patients.csv"), patients).expect("write");
    std::fs::write(dir.join("observations.csv"), obs).expect("write");
}

fn ingest_as(dir: &DataDir, dataset: &str, input: &Path) {
    ingest_with_profile(dir, dataset, input, "hipaa-safe-harbor");
}

fn ingest_with_profile(dir: &DataDir, dataset: &str, input: &Path, profile: &str) {
    let opts = IngestOptions {
        consent_scope: "test".into(),
        // Exact synthetic values: the answers are compared with figures computed from them.
        danger_keep_unique_values: true,
        ..IngestOptions::new("H1", dataset, input, profile)
    };
    let r = ingest(
        dir,
        &dir.keystore().expect("ks"),
        &dir.catalog().expect("catalog"),
        &opts,
    )
    .expect("ingest");
    assert_eq!(
        r.totals.suppressed + r.totals.quarantined,
        0,
        "every test person is released"
    );
}

fn column_f64(a: &DpAnswer, name: &str) -> Vec<f64> {
    let c = a.batch.column_by_name(name).expect("column");
    let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Float64).expect("cast");
    let f = c
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .expect("f64");
    f.iter().map(|v| v.unwrap_or(f64::NAN)).collect()
}

#[test]
fn noise_matches_its_declared_scale_and_intervals_cover_95_percent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..200).map(|p| vec![60.0 + f64::from(p % 90)]).collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "stats", &tmp.path().join("export"));
    let engine = DpEngine::open(&dir).expect("engine");
    engine
        .ledger()
        .set_budget("test", "alice", "stats", 1e6, 0.0, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // One row per person, so bounding keeps every row and the exact answers are known.
    let (true_n, true_sum) = (200.0, values.iter().flatten().sum::<f64>());
    // ε = 8 keeps the true SUM six noise sds above 0, so clipping released sums at 0 (their bounds are
    // non-negative) does not change the error distribution being measured.
    let options = QueryOptions {
        epsilon: Some(8.0),
        ..QueryOptions::default()
    };
    // 2,000 repetitions put the 10 % and 93–97 % margins about four standard errors out: not flaky.
    let reps = 2000;
    let (mut err_n, mut err_s, mut cover_n, mut cover_s) = (Vec::new(), Vec::new(), 0, 0);
    let mut declared = (0.0, 0.0);
    for _ in 0..reps {
        let a = rt
            .block_on(engine.answer(
                "alice",
                "stats",
                "SELECT COUNT(*) AS n, SUM(value_numeric) AS s FROM observations",
                &options,
            ))
            .expect("answer");
        let (n, s) = (column_f64(&a, "n")[0], column_f64(&a, "s")[0]);
        err_n.push(n - true_n);
        err_s.push(s - true_sum);
        let (in_n, in_s) = (&a.noise[0], &a.noise[1]);
        declared = (
            std::f64::consts::SQRT_2 * in_n.scale,
            std::f64::consts::SQRT_2 * in_s.scale,
        );
        cover_n += usize::from(in_n.intervals[0].0 <= true_n && true_n <= in_n.intervals[0].1);
        cover_s += usize::from(in_s.intervals[0].0 <= true_sum && true_sum <= in_s.intervals[0].1);
        assert!(
            (a.cost.epsilon - 8.0).abs() < 1e-9,
            "the query costs exactly its ε: {}",
            a.cost.epsilon
        );
    }
    let sd = |e: &[f64]| (e.iter().map(|x| x * x).sum::<f64>() / e.len() as f64).sqrt();
    let (sd_n, sd_s) = (sd(&err_n), sd(&err_s));
    let (cov_n, cov_s) = (cover_n as f64 / reps as f64, cover_s as f64 / reps as f64);
    println!(
        "COUNT: empirical sd {sd_n:.2} vs declared {:.2}; 95% intervals covered {:.1}%",
        declared.0,
        cov_n * 100.0
    );
    println!(
        "SUM:   empirical sd {sd_s:.0} vs declared {:.0}; 95% intervals covered {:.1}%",
        declared.1,
        cov_s * 100.0
    );
    assert!(
        (sd_n / declared.0 - 1.0).abs() <= 0.10,
        "COUNT sd {sd_n} vs {}",
        declared.0
    );
    assert!(
        (sd_s / declared.1 - 1.0).abs() <= 0.10,
        "SUM sd {sd_s} vs {}",
        declared.1
    );
    // COUNT's noise is integer (discrete Laplace): its ±1.96 sd interval covers P(|X| ≤ 7) ≈ 94.3 % at
    // this scale, not 95 %, so four standard errors below that is 92 % (93 % failed about one run in 150).
    assert!((0.92..=0.97).contains(&cov_n), "COUNT coverage {cov_n}");
    assert!((0.93..=0.97).contains(&cov_s), "SUM coverage {cov_s}");
    // Every answer above is audited.
    let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("pk");
    assert_eq!(
        engine.ledger().verify(pk.trim()).expect("verifies").records,
        reps as i64 + 1,
        "one grant and every answer"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    /// Adding one person with 1,000 rows (values far outside the bounds too) moves each released value
    /// by at most the sensitivity the engine declares for it. Noise off, through the `danger_` switch.
    #[test]
    fn one_person_moves_a_value_by_at_most_its_declared_sensitivity(
        others in proptest::collection::vec(proptest::collection::vec(-100.0f64..1500.0, 1..6), 10..30),
        heavy in proptest::collection::vec(-3000.0f64..9000.0, 1000),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut with = others.clone();
        with.push(heavy);
        export(&tmp.path().join("without"), &others);
        export(&tmp.path().join("with"), &with);
        let dir = DataDir::new(tmp.path().join("data"));
        dir.init().expect("init");
        ingest_as(&dir, "without", &tmp.path().join("without"));
        ingest_as(&dir, "with", &tmp.path().join("with"));
        let engine = DpEngine::open(&dir).expect("engine").danger_without_noise();
        for d in ["with", "without"] {
            engine.ledger().set_budget("test", "alice", d, 1e6, 0.5, None).expect("budget");
        }
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        for sql in [
            "SELECT COUNT(*) AS n, SUM(value_numeric) AS s, COUNT(value_numeric) AS c, COUNT(DISTINCT person_id) AS p FROM observations",
            "SELECT category, COUNT(*) AS n, SUM(value_numeric) AS s FROM observations GROUP BY category",
            "SELECT category, COUNT(*) AS n, SUM(value_numeric) AS s FROM observations WHERE value_numeric > 50.0 GROUP BY category",
            "SELECT p.gender, COUNT(*) AS n FROM observations o JOIN patients p ON p.person_id = o.person_id GROUP BY p.gender",
        ] {
            let a = rt.block_on(engine.answer("alice", "with", sql, &QueryOptions::default())).expect("with");
            let b = rt.block_on(engine.answer("alice", "without", sql, &QueryOptions::default())).expect("without");
            prop_assert_eq!(a.batch.num_rows(), b.batch.num_rows());
            for n in &a.noise {
                // L1 distance over all released groups: the person's rows may sit in several groups.
                let moved: f64 = column_f64(&a, &n.column).iter().zip(column_f64(&b, &n.column)).map(|(x, y)| (x - y).abs()).sum();
                prop_assert!(n.sensitivity.is_finite() && n.sensitivity > 0.0, "{} declares a sensitivity", n.column);
                prop_assert!(moved <= n.sensitivity + 1e-6, "{}: moved {} > sensitivity {}", n.column, moved, n.sensitivity);
            }
        }
    }
}

/// Bounding by weight, checked against figures computed here from the export: each person's rows weigh
/// `min(1, k / n)` where `n` counts the person's rows in the query's relation (after WHERE, after joins),
/// whether `n` comes from the per-person index (no WHERE) or is counted per query (WHERE).
#[test]
fn each_person_weighs_at_most_k_rows_with_and_without_where() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Row counts around k = 10 (the profile's max_contributions), values inside the bounds and on the
    // profile's grid (2 significant digits), so ingest releases them unchanged.
    let values: Vec<Vec<f64>> = [1usize, 3, 9, 10, 11, 25, 400]
        .iter()
        .enumerate()
        .map(|(p, n)| {
            (0..*n)
                .map(|i| (20 + ((p * 7 + i * 13) % 30) * 10) as f64)
                .collect()
        })
        .collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "w", &tmp.path().join("export"));
    let engine = DpEngine::open(&dir).expect("engine").danger_without_noise();
    engine
        .ledger()
        .set_budget("test", "alice", "w", 1e6, 0.5, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ask = |sql: &str| {
        rt.block_on(engine.answer("alice", "w", sql, &QueryOptions::default()))
            .expect(sql)
    };
    let k = 10.0;
    // Expected weighted count and sum over the rows `keep` selects, per category (even rows: laboratory).
    let expected = |keep: &dyn Fn(f64) -> bool, category: Option<usize>| -> (f64, f64) {
        let (mut n, mut s) = (0.0, 0.0);
        for vs in &values {
            let kept: Vec<(usize, f64)> = vs
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, v)| keep(*v))
                .collect();
            let w = (k / kept.len().max(1) as f64).min(1.0);
            for (i, v) in kept {
                if category.is_none_or(|c| i % 2 == c) {
                    n += w;
                    s += w * v;
                }
            }
        }
        (n, s)
    };
    let all = ask("SELECT COUNT(*) AS n, SUM(value_numeric) AS s FROM observations");
    let (n, s) = expected(&|_| true, None);
    assert_eq!(column_f64(&all, "n"), vec![n.round()]);
    assert!((column_f64(&all, "s")[0] - s).abs() < 1e-6, "sum {s}");
    // The same relation through the per-query path gives the same figures.
    let filtered_all = ask(
        "SELECT COUNT(*) AS n, SUM(value_numeric) AS s FROM observations WHERE value_numeric >= 0.0",
    );
    assert_eq!(column_f64(&filtered_all, "n"), column_f64(&all, "n"));
    assert!((column_f64(&filtered_all, "s")[0] - s).abs() < 1e-6);
    // Per-query weights over (group, person) cells agree with the indexed row weights for every aggregate.
    for (agg, group) in [
        (
            "COUNT(value_numeric) AS c, AVG(value_numeric) AS a, STDDEV(value_numeric) AS s",
            "",
        ),
        (
            "COUNT(*) AS c, SUM(value_numeric) AS a, VARIANCE(value_numeric) AS s",
            " GROUP BY category HAVING category IN ('laboratory', 'vital-signs') ORDER BY category",
        ),
    ] {
        let cat = if group.is_empty() { "" } else { "category, " };
        let plain = ask(&format!("SELECT {cat}{agg} FROM observations{group}"));
        let filtered = ask(&format!(
            "SELECT {cat}{agg} FROM observations WHERE value_numeric >= 0.0{group}"
        ));
        for c in ["c", "a", "s"] {
            let (x, y) = (column_f64(&plain, c), column_f64(&filtered, c));
            assert_eq!(x.len(), y.len());
            for (x, y) in x.iter().zip(&y) {
                assert!(
                    (x - y).abs() < 1e-6 * x.abs().max(1.0),
                    "{agg}: {c} {x} vs {y}"
                );
            }
        }
    }
    // A WHERE changes who has how many rows: weights follow the rows left.
    let high = ask("SELECT COUNT(*) AS n FROM observations WHERE value_numeric > 200.0");
    assert_eq!(
        column_f64(&high, "n"),
        vec![expected(&|v| v > 200.0, None).0.round()]
    );
    // Groups: the person's weight is shared by the groups their rows fall in.
    let grouped = ask(
        "SELECT category, COUNT(*) AS n FROM observations GROUP BY category HAVING category IN ('laboratory', 'vital-signs') ORDER BY category",
    );
    assert_eq!(
        column_f64(&grouped, "n"),
        vec![
            expected(&|_| true, Some(0)).0.round(),
            expected(&|_| true, Some(1)).0.round()
        ]
    );
    // A join on person_id with one patient row each keeps the observation counts.
    let joined = ask(
        "SELECT COUNT(*) AS n FROM observations o JOIN patients p ON p.person_id = o.person_id",
    );
    assert_eq!(column_f64(&joined, "n"), vec![n.round()]);
    // An empty table indexes to an empty table.
    assert_eq!(
        column_f64(&ask("SELECT COUNT(*) AS n FROM notes"), "n"),
        vec![0.0]
    );
    // The index the unfiltered queries used is encrypted like every table.
    use catalog::CatalogStore;
    let version = dir
        .catalog()
        .expect("catalog")
        .version("w", None)
        .expect("version");
    let index = dir
        .root()
        .join(&version.version.storage_path)
        .join("contributions/k10/observations.parquet");
    let bytes = std::fs::read(&index).expect("index built");
    assert_eq!(&bytes[bytes.len() - 4..], b"PARE", "encrypted footer");
    // Published tables are in their final encoding, not the staged scratch one: compressed, with
    // statistics, and a dictionary where values repeat (codes) but not for mostly distinct text (IDs).
    let key = dir
        .keystore()
        .expect("keystore")
        .get(&version.version.key_id)
        .expect("data key");
    let decryption = parquet::encryption::decrypt::FileDecryptionProperties::builder(key.to_vec())
        .build()
        .expect("decryption");
    let table = dir
        .root()
        .join(&version.version.storage_path)
        .join("observations.parquet");
    let metadata =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new_with_options(
            std::fs::File::open(&table).expect("table"),
            parquet::arrow::arrow_reader::ArrowReaderOptions::new()
                .with_file_decryption_properties(decryption),
        )
        .expect("reader")
        .metadata()
        .clone();
    let group = metadata.row_group(0);
    let chunk = |name: &str| {
        group
            .columns()
            .iter()
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("column {name}"))
    };
    for name in ["person_id", "code", "value_numeric"] {
        let c = chunk(name);
        assert_eq!(
            c.compression(),
            parquet::basic::Compression::SNAPPY,
            "{name}"
        );
        assert!(c.statistics().is_some(), "{name} has statistics");
    }
    assert!(
        chunk("code").dictionary_page_offset().is_some(),
        "codes repeat"
    );
}

/// An answer whose rows bounding may have cut says how many it left out, estimated under DP and paid
/// from its ε: with noise off, the estimate is exactly the rows left out (each person counted up to 3k of
/// them) on every bounding path — indexed weights, per-query weights, sampling — and absent where ingest
/// enforced the bound.
#[test]
fn answers_state_how_many_rows_bounding_left_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let counts = [1usize, 3, 9, 10, 11, 25, 39, 40, 41, 400];
    let values: Vec<Vec<f64>> = counts
        .iter()
        .map(|n| (0..*n).map(|i| 20.0 + (i % 300) as f64).collect())
        .collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "t", &tmp.path().join("export"));
    let exact = DpEngine::open(&dir).expect("engine").danger_without_noise();
    exact
        .ledger()
        .set_budget("test", "alice", "t", 1e6, 0.5, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let options = QueryOptions {
        epsilon: Some(1.0),
        ..QueryOptions::default()
    };
    let ask = |engine: &DpEngine, sql: &str| {
        rt.block_on(engine.answer("alice", "t", sql, &options))
            .expect(sql)
    };
    // k = 10 (max_contributions); a person counts for up to 30 left-out rows and 40 rows.
    let left_out: f64 = counts
        .iter()
        .map(|n| (*n as f64 - 10.0).clamp(0.0, 30.0))
        .sum();
    let rows: f64 = counts.iter().map(|n| (*n as f64).min(40.0)).sum();
    for sql in [
        "SELECT COUNT(*) AS n FROM observations",
        "SELECT COUNT(*) AS n FROM observations WHERE value_numeric >= 0.0",
        "SELECT MEDIAN(value_numeric) AS n FROM observations",
        "SELECT units, COUNT(*) AS n FROM observations GROUP BY units",
        "SELECT COUNT(*) AS n FROM observations o JOIN patients p ON p.person_id = o.person_id",
    ] {
        let t = ask(&exact, sql).truncation.expect(sql);
        assert_eq!((t.rows_left_out, t.rows), (left_out, rows), "{sql}");
        assert!((t.share - left_out / rows).abs() < 1e-12 && t.cap_per_person == 30.0);
    }
    // A self-join: n² rows per person, k = 100, each person counted up to 300 left out and 400 rows.
    let t = ask(
        &exact,
        "SELECT COUNT(*) AS n FROM observations a JOIN observations b ON b.person_id = a.person_id",
    )
    .truncation
    .expect("self-join");
    let sq = |n: &usize| (*n * *n) as f64;
    assert_eq!(
        (t.rows_left_out, t.rows),
        (
            counts
                .iter()
                .map(|n| (sq(n) - 100.0).clamp(0.0, 300.0))
                .sum(),
            counts.iter().map(|n| sq(n).min(400.0)).sum()
        )
    );
    // patients has one row per person, enforced at ingest: nothing to estimate, nothing spent on it.
    let a = ask(&exact, "SELECT COUNT(*) AS n FROM patients");
    assert_eq!(a.truncation, None);
    assert!(
        a.cost_split
            .iter()
            .all(|(what, _)| !what.starts_with("truncation"))
    );
    // With noise, the estimate costs 5 % of the query's ε (half for each of its two sums), the
    // aggregates the rest, and the whole charge is still the query's ε.
    let noisy = DpEngine::open(&dir).expect("engine");
    let a = ask(&noisy, "SELECT COUNT(*) AS n FROM observations");
    let spent = |prefix: &str| -> f64 {
        a.cost_split
            .iter()
            .filter(|(what, _)| what.starts_with(prefix))
            .map(|(_, n)| n.epsilon)
            .sum()
    };
    assert!((spent("truncation") - 0.05).abs() < 1e-9);
    assert!((spent("n") - 0.95).abs() < 1e-9);
    assert!((a.cost.epsilon - 1.0).abs() < 1e-9);
    let t = a.truncation.expect("estimated");
    assert!((t.scale - 30.0 / 0.025).abs() < 1e-6, "scale {}", t.scale);
    assert!((0.0..=1.0).contains(&t.share));
}

#[test]
fn sixty_four_racing_queries_release_exactly_what_the_budget_fits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..30).map(|p| vec![f64::from(p); 3]).collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "race", &tmp.path().join("export"));
    DpEngine::open(&dir)
        .expect("engine")
        .ledger()
        .set_budget("test", "alice", "race", 1.0, 0.0, None)
        .expect("budget");
    let dir = Arc::new(dir);
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Each thread is its own engine with its own database connections, like separate gateways.
                let engine = DpEngine::open(&dir).expect("engine");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let options = QueryOptions {
                    epsilon: Some(0.1),
                    ..QueryOptions::default()
                };
                rt.block_on(engine.answer(
                    "alice",
                    "race",
                    "SELECT COUNT(*) FROM observations",
                    &options,
                ))
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let released = results.iter().filter(|r| r.is_ok()).count();
    let budget_refusals = results
        .iter()
        .filter(|r| matches!(r, Err(enclave::Error::Refused { rule, .. }) if *rule == enclave::dp::Rule::Budget))
        .count();
    assert_eq!((released, budget_refusals), (10, 54));
    let engine = DpEngine::open(&dir).expect("engine");
    let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("pk");
    let v = engine
        .ledger()
        .verify(pk.trim())
        .expect("the chain verifies");
    assert_eq!(v.records, 65, "one grant and 64 queries");
    let log = engine.ledger().tail(100).expect("tail");
    assert_eq!(log.iter().filter(|r| r.outcome == "released").count(), 10);
    assert_eq!(log.iter().filter(|r| r.outcome == "refused").count(), 54);
    let b = engine
        .ledger()
        .budget("alice", "race")
        .expect("b")
        .expect("some");
    assert!((b.spent_epsilon - 1.0).abs() < 1e-12 && b.spent_epsilon <= b.epsilon);
}

#[test]
fn a_zcdp_dataset_charges_rho_and_states_its_epsilon_delta_equivalent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..40).map(|p| vec![f64::from(p); 2]).collect();
    export(&tmp.path().join("export"), &values);
    let profile = tmp.path().join("zcdp.toml");
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor").expect("builtin");
    std::fs::write(
        &profile,
        text.replace(
            "max_contributions = 10",
            "max_contributions = 10\naccounting = \"zcdp\"",
        ),
    )
    .expect("write");
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_with_profile(
        &dir,
        "z",
        &tmp.path().join("export"),
        &profile.display().to_string(),
    );
    let engine = DpEngine::open(&dir).expect("engine");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let q = |sql: &str, rho: f64| {
        rt.block_on(engine.answer(
            "alice",
            "z",
            sql,
            &QueryOptions {
                epsilon: Some(rho),
                ..QueryOptions::default()
            },
        ))
    };

    engine
        .ledger()
        .set_budget("test", "alice", "z", 1.0, 1e-6, None)
        .expect("budget without ρ");
    let e = q("SELECT COUNT(*) FROM observations", 0.1).expect_err("no ρ budget");
    assert!(e.to_string().contains("accounted in ρ"), "{e}");

    engine
        .ledger()
        .set_budget("test", "alice", "z", 1.0, 1e-6, Some(0.25))
        .expect("ρ budget");
    let a = q("SELECT COUNT(*) AS n FROM observations", 0.1).expect("answer");
    assert!(
        (a.cost.rho - 0.1).abs() < 1e-12 && a.cost.epsilon == 0.0,
        "{:?}",
        a.cost
    );
    assert!(
        (a.noise[0].scale - 10.0 / (2.0f64 * 0.1 * 0.95).sqrt()).abs() < 1e-9,
        "Gaussian σ = k/√(2ρ) at 95 % of ρ (5 % estimates the truncation)"
    );
    let (eps, delta) = a.epsilon_delta_equivalent.expect("equivalent");
    assert!(
        (eps - (0.1 + 2.0 * (0.1f64 * (1.0 / 1e-6f64).ln()).sqrt())).abs() < 1e-9 && delta == 1e-6
    );
    assert!((a.budget.rho.expect("ρ") - a.budget.spent_rho - 0.15).abs() < 1e-12);

    let grouped = q(
        "SELECT category, COUNT(*) FROM observations GROUP BY category",
        0.1,
    )
    .expect("public domain");
    assert_eq!(grouped.batch.num_rows(), 9);
    // Keys without a public domain: Gaussian noise and threshold (approximate zCDP: ρ plus the δ of the
    // threshold, both charged). 80 rows under one code sit far below a threshold for ρ = 0.01.
    let private = q(
        "SELECT code, COUNT(*) FROM observations GROUP BY code",
        0.01,
    )
    .expect("private keys");
    assert!(private.batch.num_rows() <= 1);
    assert!(
        (private.cost.rho - 0.01).abs() < 1e-9
            && private.cost.delta > 0.0
            && private.cost.delta <= 1e-6,
        "{:?}",
        private.cost
    );
    // The ledger keeps pico-units.
    assert!((private.budget.spent_delta - private.cost.delta).abs() < 1e-11);
    // A quantile (the exponential mechanism, pure ε-DP) is charged in ρ too: ε-DP is ε²/2-zCDP.
    let median = q("SELECT MEDIAN(value_numeric) AS m FROM observations", 0.02).expect("median");
    assert!(
        median.cost.epsilon == 0.0 && (median.cost.rho - 0.02).abs() < 1e-9,
        "{:?}",
        median.cost
    );
    let e = q("SELECT COUNT(*) FROM observations", 0.1).expect_err("ρ exhausted");
    assert!(
        e.to_string().contains("rule 'budget'") && e.to_string().contains("ρ left"),
        "{e}"
    );
}

/// The attack the plan rewrite closes: a quoted alias holding SQL once replaced the bounded relation.
/// Now an alias is a name: with noise off, every spelling answers exactly what the plain query does.
#[test]
fn aliases_holding_sql_are_names_and_change_no_figure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..40)
        .map(|p| (0..(p % 7 + 1)).map(|i| f64::from(i * 10)).collect())
        .collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "a", &tmp.path().join("export"));
    let engine = DpEngine::open(&dir).expect("engine").danger_without_noise();
    engine
        .ledger()
        .set_budget("test", "alice", "a", 1e6, 0.5, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let figure = |sql: &str| -> f64 {
        let a = rt
            .block_on(engine.answer("alice", "a", sql, &QueryOptions::default()))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        column_f64(&a, "n")[0]
    };
    let plain = figure("SELECT COUNT(*) AS n FROM observations");
    assert!(plain > 0.0);
    for alias in [
        "\"x, (SELECT 1000000.0 AS __w) AS w\"",
        "\"o) AS __i) AS __b; SELECT 1 --\"",
        "\"e x\"",
        "\"'\"",
        "\"select\"",
    ] {
        let sql = format!("SELECT COUNT(*) AS n FROM observations AS {alias}");
        assert_eq!(figure(&sql), plain, "{sql}");
    }
    let filtered = figure("SELECT COUNT(*) AS n FROM observations WHERE value_numeric >= 0");
    let quoted = figure(
        "SELECT COUNT(*) AS n FROM observations AS \"w) --\" WHERE \"w) --\".value_numeric >= 0",
    );
    assert_eq!(filtered, quoted);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Any ε and δ a caller can send — NaN, ±∞, negative, zero, subnormal, huge — is answered or refused
    /// by rule 'options' or 'budget' before anything runs: never a panic, an internal error or a charge
    /// for a refused query.
    #[test]
    fn options_are_validated_at_the_boundary(
        epsilon in prop_oneof![
            Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), Just(0.0), Just(-0.0),
            Just(f64::MIN_POSITIVE), Just(5e-324), Just(1e-10), Just(f64::MAX), Just(1e7),
            -10.0f64..10.0, 1e-9f64..1e6,
        ],
        delta in proptest::option::of(prop_oneof![
            Just(f64::NAN), Just(0.0), Just(1.0), Just(-1e-6), Just(1e-300), Just(f64::INFINITY),
            0.0f64..1.0,
        ]),
        grouped in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let values: Vec<Vec<f64>> = (0..30).map(|p| vec![f64::from(p)]).collect();
        export(&tmp.path().join("export"), &values);
        let dir = DataDir::new(tmp.path().join("data"));
        dir.init().expect("init");
        ingest_as(&dir, "o", &tmp.path().join("export"));
        let engine = DpEngine::open(&dir).expect("engine");
        engine.ledger().set_budget("test", "alice", "o", 1e6, 0.5, None).expect("budget");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let sql = if grouped {
            "SELECT code, COUNT(*) AS n FROM observations GROUP BY code"
        } else {
            "SELECT COUNT(*) AS n, AVG(value_numeric) AS m FROM observations"
        };
        let options = QueryOptions { epsilon: Some(epsilon), delta, ..QueryOptions::default() };
        let before = engine.ledger().budget("alice", "o").expect("b").expect("some").spent_epsilon;
        match rt.block_on(engine.answer("alice", "o", sql, &options)) {
            Ok(a) => prop_assert!(a.cost.epsilon > 0.0 && a.cost.epsilon.is_finite()),
            Err(enclave::Error::Refused { rule, .. }) => {
                prop_assert!(
                    matches!(rule, enclave::dp::Rule::Options | enclave::dp::Rule::Budget),
                    "refused by {rule} for ε {epsilon}, δ {delta:?}"
                );
                let after = engine.ledger().budget("alice", "o").expect("b").expect("some").spent_epsilon;
                prop_assert_eq!(before, after);
            }
            Err(e) => prop_assert!(false, "ε {epsilon}, δ {delta:?}: {e}"),
        }
    }
}

/// Each table is bounded by its own rows per person: `patients` (one row per person, declared by the
/// profile) needs noise for one row, a table without a declared bound uses `max_contributions`, and a join
/// on `person_id` the product of its tables' bounds. The declared scale is Δ/ε for each.
#[test]
fn each_table_is_bounded_by_its_own_rows_per_person_and_a_join_by_the_product() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0u32..30)
        .map(|p| vec![f64::from(p); 1 + p as usize % 4])
        .collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "b", &tmp.path().join("export"));
    use catalog::CatalogStore as _;
    let version = dir
        .catalog()
        .expect("catalog")
        .version("b", None)
        .expect("version");
    let bound = |t: &str| {
        version
            .version
            .tables
            .iter()
            .find(|e| e.name == t)
            .expect("table")
            .max_rows_per_person
    };
    assert_eq!(
        bound("patients"),
        Some(1),
        "declared by the profile, kept in the catalog"
    );
    assert_eq!(bound("observations"), None);
    let engine = DpEngine::open(&dir).expect("engine");
    engine
        .ledger()
        .set_budget("test", "alice", "b", 1e6, 0.5, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let options = QueryOptions {
        epsilon: Some(1.0),
        ..QueryOptions::default()
    };
    for (sql, delta) in [
        ("SELECT COUNT(*) AS n FROM patients", 1.0),
        ("SELECT COUNT(*) AS n FROM patients WHERE gender = 'F'", 1.0),
        ("SELECT COUNT(*) AS n FROM observations", 10.0),
        (
            "SELECT COUNT(*) AS n FROM patients p JOIN observations o ON o.person_id = p.person_id",
            10.0,
        ),
        (
            "SELECT COUNT(*) AS n FROM observations a JOIN observations b ON b.person_id = a.person_id",
            100.0,
        ),
    ] {
        let a = rt
            .block_on(engine.answer("alice", "b", sql, &options))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let n = &a.noise[0];
        // observations' bound is not enforced at ingest: 5 % of ε estimates what bounding left out.
        let unenforced = sql.contains("observations");
        assert_eq!(a.truncation.is_some(), unenforced, "{sql}");
        let epsilon = if unenforced { 0.95 } else { 1.0 };
        assert!(
            (n.scale - delta / epsilon).abs() < 1e-9 && (n.sensitivity - delta).abs() < 1e-9,
            "{sql}: scale {} and sensitivity {}, expected Δ = {delta} at ε = 1",
            n.scale,
            n.sensitivity
        );
    }
}

/// A profile that leaves a table's bound open and asks for it to be chosen from the data: ingest releases
/// the 99th percentile of rows per person under DP, charges it to the dataset's `catalog` budget and
/// audits it before publishing, the catalog records how, and queries are bounded by it (here every
/// person keeps all their rows, so a count carries no truncation).
#[test]
fn open_bounds_are_chosen_from_the_data_under_dp_charged_and_recorded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 40 persons with 20 to 29 observations each.
    let values: Vec<Vec<f64>> = (0u32..40)
        .map(|p| vec![f64::from(p); 20 + p as usize % 10])
        .collect();
    export(&tmp.path().join("export"), &values);
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor").expect("profile");
    let profile = tmp.path().join("chosen.toml");
    std::fs::write(
        &profile,
        text.replace(
            "max_contributions = 10",
            "max_contributions = 10\nbound_quantile = 0.99\nbound_epsilon = 5.0",
        ),
    )
    .expect("profile");
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_with_profile(
        &dir,
        "c",
        &tmp.path().join("export"),
        &profile.display().to_string(),
    );
    use catalog::CatalogStore as _;
    let version = dir
        .catalog()
        .expect("catalog")
        .version("c", None)
        .expect("v");
    let table = |t: &str| {
        version
            .version
            .tables
            .iter()
            .find(|e| e.name == t)
            .expect("table")
            .clone()
    };
    let obs = table("observations");
    let bound = obs.max_rows_per_person.expect("chosen");
    assert!(
        (26..=40).contains(&bound),
        "p99 of 20…29 rows per person: {bound}"
    );
    assert_eq!(
        obs.chosen,
        Some(catalog::ChosenBound {
            quantile: 0.99,
            epsilon: 5.0
        })
    );
    assert_eq!(table("patients").max_rows_per_person, Some(1));
    assert_eq!(table("patients").chosen, None, "declared, not chosen");

    let engine = DpEngine::open(&dir).expect("engine");
    let catalog_budget = engine
        .ledger()
        .budget("catalog", "c")
        .expect("b")
        .expect("the catalog budget exists");
    let open_tables = version
        .version
        .tables
        .iter()
        .filter(|t| t.chosen.is_some())
        .count() as f64;
    assert!((catalog_budget.spent_epsilon - 5.0 * open_tables).abs() < 1e-9);
    assert_eq!(catalog_budget.epsilon, catalog_budget.spent_epsilon);
    let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("pk");
    engine
        .ledger()
        .verify(pk.trim())
        .expect("grant and charge verify");

    engine
        .ledger()
        .set_budget("test", "alice", "c", 1e6, 0.5, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let a = rt
        .block_on(engine.answer(
            "alice",
            "c",
            "SELECT COUNT(*) AS n FROM observations",
            &QueryOptions {
                epsilon: Some(1.0),
                ..QueryOptions::default()
            },
        ))
        .expect("answer");
    assert!((a.noise[0].scale - f64::from(bound) / 0.95).abs() < 1e-9);

    // Means use the smaller of the chosen bound and max_contributions (10): the centred sum of values in
    // [0, 1000] has sensitivity 10 · 500, its count 10, each at ε / 2.
    let a = rt
        .block_on(engine.answer(
            "alice",
            "c",
            "SELECT AVG(value_numeric) AS m, VARIANCE(value_numeric) AS v FROM observations",
            &QueryOptions {
                epsilon: Some(1.0),
                ..QueryOptions::default()
            },
        ))
        .expect("answer");
    // (95 % of ε: the bound was chosen, not enforced, so 5 % goes to the truncation estimate.)
    assert!((a.noise[0].scale - 10.0 * 500.0 / (0.95 / 4.0)).abs() < 1e-6);
    assert!((a.noise[1].scale - 10.0 * 500.0 * 500.0 / (0.95 / 6.0)).abs() < 1e-3);
    let count_scale = a
        .cost_split
        .iter()
        .find(|(what, _)| what == "m (count)")
        .map(|(_, n)| n.scale);
    assert_eq!(
        count_scale.map(|s| (s - 10.0 / (0.95 / 4.0)).abs() < 1e-9),
        Some(true)
    );
    // With noise off the mean is the bounded one: every person's 20 to 29 rows weigh 10 in all, so the
    // mean of the values (each person's value is their number p) is the mean of 0…39, not the row mean.
    let exact = DpEngine::open(&dir).expect("engine").danger_without_noise();
    let a = rt
        .block_on(exact.answer(
            "alice",
            "c",
            "SELECT AVG(value_numeric) AS m FROM observations",
            &QueryOptions::default(),
        ))
        .expect("answer");
    let m = column_f64(&a, "m")[0];
    assert!((m - 19.5).abs() < 1e-9, "bounded mean {m}");
}

/// VARIANCE and STDDEV come with delta-method intervals that cover the true value about 95 % of the time,
/// and quantiles state their error as ranks.
#[test]
fn variance_intervals_cover_about_95_percent_and_quantiles_state_their_rank_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..400).map(|p| vec![60.0 + f64::from(p % 90)]).collect();
    export(&tmp.path().join("export"), &values);
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor").expect("profile");
    let profile = tmp.path().join("one-row.toml");
    std::fs::write(
        &profile,
        text.replace(
            "rows_per_person = { patients = 1 }",
            "rows_per_person = { patients = 1, observations = 1 }",
        ),
    )
    .expect("profile");
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_with_profile(
        &dir,
        "v",
        &tmp.path().join("export"),
        &profile.display().to_string(),
    );
    let engine = DpEngine::open(&dir).expect("engine");
    engine
        .ledger()
        .set_budget("test", "alice", "v", 1e6, 0.0, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let xs: Vec<f64> = values.iter().flatten().copied().collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() as f64 - 1.0);
    let options = QueryOptions {
        epsilon: Some(40.0),
        ..QueryOptions::default()
    };
    let reps = 400;
    let (mut cover_v, mut cover_s) = (0, 0);
    for _ in 0..reps {
        let a = rt
            .block_on(engine.answer(
                "alice",
                "v",
                "SELECT VARIANCE(value_numeric) AS v, STDDEV(value_numeric) AS s FROM observations",
                &options,
            ))
            .expect("answer");
        let (v, s) = (a.noise[0].intervals[0], a.noise[1].intervals[0]);
        assert!(v.0 <= v.1 && s.0 <= s.1 && v.0 >= 0.0, "{v:?} {s:?}");
        cover_v += usize::from(v.0 <= var && var <= v.1);
        cover_s += usize::from(s.0 <= var.sqrt() && var.sqrt() <= s.1);
        assert!(a.noise[0].method.starts_with("approximate: delta method"));
    }
    let (cv, cs) = (
        cover_v as f64 / f64::from(reps),
        cover_s as f64 / f64::from(reps),
    );
    println!(
        "VARIANCE intervals covered {:.1}%, STDDEV {:.1}%",
        cv * 100.0,
        cs * 100.0
    );
    assert!((0.91..=0.99).contains(&cv), "VARIANCE coverage {cv}");
    assert!((0.91..=0.99).contains(&cs), "STDDEV coverage {cs}");

    let a = rt
        .block_on(engine.answer(
            "alice",
            "v",
            "SELECT MEDIAN(value_numeric) AS m FROM observations",
            &QueryOptions {
                epsilon: Some(1.0),
                ..QueryOptions::default()
            },
        ))
        .expect("answer");
    // 2 · k · max(α, 1 − α) / ε · ln(1001 / 0.05) with k = 1, α = ½, ε = 1: about 10 rows.
    let rank = (1001.0f64 / 0.05).ln();
    assert!(
        a.noise[0]
            .method
            .contains(&format!("within {rank:.0} rows")),
        "{}",
        a.noise[0].method
    );
}

/// `prepare` runs every check before execution and answers the answer's columns; it reads no table,
/// charges nothing and records nothing, and refuses as `answer` would.
#[test]
fn prepare_answers_the_columns_without_running_charging_or_recording() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..20).map(|p| vec![f64::from(p); 2]).collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, "p", &tmp.path().join("export"));
    let engine = DpEngine::open(&dir).expect("engine");
    engine
        .ledger()
        .set_budget("test", "alice", "p", 1.0, 0.0, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let options = QueryOptions {
        epsilon: Some(0.5),
        ..QueryOptions::default()
    };
    let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("pk");
    let records = || engine.ledger().verify(pk.trim()).expect("verifies").records;
    let before = records();
    let p = rt
        .block_on(engine.prepare(
            "alice",
            "p",
            "SELECT category, COUNT(*) AS n, AVG(value_numeric) / 2 AS half FROM observations GROUP BY category",
            &options,
        ))
        .expect("prepared");
    let names: Vec<&str> = p
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, ["category", "n", "half"]);
    assert!((p.cost.epsilon - 0.5).abs() < 1e-12);
    // Prepared twice more than the budget holds: nothing was charged.
    for _ in 0..3 {
        rt.block_on(engine.prepare("alice", "p", "SELECT COUNT(*) FROM observations", &options))
            .expect("prepared");
    }
    let budget = engine
        .ledger()
        .budget("alice", "p")
        .expect("b")
        .expect("grant");
    assert_eq!(budget.spent_epsilon, 0.0);
    let refusal = |principal: &str, sql: &str| {
        rt.block_on(engine.prepare(principal, "p", sql, &options))
            .expect_err(sql)
            .to_string()
    };
    assert!(refusal("mallory", "SELECT COUNT(*) FROM observations").contains("rule 'access'"));
    assert!(refusal("alice", "SELECT * FROM observations").contains("rule 'row-level'"));
    let e = refusal(
        "alice",
        "SELECT category, SUM(value_numeric) AS s FROM observations GROUP BY category HAVING SUM(value_numeric) > DATE '2020-01-01'",
    );
    assert!(
        e.contains("rule 'type'") || e.contains("rule 'post-processing'"),
        "{e}"
    );
    assert_eq!(records(), before, "prepare records nothing");
}

/// Fifty persons with one observation each in dataset `name`, alice granted ε 1 on it, and options that
/// spend ε 0.25 and release at most three rows.
fn row_limited(name: &str) -> (tempfile::TempDir, DpEngine, QueryOptions) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let values: Vec<Vec<f64>> = (0..50).map(|p| vec![f64::from(p)]).collect();
    export(&tmp.path().join("export"), &values);
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    ingest_as(&dir, name, &tmp.path().join("export"));
    let engine = DpEngine::open(&dir).expect("engine");
    engine
        .ledger()
        .set_budget("test", "alice", name, 1.0, 0.0, None)
        .expect("budget");
    let options = QueryOptions {
        epsilon: Some(0.25),
        max_groups: Some(3),
        ..QueryOptions::default()
    };
    (tmp, engine, options)
}

/// An answer with more rows than the caller's limit is refused after it was computed: its cost is
/// charged, and the audit record says which limit stopped it.
#[test]
fn an_answer_over_the_row_limit_is_refused_and_charged() {
    let (_tmp, engine, options) = row_limited("rows");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // category has a public domain of nine values: nine rows, over the limit of three.
    let sql = "SELECT category, COUNT(*) AS n FROM observations GROUP BY category";
    match rt.block_on(engine.answer("alice", "rows", sql, &options)) {
        Err(enclave::Error::Refused {
            rule: enclave::dp::Rule::Execution,
            message,
            receipt,
        }) => {
            assert!(message.contains("more than 3 rows"), "{message}");
            assert!(receipt.is_some(), "a charged failure has its receipt");
        }
        other => panic!("expected the row limit, got {other:?}"),
    }
    assert_charged_and_named(&engine, "rows", "more than 3 rows");
    engine
        .ledger()
        .verify(&engine.ledger().public_key_hex())
        .expect("verifies");
}

/// The query stopped by a limit was charged its ε 0.25 on `dataset`, and the last audit record is a
/// failure naming the limit (`needle`).
fn assert_charged_and_named(engine: &DpEngine, dataset: &str, needle: &str) {
    let budget = engine
        .ledger()
        .budget("alice", dataset)
        .expect("b")
        .expect("some");
    assert!(
        (budget.spent_epsilon - 0.25).abs() < 1e-9,
        "charged: {budget:?}"
    );
    let last = engine.ledger().tail(1).expect("tail").remove(0);
    assert_eq!(last.outcome, "failed");
    assert!(last.rule.contains(needle), "{}", last.rule);
}

/// A query that needs more memory than the engine's pool stops, is charged (it ran) and says which limit
/// stopped it; the engine answers the next query within the limit.
#[test]
fn a_query_past_the_memory_limit_is_stopped_charged_and_named() {
    let (tmp, _, options) = row_limited("memory");
    let options = QueryOptions {
        max_groups: None,
        ..options
    };
    let engine = DpEngine::open(&DataDir::new(tmp.path().join("data")))
        .expect("engine")
        .with_memory_limit(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sql = "SELECT category, COUNT(*) AS n FROM observations GROUP BY category";
    match rt.block_on(engine.answer("alice", "memory", sql, &options)) {
        Err(enclave::Error::Refused {
            rule: enclave::dp::Rule::Execution,
            message,
            ..
        }) => assert!(message.contains("more memory than the limit"), "{message}"),
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert_charged_and_named(&engine, "memory", "memory");
    let roomy = DpEngine::open(&DataDir::new(tmp.path().join("data")))
        .expect("engine")
        .with_memory_limit(256 * 1024 * 1024);
    rt.block_on(roomy.answer("alice", "memory", sql, &options))
        .expect("answered within the limit");
}

/// Queries running together hold their planned cost: those that do not fit are refused before they run,
/// and every one that ran and hit a limit is charged in full, never capped to nothing by the others.
#[test]
fn concurrent_queries_hold_their_cost_so_a_limit_hit_is_always_charged_in_full() {
    let (_tmp, engine, options) = row_limited("held");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sql = "SELECT category, COUNT(*) AS n FROM observations GROUP BY category";
    let outcomes = rt.block_on(async {
        let runs = (0..8).map(|_| engine.answer("alice", "held", sql, &options));
        futures::future::join_all(runs).await
    });
    let rules: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            Err(enclave::Error::Refused { rule, .. }) => rule.name().to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        rules.iter().filter(|r| *r == "execution").count(),
        4,
        "{rules:?}"
    );
    assert_eq!(
        rules.iter().filter(|r| *r == "budget").count(),
        4,
        "{rules:?}"
    );
    let records = engine.ledger().tail(20).expect("tail");
    let failed: Vec<_> = records.iter().filter(|r| r.outcome == "failed").collect();
    assert_eq!(failed.len(), 4);
    assert!(
        failed.iter().all(|r| r.cost_epsilon == 250_000_000_000),
        "each failed query is charged its whole ε: {failed:?}"
    );
    let budget = engine
        .ledger()
        .budget("alice", "held")
        .expect("b")
        .expect("some");
    assert!((budget.spent_epsilon - 1.0).abs() < 1e-9, "{budget:?}");
}
