//! Overshoot under concurrency: 1,000 streams at once through three edges
//! in two regions, attached to two control-plane replicas: half with a key
//! under a daily token limit, half with the keys of a tenant under a daily
//! spend budget. Some streams are cut by their client after the first
//! event, some ask for two choices. What the clients were served stays
//! within each limit plus one request's reservation per edge, and the
//! spend the control planes recorded stays within the budget likewise.

use std::time::Duration;

use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::client::{Http, open_post};
use infermesh_integration_tests::mesh::{Edge, Mesh};
use infermesh_integration_tests::{scrape, wait};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);
const STREAMS: usize = 1000;
/// The limited key's tokens per day.
const TOKEN_LIMIT: u64 = 3000;
/// The tenant's spend per day, in currency units.
const BUDGET: f64 = 3.0;
/// Completion tokens asked for per choice.
const MAX_TOKENS: u64 = 16;
/// Price per 1k prompt and completion tokens.
const INPUT_PER_1K: f64 = 0.1;
const OUTPUT_PER_1K: f64 = 1.0;

fn body(choices: u64) -> Value {
    json!({
        "model": "llama",
        "messages": [{"role": "user", "content": "tell me about the mesh"}],
        "max_tokens": MAX_TOKENS,
        "n": choices,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// What one stream was served: prompt and completion tokens, or a refusal.
#[derive(Debug)]
enum Outcome {
    Served {
        prompt: u64,
        completion: u64,
    },
    /// Cut by its client after `events` content events.
    Cut {
        events: u64,
    },
    Refused(String),
}

/// Streams one request; `cut` hangs up after the first event arrives.
async fn one(edge: String, key: String, choices: u64, cut: bool) -> Outcome {
    if cut {
        return cut_after_first_event(&edge, &key, &body(choices).to_string()).await;
    }
    let streamed = Http::with_key(&key)
        .post_stream(&format!("{edge}/v1/chat/completions"), &body(choices))
        .await
        .expect("edge answers");
    if streamed.status != 200 {
        let text: Vec<u8> = streamed
            .frames
            .iter()
            .flat_map(|(_, b)| b.to_vec())
            .collect();
        let error: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
        return Outcome::Refused(format!(
            "{} {}",
            streamed.status,
            error["error"]["code"].as_str().unwrap_or("?")
        ));
    }
    let usage = streamed
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("a usage chunk");
    Outcome::Served {
        prompt: usage["prompt_tokens"].as_u64().unwrap(),
        completion: usage["completion_tokens"].as_u64().unwrap(),
    }
}

async fn cut_after_first_event(edge: &str, key: &str, body: &str) -> Outcome {
    use tokio::io::AsyncReadExt;
    let mut socket = open_post(edge, "/v1/chat/completions", key, body).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).to_string();
        if let Some(status) = text.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3))
            && status != "200"
            && text.contains("\r\n\r\n{")
        {
            let code = text
                .split("\"code\":\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("?");
            return Outcome::Refused(format!("{status} {code}"));
        }
        let events = text.matches("data: {").count() as u64;
        if events > 0 {
            return Outcome::Cut { events };
        }
        let n = tokio::time::timeout(DEADLINE, socket.read(&mut buf))
            .await
            .expect("the first event in time")
            .expect("read");
        assert!(n > 0, "closed early: {text}");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// The cost of `prompt` and `completion` tokens, in currency units.
fn cost(prompt: u64, completion: u64) -> f64 {
    (prompt as f64 * INPUT_PER_1K + completion as f64 * OUTPUT_PER_1K) / 1000.0
}

/// Waits until `key` is served by every edge.
async fn served_everywhere(key: &str, edges: &[Edge]) {
    for edge in edges {
        wait::until("the key served", DEADLINE, || async {
            matches!(
                one(edge.url.clone(), key.to_string(), 1, false).await,
                Outcome::Served { .. }
            )
            .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_thousand_concurrent_streams_overshoot_neither_a_token_limit_nor_a_spend_budget() {
    let mut mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    mesh.register("us-east", "llama", "llama-us").await;
    let model = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .unwrap();
    mesh.admin(
        "UpdateModel",
        json!({"model": {"name": "llama", "revision": model["revision"],
            "price": {"input_per_1k": INPUT_PER_1K.to_string(),
                      "output_per_1k": OUTPUT_PER_1K.to_string()}}}),
    )
    .await
    .expect("a priced model");
    mesh.admin(
        "CreateTenant",
        json!({"tenant": {"name": "acme", "limits": {"spend_per_day": BUDGET.to_string()}}}),
    )
    .await
    .expect("a tenant with a budget");
    let fast = ["--decode-ms-per-token", "1"];
    let _eu = mesh
        .start_replica("llama-eu-0", "llama-eu", "llama", "eu-west", &fast)
        .await;
    let _us = mesh
        .start_replica("llama-us-0", "llama-us", "llama", "us-east", &fast)
        .await;
    // Two edges on the first replica, one on a second.
    let second = format!("127.0.0.1:{}", free_port());
    let second_metrics = format!("127.0.0.1:{}", free_port());
    let _cp = mesh.spawn_control_plane("control-plane-b", &second, &second_metrics);
    let eu_a = mesh.start_edge("eu-west", &[]).await;
    let us = mesh.start_edge("us-east", &[]).await;
    let original = std::mem::replace(&mut mesh.control_plane_address, second);
    let eu_b = mesh.start_edge("eu-west", &[]).await;
    mesh.control_plane_address = original;
    let edges = [eu_a, eu_b, us];
    // Both replicas hold their parts of the shared limits (the leader's
    // records name them with their edges) before any traffic.
    let control_planes = [
        mesh.control_plane_metrics_url.clone(),
        format!("http://{second_metrics}/metrics"),
    ];
    for metrics in &control_planes {
        wait::until("the replica's quota parts", DEADLINE, || async {
            let text = mesh.http.get(metrics).await.ok()?.text();
            let part = scrape::value(&text, "infermesh_control_plane_quota_default_part", &[])?;
            (part > 0.0).then_some(())
        })
        .await;
    }

    let limited = mesh
        .create_key("solo", json!({"limits": {"tokens_per_day": TOKEN_LIMIT}}))
        .await;
    let budgeted = mesh.create_key("acme", json!({})).await;
    served_everywhere(&limited, &edges).await;
    served_everywhere(&budgeted, &edges).await;
    // The warm-up answers count: three per key, and one more here.
    let warm_up = match one(edges[0].url.clone(), budgeted.clone(), 1, false).await {
        Outcome::Served { prompt, completion } => (prompt, completion),
        other => panic!("{other:?}"),
    };
    let (mut limited_tokens, mut spent) = (
        3 * (warm_up.0 + warm_up.1),
        4.0 * cost(warm_up.0, warm_up.1),
    );

    // The thousand at once, then smaller waves until both limits refuse
    // a whole wave: reservations of the first wave that settled lower
    // (cut streams, the prompt estimate) are used by later ones.
    let (mut served, mut cut) = (0, 0);
    let mut refused = std::collections::HashMap::new();
    let mut wave = STREAMS;
    let mut refused_waves = 0;
    for round in 0..20 {
        let calls: Vec<_> = (0..wave)
            .map(|i| {
                let edge = edges[i % 3].url.clone();
                let key = if i % 2 == 0 { &limited } else { &budgeted }.clone();
                let choices = if i % 7 == 3 { 2 } else { 1 };
                let cut = i % 10 == 5;
                (key == limited, tokio::spawn(one(edge, key, choices, cut)))
            })
            .collect();
        let mut admitted = 0;
        for (is_limited, call) in calls {
            let (tokens, charge) = match call.await.unwrap() {
                Outcome::Served { prompt, completion } => {
                    served += 1;
                    admitted += 1;
                    (prompt + completion, cost(prompt, completion))
                }
                Outcome::Cut { events } => {
                    cut += 1;
                    admitted += 1;
                    // Its prompt is the warm-up's; each event carried a token.
                    (warm_up.0 + events, cost(warm_up.0, events))
                }
                Outcome::Refused(why) => {
                    *refused.entry(why).or_insert(0) += 1;
                    (0, 0.0)
                }
            };
            if is_limited {
                limited_tokens += tokens;
            } else {
                spent += charge;
            }
        }
        eprintln!("wave {round}: {wave} streams, {admitted} admitted");
        // A wave admitting nothing ends it, once the replicas have read
        // two more parts records since (refunds and moved demand are in
        // the shares by then) and the next wave admits nothing either.
        refused_waves = if admitted == 0 { refused_waves + 1 } else { 0 };
        if refused_waves == 2 {
            break;
        }
        if admitted == 0 {
            for metrics in &control_planes {
                let revision = |text: &str| {
                    scrape::value(
                        text,
                        "infermesh_control_plane_quota_parts_records_total",
                        &[],
                    )
                };
                let text = mesh.http.get(metrics).await.unwrap().text();
                let seen = revision(&text).unwrap_or(0.0);
                wait::until("two more parts records", DEADLINE, || async {
                    let text = mesh.http.get(metrics).await.ok()?.text();
                    let now = revision(&text)?;
                    (now >= seen + 2.0).then_some(())
                })
                .await;
            }
        }
        wave = 60;
    }
    eprintln!(
        "served {served}, cut {cut}, refused {refused:?}; limited key {limited_tokens} tokens of {TOKEN_LIMIT}, tenant spent {spent:.4} of {BUDGET}"
    );
    // Both limits refused requests: each was reached.
    assert!(
        refused.contains_key("429 insufficient_quota"),
        "{refused:?}"
    );
    // Both were used for the most part before the refusals ended it: the
    // rest is reservations of cut streams that settled lower while the
    // burst ran, and shares on edges the last waves did not reach.
    assert!(
        limited_tokens * 4 >= TOKEN_LIMIT * 3,
        "the token limit was used: {limited_tokens} of {TOKEN_LIMIT}, {refused:?}"
    );
    assert!(
        spent * 4.0 >= BUDGET * 3.0,
        "the budget was used: {spent} of {BUDGET}, {refused:?}"
    );
    // Only limits refuse; a replica overrun by the burst on a small
    // machine may be ejected for a moment, and that is not a limit.
    let other: Vec<_> = refused
        .keys()
        .filter(|k| {
            !matches!(
                k.as_str(),
                "429 insufficient_quota" | "503 no_healthy_replica"
            )
        })
        .collect();
    assert!(other.is_empty(), "{refused:?}");
    // One request's reservation: its prompt and every choice's output bound.
    let reservation_tokens = warm_up.0 + 2 * MAX_TOKENS;
    let reservation_cost = cost(warm_up.0, 2 * MAX_TOKENS);
    assert!(
        limited_tokens <= TOKEN_LIMIT + 3 * reservation_tokens,
        "the key was served {limited_tokens} tokens against a limit of {TOKEN_LIMIT}"
    );
    assert!(
        spent <= BUDGET + 3.0 * reservation_cost,
        "the tenant was served {spent:.4} against a budget of {BUDGET}"
    );
    // The control planes' own record of the spend: at least what the
    // clients received (a cut stream is charged what the edge forwarded),
    // and within the budget likewise.
    let recorded = wait::until("the spend written", DEADLINE, || async {
        let (recorded, _) = mesh.budget("tenant/acme/spd").await?;
        (recorded >= spent - 1e-6).then_some(recorded)
    })
    .await;
    assert!(
        recorded <= BUDGET + 3.0 * reservation_cost,
        "recorded {recorded} against a budget of {BUDGET}"
    );
}
