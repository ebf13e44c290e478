//! Tenants and API keys in the registry. A key is made here, once: the
//! secret goes back to the caller and only its SHA-256 is written to etcd.
//! Revoking keeps the record (for audit) and drops it from edge tables.
//! When a key was last used lives under its own etcd key so that recording
//! use never changes a routing table.

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use infermesh_proto::v1::{ApiKey, CreateApiKeyRequest, RateLimits, Tenant, UpdateApiKeyRequest};
use infermesh_runtime::api_key;
use infermesh_runtime::time::now_unix_ms;
use prost::Message;
use prost_types::FieldMask;

use super::mask::UpdateMask;
use super::{ATTEMPTS, Registry, RegistryError, validate};
use crate::store::ObjectKind;

const MAX_KEY_NAME: usize = 200;
const MAX_ALLOWED_MODELS: usize = 256;

/// Checks a tenant as sent to create or update.
pub fn check_tenant(t: &Tenant) -> Result<(), RegistryError> {
    validate::dns_label("tenant.name", &t.name)?;
    validate::description("tenant.description", &t.description)?;
    validate::limits("tenant.limits", t.limits.as_ref())?;
    check_priority("tenant.priority", t.priority)
}

/// A priority the registry knows (unset included).
fn check_priority(field: &str, priority: i32) -> Result<(), RegistryError> {
    infermesh_proto::v1::Priority::try_from(priority)
        .map(|_| ())
        .map_err(|_| {
            RegistryError::invalid(
                field,
                format!("{priority} is not a priority (CRITICAL, STANDARD, SHEDDABLE, or unset)"),
            )
        })
}

fn check_key_fields(
    prefix: &str,
    name: &str,
    allowed_models: &[String],
    expires_at_unix_ms: i64,
    now: i64,
) -> Result<(), RegistryError> {
    if name.len() > MAX_KEY_NAME {
        return Err(RegistryError::invalid(
            format!("{prefix}name"),
            format!("must be at most {MAX_KEY_NAME} characters"),
        ));
    }
    if allowed_models.len() > MAX_ALLOWED_MODELS {
        return Err(RegistryError::invalid(
            format!("{prefix}allowed_models"),
            format!("at most {MAX_ALLOWED_MODELS} entries"),
        ));
    }
    for (i, model) in allowed_models.iter().enumerate() {
        validate::model_name(&format!("{prefix}allowed_models[{i}]"), model)?;
    }
    if expires_at_unix_ms < 0 || (expires_at_unix_ms != 0 && expires_at_unix_ms <= now) {
        return Err(RegistryError::invalid(
            format!("{prefix}expires_at_unix_ms"),
            format!(
                "must be 0 (never) or a time in the future (now is {now}), got {expires_at_unix_ms}"
            ),
        ));
    }
    Ok(())
}

/// What the admin API shows of a key: never its hash.
pub fn redacted(mut key: ApiKey) -> ApiKey {
    key.secret_sha256.clear();
    key.prefix = api_key::display_prefix(&key.id);
    key
}

fn limits_or_default(limits: Option<RateLimits>) -> RateLimits {
    limits.unwrap_or_default()
}

impl Registry {
    /// Creates a tenant with a new immutable id.
    pub async fn create_tenant(&self, mut tenant: Tenant) -> Result<Tenant, RegistryError> {
        check_tenant(&tenant)?;
        if !tenant.id.is_empty() {
            return Err(RegistryError::invalid(
                "tenant.id",
                "is chosen by the server; leave it empty",
            ));
        }
        tenant.id = api_key::generate().id;
        self.create_plain(tenant).await
    }

    /// Changes the fields `mask` names (without one, those set in `sent`)
    /// of the tenant whose stored revision equals `sent.revision`; its id
    /// stays.
    pub async fn update_tenant(
        &self,
        sent: Tenant,
        mask: Option<FieldMask>,
    ) -> Result<Tenant, RegistryError> {
        let mask = UpdateMask::parse(mask)?;
        validate::dns_label("tenant.name", &sent.name)?;
        let (_, tenant) = self.merged(&sent, &mask).await?;
        check_tenant(&tenant)?;
        self.update_plain(tenant).await
    }

    /// Deletes a tenant; its keys keep working without tenant limits.
    pub async fn delete_tenant(&self, name: &str, given: i64) -> Result<i64, RegistryError> {
        self.delete_plain::<Tenant>(name, given).await
    }

    /// Makes a key; returns it (hash included) and its secret.
    pub async fn create_api_key(
        &self,
        request: CreateApiKeyRequest,
    ) -> Result<(ApiKey, String), RegistryError> {
        let now = now_unix_ms();
        validate::dns_label("tenant", &request.tenant)?;
        check_key_fields(
            "",
            &request.name,
            &request.allowed_models,
            request.expires_at_unix_ms,
            now,
        )?;
        check_priority("priority", request.priority)?;
        validate::limits("limits", request.limits.as_ref())?;
        // Bound to the tenant as it is now; a tenant made later under the
        // same name is another tenant.
        let tenant_id = self
            .store
            .read::<Tenant>(&request.tenant)
            .await?
            .map(|t| t.id)
            .unwrap_or_default();
        for _ in 0..ATTEMPTS {
            let made = api_key::generate();
            let mut key = ApiKey {
                id: made.id.clone(),
                tenant: request.tenant.clone(),
                tenant_id: tenant_id.clone(),
                name: request.name.clone(),
                secret_sha256: made.sha256.to_vec(),
                allowed_models: request.allowed_models.clone(),
                limits: Some(limits_or_default(request.limits.clone())),
                created_at_unix_ms: now,
                expires_at_unix_ms: request.expires_at_unix_ms,
                priority: request.priority,
                ..Default::default()
            };
            let k = self.key(ObjectKind::ApiKey, &key.id);
            let compares = vec![Compare::version(k.clone(), CompareOp::Equal, 0)];
            let ops = vec![TxnOp::put(k, key.encode_to_vec(), None::<PutOptions>)];
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                key.revision = revision;
                tracing::info!(key = %key.id, tenant = %key.tenant, "API key created");
                return Ok((key, made.secret));
            }
        }
        Err(Self::contended::<ApiKey>("new key"))
    }

    /// Changes a key's name, allowed models, limits or expiry: those the
    /// request's mask names, or without one those it sets.
    pub async fn update_api_key(
        &self,
        request: UpdateApiKeyRequest,
    ) -> Result<ApiKey, RegistryError> {
        let mask = UpdateMask::parse(request.update_mask)?;
        if request.revision == 0 {
            return Err(RegistryError::invalid(
                "revision",
                "required for update: send the revision you read",
            ));
        }
        let sent = ApiKey {
            id: request.id,
            name: request.name,
            allowed_models: request.allowed_models,
            limits: request.limits,
            expires_at_unix_ms: request.expires_at_unix_ms,
            priority: request.priority,
            revision: request.revision,
            ..Default::default()
        };
        let stored: ApiKey = self.current(&sent.id, sent.revision, false).await?;
        let mut key = mask.apply(&stored, &sent)?;
        key.limits = Some(limits_or_default(key.limits));
        // An expiry the update keeps is not checked against the clock: the
        // key may have expired since it was set.
        let expiry = if key.expires_at_unix_ms == stored.expires_at_unix_ms {
            0
        } else {
            key.expires_at_unix_ms
        };
        check_key_fields("", &key.name, &key.allowed_models, expiry, now_unix_ms())?;
        check_priority("priority", key.priority)?;
        validate::limits("limits", key.limits.as_ref())?;
        self.put_guarded(key).await
    }

    /// Marks a key revoked; revoking twice changes nothing.
    pub async fn revoke_api_key(&self, id: &str) -> Result<ApiKey, RegistryError> {
        for _ in 0..ATTEMPTS {
            let mut key: ApiKey = self.get(id).await?;
            if key.revoked {
                return Ok(key);
            }
            key.revoked = true;
            key.revoked_at_unix_ms = now_unix_ms();
            match self.put_guarded(key).await {
                Err(RegistryError::StaleRevision { .. }) => continue,
                result => {
                    tracing::info!(key = %id, "API key revoked");
                    return result;
                }
            }
        }
        Err(Self::contended::<ApiKey>(id))
    }

    /// Deletes a key's record and its use record.
    pub async fn delete_api_key(&self, id: &str) -> Result<i64, RegistryError> {
        let revision = self.delete_plain::<ApiKey>(id, 0).await?;
        self.store
            .client()
            .delete(self.key(ObjectKind::KeyUse, id), None)
            .await
            .map_err(crate::store::StoreError::from)?;
        tracing::info!(key = %id, "API key deleted");
        Ok(revision)
    }

    /// Writes `key` if its stored revision is still `key.revision`.
    async fn put_guarded(&self, mut key: ApiKey) -> Result<ApiKey, RegistryError> {
        let k = self.key(ObjectKind::ApiKey, &key.id);
        let given = key.revision;
        let compares = vec![Compare::mod_revision(k.clone(), CompareOp::Equal, given)];
        let ops = vec![TxnOp::put(k, key.encode_to_vec(), None::<PutOptions>)];
        match self.store.guarded(compares, ops).await? {
            Some(revision) => {
                key.revision = revision;
                Ok(key)
            }
            None => {
                let current: ApiKey = self.get(&key.id).await?;
                Err(Self::stale::<ApiKey>(&key.id, given, current.revision))
            }
        }
    }

    /// Records that keys were used at `at_unix_ms`.
    pub async fn record_key_use(
        &self,
        ids: &[String],
        at_unix_ms: i64,
    ) -> Result<(), RegistryError> {
        for id in ids {
            self.store
                .client()
                .put(
                    self.key(ObjectKind::KeyUse, id),
                    at_unix_ms.to_string(),
                    None,
                )
                .await
                .map_err(crate::store::StoreError::from)?;
        }
        Ok(())
    }

    /// When one key was last used, if ever.
    pub async fn key_last_used(&self, id: &str) -> Result<Option<i64>, RegistryError> {
        let kv = self.store.get(&self.key(ObjectKind::KeyUse, id)).await?;
        Ok(kv.and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok()))
    }

    /// When each key was last used, by id.
    pub async fn key_use(&self) -> Result<std::collections::HashMap<String, i64>, RegistryError> {
        let dir = self.store.keys().dir(ObjectKind::KeyUse);
        let (kvs, _) = self.store.get_prefix(&dir).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let id = kv.key_str().ok()?.strip_prefix(&dir)?.to_string();
                let at = std::str::from_utf8(kv.value()).ok()?.parse().ok()?;
                Some((id, at))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_priority_that_is_not_one_is_refused_naming_the_field() {
        assert!(check_priority("priority", 0).is_ok(), "unset");
        assert!(check_priority("priority", 3).is_ok(), "sheddable");
        let refused = check_priority("tenant.priority", 9).unwrap_err();
        let message = refused.to_string();
        assert!(message.contains("tenant.priority"), "{message}");
        assert!(message.contains("9 is not a priority"), "{message}");
        let tenant = Tenant {
            name: "acme".into(),
            priority: 7,
            ..Default::default()
        };
        assert!(check_tenant(&tenant).is_err());
    }
}
