//! The edge's refusals through the real processes: every one in OpenAI's
//! error shape with the status clients expect.

use std::time::Duration;

use http::Method;
use infermesh_integration_tests::client::Reply;
use infermesh_integration_tests::mesh::{Edge, Mesh};
use infermesh_integration_tests::wait;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(20);

fn assert_openai_error(reply: &Reply, status: u16, code: Option<&str>) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    if let Some(code) = code {
        assert_eq!(error["code"], code, "{body}");
    }
    assert_eq!(reply.headers["content-type"], "application/json");
}

async fn until_model_listed(mesh: &Mesh, edge: &Edge, model: &str) {
    wait::until(&format!("{model} listed"), DEADLINE, || async {
        mesh.edge_models(edge)
            .await
            .contains(&model.to_string())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn malformed_unknown_oversized_and_unroutable_requests_get_openai_errors() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let edge = mesh
        .start_edge("eu-west", &["--max-body-bytes", "2048"])
        .await;
    until_model_listed(&mesh, &edge, "llama").await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let send = |body: &str| {
        mesh.http.send(
            Method::POST,
            &url,
            Some(bytes::Bytes::from(body.to_string())),
            &[],
        )
    };

    let reply = send("{\"model\": \"llama\", \"messages\": [")
        .await
        .unwrap();
    assert_openai_error(&reply, 400, None);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    let reply = send(r#"{"messages": [{"role": "user", "content": "hi"}]}"#)
        .await
        .unwrap();
    assert_openai_error(&reply, 400, None);
    assert_eq!(reply.json()["error"]["param"], "model");

    let reply =
        send(r#"{"model": "gpt-unknown", "messages": [{"role": "user", "content": "hi"}]}"#)
            .await
            .unwrap();
    assert_openai_error(&reply, 404, Some("model_not_found"));

    // Messages of the wrong shape and absurd max_tokens name the field.
    for (body, param) in [
        (r#"{"model": "llama", "messages": []}"#, "messages"),
        (r#"{"model": "llama", "messages": "hi"}"#, "messages"),
        (
            r#"{"model": "llama", "messages": [{"content": "no role"}]}"#,
            "messages",
        ),
        (
            r#"{"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}"#,
            "max_tokens",
        ),
        (
            r#"{"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e12}"#,
            "max_tokens",
        ),
        (
            r#"{"model": ["llama"], "messages": [{"role": "user", "content": "hi"}]}"#,
            "model",
        ),
    ] {
        let reply = send(body).await.unwrap();
        assert_openai_error(&reply, 400, None);
        assert_eq!(reply.json()["error"]["param"], param, "{body}");
    }
    let form = mesh
        .http
        .send(
            Method::POST,
            &url,
            Some(bytes::Bytes::from("model=llama")),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await
        .unwrap();
    assert_openai_error(&form, 415, Some("unsupported_media_type"));
    let keyless = mesh
        .http
        .send(
            Method::POST,
            &url,
            Some(bytes::Bytes::from(r#"{"model": "llama"}"#)),
            &[("x-no-auth", "1")],
        )
        .await
        .unwrap();
    assert_openai_error(&keyless, 401, Some("invalid_api_key"));

    let big = format!(r#"{{"model": "llama", "prompt": "{}"}}"#, "x".repeat(4096));
    let reply = send(&big).await.unwrap();
    assert_openai_error(&reply, 413, Some("request_too_large"));

    // The pool exists but no replica has registered.
    let reply = send(r#"{"model": "llama", "messages": [{"role": "user", "content": "hi"}]}"#)
        .await
        .unwrap();
    assert_openai_error(&reply, 503, Some("no_healthy_replica"));

    let reply = mesh.http.get(&url).await.unwrap();
    assert_openai_error(&reply, 405, Some("method_not_allowed"));
    let reply = mesh
        .http
        .get(&format!("{}/v2/nothing", edge.url))
        .await
        .unwrap();
    assert_openai_error(&reply, 404, Some("not_found"));
}

#[tokio::test]
async fn a_hanging_replica_gives_504_and_an_unreachable_one_502() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "slow", "slow-eu").await;
    mesh.register("eu-west", "gone", "gone-eu").await;
    let _hanging = mesh
        .start_replica(
            "slow-0",
            "slow-eu",
            "slow",
            "eu-west",
            &["--hang-rate", "1.0"],
        )
        .await;
    // A healthy engine whose sidecar advertises a port nobody listens on.
    let (gone_engine_url, _gone_engine) = mesh.start_engine("gone-0", "gone", &[]).await;
    let dead_port = infermesh_integration_tests::binaries::free_port();
    let _unreachable = mesh
        .start_sidecar(
            "gone-0",
            "gone-eu",
            "gone",
            "eu-west",
            &gone_engine_url,
            Some(&format!("127.0.0.1:{dead_port}")),
        )
        .await;
    let edge = mesh
        .start_edge("eu-west", &["--upstream-response-timeout-ms", "500"])
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});

    wait::until("the hanging replica to be chosen", DEADLINE, || async {
        let reply = mesh.http.post_json(&url, &body("slow")).await.ok()?;
        (reply.status == 504).then_some(reply)
    })
    .await;
    let reply = mesh.http.post_json(&url, &body("slow")).await.unwrap();
    assert_openai_error(&reply, 504, Some("upstream_timeout"));

    let reply = wait::until("the unreachable replica to be chosen", DEADLINE, || async {
        let reply = mesh.http.post_json(&url, &body("gone")).await.ok()?;
        (reply.status == 502).then_some(reply)
    })
    .await;
    assert_openai_error(&reply, 502, Some("upstream_failed"));
    let message = reply.json()["error"]["message"].to_string();
    assert!(
        !message.contains("gone-0") && !message.contains("127.0.0.1"),
        "a client learns no replica name or address: {message}"
    );
}

#[tokio::test]
async fn an_unhealthy_engine_is_taken_out_of_rotation_and_back() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let r1 = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    mesh.wait_until_served(&url, &body).await;

    let flip = mesh
        .http
        .send(
            Method::POST,
            &format!("{}/sim/health?healthy=false", r1.engine_url),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(flip.status, 200, "{}", flip.text());
    let reply = wait::until(
        "the edge to stop routing to the unhealthy replica",
        DEADLINE,
        || async {
            let reply = mesh.http.post_json(&url, &body).await.ok()?;
            (reply.status == 503).then_some(reply)
        },
    )
    .await;
    assert_openai_error(&reply, 503, Some("no_healthy_replica"));
    let listed = mesh
        .admin("ListEndpoints", json!({"pool": "llama-eu"}))
        .await
        .unwrap();
    assert_eq!(listed["endpoints"][0]["state"], "UNHEALTHY");

    mesh.http
        .send(
            Method::POST,
            &format!("{}/sim/health?healthy=true", r1.engine_url),
            None,
            &[],
        )
        .await
        .unwrap();
    wait::until("the replica to come back", DEADLINE, || async {
        (mesh.http.post_json(&url, &body).await.ok()?.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stopping_sidecar_drains_finishing_its_stream_before_it_exits() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let mut r1 = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--decode-ms-per-token", "50"],
        )
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    wait::until("routable", DEADLINE, || async {
        let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        (mesh.http.post_json(&url, &body).await.ok()?.status == 200).then_some(())
    })
    .await;

    let long = json!({"model": "llama", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 40, "stream": true});
    let http = mesh.http.clone();
    let stream_url = url.clone();
    let in_flight = tokio::spawn(async move { http.post_stream(&stream_url, &long).await });
    wait::until(
        "the stream to be running on the engine",
        DEADLINE,
        || async {
            let metrics = mesh
                .http
                .get(&format!("{}/metrics", r1.engine_url))
                .await
                .ok()?
                .text();
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("vllm:num_requests_running")
                        && !l.ends_with(" 0")
                        && !l.ends_with(" 0.0")
                })
                .then_some(())
        },
    )
    .await;

    let code = r1.sidecar.terminate().await;
    assert_eq!(code, Some(0), "the sidecar exits cleanly after draining");
    let streamed = in_flight.await.unwrap().unwrap();
    assert_eq!(streamed.status, 200);
    assert_eq!(
        streamed.events().last().map(String::as_str),
        Some("[DONE]"),
        "the in-flight stream finished"
    );
    wait::until(
        "the drained endpoint to leave the registry",
        DEADLINE,
        || async { mesh.endpoint_ids("llama-eu").await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn unknown_fields_reach_the_engine_untouched() {
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "llama", "aliases": ["l3"]}}),
    )
    .await
    .unwrap();
    mesh.register("eu-west", "llama", "llama-eu").await;
    let replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    mesh.wait_until_served(&url, &probe).await;
    let last_request = || async { mesh.last_engine_request(&replica).await.body };
    let post = |body: &'static str| {
        let url = url.clone();
        let http = mesh.http.clone();
        async move {
            let reply = http
                .send(
                    Method::POST,
                    &url,
                    Some(body.into()),
                    &[("content-type", "application/json")],
                )
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    };

    // Canonical name, not streamed: the engine gets the client's bytes exactly,
    // key order, spacing, escapes and fields the edge does not know included.
    let sent = "{ \"vendor_ext\" : {\"guided_json\": {\"type\":\"object\"}},\n \"model\":\"llama\",\
                \"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9\"}], \"top_k\": 7,\
                \"logit_bias\": {\"50256\": -100}, \"max_tokens\": 4 }";
    post(sent).await;
    assert_eq!(last_request().await, sent.as_bytes());

    // An alias is replaced by the canonical name and a stream gets usage
    // requested; every other field arrives with the same value.
    let sent = r#"{"model":"l3","stream":true,"messages":[{"role":"user","content":"hi"}],
                   "top_k":7,"vendor_ext":{"a":[1,2,{"b":null}]},"seed":42,"max_tokens":4}"#;
    post(sent).await;
    let received: serde_json::Value = serde_json::from_slice(&last_request().await).unwrap();
    let mut expected: serde_json::Value = serde_json::from_str(sent).unwrap();
    expected["model"] = json!("llama");
    expected["stream_options"] = json!({"include_usage": true});
    assert_eq!(received, expected);
}

#[tokio::test]
async fn a_stream_past_the_idle_deadline_ends_with_an_error_event_and_is_counted_as_a_deadline() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "slow", "slow-eu").await;
    let _replica = mesh
        .start_replica(
            "slow-0",
            "slow-eu",
            "slow",
            "eu-west",
            &["--decode-ms-per-token", "1500"],
        )
        .await;
    let edge = mesh
        .start_edge("eu-west", &["--upstream-idle-timeout-ms", "300"])
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let quick = json!({"model": "slow", "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]});
    mesh.wait_until_served(&url, &quick).await;
    let body = json!({"model": "slow", "max_tokens": 20, "stream": true,
        "messages": [{"role": "user", "content": "take your time"}]});
    let streamed = mesh.http.post_stream(&url, &body).await.unwrap();
    assert_eq!(streamed.status, 200);
    let text: String = streamed
        .frames
        .iter()
        .map(|(_, data)| String::from_utf8_lossy(data).into_owned())
        .collect();
    let last = text
        .lines()
        .rfind(|l| l.starts_with("data:"))
        .expect("an event");
    let event: serde_json::Value = serde_json::from_str(last.trim_start_matches("data: ")).unwrap();
    assert_eq!(event["error"]["code"], "deadline", "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let metrics = wait::until("the cut to be counted", DEADLINE, || async {
        let text = mesh.http.get(&edge.metrics_url).await.ok()?.text();
        text.contains(r#"error="deadline""#).then_some(text)
    })
    .await;
    assert_eq!(
        infermesh_integration_tests::scrape::value(
            &metrics,
            "infermesh_edge_requests_total",
            &[("error", "deadline"), ("model", "slow")]
        ),
        Some(1.0),
        "{metrics}"
    );
}
