//! Runs the sqllogictest-style specifications in `tests/sql/*.slt` against the DP engine.
//!
//! DP answers are noisy, so a `query` record checks the result's shape — column types and names, and
//! the row count — never values. Records:
//!
//! ```text
//! # comment
//! control principal NAME          run the following records as NAME (default alice)
//! control epsilon X               spend X per query from here on (default 0.1)
//!
//! statement ok                    the query is answered
//! statement error <regex>         the query is refused; the error matches <regex>
//! SELECT …                        (the SQL runs to the next blank line)
//!
//! query <types> [rows N|rows>=N]  the query is answered with these column types (I integer, R float,
//! SELECT …                        T text or other) and this many rows; after `----`, the column names
//! ----                            separated by " | "
//! name | name
//! ```
//!
//! The data: a synthetic export of 400 patients ingested under `jp-pseudonymized-medical` as dataset
//! `cohort` (dates shifted, timestamps kept); alice has a large budget on it, mallory none.

use std::path::Path;

use arrow::datatypes::DataType;
use enclave::DataDir;
use enclave::demo::{DemoFormat, DemoOptions};
use enclave::dp::{DpEngine, QueryOptions};
use enclave::ingest::{IngestOptions, ingest};

struct Record {
    file: String,
    line: usize,
    principal: String,
    epsilon: f64,
    kind: Kind,
    sql: String,
}

enum Kind {
    Ok,
    Error(regex::Regex),
    Query {
        types: String,
        rows: Rows,
        names: Vec<String>,
    },
}

enum Rows {
    Exactly(usize),
    AtLeast(usize),
    Any,
}

fn parse(path: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(path).expect("read .slt");
    let file = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let (mut principal, mut epsilon) = ("alice".to_owned(), 0.1);
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        if l.is_empty() || l.starts_with('#') {
            i += 1;
            continue;
        }
        if let Some(rest) = l.strip_prefix("control ") {
            match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["principal", p] => principal = (*p).to_owned(),
                ["epsilon", e] => epsilon = e.parse().expect("epsilon"),
                other => panic!("{file}:{}: unknown control {other:?}", i + 1),
            }
            i += 1;
            continue;
        }
        let header_line = i + 1;
        let kind_line = l.to_owned();
        i += 1;
        let mut sql = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim() != "----" {
            sql.push(lines[i]);
            i += 1;
        }
        let kind = if kind_line == "statement ok" {
            Kind::Ok
        } else if let Some(re) = kind_line.strip_prefix("statement error ") {
            Kind::Error(regex::Regex::new(re).expect("regex"))
        } else if let Some(spec) = kind_line.strip_prefix("query ") {
            let mut parts = spec.split_whitespace();
            let types = parts.next().expect("types").to_owned();
            let rows = match parts.next() {
                Some(r) if r.starts_with("rows>=") => Rows::AtLeast(r[6..].parse().expect("n")),
                Some(r) if r.starts_with("rows=") => Rows::Exactly(r[5..].parse().expect("n")),
                None => Rows::Any,
                Some(other) => panic!("{file}:{header_line}: bad rows spec {other}"),
            };
            assert_eq!(
                lines.get(i).map(|l| l.trim()),
                Some("----"),
                "{file}:{header_line}: query needs ----"
            );
            let names = lines[i + 1]
                .split(" | ")
                .map(|s| s.trim().to_owned())
                .collect();
            i += 2;
            Kind::Query { types, rows, names }
        } else {
            panic!("{file}:{header_line}: unknown record '{kind_line}'");
        };
        out.push(Record {
            file: file.clone(),
            line: header_line,
            principal: principal.clone(),
            epsilon,
            kind,
            sql: sql.join("\n"),
        });
    }
    out
}

fn type_letter(dt: &DataType) -> char {
    match dt {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt32
        | DataType::UInt64 => 'I',
        DataType::Float32 | DataType::Float64 => 'R',
        _ => 'T',
    }
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let export = tmp.path().join("export");
    let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 1).expect("date");
    enclave::demo::generate(&DemoOptions {
        patients: 400,
        out: export.clone(),
        format: DemoFormat::Csv,
        seed: 3,
        inject_errors: 0.0,
        today,
    })
    .expect("demo data");
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().expect("init");
    let opts = IngestOptions {
        consent_scope: "test".into(),
        ..IngestOptions::new(
            "H1",
            "cohort",
            export.join("csv"),
            "jp-pseudonymized-medical",
        )
    };
    ingest(
        &dir,
        &dir.keystore().expect("ks"),
        &dir.catalog().expect("catalog"),
        &opts,
    )
    .expect("ingest");
    let engine = DpEngine::open(&dir).expect("engine");
    engine
        .ledger()
        .set_budget("test", "alice", "cohort", 1000.0, 0.5, None)
        .expect("budget");
    engine
        .ledger()
        .set_budget("test", "bob", "cohort", 0.25, 1e-6, None)
        .expect("budget");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let dir_sql = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql");
    let mut files: Vec<_> = std::fs::read_dir(&dir_sql)
        .expect("tests/sql")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    let (mut passed, mut failed) = (0, 0);
    for f in files {
        for r in parse(&f) {
            let options = QueryOptions {
                epsilon: Some(r.epsilon),
                delta: None,
                origin: "slt".into(),
            };
            let spent_before = engine
                .ledger()
                .budget(&r.principal, "cohort")
                .expect("budget")
                .map(|b| (b.spent_epsilon, b.spent_delta, b.spent_rho));
            let got = rt.block_on(engine.answer(&r.principal, "cohort", &r.sql, &options));
            let spent_after = engine
                .ledger()
                .budget(&r.principal, "cohort")
                .expect("budget")
                .map(|b| (b.spent_epsilon, b.spent_delta, b.spent_rho));
            // A refusal costs nothing; only rule 'execution' (accepted, ran, failed) is charged.
            if let Err(e) = &got
                && !matches!(
                    e,
                    enclave::Error::Refused {
                        rule: enclave::dp::Rule::Execution,
                        ..
                    }
                )
            {
                assert_eq!(
                    spent_before, spent_after,
                    "{}:{}: a refusal changed the budget",
                    r.file, r.line
                );
            }
            let verdict: Result<(), String> = match (&r.kind, got) {
                (Kind::Ok, Ok(_)) => Ok(()),
                (Kind::Error(re), Err(e)) if re.is_match(&e.to_string()) => Ok(()),
                (Kind::Error(re), Err(e)) => Err(format!("error '{e}' does not match /{re}/")),
                (Kind::Error(_), Ok(_)) => Err("answered, expected a refusal".into()),
                (Kind::Query { types, rows, names }, Ok(a)) => {
                    let schema = a.batch.schema();
                    let got_types: String = schema
                        .fields()
                        .iter()
                        .map(|f| type_letter(f.data_type()))
                        .collect();
                    let got_names: Vec<String> =
                        schema.fields().iter().map(|f| f.name().clone()).collect();
                    let n = a.batch.num_rows();
                    let rows_ok = match rows {
                        Rows::Exactly(x) => n == *x,
                        Rows::AtLeast(x) => n >= *x,
                        Rows::Any => true,
                    };
                    let noise_ok = a
                        .noise
                        .iter()
                        .all(|c| c.scale > 0.0 && c.intervals.len() == n);
                    if &got_types != types {
                        Err(format!("types {got_types}, expected {types}"))
                    } else if &got_names != names {
                        Err(format!("columns {got_names:?}, expected {names:?}"))
                    } else if !rows_ok {
                        Err(format!("{n} rows"))
                    } else if !noise_ok {
                        Err("a released aggregate lacks its noise scale or intervals".into())
                    } else {
                        Ok(())
                    }
                }
                (_, Err(e)) => Err(format!("refused: {e}")),
            };
            match verdict {
                Ok(()) => passed += 1,
                Err(why) => {
                    failed += 1;
                    eprintln!(
                        "FAILED {}:{}: {why}\n  {}",
                        r.file,
                        r.line,
                        r.sql.replace('\n', "\n  ")
                    );
                }
            }
        }
    }
    // Every record above, answered or refused, is in the audit log, and the log verifies.
    let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("public key");
    let v = engine
        .ledger()
        .verify(pk.trim())
        .expect("audit log verifies");
    let grants = 2;
    assert_eq!(
        v.records as usize,
        passed + failed + grants,
        "one audit record per query (and per grant)"
    );
    println!("slt: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
