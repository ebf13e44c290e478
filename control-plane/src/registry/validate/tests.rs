use super::*;
use infermesh_proto::v1::{CachePolicy, ScalingTargets};

fn field_of(result: Result<(), RegistryError>) -> String {
    match result {
        Err(RegistryError::Invalid { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

fn good_pool() -> Pool {
    Pool {
        name: "llama-eu".into(),
        model: "meta-llama/Llama-3.1-8B".into(),
        region: "eu-west".into(),
        engine: EngineKind::Vllm as i32,
        min_replicas: 1,
        max_replicas: 4,
        ..Default::default()
    }
}

#[test]
fn a_well_formed_pool_model_and_region_pass() {
    pool(&good_pool()).unwrap();
    model(&Model {
        name: "meta-llama/Llama-3.1-8B-Instruct".into(),
        aliases: vec!["llama".into()],
        fallbacks: vec!["small".into()],
        ..Default::default()
    })
    .unwrap();
    region(&Region {
        name: "eu-west".into(),
        zones: vec!["eu-west-1a".into()],
        failover: vec!["us-east".into()],
        edge_address: "edge.eu.example.com:443".into(),
        revision: 0,
    })
    .unwrap();
}

#[test]
fn pool_errors_name_the_field() {
    let mut p = good_pool();
    p.max_replicas = 0;
    assert_eq!(field_of(pool(&p)), "pool.max_replicas");
    let mut p = good_pool();
    p.min_replicas = 9;
    assert_eq!(field_of(pool(&p)), "pool.min_replicas");
    let mut p = good_pool();
    p.engine = 0;
    assert_eq!(field_of(pool(&p)), "pool.engine");
    let mut p = good_pool();
    p.name = "Bad_Name".into();
    assert_eq!(field_of(pool(&p)), "pool.name");
    let mut p = good_pool();
    p.scaling_targets = Some(ScalingTargets {
        kv_cache_usage: 1.5,
        ..Default::default()
    });
    assert_eq!(field_of(pool(&p)), "pool.scaling_targets.kv_cache_usage");
    let mut p = good_pool();
    p.scaling_targets = Some(ScalingTargets {
        waiting_per_replica: f64::NAN,
        ..Default::default()
    });
    assert_eq!(
        field_of(pool(&p)),
        "pool.scaling_targets.waiting_per_replica"
    );
}

#[test]
fn autoscaling_settings_are_checked_field_by_field() {
    use infermesh_proto::v1::{ReplicaFloor, ScaleTarget, ScalingBehavior};
    let window = |start: &str, end: &str, min: u32| ReplicaFloor {
        start: start.into(),
        end: end.into(),
        days: vec![DayOfWeek::Monday as i32],
        min_replicas: min,
    };
    let mut p = good_pool();
    p.time_zone = "Europe/Paris".into();
    p.floors = vec![window("00:00", "08:00", 1), window("22:00", "02:00", 4)];
    p.behavior = Some(ScalingBehavior {
        scale_up_stabilization_seconds: Some(0),
        scale_down_stabilization_seconds: Some(600),
    });
    p.scale_to_zero_idle_seconds = 900;
    p.scale_target = Some(ScaleTarget {
        namespace: "gpu".into(),
        kind: "Deployment".into(),
        name: "llama-8b".into(),
    });
    assert!(pool(&p).is_ok(), "{:?}", pool(&p));
    type Change = Box<dyn Fn(&mut Pool)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|p| p.time_zone = "Moon/Base".into()),
            "pool.time_zone",
        ),
        (
            Box::new(|p| p.floors[1].start = "25:00".into()),
            "pool.floors[1].start",
        ),
        (
            Box::new(|p| p.floors[0].end = "8am".into()),
            "pool.floors[0].end",
        ),
        (
            Box::new(|p| p.floors[0].days = vec![9]),
            "pool.floors[0].days",
        ),
        (
            Box::new(|p| p.floors[0].days = vec![0]),
            "pool.floors[0].days",
        ),
        (
            Box::new(|p| p.floors[1].min_replicas = 5),
            "pool.floors[1].min_replicas",
        ),
        (
            Box::new(|p| {
                p.behavior = Some(ScalingBehavior {
                    scale_up_stabilization_seconds: Some(7200),
                    scale_down_stabilization_seconds: None,
                })
            }),
            "pool.behavior.scale_up_stabilization_seconds",
        ),
        (
            Box::new(|p| p.cold_start_timeout_seconds = 901),
            "pool.cold_start_timeout_seconds",
        ),
        (
            Box::new(|p| p.scale_to_zero_idle_seconds = 700_000),
            "pool.scale_to_zero_idle_seconds",
        ),
        (
            Box::new(|p| p.scale_target.as_mut().unwrap().kind = "DaemonSet".into()),
            "pool.scale_target.kind",
        ),
        (
            Box::new(|p| p.scale_target.as_mut().unwrap().name = "Llama".into()),
            "pool.scale_target.name",
        ),
        (
            Box::new(|p| p.scale_target.as_mut().unwrap().namespace = String::new()),
            "pool.scale_target.namespace",
        ),
    ];
    for (change, field) in cases {
        let mut bad = p.clone();
        change(&mut bad);
        assert_eq!(field_of(pool(&bad)), field);
    }
}

#[test]
fn model_errors_name_the_field() {
    let base = Model {
        name: "m".into(),
        ..Default::default()
    };
    assert_eq!(
        field_of(model(&Model {
            name: String::new(),
            ..base.clone()
        })),
        "model.name"
    );
    assert_eq!(
        field_of(model(&Model {
            name: "has space".into(),
            ..base.clone()
        })),
        "model.name"
    );
    assert_eq!(
        field_of(model(&Model {
            aliases: vec!["a".into(), "m".into()],
            ..base.clone()
        })),
        "model.aliases[1]"
    );
    assert_eq!(
        field_of(model(&Model {
            aliases: vec!["a".into(), "a".into()],
            ..base.clone()
        })),
        "model.aliases"
    );
    assert_eq!(
        field_of(model(&Model {
            routing_policy: 42,
            ..base.clone()
        })),
        "model.routing_policy"
    );
    assert_eq!(
        field_of(model(&Model {
            fallbacks: vec!["m".into()],
            ..base.clone()
        })),
        "model.fallbacks[0]"
    );
    assert_eq!(
        field_of(model(&Model {
            cache_policy: Some(CachePolicy {
                enabled: true,
                ttl_seconds: u32::MAX,
                ..Default::default()
            }),
            ..base.clone()
        })),
        "model.cache_policy.ttl_seconds"
    );
    assert_eq!(
        field_of(model(&Model {
            cache_policy: Some(CachePolicy {
                enabled: true,
                max_entry_bytes: u32::MAX,
                ..Default::default()
            }),
            ..base
        })),
        "model.cache_policy.max_entry_bytes"
    );
}

#[test]
fn region_errors_name_the_field() {
    let base = Region {
        name: "eu".into(),
        ..Default::default()
    };
    assert_eq!(
        field_of(region(&Region {
            failover: vec!["eu".into()],
            ..base.clone()
        })),
        "region.failover[0]"
    );
    assert_eq!(
        field_of(region(&Region {
            zones: vec!["A".into()],
            ..base.clone()
        })),
        "region.zones[0]"
    );
    for bad in ["no-port", "https://edge.example.com:443"] {
        assert_eq!(
            field_of(region(&Region {
                edge_address: bad.into(),
                ..base.clone()
            })),
            "region.edge_address",
            "{bad}"
        );
    }
}

#[test]
fn addresses_and_endpoint_ids() {
    host_port("a", "127.0.0.1:8080").unwrap();
    host_port("a", "[::1]:8080").unwrap();
    host_port("a", "pod.ns.svc:80").unwrap();
    assert!(host_port("a", "127.0.0.1:0").is_err());
    assert!(host_port("a", "::1:80").is_err());
    assert!(host_port("a", ":80").is_err());
    endpoint_id("id", "vllm-0.llama").unwrap();
    assert!(endpoint_id("id", "Pod_1").is_err());
    assert!(endpoint_id("id", "a..b").is_err());
}
