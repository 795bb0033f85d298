//! De-identification against linkage, end to end through the real binary: a generated export is ingested
//! under both shipped profiles, decrypted again, and attacked as a privacy officer would — k recomputed
//! over every quasi-identifier, each kept value and time column's person-unique share recomputed and
//! compared with the risk report, and a linkage join of the released values to the source export. A
//! profile that keeps exact costs must fail the run and name the column.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use enclave_e2e::{Opened, Scratch, expected_person_ids, source_csv};
use policies::{Action, Profile, Table};

const K: u64 = 5;

/// Ingests: the report as JSON, or the error output.
fn ingest(
    s: &Scratch,
    dataset: &str,
    input: &Path,
    profile: &str,
) -> Result<serde_json::Value, String> {
    let out = s.ingest_output("data", "H1", dataset, input, profile, &[]);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("report JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn number(v: &Option<String>) -> f64 {
    v.as_deref().expect("a value").parse().expect("a number")
}

/// k over every quasi-identifier the profile lists, recomputed from the decrypted patients table.
fn smallest_class(opened: &Opened, dataset: &str, qis: &[String]) -> u64 {
    let q = qis.join(", ");
    let rows = opened.sql(
        dataset,
        &format!("SELECT COUNT(*) AS n FROM patients GROUP BY {q} ORDER BY n LIMIT 1"),
    );
    number(&rows[0][0]) as u64
}

/// (persons holding a value, persons holding a value no other person holds) of one column, recomputed
/// with SQL over the decrypted table; `key` is the expression compared (the column, or its time of day).
fn singled_out(opened: &Opened, dataset: &str, table: &str, key: &str) -> (u64, u64) {
    let held = opened.sql(
        dataset,
        &format!("SELECT COUNT(DISTINCT person_id) FROM {table} WHERE {key} IS NOT NULL"),
    );
    let alone = opened.sql(
        dataset,
        &format!(
            "WITH v AS (SELECT {key} AS k, person_id FROM {table} WHERE {key} IS NOT NULL), \
                  own AS (SELECT k FROM v GROUP BY k HAVING COUNT(DISTINCT person_id) = 1) \
             SELECT COUNT(DISTINCT v.person_id) FROM v JOIN own ON v.k = own.k"
        ),
    );
    (number(&held[0][0]) as u64, number(&alone[0][0]) as u64)
}

/// Recomputes every column figure of the report's risk section, and each table's smallest class.
fn report_figures_are_true(opened: &Opened, dataset: &str, report: &serde_json::Value) -> usize {
    let risk = &report["risk"];
    let limit = risk["max_unique_ratio"].as_f64().expect("limit");
    let mut checked = 0;
    let mut withheld_total = 0;
    for (table, t) in risk["tables"].as_object().expect("tables") {
        for (column, c) in t["columns"].as_object().expect("columns") {
            let key = if c["measured_on"] == "time of day" {
                format!("to_char({column}, '%H:%M:%S%.f')")
            } else {
                column.clone()
            };
            let (persons, alone) = singled_out(opened, dataset, table, &key);
            assert_eq!(
                (persons, alone),
                (
                    c["persons"].as_u64().expect("persons"),
                    c["singled_out"].as_u64().expect("singled out")
                ),
                "{dataset}: {table}.{column}: the report's figures match SQL over the released rows"
            );
            if c["limited"] == true {
                assert_eq!(
                    alone, 0,
                    "{dataset}: {table}.{column} singles out {alone} persons"
                );
                let withheld = c["withheld"].as_u64().expect("withheld");
                let all = withheld + c["values"].as_u64().expect("values");
                let share = withheld as f64 / all.max(1) as f64;
                assert!(
                    share <= limit,
                    "{dataset}: {table}.{column} withheld {share:.4}"
                );
                withheld_total += withheld;
            }
            checked += 1;
        }
        let rows = opened.sql(dataset, &format!("SELECT COUNT(*) FROM {table}"));
        assert_eq!(
            number(&rows[0][0]) as u64,
            t["records"].as_u64().expect("records")
        );
    }
    let patients = &risk["tables"]["patients"];
    assert_eq!(
        patients["unique_ratio"], 0.0,
        "no patient is alone in a class"
    );
    assert!(patients["smallest_class"].as_u64().expect("smallest") >= K);
    println!("{dataset}: {withheld_total} values withheld because no other person held them");
    assert!(withheld_total > 0, "some value was held by one person only");
    checked
}

/// The linkage attack: the attacker holds the source export, coarsens each value the way the (public)
/// profile does, and links a released person to a source person wherever a value is held by exactly one
/// person on each side. Returns (persons linked correctly, persons released) per attacked column.
fn linkage(
    opened: &Opened,
    dataset: &str,
    export: &Path,
    profile: &Profile,
    attacks: &[(Table, &str, &str)],
) -> Vec<(String, usize, usize, f64)> {
    let person_of = expected_person_ids(opened, export);
    let mut out = Vec::new();
    for (table, column, source_column) in attacks {
        let Some(Action::Coarsen(c)) = profile.rule(*table, column).map(|r| &r.action) else {
            panic!("{table}.{column} is coarsened by the profile");
        };
        let patient_col = if *table == Table::Patients {
            "Id"
        } else {
            "PATIENT"
        };
        let mut source: HashMap<u64, HashSet<String>> = HashMap::new();
        let mut exact: HashMap<u64, HashSet<String>> = HashMap::new();
        for r in source_csv(export, table.name()) {
            let Ok(v) = r[*source_column].parse::<f64>() else {
                continue;
            };
            let person = person_of[&r[patient_col]].clone();
            exact.entry(v.to_bits()).or_default().insert(person.clone());
            if let Some(x) = c.apply(v) {
                source.entry(x.to_bits()).or_default().insert(person);
            }
        }
        let mut released: HashMap<u64, HashSet<String>> = HashMap::new();
        for r in opened.sql(
            dataset,
            &format!(
                "SELECT person_id, {column} FROM {} WHERE {column} IS NOT NULL",
                table.name()
            ),
        ) {
            let v = number(&r[1]);
            released
                .entry(v.to_bits())
                .or_default()
                .insert(r[0].clone().expect("person"));
        }
        let persons: HashSet<&String> = released.values().flatten().collect();
        let mut linked = HashSet::new();
        for (v, who) in &released {
            if let (1, Some(src)) = (who.len(), source.get(v))
                && src.len() == 1
                && src == who
            {
                linked.insert(who.iter().next().expect("one").clone());
            }
        }
        // What the same attack links on the exact values (the protection's baseline).
        let exact_share = exact
            .values()
            .filter(|w| w.len() == 1)
            .flatten()
            .collect::<HashSet<_>>()
            .len() as f64
            / person_of.len() as f64;
        out.push((
            format!("{table}.{column}"),
            linked.len(),
            persons.len(),
            exact_share,
        ));
    }
    out
}

#[test]
fn released_tables_resist_linkage_and_the_risk_report_is_true() {
    let s = Scratch::new();
    s.enclave(
        "data",
        &[
            "demo-data",
            "--patients",
            "1500",
            "--out",
            "export",
            "--format",
            "csv",
            "--seed",
            "23",
        ],
    );
    s.enclave("data", &["init"]);
    let export = s.path().join("export");
    let csv = export.join("csv");
    let hipaa = ingest(&s, "sh", &csv, "hipaa-safe-harbor").expect("Safe Harbor ingest");
    let jp = ingest(&s, "jp", &csv, "jp-pseudonymized-medical").expect("Japanese profile ingest");
    let opened = Opened::new(&s.path().join("data"));

    for (dataset, name, report) in [
        ("sh", "hipaa-safe-harbor", &hipaa),
        ("jp", "jp-pseudonymized-medical", &jp),
    ] {
        let profile = Profile::load(name).expect("profile");
        let qis = profile
            .k_anonymity
            .as_ref()
            .expect("k")
            .quasi_identifiers
            .clone();
        assert_eq!(
            qis.len(),
            8,
            "every quasi-identifier of the demographic record"
        );
        let smallest = smallest_class(&opened, dataset, &qis);
        println!(
            "{dataset}: k over all {} quasi-identifiers = {smallest}",
            qis.len()
        );
        assert!(smallest >= K, "{dataset}: a class of {smallest} < {K}");
        assert_eq!(report["k_anonymity"]["k_reached"].as_u64(), Some(smallest));

        let checked = report_figures_are_true(&opened, dataset, report);
        assert!(
            checked >= 25,
            "{dataset}: {checked} column figures recomputed"
        );
        println!("{dataset}: {checked} column figures of the risk report recomputed");

        let attacks = [
            (
                Table::Patients,
                "healthcare_expenses",
                "HEALTHCARE_EXPENSES",
            ),
            (
                Table::Patients,
                "healthcare_coverage",
                "HEALTHCARE_COVERAGE",
            ),
            (Table::Encounters, "total_cost", "TOTAL_CLAIM_COST"),
            (Table::Encounters, "base_cost", "BASE_ENCOUNTER_COST"),
            (Table::Encounters, "payer_coverage", "PAYER_COVERAGE"),
        ];
        for (column, linked, persons, exact) in
            linkage(&opened, dataset, &export, &profile, &attacks)
        {
            let share = linked as f64 / persons as f64;
            println!(
                "{dataset}: linkage on {column}: {linked} of {persons} persons linked ({:.2} %; on exact values {:.1} % would be)",
                share * 100.0,
                exact * 100.0
            );
            assert_eq!(linked, 0, "{dataset}: {column} links {share:.4} of persons");
            assert!(exact > 0.9, "the attack works on exact values");
        }
    }

    // Safe Harbor: no age above 89. Birth years of persons 90 or older are top-coded to one year, which
    // k-anonymity may put in a band of up to 20 years: no released value starts before that band.
    use chrono::Datelike;
    let top = chrono::Utc::now().date_naive().year() - 90;
    let years = opened.sql("sh", "SELECT MIN(birth_year) FROM patients");
    let oldest = number(&years[0][0]) as i32;
    assert!(
        oldest >= top - top.rem_euclid(20),
        "oldest released birth year {oldest}"
    );
    for r in opened.sql("sh", "SELECT * FROM encounters LIMIT 1") {
        assert!(
            r.iter().flatten().all(|v| !v.contains('T') || v.len() < 11),
            "{r:?}"
        );
    }
    // The Japanese profile: every shifted time on the hour.
    let off = opened.sql(
        "jp",
        "SELECT COUNT(*) FROM encounters WHERE date_trunc('hour', start) <> start OR date_trunc('hour', stop) <> stop",
    );
    assert_eq!(number(&off[0][0]), 0.0, "times are truncated to the hour");
}

#[test]
fn a_profile_that_keeps_exact_costs_fails_and_names_the_column() {
    let s = Scratch::new();
    s.demo_csv("200");
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor").expect("builtin");
    let exact = text.replacen(
        r#"healthcare_expenses = { action = "round", digits = 1, role = "value", bounds = [0.0, 5000000.0] }"#,
        r#"healthcare_expenses = { action = "keep", role = "value", bounds = [0.0, 5000000.0] }"#,
        1,
    );
    assert_ne!(exact, text);
    let file = s.path().join("exact.toml");
    std::fs::write(&file, exact).expect("write profile");
    let stderr = ingest(
        &s,
        "exact",
        &s.path().join("export/csv"),
        file.to_str().expect("utf-8"),
    )
    .expect_err("the run fails");
    assert!(
        stderr.contains("re-identification risk above the profile's limit")
            && stderr.contains(
                "100.00 % of patients.healthcare_expenses's values are held by one person only"
            ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("of patients.healthcare_coverage's values"),
        "only the exact column: {stderr}"
    );
    let listed = s.enclave("data", &["catalog", "list"]);
    assert!(!listed.contains("exact"), "nothing was published: {listed}");
}
