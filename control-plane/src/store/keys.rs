//! The key layout under the prefix. One key per object, so that a watch
//! delivers exactly what changed:
//!
//! - `models/<name>`, `pools/<name>`, `regions/<name>`, `endpoints/<id>`
//! - `names/<model name or alias>` → owning model name, so that names and
//!   aliases stay unique across models through one transaction.
//! - `tenants/<name>`, `apikeys/<id>`, `adapters/<name>` (an adapter's
//!   name is reserved under `names/` too, as `adapter:<name>`)
//! - `keyuse/<id>` → when a key was last used (Unix ms, decimal); kept apart
//!   from the key so that recording use never changes a routing table.
//! - `loads/<node>` → the loads one control-plane replica holds, under that
//!   replica's lease; `scaling/<pool>` → the autoscaler's last decision;
//!   `demand/<pool>` → an edge holds requests for the pool, under a short
//!   lease; `quotas/<node>` → what one replica's edges ask of each quota,
//!   under that replica's lease. None of these is part of a routing table.

/// The kinds of object stored under the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A model.
    Model,
    /// A pool.
    Pool,
    /// A region.
    Region,
    /// A registered replica.
    Endpoint,
    /// A model name or alias reservation.
    Name,
    /// A tenant.
    Tenant,
    /// An API key.
    ApiKey,
    /// When an API key was last used.
    KeyUse,
    /// One control-plane replica's loads.
    LoadDigest,
    /// An autoscaling decision.
    Scaling,
    /// Requests held for a pool with no replica.
    Demand,
    /// One control-plane replica's quota demand.
    QuotaDigest,
    /// A join token (stored hashed).
    JoinToken,
    /// The certificates issued to one identity.
    IssuedIdentity,
    /// A revoked identity.
    Revocation,
    /// What was spent of one budget in one period.
    Spend,
    /// Every replica's parts of the shared limits, as the leader wrote them.
    QuotaParts,
    /// A LoRA adapter.
    Adapter,
}

impl ObjectKind {
    fn dir(self) -> &'static str {
        match self {
            ObjectKind::Model => "models/",
            ObjectKind::Pool => "pools/",
            ObjectKind::Region => "regions/",
            ObjectKind::Endpoint => "endpoints/",
            ObjectKind::Name => "names/",
            ObjectKind::Tenant => "tenants/",
            ObjectKind::ApiKey => "apikeys/",
            ObjectKind::KeyUse => "keyuse/",
            ObjectKind::LoadDigest => "loads/",
            ObjectKind::Scaling => "scaling/",
            ObjectKind::Demand => "demand/",
            ObjectKind::QuotaDigest => "quotas/",
            ObjectKind::JoinToken => "jointokens/",
            ObjectKind::IssuedIdentity => "identities/",
            ObjectKind::Revocation => "revocations/",
            ObjectKind::Spend => "spend/",
            ObjectKind::QuotaParts => "quotaparts/",
            ObjectKind::Adapter => "adapters/",
        }
    }

    /// The word used in messages to operators.
    pub fn noun(self) -> &'static str {
        match self {
            ObjectKind::Model => "model",
            ObjectKind::Pool => "pool",
            ObjectKind::Region => "region",
            ObjectKind::Endpoint => "endpoint",
            ObjectKind::Name => "name",
            ObjectKind::Tenant => "tenant",
            ObjectKind::ApiKey => "API key",
            ObjectKind::KeyUse => "key use record",
            ObjectKind::LoadDigest => "load digest",
            ObjectKind::Scaling => "scaling decision",
            ObjectKind::Demand => "demand record",
            ObjectKind::QuotaDigest => "quota digest",
            ObjectKind::JoinToken => "join token",
            ObjectKind::IssuedIdentity => "issued identity",
            ObjectKind::Revocation => "revocation",
            ObjectKind::Spend => "spend record",
            ObjectKind::QuotaParts => "quota parts",
            ObjectKind::Adapter => "adapter",
        }
    }

    /// Whether routing tables are built from objects of this kind.
    pub fn in_tables(self) -> bool {
        !matches!(
            self,
            ObjectKind::Name
                | ObjectKind::KeyUse
                | ObjectKind::LoadDigest
                | ObjectKind::Scaling
                | ObjectKind::Demand
                | ObjectKind::QuotaDigest
                | ObjectKind::JoinToken
                | ObjectKind::Spend
                | ObjectKind::QuotaParts
        )
    }

    const ALL: [ObjectKind; 18] = [
        ObjectKind::Model,
        ObjectKind::Pool,
        ObjectKind::Region,
        ObjectKind::Endpoint,
        ObjectKind::Name,
        ObjectKind::Tenant,
        ObjectKind::ApiKey,
        ObjectKind::KeyUse,
        ObjectKind::LoadDigest,
        ObjectKind::Scaling,
        ObjectKind::Demand,
        ObjectKind::QuotaDigest,
        ObjectKind::JoinToken,
        ObjectKind::IssuedIdentity,
        ObjectKind::Revocation,
        ObjectKind::Spend,
        ObjectKind::QuotaParts,
        ObjectKind::Adapter,
    ];
}

/// The name an identity's records (`identities/`, `revocations/`) are
/// stored under: its path with `~` for `/` (`sidecar~eu-west~llama-eu~vllm-0`).
pub fn identity_name(identity: &infermesh_runtime::tls::PeerIdentity) -> String {
    identity.to_string().replace('/', "~")
}

/// Builds and parses keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`; a trailing `/` is added when missing.
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// The whole prefix.
    pub fn root(&self) -> &str {
        &self.prefix
    }

    /// The key of one object.
    pub fn object(&self, kind: ObjectKind, name: &str) -> String {
        format!("{}{}{}", self.prefix, kind.dir(), name)
    }

    /// The prefix of every object of a kind.
    pub fn dir(&self, kind: ObjectKind) -> String {
        format!("{}{}", self.prefix, kind.dir())
    }

    /// The kind and name a key stands for, if it is one of ours.
    pub fn parse<'k>(&self, key: &'k str) -> Option<(ObjectKind, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?;
        ObjectKind::ALL.into_iter().find_map(|kind| {
            rest.strip_prefix(kind.dir())
                .filter(|name| !name.is_empty())
                .map(|name| (kind, name))
        })
    }
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_including_names_with_slashes() {
        let keys = Keys::new("/infermesh");
        let key = keys.object(ObjectKind::Model, "meta-llama/Llama-3.1-8B");
        assert_eq!(key, "/infermesh/models/meta-llama/Llama-3.1-8B");
        assert_eq!(
            keys.parse(&key),
            Some((ObjectKind::Model, "meta-llama/Llama-3.1-8B"))
        );
        assert_eq!(keys.parse("/other/models/x"), None);
        assert_eq!(keys.parse("/infermesh/models/"), None);
        assert_eq!(keys.parse("/infermesh/unknown/x"), None);
    }

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/pools/"), b"/a/pools0".to_vec());
        assert_eq!(prefix_end("\u{7f}"), vec![0x80]);
    }
}
