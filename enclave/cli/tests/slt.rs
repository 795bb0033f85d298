//! Runs the SQL specification in `tests/sql/*.slt` against the DP engine with the `sqllogictest` crate,
//! one data directory per file. `cargo test -p enclave-cli --test slt -- --complete` rewrites the expected
//! results from what the engine answers now (review the diff).
//!
//! DP answers are noisy, so a `query` record's result is its shape, not its values: the column types
//! (I integer, R float, T text or other) and names on the first line, then how many rows (`N rows`, or
//! `selected rows` where keys are selected privately and their number is itself noisy). A refusal is
//! `statement error <regex>` on `refused by rule '<rule>': …`. Two statements set the session:
//!
//! ```text
//! statement ok
//! SET enclave.principal = 'bob'        -- ask as bob from here on (default alice)
//!
//! statement ok
//! SET enclave.epsilon = 0.1            -- spend this per query from here on (default 0.1)
//! ```
//!
//! Besides each record, every query is checked to leave one audit record, a refusal (but for rule
//! `execution`) to leave the budget untouched, every released aggregate to carry its noise scale and an
//! interval per row, and the audit log to verify at the end of each file.
//!
//! The data: a synthetic export of 400 patients ingested under `jp-pseudonymized-medical` as dataset
//! `cohort` (dates shifted, timestamps kept); alice has a large budget on it, bob 0.25 ε, mallory none.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::datatypes::DataType;
use enclave::DataDir;
use enclave::dp::{DpEngine, QueryOptions, Rule};
use enclave::ingest::{IngestOptions, ingest};
use enclave_cli::demo::{DemoFormat, DemoOptions};
use sqllogictest::{DBOutput, DefaultColumnType};

/// The engine as a sqllogictest database: one session (principal, ε) per file.
struct Enclave {
    engine: Arc<DpEngine>,
    principal: String,
    epsilon: f64,
    queries: Arc<AtomicUsize>,
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

/// The value of `SET enclave.<name> = <value>`, if `sql` is that statement.
fn setting<'a>(sql: &'a str, name: &str) -> Option<&'a str> {
    let rest = sql.trim().strip_prefix("SET enclave.")?;
    let (key, value) = rest.split_once('=')?;
    (key.trim() == name).then(|| value.trim().trim_matches('\''))
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Enclave {
    type Error = enclave::Error;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, enclave::Error> {
        if let Some(p) = setting(sql, "principal") {
            self.principal = p.to_owned();
            return Ok(DBOutput::StatementComplete(0));
        }
        if let Some(e) = setting(sql, "epsilon") {
            self.epsilon = e
                .parse()
                .map_err(|_| enclave::Error::Config(format!("bad epsilon {e}")))?;
            return Ok(DBOutput::StatementComplete(0));
        }
        self.queries.fetch_add(1, Ordering::SeqCst);
        let spent = || {
            self.engine
                .ledger()
                .budget(&self.principal, "cohort")
                .map(|b| b.map(|b| (b.spent_epsilon, b.spent_delta, b.spent_rho)))
        };
        let before = spent()?;
        let options = QueryOptions {
            epsilon: Some(self.epsilon),
            delta: None,
            via: enclave::audit::Via::local("slt"),
            ..Default::default()
        };
        let got = self
            .engine
            .answer(&self.principal, "cohort", sql, &options)
            .await;
        if let Err(enclave::Error::Refused { rule, .. }) = &got
            && *rule != Rule::Execution
        {
            assert_eq!(before, spent()?, "a refusal changed the budget: {sql}");
        }
        let a = got?;
        let n = a.batch.num_rows();
        if !a
            .noise
            .iter()
            .all(|c| c.scale > 0.0 && c.intervals.len() == n)
        {
            return Err(enclave::Error::Internal(
                "a released aggregate lacks its noise scale or intervals".into(),
            ));
        }
        let schema = a.batch.schema();
        let types: String = schema
            .fields()
            .iter()
            .map(|f| type_letter(f.data_type()))
            .collect();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let selected = a
            .cost_split
            .iter()
            .any(|(what, _)| what.starts_with("group selection"));
        let rows = if selected {
            "selected rows".to_owned()
        } else {
            format!("{n} rows")
        };
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Text],
            rows: vec![vec![format!("{types} {}", names.join(" | "))], vec![rows]],
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "enclave"
    }
}

/// A fresh data directory with the `cohort` dataset and the grants the specification assumes.
fn setup(root: &Path) -> DataDir {
    let export = root.join("export");
    enclave_cli::demo::generate(&DemoOptions {
        patients: 400,
        out: export.clone(),
        format: DemoFormat::Csv,
        seed: 3,
        inject_errors: 0.0,
        today: chrono::NaiveDate::from_ymd_opt(2026, 11, 1).expect("date"),
    })
    .expect("demo data");
    let dir = DataDir::new(root.join("data"));
    dir.init().expect("init");
    let opts = IngestOptions {
        consent_scope: "test".into(),
        // Exact synthetic values: the answers are compared with figures computed from them.
        danger_keep_unique_values: true,
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
    dir
}

/// Runs (or, with `complete`, rewrites) one file; returns the failure, if any.
fn run_file(rt: &tokio::runtime::Runtime, file: &Path, complete: bool) -> Result<(), String> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = setup(tmp.path());
    let engine = Arc::new(DpEngine::open(&dir).expect("engine"));
    let grants = [("alice", 1000.0, 0.5), ("bob", 0.25, 1e-6)];
    for (who, epsilon, delta) in grants {
        engine
            .ledger()
            .set_budget("test", who, "cohort", epsilon, delta, None)
            .expect("budget");
    }
    let queries = Arc::new(AtomicUsize::new(0));
    let (e, q) = (engine.clone(), queries.clone());
    let mut runner = sqllogictest::Runner::new(move || {
        let (engine, queries) = (e.clone(), q.clone());
        async move {
            Ok(Enclave {
                engine,
                principal: "alice".into(),
                epsilon: 0.1,
                queries,
            })
        }
    });
    let outcome = if complete {
        rt.block_on(runner.update_test_file(
            file,
            " ",
            sqllogictest::default_validator,
            sqllogictest::default_normalizer,
            sqllogictest::default_column_validator,
        ))
        .map_err(|e| e.to_string())
    } else {
        rt.block_on(runner.run_file_async(file))
            .map_err(|e| e.display(true).to_string())
    };
    outcome?;
    // Every query above, answered or refused, is in the audit log (beside the grants), and it verifies.
    let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("public key");
    let v = engine
        .ledger()
        .verify(pk.trim())
        .map_err(|e| format!("the audit log does not verify: {e}"))?;
    let expected = queries.load(Ordering::SeqCst) + grants.len();
    if v.records as usize != expected {
        return Err(format!(
            "{} audit records for {expected} queries and grants",
            v.records
        ));
    }
    Ok(())
}

fn main() {
    let complete = std::env::args().any(|a| a == "--complete");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir_sql = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir_sql)
        .expect("tests/sql")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    let (mut passed, mut failed) = (0, 0);
    for f in &files {
        match run_file(&rt, f, complete) {
            Ok(()) => {
                passed += 1;
                println!("ok     {}", f.display());
            }
            Err(why) => {
                failed += 1;
                eprintln!("FAILED {}\n{why}", f.display());
            }
        }
    }
    println!("slt files: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
