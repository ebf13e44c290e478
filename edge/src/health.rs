//! Passive health of each replica as this edge sees it, and the retry
//! budget. A replica that fails `consecutive` times in a row (refused or
//! broken connections, 5xx answers, timeouts) is ejected: no new requests
//! for a base interval that doubles with each ejection in a row (to a cap).
//! When it runs out the replica gets traffic again, and its next result
//! decides: a success clears its record, a failure ejects it again for
//! longer. If every replica of a model is ejected the ejections are ignored
//! rather than refuse everything. State is kept per endpoint id, so it
//! survives routing-table pushes.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use infermesh_runtime::time::now_unix_ms;

/// When replicas are ejected.
#[derive(Debug, Clone, Copy)]
pub struct EjectionPolicy {
    /// Failures in a row that eject a replica.
    pub consecutive: u32,
    /// First ejection's length; each ejection in a row doubles it.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive: 3,
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
        }
    }
}

/// One replica's record.
#[derive(Debug, Default)]
pub struct Health {
    failures_in_a_row: AtomicU32,
    ejections_in_a_row: AtomicU32,
    ejected_until_ms: AtomicI64,
}

impl Health {
    /// Whether the replica is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_unix_ms()
    }

    /// A request to the replica succeeded.
    pub fn success(&self) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        self.ejections_in_a_row.store(0, Ordering::Relaxed);
    }

    /// A request to the replica failed; returns the ejection length when
    /// this failure ejected it.
    pub fn failure(&self, policy: &EjectionPolicy) -> Option<Duration> {
        let failures = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        // After an ejection ran out, one more failure is enough.
        let probing = self.ejections_in_a_row.load(Ordering::Relaxed) > 0;
        if failures < policy.consecutive.max(1) && !probing {
            return None;
        }
        if self.is_ejected() {
            return None;
        }
        let round = self.ejections_in_a_row.fetch_add(1, Ordering::Relaxed);
        let factor = 1u32.checked_shl(round.min(16)).unwrap_or(u32::MAX);
        let length = policy.base.saturating_mul(factor).min(policy.max);
        self.ejected_until_ms.store(
            now_unix_ms() + i64::try_from(length.as_millis()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        Some(length)
    }
}

/// Retries allowed as a share of requests (Envoy's retry budget): every
/// request earns `ratio` of a retry, a retry spends one, and a small float
/// lets the first failures after a quiet period be retried.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a retry available.
    milli: AtomicU64,
    earn_milli: u64,
    cap_milli: u64,
}

impl RetryBudget {
    /// Retries up to `ratio` of requests, with `float` retries banked at most.
    pub fn new(ratio: f64, float: u64) -> Self {
        Self {
            milli: AtomicU64::new(float * 1000),
            earn_milli: (ratio.clamp(0.0, 1.0) * 1000.0) as u64,
            cap_milli: float * 1000,
        }
    }

    /// A request arrived.
    pub fn earn(&self) {
        let _ = self
            .milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m + self.earn_milli).min(self.cap_milli))
            });
    }

    /// Takes one retry if the budget has it.
    pub fn spend(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                m.checked_sub(1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_eject_for_growing_intervals_and_success_clears() {
        let policy = EjectionPolicy {
            consecutive: 3,
            base: Duration::from_secs(10),
            max: Duration::from_secs(25),
        };
        let health = Health::default();
        assert_eq!(health.failure(&policy), None);
        health.success();
        assert_eq!(health.failure(&policy), None);
        assert_eq!(health.failure(&policy), None);
        assert_eq!(health.failure(&policy), Some(Duration::from_secs(10)));
        assert!(health.is_ejected());
        // The ejection runs out; the next failure ejects again, for longer.
        health.ejected_until_ms.store(0, Ordering::Relaxed);
        assert_eq!(health.failure(&policy), Some(Duration::from_secs(20)));
        health.ejected_until_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            health.failure(&policy),
            Some(Duration::from_secs(25)),
            "capped"
        );
        health.ejected_until_ms.store(0, Ordering::Relaxed);
        health.success();
        assert_eq!(health.failure(&policy), None, "a success starts over");
    }

    #[test]
    fn the_budget_allows_its_share_of_retries_plus_the_float() {
        let budget = RetryBudget::new(0.2, 2);
        assert!(budget.spend() && budget.spend());
        assert!(!budget.spend());
        for _ in 0..10 {
            budget.earn();
        }
        assert!(
            budget.spend() && budget.spend(),
            "10 requests earn 2 retries"
        );
        assert!(!budget.spend());
        for _ in 0..1000 {
            budget.earn();
        }
        assert!(
            budget.spend() && budget.spend() && !budget.spend(),
            "banked up to the float"
        );
    }
}
