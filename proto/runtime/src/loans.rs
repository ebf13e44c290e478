//! Borrowing quota units from the control plane's reserve, on the edge's
//! routing-table stream. An edge whose grant cannot admit a request asks
//! once, with a short deadline, before it refuses; the discovery stream
//! carries the question and the answer. Without an open stream (control
//! plane away) there is nobody to ask: the edge refuses at once, keeping
//! to its last grant.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use infermesh_proto::v1::{Borrow, Loan};
use tokio::sync::{Notify, oneshot};

/// What to do with a loan as it arrives, before its borrower wakes: loans
/// are applied in the order the stream brings them.
pub type ApplyLoan = Box<dyn FnOnce(&Loan) + Send>;

/// Questions not yet sent and loans not yet answered.
#[derive(Default)]
pub struct LoanDesk {
    queue: Mutex<Vec<Borrow>>,
    pending: Mutex<HashMap<u64, (oneshot::Sender<Loan>, ApplyLoan)>>,
    /// Woken when a question is queued.
    pub signalled: Notify,
    next_id: AtomicU64,
    open: AtomicBool,
}

impl std::fmt::Debug for LoanDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoanDesk")
            .field("pending", &lock(&self.pending).len())
            .finish()
    }
}

impl LoanDesk {
    /// Asks for `amount` units of `quota`; the loan, or `None` when no
    /// stream is open or no answer came within `wait`. `apply` runs as the
    /// loan arrives (not when none does).
    pub async fn borrow(
        &self,
        quota: &str,
        amount: i64,
        wait: Duration,
        apply: ApplyLoan,
    ) -> Option<Loan> {
        if !self.open.load(Ordering::Acquire) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, answer) = oneshot::channel();
        lock(&self.pending).insert(id, (reply, apply));
        lock(&self.queue).push(Borrow {
            id,
            quota: quota.to_string(),
            amount,
        });
        self.signalled.notify_one();
        let loan = tokio::time::timeout(wait, answer).await;
        lock(&self.pending).remove(&id);
        loan.ok()?.ok()
    }

    /// The questions to send now.
    pub fn take(&self) -> Vec<Borrow> {
        std::mem::take(&mut *lock(&self.queue))
    }

    /// An answer arrived.
    pub fn answer(&self, loan: Loan) {
        let waiting = lock(&self.pending).remove(&loan.id);
        if let Some((reply, apply)) = waiting {
            apply(&loan);
            let _ = reply.send(loan);
        }
    }

    /// A stream opened: questions can be asked.
    pub fn opened(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// The stream closed: questions on it go unanswered.
    pub fn closed(&self) {
        self.open.store(false, Ordering::Release);
        lock(&self.queue).clear();
        lock(&self.pending).clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_stream_nobody_is_asked() {
        let desk = LoanDesk::default();
        assert!(
            desk.borrow("key/k/rpm", 1, Duration::from_secs(5), Box::new(|_| {}))
                .await
                .is_none()
        );
        assert!(desk.take().is_empty());
    }

    #[tokio::test]
    async fn an_answer_reaches_its_question_and_a_closed_stream_fails_the_rest() {
        let desk = std::sync::Arc::new(LoanDesk::default());
        desk.opened();
        let asking = tokio::spawn({
            let desk = desk.clone();
            async move {
                desk.borrow("key/k/rpm", 3, Duration::from_secs(5), Box::new(|_| {}))
                    .await
            }
        });
        desk.signalled.notified().await;
        let asked = desk.take();
        assert_eq!(asked.len(), 1);
        assert_eq!((asked[0].quota.as_str(), asked[0].amount), ("key/k/rpm", 3));
        desk.answer(Loan {
            id: asked[0].id,
            quota: "key/k/rpm".into(),
            amount: 3,
            ..Default::default()
        });
        assert_eq!(asking.await.unwrap().map(|l| l.amount), Some(3));

        let unanswered = tokio::spawn({
            let desk = desk.clone();
            async move {
                desk.borrow("key/k/rpm", 1, Duration::from_secs(5), Box::new(|_| {}))
                    .await
            }
        });
        desk.signalled.notified().await;
        desk.closed();
        assert!(unanswered.await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_control_plane_costs_only_the_wait() {
        let desk = LoanDesk::default();
        desk.opened();
        let started = tokio::time::Instant::now();
        assert!(
            desk.borrow(
                "key/k/rpm",
                1,
                Duration::from_millis(20),
                Box::new(|_| panic!("no loan came"))
            )
            .await
            .is_none()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert!(lock(&desk.pending).is_empty());
    }
}
