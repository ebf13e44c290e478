//! Steady load for fault tests: a few clients sending the same request in a
//! loop, counting answers that were 200 (and, for streams, ran to `[DONE]`)
//! and those that were not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::task::JoinHandle;

use crate::client::Http;

/// Clients running until `stop`.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts `clients` loops POSTing `body` to `url`.
    pub fn start(http: &Http, url: &str, body: &serde_json::Value, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients = (0..clients)
            .map(|_| {
                let (http, url, body) = (http.clone(), url.to_string(), body.clone());
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                // A streamed answer counts only when it ran to its end.
                let streamed = body["stream"] == true;
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match http.post_json(&url, &body).await {
                            Ok(reply)
                                if reply.status == 200
                                    && (!streamed
                                        || reply.text().ends_with("data: [DONE]\n\n")) =>
                            {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                eprintln!("failed: {:?}", other.map(|r| (r.status, r.text())));
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            clients,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests succeeded, up to `deadline`.
    pub async fn wait_for(&self, more: u64, deadline: std::time::Duration) {
        let target = self.ok() + more;
        let ok = self.ok.clone();
        crate::wait::until("more answered requests", deadline, || {
            let ok = ok.clone();
            async move { (ok.load(Ordering::Relaxed) >= target).then_some(()) }
        })
        .await;
    }

    /// Stops the clients and waits for them; returns (ok, failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            let _ = client.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
