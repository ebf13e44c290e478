//! The global side of rate limiting, as pure bookkeeping over an explicit
//! clock: one token bucket per quota holding what is left across every
//! edge, the edges' cumulative counters, and the share-out that gives what
//! is left to the edges in proportion to their recent demand.
//!
//! Why this holds a global limit without a round trip per request: each
//! edge may admit `allowance` units beyond the consumption the grant saw;
//! the allowances of one share-out sum to what the bucket held, so all
//! edges together never admit more than the bucket plus its refill. Units
//! an edge was granted but did not use flow back at the next share-out,
//! because the next one is computed from what was consumed, not granted.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

use infermesh_proto::v1::QuotaGrant;

use super::budget::{Budget, SpendDelta, Totals};

/// Weight of the newest demand sample in the moving average.
const DEMAND_SMOOTHING: f64 = 0.5;
/// Fraction of the mean demand every edge gets on top of its own, so that
/// an edge that was idle can admit its first requests before the next share-out.
const FLOOR_SHARE: f64 = 0.05;
/// Fraction of what is left that a share-out keeps back as the reserve:
/// edges that run dry before the next share-out borrow from it instead of
/// refusing while the limit is far away.
pub const RESERVE_FRACTION: f64 = 0.5;

/// A quota's limit: units per window.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Units per window.
    pub units: u64,
    /// The window.
    pub window: Duration,
}

/// Identifies one edge stream (a reconnecting edge is a new session).
pub type SessionId = u64;

/// One edge's counters for one quota.
#[derive(Debug, Default, Clone)]
struct EdgeCounters {
    consumed: i64,
    demand: u64,
    demand_at_last_shareout: u64,
    demand_rate: f64,
}

/// One quota's global bucket and its edges. With several control-plane
/// replicas the bucket holds this replica's part of the limit (`scale`).
#[derive(Debug)]
struct QuotaState {
    /// The limit per window, all replicas together.
    global: f64,
    /// This replica's part of it, in (0, 1].
    scale: f64,
    /// Capacity of this replica's bucket: global x scale.
    limit: f64,
    refill_per_sec: f64,
    level: f64,
    updated: Instant,
    last_demand: Instant,
    window: Duration,
    edges: HashMap<SessionId, EdgeCounters>,
    /// Units the last share-out kept back, less what was lent since. Zero
    /// until a first share-out: before it, edges admit from their local
    /// cold-start buckets, which the ledger does not see.
    reserve: f64,
    /// For a spend budget: its period and what etcd holds of it. Its level
    /// does not refill with time but follows what every replica spent.
    budget: Option<Budget>,
}

impl QuotaState {
    fn new(limit: u64, window: Duration, now: Instant) -> Self {
        let limit = limit as f64;
        Self {
            global: limit,
            scale: 1.0,
            limit,
            refill_per_sec: limit / window.as_secs_f64(),
            level: limit,
            updated: now,
            last_demand: now,
            window,
            edges: HashMap::new(),
            reserve: 0.0,
            budget: None,
        }
    }

    /// Moves the ceiling to `global x scale`, keeping what was used.
    fn resize(&mut self, global: f64, scale: f64, window: Duration) {
        let used = self.limit - self.level;
        self.global = global;
        self.scale = scale;
        self.limit = global * scale;
        self.refill_per_sec = self.limit / window.as_secs_f64();
        self.level = (self.limit - used).min(self.limit);
    }

    fn refill(&mut self, now: Instant) {
        if let Some(budget) = &self.budget {
            self.level = budget.level(self.global, self.scale);
            self.updated = now;
            return;
        }
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + dt * self.refill_per_sec).min(self.limit);
        self.updated = now;
    }

    fn reset_ms(&self) -> u64 {
        if let Some(budget) = &self.budget {
            return budget.reset_ms();
        }
        let missing = (self.limit - self.level).max(0.0);
        if self.refill_per_sec <= 0.0 {
            // No part of the limit here: it refills elsewhere.
            return self.window.as_millis() as u64;
        }
        ((missing / self.refill_per_sec) * 1000.0).ceil() as u64
    }
}

/// Every quota in use.
#[derive(Debug, Default)]
pub struct Ledger {
    quotas: HashMap<String, QuotaState>,
}

impl Ledger {
    /// Records an edge's cumulative counters for a quota whose limit is
    /// `limit` per `window`; the bucket is made on first use.
    pub fn report(
        &mut self,
        session: SessionId,
        quota: &str,
        limit: Limit,
        consumed: i64,
        demand: u64,
        now: Instant,
    ) {
        let state = self
            .quotas
            .entry(quota.to_string())
            .or_insert_with(|| QuotaState::new(limit.units, limit.window, now));
        let Limit {
            units: limit,
            window,
        } = limit;
        state.window = window;
        if (state.global - limit as f64).abs() > f64::EPSILON {
            // The operator changed the limit: keep what was used, move the ceiling.
            state.resize(limit as f64, state.scale, window);
        }
        state.refill(now);
        let edge = state.edges.entry(session).or_default();
        let delta = consumed - edge.consumed;
        edge.consumed = consumed;
        if demand > edge.demand {
            state.last_demand = now;
        }
        edge.demand = edge.demand.max(demand);
        match &mut state.budget {
            Some(budget) => {
                budget.spent_here(delta);
                state.refill(now);
            }
            None => state.level -= delta as f64,
        }
    }

    /// Makes `quota` a spend budget over `period`, as of `unix_ms`, before
    /// its first report: its level follows what etcd holds.
    pub fn budget(&mut self, quota: &str, limit: Limit, budget: Budget, now: Instant) {
        self.quotas.entry(quota.to_string()).or_insert_with(|| {
            let mut state = QuotaState::new(limit.units, limit.window, now);
            state.budget = Some(budget);
            state
        });
    }

    /// Starts the next period of every budget whose period ended by `unix_ms`.
    pub fn roll_periods(&mut self, unix_ms: i64) {
        for state in self.quotas.values_mut() {
            if let Some(budget) = &mut state.budget {
                budget.roll(unix_ms);
            }
        }
    }

    /// What budgets were spent through this replica since the last write
    /// to etcd, now marked as being written.
    pub fn take_spend(&mut self) -> Vec<SpendDelta> {
        self.quotas
            .iter_mut()
            .filter_map(|(quota, state)| Some((quota, state.budget.as_mut()?)))
            .flat_map(|(quota, budget)| budget.take(quota))
            .collect()
    }

    /// The write of `deltas` to etcd ended: on success they are in the
    /// totals etcd holds, on failure they wait for the next write.
    pub fn spend_written(&mut self, deltas: &[SpendDelta], ok: bool) {
        for delta in deltas {
            if let Some(budget) = self
                .quotas
                .get_mut(&delta.quota)
                .and_then(|s| s.budget.as_mut())
            {
                budget.written(delta, ok);
            }
        }
    }

    /// Takes what etcd holds as spent in each budget's current period,
    /// by `(period label, quota)`; budgets missing from it spent nothing.
    pub fn set_spent(&mut self, totals: &HashMap<(String, String), Totals>) {
        for (quota, state) in &mut self.quotas {
            if let Some(budget) = &mut state.budget {
                let key = (budget.label().to_string(), quota.clone());
                budget.set_durable(totals.get(&key).copied().unwrap_or_default());
            }
        }
    }

    /// Sets this replica's part of each quota's limit; `part(quota)` is in
    /// [0, 1]. Used units stay charged when a part shrinks.
    pub fn set_parts(&mut self, mut part: impl FnMut(&str) -> f64) {
        for (quota, state) in &mut self.quotas {
            let scale = part(quota).clamp(0.0, 1.0);
            if (scale - state.scale).abs() > 1e-9 {
                state.resize(state.global, scale, state.window);
            }
        }
    }

    /// The smoothed demand rate of this replica's edges, per quota.
    pub fn demand_rates(&self) -> HashMap<String, f64> {
        self.quotas
            .iter()
            .map(|(q, s)| (q.clone(), s.edges.values().map(|e| e.demand_rate).sum()))
            .collect()
    }

    /// What this replica's edges used of each quota, as a fraction of its
    /// global limit.
    pub fn used_fractions(&self) -> HashMap<String, f64> {
        self.quotas
            .iter()
            .map(|(q, s)| {
                let used = match &s.budget {
                    Some(budget) => budget.used_fraction(s.global),
                    None => ((s.limit - s.level) / s.global.max(1.0)).max(0.0),
                };
                (q.clone(), used)
            })
            .collect()
    }

    /// Forgets an edge stream; what it consumed stays charged.
    pub fn end_session(&mut self, session: SessionId) {
        for state in self.quotas.values_mut() {
            state.edges.remove(&session);
        }
    }

    /// Forgets quotas whose limit is gone (`limit_of` answers `None`).
    pub fn retain(&mut self, mut limit_of: impl FnMut(&str) -> Option<u64>) {
        self.quotas.retain(|quota, _| limit_of(quota).is_some());
    }

    /// Shares out every quota among `sessions`: the grants for each session.
    /// `elapsed` is the time since the previous share-out. Quotas whose
    /// bucket is full and that saw no demand for `idle_after` are dropped:
    /// edges fall back to their cold-start share, which is safe when
    /// nothing has been used.
    pub fn share_out(
        &mut self,
        sessions: &[SessionId],
        elapsed: Duration,
        idle_after: Duration,
        now: Instant,
    ) -> HashMap<SessionId, Vec<QuotaGrant>> {
        let mut grants: HashMap<SessionId, Vec<QuotaGrant>> =
            sessions.iter().map(|s| (*s, Vec::new())).collect();
        let dt = elapsed.as_secs_f64().max(1e-3);
        self.quotas.retain(|_, state| {
            state.refill(now);
            let full =
                state.level >= state.limit && state.budget.as_ref().is_none_or(|b| !b.pending());
            !(full && now.saturating_duration_since(state.last_demand) >= idle_after)
        });
        for (quota, state) in &mut self.quotas {
            // A budget whose spend etcd has not answered for yet is not
            // shared out: edges keep what they hold until it is known.
            if state.budget.as_ref().is_some_and(|b| !b.known()) {
                continue;
            }
            for edge in state.edges.values_mut() {
                let sample = (edge.demand - edge.demand_at_last_shareout) as f64 / dt;
                edge.demand_at_last_shareout = edge.demand;
                edge.demand_rate =
                    DEMAND_SMOOTHING * sample + (1.0 - DEMAND_SMOOTHING) * edge.demand_rate;
            }
            let rates: Vec<f64> = sessions
                .iter()
                .map(|s| state.edges.get(s).map_or(0.0, |e| e.demand_rate))
                .collect();
            let total: f64 = rates.iter().sum();
            let floor = if total > 0.0 {
                FLOOR_SHARE * total / sessions.len().max(1) as f64
            } else {
                1.0
            };
            let weights: Vec<f64> = rates.iter().map(|r| r + floor).collect();
            let weight_sum: f64 = weights.iter().sum();
            let available = state.level.max(0.0);
            let allocated = available * (1.0 - RESERVE_FRACTION);
            let mut granted = 0.0;
            for (session, weight) in sessions.iter().zip(&weights) {
                let share = weight / weight_sum;
                let consumed_seen = state.edges.get(session).map_or(0, |e| e.consumed);
                let allowance = (allocated * share).floor();
                granted += allowance;
                if let Some(list) = grants.get_mut(session) {
                    list.push(QuotaGrant {
                        quota: quota.clone(),
                        allowance: allowance as i64,
                        consumed_seen,
                        limit: state.global as i64,
                        global_remaining: available.floor() as i64,
                        reset_ms: state.reset_ms(),
                        share,
                    });
                }
            }
            state.reserve = (available - granted).max(0.0);
        }
        grants
    }

    /// Lends up to `amount` units of `quota` from its reserve to an edge
    /// that ran dry: (units lent, units left globally, ms until full). A
    /// quota no share-out has covered yet lends nothing.
    pub fn lend(&mut self, quota: &str, amount: i64, now: Instant) -> (i64, i64, u64) {
        let Some(state) = self.quotas.get_mut(quota) else {
            return (0, 0, 0);
        };
        state.refill(now);
        state.last_demand = now;
        let lent = (amount.max(0) as f64).min(state.reserve.floor());
        state.reserve -= lent;
        let left = (state.level - lent).max(0.0).floor() as i64;
        (lent as i64, left, state.reset_ms())
    }

    /// Units left globally for a quota, if it is being tracked.
    #[cfg(test)]
    pub fn remaining(&self, quota: &str) -> Option<f64> {
        self.quotas.get(quota).map(|s| s.level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn per_minute(units: u64) -> Limit {
        Limit {
            units,
            window: MINUTE,
        }
    }
    const TICK: Duration = Duration::from_millis(250);
    const IDLE: Duration = Duration::from_secs(30);

    fn allowance(grants: &HashMap<SessionId, Vec<QuotaGrant>>, s: SessionId) -> i64 {
        grants[&s].iter().map(|g| g.allowance).sum()
    }

    #[test]
    fn the_reserve_lends_what_the_share_out_kept_back_and_no_more() {
        let mut ledger = Ledger::default();
        let now = Instant::now();
        assert_eq!(
            ledger.lend("q", 5, now),
            (0, 0, 0),
            "untracked: nothing to lend"
        );
        ledger.report(1, "q", per_minute(100), 10, 10, now);
        ledger.report(2, "q", per_minute(100), 0, 0, now);
        let grants = ledger.share_out(&[1, 2], Duration::from_millis(250), MINUTE, now);
        let granted = allowance(&grants, 1) + allowance(&grants, 2);
        assert!(
            granted <= 45,
            "at most half of the 90 left is shared out: {granted}"
        );
        let reserve = 90 - granted;
        // The idle edge runs dry and borrows; the reserve is all it can get.
        let (lent, left, _) = ledger.lend("q", 5, now);
        assert_eq!((lent, left), (5, 85));
        let (rest, _, _) = ledger.lend("q", 1_000, now);
        assert_eq!(rest, reserve - 5);
        assert_eq!(ledger.lend("q", 1, now).0, 0, "the reserve is spent");
        assert!(
            granted + reserve <= 90,
            "grants and loans stay within what was left"
        );
    }

    #[test]
    fn allowances_of_one_share_out_never_exceed_what_is_left() {
        let mut ledger = Ledger::default();
        let t0 = Instant::now();
        ledger.report(1, "key/k/rpm", per_minute(100), 30, 40, t0);
        ledger.report(2, "key/k/rpm", per_minute(100), 10, 10, t0);
        let grants = ledger.share_out(&[1, 2, 3], TICK, IDLE, t0);
        let total: i64 = [1, 2, 3].iter().map(|s| allowance(&grants, *s)).sum();
        // Half of what is left is shared out; the rest is the reserve.
        assert!(
            total <= 30,
            "granted {total} of the 30 shared out of 60 left"
        );
        assert!(total >= 27, "granted only {total} of 30");
        let (reserve, _, _) = ledger.lend("key/k/rpm", 1_000, t0);
        assert_eq!(total + reserve, 60, "grants and reserve are what is left");
        let g1 = &grants[&1][0];
        assert_eq!(g1.consumed_seen, 30);
        assert_eq!(g1.global_remaining, 60);
    }

    #[test]
    fn demand_moves_the_share_toward_the_busy_edge_and_idle_edges_keep_a_floor() {
        let mut ledger = Ledger::default();
        let mut now = Instant::now();
        let mut demand = [0u64; 3];
        let mut grants = HashMap::new();
        for _ in 0..8 {
            now += TICK;
            for (i, d) in [70u64, 20, 0].iter().enumerate() {
                demand[i] += d;
                ledger.report(i as u64, "key/k/rpm", per_minute(10_000), 0, demand[i], now);
            }
            grants = ledger.share_out(&[0, 1, 2], TICK, IDLE, now);
        }
        let (a, b, c) = (
            allowance(&grants, 0),
            allowance(&grants, 1),
            allowance(&grants, 2),
        );
        assert!(a > 3 * b, "busy edge {a} vs {b}");
        assert!(c > 0 && c < b, "idle edge keeps a small floor: {c}");
    }

    #[test]
    fn consumption_drains_the_bucket_and_time_refills_it() {
        let mut ledger = Ledger::default();
        let t0 = Instant::now();
        ledger.report(1, "key/k/rpm", per_minute(60), 60, 60, t0);
        assert_eq!(ledger.remaining("key/k/rpm"), Some(0.0));
        let grants = ledger.share_out(&[1], TICK, IDLE, t0);
        assert_eq!(grants[&1][0].allowance, 0);
        assert_eq!(grants[&1][0].reset_ms, 60_000);
        let later = t0 + Duration::from_secs(10);
        let grants = ledger.share_out(&[1], TICK, IDLE, later);
        assert_eq!(grants[&1][0].allowance, 5, "half of the 10 refilled");
        assert_eq!(ledger.lend("key/k/rpm", 9, later).0, 5, "the other half");
    }

    #[test]
    fn refunds_of_reserved_tokens_flow_back() {
        let mut ledger = Ledger::default();
        let t0 = Instant::now();
        ledger.report(1, "key/k/tpm", per_minute(1000), 600, 600, t0);
        ledger.report(1, "key/k/tpm", per_minute(1000), 250, 600, t0);
        assert_eq!(ledger.remaining("key/k/tpm"), Some(750.0));
    }

    #[test]
    fn a_full_idle_quota_is_dropped_and_a_used_one_kept() {
        let mut ledger = Ledger::default();
        let t0 = Instant::now();
        ledger.report(1, "key/a/rpm", per_minute(60), 0, 0, t0);
        ledger.report(1, "key/b/rpm", per_minute(60), 60, 60, t0);
        let grants = ledger.share_out(&[1], TICK, IDLE, t0 + IDLE);
        let quotas: Vec<_> = grants[&1].iter().map(|g| g.quota.as_str()).collect();
        assert_eq!(quotas, ["key/b/rpm"]);
    }

    #[test]
    fn a_budget_is_shared_out_from_what_etcd_says_was_spent() {
        use infermesh_runtime::money::Period;
        let mut ledger = Ledger::default();
        let t0 = Instant::now();
        let q = "tenant/t/spd";
        let limit = Limit {
            units: 1000,
            window: Duration::from_secs(24 * 3600),
        };
        ledger.budget(q, limit, Budget::new(Period::Day, 0), t0);
        ledger.report(1, q, limit, 100, 100, t0);
        let grants = ledger.share_out(&[1], TICK, IDLE, t0);
        assert!(grants[&1].is_empty(), "no grant before etcd answered");
        let key = ("1970-01-01".to_string(), q.to_string());
        // A replica that is gone spent 600.
        let gone = Totals {
            mine: 0,
            orphaned: 600,
            all: 600,
        };
        let mut totals = HashMap::from([(key.clone(), gone)]);
        ledger.set_spent(&totals);
        let grants = ledger.share_out(&[1], TICK, IDLE, t0);
        assert_eq!(
            grants[&1][0].global_remaining, 300,
            "1000 less 600 in etcd less 100 not written yet"
        );
        let deltas = ledger.take_spend();
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].units, 100);
        ledger.spend_written(&deltas, true);
        totals.insert(
            key,
            Totals {
                mine: 100,
                orphaned: 600,
                all: 700,
            },
        );
        ledger.set_spent(&totals);
        let grants = ledger.share_out(&[1], TICK, IDLE, t0);
        assert_eq!(grants[&1][0].global_remaining, 300, "written: counted once");
        // A refund (a reservation settled lower) gives units back.
        ledger.report(1, q, limit, 40, 100, t0);
        assert_eq!(ledger.remaining(q), Some(360.0));
        // With half of the budget, this replica holds half of what the gone
        // one left, less its own 40.
        ledger.set_parts(|_| 0.5);
        let grants = ledger.share_out(&[1], TICK, IDLE, t0);
        assert_eq!(grants[&1][0].global_remaining, 200 - 40);
    }

    #[test]
    fn lowering_a_limit_keeps_what_was_used() {
        let mut ledger = Ledger::default();
        let t0 = Instant::now();
        ledger.report(1, "key/k/rpm", per_minute(100), 40, 40, t0);
        ledger.report(1, "key/k/rpm", per_minute(50), 40, 40, t0);
        assert_eq!(ledger.remaining("key/k/rpm"), Some(10.0));
    }
}
