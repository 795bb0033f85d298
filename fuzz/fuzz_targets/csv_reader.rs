//! The CSV reader under arbitrary bytes: the first byte picks which Synthea table the file claims to be,
//! the rest is its content. Nothing may panic (a bad row is a rejected row; a file the CSV parser cannot
//! start is an error for that file).
#![no_main]

use std::sync::OnceLock;

use deidentify::{Pass, discover, read_file};
use libfuzzer_sys::fuzz_target;
use policies::CsvMapping;

const NAMES: [&str; 6] = [
    "patients.csv",
    "encounters.csv",
    "conditions.csv",
    "observations.csv",
    "medications.csv",
    "procedures.csv",
];

fn scratch() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("enclave-fuzz-csv-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((first, content)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    for name in NAMES {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let path = dir.join(NAMES[usize::from(*first) % NAMES.len()]);
    std::fs::write(&path, content).expect("write");
    let Ok(found) = discover(&path, &CsvMapping::synthea()) else {
        return;
    };
    let mut unmodelled = Default::default();
    for file in &found.files {
        let _ = read_file(file, Pass::All, &mut unmodelled, &mut |_| Ok(()));
    }
});
