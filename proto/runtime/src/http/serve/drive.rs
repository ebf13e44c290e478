//! Polling one hyper connection: to its end, or, for a plaintext HTTP/1.1
//! connection that may rest, until it has idled long enough to rest. In
//! both cases a drain asks it to finish what it serves and close.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;

use hyper_util::server::graceful::GracefulConnection;
use tokio_util::sync::CancellationToken;

use super::drain::DrainWatch;
use super::rest::{Idling, Rest};

/// Drives a hyper connection until it ends (false) or, given `rest`, until
/// it can rest (true): every request it took is answered, the answer is
/// written out, nothing is being read for a handler, hyper waits for the
/// next request's bytes, and has waited for the rest delay. A drain asks it
/// to finish what it serves and close.
pub(super) async fn until_idle<C>(
    mut connection: Pin<&mut C>,
    rest: Option<Rest<'_>>,
    peer: SocketAddr,
    drain: &CancellationToken,
) -> bool
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut drain = std::pin::pin!(DrainWatch::new(drain));
    let mut idling = rest.map(Idling::new);
    poll_fn(|cx| {
        if let Some(idling) = &idling {
            idling.wake_on_idle(cx.waker());
        }
        let draining = drain.as_mut().poll_started(connection.as_mut(), cx);
        match connection.as_mut().poll(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(false),
            Poll::Ready(Err(error)) => {
                tracing::debug!(%peer, %error, "connection ended with an error");
                Poll::Ready(false)
            }
            Poll::Pending => match &mut idling {
                Some(idling) => idling.poll_rest(draining, cx).map(|()| true),
                None => Poll::Pending,
            },
        }
    })
    .await
}

/// Runs a connection to its end, draining it gracefully when asked (boxed,
/// so that the task of a connection that rests is no bigger than resting
/// needs).
pub(super) async fn to_end<C>(connection: C, peer: SocketAddr, drain: &CancellationToken)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    until_idle(Box::pin(connection).as_mut(), None, peer, drain).await;
}
