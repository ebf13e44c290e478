//! The pod's preStop hooks, reachable only from inside the pod. A drain
//! started over the network could be started by anyone who reaches the
//! sidecar's port, and a drain never ends: the replica would leave every
//! table until its pod was restarted. So `/prestop` is served on a unix
//! socket in a volume the pod's containers share (`--prestop-socket`), and
//! the sidecar's port refuses it.
//!
//! - The sidecar container's hook runs `infermesh-sidecar --prestop-hook
//!   <socket>`, which asks for the drain and returns once it is over.
//! - Other containers (the engine) have no infermesh binary; their hook
//!   waits for the `drained` file the sidecar writes beside the socket
//!   (or for the socket to go away, if the sidecar is gone).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::drain::{InFlight, PreStop};

/// The file the sidecar writes beside the socket once drained.
pub const DRAINED_FILE: &str = "drained";

/// What the hook endpoint needs.
#[derive(Debug, Clone)]
pub struct HookState {
    /// The hand-shake with the shutdown sequence.
    pub pre_stop: PreStop,
    /// Requests in flight, reported in the answer.
    pub in_flight: InFlight,
    /// Longest a hook waits for the drain.
    pub limit: Duration,
}

/// The `drained` marker beside `socket`.
pub fn drained_marker(socket: &Path) -> PathBuf {
    socket.with_file_name(DRAINED_FILE)
}

/// Serves `/prestop` on a unix socket at `socket` (owner-only) until
/// `cancel`, and writes the `drained` marker when the drain ends.
pub fn serve(
    socket: &Path,
    state: HookState,
    cancel: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    remove_stale(socket)?;
    let marker = drained_marker(socket);
    let _ = std::fs::remove_file(&marker);
    let listener = UnixListener::bind(socket)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!(socket = %socket.display(), "preStop hook listening");
    let socket = socket.to_path_buf();
    Ok(tokio::spawn(async move {
        let drained = state.pre_stop.drained.clone();
        let mut marked = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = drained.cancelled(), if !marked => {
                    marked = true;
                    if let Err(error) = infermesh_runtime::fs::write_atomically(&marker, b"drained\n", 0o644) {
                        tracing::warn!(%error, marker = %marker.display(), "could not write the drained marker");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        tokio::spawn(answer(stream, state));
                    }
                    Err(error) => tracing::warn!(%error, "preStop socket accept failed"),
                },
            }
        }
        let _ = std::fs::remove_file(&socket);
    }))
}

/// Removes a socket left by an earlier run; refuses to remove anything else.
fn remove_stale(socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(socket),
        Ok(_) => Err(std::io::Error::other(format!(
            "{} exists and is not a socket",
            socket.display()
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

async fn answer(stream: UnixStream, state: HookState) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(&request, &state).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(%error, "preStop connection ended");
    }
}

async fn respond<B>(request: &Request<B>, state: &HookState) -> Response<Full<Bytes>> {
    if request.uri().path() != "/prestop" {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "GET /prestop"}),
        );
    }
    tracing::info!("preStop hook: draining before the pod's containers stop");
    let drained = state.pre_stop.run_hook(state.limit).await;
    let status = if drained {
        "drained"
    } else {
        "drain still running at the hook's limit"
    };
    json(
        StatusCode::OK,
        serde_json::json!({"status": status, "in_flight": state.in_flight.count()}),
    )
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Why the preStop hook could not get the sidecar to drain.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The socket could not be reached, written or read.
    #[error("preStop socket {}: {source}", path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The sidecar answered with something other than 200.
    #[error("the sidecar answered: {head}")]
    Refused {
        /// The answer's status line and headers.
        head: String,
    },
}

/// The hook itself (`--prestop-hook <socket>`): asks the sidecar at
/// `socket` to drain and waits for its answer; prints it. Errors say why.
pub async fn run_hook(socket: &Path) -> Result<String, HookError> {
    let failed = |source| HookError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).await.map_err(failed)?;
    stream
        .write_all(b"GET /prestop HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .map_err(failed)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.map_err(failed)?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(HookError::Refused {
            head: head.to_string(),
        });
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hook_drains_through_the_socket_and_the_marker_follows() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("prestop.sock");
        let state = HookState {
            pre_stop: PreStop::default(),
            in_flight: InFlight::default(),
            limit: Duration::from_secs(10),
        };
        let cancel = CancellationToken::new();
        let task = serve(&socket, state.clone(), cancel.clone()).unwrap();
        let hook = tokio::spawn({
            let socket = socket.clone();
            async move { run_hook(&socket).await }
        });
        state.pre_stop.requested.cancelled().await;
        assert!(!drained_marker(&socket).exists());
        state.pre_stop.drained.cancel();
        let answer = hook.await.unwrap().unwrap();
        assert!(answer.contains("\"drained\""), "{answer}");
        let marker = drained_marker(&socket);
        wait_until(|| marker.exists()).await;
        cancel.cancel();
        task.await.unwrap();
        assert!(!socket.exists(), "the socket is removed on exit");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prestop.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        let state = HookState {
            pre_stop: PreStop::default(),
            in_flight: InFlight::default(),
            limit: Duration::from_secs(1),
        };
        assert!(serve(&path, state, CancellationToken::new()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    async fn wait_until(mut done: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition within 5 s");
    }
}
