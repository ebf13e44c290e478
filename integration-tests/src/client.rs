//! A small HTTP client for tests: JSON requests, whole responses, and SSE
//! streams read frame by frame as they arrive.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt;
use infermesh_runtime::http::{UpstreamClient, full, mesh_upstream_client, upstream_client};
use infermesh_runtime::tls::mesh::MeshClientTls;

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// A streamed response: each body frame with the time it arrived.
#[derive(Debug)]
pub struct Streamed {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Time from sending the request to the response headers.
    pub headers_after: Duration,
    /// Frames in arrival order with their offset from the response headers.
    pub frames: Vec<(Duration, Bytes)>,
}

impl Streamed {
    /// The `data:` payloads of the SSE events, in order.
    pub fn events(&self) -> Vec<String> {
        let all: Vec<u8> = self
            .frames
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        String::from_utf8_lossy(&all)
            .split("\n\n")
            .filter_map(|event| {
                event
                    .lines()
                    .find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_string()))
            })
            .collect()
    }
}

/// A pooled client.
#[derive(Clone)]
pub struct Http {
    client: UpstreamClient,
    key: Option<String>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    /// A client with a 2 s connect deadline.
    pub fn new() -> Self {
        Self {
            client: upstream_client(Duration::from_secs(2)),
            key: None,
        }
    }

    /// This client, also able to reach `https://` mesh URIs (a sidecar's
    /// `Sidecar::url`) over mutual TLS as the identity in `tls`.
    pub fn with_identity(self, tls: &MeshClientTls) -> Self {
        Self {
            client: mesh_upstream_client(Duration::from_secs(2), tls),
            ..self
        }
    }

    /// A client that sends `secret` as `Authorization: Bearer` unless a
    /// request sets its own authorization.
    pub fn with_key(secret: &str) -> Self {
        Self {
            key: Some(secret.to_string()),
            ..Self::new()
        }
    }

    fn authorize(
        &self,
        request: http::request::Builder,
        headers: &[(&str, &str)],
    ) -> http::request::Builder {
        let own = headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("authorization")
                || k.eq_ignore_ascii_case("x-api-key")
                || k.eq_ignore_ascii_case("x-no-auth")
        });
        match &self.key {
            Some(key) if !own => request.header("authorization", format!("Bearer {key}")),
            _ => request,
        }
    }

    /// Sends a request and reads the response whole (30 s deadline).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut request = Request::builder().method(method).uri(url);
        request = self.authorize(request, headers);
        for (k, v) in headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("x-no-auth"))
        {
            request = request.header(*k, *v);
        }
        if body.is_some()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(full(body.unwrap_or_default()))?;
        let fetch = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(30), fetch).await?
    }

    /// GET `url`.
    pub async fn get(&self, url: &str) -> anyhow::Result<Reply> {
        self.send(Method::GET, url, None, &[]).await
    }

    /// POST a JSON body to `url`.
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> anyhow::Result<Reply> {
        self.send(Method::POST, url, Some(Bytes::from(body.to_string())), &[])
            .await
    }

    /// POST a JSON body and read the response frame by frame as it streams.
    pub async fn post_stream(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<Streamed> {
        let request = self
            .authorize(Request::post(url), &[])
            .header("content-type", "application/json")
            .body(full(body.to_string()))?;
        let sent = Instant::now();
        let fetch = async {
            let response = self.client.request(request).await?;
            let start = Instant::now();
            let headers_after = start - sent;
            let (parts, mut body) = response.into_parts();
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    frames.push((start.elapsed(), data));
                }
            }
            anyhow::Ok(Streamed {
                status: parts.status.as_u16(),
                headers: parts.headers,
                headers_after,
                frames,
            })
        };
        tokio::time::timeout(Duration::from_secs(60), fetch).await?
    }
}

/// Sends `body` as a POST to `path` of the plain-HTTP `base_url` with
/// `key`, over a connection of its own that is returned open: for tests
/// that hang up before the answer ends.
pub async fn open_post(base_url: &str, path: &str, key: &str, body: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = base_url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("send");
    socket
}

/// Reads from `socket` until an SSE `data: ` line has arrived.
pub async fn read_first_event(socket: &mut tokio::net::TcpStream, deadline: Duration) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = tokio::time::timeout(deadline, socket.read(&mut buf))
            .await
            .expect("the first event in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}
