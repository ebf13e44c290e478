//! The edge's Prometheus metrics, per model (the canonical name of a routed
//! request, `unknown` otherwise, so client input never becomes a label);
//! the region is a constant label of the registry. Every finished request
//! is counted from its access record, so the log and the metrics agree.

use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::access_log::{AccessLog, AccessRecord};
use infermesh_runtime::metrics::{FIRST_TOKEN_SECONDS, PER_TOKEN_SECONDS, REQUEST_SECONDS};

/// Label value for requests that never reached a model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// See the module docs.
#[derive(Debug, Clone)]
pub struct EdgeMetrics {
    outcomes: Outcomes,
    in_flight: IntGaugeVec,
    rate_limited: IntCounterVec,
    upstream: HistogramVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    spillovers: IntCounterVec,
    /// The routing table in use and the stream it comes on.
    pub table: TableGauges,
    /// Failed authentications, and requests refused for too many of them.
    pub auth_failures: IntCounterVec,
    /// Requests whose handling panicked (answered 500).
    pub panics: IntCounter,
    /// Loans asked of the control plane's quota reserve, by outcome.
    pub loans: IntCounterVec,
    /// Requests for LoRA adapters, by placement.
    adapters: IntCounterVec,
    flow: FlowMetrics,
}

/// The flow-control queues: depth and wait by band, and requests shed.
#[derive(Debug, Clone)]
struct FlowMetrics {
    queue_depth: IntGaugeVec,
    queue_wait: HistogramVec,
    shed: IntCounterVec,
}

impl FlowMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let flow = Self {
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "infermesh_edge_queue_depth",
                    "Requests waiting at the edge because every replica of their model is full, by priority band and tenant.",
                ),
                &["model", "band", "tenant"],
            )
            .expect("valid gauge definition"),
            queue_wait: histogram(
                "infermesh_edge_queue_wait_seconds",
                "Time requests waited at the edge for their turn, by priority band and tenant.",
                REQUEST_SECONDS,
                &["model", "band", "tenant"],
            ),
            shed: counter(
                "infermesh_edge_shed_total",
                "Requests refused with 503 because every replica was full, by band, tenant and reason (sheddable: not held; timeout: no turn within the model's queue deadline).",
                &["model", "band", "tenant", "reason"],
            ),
        };
        register_all(
            registry,
            vec![
                Box::new(flow.queue_depth.clone()),
                Box::new(flow.queue_wait.clone()),
                Box::new(flow.shed.clone()),
            ],
        )?;
        Ok(flow)
    }
}

/// What finished requests came to, per model: counted from each access
/// record.
#[derive(Debug, Clone)]
struct Outcomes {
    requests: IntCounterVec,
    duration: HistogramVec,
    first_token: HistogramVec,
    per_token: HistogramVec,
    prompt_tokens: IntCounterVec,
    completion_tokens: IntCounterVec,
    spend: IntCounterVec,
    cache: IntCounterVec,
}

/// The routing table in use, and the stream to the control plane it came
/// on; kept current by the task that follows the subscription.
#[derive(Debug, Clone)]
pub struct TableGauges {
    /// Version of the routing table in use.
    pub version: IntGauge,
    /// 1 while a stream to a control plane is open.
    pub control_plane_connected: IntGauge,
    /// 1 while the table in use is the one saved to disk, not yet replaced by a push.
    pub stale: IntGauge,
    /// Objects of the table in use that were left out, by kind.
    pub skipped: IntGaugeVec,
    /// Pushed tables refused since start.
    pub refusals: IntCounter,
    /// How long a newer version than the one in use has been offered.
    pub lag: Gauge,
}

fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram definition")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

fn register_all(
    registry: &Registry,
    collectors: Vec<Box<dyn Collector>>,
) -> prometheus::Result<()> {
    for collector in collectors {
        registry.register(collector)?;
    }
    Ok(())
}

impl EdgeMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self {
            outcomes: Outcomes::register(registry)?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "infermesh_edge_requests_in_flight",
                    "Requests routed to a replica whose response has not ended.",
                ),
                &["model"],
            )
            .expect("valid gauge definition"),
            rate_limited: counter(
                "infermesh_edge_rate_limited_total",
                "Requests refused with 429, by the limit that refused them (requests, tokens, insufficient_quota).",
                &["model", "limit"],
            ),
            upstream: histogram(
                "infermesh_edge_upstream_request_duration_seconds",
                "Time from sending a request to a replica until its response headers, by replica.",
                REQUEST_SECONDS,
                &["model", "endpoint"],
            ),
            retries: counter(
                "infermesh_edge_retries_total",
                "Attempts on another replica after a refused connection, a connection lost before the response, or a 502/503.",
                &["model"],
            ),
            ejections: counter(
                "infermesh_edge_ejections_total",
                "Replicas ejected after consecutive failures, by endpoint.",
                &["endpoint"],
            ),
            spillovers: counter(
                "infermesh_edge_spillovers_total",
                "Requests forwarded to another region's edge because this region had no serving replica of the model.",
                &["model", "to_region"],
            ),
            table: TableGauges::register(registry)?,
            panics: IntCounter::new(
                "infermesh_edge_panics_total",
                "Requests whose handling panicked; each got a 500 and the edge kept serving.",
            )
            .expect("valid counter definition"),
            auth_failures: counter(
                "infermesh_edge_auth_failures_total",
                "Requests refused for their credentials, by outcome (unauthorized: 401; blocked: 429 for a client address past its failed attempts).",
                &["outcome"],
            ),
            flow: FlowMetrics::register(registry)?,
            adapters: counter(
                "infermesh_edge_adapter_requests_total",
                "Requests for LoRA adapters, by base model, adapter (registered names only) and placement (resident: sent to a replica holding it; loading: joined a load under way; load: the replica loads it first; load_failed: no replica could load it).",
                &["model", "adapter", "placement"],
            ),
            loans: counter(
                "infermesh_edge_quota_loans_total",
                "Loans asked of the control plane's quota reserve by admissions this edge's grant could not cover, by outcome (lent; refused: the reserve was spent; unanswered: no stream, or no answer within 20 ms).",
                &["outcome"],
            ),
        };
        register_all(
            registry,
            vec![
                Box::new(metrics.in_flight.clone()),
                Box::new(metrics.rate_limited.clone()),
                Box::new(metrics.upstream.clone()),
                Box::new(metrics.retries.clone()),
                Box::new(metrics.spillovers.clone()),
                Box::new(metrics.ejections.clone()),
                Box::new(metrics.auth_failures.clone()),
                Box::new(metrics.panics.clone()),
                Box::new(metrics.loans.clone()),
                Box::new(metrics.adapters.clone()),
            ],
        )?;
        Ok(metrics)
    }

    /// Counts a finished request.
    pub fn finished(&self, record: &AccessRecord) {
        self.outcomes.count(record);
    }

    /// A request routed to `model` is in flight until the guard drops.
    pub fn in_flight(&self, model: &str) -> InFlight {
        let gauge = self.in_flight.with_label_values(&[model]);
        gauge.inc();
        InFlight(gauge)
    }

    /// A request for `model` refused by the `limit` limit.
    pub fn rate_limited(&self, model: &str, limit: &str) {
        self.rate_limited.with_label_values(&[model, limit]).inc();
    }

    /// Requests of `tenant` for `model` in `band` waiting at the edge now.
    pub fn queue_depth(&self, model: &str, band: &str, tenant: &str, depth: usize) {
        self.flow
            .queue_depth
            .with_label_values(&[model, band, tenant])
            .set(depth as i64);
    }

    /// A request of `tenant` for `model` in `band` waited `seconds` for its turn.
    pub fn queue_waited(&self, model: &str, band: &str, tenant: &str, seconds: f64) {
        self.flow
            .queue_wait
            .with_label_values(&[model, band, tenant])
            .observe(seconds);
    }

    /// A request of `tenant` for `model` in `band` was shed for `reason`.
    pub fn shed(&self, model: &str, band: &str, tenant: &str, reason: &str) {
        self.flow
            .shed
            .with_label_values(&[model, band, tenant, reason])
            .inc();
    }

    /// A request for `model` was retried on another replica.
    pub fn retried(&self, model: &str) {
        self.retries.with_label_values(&[model]).inc();
    }

    /// A request for `adapter` on `model` was placed as `placement` says.
    pub fn adapter_placed(&self, model: &str, adapter: &str, placement: &str) {
        self.adapters
            .with_label_values(&[model, adapter, placement])
            .inc();
    }

    /// A request for `model` was forwarded to the edge of `region`.
    pub fn spilled(&self, model: &str, region: &str) {
        self.spillovers.with_label_values(&[model, region]).inc();
    }

    /// Drops the per-endpoint series of `endpoint`, which left the table:
    /// a fleet that churns must not grow the edge's metrics without bound.
    pub fn forget_endpoint(&self, endpoint: &str) {
        let _ = self.ejections.remove_label_values(&[endpoint]);
        let models: Vec<String> = self
            .upstream
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == "endpoint" && l.value() == endpoint)
            })
            .filter_map(|metric| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "model")
                    .map(|l| l.value().to_string())
            })
            .collect();
        for model in models {
            let _ = self.upstream.remove_label_values(&[&model, endpoint]);
        }
    }

    /// `endpoint` was ejected.
    pub fn ejected(&self, endpoint: &str) {
        self.ejections.with_label_values(&[endpoint]).inc();
    }

    /// A replica's response headers came after `elapsed`.
    pub fn upstream(&self, model: &str, endpoint: &str, elapsed: Duration) {
        self.upstream
            .with_label_values(&[model, endpoint])
            .observe(elapsed.as_secs_f64());
    }
}

impl Outcomes {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let outcomes = Self {
            requests: counter(
                "infermesh_edge_requests_total",
                "Requests answered, by model, HTTP status code and OpenAI error code (none when it succeeded).",
                &["model", "code", "error"],
            ),
            duration: histogram(
                "infermesh_edge_request_duration_seconds",
                "Time from the request's arrival to the end of its response body.",
                REQUEST_SECONDS,
                &["model"],
            ),
            first_token: histogram(
                "infermesh_edge_time_to_first_token_seconds",
                "Time from the request's arrival to the first byte of the response body.",
                FIRST_TOKEN_SECONDS,
                &["model"],
            ),
            per_token: histogram(
                "infermesh_edge_time_per_output_token_seconds",
                "Mean time between output tokens of a streamed response after the first.",
                PER_TOKEN_SECONDS,
                &["model"],
            ),
            prompt_tokens: counter(
                "infermesh_edge_prompt_tokens_total",
                "Prompt tokens, as the engine's usage reported them.",
                &["model"],
            ),
            completion_tokens: counter(
                "infermesh_edge_completion_tokens_total",
                "Completion tokens, as the engine's usage reported them.",
                &["model"],
            ),
            spend: counter(
                "infermesh_edge_spend_micros_total",
                "Spend charged against budgets, in millionths of a currency unit, by model and tenant: what requests used at the model's price.",
                &["model", "tenant"],
            ),
            cache: counter(
                "infermesh_edge_cache_requests_total",
                "Requests of models with a cache policy, by outcome (hit, miss, bypass).",
                &["model", "outcome"],
            ),
        };
        register_all(
            registry,
            vec![
                Box::new(outcomes.requests.clone()),
                Box::new(outcomes.duration.clone()),
                Box::new(outcomes.first_token.clone()),
                Box::new(outcomes.per_token.clone()),
                Box::new(outcomes.prompt_tokens.clone()),
                Box::new(outcomes.completion_tokens.clone()),
                Box::new(outcomes.spend.clone()),
                Box::new(outcomes.cache.clone()),
            ],
        )?;
        Ok(outcomes)
    }

    /// Counts a finished request.
    fn count(&self, record: &AccessRecord) {
        let model = record.served_model.as_deref().unwrap_or(UNKNOWN_MODEL);
        let status = http::StatusCode::from_u16(record.status).ok();
        let code = status.as_ref().map_or("000", http::StatusCode::as_str);
        let error = record.error.as_deref().unwrap_or("none");
        self.requests.with_label_values(&[model, code, error]).inc();
        self.duration
            .with_label_values(&[model])
            .observe(record.total_ms / 1000.0);
        if record.served_model.is_none() {
            return;
        }
        if !matches!(record.cache, "none" | "") {
            self.cache.with_label_values(&[model, record.cache]).inc();
        }
        if let Some(ttft) = record.ttft_ms {
            self.first_token
                .with_label_values(&[model])
                .observe(ttft / 1000.0);
            if let Some(tokens) = record.tokens_out.filter(|&t| t > 1 && record.stream) {
                let decoding = (record.total_ms - ttft).max(0.0) / 1000.0;
                self.per_token
                    .with_label_values(&[model])
                    .observe(decoding / (tokens - 1) as f64);
            }
        }
        if let Some(tokens) = record.tokens_in {
            self.prompt_tokens
                .with_label_values(&[model])
                .inc_by(tokens);
        }
        if let Some(tokens) = record.tokens_out {
            self.completion_tokens
                .with_label_values(&[model])
                .inc_by(tokens);
        }
        if let Some(micros) = record.spend_micros.filter(|&m| m > 0) {
            let tenant = record.tenant.as_deref().unwrap_or("");
            self.spend
                .with_label_values(&[model, tenant])
                .inc_by(micros);
        }
    }
}

impl TableGauges {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauges = Self {
            version: IntGauge::new(
                "infermesh_edge_routing_table_version",
                "Version of the routing table in use (0 before the first).",
            )?,
            stale: IntGauge::new(
                "infermesh_edge_routing_table_stale",
                "1 while the edge routes with the table saved to disk, no control plane having pushed one since it started.",
            )?,
            control_plane_connected: IntGauge::new(
                "infermesh_edge_control_plane_connected",
                "1 while the routing-table stream to a control plane is open.",
            )?,
            skipped: IntGaugeVec::new(
                Opts::new(
                    "infermesh_edge_routing_table_objects_skipped",
                    "Objects of the routing table in use that the edge left out because it could not use them, by kind.",
                ),
                &["kind"],
            )?,
            refusals: IntCounter::new(
                "infermesh_edge_routing_table_refusals_total",
                "Pushed routing tables this edge refused (NACKed), keeping the one it had.",
            )?,
            lag: Gauge::new(
                "infermesh_edge_routing_table_lag_seconds",
                "Seconds since a control plane offered a newer routing table than the one in use (0 when current).",
            )?,
        };
        register_all(
            registry,
            vec![
                Box::new(gauges.version.clone()),
                Box::new(gauges.control_plane_connected.clone()),
                Box::new(gauges.stale.clone()),
                Box::new(gauges.skipped.clone()),
                Box::new(gauges.refusals.clone()),
                Box::new(gauges.lag.clone()),
            ],
        )?;
        Ok(gauges)
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Where a finished request goes: its access-log line and the metrics.
#[derive(Clone)]
pub struct Observer {
    log: AccessLog,
    metrics: Option<Arc<EdgeMetrics>>,
}

impl Observer {
    /// Logs to `log` and counts in `metrics`.
    pub fn new(log: AccessLog, metrics: Arc<EdgeMetrics>) -> Self {
        Self {
            log,
            metrics: Some(metrics),
        }
    }

    /// Neither logs nor counts (unit tests).
    pub fn disabled() -> Self {
        Self {
            log: AccessLog::disabled(),
            metrics: None,
        }
    }

    /// Records a finished request.
    pub fn finished(&self, record: &AccessRecord) {
        self.log.write(record);
        if let Some(metrics) = &self.metrics {
            metrics.finished(record);
        }
    }

    /// The metrics, when counting.
    pub fn metrics(&self) -> Option<&EdgeMetrics> {
        self.metrics.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: Option<&str>, status: u16) -> AccessRecord {
        AccessRecord {
            served_model: model.map(String::from),
            status,
            total_ms: 1500.0,
            ttft_ms: Some(100.0),
            tokens_in: Some(10),
            tokens_out: Some(15),
            stream: true,
            ..Default::default()
        }
    }

    #[test]
    fn an_endpoint_that_left_the_table_takes_its_series_with_it() {
        let registry = Registry::new();
        let metrics = EdgeMetrics::register(&registry).unwrap();
        for (model, endpoint) in [("llama", "a"), ("qwen", "a"), ("llama", "b")] {
            metrics.upstream(model, endpoint, Duration::from_millis(3));
        }
        metrics.ejected("a");
        metrics.forget_endpoint("a");
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(!text.contains(r#"endpoint="a""#), "{text}");
        assert!(
            text.contains(r#"infermesh_edge_upstream_request_duration_seconds_count{endpoint="b",model="llama"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_streamed_request_fills_every_series_and_unrouted_ones_only_the_counters() {
        let registry = Registry::new();
        let metrics = EdgeMetrics::register(&registry).unwrap();
        metrics.finished(&record(Some("llama"), 200));
        metrics.finished(&record(None, 404));
        let text = infermesh_runtime::metrics::render(&registry);
        for line in [
            r#"infermesh_edge_requests_total{code="200",error="none",model="llama"} 1"#,
            r#"infermesh_edge_requests_total{code="404",error="none",model="unknown"} 1"#,
            r#"infermesh_edge_prompt_tokens_total{model="llama"} 10"#,
            r#"infermesh_edge_completion_tokens_total{model="llama"} 15"#,
            r#"infermesh_edge_time_to_first_token_seconds_count{model="llama"} 1"#,
            r#"infermesh_edge_time_per_output_token_seconds_count{model="llama"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        // (1.5 s - 0.1 s) over 14 gaps = 0.1 s per token.
        let sum: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    r#"infermesh_edge_time_per_output_token_seconds_sum{model="llama"} "#,
                )
            })
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((sum - 0.1).abs() < 1e-9, "{sum}");
        assert!(!text.contains(r#"infermesh_edge_prompt_tokens_total{model="unknown"}"#));
    }

    #[test]
    fn in_flight_falls_back_when_the_guard_drops() {
        let registry = Registry::new();
        let metrics = EdgeMetrics::register(&registry).unwrap();
        let guard = metrics.in_flight("llama");
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(text.contains(r#"infermesh_edge_requests_in_flight{model="llama"} 1"#));
        drop(guard);
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(text.contains(r#"infermesh_edge_requests_in_flight{model="llama"} 0"#));
    }
}
