//! Failed authentication, counted and limited per source address. Every
//! 401 is counted (`infermesh_edge_auth_failures_total`) and logged with
//! the client's address and the key id it claimed (never the secret); a
//! source that fails more than its budget in a minute gets 429 for the
//! rest of that minute without its key being checked at all, so guessing
//! keys from one address is slow and cannot flood the logs.

use std::net::IpAddr;
use std::time::Duration;

use dashmap::DashMap;
use prometheus::IntCounterVec;
use tokio::time::Instant;

/// Most sources tracked at once; beyond this, expired windows are dropped.
const MOST_SOURCES: usize = 100_000;

/// See the module docs.
#[derive(Debug)]
pub struct AuthFailures {
    per_window: u32,
    window: Duration,
    sources: DashMap<IpAddr, (Instant, u32)>,
    counter: Option<IntCounterVec>,
}

impl AuthFailures {
    /// At most `per_minute` failures per source address in a minute (0: no limit).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_window: per_minute,
            window: Duration::from_secs(60),
            sources: DashMap::new(),
            counter: None,
        }
    }

    /// Counts failures in `counter`, labelled by outcome.
    pub fn counted_in(mut self, counter: IntCounterVec) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Whether `source` has used up its failures for now.
    pub fn blocked(&self, source: IpAddr) -> Option<Duration> {
        if self.per_window == 0 {
            return None;
        }
        let entry = self.sources.get(&source)?;
        let (start, failures) = *entry;
        let elapsed = start.elapsed();
        (elapsed < self.window && failures >= self.per_window).then(|| {
            self.count("blocked");
            self.window - elapsed
        })
    }

    /// `source` failed to authenticate.
    pub fn failed(&self, source: Option<IpAddr>) {
        self.count("unauthorized");
        let Some(source) = source else { return };
        if self.per_window == 0 {
            return;
        }
        if self.sources.len() > MOST_SOURCES {
            let window = self.window;
            self.sources
                .retain(|_, (start, _)| start.elapsed() < window);
        }
        let now = Instant::now();
        let mut entry = self.sources.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    fn count(&self, outcome: &str) {
        if let Some(counter) = &self.counter {
            counter.with_label_values(&[outcome]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_source_is_blocked_after_its_failures_and_free_after_the_minute() {
        let failures = AuthFailures::new(3);
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let other: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(failures.blocked(attacker), None);
            failures.failed(Some(attacker));
        }
        let retry = failures
            .blocked(attacker)
            .expect("blocked after 3 failures");
        assert!(retry <= Duration::from_secs(60));
        assert_eq!(
            failures.blocked(other),
            None,
            "other sources are not affected"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(failures.blocked(attacker), None);
    }

    #[test]
    fn zero_means_no_limit_and_failures_are_still_counted() {
        let counter = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["outcome"]).unwrap();
        let failures = AuthFailures::new(0).counted_in(counter.clone());
        let source: IpAddr = "10.0.0.66".parse().unwrap();
        for _ in 0..100 {
            failures.failed(Some(source));
        }
        assert_eq!(failures.blocked(source), None);
        assert_eq!(counter.with_label_values(&["unauthorized"]).get(), 100);
    }
}
