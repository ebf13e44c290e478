//! Flow control through the real processes: a model with a queue deadline,
//! one engine that runs one request at a time (its pool's concurrency
//! bound). While it runs one, a sheddable key's request is refused at once
//! with 503 and Retry-After, while a standard key's requests wait at the
//! edge for their turn, one at a time, and are all served; streams held
//! past the keep-alive interval get SSE comments until their turn.

use std::time::Duration;

use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::{scrape, wait};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn when_the_engine_is_full_sheddable_requests_are_shed_and_the_rest_wait_their_turn() {
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "llama", "timeouts": {"queue_ms": 20000}}}),
    )
    .await
    .expect("create model");
    mesh.admin(
        "CreateRegion",
        json!({"region": {"name": "eu-west", "zones": ["eu-west-a"]}}),
    )
    .await
    .expect("create region");
    mesh.admin(
        "CreatePool",
        json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west",
            "engine": "VLLM", "min_replicas": 1, "max_replicas": 1, "max_concurrency": 1}}),
    )
    .await
    .expect("create pool");
    let _replica = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--max-num-seqs", "1", "--decode-ms-per-token", "15"],
        )
        .await;
    // Streams held at the edge past 300 ms get keep-alive comments.
    let edge = mesh
        .start_edge("eu-west", &["--sse-keepalive-ms", "300"])
        .await;
    let standard = mesh.create_key("steady", json!({})).await;
    let sheddable = mesh
        .create_key("batch", json!({"priority": "SHEDDABLE"}))
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": "llama", "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]});
    for key in [&standard, &sheddable] {
        wait::until("the key at the edge", DEADLINE, || async {
            (Http::with_key(key)
                .post_json(&url, &probe)
                .await
                .ok()?
                .status
                == 200)
                .then_some(())
        })
        .await;
    }

    // Streams the engine runs one at a time: the rest wait in it, and the
    // sidecar says so on every answer's first byte.
    let long = json!({"model": "llama", "max_tokens": 40, "stream": true,
        "messages": [{"role": "user", "content": "a long story"}]});
    let mut streams = Vec::new();
    for _ in 0..6 {
        let (http, url, body) = (Http::with_key(&standard), url.clone(), long.clone());
        streams.push(tokio::spawn(
            async move { http.post_stream(&url, &body).await },
        ));
    }
    wait::until("requests to wait at the edge", DEADLINE, || async {
        let metrics = mesh.http.get(&edge.metrics_url).await.ok()?.text();
        let depth = scrape::value(
            &metrics,
            "infermesh_edge_queue_depth",
            &[("band", "standard")],
        )?;
        (depth >= 1.0).then_some(())
    })
    .await;

    let shed = Http::with_key(&sheddable)
        .post_json(&url, &probe)
        .await
        .unwrap();
    assert_eq!(shed.status, 503, "{}", shed.text());
    assert_eq!(
        shed.json()["error"]["code"],
        "overloaded",
        "{}",
        shed.text()
    );
    assert!(shed.headers.contains_key("retry-after"));

    let mut kept_alive = 0;
    for stream in streams {
        let streamed = stream.await.unwrap().unwrap();
        assert_eq!(streamed.status, 200);
        assert_eq!(streamed.events().last().map(String::as_str), Some("[DONE]"));
        let first = streamed.frames.first().map(|(_, b)| b.clone()).unwrap();
        if first.starts_with(b": waiting\n\n") {
            kept_alive += 1;
            let events = streamed.events();
            assert!(
                events.iter().all(|e| !e.contains("\"error\"")),
                "a kept-alive stream carries the engine's chunks: {events:?}"
            );
        }
    }
    // The last streams wait well over a second for the five ahead of them.
    assert!(
        kept_alive >= 1,
        "no stream waited past 300 ms with keep-alives"
    );
    let metrics = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    let shed_count = scrape::value(
        &metrics,
        "infermesh_edge_shed_total",
        &[("band", "sheddable"), ("reason", "sheddable")],
    );
    assert_eq!(shed_count, Some(1.0), "{metrics}");
    let waited = scrape::value(
        &metrics,
        "infermesh_edge_queue_wait_seconds_count",
        &[("band", "standard")],
    );
    assert!(
        waited.unwrap_or(0.0) >= 1.0,
        "standard requests waited at the edge: {waited:?}"
    );
}
