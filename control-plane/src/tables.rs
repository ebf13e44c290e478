//! Builds the routing table each subscriber needs from a snapshot. Pure
//! functions of the snapshot, so every control-plane replica that sees the
//! same etcd revision builds the same table, with the revision as version.

use infermesh_proto::v1::{Endpoint, RoutingTable, SubscriberRole};

use crate::snapshot::Snapshot;

/// The table a subscriber of `role` in `region` (`node_id` for sidecars) receives.
pub fn build(
    snapshot: &Snapshot,
    role: SubscriberRole,
    region: &str,
    node_id: &str,
) -> RoutingTable {
    match role {
        SubscriberRole::Sidecar => sidecar_table(snapshot, region, node_id),
        SubscriberRole::Edge | SubscriberRole::Unspecified => edge_table(snapshot, region),
    }
}

/// Endpoints carry no load in pushed tables: load changes every second and
/// is not part of the versioned state (edges learn it in-band).
fn routed(endpoint: &Endpoint) -> Endpoint {
    Endpoint {
        load: None,
        ..endpoint.clone()
    }
}

/// An edge's table: models served anywhere, this region's pools and their endpoints.
pub fn edge_table(snapshot: &Snapshot, region: &str) -> RoutingTable {
    let served: std::collections::BTreeSet<&str> =
        snapshot.pools.values().map(|p| p.model.as_str()).collect();
    let pools: Vec<_> = snapshot
        .pools
        .values()
        .filter(|p| p.region == region && snapshot.models.contains_key(&p.model))
        .cloned()
        .collect();
    let endpoints = snapshot
        .endpoints
        .values()
        .filter(|e| pools.iter().any(|p| p.name == e.pool && p.model == e.model))
        .map(routed)
        .collect();
    RoutingTable {
        version: snapshot.revision.max(0) as u64,
        region: region.to_string(),
        models: snapshot
            .models
            .values()
            .filter(|m| served.contains(m.name.as_str()))
            .cloned()
            .collect(),
        pools,
        endpoints,
        regions: snapshot.regions.values().cloned().collect(),
        role: SubscriberRole::Edge as i32,
        api_keys: snapshot
            .api_keys
            .values()
            .filter(|k| !k.revoked)
            .cloned()
            .collect(),
        tenants: snapshot.tenants.values().cloned().collect(),
        adapters: snapshot
            .adapters
            .values()
            .filter(|a| served.contains(a.base_model.as_str()))
            .cloned()
            .collect(),
    }
}

/// A sidecar's table: its own endpoint as edges see it, its pool and model.
pub fn sidecar_table(snapshot: &Snapshot, region: &str, node_id: &str) -> RoutingTable {
    let endpoint = snapshot.endpoints.get(node_id);
    let pool = endpoint.and_then(|e| snapshot.pools.get(&e.pool));
    let model = pool.and_then(|p| snapshot.models.get(&p.model));
    RoutingTable {
        version: snapshot.revision.max(0) as u64,
        region: region.to_string(),
        models: model.into_iter().cloned().collect(),
        pools: pool.into_iter().cloned().collect(),
        endpoints: endpoint.into_iter().map(routed).collect(),
        regions: snapshot.regions.get(region).into_iter().cloned().collect(),
        role: SubscriberRole::Sidecar as i32,
        api_keys: Vec::new(),
        tenants: Vec::new(),
        adapters: model
            .map(|m| {
                snapshot
                    .adapters
                    .values()
                    .filter(|a| a.base_model == m.name)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{EngineKind, Load, Model, Pool, Region};

    fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            revision: 42,
            ..Default::default()
        };
        for name in ["llama", "qwen", "unserved"] {
            s.models.insert(
                name.into(),
                Model {
                    name: name.into(),
                    ..Default::default()
                },
            );
        }
        for r in ["eu", "us"] {
            s.regions.insert(
                r.into(),
                Region {
                    name: r.into(),
                    ..Default::default()
                },
            );
        }
        let pools = [("llama-eu", "llama", "eu"), ("qwen-us", "qwen", "us")];
        for (name, model, region) in pools {
            s.pools.insert(
                name.into(),
                Pool {
                    name: name.into(),
                    model: model.into(),
                    region: region.into(),
                    engine: EngineKind::Vllm as i32,
                    max_replicas: 1,
                    ..Default::default()
                },
            );
        }
        let endpoints = [
            ("eu-0", "llama-eu", "llama"),
            ("us-0", "qwen-us", "qwen"),
            ("orphan", "gone", "llama"),
            ("mismatch", "llama-eu", "qwen"),
        ];
        for (id, pool, model) in endpoints {
            s.endpoints.insert(
                id.into(),
                Endpoint {
                    id: id.into(),
                    pool: pool.into(),
                    model: model.into(),
                    load: Some(Load {
                        running: 3,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
        }
        s
    }

    #[test]
    fn edge_table_holds_local_pools_their_endpoints_and_every_served_model() {
        let t = edge_table(&snapshot(), "eu");
        assert_eq!(t.version, 42);
        let models: Vec<_> = t.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(models, ["llama", "qwen"], "unserved models are left out");
        let pools: Vec<_> = t.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(pools, ["llama-eu"]);
        let endpoints: Vec<_> = t.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            endpoints,
            ["eu-0"],
            "orphans and model mismatches are left out"
        );
        assert!(t.endpoints.iter().all(|e| e.load.is_none()));
        assert_eq!(t.regions.len(), 2);
    }

    #[test]
    fn sidecar_table_holds_only_its_own_endpoint() {
        let t = sidecar_table(&snapshot(), "us", "us-0");
        assert_eq!(t.endpoints.len(), 1);
        assert_eq!(t.endpoints[0].id, "us-0");
        assert_eq!(t.pools[0].name, "qwen-us");
        assert_eq!(t.models[0].name, "qwen");
        let unknown = sidecar_table(&snapshot(), "us", "nobody");
        assert!(unknown.endpoints.is_empty() && unknown.pools.is_empty());
    }

    #[test]
    fn same_snapshot_builds_the_same_table() {
        let s = snapshot();
        assert_eq!(edge_table(&s, "eu"), edge_table(&s, "eu"));
    }
}
