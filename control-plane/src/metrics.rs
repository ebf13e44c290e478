//! The control plane's Prometheus metrics: subscribers by role and region
//! with their largest lag and their refusals, the table version, push latency (an etcd write committed by this replica
//! until a subscriber ACKs a table that includes it), etcd request latency,
//! leadership, load reports, and serving replicas per pool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use tokio::time::Instant;

use infermesh_proto::v1::{Pool, SubscriberRole};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use infermesh_runtime::metrics::CONTROL_SECONDS;

/// How many recent writes are remembered for push latency.
const WRITES_KEPT: usize = 4096;

/// See the module docs.
#[derive(Debug)]
pub struct ControlPlaneMetrics {
    subscribers: IntGaugeVec,
    subscriber_lag: IntGaugeVec,
    /// The (role, region) label pairs `subscriber_lag` holds now.
    lag_labels: Mutex<HashSet<(String, String)>>,
    subscriber_nacks: IntCounterVec,
    table_version: IntGauge,
    push_latency: HistogramVec,
    etcd: HistogramVec,
    /// 1 on the replica that won leader election.
    pub leader: IntGauge,
    load_reports: IntCounter,
    watch_lag: prometheus::Gauge,
    /// This replica's part of shared limits nobody asked for lately.
    pub quota_default_part: prometheus::Gauge,
    /// Parts records this replica has read.
    pub quota_parts_records: IntCounter,
    watch_resyncs: IntCounterVec,
    registrations_refused: IntCounterVec,
    /// Tables pushed and their encoded bytes: (count, bytes) for full
    /// tables, then for changes.
    pushes: [(IntCounter, IntCounter); 2],
    pool_serving: IntGaugeVec,
    /// Leader only: the autoscaler's desired replicas per pool.
    pub pool_desired: IntGaugeVec,
    /// Leader only: the fewest replicas per pool now (floors included).
    pub pool_floor: IntGaugeVec,
    /// Recent writes: (etcd revision, when it committed), oldest first.
    writes: Mutex<VecDeque<(i64, Instant)>>,
}

/// How a table went out.
#[derive(Debug, Clone, Copy)]
pub enum PushKind {
    /// The whole table.
    Full = 0,
    /// What changed since the table the stream sent last.
    Delta = 1,
}

fn role_label(role: SubscriberRole) -> &'static str {
    match role {
        SubscriberRole::Edge => "edge",
        SubscriberRole::Sidecar => "sidecar",
        SubscriberRole::Unspecified => "unspecified",
    }
}

impl ControlPlaneMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let pushes = IntCounterVec::new(
            Opts::new(
                "infermesh_control_plane_table_pushes_total",
                "Routing tables pushed to subscribers, whole (kind=full) or as the change from the previous one (kind=delta).",
            ),
            &["kind"],
        )?;
        let pushed_bytes = IntCounterVec::new(
            Opts::new(
                "infermesh_control_plane_table_push_bytes_total",
                "Encoded bytes of the routing tables pushed, by kind (full or delta).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(pushed_bytes.clone()))?;
        let by_kind = |kind: &str| {
            (
                pushes.with_label_values(&[kind]),
                pushed_bytes.with_label_values(&[kind]),
            )
        };
        let metrics = Self {
            pushes: [by_kind("full"), by_kind("delta")],
            subscribers: IntGaugeVec::new(
                Opts::new(
                    "infermesh_control_plane_subscribers",
                    "Open routing-table streams, by subscriber role and region.",
                ),
                &["role", "region"],
            )?,
            subscriber_lag: IntGaugeVec::new(
                Opts::new(
                    "infermesh_control_plane_subscriber_lag_versions",
                    "Largest lag of this replica's subscribers, by role and region: table version offered minus version acknowledged (etcd revisions), refreshed every load-exchange round.",
                ),
                &["role", "region"],
            )?,
            lag_labels: Mutex::default(),
            subscriber_nacks: IntCounterVec::new(
                Opts::new(
                    "infermesh_control_plane_subscriber_nacks_total",
                    "Routing tables refused (NACKed) by this replica's subscribers, by role and region.",
                ),
                &["role", "region"],
            )?,
            table_version: IntGauge::new(
                "infermesh_control_plane_table_version",
                "etcd revision of the registry snapshot tables are built from.",
            )?,
            push_latency: HistogramVec::new(
                HistogramOpts::new(
                    "infermesh_control_plane_push_latency_seconds",
                    "Time from an etcd write this replica committed until a subscriber ACKed a table including it.",
                )
                .buckets(CONTROL_SECONDS.to_vec()),
                &["role"],
            )?,
            etcd: HistogramVec::new(
                HistogramOpts::new(
                    "infermesh_control_plane_etcd_request_duration_seconds",
                    "Latency of etcd requests, by operation (errors included).",
                )
                .buckets(CONTROL_SECONDS.to_vec()),
                &["op"],
            )?,
            leader: IntGauge::new(
                "infermesh_control_plane_leader",
                "1 on the control-plane replica that runs the singletons.",
            )?,
            registrations_refused: IntCounterVec::new(
                Opts::new(
                    "infermesh_control_plane_registrations_refused_total",
                    "Sidecar registrations refused before anything was written, by gRPC code (permission_denied: not the certificate's endpoint, pool, region or address; resource_exhausted: too many).",
                ),
                &["code"],
            )?,
            watch_lag: prometheus::Gauge::new(
                "infermesh_control_plane_watch_lag_seconds",
                "Seconds the registry watch has been behind a revision etcd reported under the prefix (0 when current); a resync follows at 10 s.",
            )?,
            quota_default_part: prometheus::Gauge::new(
                "infermesh_control_plane_quota_default_part",
                "This replica's part of each shared rate limit and budget that no edge asked for lately (others follow demand): its edges' share of all edges, as the leader's last two parts records agree; 0 until a record names it with edges.",
            )?,
            quota_parts_records: IntCounter::new(
                "infermesh_control_plane_quota_parts_records_total",
                "Records of every replica's parts of the shared limits this replica has read (the leader writes one a second).",
            )?,
            watch_resyncs: IntCounterVec::new(
                Opts::new(
                    "infermesh_control_plane_watch_resyncs_total",
                    "Times the registry snapshot was reloaded from etcd, by reason (failed: the watch broke; stalled: it stopped delivering while etcd had newer writes).",
                ),
                &["reason"],
            )?,
            load_reports: IntCounter::new(
                "infermesh_control_plane_load_reports_total",
                "Load reports received from sidecars.",
            )?,
            pool_serving: IntGaugeVec::new(
                Opts::new(
                    "infermesh_control_plane_pool_serving_endpoints",
                    "Serving replicas of each registered pool (0 included).",
                ),
                &["region", "pool", "model"],
            )?,
            pool_desired: IntGaugeVec::new(
                Opts::new(
                    "infermesh_pool_desired_replicas",
                    "Replicas the autoscaler wants for each pool; exported by the leading replica only, for HPA or KEDA.",
                ),
                &["region", "pool", "model"],
            )?,
            pool_floor: IntGaugeVec::new(
                Opts::new(
                    "infermesh_pool_floor_replicas",
                    "Fewest replicas of each pool now (min_replicas or the open time window's floor); leading replica only.",
                ),
                &["region", "pool", "model"],
            )?,
            writes: Mutex::new(VecDeque::with_capacity(WRITES_KEPT)),
        };
        registry.register(Box::new(metrics.subscribers.clone()))?;
        registry.register(Box::new(metrics.subscriber_lag.clone()))?;
        registry.register(Box::new(metrics.subscriber_nacks.clone()))?;
        registry.register(Box::new(metrics.table_version.clone()))?;
        registry.register(Box::new(metrics.push_latency.clone()))?;
        registry.register(Box::new(metrics.etcd.clone()))?;
        registry.register(Box::new(metrics.leader.clone()))?;
        registry.register(Box::new(metrics.load_reports.clone()))?;
        registry.register(Box::new(metrics.watch_lag.clone()))?;
        registry.register(Box::new(metrics.watch_resyncs.clone()))?;
        registry.register(Box::new(metrics.quota_default_part.clone()))?;
        registry.register(Box::new(metrics.quota_parts_records.clone()))?;
        registry.register(Box::new(metrics.registrations_refused.clone()))?;
        registry.register(Box::new(metrics.pool_serving.clone()))?;
        registry.register(Box::new(metrics.pool_desired.clone()))?;
        registry.register(Box::new(metrics.pool_floor.clone()))?;
        Ok(metrics)
    }

    /// Times one etcd request under `op`.
    pub async fn etcd<T>(&self, op: &str, request: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = request.await;
        self.etcd
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// An etcd write committed at `revision` just now.
    pub fn write_committed(&self, revision: i64) {
        let mut writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if writes.len() == WRITES_KEPT {
            writes.pop_front();
        }
        writes.push_back((revision, Instant::now()));
    }

    /// A subscriber of `role` that had ACKed `previous` ACKed `version`:
    /// observes the push latency of the newest write it now includes.
    pub fn acked(&self, role: SubscriberRole, previous: u64, version: u64) {
        let written = {
            let writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
            writes
                .iter()
                .rev()
                .find(|(revision, _)| {
                    let revision = u64::try_from(*revision).unwrap_or(0);
                    revision > previous && revision <= version
                })
                .map(|(_, at)| *at)
        };
        if let Some(at) = written {
            self.push_latency
                .with_label_values(&[role_label(role)])
                .observe(at.elapsed().as_secs_f64());
        }
    }

    /// A routing-table stream opened; it counts until the guard drops.
    pub fn subscriber(&self, role: SubscriberRole, region: &str) -> SubscriberGuard {
        let gauge = self
            .subscribers
            .with_label_values(&[role_label(role), region]);
        gauge.inc();
        SubscriberGuard(gauge)
    }

    /// A subscriber of `role` in `region` refused a table.
    pub fn nacked(&self, role: SubscriberRole, region: &str) {
        self.subscriber_nacks
            .with_label_values(&[role_label(role), region])
            .inc();
    }

    /// Sets the lag gauge to the largest lag of each role and region among
    /// `lags` (role, region, versions behind); a role and region with no
    /// subscriber left loses its series.
    pub fn subscriber_lags<'a>(
        &self,
        lags: impl IntoIterator<Item = (SubscriberRole, &'a str, u64)>,
    ) {
        let mut largest: HashMap<(String, String), u64> = HashMap::new();
        for (role, region, lag) in lags {
            let entry = largest
                .entry((role_label(role).to_string(), region.to_string()))
                .or_default();
            *entry = (*entry).max(lag);
        }
        let mut held = self.lag_labels.lock().unwrap_or_else(|e| e.into_inner());
        for (role, region) in held.iter() {
            if !largest.contains_key(&(role.clone(), region.clone())) {
                let _ = self.subscriber_lag.remove_label_values(&[role, region]);
            }
        }
        for ((role, region), lag) in &largest {
            self.subscriber_lag
                .with_label_values(&[role, region])
                .set(i64::try_from(*lag).unwrap_or(i64::MAX));
        }
        *held = largest.into_keys().collect();
    }

    /// A table of `bytes` went out to one subscriber.
    pub fn pushed(&self, kind: PushKind, bytes: usize) {
        let (count, total) = &self.pushes[kind as usize];
        count.inc();
        total.inc_by(bytes as u64);
    }

    /// A registration was refused with `code`.
    pub fn registration_refused(&self, code: tonic::Code) {
        let label = match code {
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            tonic::Code::Unauthenticated => "unauthenticated",
            _ => "other",
        };
        self.registrations_refused.with_label_values(&[label]).inc();
    }

    /// The registry watch is `lag` behind etcd.
    pub fn watch_lag(&self, lag: std::time::Duration) {
        self.watch_lag.set(lag.as_secs_f64());
    }

    /// The registry snapshot was reloaded for `reason`.
    pub fn watch_resynced(&self, reason: &str) {
        self.watch_resyncs.with_label_values(&[reason]).inc();
    }

    /// One load report arrived.
    pub fn load_report(&self) {
        self.load_reports.inc();
    }

    /// The snapshot changed: its revision, and each pool with its serving replicas.
    pub fn snapshot<'a>(&self, revision: i64, pools: impl IntoIterator<Item = (&'a Pool, usize)>) {
        self.table_version.set(revision);
        self.pool_serving.reset();
        for (pool, serving) in pools {
            self.pool_serving
                .with_label_values(&[&pool.region, &pool.name, &pool.model])
                .set(i64::try_from(serving).unwrap_or(i64::MAX));
        }
    }
}

/// Decrements the subscriber gauge when dropped.
#[derive(Debug)]
pub struct SubscriberGuard(IntGauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_observes_the_newest_write_it_covers_and_only_once() {
        let registry = Registry::new();
        let metrics = ControlPlaneMetrics::register(&registry).unwrap();
        metrics.write_committed(10);
        metrics.write_committed(12);
        metrics.acked(SubscriberRole::Edge, 9, 12);
        metrics.acked(SubscriberRole::Edge, 12, 12);
        metrics.acked(SubscriberRole::Sidecar, 12, 20);
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(
            text.contains(r#"infermesh_control_plane_push_latency_seconds_count{role="edge"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"push_latency_seconds_count{role="sidecar"}"#),
            "{text}"
        );
    }

    #[test]
    fn the_lag_gauge_holds_the_largest_lag_per_role_and_region_and_forgets_empty_ones() {
        let registry = Registry::new();
        let metrics = ControlPlaneMetrics::register(&registry).unwrap();
        metrics.subscriber_lags([
            (SubscriberRole::Edge, "eu", 0),
            (SubscriberRole::Edge, "eu", 5),
            (SubscriberRole::Sidecar, "us", 2),
        ]);
        metrics.nacked(SubscriberRole::Sidecar, "us");
        let text = infermesh_runtime::metrics::render(&registry);
        for line in [
            r#"infermesh_control_plane_subscriber_lag_versions{region="eu",role="edge"} 5"#,
            r#"infermesh_control_plane_subscriber_lag_versions{region="us",role="sidecar"} 2"#,
            r#"infermesh_control_plane_subscriber_nacks_total{region="us",role="sidecar"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        metrics.subscriber_lags([(SubscriberRole::Edge, "eu", 0)]);
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(
            text.contains(r#"subscriber_lag_versions{region="eu",role="edge"} 0"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"subscriber_lag_versions{region="us""#),
            "{text}"
        );
    }

    #[test]
    fn subscribers_count_while_their_guard_lives() {
        let registry = Registry::new();
        let metrics = ControlPlaneMetrics::register(&registry).unwrap();
        let first = metrics.subscriber(SubscriberRole::Edge, "eu");
        let _second = metrics.subscriber(SubscriberRole::Edge, "eu");
        drop(first);
        let text = infermesh_runtime::metrics::render(&registry);
        assert!(
            text.contains(r#"infermesh_control_plane_subscribers{region="eu",role="edge"} 1"#),
            "{text}"
        );
    }
}
