//! Exponential backoff with full jitter, so that a fleet of subscribers that
//! lost the same control plane does not come back in lock step.

use std::time::Duration;

use rand::Rng;

/// Delays between reconnection attempts: random in `[base, min(max, base * 2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call widens the window.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        if ceiling <= self.base {
            return self.base;
        }
        let span = (ceiling - self.base).as_micros() as u64;
        self.base + Duration::from_micros(rand::rng().random_range(0..=span))
    }

    /// Start over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_a_window_that_doubles_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(base, max);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let d = b.next_delay();
            assert!(d >= base, "{d:?} below base");
            assert!(
                d <= Duration::from_millis(ceiling),
                "{d:?} above {ceiling}ms"
            );
        }
    }

    #[test]
    fn reset_brings_the_window_back_to_base() {
        let base = Duration::from_millis(10);
        let mut b = Backoff::new(base, Duration::from_secs(10));
        for _ in 0..20 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.next_delay(), base);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(1));
            for _ in 0..8 {
                b.next_delay();
            }
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "delays were not spread: {seen:?}");
    }
}
