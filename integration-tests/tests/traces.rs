//! One request, one trace: edge and sidecar export OTLP spans to a real
//! receiver (the collector's TraceService), configured only through the
//! standard OTEL_* variables, and the engine receives a traceparent that
//! continues the same trace.

use std::time::Duration;

use http::Method;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::otlp::{OtlpReceiver, ReceivedSpan};
use infermesh_integration_tests::wait;
use serde_json::json;

#[tokio::test]
async fn a_request_is_one_trace_from_edge_through_sidecar_to_engine() {
    let receiver = OtlpReceiver::start().await;
    let mut mesh = Mesh::start().await;
    mesh.env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            receiver.endpoint.clone(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    mesh.register("eu-west", "llama", "llama-eu").await;
    let replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4, "stream": true});
    mesh.wait_until_served(&url, &body).await;

    // The request under test continues a trace the client started.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{client_trace}-00f067aa0ba902b7-01");
    let reply = mesh
        .http
        .send(
            Method::POST,
            &url,
            Some(body.to_string().into()),
            &[
                ("content-type", "application/json"),
                ("traceparent", &traceparent),
            ],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    let in_trace = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.trace_id == client_trace)
            .cloned()
            .collect()
    };
    let spans = wait::until(
        "edge and sidecar spans of the request",
        Duration::from_secs(20),
        || {
            let spans = in_trace(&receiver.spans());
            async move {
                // Spans arrive as they end, in batches: wait for all four.
                let has = |service: &str, name: &str, kind: i32| {
                    spans
                        .iter()
                        .any(|s| s.service == service && s.name == name && s.kind == kind)
                };
                let chat = "POST /v1/chat/completions";
                (has("infermesh-edge", chat, 2)
                    && has("infermesh-edge", "route", 1)
                    && has("infermesh-edge", chat, 3)
                    && has("infermesh-sidecar", chat, 2))
                .then_some(spans)
            }
        },
    )
    .await;
    // OTLP span kinds: 1 internal, 2 server, 3 client.
    let find = |service: &str, name: &str, kind: i32| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name && s.kind == kind)
            .unwrap_or_else(|| panic!("no {service} span {name:?} of kind {kind} in {spans:#?}"))
            .clone()
    };
    let server = find("infermesh-edge", "POST /v1/chat/completions", 2);
    let route = find("infermesh-edge", "route", 1);
    let upstream = find("infermesh-edge", "POST /v1/chat/completions", 3);
    let sidecar = find("infermesh-sidecar", "POST /v1/chat/completions", 2);

    // Parent-child order: client -> edge server -> {route, upstream} -> sidecar.
    assert_eq!(
        server.parent_span_id, "00f067aa0ba902b7",
        "the client's span is the parent"
    );
    assert_eq!(route.parent_span_id, server.span_id);
    assert_eq!(upstream.parent_span_id, server.span_id);
    assert_eq!(sidecar.parent_span_id, upstream.span_id);
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(route.attribute("infermesh.endpoint"), Some("llama-0"));
    assert_eq!(
        route.attribute("infermesh.policy"),
        Some("least_outstanding")
    );
    assert!(
        route
            .attribute("infermesh.reason")
            .is_some_and(|r| r.contains("fewest in flight")),
        "{route:?}"
    );

    // The engine got a traceparent continuing the trace from the sidecar's span.
    let last = mesh.last_engine_request(&replica).await;
    let sent = last
        .headers
        .get("x-sim-traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("the engine received a traceparent");
    assert_eq!(
        sent,
        format!("00-{client_trace}-{}-01", sidecar.span_id),
        "the engine continues the trace under the sidecar's span"
    );
}
