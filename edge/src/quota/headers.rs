//! The rate-limit headers OpenAI clients read: `x-ratelimit-limit-*`,
//! `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` for requests and
//! tokens on every response, and `Retry-After` on a 429. Spend budgets
//! get the same three as `*-spend-day` and `*-spend-month`, in currency
//! units.

use std::sync::MutexGuard;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use infermesh_runtime::money::{Period, format_micros};
use infermesh_runtime::quota::{Dimension, QuotaId, Scope};
use tokio::time::Instant;

use super::{Charge, QuotaState};
use crate::error::ApiError;

/// A duration as OpenAI writes resets: `20ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn reset_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis().max(1));
    }
    let secs = d.as_secs_f64().ceil() as u64;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn put(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// The 429 for the quota `id`, whose limit is `limit`, for a request
/// needing `tokens` units of it (micro-units of a spend budget),
/// retryable after `retry`. `headers` (the x-ratelimit-* set) get
/// Retry-After added.
pub fn refusal(
    id: &QuotaId,
    limit: u64,
    tokens: u64,
    retry: Duration,
    headers: &mut HeaderMap,
) -> ApiError {
    let whose = match id.scope {
        Scope::Key => format!("API key imk_{}", id.name),
        Scope::Tenant => format!("tenant {}", id.name),
    };
    let (kind, message) = match id.dimension {
        Dimension::Requests => (
            "requests",
            format!(
                "Rate limit reached for {whose}: {limit} requests per minute. Retry after {}.",
                reset_text(retry)
            ),
        ),
        Dimension::Tokens => (
            "tokens",
            format!(
                "Rate limit reached for {whose}: {limit} tokens per minute; this request needs about {tokens}. Retry after {}.",
                reset_text(retry)
            ),
        ),
        Dimension::DailyTokens => (
            "insufficient_quota",
            format!(
                "Daily token budget of {limit} exhausted for {whose}; this request needs about {tokens}. Retry after {}.",
                reset_text(retry)
            ),
        ),
        Dimension::DailySpend | Dimension::MonthlySpend => (
            "insufficient_quota",
            format!(
                "Spend budget of {} per {} exhausted for {whose}; this request may cost up to {}. The budget starts again in {}.",
                format_micros(limit),
                id.dimension.period().map_or(Period::Day, |p| p),
                format_micros(tokens),
                reset_text(retry)
            ),
        ),
    };
    put(
        headers,
        "retry-after",
        (retry.as_secs_f64().ceil() as u64).max(1).to_string(),
    );
    put(
        headers,
        "retry-after-ms",
        retry.as_millis().max(1).to_string(),
    );
    ApiError::RateLimited {
        message,
        kind,
        headers: Box::new(std::mem::take(headers)),
    }
}

/// The x-ratelimit-* headers for the tightest limited key (else tenant)
/// quota of each dimension among `charges`.
pub(super) fn limits(
    charges: &[Charge],
    guards: &mut [MutexGuard<'_, QuotaState>],
    now: Instant,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (dimension, limit_name, remaining_name, reset_name) in [
        (
            Dimension::Requests,
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        (
            Dimension::Tokens,
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
        (
            Dimension::DailySpend,
            "x-ratelimit-limit-spend-day",
            "x-ratelimit-remaining-spend-day",
            "x-ratelimit-reset-spend-day",
        ),
        (
            Dimension::MonthlySpend,
            "x-ratelimit-limit-spend-month",
            "x-ratelimit-remaining-spend-month",
            "x-ratelimit-reset-spend-month",
        ),
    ] {
        let shown = |units: u64| {
            if dimension.is_spend() {
                format_micros(units)
            } else {
                units.to_string()
            }
        };
        let chosen = charges
            .iter()
            .zip(guards.iter_mut())
            .filter(|(c, _)| c.id.dimension == dimension && c.limit > 0)
            .min_by_key(|(c, _)| c.id.scope != Scope::Key);
        if let Some((charge, guard)) = chosen {
            put(&mut headers, limit_name, shown(charge.limit));
            put(&mut headers, remaining_name, shown(guard.remaining(now)));
            put(&mut headers, reset_name, reset_text(guard.reset(now)));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai_writes_them() {
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_millis(1000)), "1s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_secs(3723)), "1h2m3s");
    }
}
