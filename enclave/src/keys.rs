//! Key management: the master key file, and the keystore of wrapped secrets in the enclave database.
//!
//! The master key (32 random bytes, file mode 0600) never encrypts data itself: it wraps the per-version
//! data keys and the linkage key with AES-256-GCM (`aes-gcm`), each wrap bound to its key ID as associated
//! data. Rotation re-wraps every secret under a new master key in one database transaction, then swaps
//! the key file atomically; a crash between the two is finished on the next start. Nothing here derives
//! `Debug` over key bytes, and errors never carry them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, params};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// 32 bytes of key material, zeroised on drop.
pub type Secret = Zeroizing<[u8; 32]>;

/// Fresh random key bytes from the system CSPRNG.
pub fn random_secret() -> Result<Secret> {
    let mut k = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(k.as_mut())
        .map_err(|_| Error::Internal("system random source failed".into()))?;
    Ok(k)
}

/// The master key.
pub struct MasterKey {
    key: Secret,
}

impl MasterKey {
    /// A short public fingerprint (HMAC of a fixed label): identifies the key, reveals nothing of it.
    pub fn fingerprint(&self) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, self.key.as_ref());
        hex::encode(&hmac::sign(&k, b"rwd-enclave master key fingerprint").as_ref()[..8])
    }

    /// Reads a key file (exactly 32 bytes).
    pub fn read(path: &Path) -> Result<MasterKey> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|e| Error::io(path, e))?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::Config(format!(
                "{} is not a 32-byte master key file",
                path.display()
            ))
        })?;
        Ok(MasterKey {
            key: Zeroizing::new(key),
        })
    }

    /// Creates a new random key file with mode 0600; refuses to overwrite an existing file.
    pub fn create(path: &Path) -> Result<MasterKey> {
        let key = random_secret()?;
        write_key_file(path, &key, false)?;
        Ok(MasterKey { key })
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new((&*self.key).into())
    }

    /// Wraps a secret: `1 || nonce || AES-256-GCM(secret, aad = key_id)`.
    pub fn wrap(&self, key_id: &str, secret: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Internal("system random source failed".into()))?;
        let ct = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: secret,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Internal("key wrapping failed".into()))?;
        let mut out = Vec::with_capacity(1 + 12 + ct.len());
        out.push(1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Unwraps a secret wrapped for `key_id`.
    pub fn unwrap_key(&self, key_id: &str, wrapped: &[u8]) -> Result<Secret> {
        if wrapped.len() < 13 || wrapped[0] != 1 {
            return Err(Error::Key(format!(
                "wrapped key '{key_id}' has an unknown format"
            )));
        }
        let pt = Zeroizing::new(
            self.cipher()
                .decrypt(
                    &Nonce::try_from(&wrapped[1..13]).map_err(|_| {
                        Error::Key(format!("wrapped key '{key_id}' has an unknown format"))
                    })?,
                    Payload {
                        msg: &wrapped[13..],
                        aad: key_id.as_bytes(),
                    },
                )
                .map_err(|_| {
                    Error::Key(format!(
                        "key '{key_id}' does not unwrap under this master key"
                    ))
                })?,
        );
        let k: [u8; 32] = pt
            .as_slice()
            .try_into()
            .map_err(|_| Error::Key(format!("key '{key_id}' has the wrong length")))?;
        Ok(Zeroizing::new(k))
    }
}

fn write_key_file(path: &Path, key: &[u8; 32], overwrite: bool) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(key)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Key ID of the linkage key.
pub const LINKAGE_KEY_ID: &str = "linkage";

/// Wrapped secrets in the enclave database, and the master key that opens them.
pub struct Keystore {
    conn: Mutex<Connection>,
    master: MasterKey,
    master_path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enclave_keys (
    key_id TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    master_fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL
);";

impl Keystore {
    /// Opens the keystore in `db` with the master key at `master_path`, finishing an interrupted rotation.
    pub fn open(db: &Path, master_path: &Path) -> Result<Keystore> {
        let conn = catalog::open_database(db)?;
        conn.execute_batch(SCHEMA)?;
        let mut master = MasterKey::read(master_path)?;
        let stored: Option<String> = conn
            .query_row(
                "SELECT master_fingerprint FROM enclave_keys LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(fp) = stored.filter(|fp| *fp != master.fingerprint()) {
            let next = next_path(master_path);
            match MasterKey::read(&next) {
                Ok(n) if n.fingerprint() == fp => {
                    // A rotation committed its re-wrap but died before swapping the key file: finish it.
                    fs::rename(&next, master_path).map_err(|e| Error::io(master_path, e))?;
                    master = n;
                }
                _ => {
                    return Err(Error::Key(format!(
                        "the master key at {} is not the one that wrapped this enclave's keys",
                        master_path.display()
                    )));
                }
            }
        }
        Ok(Keystore {
            conn: Mutex::new(conn),
            master,
            master_path: master_path.to_owned(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a new secret under `key_id`.
    pub fn put(&self, key_id: &str, purpose: &str, secret: &[u8; 32]) -> Result<()> {
        let wrapped = self.master.wrap(key_id, secret)?;
        self.conn().execute(
            "INSERT INTO enclave_keys (key_id, purpose, wrapped, master_fingerprint, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key_id, purpose, wrapped, self.master.fingerprint(), chrono::Utc::now().to_rfc3339()],
        )?;
        Ok(())
    }

    /// Unwraps the secret stored under `key_id`.
    pub fn get(&self, key_id: &str) -> Result<Secret> {
        let wrapped: Option<Vec<u8>> = self
            .conn()
            .query_row(
                "SELECT wrapped FROM enclave_keys WHERE key_id = ?1",
                [key_id],
                |r| r.get(0),
            )
            .optional()?;
        let wrapped =
            wrapped.ok_or_else(|| Error::Key(format!("no key '{key_id}' in the keystore")))?;
        self.master.unwrap_key(key_id, &wrapped)
    }

    /// The linkage key, created on first use.
    pub fn linkage_key(&self) -> Result<Secret> {
        match self.get(LINKAGE_KEY_ID) {
            Ok(k) => Ok(k),
            Err(Error::Key(_)) if !self.exists(LINKAGE_KEY_ID)? => {
                let k = random_secret()?;
                self.put(LINKAGE_KEY_ID, "pseudonym linkage", &k)?;
                Ok(k)
            }
            Err(e) => Err(e),
        }
    }

    fn exists(&self, key_id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM enclave_keys WHERE key_id = ?1",
                [key_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Creates a fresh data key for a dataset version and returns `(key_id, key)`.
    pub fn new_data_key(&self, label: &str) -> Result<(String, Secret)> {
        let mut id = [0u8; 8];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| Error::Internal("system random source failed".into()))?;
        let key_id = format!("dk-{}", hex::encode(id));
        let key = random_secret()?;
        self.put(&key_id, &format!("data key {label}"), &key)?;
        Ok((key_id, key))
    }

    /// Public fingerprint of the master key in use.
    pub fn master_fingerprint(&self) -> String {
        self.master.fingerprint()
    }

    /// Re-wraps every stored secret under a new random master key and replaces the key file.
    /// Returns how many secrets were re-wrapped.
    pub fn rotate(&mut self) -> Result<usize> {
        let next_path = next_path(&self.master_path);
        let _ = fs::remove_file(&next_path);
        let next = MasterKey::create(&next_path)?;
        let n = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let rows: Vec<(String, Vec<u8>)> = tx
                .prepare("SELECT key_id, wrapped FROM enclave_keys")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (id, wrapped) in &rows {
                let secret = self.master.unwrap_key(id, wrapped)?;
                tx.execute(
                    "UPDATE enclave_keys SET wrapped = ?1, master_fingerprint = ?2 WHERE key_id = ?3",
                    params![next.wrap(id, secret.as_ref())?, next.fingerprint(), id],
                )?;
            }
            tx.commit()?;
            rows.len()
        };
        fs::rename(&next_path, &self.master_path).map_err(|e| Error::io(&self.master_path, e))?;
        if let Some(dir) = self.master_path.parent() {
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        self.master = next;
        Ok(n)
    }
}

fn next_path(master: &Path) -> PathBuf {
    let mut s = master.as_os_str().to_owned();
    s.push(".next");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_rotate_and_refuse_the_wrong_master_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, key) = (dir.path().join("enclave.db"), dir.path().join("master.key"));
        MasterKey::create(&key).expect("create");
        assert!(MasterKey::create(&key).is_err(), "never overwrites a key");
        let mut ks = Keystore::open(&db, &key).expect("open");
        let link = ks.linkage_key().expect("linkage");
        let (id, dk) = ks.new_data_key("cohort@1").expect("dk");
        let before = ks.master_fingerprint();
        assert_eq!(ks.rotate().expect("rotate"), 2);
        assert_ne!(before, ks.master_fingerprint());
        drop(ks);
        let ks = Keystore::open(&db, &key).expect("reopen after rotation");
        assert_eq!(ks.get(&id).expect("dk").as_ref(), dk.as_ref());
        assert_eq!(ks.linkage_key().expect("linkage").as_ref(), link.as_ref());
        drop(ks);
        fs::remove_file(&key).expect("rm");
        MasterKey::create(&key).expect("other key");
        let err = Keystore::open(&db, &key).err().expect("wrong key refused");
        assert!(
            err.to_string().contains("not the one that wrapped"),
            "{err}"
        );
    }
}
