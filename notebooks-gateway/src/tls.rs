//! TLS for every listener (rustls with ring): the server configuration from a PEM certificate chain and
//! private key, and a self-signed pair for a local enclave (`enclave init --self-signed`). Each listener
//! offers its own ALPN protocol (`http/1.1`, `h2` for gRPC, `postgresql`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// Why TLS could not be set up. Messages name the file, never its contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file is missing, unreadable or not the PEM expected.
    #[error("TLS (rule 'tls'): {0}")]
    File(String),
    /// The certificate and key do not make a server configuration.
    #[error(
        "TLS (rule 'tls'): the certificate and key do not fit together or are not supported: {0}"
    )]
    Config(String),
}

/// A loaded certificate chain and key, to make each listener's acceptor from.
#[derive(Clone)]
pub struct Tls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({} certificates)", self.chain.len())
    }
}

impl Tls {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1), and
    /// checks that they make a server configuration.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|_| {
                TlsError::File(format!(
                    "{} is not a readable PEM certificate chain",
                    cert.display()
                ))
            })?;
        if chain.is_empty() {
            return Err(TlsError::File(format!(
                "{} holds no certificate",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|_| {
            TlsError::File(format!(
                "{} is not a readable PEM private key",
                key.display()
            ))
        })?;
        let tls = Tls {
            chain,
            key: Arc::new(key),
        };
        tls.acceptor(b"http/1.1")?;
        Ok(tls)
    }

    /// An acceptor offering `alpn`.
    pub fn acceptor(&self, alpn: &[u8]) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Writes a self-signed certificate for `localhost`, `127.0.0.1` and `::1` (and `hosts`) with its key
/// under `dir` (`cert.pem`, `key.pem`, the key readable by its owner only), unless both exist. Returns
/// their paths and whether they were made now.
pub fn self_signed(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf, bool), TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path, false));
    }
    let io = |e: std::io::Error| TlsError::File(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(hosts.iter().cloned());
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Config(e.to_string()))?;
    let key_pem = certified.signing_key.serialize_pem();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io)?;
        f.write_all(key_pem.as_bytes()).map_err(io)?;
    }
    std::fs::write(&cert_path, certified.cert.pem()).map_err(io)?;
    Ok((cert_path, key_path, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_loads_and_is_made_once() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key, made) = self_signed(dir.path(), &[]).expect("made");
        assert!(made);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is its owner's only");
        Tls::load(&cert, &key).expect("loads");
        let (_, _, again) = self_signed(dir.path(), &[]).expect("kept");
        assert!(!again);
    }

    #[test]
    fn bad_files_are_named_without_their_contents() {
        let dir = tempfile::tempdir().expect("dir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "SECRET-LOOKING BYTES").expect("write");
        let e = Tls::load(&junk, &junk).expect_err("refused");
        assert!(e.to_string().contains("junk.pem"), "{e}");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let (cert, _, _) = self_signed(dir.path(), &[]).expect("made");
        let e = Tls::load(&cert, &junk).expect_err("no key");
        assert!(e.to_string().contains("private key"), "{e}");
    }
}
