//! One JSON line per request on stdout: who called (key id, never the
//! secret), what for, where it went and how it went. Lines are handed to a
//! writer task through a bounded queue so that a slow stdout never stalls
//! a request; when the queue is full the line is dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Everything logged about one request.
#[derive(Debug, Default, Clone, Serialize)]
pub struct AccessRecord {
    /// Unix ms when the request arrived.
    pub ts_unix_ms: i64,
    /// `x-request-id`.
    pub request_id: String,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Key id, if authenticated.
    pub key_id: Option<String>,
    /// Tenant, if authenticated.
    pub tenant: Option<String>,
    /// Model as asked for.
    pub model: Option<String>,
    /// The model's canonical name, once the request was routed.
    pub served_model: Option<String>,
    /// The LoRA adapter asked for, when the model was one.
    pub adapter: Option<String>,
    /// Endpoint id the request went to.
    pub endpoint: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// Whether the response was streamed.
    pub stream: bool,
    /// Milliseconds to the first byte of the response body.
    pub ttft_ms: Option<f64>,
    /// Milliseconds until the response ended.
    pub total_ms: f64,
    /// Prompt tokens, from the engine's usage.
    pub tokens_in: Option<u64>,
    /// Completion tokens, from the engine's usage.
    pub tokens_out: Option<u64>,
    /// What the request was charged against spend budgets, in micro-units.
    pub spend_micros: Option<u64>,
    /// Attempts beyond the first.
    pub retries: u32,
    /// Response cache outcome.
    pub cache: &'static str,
    /// Error code sent, if any.
    pub error: Option<String>,
    /// Set when the response body writes the line as it ends.
    #[serde(skip)]
    pub deferred: bool,
}

impl AccessRecord {
    /// A record of `request` as it arrives (after authentication).
    pub fn begin<B>(request: &http::Request<B>) -> Self {
        let principal = request.extensions().get::<crate::access::Principal>();
        Self {
            ts_unix_ms: infermesh_runtime::time::now_unix_ms(),
            request_id: request
                .headers()
                .get(crate::layers::request_id::REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            method: request.method().to_string(),
            path: request.uri().path().to_string(),
            key_id: principal.map(|p| p.key.id.clone()),
            tenant: principal.map(|p| p.key.tenant.clone()),
            cache: "none",
            ..Default::default()
        }
    }
}

/// Where access lines go.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

/// How often the writer thread takes queued lines.
const WRITE_EVERY: Duration = Duration::from_millis(5);

impl AccessLog {
    /// A log that writes nothing.
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
        }
    }

    /// A log writing to stdout from a thread of its own that ends when
    /// every sender is gone. The thread takes what is queued every few
    /// milliseconds, so a request never wakes it or waits for the write.
    pub fn stdout() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(8192);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                use std::io::Write as _;
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
                loop {
                    let mut wrote = false;
                    loop {
                        match rx.try_recv() {
                            Ok(line) => {
                                let _ = out.write_all(line.as_bytes());
                                wrote = true;
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                                let _ = out.flush();
                                return;
                            }
                        }
                    }
                    if wrote {
                        let _ = out.flush();
                    }
                    std::thread::sleep(WRITE_EVERY);
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "access log thread not started; access lines are not written");
            return Self::disabled();
        }
        Self {
            tx: Some(tx),
            dropped: Arc::default(),
        }
    }

    /// Queues one record.
    pub fn write(&self, record: &AccessRecord) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if tx.try_send(line).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "access log queue full; lines dropped");
            }
        }
    }
}

/// Milliseconds of a duration, as a float.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
