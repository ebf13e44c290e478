//! Who is calling: API keys and tenants as the last routing table holds
//! them (secret hashes only), and the check of a presented secret. The
//! check costs the same whether the key id is known or not, and compares
//! hashes in constant time. Nothing here logs or keeps a secret.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::HeaderMap;
use infermesh_proto::v1::{Priority, RateLimits, RoutingTable};
use infermesh_runtime::api_key;

use crate::error::ApiError;
use crate::flow::band::Band;
use crate::table::skips::{ObjectKind, SkipLog};

/// One usable key.
#[derive(Debug)]
pub struct KeyEntry {
    /// Public id.
    pub id: String,
    /// `imk_<id>`, for messages and logs.
    pub prefix: String,
    /// Tenant it belongs to.
    pub tenant: String,
    /// Id of the tenant it was made for; empty for keys made before
    /// tenants had ids (they follow the name).
    pub tenant_id: String,
    /// Whose cached answers its requests share (`Principal::cache_scope`).
    cache_scope: Arc<str>,
    secret_sha256: Vec<u8>,
    /// Canonical names of the models it may call; `None` allows all.
    allowed: Option<HashSet<String>>,
    /// The key's own limits.
    pub limits: RateLimits,
    expires_at_unix_ms: i64,
    /// The key's own priority (unset: its tenant's).
    priority: Priority,
}

impl KeyEntry {
    /// Whether the key may call the model whose canonical name is `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(model))
    }
}

/// The caller of an authenticated request, put in its extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key used.
    pub key: Arc<KeyEntry>,
    /// The key's tenant's limits, if the tenant has any.
    pub tenant_limits: Option<Arc<RateLimits>>,
    /// Whose answers this caller may share from the cache: its tenant's
    /// immutable id (`id:<id>`), or for a key made before tenant ids, the
    /// tenant's name (`name:<name>`).
    pub cache_scope: Arc<str>,
    /// Its requests' priority band: the key's, else its tenant's, else standard.
    pub band: Band,
}

/// Keys and tenants of one table version.
#[derive(Debug, Default)]
pub struct Access {
    keys: HashMap<String, Arc<KeyEntry>>,
    /// Tenants by name: their id, limits and priority.
    tenants: HashMap<String, (String, Arc<RateLimits>, Priority)>,
}

/// Hash compared against when the claimed id is unknown, so that an
/// unknown id takes as long to refuse as a wrong secret.
const DECOY_HASH: [u8; 32] = [0u8; 32];

impl Access {
    /// Reads keys and tenants from a table; `canonical` maps a model name or
    /// alias to its canonical name, for allowed-model lists. A malformed key
    /// is left out (noted in `skips`); an id that appears twice is left out
    /// in every copy, since which copy is current cannot be told.
    pub(crate) fn from_table(
        table: &RoutingTable,
        canonical: impl Fn(&str) -> Option<String>,
        skips: &mut SkipLog,
    ) -> Self {
        let mut keys = HashMap::with_capacity(table.api_keys.len());
        let mut twice = HashSet::new();
        for key in &table.api_keys {
            if !api_key::is_valid_id(&key.id) {
                skips.skip(ObjectKind::ApiKey, &key.id, "malformed key id");
                continue;
            }
            if key.secret_sha256.len() != 32 {
                skips.skip(ObjectKind::ApiKey, &key.id, "no SHA-256 hash");
                continue;
            }
            let allowed = (!key.allowed_models.is_empty()).then(|| {
                key.allowed_models
                    .iter()
                    .map(|m| canonical(m).unwrap_or_else(|| m.clone()))
                    .collect()
            });
            let entry = KeyEntry {
                id: key.id.clone(),
                prefix: api_key::display_prefix(&key.id),
                tenant: key.tenant.clone(),
                tenant_id: key.tenant_id.clone(),
                // Made once per table, not per request.
                cache_scope: if key.tenant_id.is_empty() {
                    format!("name:{}", key.tenant).into()
                } else {
                    format!("id:{}", key.tenant_id).into()
                },
                secret_sha256: key.secret_sha256.clone(),
                allowed,
                limits: key.limits.clone().unwrap_or_default(),
                expires_at_unix_ms: key.expires_at_unix_ms,
                priority: key.priority(),
            };
            if keys.insert(key.id.clone(), Arc::new(entry)).is_some() {
                twice.insert(key.id.clone());
            }
        }
        for id in twice {
            keys.remove(&id);
            skips.skip(ObjectKind::ApiKey, &id, "appears twice");
        }
        let tenants = table
            .tenants
            .iter()
            .map(|t| {
                let limits = Arc::new(t.limits.clone().unwrap_or_default());
                let entry = (t.id.clone(), limits, t.priority());
                (t.name.clone(), entry)
            })
            .collect();
        Self { keys, tenants }
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the key presented in `headers` at time `now_unix_ms`.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        now_unix_ms: i64,
    ) -> Result<Principal, ApiError> {
        self.check(headers, now_unix_ms).map_err(|(error, _)| error)
    }

    /// As `authenticate`; a refusal of a key the edge recognised (its
    /// secret matched, but it expired) comes with the key's principal, so
    /// that the refusal still spends one of its requests.
    pub fn check(
        &self,
        headers: &HeaderMap,
        now_unix_ms: i64,
    ) -> Result<Principal, (ApiError, Option<Principal>)> {
        let presented = presented_secret(headers).ok_or_else(|| {
            (
                ApiError::Unauthorized(
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`."
                        .into(),
                ),
                None,
            )
        })?;
        let claimed = api_key::claimed_id(presented);
        let entry = claimed.and_then(|id| self.keys.get(id));
        let stored = entry.map_or(&DECOY_HASH[..], |e| &e.secret_sha256[..]);
        let matched = api_key::matches(presented, stored);
        let entry = match (entry, matched) {
            (Some(entry), true) => entry,
            _ => {
                let shown = claimed.map_or_else(
                    || "that does not have the form imk_<id>_<secret>".to_string(),
                    api_key::display_prefix,
                );
                return Err((
                    ApiError::Unauthorized(format!(
                        "Incorrect API key provided: {shown}. The key is unknown or has been revoked."
                    )),
                    None,
                ));
            }
        };
        // A key bound to a tenant that was since deleted (and perhaps made
        // again under the same name) has no tenant limits.
        let tenant = self
            .tenants
            .get(&entry.tenant)
            .filter(|(id, _, _)| entry.tenant_id.is_empty() || *id == entry.tenant_id);
        let priority = match (entry.priority, tenant) {
            (Priority::Unspecified, Some((_, _, tenant))) => *tenant,
            (own, _) => own,
        };
        let principal = Principal {
            key: entry.clone(),
            tenant_limits: tenant.map(|(_, limits, _)| limits.clone()),
            cache_scope: entry.cache_scope.clone(),
            band: Band::of(priority),
        };
        if entry.expires_at_unix_ms != 0 && now_unix_ms >= entry.expires_at_unix_ms {
            let error = ApiError::Unauthorized(format!(
                "API key {} expired at {} (Unix ms).",
                entry.prefix, entry.expires_at_unix_ms
            ));
            return Err((error, Some(principal)));
        }
        Ok(principal)
    }
}

/// The secret in `Authorization: Bearer …` or else `x-api-key`.
fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{ApiKey, Tenant};

    fn table(keys: Vec<ApiKey>) -> RoutingTable {
        RoutingTable {
            api_keys: keys,
            tenants: vec![Tenant {
                name: "acme".into(),
                limits: Some(RateLimits {
                    requests_per_minute: 7,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn key(allowed: &[&str], expires: i64) -> (ApiKey, String) {
        let made = api_key::generate();
        let key = ApiKey {
            id: made.id.clone(),
            tenant: "acme".into(),
            secret_sha256: made.sha256.to_vec(),
            allowed_models: allowed.iter().map(|s| s.to_string()).collect(),
            expires_at_unix_ms: expires,
            ..Default::default()
        };
        (key, made.secret)
    }

    fn bearer(secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {secret}").parse().unwrap(),
        );
        h
    }

    fn refusal(result: Result<Principal, ApiError>) -> String {
        match result {
            Err(ApiError::Unauthorized(message)) => message,
            other => panic!("expected 401, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_key_is_accepted_by_bearer_or_x_api_key_with_its_tenant_limits() {
        let (k, secret) = key(&[], 0);
        let access = Access::from_table(&table(vec![k]), |_| None, &mut SkipLog::default());
        let p = access.authenticate(&bearer(&secret), 1).unwrap();
        assert_eq!(p.key.tenant, "acme");
        assert_eq!(p.tenant_limits.unwrap().requests_per_minute, 7);
        let mut h = HeaderMap::new();
        h.insert("x-api-key", secret.parse().unwrap());
        assert!(access.authenticate(&h, 1).is_ok());
    }

    #[test]
    fn a_key_stays_with_the_tenant_it_was_made_for_not_a_later_one_of_the_same_name() {
        let (mut old, old_secret) = key(&[], 0);
        old.tenant_id = "firstacme000".into();
        let (mut new, new_secret) = key(&[], 0);
        new.tenant_id = "secondacme00".into();
        let (legacy, legacy_secret) = key(&[], 0);
        let mut table = table(vec![old, new, legacy]);
        table.tenants[0].id = "secondacme00".into();
        let access = Access::from_table(&table, |_| None, &mut SkipLog::default());
        let old = access.authenticate(&bearer(&old_secret), 1).unwrap();
        let new = access.authenticate(&bearer(&new_secret), 1).unwrap();
        let legacy = access.authenticate(&bearer(&legacy_secret), 1).unwrap();
        assert!(
            old.tenant_limits.is_none(),
            "the old tenant's key got the new one's limits"
        );
        assert_eq!(new.tenant_limits.unwrap().requests_per_minute, 7);
        assert_eq!(legacy.tenant_limits.unwrap().requests_per_minute, 7);
        assert_eq!(&*old.cache_scope, "id:firstacme000");
        assert_eq!(&*new.cache_scope, "id:secondacme00");
        assert_ne!(old.cache_scope, new.cache_scope);
        assert_eq!(&*legacy.cache_scope, "name:acme");
    }

    #[test]
    fn missing_wrong_and_expired_keys_are_refused_without_echoing_the_secret() {
        let (k, secret) = key(&[], 1000);
        let id = k.id.clone();
        let access = Access::from_table(&table(vec![k]), |_| None, &mut SkipLog::default());
        assert!(refusal(access.authenticate(&HeaderMap::new(), 1)).contains("didn't provide"));
        let mut wrong = secret.clone();
        wrong.pop();
        wrong.push(if secret.ends_with('a') { 'b' } else { 'a' });
        let message = refusal(access.authenticate(&bearer(&wrong), 1));
        assert!(message.contains(&id) && !message.contains(&wrong));
        let other = api_key::generate();
        refusal(access.authenticate(&bearer(&other.secret), 1));
        refusal(access.authenticate(&bearer("sk-not-ours"), 1));
        assert!(refusal(access.authenticate(&bearer(&secret), 1000)).contains("expired"));
        // Only the expired key was recognised: its refusal names who to count.
        let recognised = |headers: &HeaderMap| access.check(headers, 1000).err().unwrap().1;
        assert_eq!(
            recognised(&bearer(&secret)).map(|p| p.key.id.clone()),
            Some(id.clone())
        );
        assert!(recognised(&bearer(&wrong)).is_none());
        assert!(recognised(&bearer(&other.secret)).is_none());
        let mut basic = HeaderMap::new();
        basic.insert(
            http::header::AUTHORIZATION,
            format!("Basic {secret}").parse().unwrap(),
        );
        refusal(access.authenticate(&basic, 1));
    }

    #[test]
    fn allowed_models_are_matched_by_canonical_name_so_aliases_count() {
        let (k, secret) = key(&["llama"], 0);
        let access = Access::from_table(
            &table(vec![k]),
            |name| (name == "llama" || name == "llama-alias").then(|| "llama-3".to_string()),
            &mut SkipLog::default(),
        );
        let p = access.authenticate(&bearer(&secret), 1).unwrap();
        assert!(p.key.allows("llama-3"));
        assert!(!p.key.allows("qwen"));
    }
}
