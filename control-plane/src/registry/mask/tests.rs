use std::collections::BTreeSet;

use infermesh_proto::v1::{ReplicaFloor, RoutingPolicy};
use prost::Message;
use prost_types::{FileDescriptorSet, field_descriptor_proto::Label, field_descriptor_proto::Type};

use super::*;

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// `sent` applied to `stored` under `paths` (none: the implicit mask).
fn merged<T: Object + Masked>(stored: &T, sent: &T, paths: &[&str]) -> Result<T, RegistryError> {
    let paths = if paths.is_empty() { None } else { mask(paths) };
    UpdateMask::parse(paths)?.apply(stored, sent)
}

/// The refusal of a mask naming `paths`, which must be about `update_mask`.
fn refusal<T: Object + Masked>(paths: &[&str]) -> String {
    match UpdateMask::<T>::parse(mask(paths)) {
        Err(RegistryError::Invalid { field, message }) => {
            assert_eq!(field, "update_mask", "{message}");
            message
        }
        Err(other) => panic!("{paths:?}: expected a mask refusal, got {other:?}"),
        Ok(_) => panic!("{paths:?}: the mask was accepted"),
    }
}

fn stored_model() -> Model {
    Model {
        name: "llama".into(),
        aliases: vec!["l3".into()],
        routing_policy: RoutingPolicy::PrefixAffinity as i32,
        cache_policy: Some(CachePolicy {
            enabled: true,
            ttl_seconds: 600,
            ..Default::default()
        }),
        fallbacks: vec!["small".into()],
        description: "v1".into(),
        timeouts: Some(ModelTimeouts {
            idle_ms: 5000,
            ..Default::default()
        }),
        revision: 7,
        ..Default::default()
    }
}

#[test]
fn a_model_mask_with_one_field_writes_only_that_field() {
    let sent = Model {
        name: "llama".into(),
        description: "v2".into(),
        fallbacks: vec!["other".into()],
        revision: 7,
        ..Default::default()
    };
    let next = merged(&stored_model(), &sent, &["description"]).unwrap();
    assert_eq!(
        next,
        Model {
            description: "v2".into(),
            ..stored_model()
        }
    );
}

#[test]
fn a_model_field_named_but_absent_is_cleared() {
    let sent = Model {
        name: "llama".into(),
        revision: 7,
        ..Default::default()
    };
    let next = merged(&stored_model(), &sent, &["fallbacks", "timeouts"]).unwrap();
    assert!(next.fallbacks.is_empty());
    assert_eq!(next.timeouts, None);
    assert_eq!(next.aliases, ["l3"]);
    assert_eq!(next.cache_policy, stored_model().cache_policy);
}

#[test]
fn a_model_path_into_a_message_changes_one_field_of_it() {
    let sent = Model {
        cache_policy: Some(CachePolicy {
            ttl_seconds: 60,
            ..Default::default()
        }),
        ..Default::default()
    };
    let next = merged(&stored_model(), &sent, &["cache_policy.ttl_seconds"]).unwrap();
    let cache = next.cache_policy.unwrap();
    assert!(cache.enabled, "the policy's other fields are kept");
    assert_eq!(cache.ttl_seconds, 60);
    // Named but absent: the one field is cleared, the message kept.
    let next = merged(&stored_model(), &Model::default(), &["timeouts.idle_ms"]).unwrap();
    assert_eq!(next.timeouts, Some(ModelTimeouts::default()));
}

#[test]
fn a_model_without_a_mask_keeps_every_field_the_request_leaves_empty() {
    let sent = Model {
        name: "llama".into(),
        description: "v2".into(),
        cache_policy: Some(CachePolicy {
            ttl_seconds: 60,
            ..Default::default()
        }),
        revision: 7,
        ..Default::default()
    };
    let next = merged(&stored_model(), &sent, &[]).unwrap();
    let mut expected = stored_model();
    expected.description = "v2".into();
    expected.cache_policy.as_mut().unwrap().ttl_seconds = 60;
    assert_eq!(next, expected);
    // An empty mask is no mask.
    let empty = UpdateMask::parse(Some(FieldMask::default())).unwrap();
    assert_eq!(empty.apply(&stored_model(), &sent).unwrap(), expected);
    // The whole object as read writes what it holds and changes nothing else.
    let mut whole = stored_model();
    whole.routing_policy = RoutingPolicy::RoundRobin as i32;
    assert_eq!(merged(&stored_model(), &whole, &[]).unwrap(), whole);
}

#[test]
fn a_model_mask_refuses_unknown_immutable_and_server_paths() {
    let unknown = refusal::<Model>(&["description", "fallback"]);
    assert!(
        unknown.contains("\"fallback\" is not a field of model"),
        "{unknown}"
    );
    assert!(unknown.contains("fallbacks"), "lists the fields: {unknown}");
    let nested = refusal::<Model>(&["cache_policy.ttl"]);
    assert!(
        nested.contains("\"cache_policy.ttl\" is not a field of model.cache_policy"),
        "{nested}"
    );
    let name = refusal::<Model>(&["name"]);
    assert!(name.contains("\"name\" cannot be changed"), "{name}");
    let revision = refusal::<Model>(&["revision"]);
    assert!(
        revision.contains("\"revision\" is set by the server"),
        "{revision}"
    );
    let into_scalar = refusal::<Model>(&["description.text"]);
    assert!(
        into_scalar.contains("\"description.text\""),
        "{into_scalar}"
    );
    let empty = refusal::<Model>(&[""]);
    assert!(empty.contains("\"\" is not a field"), "{empty}");
}

fn stored_pool() -> Pool {
    Pool {
        name: "llama-eu".into(),
        model: "llama".into(),
        region: "eu-west".into(),
        engine: 1,
        min_replicas: 2,
        max_replicas: 8,
        scaling_targets: Some(ScalingTargets {
            waiting_per_replica: 2.0,
            kv_cache_usage: 0.8,
            ..Default::default()
        }),
        floors: vec![ReplicaFloor {
            start: "00:00".into(),
            end: "08:00".into(),
            min_replicas: 1,
            ..Default::default()
        }],
        time_zone: "Europe/Paris".into(),
        behavior: Some(ScalingBehavior {
            scale_up_stabilization_seconds: Some(30),
            scale_down_stabilization_seconds: Some(600),
        }),
        revision: 9,
        ..Default::default()
    }
}

#[test]
fn a_pool_mask_writes_named_fields_and_clears_absent_ones() {
    let sent = Pool {
        name: "llama-eu".into(),
        max_replicas: 12,
        min_replicas: 5,
        ..Default::default()
    };
    let next = merged(&stored_pool(), &sent, &["max_replicas"]).unwrap();
    assert_eq!(
        next,
        Pool {
            max_replicas: 12,
            ..stored_pool()
        }
    );
    let next = merged(&stored_pool(), &sent, &["floors", "scaling_targets"]).unwrap();
    assert!(next.floors.is_empty());
    assert_eq!(next.scaling_targets, None);
    assert_eq!(next.min_replicas, 2);
    let next = merged(&stored_pool(), &sent, &["scaling_targets.kv_cache_usage"]).unwrap();
    let targets = next.scaling_targets.unwrap();
    assert_eq!(targets.kv_cache_usage, 0.0);
    assert_eq!(targets.waiting_per_replica, 2.0);
}

#[test]
fn a_pool_without_a_mask_keeps_what_the_request_leaves_empty() {
    let sent = Pool {
        name: "llama-eu".into(),
        max_replicas: 12,
        // Set to zero: an optional field's presence counts as set.
        behavior: Some(ScalingBehavior {
            scale_up_stabilization_seconds: Some(0),
            scale_down_stabilization_seconds: None,
        }),
        ..Default::default()
    };
    let next = merged(&stored_pool(), &sent, &[]).unwrap();
    let mut expected = stored_pool();
    expected.max_replicas = 12;
    expected.behavior = Some(ScalingBehavior {
        scale_up_stabilization_seconds: Some(0),
        scale_down_stabilization_seconds: Some(600),
    });
    assert_eq!(next, expected);
}

#[test]
fn a_pool_mask_refuses_unknown_and_immutable_paths() {
    let unknown = refusal::<Pool>(&["replicas"]);
    assert!(
        unknown.contains("\"replicas\" is not a field of pool"),
        "{unknown}"
    );
    let name = refusal::<Pool>(&["name"]);
    assert!(name.contains("\"name\" cannot be changed"), "{name}");
    let repeated = refusal::<Pool>(&["floors.start"]);
    assert!(repeated.contains("name it whole"), "{repeated}");
}

fn stored_region() -> Region {
    Region {
        name: "eu-west".into(),
        zones: vec!["eu-west-1a".into()],
        failover: vec!["us-east".into()],
        edge_address: "edge-eu:8080".into(),
        revision: 3,
    }
}

#[test]
fn a_region_mask_writes_named_fields_and_clears_absent_ones() {
    let sent = Region {
        name: "eu-west".into(),
        edge_address: "edge-eu:9090".into(),
        zones: vec!["eu-west-1b".into()],
        ..Default::default()
    };
    let next = merged(&stored_region(), &sent, &["edge_address"]).unwrap();
    assert_eq!(
        next,
        Region {
            edge_address: "edge-eu:9090".into(),
            ..stored_region()
        }
    );
    let next = merged(&stored_region(), &sent, &["failover"]).unwrap();
    assert!(next.failover.is_empty());
    assert_eq!(next.zones, ["eu-west-1a"]);
}

#[test]
fn a_region_without_a_mask_keeps_what_the_request_leaves_empty() {
    let sent = Region {
        name: "eu-west".into(),
        zones: vec!["eu-west-1b".into()],
        revision: 3,
        ..Default::default()
    };
    let next = merged(&stored_region(), &sent, &[]).unwrap();
    assert_eq!(
        next,
        Region {
            zones: vec!["eu-west-1b".into()],
            ..stored_region()
        }
    );
}

#[test]
fn a_region_mask_refuses_unknown_and_immutable_paths() {
    let unknown = refusal::<Region>(&["edgeAddress"]);
    assert!(
        unknown.contains("\"edgeAddress\" is not a field of region"),
        "{unknown}"
    );
    let name = refusal::<Region>(&["name"]);
    assert!(name.contains("\"name\" cannot be changed"), "{name}");
}

fn stored_tenant() -> Tenant {
    Tenant {
        name: "acme".into(),
        limits: Some(RateLimits {
            requests_per_minute: 600,
            tokens_per_day: 1_000_000,
            ..Default::default()
        }),
        description: "the acme team".into(),
        id: "abcdefgh1234".into(),
        priority: infermesh_proto::v1::Priority::Critical as i32,
        revision: 4,
    }
}

#[test]
fn a_tenant_mask_writes_named_fields_and_clears_absent_ones() {
    let sent = Tenant {
        name: "acme".into(),
        description: "renamed".into(),
        limits: Some(RateLimits {
            tokens_per_day: 5,
            ..Default::default()
        }),
        ..Default::default()
    };
    let next = merged(&stored_tenant(), &sent, &["description"]).unwrap();
    assert_eq!(
        next,
        Tenant {
            description: "renamed".into(),
            ..stored_tenant()
        }
    );
    let next = merged(&stored_tenant(), &sent, &["limits.tokens_per_day"]).unwrap();
    let limits = next.limits.unwrap();
    assert_eq!(limits.tokens_per_day, 5);
    assert_eq!(limits.requests_per_minute, 600);
    let next = merged(&stored_tenant(), &Tenant::default(), &["limits"]).unwrap();
    assert_eq!(next.limits, None);
    assert_eq!(next.id, "abcdefgh1234");
}

#[test]
fn a_tenant_without_a_mask_keeps_its_id_and_refuses_another() {
    let sent = Tenant {
        name: "acme".into(),
        description: "renamed".into(),
        revision: 4,
        ..Default::default()
    };
    let next = merged(&stored_tenant(), &sent, &[]).unwrap();
    assert_eq!(
        next,
        Tenant {
            description: "renamed".into(),
            ..stored_tenant()
        }
    );
    // The id as read may be sent back; another may not.
    merged(&stored_tenant(), &stored_tenant(), &[]).unwrap();
    let other = Tenant {
        id: "zzzzzzzzzzzz".into(),
        ..sent
    };
    match merged(&stored_tenant(), &other, &[]) {
        Err(RegistryError::Invalid { field, message }) => {
            assert_eq!(field, "tenant.id");
            assert!(message.contains("abcdefgh1234"), "{message}");
        }
        other => panic!("expected tenant.id refused, got {other:?}"),
    }
}

#[test]
fn a_tenant_mask_refuses_unknown_and_immutable_paths() {
    let unknown = refusal::<Tenant>(&["limits.requests_per_hour"]);
    assert!(
        unknown.contains("\"limits.requests_per_hour\" is not a field of tenant.limits"),
        "{unknown}"
    );
    for immutable in ["id", "name"] {
        let refused = refusal::<Tenant>(&[immutable]);
        assert!(refused.contains("cannot be changed"), "{refused}");
    }
}

fn stored_key() -> ApiKey {
    ApiKey {
        id: "abcdefgh1234".into(),
        tenant: "acme".into(),
        name: "ci".into(),
        secret_sha256: vec![7; 32],
        allowed_models: vec!["llama".into()],
        limits: Some(RateLimits {
            requests_per_minute: 60,
            ..Default::default()
        }),
        created_at_unix_ms: 1_000,
        expires_at_unix_ms: 9_000_000_000_000,
        tenant_id: "tenant000001".into(),
        revision: 5,
        ..Default::default()
    }
}

#[test]
fn an_api_key_mask_writes_named_fields_and_clears_absent_ones() {
    let sent = ApiKey {
        id: "abcdefgh1234".into(),
        name: "nightly".into(),
        revision: 5,
        ..Default::default()
    };
    let next = merged(&stored_key(), &sent, &["name"]).unwrap();
    assert_eq!(
        next,
        ApiKey {
            name: "nightly".into(),
            ..stored_key()
        }
    );
    let next = merged(
        &stored_key(),
        &sent,
        &["allowed_models", "expires_at_unix_ms"],
    )
    .unwrap();
    assert!(next.allowed_models.is_empty());
    assert_eq!(next.expires_at_unix_ms, 0);
    assert_eq!(next.name, "ci");
    assert_eq!(next.secret_sha256, stored_key().secret_sha256);
}

#[test]
fn an_api_key_without_a_mask_keeps_its_limits_and_expiry() {
    let sent = ApiKey {
        id: "abcdefgh1234".into(),
        name: "nightly".into(),
        revision: 5,
        ..Default::default()
    };
    let next = merged(&stored_key(), &sent, &[]).unwrap();
    assert_eq!(
        next,
        ApiKey {
            name: "nightly".into(),
            ..stored_key()
        }
    );
}

#[test]
fn an_api_key_mask_refuses_unknown_immutable_and_server_paths() {
    let unknown = refusal::<ApiKey>(&["models"]);
    assert!(
        unknown.contains("\"models\" is not a field of API key"),
        "{unknown}"
    );
    assert!(
        unknown.contains("name, allowed_models, limits, expires_at_unix_ms"),
        "{unknown}"
    );
    for immutable in ["id", "tenant"] {
        let refused = refusal::<ApiKey>(&[immutable]);
        assert!(refused.contains("cannot be changed"), "{refused}");
    }
    for server in ["revoked", "secret_sha256", "tenant_id", "revision"] {
        let refused = refusal::<ApiKey>(&[server]);
        assert!(refused.contains("is set by the server"), "{refused}");
    }
}

/// Every table lists exactly its message's fields, in proto order, and goes
/// into exactly its singular message fields.
#[test]
fn every_table_matches_its_message_in_the_proto() {
    fn check<T: Masked>(message: &str, set: &FileDescriptorSet) {
        let descriptor = set
            .file
            .iter()
            .filter(|f| f.package() == "infermesh.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == message)
            .unwrap_or_else(|| panic!("no message {message}"));
        let proto: Vec<&str> = descriptor.field.iter().map(|f| f.name()).collect();
        let table: Vec<&str> = T::FIELDS.iter().map(|f| f.name).collect();
        assert_eq!(table, proto, "{message}");
        let nested: BTreeSet<&str> = descriptor
            .field
            .iter()
            .filter(|f| f.r#type() == Type::Message && f.label() != Label::Repeated)
            .map(|f| f.name())
            .collect();
        let goes_into: BTreeSet<&str> = T::FIELDS
            .iter()
            .filter(|f| matches!(f.rule, Rule::Message { .. }))
            .map(|f| f.name)
            .collect();
        assert_eq!(goes_into, nested, "{message}");
    }
    let set = FileDescriptorSet::decode(infermesh_proto::FILE_DESCRIPTOR_SET).unwrap();
    check::<Model>("Model", &set);
    check::<CachePolicy>("CachePolicy", &set);
    check::<ModelTimeouts>("ModelTimeouts", &set);
    check::<Pool>("Pool", &set);
    check::<ScalingTargets>("ScalingTargets", &set);
    check::<ScalingBehavior>("ScalingBehavior", &set);
    check::<ScaleTarget>("ScaleTarget", &set);
    check::<Region>("Region", &set);
    check::<Tenant>("Tenant", &set);
    check::<RateLimits>("RateLimits", &set);
    check::<ApiKey>("ApiKey", &set);
}
