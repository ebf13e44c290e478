//! The tenant, API key and adapter part of the admin API. Keys leave the control
//! plane without their hash; the secret leaves it once, in the answer to
//! CreateApiKey, and is never logged.

use infermesh_proto::v1::{
    self as pb, ApiKey, CreateApiKeyResponse, DeleteResponse, ListApiKeysResponse,
    ListTenantsResponse, Tenant,
};
use infermesh_runtime::api_key;
use tonic::{Response, Status};

use super::admin::{Admin, named, ok, required};
use crate::registry::redacted;

fn key_id(id: &str) -> Result<(), Status> {
    named(id, "id")?;
    if !api_key::is_valid_id(id) {
        return Err(Status::invalid_argument(format!(
            "id: {id:?} is not a key id ({} lowercase letters and digits, the part after `imk_`)",
            api_key::ID_LEN
        )));
    }
    Ok(())
}

/// `key` without its hash, with its last use (0 for never).
fn with_last_use(key: ApiKey, last_used: Option<i64>) -> ApiKey {
    let mut key = redacted(key);
    key.last_used_at_unix_ms = last_used.unwrap_or(0);
    key
}

impl Admin {
    pub(super) async fn do_create_adapter(
        &self,
        r: pb::CreateAdapterRequest,
    ) -> Result<Response<pb::Adapter>, Status> {
        let adapter = required(r.adapter, "adapter")?;
        ok(self.registry.create_adapter(adapter).await)
    }

    pub(super) async fn do_get_adapter(
        &self,
        r: pb::GetAdapterRequest,
    ) -> Result<Response<pb::Adapter>, Status> {
        named(&r.name, "name")?;
        ok(self.registry.get::<pb::Adapter>(&r.name).await)
    }

    pub(super) async fn do_list_adapters(
        &self,
        r: pb::ListAdaptersRequest,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        ok(self
            .registry
            .list::<pb::Adapter>()
            .await
            .map(|adapters| pb::ListAdaptersResponse {
                adapters: adapters
                    .into_iter()
                    .filter(|a| r.base_model.is_empty() || a.base_model == r.base_model)
                    .collect(),
            }))
    }

    pub(super) async fn do_update_adapter(
        &self,
        r: pb::UpdateAdapterRequest,
    ) -> Result<Response<pb::Adapter>, Status> {
        let adapter = required(r.adapter, "adapter")?;
        ok(self.registry.update_adapter(adapter, r.update_mask).await)
    }

    pub(super) async fn do_delete_adapter(
        &self,
        r: pb::DeleteAdapterRequest,
    ) -> Result<Response<DeleteResponse>, Status> {
        named(&r.name, "name")?;
        ok(self
            .registry
            .delete_adapter(&r.name, r.revision)
            .await
            .map(|revision| DeleteResponse { revision }))
    }

    pub(super) async fn do_create_tenant(
        &self,
        r: pb::CreateTenantRequest,
    ) -> Result<Response<Tenant>, Status> {
        let tenant = required(r.tenant, "tenant")?;
        ok(self.registry.create_tenant(tenant).await)
    }

    pub(super) async fn do_get_tenant(
        &self,
        r: pb::GetTenantRequest,
    ) -> Result<Response<Tenant>, Status> {
        named(&r.name, "name")?;
        ok(self.registry.get::<Tenant>(&r.name).await)
    }

    pub(super) async fn do_list_tenants(&self) -> Result<Response<ListTenantsResponse>, Status> {
        ok(self
            .registry
            .list::<Tenant>()
            .await
            .map(|tenants| ListTenantsResponse { tenants }))
    }

    pub(super) async fn do_update_tenant(
        &self,
        r: pb::UpdateTenantRequest,
    ) -> Result<Response<Tenant>, Status> {
        let tenant = required(r.tenant, "tenant")?;
        ok(self.registry.update_tenant(tenant, r.update_mask).await)
    }

    pub(super) async fn do_delete_tenant(
        &self,
        r: pb::DeleteTenantRequest,
    ) -> Result<Response<DeleteResponse>, Status> {
        named(&r.name, "name")?;
        ok(self
            .registry
            .delete_tenant(&r.name, r.revision)
            .await
            .map(|revision| DeleteResponse { revision }))
    }

    pub(super) async fn do_create_api_key(
        &self,
        r: pb::CreateApiKeyRequest,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let (key, secret) = self.registry.create_api_key(r).await?;
        Ok(Response::new(CreateApiKeyResponse {
            key: Some(redacted(key)),
            secret,
        }))
    }

    /// A key as the admin API shows it, with when it was last used.
    async fn shown(&self, key: ApiKey) -> Result<ApiKey, Status> {
        let last_used = self.registry.key_last_used(&key.id).await?;
        Ok(with_last_use(key, last_used))
    }

    pub(super) async fn do_get_api_key(
        &self,
        r: pb::GetApiKeyRequest,
    ) -> Result<Response<ApiKey>, Status> {
        key_id(&r.id)?;
        let key = self.registry.get::<ApiKey>(&r.id).await?;
        Ok(Response::new(self.shown(key).await?))
    }

    pub(super) async fn do_list_api_keys(
        &self,
        r: pb::ListApiKeysRequest,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        let used = self.registry.key_use().await?;
        let keys = self
            .registry
            .list::<ApiKey>()
            .await?
            .into_iter()
            .filter(|k| r.tenant.is_empty() || k.tenant == r.tenant)
            .map(|k| {
                let last_used = used.get(&k.id).copied();
                with_last_use(k, last_used)
            })
            .collect();
        Ok(Response::new(ListApiKeysResponse { keys }))
    }

    pub(super) async fn do_update_api_key(
        &self,
        r: pb::UpdateApiKeyRequest,
    ) -> Result<Response<ApiKey>, Status> {
        key_id(&r.id)?;
        let key = self.registry.update_api_key(r).await?;
        Ok(Response::new(self.shown(key).await?))
    }

    pub(super) async fn do_revoke_api_key(
        &self,
        r: pb::RevokeApiKeyRequest,
    ) -> Result<Response<ApiKey>, Status> {
        key_id(&r.id)?;
        let key = self.registry.revoke_api_key(&r.id).await?;
        Ok(Response::new(self.shown(key).await?))
    }

    pub(super) async fn do_delete_api_key(
        &self,
        r: pb::DeleteApiKeyRequest,
    ) -> Result<Response<DeleteResponse>, Status> {
        key_id(&r.id)?;
        ok(self
            .registry
            .delete_api_key(&r.id)
            .await
            .map(|revision| DeleteResponse { revision }))
    }
}
