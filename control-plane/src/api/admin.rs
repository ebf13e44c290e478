//! AdminService: the operator's API over the registry. Converts requests,
//! lets the registry do the work, and reads endpoints and tables from the
//! watched snapshot. Error mapping lives with `RegistryError`.

use std::sync::Arc;

use infermesh_proto::v1::{
    self as pb, DeleteResponse, Endpoint, ListEndpointsResponse, ListModelsResponse,
    ListPoolsResponse, ListRegionsResponse, Model, Pool, Region, RoutingTable, SubscriberRole,
    admin_service_server::AdminService,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::fleet::{ExplainDesk, SubscriberView};
use crate::loads::LoadView;
use crate::registry::{Registry, RegistryError, redacted};
use crate::snapshot::Snapshot;
use crate::store::{ObjectKind, decode};
use crate::tables;

/// The admin service.
pub struct Admin {
    pub(super) registry: Registry,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(super) loads: Arc<LoadView>,
    pub(super) subscribers: Arc<SubscriberView>,
    pub(super) explain: Arc<ExplainDesk>,
    pub(super) quotas: Option<Arc<crate::quota::QuotaBook>>,
}

impl Admin {
    /// An admin service over `registry`, reading endpoints from
    /// `snapshots`, their load from `loads` and every replica's
    /// subscribers from `subscribers`.
    pub fn new(
        registry: Registry,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        loads: Arc<LoadView>,
        subscribers: Arc<SubscriberView>,
    ) -> Self {
        Self {
            registry,
            snapshots,
            loads,
            subscribers,
            explain: Arc::default(),
            quotas: None,
        }
    }

    /// Shows in fleet status what `quotas` says was spent of each budget.
    pub fn showing_budgets_of(mut self, quotas: Arc<crate::quota::QuotaBook>) -> Self {
        self.quotas = Some(quotas);
        self
    }

    /// Asks edges ExplainRoute's questions through `desk` (the one the
    /// discovery service attaches edge streams to).
    pub fn explaining_through(mut self, desk: Arc<ExplainDesk>) -> Self {
        self.explain = desk;
        self
    }

    pub(super) fn snapshot(&self) -> Result<Arc<Snapshot>, Status> {
        let snapshot = self.snapshots.borrow().clone();
        if !snapshot.is_synced() {
            return Err(Status::unavailable(
                "registry not loaded from etcd yet; retry",
            ));
        }
        Ok(snapshot)
    }
}

pub(super) fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field}: required")))
}

pub(super) fn named(name: &str, field: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    Ok(())
}

pub(super) fn ok<T>(result: Result<T, RegistryError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_model(
        &self,
        r: Request<pb::CreateModelRequest>,
    ) -> Result<Response<Model>, Status> {
        let model = required(r.into_inner().model, "model")?;
        ok(self.registry.create_model(model).await)
    }

    async fn get_model(&self, r: Request<pb::GetModelRequest>) -> Result<Response<Model>, Status> {
        let name = r.into_inner().name;
        named(&name, "name")?;
        ok(self.registry.get::<Model>(&name).await)
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        ok(self
            .registry
            .list::<Model>()
            .await
            .map(|models| ListModelsResponse { models }))
    }

    async fn update_model(
        &self,
        r: Request<pb::UpdateModelRequest>,
    ) -> Result<Response<Model>, Status> {
        let r = r.into_inner();
        let model = required(r.model, "model")?;
        ok(self.registry.update_model(model, r.update_mask).await)
    }

    async fn delete_model(
        &self,
        r: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = r.into_inner();
        named(&r.name, "name")?;
        ok(self
            .registry
            .delete_model(&r.name, r.revision)
            .await
            .map(|revision| DeleteResponse { revision }))
    }

    async fn create_adapter(
        &self,
        r: Request<pb::CreateAdapterRequest>,
    ) -> Result<Response<pb::Adapter>, Status> {
        self.do_create_adapter(r.into_inner()).await
    }

    async fn get_adapter(
        &self,
        r: Request<pb::GetAdapterRequest>,
    ) -> Result<Response<pb::Adapter>, Status> {
        self.do_get_adapter(r.into_inner()).await
    }

    async fn list_adapters(
        &self,
        r: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        self.do_list_adapters(r.into_inner()).await
    }

    async fn update_adapter(
        &self,
        r: Request<pb::UpdateAdapterRequest>,
    ) -> Result<Response<pb::Adapter>, Status> {
        self.do_update_adapter(r.into_inner()).await
    }

    async fn delete_adapter(
        &self,
        r: Request<pb::DeleteAdapterRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.do_delete_adapter(r.into_inner()).await
    }

    async fn create_pool(
        &self,
        r: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<Pool>, Status> {
        let pool = required(r.into_inner().pool, "pool")?;
        ok(self.registry.create_pool(pool).await)
    }

    async fn get_pool(&self, r: Request<pb::GetPoolRequest>) -> Result<Response<Pool>, Status> {
        let name = r.into_inner().name;
        named(&name, "name")?;
        ok(self.registry.get::<Pool>(&name).await)
    }

    async fn list_pools(
        &self,
        r: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<ListPoolsResponse>, Status> {
        let r = r.into_inner();
        ok(self
            .registry
            .list::<Pool>()
            .await
            .map(|pools| ListPoolsResponse {
                pools: pools
                    .into_iter()
                    .filter(|p| r.region.is_empty() || p.region == r.region)
                    .filter(|p| r.model.is_empty() || p.model == r.model)
                    .collect(),
            }))
    }

    async fn update_pool(
        &self,
        r: Request<pb::UpdatePoolRequest>,
    ) -> Result<Response<Pool>, Status> {
        let r = r.into_inner();
        let pool = required(r.pool, "pool")?;
        ok(self.registry.update_pool(pool, r.update_mask).await)
    }

    async fn delete_pool(
        &self,
        r: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = r.into_inner();
        named(&r.name, "name")?;
        ok(self
            .registry
            .delete_pool(&r.name, r.revision)
            .await
            .map(|revision| DeleteResponse { revision }))
    }

    async fn create_region(
        &self,
        r: Request<pb::CreateRegionRequest>,
    ) -> Result<Response<Region>, Status> {
        let region = required(r.into_inner().region, "region")?;
        ok(self.registry.create_region(region).await)
    }

    async fn get_region(
        &self,
        r: Request<pb::GetRegionRequest>,
    ) -> Result<Response<Region>, Status> {
        let name = r.into_inner().name;
        named(&name, "name")?;
        ok(self.registry.get::<Region>(&name).await)
    }

    async fn list_regions(
        &self,
        _: Request<pb::ListRegionsRequest>,
    ) -> Result<Response<ListRegionsResponse>, Status> {
        ok(self
            .registry
            .list::<Region>()
            .await
            .map(|regions| ListRegionsResponse { regions }))
    }

    async fn update_region(
        &self,
        r: Request<pb::UpdateRegionRequest>,
    ) -> Result<Response<Region>, Status> {
        let r = r.into_inner();
        let region = required(r.region, "region")?;
        ok(self.registry.update_region(region, r.update_mask).await)
    }

    async fn delete_region(
        &self,
        r: Request<pb::DeleteRegionRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = r.into_inner();
        named(&r.name, "name")?;
        ok(self
            .registry
            .delete_region(&r.name, r.revision)
            .await
            .map(|revision| DeleteResponse { revision }))
    }

    async fn list_endpoints(
        &self,
        r: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let r = r.into_inner();
        let snapshot = self.snapshot()?;
        let endpoints = snapshot
            .endpoints
            .values()
            .filter(|e| r.region.is_empty() || e.region == r.region)
            .filter(|e| r.model.is_empty() || e.model == r.model)
            .filter(|e| r.pool.is_empty() || e.pool == r.pool)
            .map(|e| Endpoint {
                load: self.loads.get(&e.id),
                ..e.clone()
            })
            .collect();
        Ok(Response::new(ListEndpointsResponse { endpoints }))
    }

    async fn get_pool_scaling(
        &self,
        r: Request<pb::GetPoolScalingRequest>,
    ) -> Result<Response<pb::PoolScaling>, Status> {
        let r = r.into_inner();
        named(&r.pool, "pool")?;
        let snapshot = self.snapshot()?;
        if !snapshot.pools.contains_key(&r.pool) {
            return Err(Status::not_found(format!("pool {:?} not found", r.pool)));
        }
        let store = self.registry.store();
        let key = store.keys().object(ObjectKind::Scaling, &r.pool);
        let kv = store.get(&key).await.map_err(RegistryError::from)?;
        let kv = kv.ok_or_else(|| {
            Status::unavailable(format!(
                "pool {:?}: the autoscaler has not decided yet (is a control-plane replica leading?); retry",
                r.pool
            ))
        })?;
        Ok(Response::new(decode(&kv).map_err(RegistryError::from)?))
    }

    async fn list_pool_scaling(
        &self,
        _: Request<pb::ListPoolScalingRequest>,
    ) -> Result<Response<pb::ListPoolScalingResponse>, Status> {
        let snapshot = self.snapshot()?;
        let store = self.registry.store();
        let (kvs, _) = store
            .get_prefix(&store.keys().dir(ObjectKind::Scaling))
            .await
            .map_err(RegistryError::from)?;
        let mut pools = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let record: pb::PoolScaling = decode(kv).map_err(RegistryError::from)?;
            if snapshot.pools.contains_key(&record.pool) {
                pools.push(record);
            }
        }
        Ok(Response::new(pb::ListPoolScalingResponse { pools }))
    }

    async fn get_routing_table(
        &self,
        r: Request<pb::GetRoutingTableRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        let r = r.into_inner();
        let role = match SubscriberRole::try_from(r.role) {
            Ok(role @ (SubscriberRole::Edge | SubscriberRole::Sidecar)) => role,
            _ => return Err(Status::invalid_argument("role: must be EDGE or SIDECAR")),
        };
        named(&r.region, "region")?;
        if role == SubscriberRole::Sidecar {
            named(&r.node_id, "node_id")?;
        }
        let snapshot = self.snapshot()?;
        let mut table = tables::build(&snapshot, role, &r.region, &r.node_id);
        for key in &mut table.api_keys {
            *key = redacted(std::mem::take(key));
        }
        Ok(Response::new(table))
    }

    async fn get_fleet_status(
        &self,
        r: Request<pb::GetFleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatus>, Status> {
        self.do_get_fleet_status(r.into_inner())
    }

    async fn list_subscribers(
        &self,
        r: Request<pb::ListSubscribersRequest>,
    ) -> Result<Response<pb::ListSubscribersResponse>, Status> {
        self.do_list_subscribers(r.into_inner())
    }

    async fn explain_route(
        &self,
        r: Request<pb::ExplainRouteRequest>,
    ) -> Result<Response<pb::RouteExplanation>, Status> {
        self.do_explain_route(r.into_inner()).await
    }

    async fn create_tenant(
        &self,
        r: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.do_create_tenant(r.into_inner()).await
    }

    async fn get_tenant(
        &self,
        r: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.do_get_tenant(r.into_inner()).await
    }

    async fn list_tenants(
        &self,
        _: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        self.do_list_tenants().await
    }

    async fn update_tenant(
        &self,
        r: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.do_update_tenant(r.into_inner()).await
    }

    async fn delete_tenant(
        &self,
        r: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.do_delete_tenant(r.into_inner()).await
    }

    async fn create_api_key(
        &self,
        r: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        self.do_create_api_key(r.into_inner()).await
    }

    async fn get_api_key(
        &self,
        r: Request<pb::GetApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        self.do_get_api_key(r.into_inner()).await
    }

    async fn list_api_keys(
        &self,
        r: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.do_list_api_keys(r.into_inner()).await
    }

    async fn update_api_key(
        &self,
        r: Request<pb::UpdateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        self.do_update_api_key(r.into_inner()).await
    }

    async fn revoke_api_key(
        &self,
        r: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        self.do_revoke_api_key(r.into_inner()).await
    }

    async fn delete_api_key(
        &self,
        r: Request<pb::DeleteApiKeyRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.do_delete_api_key(r.into_inner()).await
    }
}
