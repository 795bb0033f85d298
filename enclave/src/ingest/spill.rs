//! The persons' known identifiers between the two passes, spilled to a file under a key that lives only
//! in this process.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The persons' known identifiers between the two passes, in a file beside the staging directory under a
/// key that exists only in this process's memory (AES-256-GCM, the record's number as its nonce): memory
/// stays flat however many persons the export holds, and the file is unreadable once the run ends. It is
/// deleted when the run ends (a run that dies leaves only ciphertext under a lost key).
pub(super) struct KnownSpill {
    path: PathBuf,
    file: std::fs::File,
    cipher: aes_gcm::Aes256Gcm,
    /// Where each record starts; it ends where the next one starts (or at `written`).
    starts: Vec<u64>,
    pending: Vec<u8>,
    written: u64,
}

impl KnownSpill {
    pub(super) fn create(path: &Path) -> Result<KnownSpill> {
        use aes_gcm::KeyInit;
        let key = crate::keys::random_secret()?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(KnownSpill {
            path: path.to_owned(),
            file,
            cipher: aes_gcm::Aes256Gcm::new((&*key).into()),
            starts: Vec::new(),
            pending: Vec::new(),
            written: 0,
        })
    }

    fn nonce(handle: u32) -> aes_gcm::Nonce<aes_gcm::aes::cipher::consts::U12> {
        let mut n = [0u8; 12];
        n[8..].copy_from_slice(&handle.to_be_bytes());
        n.into()
    }

    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        self.file.write_all(&self.pending)?;
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }
}

impl deidentify::KnownStore for KnownSpill {
    fn put(&mut self, record: &[u8]) -> std::result::Result<u32, String> {
        use aes_gcm::aead::Aead;
        let handle = u32::try_from(self.starts.len()).map_err(|_| "too many persons")?;
        let sealed = self
            .cipher
            .encrypt(&Self::nonce(handle), record)
            .map_err(|_| "cannot encrypt")?;
        self.starts.push(self.written + self.pending.len() as u64);
        self.pending.extend_from_slice(&sealed);
        if self.pending.len() >= 1 << 20 {
            self.flush().map_err(|e| e.to_string())?;
        }
        Ok(handle)
    }

    fn get(&mut self, handle: u32) -> std::result::Result<Vec<u8>, String> {
        use aes_gcm::aead::Aead;
        use std::os::unix::fs::FileExt;
        if !self.pending.is_empty() {
            self.flush().map_err(|e| e.to_string())?;
        }
        let i = handle as usize;
        let start = *self.starts.get(i).ok_or("no such record")?;
        let end = self.starts.get(i + 1).copied().unwrap_or(self.written);
        let mut sealed = vec![0u8; usize::try_from(end - start).map_err(|_| "record too large")?];
        self.file
            .read_exact_at(&mut sealed, start)
            .map_err(|e| e.to_string())?;
        self.cipher
            .decrypt(&Self::nonce(handle), sealed.as_slice())
            .map_err(|_| "record fails authentication".to_owned())
    }
}

impl Drop for KnownSpill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
