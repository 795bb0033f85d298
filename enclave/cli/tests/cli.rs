//! The `enclave` binary's own contract: init is idempotent and never replaces a key; configuration errors
//! are refused up front with file, line and reason, before any row is read or anything is written.

use std::path::Path;
use std::process::{Command, Output};

fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(args)
        .current_dir(cwd)
        .env_remove("ENCLAVE_DATA_DIR")
        .env_remove("ENCLAVE_MASTER_KEY_FILE")
        .output()
        .expect("run enclave")
}

#[test]
fn init_is_idempotent_and_keeps_its_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = run(tmp.path(), &["init"]);
    assert!(first.status.success());
    let key_path = tmp.path().join("enclave-data/master.key");
    let key = std::fs::read(&key_path).expect("key written");
    assert_eq!(key.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    let second = run(tmp.path(), &["init"]);
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("using the master key"));
    assert_eq!(
        std::fs::read(&key_path).expect("key"),
        key,
        "init never replaces a key"
    );
}

#[test]
fn invalid_profiles_are_refused_before_reading_with_file_and_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(run(tmp.path(), &["init"]).status.success());
    let profile = tmp.path().join("p.toml");
    let (_, text) = policies::builtin_profile("hipaa-safe-harbor").expect("builtin");
    std::fs::write(
        &profile,
        text.replacen("action = \"scrub\"", "action = \"shred\"", 1),
    )
    .expect("write");
    let input = tmp.path().join("missing-export");
    let out = run(
        tmp.path(),
        &[
            "ingest",
            "--provider",
            "H1",
            "--dataset",
            "d",
            "--input",
            input.to_str().expect("utf8"),
            "--profile",
            profile.to_str().expect("utf8"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .position(|l| l.contains("action = \"scrub\""))
        .expect("scrub rule")
        + 1;
    assert!(
        err.contains(&format!("p.toml:{line}: ")) && err.contains("unknown action 'shred'"),
        "{err}"
    );
    assert!(!tmp.path().join("enclave-data/datasets/d").exists());

    let out = run(
        tmp.path(),
        &[
            "ingest",
            "--provider",
            "H1",
            "--dataset",
            "d",
            "--input",
            ".",
            "--profile",
            "no-such-profile",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown profile 'no-such-profile'"));
    let out = run(
        tmp.path(),
        &[
            "ingest",
            "--provider",
            "H 1",
            "--dataset",
            "d",
            "--input",
            ".",
            "--profile",
            "hipaa-safe-harbor",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("provider 'H 1' must be"));
}

#[test]
fn commands_on_an_uninitialised_directory_say_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run(tmp.path(), &["catalog", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not initialised"));
}
