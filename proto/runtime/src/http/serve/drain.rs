//! The graceful drain: once a listener stops accepting, every connection
//! is asked to finish what it serves and close, and the listener waits up
//! to its grace period for them. A connection resting on its bare socket
//! has nothing to finish and closes at once; a busy one answers its
//! requests (HTTP/1.1 with `connection: close`, h2 with GOAWAY) first.

use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// A listener's connection tasks and the token that asks them to drain.
pub(super) struct Connections {
    tasks: TaskTracker,
    drain: CancellationToken,
}

impl Connections {
    /// No connections yet.
    pub(super) fn new() -> Self {
        Self {
            tasks: TaskTracker::new(),
            drain: CancellationToken::new(),
        }
    }

    /// Runs one connection on its own task; `serve` gets the token that
    /// asks it to drain.
    pub(super) fn spawn<F, Fut>(&self, serve: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(serve(self.drain.clone()));
    }

    /// Asks every connection to drain, then waits up to `grace` for them.
    pub(super) async fn drain(self, grace: Duration) {
        self.drain.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "connections still open after the grace period; closing them"
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// One hyper connection's watch on its listener's drain.
    pub(super) struct DrainWatch<'a> {
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
        started: bool,
    }
}

impl<'a> DrainWatch<'a> {
    /// Watches `drain`, which has not been seen to start yet.
    pub(super) fn new(drain: &'a CancellationToken) -> Self {
        Self {
            cancelled: drain.cancelled(),
            started: false,
        }
    }

    /// Whether the drain has started. The first time it is seen to, asks
    /// `connection` to finish what it serves and close.
    pub(super) fn poll_started<C>(
        self: Pin<&mut Self>,
        connection: Pin<&mut C>,
        cx: &mut Context<'_>,
    ) -> bool
    where
        C: GracefulConnection,
    {
        let this = self.project();
        if !*this.started && this.cancelled.poll(cx).is_ready() {
            connection.graceful_shutdown();
            *this.started = true;
        }
        *this.started
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::http::serve::test_server::{echo_server, request, response};

    #[tokio::test]
    async fn a_drain_closes_resting_connections_and_finishes_busy_ones() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, cancel, task) = echo_server(
            Duration::from_secs(30),
            (Duration::ZERO, 128),
            release.clone(),
        )
        .await;
        let mut resting = TcpStream::connect(addr).await.unwrap();
        let mut resting_pending = Vec::new();
        resting
            .write_all(request("GET", "/", "").as_bytes())
            .await
            .unwrap();
        assert!(response(&mut resting, &mut resting_pending).await.is_some());
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(request("POST", "/hold", "abc").as_bytes())
            .await
            .unwrap();
        // The held request is in its handler once a probe on a third
        // connection is answered after it (requests are served in order of
        // arrival on one runtime, so poll until the handler waits).
        let waiting = async {
            loop {
                let mut probe = TcpStream::connect(addr).await.unwrap();
                probe
                    .write_all(request("GET", "/probe", "").as_bytes())
                    .await
                    .unwrap();
                assert!(response(&mut probe, &mut Vec::new()).await.is_some());
                if Arc::strong_count(&release) > 1 {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap();
        cancel.cancel();
        assert!(
            response(&mut resting, &mut resting_pending).await.is_none(),
            "a resting connection closes at once"
        );
        release.notify_one();
        let (status, answer, close) = response(&mut busy, &mut Vec::new()).await.unwrap();
        assert_eq!(
            (status, answer.as_str(), close),
            (200, "POST /hold 3", true)
        );
        task.await.unwrap();
    }
}
