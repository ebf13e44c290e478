//! Every process's `/metrics` through real traffic: the text passes
//! `promtool check metrics`, and the series an operator alerts on move
//! with the requests, streams and admin writes that caused them.

use std::time::Duration;

use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use serde_json::json;
use tokio::io::AsyncWriteExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// Runs the real `promtool check metrics` over `text`; panics with its complaints.
async fn promtool_check(what: &str, text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (the test command installs Debian's prometheus package)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics rejected the {what}'s metrics:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A series as `(name, sorted labels)`, from `name{a="x",b="y"}` or `name`.
fn series_key(series: &str) -> (String, Vec<String>) {
    match series.split_once('{') {
        Some((name, rest)) => {
            let mut labels: Vec<String> = rest
                .trim_end_matches('}')
                .split("\",")
                .filter(|l| !l.is_empty())
                .map(|l| l.trim_end_matches('"').to_string())
                .collect();
            labels.sort();
            (name.to_string(), labels)
        }
        None => (series.to_string(), Vec::new()),
    }
}

/// The value of `series` (name and labels, in any label order), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    let wanted = series_key(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(found, _)| series_key(found) == wanted)
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test]
async fn every_process_exports_metrics_promtool_accepts_and_they_follow_the_traffic() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body =
        json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
    mesh.wait_until_served(&url, &body).await;
    let stream = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8, "stream": true});
    let streamed = mesh.http.post_stream(&url, &stream).await.unwrap();
    assert_eq!(streamed.status, 200);
    let missing = mesh
        .http
        .post_json(
            &url,
            &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .unwrap();
    assert_eq!(missing.status, 404);

    let get = |url: String| {
        let http = mesh.http.clone();
        async move {
            let reply = http.get(&url).await.unwrap();
            assert_eq!(reply.status, 200, "{url}");
            reply.text()
        }
    };

    // Edge: the requests it answered, by canonical model, status and error.
    let text = wait::until("the edge to count the stream's end", DEADLINE, || {
        let url = edge.metrics_url.clone();
        async move {
            let text = get(url).await;
            let series = r#"infermesh_edge_time_per_output_token_seconds_count{model="llama",region="eu-west"}"#;
            (value(&text, series)? >= 1.0).then_some(text)
        }
    })
    .await;
    promtool_check("edge", &text).await;
    let ok = value(
        &text,
        r#"infermesh_edge_requests_total{code="200",error="none",model="llama",region="eu-west"}"#,
    );
    assert!(ok.is_some_and(|v| v >= 2.0), "{text}");
    let not_found = value(
        &text,
        r#"infermesh_edge_requests_total{code="404",error="model_not_found",model="unknown",region="eu-west"}"#,
    );
    assert_eq!(
        not_found,
        Some(1.0),
        "client model names never become labels:\n{text}"
    );
    assert!(!text.contains("model=\"nope\""));
    let completion = value(
        &text,
        r#"infermesh_edge_completion_tokens_total{model="llama",region="eu-west"}"#,
    );
    assert!(completion.is_some_and(|v| v >= 16.0), "{text}");
    assert_eq!(
        value(
            &text,
            r#"infermesh_edge_requests_in_flight{model="llama",region="eu-west"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            r#"infermesh_edge_control_plane_connected{region="eu-west"}"#
        ),
        Some(1.0)
    );
    assert!(text.contains("infermesh_edge_upstream_request_duration_seconds_bucket"));
    assert!(text.contains("process_resident_memory_bytes"));

    // Sidecar: the engine as scraped; no GPU here, and it says so.
    let labels = r#"endpoint="llama-0",model="llama",pool="llama-eu",region="eu-west""#;
    let text = get(replica.sidecar_metrics_url.clone()).await;
    promtool_check("sidecar", &text).await;
    assert_eq!(
        value(&text, &format!("infermesh_sidecar_engine_up{{{labels}}}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &format!("infermesh_sidecar_gpu_telemetry_available{{{labels}}}")
        ),
        Some(0.0)
    );
    let proxied = value(
        &text,
        &format!(r#"infermesh_sidecar_requests_total{{code="200",{labels}}}"#),
    );
    assert!(proxied.is_some_and(|v| v >= 2.0), "{text}");
    let age = value(
        &text,
        &format!("infermesh_sidecar_load_report_age_seconds{{{labels}}}"),
    );
    assert!(age.is_some_and(|a| a < 10.0), "{text}");

    // Control plane: subscribers, pools, and the push latency of an admin write.
    let text = get(mesh.control_plane_metrics_url.clone()).await;
    promtool_check("control plane", &text).await;
    assert_eq!(
        value(
            &text,
            r#"infermesh_control_plane_subscribers{region="eu-west",role="edge"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"infermesh_control_plane_subscribers{region="eu-west",role="sidecar"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"infermesh_control_plane_pool_serving_endpoints{model="llama",pool="llama-eu",region="eu-west"}"#
        ),
        Some(1.0)
    );
    assert_eq!(value(&text, "infermesh_control_plane_leader"), Some(1.0));
    assert!(value(&text, "infermesh_control_plane_load_reports_total").is_some_and(|v| v >= 1.0));
    assert!(
        text.contains(r#"infermesh_control_plane_etcd_request_duration_seconds_count{op="txn"}"#)
    );

    let before = value(
        &text,
        r#"infermesh_control_plane_push_latency_seconds_count{role="edge"}"#,
    )
    .unwrap_or(0.0);
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "mistral", "description": "pushed to the edge"}}),
    )
    .await
    .unwrap();
    mesh.register("eu-west", "mistral", "mistral-eu").await;
    wait::until("the edge's ACK to be timed", DEADLINE, || {
        let url = mesh.control_plane_metrics_url.clone();
        async move {
            let text = get(url).await;
            let after = value(
                &text,
                r#"infermesh_control_plane_push_latency_seconds_count{role="edge"}"#,
            )?;
            (after > before).then_some(())
        }
    })
    .await;
    // The edge held a table before the write, so the write reached it as a
    // change; the first table of each stream went out whole.
    let text = get(mesh.control_plane_metrics_url.clone()).await;
    let pushed = |kind: &str| {
        let count = value(
            &text,
            &format!(r#"infermesh_control_plane_table_pushes_total{{kind="{kind}"}}"#),
        );
        let bytes = value(
            &text,
            &format!(r#"infermesh_control_plane_table_push_bytes_total{{kind="{kind}"}}"#),
        );
        (count.unwrap_or(0.0), bytes.unwrap_or(0.0))
    };
    let (full, full_bytes) = pushed("full");
    let (deltas, delta_bytes) = pushed("delta");
    assert!(
        full >= 2.0 && full_bytes > 0.0,
        "{full} whole tables, {full_bytes} bytes"
    );
    assert!(
        deltas >= 1.0 && delta_bytes > 0.0,
        "{deltas} changes, {delta_bytes} bytes"
    );
}
