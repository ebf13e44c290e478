//! HTTP plumbing shared by the edge and the sidecar: the body type both
//! speak, the accept loop with graceful drain (HTTP/1.1 and h2 on one
//! port), the pooled upstream client, and hop-by-hop header handling.
//! Nothing here knows about routing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::tls::PeerIdentity;
use crate::tls::server::ALPN_H2;

/// Errors a body may yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the data path handles.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A streamed body received from a peer, passed on frame by frame.
pub fn streamed(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed()
}

/// The pooled HTTP client used to reach upstreams (engines or sidecars).
pub type UpstreamClient = Client<HttpConnector, Body>;

/// A client with keep-alive pooling, `TCP_NODELAY` and a connect deadline.
pub fn upstream_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes headers that belong to one connection, not to the message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

pin_project_lite::pin_project! {
    /// A body that holds a value until the body is finished or dropped,
    /// e.g. a guard counting a request as in flight while it streams.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    /// Wraps `inner`, dropping `guard` when the body ends.
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: HttpBody, G> HttpBody for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a listener treats its connections.
#[derive(Clone)]
pub struct ServeOptions {
    /// Time open connections get to finish once shutdown starts.
    pub grace: Duration,
    /// A client must finish its TLS handshake, and each HTTP/1.1 request's
    /// headers, within this time or the connection is closed (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 request line and headers, h2 header
    /// list) accepted; HTTP/1.1 requests over it get 431.
    pub max_header_bytes: usize,
    /// Serve TLS through this acceptor instead of plaintext.
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("grace", &self.grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ServeOptions {
    /// Smallest `max_header_bytes` accepted (hyper's lower bound on its read buffer).
    pub const MIN_HEADER_BYTES: usize = 8192;

    /// Plaintext with the given grace period, a 30 s header deadline and a 64 KiB head limit.
    pub fn plaintext(grace: Duration) -> Self {
        Self {
            grace,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            tls: None,
        }
    }
}

/// Serves `service` on `listener` (HTTP/1.1 and h2) until `cancel` fires,
/// then stops accepting and gives open connections `options.grace` to
/// finish. With `options.tls`, every connection is TLS: ALPN `h2` gets an
/// HTTP/2 connection, anything else HTTP/1.1, and
/// when the client presented a certificate carrying an infermesh identity,
/// each request's extensions hold its `tls::PeerIdentity`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    cancel: CancellationToken,
    options: ServeOptions,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = connection_builder(&options);
    let grace = options.grace;
    match options.tls {
        None => {
            let first_byte = options.header_read_timeout;
            accept_until_cancelled(listener, cancel, grace, |stream, peer, watcher| {
                let connection = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(FirstByteDeadline::new(stream, first_byte)),
                        TowerToHyperService::new(service.clone()),
                    )
                    .into_owned();
                tokio::spawn(drive(watcher.watch(connection), peer));
            })
            .await
        }
        Some(acceptor) => {
            let handshake_timeout = options.header_read_timeout;
            let stop = cancel.clone();
            accept_until_cancelled(listener, cancel, grace, |stream, peer, watcher| {
                let (acceptor, builder, service, stop) = (
                    acceptor.clone(),
                    builder.clone(),
                    service.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    let stream = tokio::select! {
                        _ = stop.cancelled() => return,
                        done = handshake => match done {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, ?handshake_timeout, "TLS handshake timed out");
                                return;
                            }
                        },
                    };
                    let (_, session) = stream.get_ref();
                    let h2 = session.alpn_protocol() == Some(ALPN_H2);
                    let identity = PeerIdentity::from_presented(session.peer_certificates());
                    let service = TowerToHyperService::new(service.map_request(
                        move |mut request: http::Request<Incoming>| {
                            if let Some(identity) = &identity {
                                request.extensions_mut().insert(identity.clone());
                            }
                            request
                        },
                    ));
                    let io = TokioIo::new(FirstByteDeadline::new(stream, handshake_timeout));
                    // h2 over TLS is chosen by ALPN (RFC 9113 §3.2), so anything
                    // else is HTTP/1.1, whose header deadline starts at once.
                    if h2 {
                        let builder = builder.http2_only();
                        drive(watcher.watch(builder.serve_connection(io, service)), peer).await;
                    } else {
                        let builder = builder.http1_only();
                        let connection = builder.serve_connection_with_upgrades(io, service);
                        drive(watcher.watch(connection), peer).await;
                    }
                });
            })
            .await
        }
    }
}

/// The connection settings every listener shares: HTTP/1.1 with a header
/// deadline, a head size limit and keep-alive, h2 with a stream cap and a
/// header list limit.
fn connection_builder(options: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let max_header_bytes = options.max_header_bytes.max(ServeOptions::MIN_HEADER_BYTES);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024);
    builder
}

pin_project_lite::pin_project! {
    /// A connection that fails with `TimedOut` when its first byte does not
    /// arrive in time. hyper's header deadline only starts once a request
    /// begins (and protocol sniffing has none), so without this a client
    /// that connects and sends nothing holds the connection forever.
    struct FirstByteDeadline<IO> {
        #[pin]
        io: IO,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<IO> FirstByteDeadline<IO> {
    fn new(io: IO, within: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<IO: tokio::io::AsyncRead> tokio::io::AsyncRead for FirstByteDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => *this.deadline = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the header deadline",
                )));
            }
            _ => {}
        }
        polled
    }
}

impl<IO: tokio::io::AsyncWrite> tokio::io::AsyncWrite for FirstByteDeadline<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections until `cancel` fires, handing each to `on_accept`
/// with a watcher that asks it to drain; then waits up to `grace` for them.
async fn accept_until_cancelled(
    listener: TcpListener,
    cancel: CancellationToken,
    grace: Duration,
    mut on_accept: impl FnMut(TcpStream, SocketAddr, Watcher),
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        on_accept(stream, peer, graceful.watcher());
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
}

/// Runs one connection to its end, logging how it ended.
async fn drive<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>>,
    peer: SocketAddr,
) {
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.insert("x-request-id", "abc".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
        assert!(headers.contains_key("x-request-id"));
    }

    #[tokio::test]
    async fn guard_is_released_when_the_body_ends() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        struct Signal(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Signal {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let body = Guarded::new(full("hello"), Signal(Some(tx)));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello");
        rx.await.expect("guard dropped at end of body");
    }
}
