//! Admit: the caller's rate limits, reserving the request's tokens.

use super::Gateway;
use crate::access::Principal;
use crate::error::ApiError;
use crate::quota::{Admission, Ask};

impl Gateway {
    /// Admits a request asking for `ask` for `principal` on `model`; a
    /// refusal is counted. Unauthenticated edges admit everything.
    pub(crate) async fn admit_counted(
        &self,
        principal: Option<&Principal>,
        model: &str,
        ask: &Ask,
    ) -> Result<Option<Admission>, ApiError> {
        let Some(principal) = principal else {
            return Ok(None);
        };
        self.limiter
            .admit_or_borrow(principal, ask)
            .await
            .map(Some)
            .inspect_err(|error| {
                if let (ApiError::RateLimited { kind, .. }, Some(metrics)) =
                    (error, self.observer.metrics())
                {
                    metrics.rate_limited(model, kind);
                }
            })
    }
}
