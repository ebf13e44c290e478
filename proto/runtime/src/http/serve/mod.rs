//! The accept loop every HTTP listener shares: plaintext or TLS, HTTP/1.1
//! and h2 on one port, deadlines against slow clients, and a graceful drain.
//!
//! Plaintext HTTP/1.1 connections hold no buffers between requests. hyper
//! keeps a read and a write buffer (8 KiB each) and its dispatcher for as
//! long as a connection lives, which is most of the memory a keep-alive
//! client costs while it idles. Here a connection whose last request is
//! answered hands its socket back from hyper (with any bytes hyper read
//! ahead) and waits for the next byte with nothing but the socket; the next
//! request gets a fresh hyper connection. This is nginx's keep-alive model
//! (buffers freed between requests).
//!
//! `accept` takes connections and `drain` closes them on shutdown;
//! `plaintext` and `tls` serve one connection each and `drive` polls its
//! hyper connection; `rest` decides when an idle plaintext connection
//! rests and holds it on the bare socket; `activity`, `tracked` and
//! `request_body` count what a connection is doing (handlers, request
//! bodies, responses being written), so that it rests only when nothing is.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Body;

mod accept;
mod activity;
mod drain;
mod drive;
mod first_byte;
mod options;
mod plaintext;
mod request_body;
mod rest;
#[cfg(test)]
mod test_server;
mod tls;
mod tracked;

pub use options::ServeOptions;
pub use request_body::{BodyError, RequestBody};
pub use tracked::ClientAddr;

use options::Settings;

/// What `serve` serves: a cloneable tower service answering every request
/// with a `Body`, shared across connections and tasks.
pub trait HttpService:
    tower::Service<
        Request<RequestBody>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: tower::Service<
            Request<RequestBody>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
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
    S: HttpService,
{
    let settings = Arc::new(Settings::new(&options));
    // One copy per listener: connections share it and clone it per request.
    let service = Arc::new(service);
    let grace = options.grace;
    match options.tls {
        None => {
            accept::until_cancelled(listener, cancel, grace, |stream, peer, drain| {
                let (settings, service) = (settings.clone(), service.clone());
                async move { plaintext::serve(stream, peer, service, &settings, drain).await }
            })
            .await
        }
        Some(acceptor) => {
            accept::until_cancelled(listener, cancel, grace, |stream, peer, drain| {
                let (acceptor, settings, service) =
                    (acceptor.clone(), settings.clone(), service.clone());
                async move { tls::serve(stream, peer, acceptor, service, &settings, drain).await }
            })
            .await
        }
    }
}
