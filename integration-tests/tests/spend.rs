//! Spend budgets through the real processes: a model priced and a
//! tenant's daily budget set with grpcurl (bad amounts refused, naming the
//! field), requests admitted until the budget is spent and then refused
//! with 429 `insufficient_quota` and Retry-After, the spend shown in fleet
//! status and kept in etcd across a control-plane restart.

use std::time::Duration;

use http::Method;
use infermesh_integration_tests::client::{Http, Reply};
use infermesh_integration_tests::mesh::{Edge, Mesh};
use infermesh_integration_tests::wait;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(20);

/// A request of a few prompt tokens asking for up to 20 completion tokens.
fn chat() -> Value {
    json!({
        "model": "llama",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 20,
    })
}

async fn post(http: &Http, edge: &Edge) -> Reply {
    http.send(
        Method::POST,
        &format!("{}/v1/chat/completions", edge.url),
        Some(bytes::Bytes::from(chat().to_string())),
        &[],
    )
    .await
    .expect("edge answers")
}

/// The tenant's daily budget as fleet status shows it: (spent, remaining).
async fn budget(mesh: &Mesh) -> Option<(f64, f64)> {
    mesh.budget("tenant/acme/spd").await
}

#[tokio::test]
async fn a_spend_budget_holds_shows_in_fleet_status_and_survives_a_control_plane_restart() {
    let mut mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;

    // Bad amounts are refused, naming the field, and nothing is written.
    let model = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .unwrap();
    let bad_price = mesh
        .admin(
            "UpdateModel",
            json!({"model": {"name": "llama", "revision": model["revision"],
                "price": {"input_per_1k": "0.5", "output_per_1k": "1,5"}}}),
        )
        .await
        .unwrap_err();
    assert_eq!(bad_price.code, "InvalidArgument", "{bad_price:?}");
    assert!(
        bad_price.message.contains("model.price.output_per_1k"),
        "{bad_price:?}"
    );
    let bad_budget = mesh
        .admin(
            "CreateTenant",
            json!({"tenant": {"name": "acme", "limits": {"spend_per_day": "-3"}}}),
        )
        .await
        .unwrap_err();
    assert_eq!(bad_budget.code, "InvalidArgument", "{bad_budget:?}");
    assert!(
        bad_budget.message.contains("tenant.limits.spend_per_day"),
        "{bad_budget:?}"
    );
    assert!(
        mesh.admin("GetTenant", json!({"name": "acme"}))
            .await
            .is_err(),
        "a refused tenant is not half-written"
    );

    // 0.1 per 1k prompt tokens, 1 per 1k completion tokens: a request
    // reserves about 0.02 for its 20 completion tokens; the tenant may
    // spend 0.1 a day.
    mesh.admin(
        "UpdateModel",
        json!({"model": {"name": "llama", "revision": model["revision"],
            "price": {"input_per_1k": "0.1", "output_per_1k": "1"}}}),
    )
    .await
    .expect("a priced model");
    mesh.admin(
        "CreateTenant",
        json!({"tenant": {"name": "acme", "limits": {"spend_per_day": "0.1"}}}),
    )
    .await
    .expect("a tenant with a budget");
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let secret = mesh.create_key("acme", json!({})).await;
    let http = Http::with_key(&secret);

    wait::until("the model served", DEADLINE, || async {
        (post(&http, &edge).await.status == 200).then_some(())
    })
    .await;
    let mut served = 1;
    let mut refused = None;
    for _ in 0..20 {
        let reply = post(&http, &edge).await;
        match reply.status {
            200 => {
                served += 1;
                assert!(
                    reply
                        .headers
                        .contains_key("x-ratelimit-remaining-spend-day"),
                    "{:?}",
                    reply.headers
                );
            }
            429 => {
                refused = Some(reply);
                break;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    let refused = refused.expect("refused once the budget is spent");
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "insufficient_quota", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Spend budget of 0.10 per day exhausted for tenant acme"),
        "{error}"
    );
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 0 && retry <= 24 * 3600,
        "until UTC midnight: {retry}"
    );
    // Each request used its prompt and 20 completion tokens (about 0.02):
    // four or five fit in 0.1, never more.
    assert!((3..=5).contains(&served), "served {served}");

    // Fleet status shows what etcd holds: all but less than one request.
    let (spent, remaining) = wait::until("the spend in fleet status", DEADLINE, || async {
        budget(&mesh).await.filter(|(spent, _)| *spent >= 0.075)
    })
    .await;
    assert!(spent <= 0.1 + 1e-9, "spent {spent} of 0.1");
    assert!(
        (spent + remaining - 0.1).abs() < 1e-9,
        "{spent} + {remaining}"
    );

    // A restarted control plane reads the spend back from etcd: the edge
    // still refuses, and fleet status shows the same spend.
    mesh.kill_control_plane().await;
    mesh.start_control_plane().await;
    let again = wait::until("the spend read back", DEADLINE, || async {
        budget(&mesh).await.filter(|(s, _)| *s > 0.0)
    })
    .await;
    assert_eq!(again.0, spent, "the same spend after the restart");
    let after = post(&http, &edge).await;
    assert_eq!(after.status, 429, "{}", after.text());
    let metrics = http.get(&edge.metrics_url).await.unwrap().text();
    let spend_line = metrics
        .lines()
        .find(|l| l.starts_with(r#"infermesh_edge_spend_micros_total{model="llama",tenant="acme""#))
        .unwrap_or_else(|| panic!("spend is counted by model and tenant: {metrics}"));
    let counted: f64 = spend_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (counted / 1e6 - spent).abs() < 1e-6,
        "the edge counted {counted} micro-units, etcd holds {spent}"
    );
}
