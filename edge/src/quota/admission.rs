//! What one request reserves at admission, and the settling of it against
//! what the request used when it ends.

use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderMap;
use infermesh_runtime::money::Price;
use tokio::time::Instant;

use super::QuotaState;

/// What a request asks to be admitted for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask {
    /// Prompt tokens, as estimated from the body.
    pub prompt: u64,
    /// Output bound of each choice (`max_completion_tokens` ??
    /// `max_tokens`); `None`: the edge's default reserve.
    pub max_output: Option<u64>,
    /// Completions asked for (`n`).
    pub choices: u64,
    /// The model's price, for spend budgets.
    pub price: Price,
}

impl Ask {
    /// A request of `prompt` tokens and one completion of up to `max_output`.
    pub fn tokens(prompt: u64, max_output: Option<u64>) -> Self {
        Self {
            prompt,
            max_output,
            choices: 1,
            price: Price::default(),
        }
    }

    /// The same request, `choices` completions.
    pub fn choices(mut self, choices: u64) -> Self {
        self.choices = choices;
        self
    }

    /// The same request, at `price`.
    pub fn priced(mut self, price: Price) -> Self {
        self.price = price;
        self
    }

    /// What is reserved, with `default_output` for a request without a bound.
    pub(super) fn reserve(&self, default_output: u64) -> Used {
        let output = self.max_output.unwrap_or(default_output);
        Used {
            prompt: self.prompt,
            completion: output.saturating_mul(self.choices.max(1)),
        }
    }
}

/// Tokens a request used (or reserved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens, every choice together.
    pub completion: u64,
}

impl Used {
    /// Nothing used.
    pub const NONE: Used = Used {
        prompt: 0,
        completion: 0,
    };

    /// Prompt and completion together.
    pub fn tokens(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What a quota counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Meter {
    /// The request itself.
    Requests,
    /// Its tokens.
    Tokens,
    /// What its tokens cost, in micro-units.
    Spend,
}

impl Meter {
    pub(super) fn of(dimension: infermesh_runtime::quota::Dimension) -> Self {
        use infermesh_runtime::quota::Dimension;
        match dimension {
            Dimension::Requests => Meter::Requests,
            Dimension::Tokens | Dimension::DailyTokens => Meter::Tokens,
            Dimension::DailySpend | Dimension::MonthlySpend => Meter::Spend,
        }
    }

    /// Units of `used` at `price`.
    pub(super) fn units(self, used: Used, price: &Price) -> u64 {
        match self {
            Meter::Requests => 1,
            Meter::Tokens => used.tokens(),
            Meter::Spend => price.cost_micros(used.prompt, used.completion),
        }
    }
}

/// What was reserved for one admitted request, to settle when it ends.
pub struct Admission {
    pub(super) quotas: Vec<(Arc<Mutex<QuotaState>>, Meter)>,
    pub(super) reserved: Used,
    pub(super) price: Price,
    /// x-ratelimit-* headers for the response.
    pub headers: HeaderMap,
    /// What it is charged if dropped unsettled (the client left before the
    /// answer began); `None` keeps the reservation.
    pub(super) if_dropped: Option<Used>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl Admission {
    /// Replaces the reservation with what the request really used.
    pub fn settle(mut self, used: Used) {
        self.if_dropped = None;
        self.apply(used);
    }

    /// Lets the reservation stand as the charge: the request's use is unknown.
    pub fn keep(mut self) {
        self.if_dropped = None;
    }

    /// Charges `used` instead of the reservation if the request is
    /// dropped before it settles: a request whose client went away before
    /// any answer is charged its prompt, not what it might have generated.
    pub fn charge_if_dropped(&mut self, used: Used) {
        self.if_dropped = Some(used);
    }

    fn apply(&self, used: Used) {
        let now = Instant::now();
        for (state, meter) in &self.quotas {
            let delta = meter.units(used, &self.price) as i64
                - meter.units(self.reserved, &self.price) as i64;
            if delta != 0 {
                state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .charge(delta, now);
            }
        }
    }

    /// Tokens reserved at admission.
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved.tokens()
    }

    /// Micro-units of spend reserved at admission.
    pub fn reserved_spend(&self) -> u64 {
        self.price
            .cost_micros(self.reserved.prompt, self.reserved.completion)
    }

    /// The cost of `used` at the model's price, in micro-units.
    pub fn cost(&self, used: Used) -> u64 {
        self.price.cost_micros(used.prompt, used.completion)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(used) = self.if_dropped.take() {
            self.apply(used);
        }
    }
}
