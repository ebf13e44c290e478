//! Tells a watch that has fallen behind etcd and stays behind from one
//! that is merely busy. A watch can stop delivering while etcd keeps
//! serving (seen after an overload at 10,000 sidecars: the snapshot held no
//! serving endpoint for minutes while all were registered), and nothing on
//! the stream says so. So the revision the watch last delivered is compared
//! with the newest revision written under the prefix, read now and then
//! from etcd: when the watch has not reached a revision etcd reported
//! `stall_after` ago, it is stalled and must be re-established from a
//! fresh read. Comparing with writes under the prefix, not etcd's global
//! revision, keeps writes of other etcd users from looking like a stall.

use std::time::Duration;

use tokio::time::Instant;

/// What an observation of etcd's newest revision means for the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The watch has delivered everything etcd reported.
    Current,
    /// The watch is behind, for less than the stall limit so far.
    Behind,
    /// The watch has been behind the same revision for the stall limit.
    Stalled,
}

/// See the module docs.
#[derive(Debug)]
pub struct StallDetector {
    stall_after: Duration,
    delivered: i64,
    /// The revision etcd reported that the watch has yet to reach, and when.
    waiting_for: Option<(i64, Instant)>,
}

impl StallDetector {
    /// A watch is stalled once it has not reached a reported revision for `stall_after`.
    pub fn new(stall_after: Duration, delivered: i64) -> Self {
        Self {
            stall_after,
            delivered,
            waiting_for: None,
        }
    }

    /// The watch delivered a response with header revision `revision`.
    pub fn delivered(&mut self, revision: i64) {
        self.delivered = self.delivered.max(revision);
        if self
            .waiting_for
            .is_some_and(|(target, _)| self.delivered >= target)
        {
            self.waiting_for = None;
        }
    }

    /// etcd says the newest write under the prefix is at `latest`.
    pub fn observed(&mut self, latest: i64) -> Verdict {
        if latest <= self.delivered {
            self.waiting_for = None;
            return Verdict::Current;
        }
        match self.waiting_for {
            None => {
                self.waiting_for = Some((latest, Instant::now()));
                Verdict::Behind
            }
            Some((_, since)) if since.elapsed() >= self.stall_after => Verdict::Stalled,
            Some(_) => Verdict::Behind,
        }
    }

    /// The newest revision the watch delivered.
    pub fn delivered_revision(&self) -> i64 {
        self.delivered
    }

    /// How long the watch has been behind a revision etcd reported.
    pub fn lag(&self) -> Duration {
        self.waiting_for
            .map_or(Duration::ZERO, |(_, since)| since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_keeps_up_is_current_even_when_busy() {
        let mut detector = StallDetector::new(Duration::from_secs(10), 100);
        assert_eq!(detector.observed(100), Verdict::Current);
        assert_eq!(detector.observed(120), Verdict::Behind);
        tokio::time::advance(Duration::from_secs(4)).await;
        detector.delivered(120);
        assert_eq!(detector.lag(), Duration::ZERO);
        // Always a little behind, but always reaching what was reported.
        for latest in [140, 160, 180] {
            assert_eq!(detector.observed(latest), Verdict::Behind);
            tokio::time::advance(Duration::from_secs(6)).await;
            detector.delivered(latest);
        }
        assert_eq!(detector.observed(180), Verdict::Current);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_stops_delivering_is_stalled_after_the_limit() {
        let mut detector = StallDetector::new(Duration::from_secs(10), 100);
        assert_eq!(detector.observed(150), Verdict::Behind);
        tokio::time::advance(Duration::from_secs(5)).await;
        detector.delivered(120);
        assert_eq!(detector.observed(160), Verdict::Behind);
        assert_eq!(detector.lag(), Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(detector.observed(170), Verdict::Stalled);
    }

    #[tokio::test(start_paused = true)]
    async fn reaching_the_reported_revision_restarts_the_clock() {
        let mut detector = StallDetector::new(Duration::from_secs(10), 100);
        assert_eq!(detector.observed(150), Verdict::Behind);
        tokio::time::advance(Duration::from_secs(9)).await;
        detector.delivered(150);
        assert_eq!(detector.observed(200), Verdict::Behind);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(detector.observed(210), Verdict::Behind);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(detector.observed(210), Verdict::Stalled);
    }
}
