//! The FHIR readers under arbitrary bytes: the first byte picks bulk NDJSON (one resource per line) or a
//! JSON document (a Bundle or one resource), the rest is its content. Nothing may panic (a resource that
//! does not parse is a rejected row; one outside the model is counted).
#![no_main]

use std::sync::OnceLock;

use deidentify::{Pass, discover, read_file};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("enclave-fuzz-fhir-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((first, content)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let names = ["Patient.000.ndjson", "bundle.json"];
    for name in names {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let path = dir.join(names[usize::from(*first) % 2]);
    std::fs::write(&path, content).expect("write");
    let Ok(found) = discover(&path, &[]) else {
        return;
    };
    let mut unmodelled = Default::default();
    for pass in [Pass::PatientsOnly, Pass::All] {
        for file in &found.files {
            let _ = read_file(file, pass, &mut unmodelled, &mut |_| Ok(()));
        }
    }
});
