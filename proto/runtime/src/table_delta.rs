//! Incremental routing-table updates: the change from one table to the
//! next (objects added or changed, keys removed), and that change applied to
//! the older table. Tables list every kind of object ordered by its key
//! (names; ids for endpoints and API keys), so applying a change rebuilds
//! exactly the newer table.

use std::collections::{BTreeMap, HashMap, HashSet};

use infermesh_proto::v1::{
    Adapter, ApiKey, Endpoint, Model, Pool, Region, RoutingTable, TableDelta, Tenant,
};

/// What identifies an object in a table and in the registry (the last
/// segment of its etcd key): names, ids for endpoints and API keys.
pub trait Keyed {
    /// The object's key.
    fn key(&self) -> &str;
}

macro_rules! keyed_by {
    ($field:ident: $($ty:ty),+) => {
        $(impl Keyed for $ty {
            fn key(&self) -> &str {
                &self.$field
            }
        })+
    };
}

keyed_by!(name: Model, Pool, Region, Tenant, Adapter);
keyed_by!(id: Endpoint, ApiKey);

/// The change from `old` to `new`, two tables of one subscriber.
pub fn diff(old: &RoutingTable, new: &RoutingTable) -> TableDelta {
    let (models, removed_models) = changes(&old.models, &new.models);
    let (pools, removed_pools) = changes(&old.pools, &new.pools);
    let (endpoints, removed_endpoints) = changes(&old.endpoints, &new.endpoints);
    let (regions, removed_regions) = changes(&old.regions, &new.regions);
    let (api_keys, removed_api_keys) = changes(&old.api_keys, &new.api_keys);
    let (tenants, removed_tenants) = changes(&old.tenants, &new.tenants);
    let (adapters, removed_adapters) = changes(&old.adapters, &new.adapters);
    TableDelta {
        base_version: old.version,
        version: new.version,
        models,
        pools,
        endpoints,
        regions,
        api_keys,
        tenants,
        removed_models,
        removed_pools,
        removed_endpoints,
        removed_regions,
        removed_api_keys,
        removed_tenants,
        adapters,
        removed_adapters,
    }
}

/// Objects of `new` that `old` lacks or holds differently, and keys of
/// `old` that `new` lacks.
fn changes<T: Keyed + Clone + PartialEq>(old: &[T], new: &[T]) -> (Vec<T>, Vec<String>) {
    let before: HashMap<&str, &T> = old.iter().map(|o| (o.key(), o)).collect();
    let after: HashSet<&str> = new.iter().map(T::key).collect();
    let changed = new
        .iter()
        .filter(|n| before.get(n.key()) != Some(n))
        .cloned()
        .collect();
    let removed = old
        .iter()
        .map(T::key)
        .filter(|k| !after.contains(k))
        .map(str::to_string)
        .collect();
    (changed, removed)
}

/// Why a table change does not apply to the table held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The change was made from another version than the one held.
    #[error("table change from version {from} cannot apply to version {held}")]
    OtherBase {
        /// The version the change was made from.
        from: u64,
        /// The version held.
        held: u64,
    },
    /// The change leads to a version no newer than the one held.
    #[error("table change to version {to} does not follow version {held}")]
    NotNewer {
        /// The version the change leads to.
        to: u64,
        /// The version held.
        held: u64,
    },
}

/// `base` with `delta` applied: the table at `delta.version`. Refused when
/// the delta was not made from `base`'s version.
pub fn apply(base: &RoutingTable, delta: TableDelta) -> Result<RoutingTable, DeltaError> {
    if delta.base_version != base.version {
        return Err(DeltaError::OtherBase {
            from: delta.base_version,
            held: base.version,
        });
    }
    if delta.version <= base.version {
        return Err(DeltaError::NotNewer {
            to: delta.version,
            held: base.version,
        });
    }
    Ok(RoutingTable {
        version: delta.version,
        region: base.region.clone(),
        role: base.role,
        models: merge(&base.models, delta.models, &delta.removed_models),
        pools: merge(&base.pools, delta.pools, &delta.removed_pools),
        endpoints: merge(&base.endpoints, delta.endpoints, &delta.removed_endpoints),
        regions: merge(&base.regions, delta.regions, &delta.removed_regions),
        api_keys: merge(&base.api_keys, delta.api_keys, &delta.removed_api_keys),
        tenants: merge(&base.tenants, delta.tenants, &delta.removed_tenants),
        adapters: merge(&base.adapters, delta.adapters, &delta.removed_adapters),
    })
}

/// `base` without the `removed` keys, with `changed` put in, ordered by key.
fn merge<T: Keyed + Clone>(base: &[T], changed: Vec<T>, removed: &[String]) -> Vec<T> {
    let removed: HashSet<&str> = removed.iter().map(String::as_str).collect();
    let mut by_key: BTreeMap<&str, &T> = base
        .iter()
        .filter(|o| !removed.contains(o.key()))
        .map(|o| (o.key(), o))
        .collect();
    for item in &changed {
        by_key.insert(item.key(), item);
    }
    by_key.into_values().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{
        Adapter, ApiKey, Endpoint, Model, Pool, Region, SubscriberRole, Tenant,
    };
    use prost::Message;

    fn table(version: u64, pools: &[&str], endpoints: &[(&str, &str)]) -> RoutingTable {
        RoutingTable {
            version,
            region: "eu".into(),
            role: SubscriberRole::Edge as i32,
            models: vec![Model {
                name: "llama".into(),
                ..Default::default()
            }],
            pools: pools
                .iter()
                .map(|p| Pool {
                    name: p.to_string(),
                    model: "llama".into(),
                    region: "eu".into(),
                    ..Default::default()
                })
                .collect(),
            endpoints: endpoints
                .iter()
                .map(|(id, address)| Endpoint {
                    id: id.to_string(),
                    pool: "a".into(),
                    address: address.to_string(),
                    ..Default::default()
                })
                .collect(),
            regions: vec![Region {
                name: "eu".into(),
                ..Default::default()
            }],
            api_keys: vec![ApiKey {
                id: "k1".into(),
                tenant: "t".into(),
                ..Default::default()
            }],
            tenants: vec![Tenant {
                name: "t".into(),
                ..Default::default()
            }],
            adapters: Vec::new(),
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed_and_rebuilds_the_new_table() {
        let old = table(
            10,
            &["a", "b", "c"],
            &[("e1", "10.0.0.1:8000"), ("e2", "10.0.0.2:8000")],
        );
        let new = table(
            12,
            &["a", "c", "d"],
            &[
                ("e1", "10.0.0.9:8000"),
                ("e2", "10.0.0.2:8000"),
                ("e3", "10.0.0.3:8000"),
            ],
        );
        let delta = diff(&old, &new);
        assert_eq!((delta.base_version, delta.version), (10, 12));
        let names = |pools: &[Pool]| pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&delta.pools), ["d"]);
        assert_eq!(delta.removed_pools, ["b"]);
        let ids: Vec<_> = delta.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e1", "e3"], "e1 moved, e3 is new, e2 is unchanged");
        assert!(delta.removed_endpoints.is_empty());
        assert!(delta.models.is_empty() && delta.regions.is_empty() && delta.api_keys.is_empty());
        assert_eq!(apply(&old, delta.clone()).unwrap(), new);
        assert!(delta.encoded_len() < new.encoded_len());
    }

    #[test]
    fn every_kind_is_added_changed_and_removed() {
        let old = table(1, &["a"], &[("e1", "x:1")]);
        let mut new = table(2, &["b"], &[("e2", "x:2")]);
        new.models[0].aliases = vec!["l".into()];
        new.regions.push(Region {
            name: "us".into(),
            ..Default::default()
        });
        new.api_keys.clear();
        new.tenants[0].description = "changed".into();
        new.adapters.push(Adapter {
            name: "support-bot".into(),
            base_model: "m".into(),
            ..Default::default()
        });
        let delta = diff(&old, &new);
        assert_eq!(delta.adapters.len(), 1);
        assert_eq!(delta.removed_api_keys, ["k1"]);
        assert_eq!(delta.models.len(), 1);
        assert_eq!(delta.tenants.len(), 1);
        assert_eq!(apply(&old, delta).unwrap(), new);
        // Back again: removals and re-additions in the other direction.
        let back = RoutingTable {
            version: 3,
            ..old.clone()
        };
        assert_eq!(apply(&new, diff(&new, &back)).unwrap(), back);
    }

    #[test]
    fn a_delta_from_another_version_is_refused() {
        let old = table(10, &["a"], &[]);
        let new = table(12, &["a", "b"], &[]);
        let delta = diff(&old, &new);
        let other = table(11, &["a"], &[]);
        let error = apply(&other, delta.clone()).unwrap_err().to_string();
        assert!(
            error.contains("from version 10 cannot apply to version 11"),
            "{error}"
        );
        let stale = TableDelta {
            version: 10,
            ..delta
        };
        assert!(
            apply(&old, stale)
                .unwrap_err()
                .to_string()
                .contains("does not follow")
        );
    }
}
