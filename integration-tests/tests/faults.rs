//! Static stability under a control-plane outage: etcd and the control
//! plane are both stopped for a minute under steady load, and the edges and
//! sidecars keep serving every request from the tables they hold; when both
//! come back, the system converges again (sidecars re-registered, edges
//! subscribed) within a bounded time.

use std::time::{Duration, Instant};

use infermesh_integration_tests::load::SteadyLoad;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use serde_json::json;

/// Seconds etcd and the control plane stay down (60 unless set).
fn outage() -> Duration {
    let seconds = std::env::var("INFERMESH_FAULT_OUTAGE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

#[tokio::test]
async fn a_minute_without_etcd_and_control_plane_fails_no_request() {
    let mut mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _a = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let _b = mesh
        .start_replica("llama-1", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4});
    mesh.wait_until_served(&url, &body).await;
    wait::until(
        "both replicas registered",
        Duration::from_secs(20),
        || async { (mesh.endpoint_ids("llama-eu").await.len() == 2).then_some(()) },
    )
    .await;

    let load = SteadyLoad::start(&mesh.http, &url, &body, 3);
    load.wait_for(10, Duration::from_secs(20)).await;

    mesh.kill_control_plane().await;
    mesh.etcd.kill().await;
    let down = Instant::now();
    let served_before = load.ok();
    while down.elapsed() < outage() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(load.failed(), 0, "a request failed during the outage");
    }
    assert!(
        load.ok() > served_before + 10,
        "traffic kept flowing during the outage"
    );

    let back = Instant::now();
    mesh.etcd.restart().await;
    mesh.start_control_plane().await;
    wait::until(
        "sidecars re-registered and the edge subscribed",
        Duration::from_secs(60),
        || async {
            let endpoints = mesh.endpoint_ids("llama-eu").await;
            let metrics = mesh.http.get(&edge.metrics_url).await.ok()?.text();
            let subscribed =
                metrics.contains("infermesh_edge_control_plane_connected{region=\"eu-west\"} 1");
            (endpoints.len() == 2 && subscribed).then_some(())
        },
    )
    .await;
    let converged = back.elapsed();
    // Keep the load on a little longer: the reconnections must not fail requests either.
    load.wait_for(20, Duration::from_secs(30)).await;
    let (_, failed) = load.stop().await;
    eprintln!("converged {converged:?} after etcd and the control plane returned");
    assert_eq!(failed, 0, "requests failed");
    assert!(converged < Duration::from_secs(20), "{converged:?}");
}
