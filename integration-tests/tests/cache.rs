//! The response cache through real edges: hits, misses and bypasses,
//! streams replayed from a cached answer and answers cached from a stream,
//! tenant isolation, TTL expiry, collapsed identical misses, and a Redis
//! cache shared by two edges that survives Redis being killed mid-test.

use std::time::Duration;

use http::Method;
use infermesh_integration_tests::client::{Http, Reply};
use infermesh_integration_tests::mesh::{Edge, Mesh, Replica};
use infermesh_integration_tests::redis::Redis;
use infermesh_integration_tests::wait;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(20);

async fn post(http: &Http, edge: &Edge, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let reply = http
        .send(
            Method::POST,
            &format!("{}/v1/chat/completions", edge.url),
            Some(body.to_string().into()),
            &all,
        )
        .await
        .expect("the edge answers");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
}

/// The first answer to `body` with a key just made: sent until the edge
/// knows the key.
async fn first_answer(http: &Http, url: &str, body: &str) -> Reply {
    wait::until("the edge to know the new key", DEADLINE, || async {
        let reply = http
            .send(
                Method::POST,
                url,
                Some(body.to_string().into()),
                &[("content-type", "application/json")],
            )
            .await
            .ok()?;
        (reply.status != 401).then_some(reply)
    })
    .await
}

fn outcome(reply: &Reply) -> &str {
    reply
        .headers
        .get("x-infermesh-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("absent")
}

/// Requests the engine of `replica` has finished, from its vLLM metrics.
async fn engine_requests(mesh: &Mesh, replica: &Replica) -> f64 {
    let text = mesh
        .http
        .get(&format!("{}/metrics", replica.engine_url))
        .await
        .unwrap()
        .text();
    text.lines()
        .filter(|l| l.starts_with("vllm:request_success_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The assistant text of a JSON answer or of an SSE stream.
fn content(reply: &Reply) -> String {
    let text = reply.text();
    if !text.starts_with("data:") {
        return reply.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
    }
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

async fn cached_model(mesh: &Mesh, model: &str, ttl_seconds: u32) {
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": model, "aliases": [format!("{model}-alias")],
            "cache_policy": {"enabled": true, "ttl_seconds": ttl_seconds}}}),
    )
    .await
    .expect("create model with a cache policy");
    mesh.register("eu-west", model, &format!("{model}-eu"))
        .await;
}

#[tokio::test]
async fn deterministic_requests_hit_per_tenant_in_either_form_until_their_ttl() {
    let mesh = Mesh::start().await;
    cached_model(&mesh, "llama", 300).await;
    cached_model(&mesh, "short", 1).await;
    let replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let _short = mesh
        .start_replica("short-0", "short-eu", "short", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": "llama", "messages": [{"role": "user", "content": "probe"}], "temperature": 0.9});
    mesh.wait_until_served(&url, &probe).await;
    let http = &mesh.http;

    let body = r#"{"model":"llama","messages":[{"role":"user","content":"what is a mesh?"}],"temperature":0,"max_tokens":6}"#;
    let first = post(http, &edge, body, &[]).await;
    assert_eq!(outcome(&first), "miss");
    let served = engine_requests(&mesh, &replica).await;

    // Same request, other key order, spacing and an alias: a hit, engine untouched.
    let same = r#"{ "max_tokens": 6, "temperature": 0, "model": "llama-alias",
                    "messages": [ { "content": "what is a mesh?", "role": "user" } ] }"#;
    let second = post(http, &edge, same, &[]).await;
    assert_eq!(outcome(&second), "hit");
    assert_eq!(second.body, first.body);
    assert_eq!(engine_requests(&mesh, &replica).await, served);

    // Asked as a stream, the cached answer is replayed as SSE.
    let stream = r#"{"model":"llama","messages":[{"role":"user","content":"what is a mesh?"}],"temperature":0,"max_tokens":6,"stream":true}"#;
    let replayed = post(http, &edge, stream, &[]).await;
    assert_eq!(outcome(&replayed), "hit");
    assert!(
        replayed.text().ends_with("data: [DONE]\n\n"),
        "{}",
        replayed.text()
    );
    assert!(
        !replayed.text().contains("\"usage\""),
        "usage only when asked for"
    );
    assert_eq!(content(&replayed), content(&first));
    let with_usage = r#"{"model":"llama","messages":[{"role":"user","content":"what is a mesh?"}],"temperature":0,"max_tokens":6,"stream":true,"stream_options":{"include_usage":true}}"#;
    let replayed = post(http, &edge, with_usage, &[]).await;
    let usage_line = replayed
        .text()
        .split("\n\n")
        .find(|e| e.contains("\"usage\""))
        .map(String::from)
        .expect("a usage chunk");
    let usage: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["usage"], first.json()["usage"]);
    assert_eq!(engine_requests(&mesh, &replica).await, served);

    // The client can refuse the cache; sampling requests are never cached.
    let refused = post(http, &edge, body, &[("cache-control", "no-cache")]).await;
    assert_eq!(outcome(&refused), "bypass");
    let sampled = r#"{"model":"llama","messages":[{"role":"user","content":"what is a mesh?"}],"temperature":0.7,"max_tokens":6}"#;
    assert_eq!(outcome(&post(http, &edge, sampled, &[]).await), "bypass");
    assert_eq!(engine_requests(&mesh, &replica).await, served + 2.0);

    // Another tenant never sees this tenant's answer.
    let other = Http::with_key(&mesh.create_key("globex", json!({})).await);
    let theirs = post(&other, &edge, body, &[]).await;
    assert_eq!(outcome(&theirs), "miss");
    assert_eq!(engine_requests(&mesh, &replica).await, served + 3.0);
    assert_eq!(outcome(&post(&other, &edge, body, &[]).await), "hit");

    // Nor does a tenant made again under a deleted tenant's name: tenants
    // are told apart by their immutable id.
    let first = mesh
        .admin("CreateTenant", json!({"tenant": {"name": "initech"}}))
        .await
        .unwrap();
    let first_id = first["id"].as_str().expect("a tenant id").to_string();
    let before = Http::with_key(&mesh.create_key("initech", json!({})).await);
    assert_eq!(outcome(&first_answer(&before, &url, body).await), "miss");
    // Stored as the answer ends, which may be just after the client has it.
    wait::until(
        "the first initech's answer to be stored",
        DEADLINE,
        || async { (outcome(&post(&before, &edge, body, &[]).await) == "hit").then_some(()) },
    )
    .await;
    mesh.admin(
        "DeleteTenant",
        json!({"name": "initech", "revision": first["revision"]}),
    )
    .await
    .unwrap();
    let again = mesh
        .admin("CreateTenant", json!({"tenant": {"name": "initech"}}))
        .await
        .unwrap();
    assert_ne!(again["id"], first_id.as_str(), "{again}");
    let after = Http::with_key(&mesh.create_key("initech", json!({})).await);
    let fresh = first_answer(&after, &url, body).await;
    assert_eq!(
        outcome(&fresh),
        "miss",
        "the new initech saw the old one's answer"
    );
    let changed = mesh
        .admin(
            "UpdateTenant",
            json!({"tenant": {"name": "initech", "id": first_id, "revision": again["revision"]}}),
        )
        .await
        .unwrap_err();
    assert_eq!(changed.code, "InvalidArgument", "{changed:?}");

    // Hits count against request limits but not token limits: a key whose
    // token budget is spent still gets its cached answers.
    let budget = Http::with_key(
        &mesh
            .create_key("frugal", json!({"limits": {"tokens_per_minute": 40}}))
            .await,
    );
    let cached = r#"{"model":"llama","messages":[{"role":"user","content":"budget"}],"temperature":0,"max_tokens":6}"#;
    assert_eq!(outcome(&post(&budget, &edge, cached, &[]).await), "miss");
    let spent = wait::until("the token budget to run out", DEADLINE, || async {
        let reply = budget
            .send(
                Method::POST,
                &url,
                Some(sampled.to_string().into()),
                &[("content-type", "application/json")],
            )
            .await
            .ok()?;
        (reply.status == 429).then_some(reply)
    })
    .await;
    assert_eq!(spent.json()["error"]["type"], "tokens");
    let hit = post(&budget, &edge, cached, &[]).await;
    assert_eq!(outcome(&hit), "hit");

    // A streamed answer is stored, and served to a non-streamed request.
    let fresh_stream = r#"{"model":"llama","messages":[{"role":"user","content":"stream me"}],"temperature":0,"max_tokens":5,"stream":true}"#;
    let streamed = post(http, &edge, fresh_stream, &[]).await;
    assert_eq!(outcome(&streamed), "miss");
    let fresh_json = r#"{"model":"llama","messages":[{"role":"user","content":"stream me"}],"temperature":0,"max_tokens":5}"#;
    let from_stream = wait::until("the streamed answer to be stored", DEADLINE, || async {
        let reply = post(http, &edge, fresh_json, &[]).await;
        (outcome(&reply) == "hit").then_some(reply)
    })
    .await;
    assert_eq!(content(&from_stream), content(&streamed));
    assert_eq!(from_stream.json()["object"], "chat.completion");

    // Entries expire with their model's TTL.
    let short = r#"{"model":"short","messages":[{"role":"user","content":"soon gone"}],"temperature":0,"max_tokens":3}"#;
    assert_eq!(outcome(&post(http, &edge, short, &[]).await), "miss");
    // Stored as the answer ends; on a loaded machine the next request may
    // come first (or after the second), so wait for a hit.
    wait::until("the 1 s entry to be stored", DEADLINE, || async {
        (outcome(&post(http, &edge, short, &[]).await) == "hit").then_some(())
    })
    .await;
    wait::until("the 1 s entry to expire", DEADLINE, || async {
        (outcome(&post(http, &edge, short, &[]).await) == "miss").then_some(())
    })
    .await;
}

#[tokio::test]
async fn identical_concurrent_misses_reach_the_engine_once() {
    let mesh = Mesh::start().await;
    cached_model(&mesh, "llama", 300).await;
    let replica = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--decode-ms-per-token", "40"],
        )
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": "llama", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 1});
    mesh.wait_until_served(&url, &probe).await;
    let before = engine_requests(&mesh, &replica).await;

    let body = r#"{"model":"llama","messages":[{"role":"user","content":"all at once"}],"temperature":0,"max_tokens":10}"#;
    let requests = (0..6).map(|_| post(&mesh.http, &edge, body, &[]));
    let replies = futures_util::future::join_all(requests).await;
    let misses = replies.iter().filter(|r| outcome(r) == "miss").count();
    let hits = replies.iter().filter(|r| outcome(r) == "hit").count();
    assert_eq!(
        (misses, hits),
        (1, 5),
        "one request leads, the rest wait for it"
    );
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(engine_requests(&mesh, &replica).await, before + 1.0);
}

#[tokio::test]
async fn a_redis_cache_is_shared_by_edges_and_outlives_redis_being_killed() {
    let mesh = Mesh::start().await;
    let mut redis = Redis::start(mesh.dir.path()).await;
    cached_model(&mesh, "llama", 300).await;
    let replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let flags = ["--cache", "redis", "--cache-redis-url", redis.url.as_str()];
    let first_edge = mesh.start_edge("eu-west", &flags).await;
    let second_edge = mesh.start_edge("eu-west", &flags).await;
    for edge in [&first_edge, &second_edge] {
        let url = format!("{}/v1/chat/completions", edge.url);
        let probe = json!({"model": "llama", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 1});
        mesh.wait_until_served(&url, &probe).await;
    }
    let http = &mesh.http;

    let body = r#"{"model":"llama","messages":[{"role":"user","content":"shared"}],"temperature":0,"max_tokens":4}"#;
    let first = post(http, &first_edge, body, &[]).await;
    assert_eq!(outcome(&first), "miss");
    let shared = wait::until("the answer to reach Redis", DEADLINE, || async {
        let reply = post(http, &second_edge, body, &[]).await;
        (outcome(&reply) == "hit").then_some(reply)
    })
    .await;
    assert_eq!(shared.body, first.body);

    // Redis dies: requests are still answered (by the engine), errors counted.
    // Each asks something else: an identical request sent right after the
    // last could join that one's fill while it still tries Redis.
    redis.kill().await;
    let served = engine_requests(&mesh, &replica).await;
    for i in 0..3 {
        let other = body.replace("shared", &format!("while redis is down {i}"));
        let reply = post(http, &first_edge, &other, &[]).await;
        assert_eq!(outcome(&reply), "miss");
    }
    assert_eq!(engine_requests(&mesh, &replica).await, served + 3.0);
    let metrics = http.get(&first_edge.metrics_url).await.unwrap().text();
    let errors: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("infermesh_edge_cache_errors_total") && l.contains("backend=\"redis\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 3.0, "{metrics}");

    // Redis comes back (empty): the cache fills and hits again by itself.
    redis.restart().await;
    wait::until("the cache to work again", DEADLINE, || async {
        let reply = post(http, &first_edge, body, &[]).await;
        (outcome(&reply) == "hit").then_some(())
    })
    .await;
}
