//! TLS for the control plane's gRPC, in tonic's own configuration types:
//! the client side (trust the infermesh CA, optionally present a client
//! certificate) and the server side (serve a certificate, optionally verify
//! clients), plus reading the caller's identity off a request. Files are
//! checked here, at start, so a bad path fails with its name rather than at
//! the first connection. Authorization by role is left to each service.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::identity::PeerIdentity;
use super::pem::{self, TlsError};

/// How long a gRPC server waits for a client to finish the TLS handshake.
pub const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Client TLS trusting the CA in `ca`, presenting `client_cert` (cert, key) when given.
pub fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    let config = ClientTlsConfig::new().ca_certificate(trust_anchor(ca)?);
    match client_cert {
        Some((cert, key)) => Ok(config.identity(identity(cert, key)?)),
        None => Ok(config),
    }
}

/// Server TLS serving `cert`/`key`; with `client_ca`, clients are verified
/// against it and must present a certificate unless `client_auth_optional`.
pub fn tonic_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    client_auth_optional: bool,
) -> Result<ServerTlsConfig, TlsError> {
    // tonic builds its server config from the process-wide provider; make it ring unless
    // the process already chose one (an error here only means it did).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ServerTlsConfig::new()
        .identity(identity(cert, key)?)
        .timeout(GRPC_HANDSHAKE_TIMEOUT);
    match client_ca {
        Some(ca) => Ok(config
            .client_ca_root(trust_anchor(ca)?)
            .client_auth_optional(client_auth_optional)),
        None => Ok(config),
    }
}

/// The identity in the client certificate the caller presented, if any.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = request.peer_certs()?;
    PeerIdentity::from_presented(Some(certs.as_slice()))
}

/// The serial number (lowercase hex) of the client certificate the caller
/// presented, if any.
pub fn peer_serial<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    super::identity::serial_hex(certs.first()?.as_ref())
}

/// The PEM at `path`, checked to hold at least one usable CA certificate.
fn trust_anchor(path: &Path) -> Result<Certificate, TlsError> {
    pem::root_store(path)?;
    Ok(Certificate::from_pem(pem::read(path)?))
}

/// The pair at `cert`/`key`, checked to parse and match.
fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let cert_pem = pem::read(cert)?;
    let key_pem = pem::read(key)?;
    pem::certified_key_from_pem((cert, &cert_pem), (key, &key_pem), &pem::provider())?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// TLS connections for a tonic server (`serve_with_incoming`) accepted
/// with `acceptor`, whose certificate can be a reloading one
/// (`server::server_config`), so a renewed serving certificate is used for
/// new connections with no restart (tonic's own `ServerTlsConfig` is read
/// once). Handshakes run concurrently, each bounded by
/// `GRPC_HANDSHAKE_TIMEOUT`, so a client that stalls its handshake holds
/// up no one else; only finished handshakes are yielded. Peer certificates
/// and addresses reach requests as with tonic's TLS (`peer_certs`,
/// `remote_addr`).
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "gRPC accept failed");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(GRPC_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "gRPC TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::LocalCa;

    #[test]
    fn a_ca_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "no pem here").unwrap();
        let error = client_config(&ca, None).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        assert!(error.to_string().contains("ca.pem"), "{error}");
    }

    #[test]
    fn a_server_key_for_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let authority = LocalCa::generate().unwrap();
        let (cert, key) = (dir.path().join("s.pem"), dir.path().join("s-key.pem"));
        let first = authority.issue_server(&["localhost"], &[]).unwrap();
        let second = authority.issue_server(&["localhost"], &[]).unwrap();
        std::fs::write(&cert, first.cert_pem).unwrap();
        std::fs::write(&key, second.key_pem).unwrap();
        let error = tonic_server_config(&cert, &key, None, false).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
    }
}
