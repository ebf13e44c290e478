//! Rate limits at the edge. Every authenticated request is admitted
//! against its key's and its tenant's quotas (requests and tokens per
//! minute, tokens per day) without leaving the edge: each quota is checked
//! against the grant the control plane shared out to this edge, or, with
//! no fresh grant (cold start, control plane away), against a local bucket
//! holding 1/edges of the limit. Usage goes back on the discovery stream.
//!
//! Token quotas reserve the prompt estimate plus max_tokens at admission;
//! the reservation is settled against the response's `usage`.
//!
//! A quota this edge's grant cannot admit is not refused at once while the
//! control plane is reachable: the edge borrows from the reserve the
//! control plane keeps out of every share-out, in one round trip on its
//! stream bounded by `--quota-borrow-wait-ms`, and refuses only when
//! nothing covers the request.

mod admission;
mod borrow;
mod bucket;
mod headers;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderMap;
use infermesh_proto::v1::{QuotaGrants, QuotaUsage, UsageReport};
use infermesh_runtime::discovery::QuotaExchange;
use infermesh_runtime::money::{Period, Price};
use infermesh_runtime::quota::{Dimension, QuotaId, Scope};
use infermesh_runtime::time::now_unix_ms;
use tokio::time::Instant;

use crate::access::Principal;
use crate::error::ApiError;
use admission::Meter;
pub use admission::{Admission, Ask, Used};
use bucket::Bucket;
pub use headers::reset_text;

/// A grant is trusted this long without a newer share-out.
const GRANT_FRESH_FOR: Duration = Duration::from_secs(2);
/// The least a loan asks for, as a fraction of the limit, so that an edge
/// that ran dry does not ask again for every request until the next share-out.
const BORROW_AT_LEAST: f64 = 0.02;
/// The refill window of a spend budget's local share: none within a period.
const NO_REFILL: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

#[derive(Debug, Clone)]
struct Grant {
    allowance: i64,
    consumed_seen: i64,
    global_remaining: i64,
    reset: Duration,
    at: Instant,
}

#[derive(Debug)]
struct QuotaState {
    limit: u64,
    window: Duration,
    /// A spend budget's calendar period, and when the current one ends (ms
    /// since the Unix epoch): its local share does not refill with time
    /// but starts again with the next period.
    period: Option<(Period, i64)>,
    consumed: i64,
    demand: u64,
    grant: Option<Grant>,
    local: Bucket,
    local_capacity: f64,
    /// Units lent on top of the fresh grant, until the next share-out.
    lent_to_grant: f64,
    /// Units lent while no grant was fresh, used up by what is admitted.
    lent_to_local: f64,
}

impl QuotaState {
    fn new(limit: u64, dimension: Dimension, edges: u32, now: Instant) -> Self {
        let local_capacity = limit as f64 / edges.max(1) as f64;
        let period = dimension
            .period()
            .map(|p| (p, p.span_at(now_unix_ms()).end_unix_ms));
        let window = match period {
            Some(_) => NO_REFILL,
            None => dimension.window(),
        };
        Self {
            limit,
            window,
            period,
            consumed: 0,
            demand: 0,
            grant: None,
            local: Bucket::new(local_capacity, window, now),
            local_capacity,
            lent_to_grant: 0.0,
            lent_to_local: 0.0,
        }
    }

    fn resize(&mut self, limit: u64, edges: u32, now: Instant) {
        self.limit = limit;
        self.local_capacity = limit as f64 / edges.max(1) as f64;
        self.local.resize(self.local_capacity, self.window, now);
    }

    /// Starts a spend budget's next period when the current one ended.
    fn roll(&mut self, unix_ms: i64, now: Instant) {
        let Some((period, end)) = self.period else {
            return;
        };
        if unix_ms < end {
            return;
        }
        self.period = Some((period, period.span_at(unix_ms).end_unix_ms));
        self.local = Bucket::new(self.local_capacity, self.window, now);
        self.lent_to_local = 0.0;
    }

    /// Time until a spend budget's next period.
    fn until_next_period(&self) -> Option<Duration> {
        let (_, end) = self.period?;
        Some(Duration::from_millis((end - now_unix_ms()).max(0) as u64))
    }

    fn fresh_grant(&self, now: Instant) -> Option<&Grant> {
        self.grant
            .as_ref()
            .filter(|g| now.saturating_duration_since(g.at) < GRANT_FRESH_FOR)
    }

    /// Units this edge may still admit.
    fn available(&mut self, now: Instant) -> f64 {
        match self.fresh_grant(now) {
            Some(g) => {
                (g.allowance - (self.consumed - g.consumed_seen)) as f64 + self.lent_to_grant
            }
            None => self.local.available(now) + self.lent_to_local,
        }
    }

    /// A loan of `amount` units arrived.
    fn lent(&mut self, amount: f64, now: Instant) {
        if self.fresh_grant(now).is_some() {
            self.lent_to_grant += amount;
        } else {
            self.lent_to_local += amount;
        }
    }

    /// What is left globally, as far as this edge knows.
    fn remaining(&mut self, now: Instant) -> u64 {
        let estimate = match self.fresh_grant(now) {
            Some(g) => (g.global_remaining - (self.consumed - g.consumed_seen)) as f64,
            None => self.local.available(now) * (self.limit as f64 / self.local_capacity.max(1.0)),
        };
        estimate.clamp(0.0, self.limit as f64) as u64
    }

    fn reset(&mut self, now: Instant) -> Duration {
        if let Some(next) = self.until_next_period() {
            return next;
        }
        match self.fresh_grant(now) {
            Some(g) => g.reset,
            None => self.local.until_full(now),
        }
    }

    /// How long until `amount` could be admitted: until the global bucket
    /// refills what it lacks, or the next share-out when it holds enough
    /// but none of it is this edge's.
    fn retry_after(&mut self, amount: f64, now: Instant) -> Duration {
        if let Some(next) = self.until_next_period() {
            return next.max(Duration::from_millis(250));
        }
        match self.fresh_grant(now) {
            Some(_) => {
                let per_sec = self.limit as f64 / self.window.as_secs_f64();
                let missing = (amount - self.remaining(now) as f64).max(0.0);
                Duration::from_secs_f64((missing / per_sec).max(0.25))
            }
            None => self.local.wait_for(amount, now),
        }
    }

    fn charge(&mut self, amount: i64, now: Instant) {
        self.consumed += amount;
        if self.fresh_grant(now).is_none() {
            let mut rest = amount as f64;
            if rest > 0.0 {
                let from_loan = rest.min(self.lent_to_local);
                self.lent_to_local -= from_loan;
                rest -= from_loan;
            }
            self.local.take(rest, now);
        }
    }
}

/// One quota a request is admitted against.
struct Charge {
    id: QuotaId,
    limit: u64,
    amount: u64,
}

/// How an admission is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Try {
    /// A request's first try: its demand is counted.
    First,
    /// The same request again, after asking for a loan.
    Again,
    /// Only whether it would be admitted: nothing is charged or counted.
    Peek,
}

/// A refusal, with the quota that refused and by how much.
struct Refused {
    error: ApiError,
    quota: String,
    state: Arc<Mutex<QuotaState>>,
    short: f64,
    limit: u64,
}

/// The edge's quotas.
#[derive(Debug)]
pub struct Limiter {
    quotas: DashMap<String, Arc<Mutex<QuotaState>>>,
    edges: AtomicU32,
    dirty: AtomicBool,
    /// Completion tokens reserved when a request sets no max_tokens.
    default_completion_reserve: u64,
    /// Where loans are asked for, when the edge has a control plane, and
    /// how long an admission waits for one.
    loans: Option<(Arc<infermesh_runtime::loans::LoanDesk>, Duration)>,
    /// Loans by outcome: `lent`, `refused`, `unanswered`.
    loan_outcomes: Option<prometheus::IntCounterVec>,
}

impl Limiter {
    /// A limiter reserving `default_completion_reserve` completion tokens
    /// for requests without max_tokens.
    pub fn new(default_completion_reserve: u64) -> Self {
        Self {
            quotas: DashMap::new(),
            edges: AtomicU32::new(1),
            dirty: AtomicBool::new(false),
            default_completion_reserve,
            loans: None,
            loan_outcomes: None,
        }
    }

    /// Counts loans by outcome in `counter` (label `outcome`).
    pub fn counting_loans_in(mut self, counter: prometheus::IntCounterVec) -> Self {
        self.loan_outcomes = Some(counter);
        self
    }

    fn loan_outcome(&self, outcome: &str) {
        if let Some(counter) = &self.loan_outcomes {
            counter.with_label_values(&[outcome]).inc();
        }
    }

    fn state(&self, id: &QuotaId, limit: u64, now: Instant) -> Arc<Mutex<QuotaState>> {
        let edges = self.edges.load(Ordering::Relaxed);
        let state = self
            .quotas
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(QuotaState::new(limit, id.dimension, edges, now)))
            })
            .clone();
        {
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            let capacity = limit as f64 / edges.max(1) as f64;
            if s.limit != limit || (s.local_capacity - capacity).abs() > f64::EPSILON {
                s.resize(limit, edges, now);
            }
            if s.period.is_some() {
                s.roll(now_unix_ms(), now);
            }
        }
        state
    }

    /// The quotas a request of `principal` reserving `reserve` at `price`
    /// is charged against, in quota-id order.
    fn charges(principal: &Principal, reserve: Used, price: &Price) -> Vec<Charge> {
        let mut charges = Vec::new();
        let mut add = |scope, name: &str, limits: &infermesh_proto::v1::RateLimits| {
            for dimension in Dimension::ALL {
                let limit = dimension.limit_in(limits);
                // A key's request count is kept even without a limit: it is
                // how the control plane learns when the key was last used.
                let tracked = scope == Scope::Key && dimension == Dimension::Requests;
                let amount = Meter::of(dimension).units(reserve, price);
                // What costs nothing is not held to a spent budget.
                let free = dimension.is_spend() && amount == 0;
                if (limit > 0 || tracked) && !free {
                    charges.push(Charge {
                        id: QuotaId::new(scope, name, dimension),
                        limit,
                        amount,
                    });
                }
            }
        };
        add(Scope::Key, &principal.key.id, &principal.key.limits);
        if let Some(limits) = &principal.tenant_limits {
            add(Scope::Tenant, &principal.key.tenant, limits);
        }
        charges.sort_by(|a, b| a.id.cmp(&b.id));
        charges
    }

    /// Counts one request of `principal` that was refused before admission
    /// (an unknown model, a model it may not use): its request quotas are
    /// charged, never refused, and it shows in the demand reported.
    pub fn count_request(&self, principal: &Principal) {
        let now = Instant::now();
        let requests = Self::charges(principal, Used::NONE, &Price::default())
            .into_iter()
            .filter(|c| c.id.dimension == Dimension::Requests);
        for charge in requests {
            let state = self.state(&charge.id, charge.limit, now);
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            s.demand += 1;
            s.charge(1, now);
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Admits a request of `principal` whose prompt is about
    /// `prompt_tokens` and that may generate `max_tokens` of a free model,
    /// or says which limit refuses it and when to retry.
    pub fn admit(
        &self,
        principal: &Principal,
        prompt_tokens: u64,
        max_tokens: Option<u64>,
    ) -> Result<Admission, ApiError> {
        self.try_admit(
            principal,
            &Ask::tokens(prompt_tokens, max_tokens),
            Try::First,
        )
        .map_err(|r| r.error)
    }

    /// Whether a request of `principal` would be admitted now, charging
    /// nothing: a request held for a pool to scale up from zero is refused
    /// first when its quota is spent, so that it wakes nothing.
    pub fn peek(&self, principal: &Principal, ask: &Ask) -> Result<(), ApiError> {
        self.try_admit(principal, ask, Try::Peek)
            .map(|_| ())
            .map_err(|r| r.error)
    }

    /// Admits or refuses (`Try::Peek`: says which, changing nothing).
    fn try_admit(&self, principal: &Principal, ask: &Ask, how: Try) -> Result<Admission, Refused> {
        let count_demand = how == Try::First;
        let now = Instant::now();
        let reserve = ask.reserve(self.default_completion_reserve);
        let charges = Self::charges(principal, reserve, &ask.price);
        let states: Vec<_> = charges
            .iter()
            .map(|c| self.state(&c.id, c.limit, now))
            .collect();
        // Locks are taken in quota-id order, so concurrent admissions cannot deadlock.
        let mut guards: Vec<_> = states
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
            .collect();
        if how != Try::Peek {
            self.dirty.store(true, Ordering::Relaxed);
        }
        let refused = (0..charges.len()).find(|&i| {
            let c = &charges[i];
            c.limit > 0 && guards[i].available(now) < c.amount.min(c.limit) as f64
        });
        if let Some(i) = refused {
            let charge = &charges[i];
            let needed = charge.amount.min(charge.limit) as f64;
            let short = needed - guards[i].available(now);
            let retry = guards[i].retry_after(charge.amount as f64, now);
            if count_demand {
                for (c, g) in charges.iter().zip(guards.iter_mut()) {
                    g.demand += c.amount;
                }
            }
            let mut headers = headers::limits(&charges, &mut guards, now);
            let error =
                headers::refusal(&charge.id, charge.limit, charge.amount, retry, &mut headers);
            drop(guards);
            return Err(Refused {
                error,
                quota: charge.id.to_string(),
                state: states[i].clone(),
                short,
                limit: charge.limit,
            });
        }
        if how == Try::Peek {
            return Ok(Admission {
                quotas: Vec::new(),
                reserved: Used::NONE,
                price: ask.price,
                headers: HeaderMap::new(),
                if_dropped: None,
            });
        }
        for (c, g) in charges.iter().zip(guards.iter_mut()) {
            if count_demand {
                g.demand += c.amount;
            }
            g.charge(c.amount as i64, now);
        }
        let headers = headers::limits(&charges, &mut guards, now);
        drop(guards);
        let quotas = charges
            .iter()
            .zip(states)
            .filter(|(c, _)| c.id.dimension != Dimension::Requests)
            .map(|(c, s)| (s, Meter::of(c.id.dimension)))
            .collect();
        Ok(Admission {
            quotas,
            reserved: reserve,
            price: ask.price,
            headers,
            if_dropped: None,
        })
    }
}

impl QuotaExchange for Limiter {
    fn stream_opened(&self) {
        for entry in self.quotas.iter() {
            let mut s = entry.lock().unwrap_or_else(PoisonError::into_inner);
            s.consumed = 0;
            s.demand = 0;
            s.grant = None;
        }
    }

    fn stream_closed(&self) {
        for entry in self.quotas.iter() {
            entry.lock().unwrap_or_else(PoisonError::into_inner).grant = None;
        }
    }

    fn usage(&self) -> Option<UsageReport> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        let quotas = self
            .quotas
            .iter()
            .map(|entry| {
                let s = entry.lock().unwrap_or_else(PoisonError::into_inner);
                QuotaUsage {
                    quota: entry.key().clone(),
                    consumed: s.consumed,
                    demand: s.demand,
                }
            })
            .collect();
        Some(UsageReport { quotas })
    }

    fn grants(&self, grants: QuotaGrants) {
        let now = Instant::now();
        self.edges.store(grants.edges.max(1), Ordering::Relaxed);
        let mut granted = std::collections::HashSet::new();
        for grant in grants.grants {
            let Ok(id) = grant.quota.parse::<QuotaId>() else {
                continue;
            };
            let state = self.state(&id, grant.limit.max(0) as u64, now);
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            s.lent_to_grant = 0.0;
            s.lent_to_local = 0.0;
            // Should the grants stop, the local share this edge falls back
            // to holds no more than its part of what is left.
            let part = grant.global_remaining.max(0) as f64 / f64::from(grants.edges.max(1));
            s.local.cap_level(part, now);
            s.grant = Some(Grant {
                allowance: grant.allowance,
                consumed_seen: grant.consumed_seen,
                global_remaining: grant.global_remaining,
                reset: Duration::from_millis(grant.reset_ms),
                at: now,
            });
            granted.insert(grant.quota);
        }
        for entry in self.quotas.iter() {
            if !granted.contains(entry.key()) {
                entry.lock().unwrap_or_else(PoisonError::into_inner).grant = None;
            }
        }
    }
}

#[cfg(test)]
mod tests;
