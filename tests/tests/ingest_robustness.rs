//! Ingest under adverse conditions: a run killed part-way, and an export in a layout of the provider's own.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enclave_e2e::{Opened, Scratch, enclave_bin, enclave_output};

#[test]
fn a_run_killed_part_way_publishes_nothing_and_rerunning_works() {
    let s = Scratch::new();
    s.demo_csv("1500");
    let mut child = Command::new(enclave_bin())
        .args([
            "--data-dir",
            "data",
            "ingest",
            "--provider",
            "H1",
            "--dataset",
            "big",
            "--input",
            "export/csv",
            "--profile",
            "hipaa-safe-harbor",
            // Every table to its scratch file from the first batch: the kill lands while files are written.
            "--stage-memory-mib",
            "0",
        ])
        .current_dir(s.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ingest");
    // Wait until pass two is writing table files into staging, then kill the process outright.
    let staging = s.path().join("data/staging");
    let deadline = Instant::now() + Duration::from_secs(120);
    let writing = loop {
        let started = std::fs::read_dir(&staging)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_dir(d.path())
                    .map(|f| f.count() > 0)
                    .unwrap_or(false)
            });
        if started || Instant::now() > deadline || child.try_wait().expect("poll").is_some() {
            break started;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(writing, "the ingest reached its writing pass");
    let finished_first = child.try_wait().expect("poll").is_some();
    child.kill().ok();
    child.wait().expect("reap");
    assert!(
        !finished_first,
        "the run was still going when it was killed"
    );

    let show = enclave_output(s.path(), &["--data-dir", "data", "catalog", "show", "big"]);
    assert!(
        !show.status.success(),
        "a killed run leaves no catalog version"
    );
    assert!(String::from_utf8_lossy(&show.stderr).contains("unknown dataset 'big'"));
    assert!(
        !s.path().join("data/datasets/big").exists(),
        "nothing is visible under datasets/"
    );

    let report = s.ingest(
        "data",
        "H1",
        "big",
        &s.path().join("export/csv"),
        "hipaa-safe-harbor",
        &[],
    );
    assert_eq!(report["version"], "1");
    let t = &report["totals"];
    assert_eq!(
        t["rows_in"].as_u64(),
        Some(t["written"].as_u64().expect("n") + t["suppressed"].as_u64().expect("n"))
    );
    let opened = Opened::new(&s.path().join("data"));
    let n = opened.sql("big", "SELECT COUNT(*) FROM observations");
    assert_eq!(
        n[0][0].as_deref(),
        Some(
            report["tables"]["observations"]["written"]
                .to_string()
                .as_str()
        )
    );
}

#[test]
fn a_providers_own_csv_layout_ingests_through_a_mapping_file() {
    let s = Scratch::new();
    s.enclave("data", &["init"]);
    let export = s.path().join("his-export");
    std::fs::create_dir_all(&export).expect("mkdir");
    let mut people =
        String::from("PersonID,GivenName,FamilyName,DOB,Sex,PostCode,NHSNo,Telephone\n");
    let mut labs = String::from("PersonID,TakenAt,Loinc,Test,Result,Unit\n");
    for i in 0..30u32 {
        people += &format!(
            "P{i:03},Given{i},Family{i},19{:02}-0{}-1{},{},0214{},,07700 900{:03}\n",
            40 + i,
            1 + i % 9,
            i % 9,
            if i % 2 == 0 { "F" } else { "M" },
            i % 10,
            i
        );
        for j in 0..4u32 {
            labs += &format!(
                "P{i:03},2024-0{}-0{}T10:00:00Z,2339-0,Glucose,{},mg/dL\n",
                1 + j,
                1 + j,
                90 + i + j
            );
        }
    }
    labs += "P999,2024-01-01T10:00:00Z,2339-0,Glucose,101,mg/dL\n";
    std::fs::write(export.join("people.csv"), people).expect("write");
    std::fs::write(export.join("labs.csv"), labs).expect("write");
    std::fs::write(export.join("README.txt"), "export notes").expect("write");
    let mapping = s.path().join("his-mapping.toml");
    std::fs::write(
        &mapping,
        r#"
[[table]]
table = "patients"
[table.columns]
PersonID = "patient_id"
GivenName = "first_name"
FamilyName = "last_name"
DOB = "birth_date"
Sex = "gender"
PostCode = "zip"
NHSNo = "national_id"
Telephone = "phone"

[[table]]
table = "observations"
[table.columns]
PersonID = "patient_id"
TakenAt = "date"
Loinc = "code"
Test = "description"
Result = "value"
Unit = "units"
"#,
    )
    .expect("write mapping");
    let report = s.ingest(
        "data",
        "HIS",
        "his",
        &export,
        "jp-pseudonymized-medical",
        &[
            "--mapping",
            mapping.to_str().expect("utf8"),
            "--max-quarantine-ratio",
            "0.1",
        ],
    );
    assert_eq!(report["tables"]["patients"]["rows_in"], 30);
    assert_eq!(report["tables"]["observations"]["rows_in"], 121);
    assert_eq!(
        report["tables"]["observations"]["quarantined"], 1,
        "the lab of an unknown person is quarantined"
    );
    assert_eq!(
        report["persons"]["linked_by_national_id"], 0,
        "blank national IDs fall back to the local ID"
    );
    let skipped = report["files_skipped"].as_object().expect("skipped");
    assert!(
        skipped.keys().any(|k| k.ends_with("README.txt")),
        "{skipped:?}"
    );
    let opened = Opened::new(&s.path().join("data"));
    // Each person's shift comes from this enclave's own key, so which of the 30 (if any) k-anonymity
    // cannot place varies: at most k - 1 = 4.
    let released = report["persons"]["released"].as_u64().expect("released");
    assert!((26..=30).contains(&released), "{released}");
    let rows = opened.sql(
        "his",
        "SELECT COUNT(DISTINCT person_id), MAX(value_numeric) FROM observations",
    );
    assert_eq!(rows[0][0].as_deref(), Some(released.to_string().as_str()));
    assert_eq!(
        rows[0][1].as_deref(),
        Some("120.0"),
        "measurements to 2 significant digits (122 → 120)"
    );
    let alone = opened.sql(
        "his",
        "SELECT COUNT(*) FROM (SELECT value_numeric FROM observations WHERE value_numeric IS NOT NULL \
         GROUP BY value_numeric HAVING COUNT(DISTINCT person_id) < 2) AS v",
    );
    assert_eq!(
        alone[0][0].as_deref(),
        Some("0"),
        "a value one person holds is withheld"
    );

    // A mapping naming a column the model lacks is refused with its line, before any row is read.
    std::fs::write(&mapping, "[[table]]\ntable = \"patients\"\n[table.columns]\nPersonID = \"patient_id\"\nDOB = \"dob\"\n").expect("write");
    let out = enclave_output(
        s.path(),
        &[
            "--data-dir",
            "data",
            "ingest",
            "--provider",
            "HIS",
            "--dataset",
            "his2",
            "--input",
            "his-export",
            "--profile",
            "hipaa-safe-harbor",
            "--mapping",
            "his-mapping.toml",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("his-mapping.toml:5: table patients has no column 'dob'"),
        "{err}"
    );
}

/// The profile declares one `patients` row per person (`dp.rows_per_person`), and the DP engine sizes
/// the noise of patient counts by it. Two source rows that link to one person (the same national ID
/// under two local IDs) would break that: the second is quarantined with the rule's name, so every
/// released person_id has one row.
#[test]
fn a_second_patients_row_for_one_person_is_quarantined_and_counted_once() {
    let s = Scratch::new();
    s.demo_csv("60");
    let file = s.path().join("export/csv/patients.csv");
    let mut reader = csv::Reader::from_path(&file).expect("patients.csv");
    let headers = reader.headers().expect("headers").clone();
    let mut rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
    let id = headers.iter().position(|h| h == "Id").expect("Id column");
    let mut twin: Vec<String> = rows[0].iter().map(str::to_owned).collect();
    twin[id] = "another-local-id".into();
    rows.push(csv::StringRecord::from(twin));
    let mut writer = csv::Writer::from_path(&file).expect("rewrite");
    writer.write_record(&headers).expect("headers");
    for r in &rows {
        writer.write_record(r).expect("row");
    }
    writer.flush().expect("flush");
    drop(writer);

    let report = s.ingest(
        "data",
        "H1",
        "twins",
        &s.path().join("export/csv"),
        "hipaa-safe-harbor",
        &[],
    );
    let reasons = report["quarantine_reasons"].as_object().expect("reasons");
    assert!(
        reasons.iter().any(|(r, n)| r.starts_with("patients:")
            && r.contains("another patients record of the same person")
            && n == 1),
        "{reasons:?}"
    );
    let opened = Opened::new(&s.path().join("data"));
    let counts = opened.sql(
        "twins",
        "SELECT COUNT(*), COUNT(DISTINCT person_id) FROM patients",
    );
    assert_eq!(counts[0][0], counts[0][1], "one row per released person");
}

/// A provider that spells a department its own way: under the shipped profile the rows are quarantined
/// with the reason and counted per column; a profile that declares `other` maps them to that key. Either
/// way every released value is in the declared domain, so a GROUP BY over it (which releases exactly the
/// domain's keys) cannot silently drop rows that a WHERE would still find.
#[test]
fn values_outside_a_declared_domain_are_quarantined_or_mapped_and_counted() {
    let s = Scratch::new();
    s.demo_csv("60");
    let file = s.path().join("export/csv/encounters.csv");
    let text = std::fs::read_to_string(&file).expect("encounters.csv");
    let respelled = text.matches(",Cardiology,").count() as u64;
    assert!(respelled > 0);
    std::fs::write(&file, text.replace(",Cardiology,", ",Cardiology Dept.,")).expect("write");

    let report = s.ingest(
        "data",
        "H1",
        "strict",
        &s.path().join("export/csv"),
        "hipaa-safe-harbor",
        &[],
    );
    let dept = &report["out_of_domain"]["encounters.department"];
    assert_eq!(dept["quarantined"], respelled, "{report}");
    assert_eq!(dept["mapped"], 0);
    assert!(
        report["quarantine_reasons"]
            .as_object()
            .expect("reasons")
            .keys()
            .any(|r| r
                .contains("encounters.department: a value outside the column's declared domain"))
    );

    let profile = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies/profiles/hipaa-safe-harbor.toml"),
    )
    .expect("profile");
    let with_other = profile.replacen(
        "\"Psychiatry\"] }",
        "\"Psychiatry\", \"Other\"], other = \"Other\" }",
        1,
    );
    assert_ne!(with_other, profile, "the department rule changed");
    let path = s.path().join("lenient.toml");
    std::fs::write(&path, with_other).expect("profile");
    let report = s.ingest(
        "data",
        "H1",
        "lenient",
        &s.path().join("export/csv"),
        path.to_str().expect("utf-8"),
        &[],
    );
    let dept = &report["out_of_domain"]["encounters.department"];
    assert_eq!(dept["mapped"], respelled, "{report}");
    assert_eq!(dept["quarantined"], 0);
    let opened = Opened::new(&s.path().join("data"));
    let other = opened.sql(
        "lenient",
        "SELECT COUNT(*) FROM encounters WHERE department = 'Other'",
    );
    assert_eq!(other[0][0].as_deref(), Some(respelled.to_string().as_str()));
}
