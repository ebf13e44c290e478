//! One plaintext connection: h2 with prior knowledge goes to hyper for its
//! whole life; HTTP/1.1 gets a hyper connection per busy spell and rests
//! on the bare socket in between.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::activity::Activity;
use super::drive;
use super::rest::{self, Rest, Resting};
use super::tracked::Tracked;
use super::{HttpService, Settings};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one plaintext connection until the client closes it, a deadline
/// passes or the listener drains.
pub(super) async fn serve<S>(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: Arc<S>,
    settings: &Settings,
    drain: CancellationToken,
) where
    S: HttpService,
{
    let activity = Arc::new(Activity::default());
    let mut service = Tracked::new(service, activity.clone(), peer, None, settings.body_timeout);
    let mut head = [0u8; H2_PREFACE.len()];
    let Some(n) = rest::peek(&stream, &mut head, settings.header_read_timeout, &drain).await else {
        return;
    };
    // The h2 preface, or too few bytes to tell: hyper's own detection decides.
    if H2_PREFACE.starts_with(&head[..n]) {
        let connection = settings
            .auto
            .serve_connection(TokioIo::new(stream), service);
        drive::to_end(connection, peer, &drain).await;
        return;
    }
    let mut read_ahead = Bytes::new();
    loop {
        let io = TokioIo::new(Resting::new(read_ahead, stream, activity.clone()));
        let mut connection = Box::new(settings.http1.serve_connection(io, service));
        let resting = Some(Rest {
            activity: &activity,
            after: settings.rest_after,
            lingering: &settings.lingering,
        });
        if !drive::until_idle(Pin::new(&mut *connection), resting, peer, &drain).await {
            return;
        }
        let parts = connection.into_parts();
        let resting = parts.io.into_inner();
        (stream, read_ahead) = resting.into_parts(parts.read_buf);
        service = parts.service;
        if read_ahead.is_empty()
            && !rest::readable(&stream, settings.header_read_timeout, &drain).await
        {
            return;
        }
    }
}
