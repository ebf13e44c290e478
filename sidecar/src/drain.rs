//! What the pod's preStop hooks wait on. Kubernetes runs every container's
//! preStop hook before sending it SIGTERM; the injected hooks reach the
//! sidecar's `/prestop` on its unix socket (`prestop`), which starts the
//! drain (as SIGTERM would) and
//! answers only once edges have stopped sending and every proxied request,
//! streams included, has finished. So the engine container is signalled
//! only after its last request is done, and no request is cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Proxied requests whose response has not finished.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    count: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// Counts one request while it lives.
#[derive(Debug)]
pub struct InFlightGuard(InFlight);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlight {
    /// A request starts.
    pub fn enter(&self) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The preStop hand-shake between the hook endpoint and the shutdown sequence.
#[derive(Debug, Clone, Default)]
pub struct PreStop {
    /// A hook asked for the drain.
    pub requested: CancellationToken,
    /// The drain is over: edges stopped and nothing is in flight (or the
    /// grace period ran out).
    pub drained: CancellationToken,
}

impl PreStop {
    /// Starts the drain and waits for its end, at most `limit`; whether it ended.
    pub async fn run_hook(&self, limit: Duration) -> bool {
        self.requested.cancel();
        tokio::time::timeout(limit, self.drained.cancelled())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_request() {
        let in_flight = InFlight::default();
        in_flight.idle().await;
        let a = in_flight.enter();
        let b = in_flight.enter();
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "one request is still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("idle after the last request")
            .unwrap();
        assert_eq!(in_flight.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_hook_answers_when_drained_or_at_its_limit() {
        let pre_stop = PreStop::default();
        let hook = tokio::spawn({
            let p = pre_stop.clone();
            async move { p.run_hook(Duration::from_secs(30)).await }
        });
        pre_stop.requested.cancelled().await;
        pre_stop.drained.cancel();
        assert!(hook.await.unwrap());
        let stuck = PreStop::default();
        assert!(!stuck.run_hook(Duration::from_secs(5)).await);
    }
}
