//! The registry half of the fleet status: regions, their pools and their
//! endpoints with the latest load, from one snapshot. A pure function of
//! the snapshot, the loads and the time, so it is tested without etcd.
//! Endpoints whose pool or region is not registered are shown under it
//! (marked unregistered) rather than hidden: those are what an operator
//! looks for.

use std::collections::BTreeMap;

use infermesh_proto::v1::{Endpoint, EndpointStatus, Load, PoolStatus, RegionStatus};

use crate::snapshot::Snapshot;

/// Regions by name (only `region`, when set), each with its pools by name
/// and their endpoints by id; `load` gives an endpoint's latest load, aged
/// as of `now` (Unix ms).
pub fn regions(
    snapshot: &Snapshot,
    region: Option<&str>,
    load: impl Fn(&str) -> Option<Load>,
    now: i64,
) -> Vec<RegionStatus> {
    let wanted = |name: &str| region.is_none_or(|r| r == name);
    let mut regions: BTreeMap<&str, RegionStatus> = BTreeMap::new();
    let mut pools: BTreeMap<(&str, &str), PoolStatus> = BTreeMap::new();
    for name in snapshot.regions.keys().filter(|n| wanted(n)) {
        regions.insert(name, region_status(name, true));
    }
    for pool in snapshot.pools.values().filter(|p| wanted(&p.region)) {
        pools.insert(
            (&pool.region, &pool.name),
            PoolStatus {
                name: pool.name.clone(),
                model: pool.model.clone(),
                registered: true,
                endpoints: Vec::new(),
            },
        );
    }
    // The snapshot's endpoints are ordered by id, so each pool's are too.
    for endpoint in snapshot.endpoints.values().filter(|e| wanted(&e.region)) {
        pools
            .entry((&endpoint.region, &endpoint.pool))
            .or_insert_with(|| PoolStatus {
                name: endpoint.pool.clone(),
                model: endpoint.model.clone(),
                registered: false,
                endpoints: Vec::new(),
            })
            .endpoints
            .push(endpoint_status(endpoint, load(&endpoint.id), now));
    }
    for ((region, _), pool) in pools {
        regions
            .entry(region)
            .or_insert_with(|| region_status(region, false))
            .pools
            .push(pool);
    }
    regions.into_values().collect()
}

fn region_status(name: &str, registered: bool) -> RegionStatus {
    RegionStatus {
        name: name.to_string(),
        registered,
        pools: Vec::new(),
    }
}

fn endpoint_status(endpoint: &Endpoint, load: Option<Load>, now: i64) -> EndpointStatus {
    EndpointStatus {
        id: endpoint.id.clone(),
        state: endpoint.state,
        address: endpoint.address.clone(),
        fingerprint: endpoint.fingerprint.clone(),
        zone: endpoint.zone.clone(),
        // A sidecar's clock ahead of ours reads as a fresh report, not a
        // negative age.
        load_age_ms: load
            .as_ref()
            .map(|l| u64::try_from(now.saturating_sub(l.observed_at_unix_ms)).unwrap_or(0)),
        running: load.as_ref().map_or(0, |l| l.running),
        waiting: load.as_ref().map_or(0, |l| l.waiting),
        adapters: load.map(|l| l.adapters).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{EndpointState, Pool, Region};

    fn snapshot() -> Snapshot {
        let mut snapshot = Snapshot {
            revision: 9,
            ..Default::default()
        };
        for name in ["eu-west", "us-east"] {
            snapshot.regions.insert(
                name.into(),
                Region {
                    name: name.into(),
                    ..Default::default()
                },
            );
        }
        for (name, region) in [("llama-eu", "eu-west"), ("llama-us", "us-east")] {
            snapshot.pools.insert(
                name.into(),
                Pool {
                    name: name.into(),
                    model: "llama".into(),
                    region: region.into(),
                    ..Default::default()
                },
            );
        }
        for (id, pool, region) in [
            ("llama-1", "llama-eu", "eu-west"),
            ("llama-0", "llama-eu", "eu-west"),
            ("stray-0", "gone", "eu-west"),
            ("far-0", "far", "ap-south"),
        ] {
            snapshot.endpoints.insert(
                id.into(),
                Endpoint {
                    id: id.into(),
                    pool: pool.into(),
                    model: "llama".into(),
                    region: region.into(),
                    address: format!("{id}:8081"),
                    state: EndpointState::Serving as i32,
                    fingerprint: "fp".into(),
                    ..Default::default()
                },
            );
        }
        snapshot
    }

    fn load(id: &str) -> Option<Load> {
        (id == "llama-0").then_some(Load {
            running: 3,
            waiting: 2,
            observed_at_unix_ms: 10_000,
            ..Default::default()
        })
    }

    #[test]
    fn regions_hold_their_pools_and_endpoints_with_load_aged_now() {
        let regions = regions(&snapshot(), None, load, 10_250);
        let names: Vec<_> = regions
            .iter()
            .map(|r| (r.name.as_str(), r.registered))
            .collect();
        assert_eq!(
            names,
            [("ap-south", false), ("eu-west", true), ("us-east", true)]
        );
        let eu = &regions[1];
        let pools: Vec<_> = eu
            .pools
            .iter()
            .map(|p| (p.name.as_str(), p.registered, p.endpoints.len()))
            .collect();
        assert_eq!(pools, [("gone", false, 1), ("llama-eu", true, 2)]);
        let endpoints = &eu.pools[1].endpoints;
        assert_eq!(endpoints[0].id, "llama-0");
        assert_eq!(endpoints[0].load_age_ms, Some(250));
        assert_eq!((endpoints[0].running, endpoints[0].waiting), (3, 2));
        assert_eq!(endpoints[0].address, "llama-0:8081");
        assert_eq!(endpoints[0].fingerprint, "fp");
        assert_eq!(endpoints[1].load_age_ms, None, "no report yet");
        assert!(regions[2].pools[0].endpoints.is_empty());
    }

    #[test]
    fn a_region_filter_keeps_that_region_alone() {
        let regions = regions(&snapshot(), Some("us-east"), load, 0);
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].pools[0].name, "llama-us");
        assert!(super::regions(&snapshot(), Some("nowhere"), load, 0).is_empty());
    }

    #[test]
    fn a_load_taken_ahead_of_our_clock_is_fresh() {
        let regions = regions(&snapshot(), Some("eu-west"), load, 9_000);
        assert_eq!(regions[0].pools[1].endpoints[0].load_age_ms, Some(0));
    }
}
