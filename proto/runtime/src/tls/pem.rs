//! Reading PEM files into rustls types, with errors that name the file and
//! what is wrong with it. Every loader in `tls` goes through here so an
//! operator sees the same message whichever process refused the file. This
//! module never decides what a certificate is trusted for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why TLS material could not be loaded or a TLS configuration built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read (missing, unreadable).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser reported.
        source: rustls::pki_types::pem::Error,
    },
    /// The file holds no `CERTIFICATE` block.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key block (PKCS#8, SEC1 or PKCS#1).
    #[error("{} holds no PEM private key", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a kind the crypto provider cannot use.
    #[error("{} holds a private key that cannot be used: {source}", path.display())]
    UnusableKey {
        /// The key file.
        path: PathBuf,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// The first certificate in the file is not a well-formed X.509 certificate.
    #[error("{} holds a certificate that cannot be parsed: {source}", path.display())]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A CA file holds no certificate usable as a trust anchor.
    #[error("{} holds no certificate usable as a trust anchor: {reason}", path.display())]
    BadTrustAnchor {
        /// The CA file.
        path: PathBuf,
        /// Why the certificates were refused.
        reason: String,
    },
    /// Client authentication was required but no client CA was given.
    #[error("client certificates are required but no client CA file was given")]
    ClientCaMissing,
    /// rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Reads the whole file at `path`.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every `CERTIFICATE` block in `pem`, in order; at least one.
pub(crate) fn certs_from_pem(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key block in `pem`.
pub(crate) fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// Reads a PEM certificate chain (end-entity first) from `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(path, &read(path)?)
}

/// Reads the first PEM private key from `path`.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem(path, &read(path)?)
}

/// Parses a chain and key already read from `cert` and `key`, checking that they match.
pub(crate) fn certified_key_from_pem(
    cert: (&Path, &[u8]),
    key: (&Path, &[u8]),
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certs_from_pem(cert.0, cert.1)?;
    let der = key_from_pem(key.0, key.1)?;
    let signing_key = provider
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::UnusableKey {
            path: key.0.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // A key that cannot report its public half is trusted, as rustls itself does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert.0.to_owned(),
            key: key.0.to_owned(),
        }),
        Err(other) => Err(TlsError::BadCertificate {
            path: cert.0.to_owned(),
            source: other,
        }),
    }
}

/// Loads the chain at `cert` and key at `key`, checking that the key matches the certificate.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    certified_key_from_pem((cert, &cert_pem), (key, &key_pem), provider)
}

/// A trust store holding every certificate in the PEM file at `path`; at least one must be usable.
pub fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(load_certs(path)?);
    if added == 0 {
        return Err(TlsError::BadTrustAnchor {
            path: path.to_owned(),
            reason: format!("all {ignored} certificates were refused"),
        });
    }
    Ok(roots)
}

/// The crypto provider every infermesh TLS endpoint uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let error = load_certs(Path::new("/nonexistent/server.pem")).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }));
        assert!(
            error.to_string().contains("/nonexistent/server.pem"),
            "{error}"
        );
    }

    #[test]
    fn a_pem_block_that_is_not_a_certificate_is_reported_as_such() {
        let ca = crate::tls::pki::LocalCa::generate().unwrap();
        let issued = ca.issue_server(&["localhost"], &[]).unwrap();
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let (cert, key) = (Path::new("server.pem"), Path::new("server-key.pem"));
        let error = certified_key_from_pem(
            (cert, garbage),
            (key, issued.key_pem.as_bytes()),
            &provider(),
        )
        .unwrap_err();
        assert!(matches!(error, TlsError::BadCertificate { .. }), "{error}");
        assert!(error.to_string().contains("server.pem"), "{error}");
    }

    #[test]
    fn pem_without_the_expected_block_says_which_block_is_missing() {
        let path = Path::new("x.pem");
        assert!(matches!(
            certs_from_pem(path, b"hello"),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            key_from_pem(path, b"hello"),
            Err(TlsError::NoPrivateKey { .. })
        ));
    }
}
