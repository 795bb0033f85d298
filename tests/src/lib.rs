//! Helpers for the end-to-end tests in `tests/tests/`: run the real `enclave` binary, read its encrypted
//! output back through DataFusion, and load the demo manifest. The tests themselves are the point.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `enclave` binary built alongside the tests.
pub fn enclave_bin() -> PathBuf {
    // tests/ is a workspace member; the binary lives in the shared target directory.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    dir.join("enclave")
}

/// Runs `enclave` with `args` in `cwd`; panics with its output when it fails.
pub fn enclave(cwd: &Path, args: &[&str]) -> String {
    let out = enclave_output(cwd, args);
    assert!(
        out.status.success(),
        "enclave {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `enclave` with `args` in `cwd` and returns its output, whatever its exit status.
pub fn enclave_output(cwd: &Path, args: &[&str]) -> Output {
    Command::new(enclave_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("ENCLAVE_DATA_DIR")
        .env_remove("ENCLAVE_MASTER_KEY_FILE")
        .output()
        .expect("run the enclave binary")
}

/// The repository's shared test data (`../shared/data` from the workspace root).
pub fn shared_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name)
}
