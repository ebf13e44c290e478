//! Borrowing from the control plane's reserve: admission that tries a
//! loan before it refuses, and the loans counted by outcome.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{BORROW_AT_LEAST, Limiter, Try};
use crate::access::Principal;
use crate::error::ApiError;
use crate::quota::{Admission, Ask};

/// Loans one admission may ask for: requests admitted meanwhile may use a
/// loan before the request that asked for it tries again.
const MAX_LOANS: usize = 4;

impl Limiter {
    /// Borrows through `desk` before refusing, waiting up to `wait`.
    pub fn borrowing_through(
        mut self,
        desk: Arc<infermesh_runtime::loans::LoanDesk>,
        wait: Duration,
    ) -> Self {
        self.loans = Some((desk, wait));
        self
    }

    /// Admits a request asking for `ask` (its prompt, `choices` completions
    /// of up to its output bound each, at its model's price), or says which
    /// limit refuses it and when to retry; a quota that would refuse is
    /// first topped up from the control plane's reserve, once per quota.
    pub async fn admit_or_borrow(
        &self,
        principal: &Principal,
        ask: &Ask,
    ) -> Result<Admission, ApiError> {
        // Quotas the reserve could not cover, and loans asked for.
        let mut dry = Vec::new();
        let mut borrowed = 0;
        loop {
            let how = if borrowed == 0 {
                Try::First
            } else {
                Try::Again
            };
            let refused = match self.try_admit(principal, ask, how) {
                Ok(admission) => return Ok(admission),
                Err(refused) => refused,
            };
            let Some((desk, wait)) = self
                .loans
                .as_ref()
                .filter(|_| borrowed < MAX_LOANS && !dry.contains(&refused.quota))
            else {
                return Err(refused.error);
            };
            borrowed += 1;
            let amount = refused
                .short
                .max(refused.limit as f64 * BORROW_AT_LEAST)
                .ceil() as i64;
            // Loans are applied as they arrive, in stream order: one lent
            // to a request ahead of this one is in the state by the time
            // this one's answer is read.
            let state = refused.state.clone();
            let apply = Box::new(move |loan: &infermesh_proto::v1::Loan| {
                if loan.amount > 0 {
                    state
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .lent(loan.amount as f64, Instant::now());
                }
            });
            let outcome = match desk.borrow(&refused.quota, amount, *wait, apply).await {
                None => "unanswered",
                Some(loan) if loan.amount > 0 => "lent",
                Some(_) => "refused",
            };
            self.loan_outcome(outcome);
            tracing::debug!(quota = %refused.quota, outcome, "asked the control plane's reserve");
            // Tried again even without a loan of its own: loans to the
            // requests ahead of it may cover it. A loan that others used
            // first may be asked for again, up to MAX_LOANS.
            if outcome != "lent" {
                dry.push(refused.quota);
            }
        }
    }
}
