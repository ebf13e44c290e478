//! Names of rate-limit quotas, shared by the edges that enforce them and
//! the control plane that shares them out: `<scope>/<name>/<dimension>`,
//! e.g. `key/ab12cd34ef56/rpm` or `tenant/acme/tpm`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use infermesh_proto::v1::RateLimits;

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
}

impl Dimension {
    /// The window the limit refills over.
    pub fn window(self) -> Duration {
        match self {
            Dimension::Requests | Dimension::Tokens => Duration::from_secs(60),
            Dimension::DailyTokens => Duration::from_secs(24 * 3600),
        }
    }

    /// The limit set for this dimension; 0 is none.
    pub fn limit_in(self, limits: &RateLimits) -> u64 {
        match self {
            Dimension::Requests => limits.requests_per_minute,
            Dimension::Tokens => limits.tokens_per_minute,
            Dimension::DailyTokens => limits.tokens_per_day,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Dimension::Requests => "rpm",
            Dimension::Tokens => "tpm",
            Dimension::DailyTokens => "tpd",
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
#[error("quota id {0:?} is not <key|tenant>/<name>/<rpm|tpm|tpd>")]
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
