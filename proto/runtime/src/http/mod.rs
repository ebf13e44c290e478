//! HTTP plumbing shared by the edge and the sidecar: the body type both
//! speak, the accept loop with graceful drain (HTTP/1.1 and h2 on one
//! port, in `serve`), the pooled upstream client, and hop-by-hop header
//! handling.
//! Nothing here knows about routing.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

mod connect;
mod serve;

pub use connect::{ConnectError, UpstreamConnector, UpstreamStream};

pub use serve::{BodyError, ClientAddr, HttpService, RequestBody, ServeOptions, serve};

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

/// Reads and drops up to `limit` bytes of a request body that is being
/// refused, for at most `DISCARD_TIME`, so that the answer reaches the
/// client as an answer: a server that answers before the body is in resets
/// an h2 stream (and closes an HTTP/1.1 connection), which some clients
/// report as a failure instead of showing the refusal (nginx does the
/// same). Stops early at either bound or on an error.
pub async fn discard_body<B: HttpBody>(body: B, limit: usize) {
    let drain = async {
        let mut body = std::pin::pin!(body);
        let mut read = 0usize;
        while read <= limit {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read += bytes::Buf::remaining(data);
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

/// Longest wait for a refused request's body.
pub const DISCARD_TIME: Duration = Duration::from_secs(2);

/// How much of a refused request's body is read before answering.
pub const DISCARD_LIMIT: usize = 1 << 20;

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A streamed body received from a peer, passed on frame by frame.
pub fn streamed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// The pooled HTTP client used to reach upstreams (engines, sidecars, peer edges).
pub type UpstreamClient = Client<UpstreamConnector, Body>;

/// A plain-HTTP client with keep-alive pooling, `TCP_NODELAY` and a connect deadline.
pub fn upstream_client(connect_timeout: Duration) -> UpstreamClient {
    pooled(UpstreamConnector::new(connect_timeout, None))
}

/// Like `upstream_client`, and also reaching `https://` URIs over mutual
/// TLS with `tls`, checking the identity named in each URI's user-info
/// (`tls::mesh::expected_authority`).
pub fn mesh_upstream_client(
    connect_timeout: Duration,
    tls: &crate::tls::mesh::MeshClientTls,
) -> UpstreamClient {
    pooled(UpstreamConnector::new(connect_timeout, Some(tls)))
}

fn pooled(connector: UpstreamConnector) -> UpstreamClient {
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
