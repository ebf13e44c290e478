//! Global rate limits without a round trip per request. Edges report what
//! they consumed of each quota over their discovery stream; every tick the
//! control plane shares out what is left of each quota to the connected
//! edges by their demand and pushes the grants back on the same streams.
//! The bookkeeping is in `ledger`; this module owns the sessions, the
//! tick, and recording when keys were last used.
//!
//! With several control-plane replicas, each shares out only its part of a
//! limit: replicas publish their edges' demand per quota to etcd every
//! second (`exchange`) and take parts in proportion to demand (by edge
//! count while nobody asks), so the limit holds across replicas too.

mod ledger;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

use infermesh_proto::v1::{QuotaDigest, QuotaGrants, UsageReport};
use infermesh_runtime::quota::{QuotaId, Scope};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use ledger::SessionId;
use ledger::{Ledger, Limit};

use crate::loads::Peers;
use crate::registry::Registry;
use crate::snapshot::Snapshot;
use crate::store::{ObjectKind, Store, decode};

/// How often the control plane shares quotas out.
pub const SHARE_OUT_INTERVAL: Duration = Duration::from_millis(250);
/// How long a full, unused quota is tracked before edges fall back to cold-start shares.
const IDLE_AFTER: Duration = Duration::from_secs(30);
/// How often last-use times are written to etcd.
const KEY_USE_FLUSH: Duration = Duration::from_secs(30);

struct Session {
    grants: mpsc::Sender<QuotaGrants>,
    sequence: u64,
}

/// The quota service shared by every edge stream.
pub struct QuotaBook {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    ledger: Mutex<Ledger>,
    sessions: Mutex<HashMap<SessionId, Session>>,
    used_keys: Mutex<HashSet<String>>,
    next_session: AtomicU64,
    parts: Mutex<Parts>,
}

/// This replica's part of every limit, from the last exchange.
#[derive(Debug, Clone)]
struct Parts {
    /// By quota id, for quotas someone asked for.
    by_quota: HashMap<String, f64>,
    /// For any other quota: this replica's share of all edges.
    default: f64,
    /// Edges connected to every replica.
    edges: u32,
}

impl Default for Parts {
    fn default() -> Self {
        Self {
            by_quota: HashMap::new(),
            default: 1.0,
            edges: 0,
        }
    }
}

/// How often replicas exchange quota demand.
pub const EXCHANGE_INTERVAL: Duration = Duration::from_secs(1);
/// Fraction of the mean replica demand every replica with edges gets on top of its own.
const REPLICA_FLOOR: f64 = 0.05;

/// This replica's parts from its digest and the other replicas'.
fn parts(mine: &QuotaDigest, others: &[QuotaDigest]) -> Parts {
    let replicas: Vec<&QuotaDigest> = std::iter::once(mine)
        .chain(others.iter())
        .filter(|d| d.edges > 0)
        .collect();
    let edges: u32 = replicas.iter().map(|d| d.edges).sum();
    if mine.edges == 0 {
        return Parts {
            edges,
            ..Parts::default()
        };
    }
    let default = f64::from(mine.edges) / f64::from(edges.max(1));
    let quotas: HashSet<&String> = replicas.iter().flat_map(|d| d.demand.keys()).collect();
    let by_quota = quotas
        .into_iter()
        .map(|quota| {
            let rate = |d: &QuotaDigest| d.demand.get(quota).copied().unwrap_or(0.0).max(0.0);
            let total: f64 = replicas.iter().map(|d| rate(d)).sum();
            let part = if total <= 0.0 {
                default
            } else {
                let floor = REPLICA_FLOOR * total / replicas.len() as f64;
                (rate(mine) + floor) / (total + floor * replicas.len() as f64)
            };
            (quota.clone(), part)
        })
        .collect();
    Parts {
        by_quota,
        default,
        edges,
    }
}

/// The limit of `quota` per its window, if one is set now.
fn limit_of(snapshot: &Snapshot, quota: &QuotaId) -> Option<u64> {
    let limits = match quota.scope {
        Scope::Key => snapshot
            .api_keys
            .get(&quota.name)
            .filter(|k| !k.revoked)?
            .limits
            .as_ref()?,
        Scope::Tenant => snapshot.tenants.get(&quota.name)?.limits.as_ref()?,
    };
    Some(quota.dimension.limit_in(limits)).filter(|l| *l > 0)
}

impl QuotaBook {
    /// A book reading limits from `snapshots`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self {
            snapshots,
            ledger: Mutex::default(),
            sessions: Mutex::default(),
            used_keys: Mutex::default(),
            next_session: AtomicU64::new(1),
            parts: Mutex::default(),
        }
    }

    /// Opens an edge session; its grants arrive on the receiver.
    pub fn open(&self) -> (SessionId, mpsc::Receiver<QuotaGrants>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(2);
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Session {
                    grants: tx,
                    sequence: 0,
                },
            );
        (id, rx)
    }

    /// Closes an edge session.
    pub fn close(&self, session: SessionId) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session);
        self.ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .end_session(session);
    }

    /// Takes an edge's usage report. Unknown or malformed quota ids are skipped.
    pub fn report(&self, session: SessionId, report: UsageReport) {
        let snapshot = self.snapshots.borrow().clone();
        let now = Instant::now();
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let mut used = Vec::new();
        for usage in report.quotas {
            if let Err(why) = plausible(&usage) {
                tracing::warn!(quota = %usage.quota, consumed = usage.consumed, demand = usage.demand, why, "ignoring implausible usage from an edge");
                continue;
            }
            let Ok(quota) = usage.quota.parse::<QuotaId>() else {
                tracing::debug!(quota = %usage.quota, "ignoring usage for a malformed quota id");
                continue;
            };
            if quota.scope == Scope::Key && usage.consumed > 0 {
                used.push(quota.name.clone());
            }
            if let Some(limit) = limit_of(&snapshot, &quota) {
                ledger.report(
                    session,
                    &usage.quota,
                    Limit {
                        units: limit,
                        window: quota.dimension.window(),
                    },
                    usage.consumed,
                    usage.demand,
                    now,
                );
            }
        }
        drop(ledger);
        if !used.is_empty() {
            self.used_keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(used);
        }
    }

    /// Lends an edge that ran dry what it asks of a quota's reserve, as far
    /// as the reserve goes.
    pub fn lend(&self, borrow: &infermesh_proto::v1::Borrow) -> infermesh_proto::v1::Loan {
        let (amount, global_remaining, reset_ms) = self
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lend(&borrow.quota, borrow.amount, Instant::now());
        infermesh_proto::v1::Loan {
            id: borrow.id,
            quota: borrow.quota.clone(),
            amount,
            global_remaining,
            reset_ms,
        }
    }

    fn share_out(&self, elapsed: Duration) {
        let snapshot = self.snapshots.borrow().clone();
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<SessionId> = sessions.keys().copied().collect();
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut grants = {
            let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
            ledger.retain(|q| q.parse().ok().and_then(|q| limit_of(&snapshot, &q)));
            ledger.set_parts(|q| parts.by_quota.get(q).copied().unwrap_or(parts.default));
            ledger.share_out(&ids, elapsed, IDLE_AFTER, Instant::now())
        };
        // Edges size their cold-start share by every replica's edges.
        let edges = (ids.len() as u32).max(parts.edges);
        for (id, session) in sessions.iter_mut() {
            session.sequence += 1;
            let message = QuotaGrants {
                sequence: session.sequence,
                edges,
                grants: grants.remove(id).unwrap_or_default(),
            };
            // A full channel means the edge has not taken the last share-out
            // yet; the next one replaces this one anyway.
            let _ = session.grants.try_send(message);
        }
    }

    async fn flush_key_use(&self, registry: &Registry) {
        let used: Vec<String> = self
            .used_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        if used.is_empty() {
            return;
        }
        if let Err(error) = registry
            .record_key_use(&used, crate::api::now_unix_ms())
            .await
        {
            tracing::warn!(%error, keys = used.len(), "could not record key use");
        }
    }

    /// Publishes this replica's quota demand and takes its part of every
    /// limit from all replicas' demand, every `EXCHANGE_INTERVAL` until
    /// cancelled. While etcd cannot be reached the last parts stay.
    pub async fn exchange(self: Arc<Self>, store: Store, node: String, cancel: CancellationToken) {
        let mut peers = Peers::new(store, ObjectKind::QuotaDigest, &node, EXCHANGE_INTERVAL);
        let mut tick = tokio::time::interval(EXCHANGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mine = QuotaDigest {
                node: node.clone(),
                edges: self
                    .sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len() as u32,
                demand: self
                    .ledger
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .demand_rates(),
            };
            match peers.exchange(mine.encode_to_vec()).await {
                Ok(kvs) => {
                    let others: Vec<QuotaDigest> =
                        kvs.iter().filter_map(|kv| decode(kv).ok()).collect();
                    *self.parts.lock().unwrap_or_else(PoisonError::into_inner) =
                        parts(&mine, &others);
                }
                Err(error) => {
                    tracing::warn!(%error, "quota exchange round failed; keeping the last parts")
                }
            }
        }
        peers.leave().await;
    }

    /// Shares out quotas every tick and records key use until cancelled.
    pub async fn run(self: Arc<Self>, registry: Registry, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SHARE_OUT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(KEY_USE_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.share_out(now - last);
                    last = now;
                }
                _ = flush.tick() => self.flush_key_use(&registry).await,
            }
        }
        self.flush_key_use(&registry).await;
    }
}

/// Most units one edge can have used of one quota since its stream
/// opened: far beyond any real traffic, low enough that one edge's report
/// cannot swamp every other edge's share in the sums.
const MOST_UNITS: u64 = 1 << 40;

/// Whether an edge's counters can be real: cumulative counts are never
/// negative and never astronomically large. An edge reporting otherwise is
/// broken or hostile, and its report must not move every edge's grants.
fn plausible(usage: &infermesh_proto::v1::QuotaUsage) -> Result<(), &'static str> {
    if usage.consumed < 0 {
        return Err("negative consumption");
    }
    if usage.consumed.unsigned_abs() > MOST_UNITS || usage.demand > MOST_UNITS {
        return Err("more units than any edge can use");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_usage_is_refused_and_real_usage_kept() {
        let usage = |consumed: i64, demand: u64| infermesh_proto::v1::QuotaUsage {
            quota: "key/k/rpm".into(),
            consumed,
            demand,
        };
        assert!(plausible(&usage(0, 0)).is_ok());
        assert!(plausible(&usage(60, 80)).is_ok());
        assert!(
            plausible(&usage(900, 600)).is_ok(),
            "token corrections may exceed demand a little"
        );
        assert!(plausible(&usage(-1, 10)).is_err());
        assert!(plausible(&usage(i64::MAX, u64::MAX)).is_err());
        assert!(plausible(&usage(10, 1 << 41)).is_err());
        assert!(
            plausible(&usage(5_000, 256)).is_ok(),
            "settled tokens may exceed the reservation asked for"
        );
    }

    fn digest(node: &str, edges: u32, demand: &[(&str, f64)]) -> QuotaDigest {
        QuotaDigest {
            node: node.into(),
            edges,
            demand: demand.iter().map(|(q, r)| (q.to_string(), *r)).collect(),
        }
    }

    #[test]
    fn parts_follow_demand_and_sum_to_one() {
        let a = digest("a", 1, &[("key/k/rpm", 7.0)]);
        let b = digest("b", 2, &[("key/k/rpm", 3.0), ("tenant/t/tpm", 0.0)]);
        let pa = parts(&a, std::slice::from_ref(&b));
        let pb = parts(&b, std::slice::from_ref(&a));
        let q = "key/k/rpm";
        assert!((pa.by_quota[q] + pb.by_quota[q] - 1.0).abs() < 1e-9);
        assert!(
            pa.by_quota[q] > 0.65 && pa.by_quota[q] < 0.7,
            "{:?}",
            pa.by_quota
        );
        // Nobody asks for the tenant quota: parts by edge count.
        assert!((pa.by_quota["tenant/t/tpm"] - 1.0 / 3.0).abs() < 1e-9);
        assert!((pb.default - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!((pa.edges, pb.edges), (3, 3));
    }

    #[test]
    fn replicas_without_edges_take_no_part() {
        let a = digest("a", 2, &[("key/k/rpm", 1.0)]);
        let idle = digest("idle", 0, &[]);
        let pa = parts(&a, std::slice::from_ref(&idle));
        assert_eq!(pa.by_quota["key/k/rpm"], 1.0);
        assert_eq!(pa.default, 1.0);
        let pi = parts(&idle, &[a]);
        assert_eq!(pi.edges, 2);
    }
}
