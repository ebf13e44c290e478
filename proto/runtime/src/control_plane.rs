//! How edges and sidecars reach the control plane: the address form, TLS
//! trusting the infermesh CA with this process's client certificate
//! (mutual TLS, which is what the control plane checks roles against), and
//! the channel settings both streams share. Certificate files are read
//! again for every new connection, so a renewed certificate (or CA bundle)
//! is presented from the next reconnect on, with no restart; a connection
//! already open keeps the identity it was made with.

use std::path::PathBuf;
use std::time::Duration;

use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::tls;

/// Why the control-plane TLS flags describe no client, or no identity.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneTlsError {
    /// Mutual TLS on the data path was asked for without all three files.
    #[error(
        "mutual TLS on the data path needs this process's identity: --control-plane-ca, --control-plane-cert and --control-plane-key"
    )]
    NoIdentity,
    /// Only one of certificate and key.
    #[error("--control-plane-cert and --control-plane-key must be given together")]
    HalfPair,
    /// A client certificate with no CA to trust the control plane by.
    #[error("--control-plane-cert needs --control-plane-ca (the CA to trust)")]
    CertWithoutCa,
    /// The CA, certificate or key could not be read or used.
    #[error("--control-plane-ca/--control-plane-cert: {0}")]
    Files(tls::TlsError),
}

/// Command-line flags for TLS to the control plane, shared by edge and sidecar.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ControlPlaneTlsArgs {
    /// CA certificate (PEM) that signed the control plane's certificate;
    /// setting it turns on TLS to the control plane.
    #[arg(long, env = "INFERMESH_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to the control plane; it carries
    /// this process's identity (spiffe://infermesh/<role>/<name>).
    #[arg(long, env = "INFERMESH_CONTROL_PLANE_CERT")]
    pub control_plane_cert: Option<PathBuf>,

    /// Private key (PEM) of --control-plane-cert.
    #[arg(long, env = "INFERMESH_CONTROL_PLANE_KEY")]
    pub control_plane_key: Option<PathBuf>,
}

impl ControlPlaneTlsArgs {
    /// This process's identity for the mesh's own mutual TLS: the CA,
    /// certificate and key, or a message naming what is missing.
    pub fn identity_files(&self) -> Result<(PathBuf, PathBuf, PathBuf), ControlPlaneTlsError> {
        match (
            &self.control_plane_ca,
            &self.control_plane_cert,
            &self.control_plane_key,
        ) {
            (Some(ca), Some(cert), Some(key)) => Ok((ca.clone(), cert.clone(), key.clone())),
            _ => Err(ControlPlaneTlsError::NoIdentity),
        }
    }

    /// The client these flags describe; files are read and checked now.
    pub fn client(&self) -> Result<ControlPlaneClient, ControlPlaneTlsError> {
        let pair = match (&self.control_plane_cert, &self.control_plane_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => return Err(ControlPlaneTlsError::HalfPair),
        };
        match (&self.control_plane_ca, pair) {
            (Some(ca), pair) => {
                // Read once now so that a bad file stops the process at start.
                tls::client_config(ca, pair).map_err(ControlPlaneTlsError::Files)?;
                Ok(ControlPlaneClient {
                    tls: Some(ClientTls::Files {
                        ca: ca.clone(),
                        pair: pair.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
                    }),
                })
            }
            (None, Some(_)) => Err(ControlPlaneTlsError::CertWithoutCa),
            (None, None) => Ok(ControlPlaneClient::plaintext()),
        }
    }
}

/// Connects to control-plane addresses, over TLS when configured.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneClient {
    tls: Option<ClientTls>,
}

/// Where a client's TLS settings come from.
#[derive(Debug, Clone)]
enum ClientTls {
    /// Fixed for the client's life.
    Fixed(ClientTlsConfig),
    /// Read from these files at every connection: the CA to trust and the
    /// client certificate and key, if any.
    Files {
        ca: PathBuf,
        pair: Option<(PathBuf, PathBuf)>,
    },
}

impl ClientTls {
    fn config(&self) -> Result<ClientTlsConfig, Status> {
        match self {
            ClientTls::Fixed(config) => Ok(config.clone()),
            ClientTls::Files { ca, pair } => {
                let pair = pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                tls::client_config(ca, pair).map_err(|e| {
                    Status::failed_precondition(format!(
                        "TLS files for the control plane ({}): {e}",
                        ca.display()
                    ))
                })
            }
        }
    }
}

impl ControlPlaneClient {
    /// Plaintext gRPC (a control plane started with --insecure-plaintext).
    pub fn plaintext() -> Self {
        Self { tls: None }
    }

    /// gRPC over TLS with `config`.
    pub fn tls(config: ClientTlsConfig) -> Self {
        Self {
            tls: Some(ClientTls::Fixed(config)),
        }
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The URI for `address`: a bare `host:port` gets `https://` with TLS and
    /// `http://` without; a full URL is kept.
    pub fn uri(&self, address: &str) -> String {
        if address.contains("://") {
            address.to_string()
        } else if self.is_tls() {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        }
    }

    /// Opens a channel to `address` within `connect_timeout`.
    pub async fn connect(
        &self,
        address: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, Status> {
        let uri = self.uri(address);
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| Status::invalid_argument(format!("control-plane address {address}: {e}")))?
            .connect_timeout(connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        match &self.tls {
            Some(source) => {
                endpoint = endpoint
                    .tls_config(source.config()?)
                    .map_err(|e| Status::invalid_argument(format!("TLS to {uri}: {e}")))?;
            }
            None if uri.starts_with("https://") => {
                return Err(Status::invalid_argument(format!(
                    "{uri} is https but no --control-plane-ca was given"
                )));
            }
            None => {}
        }
        endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect {uri}: {}", error_chain(&e))))
    }
}

/// An error with its sources, so a failed handshake says why.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_get_the_scheme_of_the_transport() {
        let plain = ControlPlaneClient::plaintext();
        assert_eq!(plain.uri("127.0.0.1:7000"), "http://127.0.0.1:7000");
        assert_eq!(plain.uri("https://cp:443"), "https://cp:443");
        let tls = ControlPlaneClient::tls(ClientTlsConfig::new());
        assert_eq!(tls.uri("cp:7070"), "https://cp:7070");
    }

    #[test]
    fn a_client_certificate_without_a_ca_is_refused() {
        let args = ControlPlaneTlsArgs {
            control_plane_ca: None,
            control_plane_cert: Some("edge.pem".into()),
            control_plane_key: Some("edge-key.pem".into()),
        };
        let error = args.client().unwrap_err().to_string();
        assert!(error.contains("--control-plane-ca"), "{error}");
        let half = ControlPlaneTlsArgs {
            control_plane_ca: Some("ca.pem".into()),
            control_plane_cert: Some("edge.pem".into()),
            control_plane_key: None,
        };
        assert!(half.client().unwrap_err().to_string().contains("together"));
    }

    #[tokio::test]
    async fn https_without_a_ca_is_an_error_not_a_silent_plaintext_dial() {
        let error = ControlPlaneClient::plaintext()
            .connect("https://127.0.0.1:1", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }
}
