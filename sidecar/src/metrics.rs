//! The sidecar's Prometheus metrics: the engine's queue, running requests,
//! KV-cache use and prefix-cache hit rate as last scraped, every GPU's
//! utilisation and memory, how old the last load report is, and the
//! requests it proxied. The replica's endpoint, pool, model and region are
//! constant labels of the registry.

use std::time::Duration;

use infermesh_proto::v1::Load;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::gpu::GpuReading;
use infermesh_runtime::metrics::REQUEST_SECONDS;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct SidecarMetrics {
    engine_up: IntGauge,
    waiting: IntGauge,
    running: IntGauge,
    kv_cache: Gauge,
    prefix_hits: Gauge,
    gpu_available: IntGauge,
    gpu_utilization: GaugeVec,
    gpu_memory_used: GaugeVec,
    gpu_memory_total: GaugeVec,
    report_age: Gauge,
    requests: IntCounterVec,
    duration: Histogram,
    refused_callers: IntCounter,
}

fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("valid gauge definition")
}

fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid gauge definition")
}

fn per_gpu(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["gpu", "uuid"]).expect("valid gauge definition")
}

impl SidecarMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self {
            engine_up: int_gauge(
                "infermesh_sidecar_engine_up",
                "1 when the engine's last health probe succeeded.",
            ),
            waiting: int_gauge(
                "infermesh_sidecar_engine_requests_waiting",
                "Requests queued in the engine, as last scraped.",
            ),
            running: int_gauge(
                "infermesh_sidecar_engine_requests_running",
                "Requests the engine is decoding, as last scraped.",
            ),
            kv_cache: gauge(
                "infermesh_sidecar_engine_kv_cache_usage_ratio",
                "Share of the engine's KV-cache blocks in use (0 to 1), as last scraped.",
            ),
            prefix_hits: gauge(
                "infermesh_sidecar_engine_prefix_cache_hit_ratio",
                "Share of prompt tokens served from the engine's prefix cache over the last interval (0 to 1).",
            ),
            gpu_available: int_gauge(
                "infermesh_sidecar_gpu_telemetry_available",
                "1 when NVML is loaded and GPU figures are read; 0 in a pod without a GPU or NVML.",
            ),
            gpu_utilization: per_gpu(
                "infermesh_sidecar_gpu_utilization_ratio",
                "Share of the last sample period the GPU was busy (0 to 1), from NVML.",
            ),
            gpu_memory_used: per_gpu(
                "infermesh_sidecar_gpu_memory_used_bytes",
                "GPU memory in use, from NVML.",
            ),
            gpu_memory_total: per_gpu(
                "infermesh_sidecar_gpu_memory_total_bytes",
                "GPU memory in all, from NVML.",
            ),
            report_age: gauge(
                "infermesh_sidecar_load_report_age_seconds",
                "Seconds since the last load report reached the control-plane stream (grows while it is unreachable).",
            ),
            requests: IntCounterVec::new(
                Opts::new(
                    "infermesh_sidecar_requests_total",
                    "Requests proxied to the engine, by HTTP status code (502 when it was unreachable).",
                ),
                &["code"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "infermesh_sidecar_request_duration_seconds",
                    "Time from a request's arrival until the engine's response headers.",
                )
                .buckets(REQUEST_SECONDS.to_vec()),
            )?,
            refused_callers: IntCounter::new(
                "infermesh_sidecar_refused_callers_total",
                "Requests refused with 403 because the caller's client certificate names no edge.",
            )?,
        };
        registry.register(Box::new(metrics.refused_callers.clone()))?;
        registry.register(Box::new(metrics.engine_up.clone()))?;
        registry.register(Box::new(metrics.waiting.clone()))?;
        registry.register(Box::new(metrics.running.clone()))?;
        registry.register(Box::new(metrics.kv_cache.clone()))?;
        registry.register(Box::new(metrics.prefix_hits.clone()))?;
        registry.register(Box::new(metrics.gpu_available.clone()))?;
        registry.register(Box::new(metrics.gpu_utilization.clone()))?;
        registry.register(Box::new(metrics.gpu_memory_used.clone()))?;
        registry.register(Box::new(metrics.gpu_memory_total.clone()))?;
        registry.register(Box::new(metrics.report_age.clone()))?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        Ok(metrics)
    }

    /// The engine's figures from one scrape.
    pub fn engine(&self, load: &Load) {
        self.engine_up.set(i64::from(load.engine_healthy));
        self.waiting.set(i64::from(load.waiting));
        self.running.set(i64::from(load.running));
        self.kv_cache.set(load.kv_cache_usage);
        self.prefix_hits.set(load.prefix_cache_hit_rate);
    }

    /// GPU figures from one read; `None` when there are none to read.
    pub fn gpus(&self, readings: Option<&[GpuReading]>) {
        let Some(readings) = readings else {
            self.gpu_available.set(0);
            return;
        };
        self.gpu_available.set(1);
        for gpu in readings {
            let index = gpu.index.to_string();
            let labels = [index.as_str(), gpu.uuid.as_str()];
            self.gpu_utilization
                .with_label_values(&labels)
                .set(gpu.utilization);
            self.gpu_memory_used
                .with_label_values(&labels)
                .set(gpu.memory_used as f64);
            self.gpu_memory_total
                .with_label_values(&labels)
                .set(gpu.memory_total as f64);
        }
    }

    /// Time since the last load report was sent.
    pub fn report_age(&self, age: Duration) {
        self.report_age.set(age.as_secs_f64());
    }

    /// A caller without an edge identity was refused.
    pub fn refused_caller(&self) {
        self.refused_callers.inc();
    }

    /// A proxied request got `status` after `elapsed`.
    pub fn request(&self, status: http::StatusCode, elapsed: Duration) {
        self.requests.with_label_values(&[status.as_str()]).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_and_gpu_figures_appear_with_the_replica_labels() {
        let registry = infermesh_runtime::metrics::registry(&[("endpoint", "r0")]);
        let metrics = SidecarMetrics::register(&registry).unwrap();
        metrics.engine(&Load {
            waiting: 3,
            running: 5,
            kv_cache_usage: 0.25,
            engine_healthy: true,
            ..Default::default()
        });
        metrics.gpus(Some(&[GpuReading {
            index: 0,
            uuid: "GPU-abc".into(),
            name: "H100".into(),
            utilization: 0.87,
            memory_used: 1024,
            memory_total: 4096,
        }]));
        let text = infermesh_runtime::metrics::render(&registry);
        for line in [
            r#"infermesh_sidecar_engine_requests_waiting{endpoint="r0"} 3"#,
            r#"infermesh_sidecar_engine_kv_cache_usage_ratio{endpoint="r0"} 0.25"#,
            r#"infermesh_sidecar_gpu_utilization_ratio{gpu="0",uuid="GPU-abc",endpoint="r0"} 0.87"#,
            r#"infermesh_sidecar_gpu_memory_total_bytes{gpu="0",uuid="GPU-abc",endpoint="r0"} 4096"#,
            r#"infermesh_sidecar_gpu_telemetry_available{endpoint="r0"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        metrics.gpus(None);
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(text.contains(r#"infermesh_sidecar_gpu_telemetry_available{endpoint="r0"} 0"#));
    }
}
