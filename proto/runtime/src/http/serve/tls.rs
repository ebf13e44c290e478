//! One TLS connection: the handshake within the header deadline, then h2
//! or HTTP/1.1 by ALPN, with the client's identity on every request. TLS
//! connections are served by hyper for their whole life; only plaintext
//! HTTP/1.1 connections rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::activity::Activity;
use super::drive;
use super::first_byte::FirstByteDeadline;
use super::tracked::Tracked;
use super::{HttpService, Settings};
use crate::tls::PeerIdentity;
use crate::tls::server::ALPN_H2;

/// Serves one TLS connection until the client closes it, a deadline passes
/// or the listener drains.
pub(super) async fn serve<S>(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    service: Arc<S>,
    settings: &Settings,
    drain: CancellationToken,
) where
    S: HttpService,
{
    let within = settings.header_read_timeout;
    let Some(stream) = handshake(stream, peer, acceptor, within, &drain).await else {
        return;
    };
    let (_, session) = stream.get_ref();
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let identity = PeerIdentity::from_presented(session.peer_certificates());
    let service = Tracked::new(
        service,
        Arc::new(Activity::default()),
        peer,
        identity,
        settings.body_timeout,
    );
    let io = TokioIo::new(FirstByteDeadline::new(stream, within));
    // h2 over TLS is chosen by ALPN (RFC 9113 §3.2), so anything else is
    // HTTP/1.1, whose header deadline starts at once.
    if h2 {
        let builder = settings.auto.clone().http2_only();
        drive::to_end(builder.serve_connection(io, service), peer, &drain).await;
    } else {
        drive::to_end(settings.http1.serve_connection(io, service), peer, &drain).await;
    }
}

/// The TLS session, once the handshake finishes within `within`. None when
/// it fails, times out or the listener drains first.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    within: Duration,
    drain: &CancellationToken,
) -> Option<TlsStream<TcpStream>> {
    let handshake = tokio::time::timeout(within, acceptor.accept(stream));
    tokio::select! {
        _ = drain.cancelled() => None,
        done = handshake => match done {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, handshake_timeout = ?within, "TLS handshake timed out");
                None
            }
        },
    }
}
