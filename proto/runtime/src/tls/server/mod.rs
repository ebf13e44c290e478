//! The rustls server configuration every infermesh HTTPS listener uses:
//! ring provider, TLS 1.2 and 1.3, a serving certificate reloaded from disk,
//! optional or required client certificates checked against a CA, and the
//! ALPN list. What a client's identity may do is not decided here.

mod reload;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;

pub use reload::{CertWatcher, ReloadingCertResolver};

use super::pem::{self, TlsError};

/// ALPN id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The ALPN list of a listener serving both HTTP/2 and HTTP/1.1, h2 preferred.
pub const HTTP_ALPN: &[&[u8]] = &[ALPN_H2, ALPN_HTTP1];
/// How often serving certificate files are checked for changes unless told otherwise.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Whether clients must present a certificate signed by the client CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Client certificates are not requested.
    None,
    /// Requested and verified when presented; anonymous clients are let in.
    Optional,
    /// A verified client certificate is required to finish the handshake.
    Required,
}

/// A server configuration with its reloading certificate and the task that reloads it.
#[derive(Debug)]
pub struct ServerTls {
    /// The configuration to hand to a `TlsAcceptor`.
    pub config: Arc<ServerConfig>,
    /// The serving certificate in use; exposes reload counters.
    pub resolver: Arc<ReloadingCertResolver>,
    /// The file-polling task; keep it alive as long as the listener.
    pub watcher: CertWatcher,
}

impl ServerTls {
    /// An acceptor for `http::serve` (`ServeOptions::tls`).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

/// Builds a server config serving the pair at `cert`/`key`, reloaded every
/// `reload_every` until `cancel` fires; must be called inside a tokio runtime.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    reload_every: Duration,
    cancel: CancellationToken,
) -> Result<ServerTls, TlsError> {
    let provider = pem::provider();
    let resolver = Arc::new(ReloadingCertResolver::load(
        cert,
        key,
        Arc::clone(&provider),
    )?);
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (client_auth, client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => return Err(TlsError::ClientCaMissing),
        (auth, Some(ca)) => {
            let roots = Arc::new(pem::root_store(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = match auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::clone(&resolver) as _);
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    let watcher = resolver.watch(reload_every, cancel);
    Ok(ServerTls {
        config: Arc::new(config),
        resolver,
        watcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::LocalCa;

    #[tokio::test]
    async fn required_client_auth_without_a_ca_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("s.pem"), dir.path().join("s-key.pem"));
        let ca = LocalCa::generate().unwrap();
        let issued = ca.issue_server(&["localhost"], &[]).unwrap();
        issued.write(&cert, &key).unwrap();
        let cancel = CancellationToken::new();
        let error = server_config(
            &cert,
            &key,
            None,
            ClientAuth::Required,
            HTTP_ALPN,
            DEFAULT_RELOAD_INTERVAL,
            cancel.clone(),
        )
        .unwrap_err();
        assert!(matches!(error, TlsError::ClientCaMissing));

        let other = ca.issue_server(&["localhost"], &[]).unwrap();
        std::fs::write(&key, other.key_pem).unwrap();
        let error = server_config(
            &cert,
            &key,
            None,
            ClientAuth::None,
            HTTP_ALPN,
            DEFAULT_RELOAD_INTERVAL,
            cancel,
        )
        .unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        assert!(error.to_string().contains("s-key.pem"), "{error}");
    }
}
