//! Autoscaling: the leading replica decides, every interval, how many
//! replicas each pool should have (see `policy`), stores each decision at
//! `scaling/<pool>` so that every replica's admin API can tell it, exports
//! it as `infermesh_pool_desired_replicas` for HPA or KEDA, and, with an
//! actuator, sets the pool's Kubernetes workload to it. Edges that hold
//! requests for a pool with no replica leave a `demand/<pool>` record
//! under a short lease; that brings a pool back from zero.

pub mod floors;
pub mod kube;
pub mod policy;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::{EndpointState, Load, PoolScaling};
use prost::Message;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::loads::LoadView;
use crate::metrics::ControlPlaneMetrics;
use crate::snapshot::Snapshot;
use crate::store::{ObjectKind, Store, StoreError, decode};
use kube::KubeClient;
use policy::{Observation, PoolState};

/// Seconds a demand record outlives the last request held for its pool.
pub const DEMAND_TTL_SECONDS: i64 = 10;

/// What the autoscaler works with.
pub struct Autoscaler {
    /// etcd.
    pub store: Store,
    /// The registry.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Every replica's loads.
    pub loads: Arc<LoadView>,
    /// Where decisions are exported.
    pub metrics: Arc<ControlPlaneMetrics>,
    /// This replica's node id, recorded with each decision.
    pub node: String,
    /// Time between decisions.
    pub interval: Duration,
    /// Sets workloads' replicas, when configured.
    pub actuator: Option<Arc<KubeClient>>,
}

/// What the leader keeps between ticks.
#[derive(Default)]
struct Term {
    states: HashMap<String, PoolState>,
    written: HashMap<String, PoolScaling>,
    applied: HashMap<String, u32>,
}

/// A decision's content without its time, to tell real changes.
fn same(a: &PoolScaling, b: &PoolScaling) -> bool {
    PoolScaling {
        decided_at_unix_ms: 0,
        ..a.clone()
    } == PoolScaling {
        decided_at_unix_ms: 0,
        ..b.clone()
    }
}

impl Autoscaler {
    /// Decides while this replica leads, until cancelled.
    pub async fn run(self, mut leading: watch::Receiver<bool>, cancel: CancellationToken) {
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                led = leading.wait_for(|l| *l) => if led.is_err() { return },
            }
            tracing::info!(
                interval_ms = self.interval.as_millis() as u64,
                "autoscaler running on this replica"
            );
            let mut term = self.seed(started).await;
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = leading.changed() => {
                        if changed.is_err() || !*leading.borrow() {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        if let Err(error) = self.round(&mut term, started).await {
                            tracing::warn!(%error, "autoscaling round failed; trying again next round");
                        }
                    }
                }
            }
            // Only the leader exports decisions.
            self.metrics.pool_desired.reset();
            self.metrics.pool_floor.reset();
            tracing::info!("autoscaler stopped: no longer leading");
        }
    }

    /// Continues from the stored decisions, so that a new leader neither
    /// forgets a scale-up nor scales down before a full window.
    async fn seed(&self, started: Instant) -> Term {
        let mut term = Term::default();
        let now_ms = started.elapsed().as_millis() as u64;
        match self
            .store
            .get_prefix(&self.store.keys().dir(ObjectKind::Scaling))
            .await
        {
            Ok((kvs, _)) => {
                for kv in &kvs {
                    if let Ok(record) = decode::<PoolScaling>(kv) {
                        term.states.insert(
                            record.pool.clone(),
                            PoolState::seeded(record.desired_replicas, now_ms),
                        );
                        term.written.insert(record.pool.clone(), record);
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "stored decisions unreadable; starting afresh"),
        }
        term
    }

    async fn round(&self, term: &mut Term, started: Instant) -> Result<(), StoreError> {
        let snapshot = self.snapshots.borrow().clone();
        if !snapshot.is_synced() {
            return Ok(());
        }
        let keys = self.store.keys();
        let (kvs, _) = self.store.get_prefix(&keys.dir(ObjectKind::Demand)).await?;
        let demand: HashSet<String> = kvs
            .iter()
            .filter_map(|kv| kv.key_str().ok().and_then(|k| keys.parse(k)))
            .map(|(_, pool)| pool.to_string())
            .collect();
        let gone: Vec<String> = term
            .written
            .keys()
            .filter(|name| !snapshot.pools.contains_key(*name))
            .cloned()
            .collect();
        if !gone.is_empty() {
            // Drops the deleted pools' series; the others are set again below.
            self.metrics.pool_desired.reset();
            self.metrics.pool_floor.reset();
        }
        for name in gone {
            self.store
                .delete_aux(&keys.object(ObjectKind::Scaling, &name))
                .await?;
            if let Some(record) = term.written.remove(&name) {
                tracing::info!(pool = %record.pool, "pool deleted; its scaling decision removed");
            }
            term.states.remove(&name);
            term.applied.remove(&name);
        }
        let now_ms = started.elapsed().as_millis() as u64;
        let wall = jiff::Timestamp::now();
        for pool in snapshot.pools.values() {
            let members: Vec<(&str, Option<Load>)> = snapshot
                .endpoints
                .values()
                .filter(|e| e.pool == pool.name && e.state != EndpointState::Draining as i32)
                .map(|e| (e.id.as_str(), self.loads.get(&e.id)))
                .collect();
            let observation = Observation {
                pool,
                replicas: members.iter().map(|(id, l)| (*id, l.as_ref())).collect(),
                demand: demand.contains(&pool.name),
                now_ms,
                wall,
            };
            let decision = term
                .states
                .entry(pool.name.clone())
                .or_default()
                .decide(&observation);
            let labels = [
                pool.region.as_str(),
                pool.name.as_str(),
                pool.model.as_str(),
            ];
            self.metrics
                .pool_desired
                .with_label_values(&labels)
                .set(i64::from(decision.desired));
            self.metrics
                .pool_floor
                .with_label_values(&labels)
                .set(i64::from(decision.floor));
            let previous = term.written.get(&pool.name);
            let mut actuation = previous.map(|p| p.actuation.clone()).unwrap_or_default();
            if let (Some(actuator), Some(target)) = (&self.actuator, &pool.scale_target)
                && term.applied.get(&pool.name) != Some(&decision.desired)
            {
                {
                    actuation = match actuator.set(target, decision.desired).await {
                        Ok(scale) => {
                            term.applied.insert(pool.name.clone(), decision.desired);
                            tracing::info!(pool = %pool.name, target = %kube::describe(target), replicas = decision.desired, "workload scaled");
                            format!(
                                "{} set to {} replicas ({} running)",
                                kube::describe(target),
                                scale.spec,
                                scale.status
                            )
                        }
                        Err(error) => {
                            tracing::warn!(pool = %pool.name, target = %kube::describe(target), %error, "scaling the workload failed");
                            format!("{}: {error}", kube::describe(target))
                        }
                    };
                }
            }
            let record = PoolScaling {
                pool: pool.name.clone(),
                current_replicas: decision.current,
                desired_replicas: decision.desired,
                floor_replicas: decision.floor,
                max_replicas: pool.max_replicas,
                reason: decision.reason,
                waiting_per_replica: decision.waiting,
                kv_cache_usage: decision.kv_cache,
                gpu_utilization: decision.gpu,
                idle_seconds: decision.idle_seconds,
                demand: observation.demand,
                decided_at_unix_ms: wall.as_millisecond(),
                decided_by: self.node.clone(),
                actuation,
            };
            if previous.is_none_or(|p| !same(p, &record)) {
                if previous.is_none_or(|p| p.desired_replicas != record.desired_replicas) {
                    tracing::info!(pool = %pool.name, current = record.current_replicas, desired = record.desired_replicas, reason = %record.reason, "autoscaling decision");
                }
                self.store
                    .put_aux(
                        &keys.object(ObjectKind::Scaling, &pool.name),
                        record.encode_to_vec(),
                        None,
                    )
                    .await?;
                term.written.insert(pool.name.clone(), record);
            }
        }
        Ok(())
    }
}

/// Turns edges' demand messages into `demand/<pool>` records, each
/// written at most once per third of its lease by this replica.
pub struct DemandBook {
    store: Store,
    written: dashmap::DashMap<String, Instant>,
}

impl DemandBook {
    /// Records into `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            written: dashmap::DashMap::new(),
        }
    }

    /// An edge of `region` holds requests for `pools`: records those that
    /// are pools of that region and were not recorded lately.
    pub fn note(&self, snapshot: &Snapshot, region: &str, pools: Vec<String>) {
        let renew = Duration::from_secs(DEMAND_TTL_SECONDS as u64 / 3);
        let now = Instant::now();
        let due: Vec<String> = pools
            .into_iter()
            .filter(|name| snapshot.pools.get(name).is_some_and(|p| p.region == region))
            .filter(|name| {
                let mut fresh = false;
                self.written
                    .entry(name.clone())
                    .and_modify(|at| {
                        if now.duration_since(*at) >= renew {
                            *at = now;
                            fresh = true;
                        }
                    })
                    .or_insert_with(|| {
                        fresh = true;
                        now
                    });
                fresh
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            let write = async {
                let lease = store.grant_lease(DEMAND_TTL_SECONDS).await?;
                for pool in &due {
                    let key = store.keys().object(ObjectKind::Demand, pool);
                    store.put_aux(&key, Vec::new(), Some(lease)).await?;
                }
                Ok::<_, StoreError>(())
            };
            match write.await {
                Ok(()) => {
                    tracing::info!(pools = ?due, "edge holds requests for pools without replicas")
                }
                Err(error) => tracing::warn!(%error, pools = ?due, "demand not recorded"),
            }
        });
    }
}
