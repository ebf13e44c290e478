//! A listener to test `serve` against over raw TCP, and a client side that
//! writes HTTP/1.1 requests and reads their responses byte by byte.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{RequestBody, ServeOptions, serve};
use crate::http::full;

/// A listener answering every request with its method, path and body
/// length; `/hold` waits for `release` before answering and `/early`
/// answers without reading the body.
pub(super) async fn echo_server(
    header_read_timeout: Duration,
    (rest_after, max_lingering): (Duration, usize),
    release: Arc<tokio::sync::Notify>,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(move |request: Request<RequestBody>| {
        let release = release.clone();
        async move {
            let (parts, body) = request.into_parts();
            let path = parts.uri.path().to_string();
            if path == "/early" {
                return Ok::<_, Infallible>(Response::new(full("early")));
            }
            let len = body
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            if path == "/hold" {
                release.notified().await;
            }
            Ok(Response::new(full(format!(
                "{} {} {len}",
                parts.method, path
            ))))
        }
    });
    let cancel = CancellationToken::new();
    let options = ServeOptions {
        header_read_timeout,
        rest_after,
        max_lingering,
        ..ServeOptions::plaintext(Duration::from_secs(5))
    };
    let task = tokio::spawn(serve(listener, service, cancel.clone(), options));
    (addr, cancel, task)
}

/// An HTTP/1.1 request with a `content-length` body.
pub(super) fn request(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one response (content-length bodies only): status, body, and
/// whether it announced `connection: close`. None at end of stream.
pub(super) async fn response(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> Option<(u16, String, bool)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if pending.len() >= end + 4 + length {
                let status = head[9..12].parse().unwrap();
                let body =
                    String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
                pending.drain(..end + 4 + length);
                return Some((status, body, head.contains("connection: close")));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("a response within 10 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}
