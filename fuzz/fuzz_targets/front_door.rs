//! The DP front door under arbitrary text: over a small ingested dataset (the Synthea sample in
//! `tests/data`), every input is prepared; nothing may panic, and a query that `prepare` accepts must
//! then be answered (never refused by rule `execution`, never an internal error): an accepted query
//! cannot fail on the data.
#![no_main]

use std::sync::OnceLock;

use enclave::DataDir;
use enclave::dp::{DpEngine, QueryOptions};
use enclave::ingest::{IngestOptions, ingest};
use libfuzzer_sys::fuzz_target;

struct Setup {
    rt: tokio::runtime::Runtime,
    engine: DpEngine,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // One directory, replaced by each run (not one per process left behind).
        let root = std::env::temp_dir().join("enclave-fuzz-front-door");
        let _ = std::fs::remove_dir_all(&root);
        let dir = DataDir::new(root);
        dir.init().expect("init");
        let export =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/synthea-csv-27");
        let options = IngestOptions {
            consent_scope: "fuzz".into(),
            ..IngestOptions::new("fuzz", "demo", &export, "hipaa-safe-harbor")
        };
        ingest(
            &dir,
            &dir.keystore().expect("keys"),
            &dir.catalog().expect("catalog"),
            &options,
        )
        .expect("ingest");
        let engine = DpEngine::open(&dir).expect("engine");
        engine
            .ledger()
            .set_budget("fuzz", "fuzz", "demo", 9e6, 0.5, None)
            .expect("grant");
        Setup {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
            engine,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    if sql.len() > 4096 {
        return;
    }
    let s = setup();
    let options = QueryOptions {
        epsilon: Some(1.0),
        ..QueryOptions::default()
    };
    if s.rt
        .block_on(s.engine.prepare("fuzz", "demo", sql, &options))
        .is_err()
    {
        return;
    }
    match s
        .rt
        .block_on(s.engine.answer("fuzz", "demo", sql, &options))
    {
        Ok(_) => {}
        Err(enclave::Error::Refused {
            rule,
            message,
            receipt,
        }) => {
            assert!(
                !matches!(rule, enclave::dp::Rule::Execution),
                "prepared, then failed while running: {sql:?}: {message}"
            );
            assert!(receipt.is_some(), "a refusal without its receipt: {sql:?}");
        }
        Err(e) => panic!("prepared, then failed: {sql:?}: {e}"),
    }
});
