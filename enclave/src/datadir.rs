//! The data directory: where the database, the master key (by default) and dataset versions live.
//!
//! ```text
//! enclave-data/
//!   enclave.db                      catalog, keystore, budget ledger, audit log
//!   audit-public-key.hex            Ed25519 key the audit checkpoints verify against
//!   master.key                      32 random bytes, mode 0600 (unless ENCLAVE_MASTER_KEY_FILE names one)
//!   datasets/<name>/<version>/      <table>.parquet, quarantine.parquet (encrypted), report.json/.txt
//!   staging/                        runs in progress; never read
//! ```

use std::path::{Path, PathBuf};

use crate::keys::{Keystore, MasterKey};
use crate::{Error, Result};

/// Environment variable naming an existing master key file.
pub const MASTER_KEY_ENV: &str = "ENCLAVE_MASTER_KEY_FILE";

/// A data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    master_key: PathBuf,
}

impl DataDir {
    /// The data directory at `root`, with the master key from `ENCLAVE_MASTER_KEY_FILE` or `root/master.key`.
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        let root = root.into();
        let master_key = std::env::var_os(MASTER_KEY_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("master.key"));
        DataDir { root, master_key }
    }

    /// Root path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The database file.
    pub fn db(&self) -> PathBuf {
        self.root.join("enclave.db")
    }

    /// The master key file.
    pub fn master_key_path(&self) -> &Path {
        &self.master_key
    }

    /// Creates the directory, database and master key as needed. Idempotent; never overwrites a key.
    /// Returns a line per thing it did.
    pub fn init(&self) -> Result<Vec<String>> {
        let mut did = Vec::new();
        for d in [
            self.root.clone(),
            self.root.join("datasets"),
            self.root.join("staging"),
        ] {
            if !d.exists() {
                std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
                did.push(format!("created {}", d.display()));
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700));
        }
        if self.master_key.exists() {
            MasterKey::read(&self.master_key)?;
            did.push(format!(
                "using the master key at {}",
                self.master_key.display()
            ));
        } else if std::env::var_os(MASTER_KEY_ENV).is_some() {
            return Err(Error::Config(format!(
                "{MASTER_KEY_ENV} names {}, which does not exist",
                self.master_key.display()
            )));
        } else {
            MasterKey::create(&self.master_key)?;
            did.push(format!(
                "created master key {} (mode 0600)",
                self.master_key.display()
            ));
        }
        let existed = self.db().exists();
        let ks = Keystore::open(&self.db(), &self.master_key)?;
        catalog::SqliteCatalog::open(&self.db())?;
        ks.linkage_key()?;
        let ledger = crate::ledger::Ledger::open(&self.db(), &ks)?;
        let pk = ledger.public_key_hex();
        let pk_path = self.audit_public_key_path();
        match std::fs::read_to_string(&pk_path) {
            Ok(existing) if existing.trim() == pk => {}
            Ok(_) => {
                return Err(Error::Key(format!(
                    "{} does not hold this enclave's audit public key",
                    pk_path.display()
                )));
            }
            Err(_) => {
                crate::ingest::write_synced(&pk_path, format!("{pk}\n").as_bytes())?;
                did.push(format!(
                    "exported the audit public key to {}",
                    pk_path.display()
                ));
            }
        }
        if !existed {
            did.push(format!("created database {}", self.db().display()));
        }
        Ok(did)
    }

    /// The exported audit public key (hex), which `audit verify` checks the log against.
    pub fn audit_public_key_path(&self) -> PathBuf {
        self.root.join("audit-public-key.hex")
    }

    /// Opens the budget ledger and audit log.
    pub fn ledger(&self, keystore: &Keystore) -> Result<crate::ledger::Ledger> {
        crate::ledger::Ledger::open(&self.db(), keystore)
    }

    /// Opens the keystore (the data directory must be initialised).
    pub fn keystore(&self) -> Result<Keystore> {
        if !self.db().exists() {
            return Err(Error::Config(format!(
                "{} is not initialised: run `enclave init --data-dir {}`",
                self.root.display(),
                self.root.display()
            )));
        }
        Keystore::open(&self.db(), &self.master_key)
    }

    /// Opens the catalog.
    pub fn catalog(&self) -> Result<catalog::SqliteCatalog> {
        if !self.db().exists() {
            return Err(Error::Config(format!(
                "{} is not initialised: run `enclave init`",
                self.root.display()
            )));
        }
        Ok(catalog::SqliteCatalog::open(&self.db())?)
    }

    /// A fresh staging directory for one run.
    pub fn staging_dir(&self, dataset: &str, version: &str) -> Result<PathBuf> {
        let d = self
            .root
            .join("staging")
            .join(format!("{dataset}-{version}-{}", random_name_part()?));
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        Ok(d)
    }

    /// Moves a finished staging directory to its published place. A leftover directory at the target
    /// (from a run that died before its catalog transaction) is not in the catalog, so it is replaced.
    pub fn publish_dir(&self, staging: &Path, target: &Path) -> Result<()> {
        let parent = target
            .parent()
            .ok_or_else(|| Error::Internal("version path has no parent".into()))?;
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        if target.exists() {
            std::fs::remove_dir_all(target).map_err(|e| Error::io(target, e))?;
        }
        std::fs::rename(staging, target).map_err(|e| Error::io(target, e))?;
        crate::ingest::sync_dir(parent)
    }
}

/// A random name part (12 hex digits), so concurrent runs, even in several processes, never share a
/// temporary file or directory.
pub(crate) fn random_name_part() -> Result<String> {
    let mut n = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .map_err(|_| Error::Internal("system random source failed".into()))?;
    Ok(hex::encode(n))
}
