//! The scrape loop: every interval, read the engine's `/metrics` and probe
//! its `/health`, each with a deadline, and publish the resulting `Load`.
//! A failed scrape marks the engine unhealthy; it never stops the loop.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use infermesh_proto::v1::Load;
use infermesh_runtime::http::{UpstreamClient, empty};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::EngineKind;
use super::metrics::{EngineFigures, Samples, figures};
use crate::gpu::{GpuReading, GpuTelemetry, pod_totals};
use crate::metrics::SidecarMetrics;

/// Largest metrics page read; engines with many histograms stay well below.
const MAX_METRICS_BYTES: usize = 8 * 1024 * 1024;

/// Scrapes one engine.
pub struct Scraper {
    client: UpstreamClient,
    engine: EngineKind,
    metrics_uri: Uri,
    health_uri: Uri,
    timeout: Duration,
    previous_counters: Option<(f64, f64)>,
    hit_rate: f64,
    gpu: GpuTelemetry,
    metrics: Option<SidecarMetrics>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    adapters: Option<std::sync::Arc<crate::adapters::Adapters>>,
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection or protocol failure.
    #[error("{0}")]
    Http(String),
    /// The engine answered with an error status.
    #[error("status {0}")]
    Status(StatusCode),
}

impl Scraper {
    /// A scraper of the engine at `base` (e.g. `http://127.0.0.1:8000`).
    pub fn new(
        client: UpstreamClient,
        engine: EngineKind,
        base: &Uri,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let join = |path: &str| -> anyhow::Result<Uri> {
            Ok(format!("{}{}", base.to_string().trim_end_matches('/'), path).parse()?)
        };
        Ok(Self {
            client,
            engine,
            gpu: GpuTelemetry::Unavailable("GPU telemetry not configured".into()),
            metrics: None,
            metrics_uri: join("/metrics")?,
            health_uri: join("/health")?,
            timeout,
            previous_counters: None,
            hit_rate: 0.0,
            requests: Default::default(),
            adapters: None,
        })
    }

    /// Reports the resident adapters of `adapters` with each load.
    pub fn with_adapters(mut self, adapters: std::sync::Arc<crate::adapters::Adapters>) -> Self {
        self.adapters = Some(adapters);
        self
    }

    async fn get(&self, uri: &Uri, limit: usize) -> Result<bytes::Bytes, ScrapeError> {
        let request = Request::get(uri.clone())
            .body(empty())
            .map_err(|e| ScrapeError::Http(e.to_string()))?;
        let fetch = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| ScrapeError::Http(e.to_string()))?;
            if !response.status().is_success() {
                return Err(ScrapeError::Status(response.status()));
            }
            let body = http_body_util::Limited::new(response.into_body(), limit);
            body.collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| ScrapeError::Http(e.to_string()))
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .map_err(|_| ScrapeError::Timeout(self.timeout))?
    }

    /// Reports the proxy's request count from `requests`.
    pub fn counting(mut self, requests: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.requests = requests;
        self
    }

    /// Also reads GPU figures from `gpu`, and publishes every scrape to `metrics`.
    pub fn with_telemetry(mut self, gpu: GpuTelemetry, metrics: SidecarMetrics) -> Self {
        if let GpuTelemetry::Unavailable(why) = &gpu {
            tracing::info!(reason = %why, "no GPU telemetry");
        }
        self.gpu = gpu;
        self.metrics = Some(metrics);
        self
    }

    /// Reads metrics, health and GPU figures once.
    pub async fn scrape(&mut self) -> Load {
        let (metrics, health, gpus) = tokio::join!(
            self.get(&self.metrics_uri, MAX_METRICS_BYTES),
            self.get(&self.health_uri, 64 * 1024),
            self.read_gpus()
        );
        let figures = match metrics {
            Ok(text) => figures(
                self.engine,
                &Samples::parse(&String::from_utf8_lossy(&text)),
            ),
            Err(error) => {
                tracing::debug!(%error, "engine metrics scrape failed");
                EngineFigures::default()
            }
        };
        if let Err(error) = &health {
            tracing::debug!(%error, "engine health probe failed");
        }
        self.update_hit_rate(&figures);
        let totals = gpus.as_deref().and_then(pod_totals);
        let load = Load {
            running: figures.running,
            waiting: figures.waiting,
            kv_cache_usage: figures.kv_cache_usage,
            prefix_cache_hit_rate: self.hit_rate,
            gpu_utilization: totals.map(|t| t.0),
            gpu_memory_used_bytes: totals.map(|t| t.1),
            gpu_memory_total_bytes: totals.map(|t| t.2),
            engine_healthy: health.is_ok(),
            observed_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            requests_total: self.requests.load(std::sync::atomic::Ordering::Relaxed),
            adapters: self
                .adapters
                .as_ref()
                .map_or_else(Vec::new, |adapters| adapters.resident()),
        };
        if let Some(metrics) = &self.metrics {
            metrics.engine(&load);
            metrics.gpus(gpus.as_deref());
        }
        load
    }

    /// GPU figures, or `None` (logged once per change of reason) when there are none.
    async fn read_gpus(&self) -> Option<Vec<GpuReading>> {
        if !self.gpu.is_available() {
            return None;
        }
        match self.gpu.read().await {
            Ok(readings) => Some(readings),
            Err(error) => {
                tracing::debug!(%error, "GPU read failed");
                None
            }
        }
    }

    /// Hit rate over the last interval from cumulative counters; kept when no query happened.
    fn update_hit_rate(&mut self, figures: &EngineFigures) {
        if let Some(rate) = figures.prefix_hit_rate {
            self.hit_rate = rate;
            return;
        }
        let Some((hits, queries)) = figures.prefix_counters else {
            return;
        };
        if let Some((prev_hits, prev_queries)) = self.previous_counters {
            let dq = queries - prev_queries;
            let dh = hits - prev_hits;
            // Counters reset when the engine restarts; a negative delta starts over.
            if dq > 0.0 && dh >= 0.0 {
                self.hit_rate = (dh / dq).clamp(0.0, 1.0);
            }
        }
        self.previous_counters = Some((hits, queries));
    }

    /// Scrapes every `interval` until cancelled, publishing each `Load`.
    pub async fn run(
        mut self,
        interval: Duration,
        loads: watch::Sender<Load>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let load = self.scrape().await;
            let was_healthy = loads.borrow().engine_healthy;
            if was_healthy != load.engine_healthy {
                tracing::info!(healthy = load.engine_healthy, "engine health changed");
            }
            loads.send_replace(load);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scraper() -> Scraper {
        let client = infermesh_runtime::http::upstream_client(Duration::from_millis(100));
        Scraper::new(
            client,
            EngineKind::Vllm,
            &"http://127.0.0.1:1".parse().unwrap(),
            Duration::from_millis(200),
        )
        .unwrap()
    }

    #[test]
    fn hit_rate_is_the_ratio_of_counter_deltas() {
        let mut s = scraper();
        let at = |h, q| EngineFigures {
            prefix_counters: Some((h, q)),
            ..Default::default()
        };
        s.update_hit_rate(&at(10.0, 100.0));
        assert_eq!(s.hit_rate, 0.0, "one sample is no rate");
        s.update_hit_rate(&at(40.0, 140.0));
        assert!((s.hit_rate - 0.75).abs() < 1e-9);
        s.update_hit_rate(&at(40.0, 140.0));
        assert!((s.hit_rate - 0.75).abs() < 1e-9, "idle keeps the last rate");
        s.update_hit_rate(&at(0.0, 10.0));
        s.update_hit_rate(&at(5.0, 20.0));
        assert!(
            (s.hit_rate - 0.5).abs() < 1e-9,
            "restart resets the baseline"
        );
    }

    #[tokio::test]
    async fn an_unreachable_engine_is_reported_unhealthy() {
        let load = scraper().scrape().await;
        assert!(!load.engine_healthy);
        assert_eq!(load.running, 0);
    }
}
