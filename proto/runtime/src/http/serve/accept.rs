//! The accept loop: takes connections until the listener is cancelled and
//! runs each on its own task; then hands them to the drain.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::drain::Connections;

/// Accepts connections until `cancel` fires, running `serve` for each on
/// its own task with a token that asks it to drain; then waits up to
/// `grace` for them.
pub(super) async fn until_cancelled<F, Fut>(
    listener: TcpListener,
    cancel: CancellationToken,
    grace: Duration,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connections = Connections::new();
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
        connections.spawn(|drain| serve(stream, peer, drain));
    }
    drop(listener);
    connections.drain(grace).await;
}
