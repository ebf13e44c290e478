//! Certificates of the mesh. Every process that gets its identity from the
//! control plane makes a key and a certificate signing request here. With
//! the `pki` feature, a local certificate authority issues certificates:
//! the control plane's IdentityService, `infermesh-certs` and tests use it;
//! edges and sidecars are built without it. Production certificates may
//! come from the operator's own PKI; nothing here is meant to guard
//! anything real outside the mesh, and no certificate is ever checked into
//! the tree.

#[cfg(feature = "pki")]
mod ca;
#[cfg(feature = "pki")]
mod dev;
#[cfg(feature = "pki")]
mod files;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

#[cfg(feature = "pki")]
pub use ca::{CA_VALIDITY, IssuedCert, LEAF_VALIDITY, LocalCa};
#[cfg(feature = "pki")]
pub use dev::{CertPaths, DevPki, DevPkiPaths, write_dev_pki};

use super::identity::IdentityError;

/// Why a certificate could not be generated, loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to generate or sign.
    #[error("cannot {what}: {source}")]
    Generate {
        /// What was being done.
        what: &'static str,
        /// What rcgen reported.
        source: rcgen::Error,
    },
    /// The CA certificate given to `LocalCa::load` is unusable.
    #[error("CA certificate is unusable: {reason}")]
    BadCa {
        /// Why.
        reason: String,
    },
    /// A server certificate needs at least one DNS name or IP address.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    /// A host name is not valid in a DNS SAN.
    #[error("{name:?} is not a valid DNS name for a certificate")]
    BadDnsName {
        /// The name.
        name: String,
    },
    /// A client identity is invalid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A file could not be written or read.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The target directory already holds a CA and overwriting was not asked for.
    #[error("{} already exists; refusing to replace the CA without overwrite", path.display())]
    Exists {
        /// The existing CA file.
        path: std::path::PathBuf,
    },
}

/// A new P-256 key and a certificate signing request for it, both PEM:
/// what a process sends to the control plane for its identity.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = new_key()?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(generate("make a certificate signing request"))?
        .pem()
        .map_err(generate("encode a certificate signing request"))?;
    Ok((key.serialize_pem(), csr))
}

fn new_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("generate a P-256 key"))
}

fn generate(what: &'static str) -> impl Fn(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}
