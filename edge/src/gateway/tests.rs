//! The gateway's stages, driven in-process: a fake upstream as a tower
//! service stands for the replicas, a watch channel for the table.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use infermesh_proto::v1::{
    CachePolicy, Endpoint, EndpointState, Model, Pool, RoutingPolicy, RoutingTable,
};
use infermesh_runtime::discovery::{Applied, ApplyTable};
use infermesh_runtime::http::{Body, full};
use tower::{Service, ServiceExt};

use super::{Gateway, Resilience};
use crate::cache::{CacheConfig, ResponseCache, store::MemoryStore};
use crate::forward::{Deadlines, Forwarder, LocalService};
use crate::health::{EjectionPolicy, RetryBudget};
use crate::metrics::Observer;
use crate::quota::Limiter;
use crate::table::EdgeTableBuilder;

/// What the fake replicas saw: the authority each request went to and its body.
type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A replica's answer to one request.
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    Unavailable,
    Refused,
    /// A path the engine does not serve (FastAPI's 404).
    Missing,
}

/// Replicas answering by port: `answers(port)`.
fn replicas(seen: Seen, answers: fn(u16) -> Answer) -> LocalService {
    let service = tower::service_fn(move |request: Request<Body>| {
        let seen = seen.clone();
        async move {
            let port = request.uri().port_u16().unwrap_or(0);
            let stream = request.headers().get("x-stream").is_some();
            let body = request.into_body().collect().await?.to_bytes();
            let value: serde_json::Value = serde_json::from_slice(&body)?;
            let sse = value["stream"] == true || stream;
            seen.lock().unwrap().push((port.to_string(), value));
            match answers(port) {
                Answer::Refused => Err("connection refused".into()),
                Answer::Missing => Ok(Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("content-type", "application/json")
                    .body(full(r#"{"detail":"Not Found"}"#))?),
                Answer::Unavailable => Ok(Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(full("engine not ready"))?),
                Answer::Ok if sse => Ok(Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(full(concat!(
                        "data: {\"id\":\"c\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"hi\",\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
                        "data: {\"id\":\"c\",\"object\":\"text_completion\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n",
                        "data: [DONE]\n\n"
                    )))?),
                Answer::Ok => Ok(Response::builder()
                    .header("content-type", "application/json")
                    .body(full(format!(
                        r#"{{"id":"c","object":"text_completion","choices":[{{"index":0,"text":"from {port}","finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}}}"#
                    )))?),
            }
        }
    });
    tower::util::BoxCloneSyncService::new(service)
}

fn model(name: &str, alias: &str, policy: RoutingPolicy, cache: bool) -> Model {
    Model {
        name: name.into(),
        aliases: vec![alias.into()],
        routing_policy: policy as i32,
        cache_policy: Some(CachePolicy {
            enabled: cache,
            ..Default::default()
        }),
        route_receipts: true,
        ..Default::default()
    }
}

/// A table serving `models`, each from a pool of replicas on `ports`.
fn table(models: Vec<(Model, &[u16])>) -> Arc<Applied<crate::table::EdgeTable>> {
    let mut table = RoutingTable {
        version: 3,
        region: "eu".into(),
        ..Default::default()
    };
    for (model, ports) in models {
        let pool = format!("{}-eu", model.name);
        table.pools.push(Pool {
            name: pool.clone(),
            model: model.name.clone(),
            region: "eu".into(),
            ..Default::default()
        });
        for port in ports {
            table.endpoints.push(Endpoint {
                id: format!("ep-{port}"),
                pool: pool.clone(),
                model: model.name.clone(),
                address: format!("127.0.0.1:{port}"),
                state: EndpointState::Serving as i32,
                fingerprint: "fp".into(),
                ..Default::default()
            });
        }
        table.models.push(model);
    }
    let table = EdgeTableBuilder::default().apply(table).unwrap();
    Arc::new(Applied { version: 3, table })
}

fn gateway(table: Arc<Applied<crate::table::EdgeTable>>, upstream: LocalService) -> Gateway {
    let (_tx, tables) = tokio::sync::watch::channel(Some(table));
    let deadlines = Deadlines {
        connect: Duration::from_secs(1),
        first_byte: Duration::from_secs(5),
        idle: None,
        total: None,
    };
    let cache = ResponseCache::new(
        Arc::new(MemoryStore::new(1 << 20)),
        CacheConfig {
            default_ttl: Duration::from_secs(60),
            max_entry_bytes: 1 << 20,
            flight_wait: Duration::from_secs(1),
        },
        &prometheus::Registry::new(),
    )
    .unwrap();
    Gateway::new(
        tables,
        Forwarder::local(deadlines, upstream),
        Arc::new(Limiter::new(256)),
        Observer::disabled(),
        Some(cache),
        Resilience {
            budget: Arc::new(RetryBudget::new(1.0, 10)),
            max_retries: 2,
            ejection: EjectionPolicy::default(),
        },
    )
}

async fn send(gateway: &mut Gateway, path: &str, body: &str) -> (Response<Body>, Bytes) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap();
    let response = gateway.ready().await.unwrap().call(request).await.unwrap();
    let (head, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(head, full(bytes.clone())), bytes)
}

async fn complete(gateway: &mut Gateway, body: &str) -> (Response<Body>, Bytes) {
    send(gateway, "/v1/completions", body).await
}

/// A gateway over one model's replicas on `ports`, answering by `answers`.
fn serving(model: Model, ports: &[u16], answers: fn(u16) -> Answer) -> (Gateway, Seen) {
    let seen = Seen::default();
    let gateway = gateway(table(vec![(model, ports)]), replicas(seen.clone(), answers));
    (gateway, seen)
}

fn header<'a>(response: &'a Response<Body>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_request_is_parsed_once_through_cache_prefix_affinity_and_rewrites() {
    let (mut gateway, seen) = serving(
        model("llama", "l3", RoutingPolicy::PrefixAffinity, true),
        &[9001u16, 9002],
        |_| Answer::Ok,
    );
    let before = crate::request::counter::parses();
    let body = r#"{"model":"l3","prompt":"a prompt long enough to fill a block of sixty-four bytes, and then some more","temperature":0,"stream":true,"priority":5}"#;
    let (response, streamed) = complete(&mut gateway, body).await;
    assert_eq!(crate::request::counter::parses() - before, 1);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-infermesh-cache"), Some("miss"));
    let text = String::from_utf8_lossy(&streamed);
    assert!(text.contains("\"text\":\"hi\""), "{text}");
    assert!(
        !text.contains("prompt_tokens"),
        "usage the client did not ask for is stripped: {text}"
    );
    let sent = seen.lock().unwrap()[0].1.clone();
    assert_eq!(sent["model"], "llama", "canonical name sent");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(sent.get("priority").is_none(), "engine field removed");
}

#[tokio::test]
async fn an_identical_deterministic_request_is_answered_from_the_cache() {
    let (mut gateway, seen) = serving(
        model("llama", "l3", RoutingPolicy::LeastOutstanding, true),
        &[9001u16],
        |_| Answer::Ok,
    );
    let body = r#"{"model":"llama","prompt":"p","temperature":0}"#;
    let (first, first_body) = complete(&mut gateway, body).await;
    assert_eq!(header(&first, "x-infermesh-cache"), Some("miss"));
    // The answer is stored by a task of its own once the body has ended;
    // on this single-threaded runtime it runs at the next yield.
    let cache = gateway.cache.clone().unwrap();
    let bytes = Bytes::from(body);
    let parsed = crate::request::parse(crate::openai::Endpoint::Completions, &bytes).unwrap();
    let key = crate::cache::key::key("", "llama", "fp", &parsed.cache_material("llama").unwrap());
    let lookup = crate::cache::Lookup {
        keys: vec![("fp".into(), key)],
        lookup: true,
        store: true,
        ttl: Duration::from_secs(60),
        max_bytes: 1 << 20,
    };
    let mut yields = 0;
    while cache.get(&lookup).await.is_none() {
        assert!(yields < 1000, "the answer was never stored");
        yields += 1;
        tokio::task::yield_now().await;
    }
    let reordered = r#"{ "temperature": 0, "prompt": "p", "model": "l3" }"#;
    let (second, second_body) = complete(&mut gateway, reordered).await;
    assert_eq!(header(&second, "x-infermesh-cache"), Some("hit"));
    assert_eq!(first_body, second_body);
    assert_eq!(seen.lock().unwrap().len(), 1, "the engine answered once");
}

#[tokio::test]
async fn unknown_models_and_bad_bodies_are_refused_before_any_replica() {
    let (mut gateway, seen) = serving(
        model("llama", "l3", RoutingPolicy::RoundRobin, false),
        &[9001u16],
        |_| Answer::Ok,
    );
    let (response, body) = complete(&mut gateway, r#"{"model":"gpt","prompt":"p"}"#).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&body).contains("model_not_found"),
        "{body:?}"
    );
    let (response, body) = complete(&mut gateway, r#"{"model":"llama","prompt":"p","n":0}"#).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["param"], "n");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_replica_is_retried_on_another_and_the_receipt_says_so() {
    let seen = Seen::default();
    let models = vec![(
        model("llama", "l3", RoutingPolicy::RoundRobin, false),
        &[9001u16, 9002][..],
    )];
    let answers = |port| match port {
        9001 => Answer::Unavailable,
        _ => Answer::Ok,
    };
    let mut gateway = gateway(table(models), replicas(seen.clone(), answers));
    let mut retried = 0;
    for _ in 0..4 {
        let (response, body) = complete(&mut gateway, r#"{"model":"llama","prompt":"p"}"#).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("from 9002"));
        let receipt = header(&response, "x-infermesh-route").unwrap_or_default();
        retried += usize::from(receipt.contains("retries=1"));
    }
    let to_9001 = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == "9001")
        .count();
    assert!(to_9001 >= 1, "round robin tried the failing replica");
    assert_eq!(
        retried, to_9001,
        "each failure was retried once, and said so"
    );
}

#[tokio::test]
async fn when_every_replica_refuses_the_client_gets_one_upstream_error() {
    let (mut gateway, seen) = serving(
        model("llama", "l3", RoutingPolicy::LeastOutstanding, false),
        &[9001u16, 9002, 9003, 9004],
        |_| Answer::Refused,
    );
    let (response, body) = complete(&mut gateway, r#"{"model":"llama","prompt":"p"}"#).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{body:?}");
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "the first try and two retries"
    );
}

#[tokio::test]
async fn a_model_without_replicas_is_served_by_its_fallback() {
    let seen = Seen::default();
    let mut big = model("big", "b", RoutingPolicy::LeastOutstanding, false);
    big.fallbacks = vec!["small".into()];
    let models = vec![
        (big, &[][..]),
        (
            model("small", "s", RoutingPolicy::LeastOutstanding, false),
            &[9005u16][..],
        ),
    ];
    let mut gateway = gateway(table(models), replicas(seen.clone(), |_| Answer::Ok));
    let (response, _) = complete(&mut gateway, r#"{"model":"b","prompt":"p"}"#).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-infermesh-fallback"), Some("small"));
    assert_eq!(seen.lock().unwrap()[0].1["model"], "small");
}

#[tokio::test]
async fn other_openai_paths_are_routed_and_a_path_the_engine_lacks_is_named() {
    let (mut gateway, seen) = serving(
        model("rr", "r", RoutingPolicy::LeastOutstanding, false),
        &[9006],
        |_| Answer::Ok,
    );
    let (response, _) = send(
        &mut gateway,
        "/v1/rerank",
        r#"{"model":"r","query":"q","documents":["a","b"]}"#,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.lock().unwrap()[0].1["model"], "rr");
    let (mut gateway, _) = serving(
        model("rr", "r", RoutingPolicy::LeastOutstanding, false),
        &[9006],
        |_| Answer::Missing,
    );
    let (response, body) = send(
        &mut gateway,
        "/v1/messages",
        r#"{"model":"rr","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "endpoint_not_served", "{error}");
}
