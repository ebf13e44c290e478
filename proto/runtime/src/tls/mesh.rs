//! Mutual TLS between the mesh's own processes on the data path (edge →
//! sidecar, edge → edge): a client configuration presenting this process's
//! identity (reloaded from disk, so a renewed certificate is used for new
//! connections) and trusting the mesh CA, and the name a connection is
//! checked against.
//!
//! Replicas and peer edges are reached by IP address, and their
//! certificates name workloads (`spiffe://infermesh/...`), not hosts, so
//! the server certificate is verified in two steps: the chain against the
//! mesh CA during the handshake (host names are not checked), then, once
//! the handshake is done, the identity in the certificate against the one
//! the caller meant to reach (`check_peer`). The expected identity travels
//! in the request URI's user-info (`expected_authority`), which also makes
//! the client's connection pool keep connections per identity and address.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_util::sync::CancellationToken;

use super::identity::{IdentityError, PeerIdentity};
use super::pem::{self, TlsError};
use super::server::{ALPN_HTTP1, CertWatcher, ReloadingCertResolver};

/// Separates the segments of an identity in a URI's user-info, where `/`
/// cannot appear; identity names never hold it.
const SEGMENT: char = '~';

/// Whether a data-path hop inside the mesh runs over mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MeshTls {
    /// Mutual TLS with this process's identity (its control-plane
    /// certificate); the peer's certificate must name the workload meant.
    Mutual,
    /// Plain HTTP with no authentication: only where the network itself
    /// keeps everyone else out.
    Off,
}

/// A client configuration for mutual TLS inside the mesh, with the task
/// that reloads its certificate.
#[derive(Debug, Clone)]
pub struct MeshClientTls {
    /// Hand to a `TlsConnector`.
    pub config: Arc<ClientConfig>,
    /// Keeps the certificate reloading while any clone lives.
    _watcher: Arc<CertWatcher>,
}

impl MeshClientTls {
    /// Presents the pair at `cert`/`key` (re-read every `reload_every`)
    /// and trusts servers whose chain leads to a CA in `ca`. Speaks
    /// HTTP/1.1 only. Must be called inside a tokio runtime.
    pub fn new(
        ca: &Path,
        cert: &Path,
        key: &Path,
        reload_every: Duration,
        cancel: CancellationToken,
    ) -> Result<Self, TlsError> {
        let provider = pem::provider();
        let roots = Arc::new(pem::root_store(ca)?);
        let resolver = Arc::new(ReloadingCertResolver::load(
            cert,
            key,
            Arc::clone(&provider),
        )?);
        let watcher = resolver.watch(reload_every, cancel);
        let verifier = Arc::new(ChainOnly {
            roots,
            provider: Arc::clone(&provider),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(ClientCert(resolver)));
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        // A resumed session skips the certificate; every connection shows
        // its identity afresh (connections are pooled, so this is rare).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            _watcher: Arc::new(watcher),
        })
    }
}

/// Presents the reloaded pair as the client certificate.
#[derive(Debug)]
struct ClientCert(Arc<ReloadingCertResolver>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a server's chain against the mesh CA and its signatures, but
/// not a host name: the workload identity is checked after the handshake.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `address` (`host:port`) with `identity` as its user-info, e.g.
/// `sidecar~eu-west~llama-eu~vllm-0@10.0.0.7:8081`: the authority of a
/// request to a workload that must prove it is `identity`.
pub fn expected_authority(identity: &PeerIdentity, address: &str) -> String {
    let path = identity.to_string().replace('/', &SEGMENT.to_string());
    format!("{path}@{address}")
}

/// An authority's user-info that does not name an identity.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{info:?} does not name an identity: {error}")]
pub struct NotAnIdentity {
    /// The user-info.
    pub info: String,
    /// Why the identity URI made from it does not parse.
    pub error: IdentityError,
}

/// The identity an authority made by `expected_authority` asks for, and
/// the address part; `None` for the identity when there is no user-info.
pub fn split_authority(authority: &str) -> (Option<Result<PeerIdentity, NotAnIdentity>>, &str) {
    match authority.rsplit_once('@') {
        None => (None, authority),
        Some((info, address)) => {
            let uri = format!(
                "spiffe://{}/{}",
                super::identity::TRUST_DOMAIN,
                info.replace(SEGMENT, "/")
            );
            let identity = uri.parse::<PeerIdentity>().map_err(|error| NotAnIdentity {
                info: info.to_string(),
                error,
            });
            (Some(identity), address)
        }
    }
}

/// Why a server's certificate does not fit the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerMismatch {
    /// The certificate carries no infermesh identity.
    #[error("the certificate names no infermesh identity (expected {expected})")]
    NoIdentity {
        /// The identity asked for.
        expected: String,
    },
    /// It names another workload.
    #[error("the certificate names {found}, not {expected}")]
    Other {
        /// The identity asked for.
        expected: String,
        /// The identity found.
        found: String,
    },
}

/// Checks that the certificates a server presented name `expected`.
pub fn check_peer(
    expected: &PeerIdentity,
    presented: Option<&[CertificateDer<'_>]>,
) -> Result<(), PeerMismatch> {
    match PeerIdentity::from_presented(presented) {
        None => Err(PeerMismatch::NoIdentity {
            expected: expected.to_string(),
        }),
        Some(found) if &found == expected => Ok(()),
        Some(found) => Err(PeerMismatch::Other {
            expected: expected.to_string(),
            found: found.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerRole;

    #[test]
    fn an_expected_identity_round_trips_through_an_authority() {
        let sidecar = PeerIdentity::sidecar("eu-west", "llama_eu", "vllm-0.a").unwrap();
        let authority = expected_authority(&sidecar, "10.0.0.7:8081");
        assert_eq!(authority, "sidecar~eu-west~llama_eu~vllm-0.a@10.0.0.7:8081");
        let parsed: http::uri::Authority = authority.parse().expect("a valid URI authority");
        assert_eq!(parsed.host(), "10.0.0.7");
        assert_eq!(parsed.port_u16(), Some(8081));
        let (identity, address) = split_authority(parsed.as_str());
        assert_eq!(identity, Some(Ok(sidecar)));
        assert_eq!(address, "10.0.0.7:8081");

        let edge = PeerIdentity::new(PeerRole::Edge, "us-east").unwrap();
        let (identity, _) = split_authority(&expected_authority(&edge, "[::1]:443"));
        assert_eq!(identity, Some(Ok(edge)));
        assert_eq!(split_authority("10.0.0.7:8081"), (None, "10.0.0.7:8081"));
        let (bad, _) = split_authority("nobody~x~y@10.0.0.7:8081");
        assert!(bad.unwrap().is_err());
    }

    #[test]
    fn another_workloads_certificate_is_a_mismatch() {
        let ca = crate::tls::pki::LocalCa::generate().unwrap();
        let meant = PeerIdentity::sidecar("eu", "pool", "a").unwrap();
        let other = PeerIdentity::sidecar("eu", "pool", "b").unwrap();
        let der = |identity: &PeerIdentity| {
            let issued = ca.issue_client(identity).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.pem");
            std::fs::write(&path, issued.cert_pem).unwrap();
            crate::tls::load_certs(&path).unwrap()
        };
        assert_eq!(check_peer(&meant, Some(&der(&meant))), Ok(()));
        let error = check_peer(&meant, Some(&der(&other))).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the certificate names sidecar/eu/pool/b, not sidecar/eu/pool/a"
        );
        assert!(matches!(
            check_peer(&meant, None),
            Err(PeerMismatch::NoIdentity { .. })
        ));
    }
}
