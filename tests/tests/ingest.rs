//! End to end through the real binary: demo export → init → ingest → encrypted dataset → read back.
//!
//! One scratch enclave is built per test; the checks are those the ingest issue's "Done when" names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use chrono::NaiveDateTime;
use enclave_e2e::{
    Opened, Scratch, enclave_output, expected_person_ids, manifest, scan_bytes, shared_data,
    source_csv, to_rows,
};

/// Identifiers from the manifest, long enough that a chance match in ciphertext is impossible in practice.
/// `with_notes` adds the PHI planted in notes; without it, bare birth dates are left out too (in decrypted,
/// date-shifted tables another person's shifted date may coincide with one; the byte scan keeps them).
fn planted_needles(m: &serde_json::Value, with_notes: bool) -> Vec<String> {
    let mut set = BTreeSet::new();
    for id in m["identifiers"].as_array().expect("identifiers") {
        if with_notes || id["kind"] != "birth_date" {
            set.insert(id["value"].as_str().expect("value").to_owned());
        }
    }
    if with_notes {
        for n in m["notes"].as_array().expect("notes") {
            for p in n["planted"].as_array().expect("planted") {
                set.insert(p[1].as_str().expect("text").to_owned());
            }
        }
    }
    set.into_iter().filter(|s| s.len() >= 6).collect()
}

fn col(rows: &[Vec<Option<String>>], i: usize) -> Vec<String> {
    rows.iter().filter_map(|r| r[i].clone()).collect()
}

#[test]
fn demo_export_is_deidentified_encrypted_catalogued_and_readable_only_with_the_key() {
    let s = Scratch::new();
    s.enclave(
        "data",
        &[
            "demo-data",
            "--patients",
            "150",
            "--out",
            "export",
            "--seed",
            "11",
        ],
    );
    s.enclave("data", &["init"]);
    let export = s.path().join("export");
    let hipaa = s.ingest(
        "data",
        "H1",
        "cohort",
        &export.join("csv"),
        "hipaa-safe-harbor",
        &[],
    );
    let jp = s.ingest(
        "data",
        "H2",
        "cohort-jp",
        &export.join("fhir/ndjson"),
        "jp-pseudonymized-medical",
        &[],
    );
    for r in [&hipaa, &jp] {
        assert_eq!(
            r["totals"]["quarantined"], 0,
            "clean demo data quarantines nothing: {}",
            r["quarantine_reasons"]
        );
    }
    let m = manifest(&export);
    let data = s.path().join("data");

    // Every byte of every file under the data directory: no planted identifier, no planted note PHI.
    let needles = planted_needles(&m, true);
    assert!(
        needles.len() > 1000,
        "the manifest plants many identifiers ({})",
        needles.len()
    );
    let hits = scan_bytes(&data, &needles);
    assert!(
        hits.is_empty(),
        "{} planted identifiers found at rest, e.g. {:?}",
        hits.len(),
        &hits[..hits.len().min(5)]
    );

    // Every Parquet file has an encrypted footer.
    let parquet: Vec<_> = enclave_e2e::files_under(&data)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert_eq!(
        parquet.len(),
        18,
        "7 tables, quarantine and review sample, two datasets"
    );
    for p in &parquet {
        let bytes = std::fs::read(p).expect("read");
        assert_eq!(
            &bytes[bytes.len() - 4..],
            b"PARE",
            "{} lacks the encrypted-footer magic",
            p.display()
        );
    }

    // Without the key, DataFusion cannot even read the schema.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let plain = rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        let path = parquet[0].to_string_lossy().into_owned();
        match ctx.register_parquet("t", &path, Default::default()).await {
            Err(e) => Err(e),
            Ok(()) => ctx
                .sql("SELECT COUNT(*) FROM t")
                .await?
                .collect()
                .await
                .map(|_| ()),
        }
    });
    let err = plain
        .expect_err("reading without the key must fail")
        .to_string();
    assert!(err.contains("encrypted"), "{err}");

    // With the key, DataFusion's counts equal the rows written.
    let opened = Opened::new(&data);
    for (dataset, report) in [("cohort", &hipaa), ("cohort-jp", &jp)] {
        for (table, counts) in report["tables"].as_object().expect("tables") {
            let rows = opened.sql(dataset, &format!("SELECT COUNT(*) FROM {table}"));
            assert_eq!(
                rows[0][0].as_deref(),
                Some(counts["written"].to_string().as_str()),
                "{dataset}.{table}"
            );
        }
    }

    // Decrypted structured tables hold no planted identifier either.
    let structured = planted_needles(&m, false);
    let ac = aho_corasick::AhoCorasick::new(&structured).expect("needles");
    for table in [
        "patients",
        "encounters",
        "conditions",
        "observations",
        "medications",
        "procedures",
    ] {
        for dataset in ["cohort", "cohort-jp"] {
            for row in opened.sql(dataset, &format!("SELECT * FROM {table}")) {
                for v in row.into_iter().flatten() {
                    if let Some(hit) = ac.find(&v) {
                        panic!(
                            "{dataset}.{table} holds planted '{}' in '{v}'",
                            structured[hit.pattern().as_usize()]
                        );
                    }
                }
            }
        }
    }

    scrubbing_recall(&opened, &m);
    review_sample_shows_what_was_scrubbed(&s, &m, &hipaa);
    let others = ["gender", "race", "ethnicity", "zip3", "marital", "state"];
    let qis = |birth: &'static str, death: &'static str| {
        let mut all = vec![birth, death];
        all.extend(others);
        all
    };
    k_anonymity_holds(&opened, "cohort", &qis("birth_year", "death_year"), 5);
    k_anonymity_holds(&opened, "cohort-jp", &qis("birth_date", "death_date"), 5);
    linkage_across_providers(&opened, &export);
    date_intervals_survive(&opened, &export);

    // Another enclave (another linkage key) gives other person_ids for the same people.
    s.enclave("other", &["init"]);
    s.ingest(
        "other",
        "H1",
        "cohort",
        &export.join("csv"),
        "hipaa-safe-harbor",
        &[],
    );
    let other = Opened::new(&s.path().join("other"));
    let a: BTreeSet<String> = col(&opened.sql("cohort", "SELECT person_id FROM patients"), 0)
        .into_iter()
        .collect();
    let b: BTreeSet<String> = col(&other.sql("cohort", "SELECT person_id FROM patients"), 0)
        .into_iter()
        .collect();
    assert!(
        !a.is_empty() && a.is_disjoint(&b),
        "another linkage key must give other pseudonyms"
    );

    // Key rotation re-wraps the keys; the data stays readable and nothing is re-encrypted.
    let before = std::fs::read(data.join("master.key")).expect("key");
    drop(opened);
    let out = s.enclave("data", &["keys", "rotate"]);
    assert!(
        out.contains("re-wrapped 4 keys"),
        "linkage, audit signing and two data keys: {out}"
    );
    assert_ne!(std::fs::read(data.join("master.key")).expect("key"), before);
    let reopened = Opened::new(&data);
    let n = reopened.sql("cohort", "SELECT COUNT(*) FROM observations");
    assert_eq!(
        n[0][0].as_deref(),
        Some(
            hipaa["tables"]["observations"]["written"]
                .to_string()
                .as_str()
        )
    );
}

/// The share of PHI strings planted in notes that scrubbing removed, from the manifest.
fn scrubbing_recall(opened: &Opened, m: &serde_json::Value) {
    let p = opened.pseudonymizer();
    let notes: HashMap<String, String> = opened
        .sql("cohort", "SELECT note_id, text FROM notes")
        .into_iter()
        .filter_map(|r| Some((r[0].clone()?, r[1].clone()?)))
        .collect();
    let (mut planted, mut survived, mut checked_notes) = (0u64, 0u64, 0u64);
    let mut by_kind: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for n in m["notes"].as_array().expect("notes") {
        let token = p.token("note_id", "H1", n["note_id"].as_str().expect("id"));
        let Some(text) = notes.get(&token) else {
            continue;
        }; // its person was suppressed by k-anonymity
        checked_notes += 1;
        for item in n["planted"].as_array().expect("planted") {
            let (kind, phi) = (
                item[0].as_str().expect("kind"),
                item[1].as_str().expect("text"),
            );
            planted += 1;
            let e = by_kind.entry(kind.to_owned()).or_default();
            e.0 += 1;
            if text.contains(phi) {
                survived += 1;
                e.1 += 1;
            }
        }
    }
    let recall = 1.0 - survived as f64 / planted as f64;
    println!(
        "scrubbing recall on planted note PHI: {}/{} = {:.2}% over {checked_notes} notes",
        planted - survived,
        planted,
        recall * 100.0
    );
    for (k, (n, s)) in &by_kind {
        println!("  {k:<12} {:>5}/{n:<5} removed", n - s);
    }
    assert!(
        checked_notes > 300 && planted > 2000,
        "enough notes were checked ({checked_notes}, {planted})"
    );
    assert!(recall >= 0.99, "scrubbing recall {recall:.4} < 0.99");
}

/// The provider's review sample: at most 25 spans per placeholder type, each the original text in its
/// context (planted PHI among them), readable only through the keystore.
fn review_sample_shows_what_was_scrubbed(
    s: &Scratch,
    m: &serde_json::Value,
    report: &serde_json::Value,
) {
    let out = s.enclave("data", &["catalog", "review", "cohort"]);
    let mut per_kind: HashMap<String, usize> = HashMap::new();
    for line in out.lines() {
        let kind = line
            .strip_prefix('[')
            .and_then(|l| l.split_once(']'))
            .map(|(k, _)| k.to_owned())
            .expect("a [PLACEHOLDER] line");
        *per_kind.entry(kind).or_default() += 1;
    }
    assert!(per_kind.len() >= 5, "{per_kind:?}");
    assert!(per_kind.values().all(|n| *n <= 25), "{per_kind:?}");
    for (kind, n) in &per_kind {
        assert_eq!(
            report["review_sample"][kind].as_u64(),
            Some(*n as u64),
            "the report counts the sample"
        );
    }
    let planted: Vec<String> = planted_needles(m, true);
    assert!(
        planted.iter().any(|p| out.contains(p.as_str())),
        "the sample shows the original text of what was scrubbed"
    );
}

/// k-anonymity recomputed from the decrypted patients table.
fn k_anonymity_holds(opened: &Opened, dataset: &str, qis: &[&str], k: u64) {
    let q = qis.join(", ");
    let rows = opened.sql(
        dataset,
        &format!("SELECT COUNT(*) AS n FROM patients GROUP BY {q} ORDER BY n LIMIT 1"),
    );
    let smallest: u64 = rows[0][0]
        .as_deref()
        .expect("count")
        .parse()
        .expect("number");
    println!("{dataset}: smallest class over ({q}) has {smallest} persons");
    assert!(smallest >= k, "{dataset}: a class of {smallest} < k = {k}");
}

/// The same national ID at two providers (CSV at H1, FHIR at H2) becomes the same person_id.
fn linkage_across_providers(opened: &Opened, export: &Path) {
    let expected: BTreeSet<String> = expected_person_ids(opened, export).into_values().collect();
    let h1: BTreeSet<String> = col(&opened.sql("cohort", "SELECT person_id FROM patients"), 0)
        .into_iter()
        .collect();
    let h2: BTreeSet<String> = col(
        &opened.sql("cohort-jp", "SELECT person_id FROM patients"),
        0,
    )
    .into_iter()
    .collect();
    assert!(
        h1.is_subset(&expected) && h2.is_subset(&expected),
        "person_id is the keyed national-ID pseudonym at both providers"
    );
    let both = h1.intersection(&h2).count();
    println!(
        "linkage: {} persons at H1, {} at H2, {both} in both",
        h1.len(),
        h2.len()
    );
    assert!(both as f64 >= 0.9 * h1.len().min(h2.len()) as f64);
}

fn parse_ts(s: &str) -> NaiveDateTime {
    let t = s.trim_end_matches('Z');
    NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S").expect("timestamp")
}

/// Under the date-shifting profile every time is the source's moved by the person's one shift (whole days)
/// and truncated to the hour, so intervals survive to the hour.
fn date_intervals_survive(opened: &Opened, export: &Path) {
    let persons = expected_person_ids(opened, export);
    let mut source: HashMap<String, Vec<(NaiveDateTime, NaiveDateTime)>> = HashMap::new();
    for r in source_csv(export, "encounters") {
        source
            .entry(persons[&r["PATIENT"]].clone())
            .or_default()
            .push((parse_ts(&r["START"]), parse_ts(&r["STOP"])));
    }
    let mut shifted: HashMap<String, Vec<(NaiveDateTime, NaiveDateTime)>> = HashMap::new();
    let rows = opened.sql(
        "cohort-jp",
        "SELECT person_id, to_char(start, '%Y-%m-%dT%H:%M:%S'), to_char(stop, '%Y-%m-%dT%H:%M:%S') FROM encounters",
    );
    // A person with an event inside their released birth band has that time withheld: they are left out.
    let mut withheld = BTreeSet::new();
    for r in rows {
        let p = r[0].clone().expect("person");
        match (r[1].clone(), r[2].clone()) {
            (Some(a), Some(b)) => shifted
                .entry(p)
                .or_default()
                .push((parse_ts(&a), parse_ts(&b))),
            _ => {
                withheld.insert(p);
            }
        }
    }
    shifted.retain(|p, _| !withheld.contains(p));
    println!(
        "date shift checked for {} persons ({} with a withheld time left out)",
        shifted.len(),
        withheld.len()
    );
    assert!(shifted.len() > 60);
    let mut shifts = BTreeSet::new();
    for (person, mut out) in shifted {
        let mut src = source
            .remove(&person)
            .expect("released person is in the source");
        src.sort();
        out.sort();
        assert_eq!(src.len(), out.len());
        let shift = out[0].0.date() - src[0].0.date();
        let hour = |t: NaiveDateTime| {
            use chrono::Timelike;
            t.with_minute(0)
                .and_then(|t| t.with_second(0))
                .and_then(|t| t.with_nanosecond(0))
                .expect("valid time")
        };
        for ((s0, s1), (o0, o1)) in src.iter().zip(&out) {
            assert_eq!(*o0, hour(*s0 + shift), "one shift per person, to the hour");
            assert_eq!(*o1, hour(*s1 + shift), "one shift per person, to the hour");
            let drift = ((*o1 - *o0) - (*s1 - *s0)).num_minutes().abs();
            assert!(drift < 60, "length of stay survives to the hour");
        }
        assert!(
            shift.num_days() != 0 && shift.num_days().abs() <= 180,
            "shift {shift} within ±180 days"
        );
        shifts.insert(shift.num_days());
    }
    assert!(
        shifts.len() > 50,
        "shifts differ between persons ({} distinct)",
        shifts.len()
    );
}

#[test]
fn injected_errors_are_quarantined_with_a_reason_and_every_row_is_accounted_for() {
    let s = Scratch::new();
    s.enclave(
        "data",
        &[
            "demo-data",
            "--patients",
            "80",
            "--out",
            "export",
            "--seed",
            "5",
            "--inject-errors",
            "0.02",
        ],
    );
    s.enclave("data", &["init"]);
    let export = s.path().join("export");
    let injected: u64 = manifest(&export)["injected_errors"]
        .as_object()
        .expect("errors")
        .values()
        .map(|v| v.as_u64().expect("n"))
        .sum();
    assert!(injected > 50);
    let opened_reports = [
        (
            "csv",
            s.ingest(
                "data",
                "H1",
                "bad-csv",
                &export.join("csv"),
                "hipaa-safe-harbor",
                &["--max-quarantine-ratio", "0.5"],
            ),
        ),
        (
            "ndjson",
            s.ingest(
                "data",
                "H1",
                "bad-fhir",
                &export.join("fhir/ndjson"),
                "hipaa-safe-harbor",
                &["--max-quarantine-ratio", "0.5"],
            ),
        ),
    ];
    let opened = Opened::new(&s.path().join("data"));
    for (kind, report) in &opened_reports {
        let t = &report["totals"];
        let (rin, w, q, sup) = (
            t["rows_in"].as_u64(),
            t["written"].as_u64(),
            t["quarantined"].as_u64(),
            t["suppressed"].as_u64(),
        );
        let (rin, w, q, sup) = (
            rin.expect("n"),
            w.expect("n"),
            q.expect("n"),
            sup.expect("n"),
        );
        println!("{kind}: rows in {rin} = written {w} + quarantined {q} + suppressed {sup}");
        assert_eq!(rin, w + q + sup);
        for (table, c) in report["tables"].as_object().expect("tables") {
            let n = |k: &str| c[k].as_u64().expect("count");
            assert_eq!(
                n("rows_in"),
                n("written") + n("quarantined") + n("suppressed"),
                "{kind} {table}"
            );
        }
        assert!(
            q >= injected / 2,
            "{kind}: {q} quarantined for {injected} injected errors"
        );
        let dataset = if *kind == "csv" {
            "bad-csv"
        } else {
            "bad-fhir"
        };
        let rows = opened.sql(
            dataset,
            "SELECT COUNT(*), SUM(CASE WHEN length(reason) > 0 THEN 1 ELSE 0 END) FROM quarantine",
        );
        assert_eq!(
            rows[0][0].as_deref(),
            Some(q.to_string().as_str()),
            "{kind}: every quarantined row is in the quarantine file"
        );
        assert_eq!(
            rows[0][1].as_deref(),
            Some(q.to_string().as_str()),
            "{kind}: every quarantined row has a reason"
        );
    }

    // Over the limit the run fails and publishes nothing.
    let out = s.ingest_output(
        "data",
        "H1",
        "bad-strict",
        &s.path().join("export/csv"),
        "hipaa-safe-harbor",
        &["--max-quarantine-ratio", "0.01"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was published"), "{err}");
    let show = enclave_output(
        s.path(),
        &["--data-dir", "data", "catalog", "show", "bad-strict"],
    );
    assert!(!show.status.success());
    assert!(!s.path().join("data/datasets/bad-strict").exists());
    assert_eq!(
        std::fs::read_dir(s.path().join("data/staging"))
            .expect("staging")
            .count(),
        0,
        "staging is cleaned up"
    );
}

/// Names, SSNs, addresses and phones of the shared samples, straight from their source files.
fn shared_identifiers() -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut r =
        csv::Reader::from_path(shared_data("synthea-csv-27/patients.csv")).expect("patients.csv");
    let h = r.headers().expect("headers").clone();
    for rec in r.records() {
        let rec = rec.expect("record");
        for (k, v) in h.iter().zip(rec.iter()) {
            if [
                "FIRST", "LAST", "SSN", "ADDRESS", "DRIVERS", "PASSPORT", "MAIDEN",
            ]
            .contains(&k)
                && !v.is_empty()
            {
                out.insert(v.to_owned());
            }
        }
    }
    let text = std::fs::read_to_string(shared_data("fhir-r4-bulk-10/Patient.000.ndjson"))
        .expect("Patient.ndjson");
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let p: serde_json::Value = serde_json::from_str(line).expect("json");
        for n in p["name"].as_array().into_iter().flatten() {
            out.extend(
                n["given"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str().map(str::to_owned)),
            );
            out.extend(n["family"].as_str().map(str::to_owned));
        }
        for t in p["telecom"].as_array().into_iter().flatten() {
            out.extend(t["value"].as_str().map(str::to_owned));
        }
        for a in p["address"].as_array().into_iter().flatten() {
            out.extend(
                a["line"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(str::to_owned)),
            );
        }
        for id in p["identifier"].as_array().into_iter().flatten() {
            if id["system"].as_str().is_some_and(|s| s.ends_with("us-ssn")) {
                out.extend(id["value"].as_str().map(str::to_owned));
            }
        }
    }
    out.into_iter().filter(|s| s.len() >= 5).collect()
}

#[test]
fn shared_synthea_samples_ingest_without_errors_and_leave_no_identifier() {
    let s = Scratch::new();
    s.enclave("data", &["init"]);
    let csv = s.ingest(
        "data",
        "S1",
        "synthea27",
        &shared_data("synthea-csv-27"),
        "hipaa-safe-harbor",
        &[],
    );
    let fhir = s.ingest(
        "data",
        "S2",
        "fhir10",
        &shared_data("fhir-r4-bulk-10"),
        "hipaa-safe-harbor",
        &[],
    );
    assert_eq!(
        csv["totals"]["quarantined"], 0,
        "{}",
        csv["quarantine_reasons"]
    );
    assert_eq!(
        fhir["totals"]["quarantined"], 0,
        "{}",
        fhir["quarantine_reasons"]
    );
    assert_eq!(csv["tables"]["observations"]["rows_in"], 990);
    assert_eq!(fhir["tables"]["notes"]["rows_in"], 1215);

    // Safe Harbor: no time finer than a year, no value or time column with a value that singles its
    // person out; the Japanese profile ingests both samples too.
    for report in [&csv, &fhir] {
        for (table, t) in report["risk"]["tables"].as_object().expect("risk tables") {
            for (column, c) in t["columns"].as_object().expect("columns") {
                if c["limited"] == true {
                    assert_eq!(c["singled_out"], 0, "{table}.{column}: {c}");
                }
            }
        }
    }
    for (i, input) in ["synthea-csv-27", "fhir-r4-bulk-10"].iter().enumerate() {
        let jp = s.ingest(
            "data",
            "S3",
            &format!("jp{i}"),
            &shared_data(input),
            "jp-pseudonymized-medical",
            &[],
        );
        assert_eq!(
            jp["totals"]["quarantined"], 0,
            "{}",
            jp["quarantine_reasons"]
        );
    }

    let needles = shared_identifiers();
    assert!(needles.len() > 100, "{}", needles.len());
    let data = s.path().join("data");
    let hits = scan_bytes(&data, &needles);
    assert!(
        hits.is_empty(),
        "identifiers at rest: {:?}",
        &hits[..hits.len().min(5)]
    );

    // Decrypted, the released tables (notes included) hold none of those names, SSNs, addresses or phones.
    let opened = Opened::new(&data);
    let ac = aho_corasick::AhoCorasick::new(&needles).expect("needles");
    let mut scanned = 0;
    for (dataset, table) in [
        ("synthea27", "patients"),
        ("synthea27", "encounters"),
        ("fhir10", "patients"),
        ("fhir10", "notes"),
    ] {
        for row in opened.sql(dataset, &format!("SELECT * FROM {table}")) {
            for v in row.into_iter().flatten() {
                scanned += 1;
                if let Some(m) = ac.find(&v) {
                    panic!(
                        "{dataset}.{table} still holds '{}'",
                        needles[m.pattern().as_usize()]
                    );
                }
            }
        }
    }
    assert!(scanned > 5000);

    // No released time finer than a year, and no birth year of anyone 90 or older but the top code
    // (which k-anonymity may put in a band of up to 20 years).
    use chrono::Datelike;
    let top = chrono::Utc::now().date_naive().year() - 90;
    for dataset in ["synthea27", "fhir10"] {
        use catalog::CatalogStore;
        let version = opened.catalog.version(dataset, None).expect("catalogued");
        for t in &version.version.tables {
            for c in &t.columns {
                assert!(
                    !c.data_type.contains("Date") && !c.data_type.contains("Timestamp"),
                    "{dataset}.{}.{} is released as {}",
                    t.name,
                    c.name,
                    c.data_type
                );
            }
        }
        // (In these small samples k-anonymity may withhold every birth year.)
        let oldest = opened.sql(dataset, "SELECT MIN(birth_year) FROM patients");
        if let Some(oldest) = oldest[0][0].as_deref() {
            let oldest: i32 = oldest.parse().expect("year");
            assert!(
                oldest >= top - top.rem_euclid(20),
                "{dataset}: born {oldest}"
            );
        }
    }
}

#[test]
fn readme_main_command_runs_the_provider_flow_and_can_run_again() {
    let s = Scratch::new();
    let out = enclave_e2e::enclave(s.path(), &["demo", "--patients", "40"]);
    assert!(out.contains("4/4 catalog entry"), "{out}");
    assert!(out.contains("dataset      demo-cohort (version 1"), "{out}");
    assert!(out.contains("rows in "), "{out}");
    let again = enclave_e2e::enclave(s.path(), &["demo", "--patients", "40"]);
    assert!(
        again.contains("dataset      demo-cohort (version 2"),
        "{again}"
    );
    let list = enclave_e2e::enclave(s.path(), &["catalog", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list[0]["versions"], 2);
    let _ = to_rows(&[]);
}

/// The rows held in memory between the passes and the rows staged as scratch files (a budget of 0 MiB)
/// come out the same: every table, every value, and the report's figures.
#[test]
fn staging_in_memory_or_in_scratch_files_releases_the_same_tables() {
    let s = Scratch::new();
    s.demo_csv("200");
    let export = s.path().join("export").join("csv");
    let held = s.ingest("data", "H1", "held", &export, "hipaa-safe-harbor", &[]);
    let spilled = s.ingest(
        "data",
        "H1",
        "spilled",
        &export,
        "hipaa-safe-harbor",
        &["--stage-memory-mib", "0"],
    );
    for figure in [
        "tables",
        "totals",
        "persons",
        "k_anonymity",
        "risk",
        "withheld_event_times",
        "scrubbed",
    ] {
        assert_eq!(held[figure], spilled[figure], "{figure}");
    }
    let opened = Opened::new(&s.path().join("data"));
    for table in policies::Table::ALL.map(policies::Table::name) {
        let rows = |dataset: &str| {
            let mut rows = opened.sql(dataset, &format!("SELECT * FROM {table}"));
            rows.sort();
            rows
        };
        let (a, b) = (rows("held"), rows("spilled"));
        assert!(!a.is_empty(), "{table} has rows");
        assert_eq!(a, b, "{table}");
    }
}
