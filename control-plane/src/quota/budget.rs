//! Spend budgets in the ledger. A budget does not refill with time: it
//! starts again with each calendar period, and what was spent in the
//! current one is kept in etcd, one record per replica
//! (`spend/<period>/<quota>/<node>`), so that it survives a restart of any
//! control-plane replica.
//!
//! A replica's level of a budget is its part of the budget, less what it
//! spent itself (written or not) and its part of what replicas that are
//! gone spent: `part x (budget - spent by the gone) - spent here`. Summed
//! over replicas whose parts sum to at most 1 (see `parts`), that is never
//! more than the budget less everything spent, however the parts move.
//! Each replica adds what its edges spent to its record about once a
//! second and reads every record back.

use std::collections::{HashMap, HashSet};

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use infermesh_runtime::money::{Period, Span};

use crate::store::{ObjectKind, Store, StoreError};

/// How often a write of the totals is tried again when another replica
/// wrote between its read and its write.
const WRITE_ATTEMPTS: usize = 4;

/// One budget's current period, as one replica knows it.
#[derive(Debug, Clone)]
pub struct Budget {
    period: Period,
    span: Span,
    /// Spent this period through this replica, as its record in etcd
    /// last said; `None` until etcd has answered.
    mine: Option<i64>,
    /// Spent this period through replicas that are gone.
    orphaned: i64,
    /// Spent through this replica since its last write to etcd.
    unflushed: i64,
    /// Spent through this replica and being written to etcd now.
    in_flight: i64,
    /// Spent in earlier periods and not written yet: (label, units).
    carried: Vec<(String, i64)>,
}

/// What one replica adds to one budget's period total in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendDelta {
    /// Quota id.
    pub quota: String,
    /// Period label.
    pub label: String,
    /// Micro-units spent (negative: reservations settled lower).
    pub units: i64,
    /// Whether it is of the budget's current period (else carried over).
    current: bool,
}

impl Budget {
    /// A budget over `period`, in the period holding `unix_ms`.
    pub fn new(period: Period, unix_ms: i64) -> Self {
        Self {
            period,
            span: period.span_at(unix_ms),
            mine: None,
            orphaned: 0,
            unflushed: 0,
            in_flight: 0,
            carried: Vec::new(),
        }
    }

    /// The current period's label.
    pub fn label(&self) -> &str {
        &self.span.label
    }

    /// Whether etcd has answered for the current period.
    pub fn known(&self) -> bool {
        self.mine.is_some()
    }

    /// Whether spend waits to be written.
    pub fn pending(&self) -> bool {
        self.unflushed != 0 || self.in_flight != 0 || !self.carried.is_empty()
    }

    /// What this replica may still share out of a budget of `global`
    /// units, of which its part is `scale`.
    pub fn level(&self, global: f64, scale: f64) -> f64 {
        let here = self.mine.unwrap_or(0) + self.unflushed + self.in_flight;
        scale * (global - self.orphaned as f64).max(0.0) - here as f64
    }

    /// What this replica used of a budget of `global` units, as a fraction
    /// of what replicas that are gone left of it.
    pub fn used_fraction(&self, global: f64) -> f64 {
        let here = self.mine.unwrap_or(0) + self.unflushed + self.in_flight;
        let left = (global - self.orphaned as f64).max(1.0);
        (here as f64 / left).max(0.0)
    }

    /// Milliseconds until the next period.
    pub fn reset_ms(&self) -> u64 {
        (self.span.end_unix_ms - infermesh_runtime::time::now_unix_ms()).max(0) as u64
    }

    /// `units` were spent through this replica.
    pub fn spent_here(&mut self, units: i64) {
        self.unflushed += units;
    }

    /// Moves to the period holding `unix_ms` if the current one ended;
    /// what was not written yet is still written to the period it was
    /// spent in.
    pub fn roll(&mut self, unix_ms: i64) {
        if unix_ms < self.span.end_unix_ms {
            return;
        }
        let pending = self.unflushed + self.in_flight;
        if pending != 0 {
            self.carried.push((self.span.label.clone(), pending));
        }
        self.span = self.period.span_at(unix_ms);
        self.mine = None;
        self.orphaned = 0;
        self.unflushed = 0;
        self.in_flight = 0;
    }

    /// What to write now, marked as in flight.
    pub fn take(&mut self, quota: &str) -> Vec<SpendDelta> {
        let mut deltas: Vec<SpendDelta> = self
            .carried
            .drain(..)
            .map(|(label, units)| SpendDelta {
                quota: quota.to_string(),
                label,
                units,
                current: false,
            })
            .collect();
        if self.unflushed != 0 {
            self.in_flight += self.unflushed;
            deltas.push(SpendDelta {
                quota: quota.to_string(),
                label: self.span.label.clone(),
                units: self.unflushed,
                current: true,
            });
            self.unflushed = 0;
        }
        deltas
    }

    /// A write of `delta` ended.
    pub fn written(&mut self, delta: &SpendDelta, ok: bool) {
        let current = delta.current && delta.label == self.span.label;
        match (current, ok) {
            (true, true) => self.in_flight -= delta.units,
            (true, false) => {
                self.in_flight -= delta.units;
                self.unflushed += delta.units;
            }
            (false, true) => {}
            (false, false) => self.carried.push((delta.label.clone(), delta.units)),
        }
    }

    /// etcd holds `totals` of the current period.
    pub fn set_durable(&mut self, totals: Totals) {
        self.mine = Some(totals.mine.max(0));
        self.orphaned = totals.orphaned.max(0);
    }
}

/// What etcd holds of one budget's period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Spent through this replica.
    pub mine: i64,
    /// Spent through replicas that are gone.
    pub orphaned: i64,
    /// Spent through every replica.
    pub all: i64,
}

/// One replica's record of one budget's period.
fn spend_key(store: &Store, label: &str, quota: &str, node: &str) -> String {
    store
        .keys()
        .object(ObjectKind::Spend, &format!("{label}/{quota}/{node}"))
}

/// Every record of the periods `labels`: units and mod revision by
/// (label, quota, node).
async fn read_records(
    store: &Store,
    labels: &[String],
) -> Result<HashMap<(String, String, String), (i64, i64)>, StoreError> {
    let dir = store.keys().dir(ObjectKind::Spend);
    let mut records = HashMap::new();
    for label in labels {
        let prefix = format!("{dir}{label}/");
        let (kvs, _) = store.get_prefix(&prefix).await?;
        for kv in kvs {
            let Ok(key) = kv.key_str() else { continue };
            let Some((quota, node)) = key.strip_prefix(&prefix).and_then(|k| k.rsplit_once('/'))
            else {
                continue;
            };
            let units = std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            records.insert(
                (label.clone(), quota.to_string(), node.to_string()),
                (units, kv.mod_revision()),
            );
        }
    }
    Ok(records)
}

/// Adds `deltas` to this replica's (`node`) records in etcd, in one
/// transaction guarded by the revisions read, and returns the totals of
/// every budget in the periods `labels` by (label, quota); replicas not in
/// `live` are gone.
pub async fn write_spend(
    store: &Store,
    node: &str,
    live: &HashSet<String>,
    labels: &[String],
    deltas: &[SpendDelta],
) -> Result<HashMap<(String, String), Totals>, StoreError> {
    let mut all_labels: Vec<String> = labels.to_vec();
    for d in deltas {
        if !all_labels.contains(&d.label) {
            all_labels.push(d.label.clone());
        }
    }
    let mut sums: HashMap<(String, String), i64> = HashMap::new();
    for d in deltas {
        *sums.entry((d.label.clone(), d.quota.clone())).or_default() += d.units;
    }
    for _ in 0..WRITE_ATTEMPTS {
        let mut records = read_records(store, &all_labels).await?;
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for ((label, quota), units) in &sums {
            let at = (label.clone(), quota.clone(), node.to_string());
            let (held, revision) = records.get(&at).copied().unwrap_or((0, 0));
            let key = spend_key(store, label, quota, node);
            compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            ));
            let next = (held + units).max(0);
            ops.push(TxnOp::put(key, next.to_string(), None::<PutOptions>));
            records.insert(at, (next, 0));
        }
        if ops.is_empty() || store.guarded(compares, ops).await?.is_some() {
            let mut totals: HashMap<(String, String), Totals> = HashMap::new();
            for ((label, quota, owner), (units, _)) in records {
                let t = totals.entry((label, quota)).or_default();
                t.all += units;
                if owner == node {
                    t.mine += units;
                } else if !live.contains(&owner) {
                    t.orphaned += units;
                }
            }
            return Ok(totals);
        }
    }
    Err(StoreError::Contended("spend records".into()))
}

/// Days a day's total is kept after it ends.
const KEEP_DAYS: i64 = 40;
/// Days a month's total is kept after it ends (a year and a month).
const KEEP_MONTH_DAYS: i64 = 400;

/// Whether the total of the period `label` is older than its keeping
/// time, at `now_unix_ms`.
fn expired(label: &str, now_unix_ms: i64) -> bool {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let (cutoff, len) = match label.len() {
        10 => (
            Period::Day.span_at(now_unix_ms - KEEP_DAYS * DAY_MS).label,
            10,
        ),
        7 => (
            Period::Month
                .span_at(now_unix_ms - KEEP_MONTH_DAYS * DAY_MS)
                .label,
            7,
        ),
        _ => return false,
    };
    label.len() == len && label < cutoff.as_str()
}

/// Deletes the totals of periods past their keeping time; returns how many.
pub async fn prune_spend(store: &Store, now_unix_ms: i64) -> Result<usize, StoreError> {
    let dir = store.keys().dir(ObjectKind::Spend);
    let (kvs, _) = store.get_prefix(&dir).await?;
    let mut pruned = 0;
    for kv in kvs {
        let Ok(key) = kv.key_str() else { continue };
        let label = key
            .strip_prefix(&dir)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("");
        if expired(label, now_unix_ms) {
            store.client().delete(key, None).await?;
            pruned += 1;
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 24 * 3600 * 1000;

    #[test]
    fn the_level_is_this_replicas_part_less_what_it_spent_since_writing() {
        let mut b = Budget::new(Period::Day, 10 * DAY_MS);
        assert!(!b.known());
        // This replica spent 100, one that is gone 200: half of the 800
        // not spent by the gone, less its own 100.
        b.set_durable(Totals {
            mine: 100,
            orphaned: 200,
            all: 700,
        });
        assert_eq!(b.level(1000.0, 0.5), 300.0);
        b.spent_here(50);
        assert_eq!(b.level(1000.0, 0.5), 250.0);
        let deltas = b.take("tenant/t/spd");
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].units, 50);
        assert_eq!(b.level(1000.0, 0.5), 250.0, "in flight still counts");
        b.written(&deltas[0], true);
        b.set_durable(Totals {
            mine: 150,
            orphaned: 200,
            all: 750,
        });
        assert_eq!(b.level(1000.0, 0.5), 250.0, "written: counted once");
        // Another replica's spend moves nothing here: it is in its own level.
        b.set_durable(Totals {
            mine: 150,
            orphaned: 200,
            all: 900,
        });
        assert_eq!(b.level(1000.0, 0.5), 250.0);
        assert!(!b.pending());
    }

    #[test]
    fn old_totals_expire_and_recent_ones_stay() {
        // 2026-12-06
        let now = 1_796_535_000_000;
        assert!(expired("2026-10-01", now));
        assert!(!expired("2026-11-20", now));
        assert!(expired("2025-10", now));
        assert!(!expired("2025-12", now));
        assert!(!expired("garbage", now));
    }

    #[test]
    fn a_failed_write_is_tried_again_and_a_new_period_starts_full() {
        let mut b = Budget::new(Period::Day, 10 * DAY_MS);
        b.set_durable(Totals {
            mine: 900,
            ..Totals::default()
        });
        b.spent_here(30);
        let deltas = b.take("q");
        b.written(&deltas[0], false);
        assert!(b.pending());
        assert_eq!(b.level(1000.0, 1.0), 70.0);
        // Midnight: the 30 are still written, to the day they were spent in.
        b.roll(11 * DAY_MS + 5);
        assert!(!b.known(), "the new day's total is read first");
        let deltas = b.take("q");
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].label, "1970-01-11");
        assert_eq!(deltas[0].units, 30);
        b.set_durable(Totals::default());
        assert_eq!(b.level(1000.0, 1.0), 1000.0);
        b.written(&deltas[0], true);
        assert!(!b.pending());
    }
}
