//! LoRA adapters in the registry. An adapter's name shares the namespace of
//! model names and aliases (a client asks for it in `model`), so creating
//! one reserves `names/<name>` as `adapter:<name>` in the same transaction,
//! and its base model must exist while it is written.

use etcd_client::{Compare, CompareOp, TxnOp};
use infermesh_proto::v1::{Adapter, Model, Tenant};
use prost::Message;
use prost_types::FieldMask;

use super::mask::UpdateMask;
use super::{ATTEMPTS, Registry, RegistryError, put, validate};
use crate::store::ObjectKind;

/// Longest adapter source (path or URI).
const MAX_SOURCE: usize = 1024;
/// Longest adapter version label.
const MAX_VERSION: usize = 64;
/// What a name reservation of an adapter holds.
pub const ADAPTER_OWNER: &str = "adapter:";

/// How an owner read from `names/` is named to operators.
pub fn owner_phrase(owner: &str) -> String {
    match owner.strip_prefix(ADAPTER_OWNER) {
        Some(adapter) => format!("adapter {adapter:?}"),
        None => format!("model {owner:?}"),
    }
}

/// Checks an adapter as sent to create or update.
pub fn check_adapter(a: &Adapter) -> Result<(), RegistryError> {
    validate::model_name("adapter.name", &a.name)?;
    validate::model_name("adapter.base_model", &a.base_model)?;
    if a.base_model == a.name {
        return Err(RegistryError::invalid(
            "adapter.base_model",
            "must differ from adapter.name",
        ));
    }
    if a.source.trim().is_empty() {
        return Err(RegistryError::invalid(
            "adapter.source",
            "required: the path or URI the engine loads the adapter from",
        ));
    }
    if a.source.len() > MAX_SOURCE || a.source.chars().any(char::is_control) {
        return Err(RegistryError::invalid(
            "adapter.source",
            format!("must be at most {MAX_SOURCE} bytes without control characters"),
        ));
    }
    let version_ok = a
        .version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if a.version.len() > MAX_VERSION || !version_ok {
        return Err(RegistryError::invalid(
            "adapter.version",
            format!(
                "{:?} must be at most {MAX_VERSION} letters, digits, '.', '_' or '-'",
                a.version
            ),
        ));
    }
    if !a.owner_tenant.is_empty() {
        validate::dns_label("adapter.owner_tenant", &a.owner_tenant)?;
    }
    validate::description("adapter.description", &a.description)
}

impl Registry {
    /// Guards that `adapter`'s base model (by name, not alias) and owner
    /// tenant exist, or says which does not.
    async fn adapter_references(&self, adapter: &Adapter) -> Result<Vec<Compare>, RegistryError> {
        if self
            .store
            .read::<Model>(&adapter.base_model)
            .await?
            .is_none()
        {
            return Err(RegistryError::MissingReference {
                field: "adapter.base_model".into(),
                kind: ObjectKind::Model,
                name: adapter.base_model.clone(),
            });
        }
        let mut compares = vec![Compare::version(
            self.key(ObjectKind::Model, &adapter.base_model),
            CompareOp::Greater,
            0,
        )];
        if !adapter.owner_tenant.is_empty() {
            if self
                .store
                .read::<Tenant>(&adapter.owner_tenant)
                .await?
                .is_none()
            {
                return Err(RegistryError::MissingReference {
                    field: "adapter.owner_tenant".into(),
                    kind: ObjectKind::Tenant,
                    name: adapter.owner_tenant.clone(),
                });
            }
            compares.push(Compare::version(
                self.key(ObjectKind::Tenant, &adapter.owner_tenant),
                CompareOp::Greater,
                0,
            ));
        }
        Ok(compares)
    }

    /// Creates an adapter on an existing model; its name must be free
    /// among models, aliases and adapters.
    pub async fn create_adapter(&self, mut adapter: Adapter) -> Result<Adapter, RegistryError> {
        check_adapter(&adapter)?;
        adapter.revision = 0;
        let key = self.key(ObjectKind::Adapter, &adapter.name);
        let name = self.key(ObjectKind::Name, &adapter.name);
        for _ in 0..ATTEMPTS {
            if let Some(Some(owner)) = self.owners(&[&adapter.name]).await?.pop() {
                return Err(RegistryError::AlreadyExists(format!(
                    "name {:?} is already used by {}",
                    adapter.name,
                    owner_phrase(&owner)
                )));
            }
            let mut compares = self.adapter_references(&adapter).await?;
            compares.push(Compare::version(key.clone(), CompareOp::Equal, 0));
            compares.push(Compare::version(name.clone(), CompareOp::Equal, 0));
            let ops = vec![
                put(key.clone(), adapter.encode_to_vec()),
                put(
                    name.clone(),
                    format!("{ADAPTER_OWNER}{}", adapter.name).into_bytes(),
                ),
            ];
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                adapter.revision = revision;
                return Ok(adapter);
            }
        }
        Err(Self::contended::<Adapter>(&adapter.name))
    }

    /// Changes the fields `mask` names (without one, those set in `sent`)
    /// of the adapter whose stored revision equals `sent.revision`.
    pub async fn update_adapter(
        &self,
        sent: Adapter,
        mask: Option<FieldMask>,
    ) -> Result<Adapter, RegistryError> {
        let mask = UpdateMask::parse(mask)?;
        validate::model_name("adapter.name", &sent.name)?;
        let given = sent.revision;
        let key = self.key(ObjectKind::Adapter, &sent.name);
        for _ in 0..ATTEMPTS {
            let (_, mut adapter) = self.merged(&sent, &mask).await?;
            check_adapter(&adapter)?;
            let mut compares = self.adapter_references(&adapter).await?;
            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, given));
            if let Some(revision) = self
                .store
                .guarded(compares, vec![put(key.clone(), adapter.encode_to_vec())])
                .await?
            {
                adapter.revision = revision;
                return Ok(adapter);
            }
        }
        Err(Self::contended::<Adapter>(&sent.name))
    }

    /// Deletes an adapter and frees its name.
    pub async fn delete_adapter(&self, name: &str, given: i64) -> Result<i64, RegistryError> {
        for _ in 0..ATTEMPTS {
            let current: Adapter = self.current(name, given, false).await?;
            let key = self.key(ObjectKind::Adapter, name);
            let compares = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                current.revision,
            )];
            let ops = vec![
                TxnOp::delete(key, None),
                TxnOp::delete(self.key(ObjectKind::Name, name), None),
            ];
            if let Some(revision) = self.store.guarded(compares, ops).await? {
                return Ok(revision);
            }
        }
        Err(Self::contended::<Adapter>(name))
    }

    /// Names of the adapters on model `name`, and the revision of the read.
    pub(super) async fn adapters_on(
        &self,
        name: &str,
    ) -> Result<(Vec<String>, i64), RegistryError> {
        let (adapters, revision) = self.store.list::<Adapter>().await?;
        let names = adapters
            .into_iter()
            .filter(|a| a.base_model == name)
            .map(|a| a.name)
            .collect();
        Ok((names, revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> Adapter {
        Adapter {
            name: "support-bot-v3".into(),
            base_model: "llama".into(),
            source: "/adapters/support-bot-v3".into(),
            version: "r3".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_field_is_checked_and_named() {
        assert!(check_adapter(&adapter()).is_ok());
        type Spoil = fn(&mut Adapter);
        let cases: [(&str, Spoil); 7] = [
            ("adapter.name", |a| a.name.clear()),
            ("adapter.base_model", |a| a.base_model.clear()),
            ("adapter.base_model", |a| a.base_model = a.name.clone()),
            ("adapter.source", |a| a.source = " ".into()),
            ("adapter.source", |a| a.source = "/a\nb".into()),
            ("adapter.version", |a| a.version = "r 3".into()),
            ("adapter.owner_tenant", |a| a.owner_tenant = "Acme".into()),
        ];
        for (field, spoil) in cases {
            let mut a = adapter();
            spoil(&mut a);
            let message = check_adapter(&a).unwrap_err().to_string();
            assert!(message.starts_with(field), "{field}: {message}");
        }
    }

    #[test]
    fn an_owner_is_named_as_what_it_is() {
        assert_eq!(owner_phrase("llama"), "model \"llama\"");
        assert_eq!(owner_phrase("adapter:bot"), "adapter \"bot\"");
    }
}
