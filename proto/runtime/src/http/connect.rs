//! The upstream client's connector: plain TCP for `http://` URIs, and for
//! `https://` URIs TCP then mutual TLS with the mesh identity, after which
//! the server's certificate must name the identity in the URI's user-info
//! (`tls::mesh::expected_authority`). The TLS handshake counts against the
//! connect deadline.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::BoxError;
use crate::tls::mesh::{self, MeshClientTls};

/// Connects to upstreams over TCP, and over mutual TLS where asked.
#[derive(Clone)]
pub struct UpstreamConnector {
    tcp: HttpConnector,
    tls: Option<TlsConnector>,
    timeout: Duration,
}

impl UpstreamConnector {
    /// A connector giving up after `timeout` (TCP and TLS together); with
    /// `tls`, `https://` URIs are reached over mutual TLS.
    pub fn new(timeout: Duration, tls: Option<&MeshClientTls>) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        tcp.enforce_http(false);
        Self {
            tcp,
            tls: tls.map(|tls| TlsConnector::from(tls.config.clone())),
            timeout,
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A scheme this connector does not speak (or `https` with no TLS set up).
    #[error("cannot connect to {0}: unsupported scheme or no mesh TLS configured")]
    Scheme(String),
    /// An `https` URI without the identity to check.
    #[error("{0}")]
    Identity(String),
    /// TCP failed.
    #[error("{0}")]
    Tcp(BoxError),
    /// The TLS handshake failed (chain not from the mesh CA, no client
    /// certificate accepted, ...).
    #[error("TLS handshake with {address}: {source}")]
    Handshake {
        /// Where.
        address: String,
        /// What TLS said.
        source: io::Error,
    },
    /// The server is not the workload asked for.
    #[error("{address}: {source}")]
    WrongPeer {
        /// Where.
        address: String,
        /// Whose certificate it was.
        source: mesh::PeerMismatch,
    },
    /// TCP and TLS together took longer than the deadline.
    #[error("connecting to {0} timed out")]
    TimedOut(String),
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future =
        Pin<Box<dyn Future<Output = Result<TokioIo<UpstreamStream>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Uri>::poll_ready(&mut self.tcp, cx)
            .map_err(|e| ConnectError::Tcp(e.into()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let (expected, address) = mesh::split_authority(authority);
            let address = address.to_owned();
            let secure = match (uri.scheme_str(), tls, expected) {
                (Some("http"), _, _) => None,
                (Some("https"), Some(tls), Some(Ok(expected))) => Some((tls, expected)),
                (Some("https"), Some(_), Some(Err(error))) => {
                    return Err(ConnectError::Identity(error.to_string()));
                }
                (Some("https"), Some(_), None) => {
                    return Err(ConnectError::Identity(format!(
                        "{address}: no identity to check the server against"
                    )));
                }
                _ => return Err(ConnectError::Scheme(uri.to_string())),
            };
            let connect = async {
                let stream = tower::Service::call(&mut tcp, uri.clone())
                    .await
                    .map_err(|e| ConnectError::Tcp(e.into()))?
                    .into_inner();
                let Some((tls, expected)) = secure else {
                    return Ok(UpstreamStream::Plain(stream));
                };
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let name = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(host.to_owned()).map_err(|e| {
                        ConnectError::Identity(format!("{host:?} is not a server name: {e}"))
                    })?,
                };
                let stream =
                    tls.connect(name, stream)
                        .await
                        .map_err(|source| ConnectError::Handshake {
                            address: address.clone(),
                            source,
                        })?;
                mesh::check_peer(&expected, stream.get_ref().1.peer_certificates()).map_err(
                    |source| ConnectError::WrongPeer {
                        address: address.clone(),
                        source,
                    },
                )?;
                Ok(UpstreamStream::Tls(Box::new(stream)))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(connected) => connected.map(TokioIo::new),
                Err(_) => Err(ConnectError::TimedOut(address)),
            }
        })
    }
}

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(stream) => stream.connected(),
            UpstreamStream::Tls(stream) => stream.get_ref().0.connected(),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(stream) => stream.is_write_vectored(),
            UpstreamStream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}
