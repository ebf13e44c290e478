//! Turns a pushed `RoutingTable` into the edge's `EdgeTable`. An object the
//! edge cannot use (an address that does not parse, an unknown routing
//! policy, a name claimed twice, a malformed key) is left out and named in
//! `EdgeTable::skipped`; the rest of the table applies. Refusing the whole
//! table instead would freeze the edge on its last good one: revoked keys
//! kept working and dead replicas kept routed until someone fixed the one
//! object. In-flight counters, health and load samples carry over from one
//! table to the next by endpoint id so a push does not reset them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use http::uri::Authority;
use infermesh_proto::v1::{Endpoint, EndpointState, Model, RoutingPolicy, RoutingTable};
use infermesh_runtime::address;
use infermesh_runtime::discovery::ApplyTable;
use infermesh_runtime::engine_fields::FieldSet;
use infermesh_runtime::tls::{PeerIdentity, PeerRole, mesh::expected_authority};

use super::skips::{ObjectKind, SkipLog};
use super::{
    AdapterRoute, ColdStart, DEFAULT_COLD_START, EdgeTable, ListedModel, LoadSample, ModelRoute,
    PeerEdge, Policy, Upstream,
};
use crate::access::Access;
use crate::health::Health;
use crate::prefix::PrefixIndex;
use crate::route::RoundRobin;

/// What the edge knows of one replica beyond the table: requests in
/// flight, passive health, latest load; kept by endpoint id across pushes.
type ReplicaState = (Arc<AtomicUsize>, Arc<Health>, Arc<LoadSample>);

/// Builds `EdgeTable`s from pushed tables, keeping in-flight counters by endpoint id.
#[derive(Default)]
pub struct EdgeTableBuilder {
    counters: HashMap<String, ReplicaState>,
    prefixes: HashMap<String, Arc<PrefixIndex>>,
    store: Option<crate::table_store::TableStore>,
}

impl EdgeTableBuilder {
    /// A builder that saves every table it accepts to `store`.
    pub fn saving_to(store: crate::table_store::TableStore) -> Self {
        Self {
            store: Some(store),
            ..Self::default()
        }
    }
}

impl ApplyTable for EdgeTableBuilder {
    type Table = EdgeTable;
    type Error = std::convert::Infallible;

    fn apply(&mut self, table: RoutingTable) -> Result<EdgeTable, Self::Error> {
        let saved = self.store.as_ref().map(|_| table.clone());
        let built = self.build(table);
        for skipped in &built.skipped {
            tracing::warn!(%skipped, "routing-table object left out");
        }
        if let (Some(store), Some(table)) = (&self.store, saved)
            && let Err(error) = store.save(&table)
        {
            tracing::warn!(%error, "could not save the routing table to disk");
        }
        Ok(built)
    }
}

impl EdgeTableBuilder {
    /// Builds the edge's view of `table`, leaving out what it cannot use.
    pub fn build(&mut self, table: RoutingTable) -> EdgeTable {
        let mut skips = SkipLog::default();
        let upstreams_by_pool = self.upstreams(&table, &mut skips);
        let mut routes = HashMap::new();
        let mut models = Vec::with_capacity(table.models.len());
        for model in &table.models {
            let Some(policy) = policy(model, &mut skips) else {
                continue;
            };
            let route = self.model_route(&table, model, policy, &upstreams_by_pool);
            let mut aliases = Vec::with_capacity(model.aliases.len());
            for name in std::iter::once(&model.name).chain(&model.aliases) {
                // The first model to claim a name keeps it: the control
                // plane never writes a clash, so one here is an object
                // written around it, and moving a name would be a silent
                // reroute.
                if routes.contains_key(name) {
                    skips.skip(
                        ObjectKind::Alias,
                        name,
                        format_args!("also claimed by model {:?}; kept by the first", model.name),
                    );
                    continue;
                }
                routes.insert(name.clone(), route.clone());
                if name != &model.name {
                    aliases.push(name.clone());
                }
            }
            models.push(ListedModel {
                name: model.name.clone(),
                aliases,
            });
        }
        let access = Access::from_table(
            &table,
            |name| routes.get(name).map(|r| r.model.clone()),
            &mut skips,
        );
        let failover = failover_edges(&table, &mut skips);
        let adapters = adapters(&table, &routes, &mut skips);
        // Skipped models keep their prefix index for when they come back.
        for (model, index) in routes.values().map(|r| (&r.model, &r.prefixes)) {
            self.prefixes.insert(model.clone(), index.clone());
        }
        self.prefixes
            .retain(|model, _| table.models.iter().any(|m| &m.name == model));
        EdgeTable {
            caching: routes
                .values()
                .any(|r: &Arc<ModelRoute>| r.cache.as_ref().is_some_and(|c| c.enabled)),
            routes,
            models,
            region: table.region,
            access,
            failover,
            from_disk: false,
            skipped: skips.0,
            endpoint_ids: table.endpoints.iter().map(|e| e.id.clone()).collect(),
            adapters,
        }
    }

    /// The serving replicas of `table` by pool, carrying over each
    /// endpoint's counters from the last table; keeps the counters of every
    /// usable endpoint, serving or not, for the next one.
    fn upstreams<'t>(
        &mut self,
        table: &'t RoutingTable,
        skips: &mut SkipLog,
    ) -> HashMap<&'t str, Vec<Arc<Upstream>>> {
        let mut upstreams_by_pool: HashMap<&str, Vec<Arc<Upstream>>> = HashMap::new();
        let mut counters = HashMap::new();
        let pools: HashMap<&str, &infermesh_proto::v1::Pool> =
            table.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        for endpoint in &table.endpoints {
            let authority = match address::host_port(&endpoint.address) {
                Ok(authority) => authority,
                Err(error) => {
                    skips.skip(ObjectKind::Endpoint, &endpoint.id, error);
                    continue;
                }
            };
            let mesh_authority = match mesh_authority(table, endpoint, &authority) {
                Ok(mesh_authority) => mesh_authority,
                Err(error) => {
                    skips.skip(
                        ObjectKind::Endpoint,
                        &endpoint.id,
                        format!("cannot name its identity: {error}"),
                    );
                    continue;
                }
            };
            let (in_flight, health, load) =
                self.counters.get(&endpoint.id).cloned().unwrap_or_default();
            counters.insert(
                endpoint.id.clone(),
                (in_flight.clone(), health.clone(), load.clone()),
            );
            let serving = matches!(
                EndpointState::try_from(endpoint.state),
                Ok(EndpointState::Serving | EndpointState::Unspecified)
            );
            if serving {
                upstreams_by_pool
                    .entry(endpoint.pool.as_str())
                    .or_default()
                    .push(Arc::new(Upstream {
                        id: endpoint.id.clone(),
                        pool: endpoint.pool.clone(),
                        authority,
                        mesh_authority: Some(mesh_authority),
                        in_flight,
                        health,
                        load,
                        fingerprint: endpoint.fingerprint.clone(),
                        max_concurrency: pools
                            .get(endpoint.pool.as_str())
                            .map_or(0, |p| p.max_concurrency),
                    }));
            }
        }
        self.counters = counters;
        upstreams_by_pool
    }

    /// The route of `model` over the serving replicas of its pools.
    fn model_route(
        &self,
        table: &RoutingTable,
        model: &Model,
        policy: Policy,
        upstreams_by_pool: &HashMap<&str, Vec<Arc<Upstream>>>,
    ) -> Arc<ModelRoute> {
        let upstreams = table
            .pools
            .iter()
            .filter(|p| p.model == model.name)
            .flat_map(|p| {
                upstreams_by_pool
                    .get(p.name.as_str())
                    .into_iter()
                    .flatten()
                    .cloned()
            })
            .collect();
        let cold_start = table
            .pools
            .iter()
            .find(|p| p.model == model.name && p.scale_to_zero_idle_seconds > 0)
            .map(|p| ColdStart {
                pool: p.name.clone(),
                timeout: match p.cold_start_timeout_seconds {
                    0 => DEFAULT_COLD_START,
                    s => std::time::Duration::from_secs(u64::from(s)),
                },
            });
        Arc::new(ModelRoute {
            model: model.name.clone(),
            policy,
            upstreams,
            cache: model.cache_policy,
            fallbacks: model.fallbacks.clone(),
            prefixes: self.prefixes.get(&model.name).cloned().unwrap_or_default(),
            receipts: model.route_receipts,
            timeouts: model.timeouts,
            price: infermesh_runtime::money::Price::of(model.price.as_ref()),
            engine_fields: FieldSet::of(model.engine_fields.iter().map(String::as_str)),
            cold_start,
            turns: RoundRobin::default(),
        })
    }
}

/// The table's adapters whose base model routes here under its own name
/// and whose name no model claims.
fn adapters(
    table: &RoutingTable,
    routes: &HashMap<String, Arc<ModelRoute>>,
    skips: &mut SkipLog,
) -> HashMap<String, Arc<AdapterRoute>> {
    let mut adapters = HashMap::new();
    for adapter in &table.adapters {
        if routes.contains_key(&adapter.name) {
            skips.skip(
                ObjectKind::Adapter,
                &adapter.name,
                "its name is a model's; the model keeps it",
            );
            continue;
        }
        if routes
            .get(&adapter.base_model)
            .is_none_or(|r| r.model != adapter.base_model)
        {
            skips.skip(
                ObjectKind::Adapter,
                &adapter.name,
                format_args!("base model {:?} is not routed here", adapter.base_model),
            );
            continue;
        }
        adapters.insert(
            adapter.name.clone(),
            Arc::new(AdapterRoute {
                name: adapter.name.clone(),
                base: adapter.base_model.clone(),
                version: adapter.version.clone(),
                owner: (!adapter.owner_tenant.is_empty()).then(|| adapter.owner_tenant.clone()),
                resident: format!("{}@{}", adapter.name, adapter.version),
            }),
        );
    }
    adapters
}

/// Why an endpoint's mesh identity cannot be named.
#[derive(Debug, thiserror::Error)]
enum MeshAuthorityError {
    /// Region, pool or endpoint id do not make a sidecar identity.
    #[error(transparent)]
    Identity(#[from] infermesh_runtime::tls::IdentityError),
    /// The identity does not make an authority.
    #[error(transparent)]
    Authority(#[from] http::uri::InvalidUri),
}

/// The address carrying the identity an endpoint's sidecar certificate
/// must name (its own region, else the table's).
fn mesh_authority(
    table: &RoutingTable,
    endpoint: &Endpoint,
    authority: &Authority,
) -> Result<Authority, MeshAuthorityError> {
    let region = if endpoint.region.is_empty() {
        &table.region
    } else {
        &endpoint.region
    };
    let identity = PeerIdentity::sidecar(
        region.as_str(),
        endpoint.pool.as_str(),
        endpoint.id.as_str(),
    )?;
    Ok(expected_authority(&identity, authority.as_str()).parse::<Authority>()?)
}

/// The model's balancing policy; `None`, with the model skipped, when the
/// edge does not know it.
fn policy(model: &Model, skips: &mut SkipLog) -> Option<Policy> {
    match RoutingPolicy::try_from(model.routing_policy) {
        Ok(RoutingPolicy::RoundRobin) => Some(Policy::RoundRobin),
        Ok(RoutingPolicy::PrefixAffinity) => Some(Policy::PrefixAffinity),
        Ok(RoutingPolicy::LeastLoad) => Some(Policy::LeastLoad),
        Ok(RoutingPolicy::SessionAffinity) => Some(Policy::SessionAffinity),
        Ok(RoutingPolicy::LeastOutstanding | RoutingPolicy::Unspecified) => {
            Some(Policy::LeastOutstanding)
        }
        Err(_) => {
            skips.skip(
                ObjectKind::Model,
                &model.name,
                format_args!("unknown routing policy {}", model.routing_policy),
            );
            None
        }
    }
}

/// The local region's failover order, as edges to forward to; regions
/// without an edge address are passed over, and so are regions whose
/// address this edge cannot use.
fn failover_edges(table: &RoutingTable, skips: &mut SkipLog) -> Vec<PeerEdge> {
    let Some(local) = table.regions.iter().find(|r| r.name == table.region) else {
        return Vec::new();
    };
    let mut peers = Vec::new();
    for name in local.failover.iter().filter(|n| **n != table.region) {
        let Some(region) = table.regions.iter().find(|r| &r.name == name) else {
            continue;
        };
        if region.edge_address.is_empty() {
            continue;
        }
        match address::host_port(&region.edge_address) {
            Ok(authority) => {
                let mesh_authority = PeerIdentity::new(PeerRole::Edge, region.name.as_str())
                    .ok()
                    .and_then(|identity| {
                        expected_authority(&identity, authority.as_str())
                            .parse::<Authority>()
                            .ok()
                    });
                peers.push(PeerEdge {
                    region: region.name.clone(),
                    authority,
                    mesh_authority,
                })
            }
            Err(error) => skips.skip(ObjectKind::Region, &region.name, error),
        }
    }
    peers
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{ApiKey, Endpoint, Model, Pool, Region};
    use std::sync::atomic::Ordering;

    fn table() -> RoutingTable {
        RoutingTable {
            version: 3,
            region: "eu".into(),
            models: vec![
                Model {
                    name: "llama".into(),
                    aliases: vec!["l3".into()],
                    ..Default::default()
                },
                Model {
                    name: "qwen".into(),
                    ..Default::default()
                },
            ],
            pools: vec![Pool {
                name: "llama-eu".into(),
                model: "llama".into(),
                region: "eu".into(),
                ..Default::default()
            }],
            endpoints: ["a", "b"]
                .iter()
                .enumerate()
                .map(|(i, id)| Endpoint {
                    id: id.to_string(),
                    pool: "llama-eu".into(),
                    model: "llama".into(),
                    address: format!("127.0.0.1:{}", 1000 + i),
                    state: EndpointState::Serving as i32,
                    ..Default::default()
                })
                .collect(),
            regions: vec![
                Region {
                    name: "eu".into(),
                    failover: vec!["us".into(), "ap".into()],
                    ..Default::default()
                },
                Region {
                    name: "us".into(),
                    edge_address: "edge-us:8080".into(),
                    ..Default::default()
                },
                Region {
                    name: "ap".into(),
                    edge_address: "edge-ap:8080".into(),
                    ..Default::default()
                },
            ],
            api_keys: vec![ApiKey {
                id: key_id(1),
                tenant: "acme".into(),
                secret_sha256: vec![7; 32],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn key_id(n: u8) -> String {
        format!("{n:0>width$}", width = infermesh_runtime::api_key::ID_LEN)
    }

    fn kinds(t: &EdgeTable) -> Vec<(ObjectKind, &str)> {
        t.skipped
            .iter()
            .map(|s| (s.kind, s.name.as_str()))
            .collect()
    }

    #[test]
    fn a_clean_table_skips_nothing() {
        let t = EdgeTableBuilder::default().build(table());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert_eq!(t.route("l3").unwrap().upstreams.len(), 2);
        assert_eq!(t.failover.len(), 2);
        assert_eq!(t.access.len(), 1);
    }

    #[test]
    fn an_endpoint_with_a_bad_address_is_left_out_and_the_rest_applies() {
        let mut pushed = table();
        pushed.endpoints[0].address = "https://10.0.0.1:8081".into();
        pushed.api_keys.push(ApiKey {
            id: key_id(2),
            tenant: "acme".into(),
            secret_sha256: vec![8; 32],
            ..Default::default()
        });
        let t = EdgeTableBuilder::default().build(pushed);
        assert_eq!(kinds(&t), [(ObjectKind::Endpoint, "a")]);
        assert!(t.skipped[0].reason.contains("scheme"), "{}", t.skipped[0]);
        let ids: Vec<_> = t
            .route("llama")
            .unwrap()
            .upstreams
            .iter()
            .map(|u| u.id.as_str())
            .collect();
        assert_eq!(ids, ["b"]);
        assert_eq!(t.access.len(), 2, "a key added in the same push applies");
    }

    #[test]
    fn a_region_with_a_bad_edge_address_is_not_a_spillover_target() {
        let mut pushed = table();
        pushed.regions[1].edge_address = "https://edge.example.com:443".into();
        let t = EdgeTableBuilder::default().build(pushed);
        assert_eq!(kinds(&t), [(ObjectKind::Region, "us")]);
        let peers: Vec<_> = t.failover.iter().map(|p| p.region.as_str()).collect();
        assert_eq!(
            peers,
            ["ap"],
            "the next region in order still takes spillover"
        );
    }

    #[test]
    fn a_model_with_an_unknown_policy_is_left_out_and_other_models_route() {
        let mut pushed = table();
        pushed.models[0].routing_policy = 99;
        let t = EdgeTableBuilder::default().build(pushed);
        assert_eq!(kinds(&t), [(ObjectKind::Model, "llama")]);
        assert!(t.route("llama").is_none() && t.route("l3").is_none());
        assert!(t.route("qwen").is_some());
    }

    #[test]
    fn a_name_claimed_twice_stays_with_the_first_model() {
        let mut pushed = table();
        pushed.models[1].aliases = vec!["l3".into()];
        let t = EdgeTableBuilder::default().build(pushed);
        assert_eq!(kinds(&t), [(ObjectKind::Alias, "l3")]);
        assert_eq!(t.route("l3").unwrap().model, "llama");
        assert!(t.models[1].aliases.is_empty(), "the clash is not listed");
    }

    #[test]
    fn malformed_and_duplicated_keys_are_left_out_and_others_authenticate() {
        let mut pushed = table();
        let dup = pushed.api_keys[0].clone();
        pushed.api_keys.push(dup);
        pushed.api_keys.push(ApiKey {
            id: key_id(3),
            secret_sha256: vec![1; 5],
            ..Default::default()
        });
        pushed.api_keys.push(ApiKey {
            id: key_id(4),
            secret_sha256: vec![2; 32],
            ..Default::default()
        });
        let t = EdgeTableBuilder::default().build(pushed);
        let mut skipped: Vec<_> = t
            .skipped
            .iter()
            .map(|s| (s.kind, s.name.clone(), s.reason.clone()))
            .collect();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                (ObjectKind::ApiKey, key_id(1), "appears twice".to_string()),
                (ObjectKind::ApiKey, key_id(3), "no SHA-256 hash".to_string()),
            ]
        );
        assert_eq!(t.access.len(), 1, "only k4 is usable");
    }

    #[test]
    fn counters_carry_over_to_the_next_table() {
        let mut builder = EdgeTableBuilder::default();
        let first = builder.build(table());
        first.route("llama").unwrap().upstreams[0]
            .in_flight
            .store(3, Ordering::Relaxed);
        let second = builder.build(table());
        assert_eq!(
            second.route("llama").unwrap().upstreams[0]
                .in_flight
                .load(Ordering::Relaxed),
            3
        );
    }
}
