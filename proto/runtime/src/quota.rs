//! Names of rate-limit quotas, shared by the edges that enforce them and
//! the control plane that shares them out: `<scope>/<name>/<dimension>`,
//! e.g. `key/ab12cd34ef56/rpm` or `tenant/acme/tpm`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use infermesh_proto::v1::RateLimits;

use crate::money::{Period, budget_micros};

/// Whose traffic a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// One API key.
    Key,
    /// Every key of one tenant.
    Tenant,
}

/// What a quota counts, over which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Tokens per day.
    DailyTokens,
    /// Spend (micro-units) per UTC day.
    DailySpend,
    /// Spend (micro-units) per UTC calendar month.
    MonthlySpend,
}

impl Dimension {
    /// Every dimension.
    pub const ALL: [Dimension; 5] = [
        Dimension::Requests,
        Dimension::Tokens,
        Dimension::DailyTokens,
        Dimension::DailySpend,
        Dimension::MonthlySpend,
    ];

    /// The window the limit refills over. Spend budgets do not refill:
    /// they start again with each calendar period (`period`); their window
    /// is the longest period, for the edge's cold-start share.
    pub fn window(self) -> Duration {
        match self {
            Dimension::Requests | Dimension::Tokens => Duration::from_secs(60),
            Dimension::DailyTokens | Dimension::DailySpend => Duration::from_secs(24 * 3600),
            Dimension::MonthlySpend => Duration::from_secs(31 * 24 * 3600),
        }
    }

    /// The calendar period of a spend budget; `None` for limits that refill.
    pub fn period(self) -> Option<Period> {
        match self {
            Dimension::DailySpend => Some(Period::Day),
            Dimension::MonthlySpend => Some(Period::Month),
            _ => None,
        }
    }

    /// Whether this counts spend (micro-units) rather than requests or tokens.
    pub fn is_spend(self) -> bool {
        self.period().is_some()
    }

    /// The limit set for this dimension; 0 is none (as is a budget the
    /// registry would not have taken).
    pub fn limit_in(self, limits: &RateLimits) -> u64 {
        match self {
            Dimension::Requests => limits.requests_per_minute,
            Dimension::Tokens => limits.tokens_per_minute,
            Dimension::DailyTokens => limits.tokens_per_day,
            Dimension::DailySpend => budget_micros(&limits.spend_per_day).unwrap_or(0),
            Dimension::MonthlySpend => budget_micros(&limits.spend_per_month).unwrap_or(0),
        }
    }

    fn word(self) -> &'static str {
        match self {
            Dimension::Requests => "rpm",
            Dimension::Tokens => "tpm",
            Dimension::DailyTokens => "tpd",
            Dimension::DailySpend => "spd",
            Dimension::MonthlySpend => "spm",
        }
    }
}

/// One quota.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaId {
    /// Key or tenant.
    pub scope: Scope,
    /// Key id or tenant name.
    pub name: String,
    /// What is counted.
    pub dimension: Dimension,
}

impl QuotaId {
    /// A quota of `scope`/`name` on `dimension`.
    pub fn new(scope: Scope, name: &str, dimension: Dimension) -> Self {
        Self {
            scope,
            name: name.to_string(),
            dimension,
        }
    }
}

impl fmt::Display for QuotaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::Key => "key",
            Scope::Tenant => "tenant",
        };
        write!(f, "{scope}/{}/{}", self.name, self.dimension.word())
    }
}

/// A quota id that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("quota id {0:?} is not <key|tenant>/<name>/<rpm|tpm|tpd|spd|spm>")]
pub struct BadQuotaId(String);

impl FromStr for QuotaId {
    type Err = BadQuotaId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadQuotaId(s.to_string());
        let mut parts = s.split('/');
        let (Some(scope), Some(name), Some(dimension), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let scope = match scope {
            "key" => Scope::Key,
            "tenant" => Scope::Tenant,
            _ => return Err(bad()),
        };
        let dimension = match dimension {
            "rpm" => Dimension::Requests,
            "tpm" => Dimension::Tokens,
            "tpd" => Dimension::DailyTokens,
            "spd" => Dimension::DailySpend,
            "spm" => Dimension::MonthlySpend,
            _ => return Err(bad()),
        };
        if name.is_empty() {
            return Err(bad());
        }
        Ok(Self::new(scope, name, dimension))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_ids_round_trip_and_refuse_garbage() {
        let id = QuotaId::new(Scope::Tenant, "acme", Dimension::DailyTokens);
        assert_eq!(id.to_string(), "tenant/acme/tpd");
        assert_eq!("tenant/acme/tpd".parse::<QuotaId>().unwrap(), id);
        let spend = QuotaId::new(Scope::Key, "k1", Dimension::MonthlySpend);
        assert_eq!(spend.to_string().parse::<QuotaId>().unwrap(), spend);
        assert!(spend.dimension.is_spend());
        for bad in [
            "",
            "key",
            "key//rpm",
            "user/x/rpm",
            "key/x/rps",
            "key/x/rpm/extra",
        ] {
            assert!(bad.parse::<QuotaId>().is_err(), "{bad}");
        }
    }
}
