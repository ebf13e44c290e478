//! A token bucket over an explicit clock: the local limit an edge applies
//! to a quota while it holds no fresh grant from the control plane (cold
//! start, or the control plane away), holding its share of the limit.

use std::time::Duration;

use tokio::time::Instant;

/// A bucket of `capacity` units refilled evenly over `window`.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(capacity: f64, window: Duration, now: Instant) -> Self {
        Self {
            capacity,
            per_sec: capacity / window.as_secs_f64(),
            level: capacity,
            updated: now,
        }
    }

    /// Changes capacity and window, keeping what was used.
    pub fn resize(&mut self, capacity: f64, window: Duration, now: Instant) {
        if (capacity - self.capacity).abs() < f64::EPSILON {
            return;
        }
        self.refill(now);
        let used = self.capacity - self.level;
        self.capacity = capacity;
        self.per_sec = capacity / window.as_secs_f64();
        self.level = (capacity - used).min(capacity);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.updated = now;
    }

    /// Units available now.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// Takes `amount` (may go negative when settling a larger actual use).
    pub fn take(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level -= amount;
    }

    /// Holds no more than `level` units from now on (until refilled).
    pub fn cap_level(&mut self, level: f64, now: Instant) {
        self.refill(now);
        self.level = self.level.min(level);
    }

    /// Time until `amount` is available.
    pub fn wait_for(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill(now);
        let missing = amount.min(self.capacity) - self.level;
        if missing <= 0.0 || self.per_sec <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.per_sec)
    }

    /// Time until the bucket is full.
    pub fn until_full(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.wait_for(self.capacity, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_refills_over_its_window_and_never_overflows() {
        let t0 = Instant::now();
        let mut b = Bucket::new(60.0, Duration::from_secs(60), t0);
        b.take(60.0, t0);
        assert_eq!(b.available(t0), 0.0);
        assert_eq!(b.wait_for(1.0, t0), Duration::from_secs(1));
        assert!((b.available(t0 + Duration::from_secs(30)) - 30.0).abs() < 1e-9);
        assert_eq!(b.available(t0 + Duration::from_secs(600)), 60.0);
    }

    #[test]
    fn resizing_keeps_what_was_used() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, Duration::from_secs(60), t0);
        b.take(40.0, t0);
        b.resize(50.0, Duration::from_secs(60), t0);
        assert_eq!(b.available(t0), 10.0);
    }
}
