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
    /// Moving average of the time to response headers, microseconds.
    latency_us: AtomicU64,
    samples: AtomicU32,
}

/// Requests a replica must have answered before its latency is compared.
pub const LATENCY_SAMPLES: u32 = 10;
/// How many times slower than the median of its peers a replica must be to be ejected.
pub const SLOW_FACTOR: f64 = 3.0;
/// Ignore differences below this, so fast fleets do not eject on noise.
const SLOW_FLOOR: Duration = Duration::from_millis(50);

impl Health {
    /// Whether the replica is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_unix_ms()
    }

    /// Records the time a successful request took to its response headers.
    pub fn observe_latency(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let seen = self.samples.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(if seen == 0 {
                    sample
                } else {
                    // Weight 1/8 for the newest sample.
                    average - average / 8 + sample / 8
                })
            });
    }

    /// The moving average, once enough requests were seen.
    pub fn latency(&self) -> Option<Duration> {
        (self.samples.load(Ordering::Relaxed) >= LATENCY_SAMPLES)
            .then(|| Duration::from_micros(self.latency_us.load(Ordering::Relaxed)))
    }

    /// Ejects the replica for being slow (as a failure would); returns the length.
    pub fn eject_slow(&self, policy: &EjectionPolicy) -> Option<Duration> {
        if self.is_ejected() {
            return None;
        }
        // A fresh start once it is back: its old average would eject it again at once.
        self.samples.store(0, Ordering::Relaxed);
        self.failures_in_a_row
            .store(policy.consecutive.saturating_sub(1), Ordering::Relaxed);
        self.failure(policy)
    }

    /// Whether `latency` is far slower than `peers` (their median).
    pub fn is_slow_outlier(latency: Duration, mut peers: Vec<Duration>) -> bool {
        if peers.len() < 2 {
            return false;
        }
        peers.sort();
        let median = peers[peers.len() / 2];
        latency > median.mul_f64(SLOW_FACTOR) && latency > median + SLOW_FLOOR
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
    fn a_replica_three_times_slower_than_its_peers_median_is_an_outlier() {
        let ms = Duration::from_millis;
        assert!(Health::is_slow_outlier(
            ms(400),
            vec![ms(40), ms(50), ms(45)]
        ));
        assert!(!Health::is_slow_outlier(
            ms(100),
            vec![ms(40), ms(50), ms(45)]
        ));
        assert!(
            !Health::is_slow_outlier(ms(30), vec![ms(5), ms(6)]),
            "below the floor"
        );
        assert!(
            !Health::is_slow_outlier(ms(400), vec![ms(40)]),
            "too few peers"
        );
        let health = Health::default();
        for _ in 0..LATENCY_SAMPLES {
            health.observe_latency(ms(100));
        }
        assert_eq!(health.latency(), Some(ms(100)));
        assert!(health.eject_slow(&EjectionPolicy::default()).is_some());
        assert!(health.is_ejected());
        assert_eq!(health.latency(), None, "a fresh start after the ejection");
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
