//! Faults under load: etcd and the control plane both stopped for a minute
//! (edges and sidecars keep serving every request from the tables they hold,
//! and the system converges again within a bounded time when they return),
//! and a 3-member etcd cluster losing its leader under admin writes and
//! traffic (no acknowledged write lost, pushes go on).

use std::time::{Duration, Instant};

use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::etcd::EtcdCluster;
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

#[tokio::test]
async fn losing_the_etcd_leader_under_writes_and_traffic_loses_no_acknowledged_write() {
    let mut mesh = Mesh::start().await;
    let cluster_dir = mesh.dir.path().join("etcd-cluster");
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let mut cluster = EtcdCluster::start(&cluster_dir, 3).await;
    mesh.etcd_endpoints = Some(cluster.urls.join(","));
    mesh.kill_control_plane().await;
    mesh.start_control_plane().await;
    mesh.http = Http::with_key(&mesh.create_key("tests", json!({})).await);

    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body =
        json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    mesh.wait_until_served(&url, &body).await;
    let load = SteadyLoad::start(&mesh.http, &url, &body, 2);

    // Admin writes before, during and after the loss of the etcd leader.
    let mut acknowledged = Vec::new();
    let mut killed = None;
    for i in 0..30 {
        if i == 10 {
            let leader = wait::until("an etcd leader", Duration::from_secs(20), || {
                cluster.leader()
            })
            .await;
            cluster.kill(leader).await;
            killed = Some(leader);
        }
        let name = format!("written-{i}");
        let pool = json!({"pool": {"name": format!("{name}-eu"), "model": name, "region": "eu-west",
            "engine": "VLLM", "min_replicas": 1, "max_replicas": 1}});
        if mesh
            .admin("CreateModel", json!({"model": {"name": name}}))
            .await
            .is_ok()
            && mesh.admin("CreatePool", pool).await.is_ok()
        {
            acknowledged.push(name);
        }
    }
    assert!(killed.is_some());
    assert!(
        acknowledged.len() >= 20,
        "writes went on after the leader died: {acknowledged:?}"
    );

    // Every acknowledged write is there, and pushes still reach the edge.
    let listed = mesh
        .admin("ListModels", json!({}))
        .await
        .unwrap()
        .to_string();
    for name in &acknowledged {
        assert!(listed.contains(&format!("\"{name}\"")), "{name} was lost");
    }
    let last = acknowledged.last().unwrap().clone();
    wait::until(
        "the edge to list the last write",
        Duration::from_secs(20),
        || async { mesh.edge_models(&edge).await.contains(&last).then_some(()) },
    )
    .await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed while etcd lost its leader");
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid` with the real `kill`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The control plane's value of `name` with `labels`.
async fn control_plane_metric(mesh: &Mesh, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = mesh
        .http
        .get(&mesh.control_plane_metrics_url)
        .await
        .ok()?
        .text();
    infermesh_integration_tests::scrape::value(&text, name, labels)
}

#[tokio::test]
async fn etcd_frozen_for_twenty_seconds_under_load_then_the_snapshot_converges() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _a = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body =
        json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    mesh.wait_until_served(&url, &body).await;
    let load = SteadyLoad::start(&mesh.http, &url, &body, 3);
    load.wait_for(10, Duration::from_secs(20)).await;

    let pid = mesh.etcd.pid().expect("etcd runs");
    signal(pid, "STOP");
    let frozen = Instant::now();
    let served_before = load.ok();
    while frozen.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        load.ok() > served_before,
        "the edge kept serving from its table while etcd was frozen"
    );
    signal(pid, "CONT");
    let resumed = Instant::now();

    // A replica registered after the freeze must reach the control plane's
    // snapshot (its serving count) and the watch must be current again.
    let _b = mesh
        .start_replica("llama-1", "llama-eu", "llama", "eu-west", &[])
        .await;
    let converged = wait::until(
        "the snapshot holds both replicas and the watch is current",
        Duration::from_secs(45),
        || async {
            let serving = control_plane_metric(
                &mesh,
                "infermesh_control_plane_pool_serving_endpoints",
                &[("pool", "llama-eu")],
            )
            .await?;
            let lag = control_plane_metric(&mesh, "infermesh_control_plane_watch_lag_seconds", &[])
                .await?;
            (serving == 2.0 && lag == 0.0).then(|| resumed.elapsed())
        },
    )
    .await;
    eprintln!("snapshot converged {converged:?} after etcd was continued");
    let resyncs = control_plane_metric(
        &mesh,
        "infermesh_control_plane_watch_resyncs_total",
        &[("reason", "stalled")],
    )
    .await
    .unwrap_or(0.0);
    eprintln!("stalled-watch resyncs: {resyncs}");
    let (ok, _failed) = load.stop().await;
    assert!(ok > 20, "{ok}");
}
