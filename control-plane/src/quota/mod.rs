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

mod budget;
mod ledger;
mod parts;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

use infermesh_proto::v1::BudgetStatus;
use infermesh_proto::v1::{QuotaDigest, QuotaGrants, UsageReport};
use infermesh_runtime::money::{Period, format_micros};
use infermesh_runtime::quota::{Dimension, QuotaId, Scope};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use budget::Budget;
pub use ledger::SessionId;
use ledger::{Ledger, Limit};
use parts::Parts;

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
    /// What etcd last said was spent of every budget, by (period label, quota).
    spent: Mutex<HashMap<(String, String), i64>>,
}

/// How often replicas exchange quota demand.
pub const EXCHANGE_INTERVAL: Duration = Duration::from_secs(1);
/// Rounds of failed exchanges a replica keeps its parts through; shorter
/// than the life of its digest in etcd (three rounds, at least 5 s).
const PARTS_KEPT_ROUNDS: u32 = 3;
/// How often spend totals of past periods are looked for and removed.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

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
            spent: Mutex::default(),
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
                if let Some(period) = quota.dimension.period() {
                    let limit = Limit {
                        units: limit,
                        window: quota.dimension.window(),
                    };
                    let budget = Budget::new(period, infermesh_runtime::time::now_unix_ms());
                    ledger.budget(&usage.quota, limit, budget, now);
                }
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
            ledger.roll_periods(infermesh_runtime::time::now_unix_ms());
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
    /// limit (see `parts`), every `EXCHANGE_INTERVAL` until cancelled;
    /// while `leading`, writes every replica's parts every other round.
    /// While etcd cannot be reached the last parts stay.
    pub async fn exchange(
        self: Arc<Self>,
        store: Store,
        node: String,
        leading: watch::Receiver<bool>,
        metrics: Arc<crate::metrics::ControlPlaneMetrics>,
        cancel: CancellationToken,
    ) {
        let mut peers = Peers::new(
            store.clone(),
            ObjectKind::QuotaDigest,
            &node,
            EXCHANGE_INTERVAL,
        );
        let parts_key = store.keys().object(ObjectKind::QuotaParts, "current");
        let mut records = parts::Records::default();
        let mut failed_rounds = 0u32;
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(EXCHANGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                _ = prune.tick() => {
                    let now = infermesh_runtime::time::now_unix_ms();
                    match budget::prune_spend(&store, now).await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::info!(pruned, "removed spend totals of past periods"),
                        Err(error) => tracing::warn!(%error, "could not remove old spend totals"),
                    }
                    continue;
                }
            }
            let mine = self.digest(&node, records.newest());
            match peers.exchange(mine.encode_to_vec()).await {
                Ok(kvs) => {
                    let others: Vec<QuotaDigest> =
                        kvs.iter().filter_map(|kv| decode(kv).ok()).collect();
                    if *leading.borrow() {
                        let all: Vec<QuotaDigest> = std::iter::once(mine.clone())
                            .chain(others.iter().cloned())
                            .collect();
                        let record = parts::record(&all).encode_to_vec();
                        if let Err(error) = store.put_aux(&parts_key, record, None).await {
                            tracing::warn!(%error, "could not write the replicas' quota parts");
                        }
                    }
                    failed_rounds = 0;
                    let mine_alone = parts::parts(&mine, &others);
                    if let Ok(Some(kv)) = store.get(&parts_key).await
                        && kv.mod_revision() > records.newest()
                        && let Ok(record) = decode::<infermesh_proto::v1::QuotaParts>(&kv)
                    {
                        records.read(kv.mod_revision(), record);
                        metrics.quota_parts_records.inc();
                    }
                    // A replica alone takes every limit whole; with others,
                    // none without a record.
                    let oldest_read = others
                        .iter()
                        .map(|d| d.parts_revision)
                        .chain([records.newest()])
                        .filter(|r| *r > 0)
                        .min()
                        .unwrap_or(0);
                    let chosen = if others.is_empty() {
                        mine_alone
                    } else {
                        records
                            .parts_of(&node, mine_alone.edges, oldest_read)
                            .unwrap_or(Parts {
                                by_quota: HashMap::new(),
                                default: 0.0,
                                edges: mine_alone.edges,
                            })
                    };
                    metrics.quota_default_part.set(chosen.default);

                    *self.parts.lock().unwrap_or_else(PoisonError::into_inner) = chosen;
                    // Spend of replicas that publish no digest any more is
                    // theirs no longer: every replica holds its part of it.
                    let live: HashSet<String> = others
                        .iter()
                        .map(|d| d.node.clone())
                        .chain([node.clone()])
                        .collect();
                    self.write_spend(&store, &node, &live).await;
                }
                Err(error) => {
                    failed_rounds += 1;
                    // Cut off from etcd, this replica cannot know the parts
                    // the others take: past a few rounds (and before its
                    // digest expires, so the others take over its part) it
                    // takes none.
                    if failed_rounds >= PARTS_KEPT_ROUNDS {
                        tracing::warn!(%error, "quota exchange failing; sharing out no shared limits until etcd answers");
                        *self.parts.lock().unwrap_or_else(PoisonError::into_inner) = Parts {
                            by_quota: HashMap::new(),
                            default: 0.0,
                            edges: 0,
                        };
                        metrics.quota_default_part.set(0.0);
                    } else {
                        tracing::warn!(%error, "quota exchange round failed; keeping the last parts")
                    }
                }
            }
        }
        peers.leave().await;
    }

    /// What this replica's edges ask of each quota now.
    fn digest(&self, node: &str, parts_revision: i64) -> QuotaDigest {
        let (demand, used) = {
            let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
            (ledger.demand_rates(), ledger.used_fractions())
        };
        QuotaDigest {
            node: node.to_string(),
            parts_revision,
            edges: self
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u32,
            demand,
            used,
        }
    }

    /// Adds what this replica's edges spent of every budget to the totals
    /// in etcd and takes the totals back; on failure the spend is written
    /// with the next round.
    async fn write_spend(&self, store: &Store, node: &str, live: &HashSet<String>) {
        let deltas = self
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_spend();
        let now = infermesh_runtime::time::now_unix_ms();
        let labels: Vec<String> = [Period::Day, Period::Month]
            .iter()
            .map(|p| p.span_at(now).label)
            .collect();
        let written = budget::write_spend(store, node, live, &labels, &deltas).await;
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.spend_written(&deltas, written.is_ok());
        match written {
            Ok(totals) => {
                ledger.set_spent(&totals);
                drop(ledger);
                *self.spent.lock().unwrap_or_else(PoisonError::into_inner) =
                    totals.into_iter().map(|(k, t)| (k, t.all)).collect();
            }
            Err(error) => {
                tracing::warn!(%error, "could not write spend to etcd; trying again next round")
            }
        }
    }

    /// Every spend budget of `snapshot`'s keys and tenants with what etcd
    /// last said was spent of it in its period holding `now_unix_ms`.
    pub fn budgets(&self, snapshot: &Snapshot, now_unix_ms: i64) -> Vec<BudgetStatus> {
        let spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        let keys = snapshot
            .api_keys
            .values()
            .filter(|k| !k.revoked)
            .map(|k| (Scope::Key, k.id.as_str(), k.limits.as_ref()));
        let tenants = snapshot
            .tenants
            .values()
            .map(|t| (Scope::Tenant, t.name.as_str(), t.limits.as_ref()));
        let mut budgets = Vec::new();
        for (scope, name, limits) in tenants.chain(keys) {
            let Some(limits) = limits else { continue };
            for dimension in [Dimension::DailySpend, Dimension::MonthlySpend] {
                let (limit, Some(period)) = (dimension.limit_in(limits), dimension.period()) else {
                    continue;
                };
                if limit == 0 {
                    continue;
                }
                let quota = QuotaId::new(scope, name, dimension).to_string();
                let span = period.span_at(now_unix_ms);
                let used = spent
                    .get(&(span.label.clone(), quota.clone()))
                    .copied()
                    .unwrap_or(0)
                    .max(0) as u64;
                let (tenant, key_id) = match scope {
                    Scope::Tenant => (name.to_string(), String::new()),
                    Scope::Key => (String::new(), name.to_string()),
                };
                budgets.push(BudgetStatus {
                    quota,
                    tenant,
                    key_id,
                    period: period.to_string(),
                    period_label: span.label,
                    limit: format_micros(limit),
                    spent: format_micros(used),
                    remaining: format_micros(limit.saturating_sub(used)),
                    resets_at_unix_ms: span.end_unix_ms,
                });
            }
        }
        budgets.sort_by(|a, b| a.quota.cmp(&b.quota));
        budgets
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
}
