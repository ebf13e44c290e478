//! Global rate limits without a round trip per request. Edges report what
//! they consumed of each quota over their discovery stream; every tick the
//! control plane shares out what is left of each quota to the connected
//! edges by their demand and pushes the grants back on the same streams.
//! The bookkeeping is in `ledger`; this module owns the sessions, the
//! tick, and recording when keys were last used.

mod ledger;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use infermesh_proto::v1::{QuotaGrants, UsageReport};
use infermesh_runtime::quota::{QuotaId, Scope};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use ledger::SessionId;
use ledger::{Ledger, Limit};

use crate::registry::Registry;
use crate::snapshot::Snapshot;

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

    fn share_out(&self, elapsed: Duration) {
        let snapshot = self.snapshots.borrow().clone();
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<SessionId> = sessions.keys().copied().collect();
        let mut grants = {
            let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
            ledger.retain(|q| q.parse().ok().and_then(|q| limit_of(&snapshot, &q)));
            ledger.share_out(&ids, elapsed, IDLE_AFTER, Instant::now())
        };
        let edges = ids.len() as u32;
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
