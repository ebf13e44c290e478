//! Static stability under a control-plane outage: etcd and the control
//! plane are both stopped for a minute under steady load, and the edges and
//! sidecars keep serving every request from the tables they hold; when both
//! come back, the system converges again (sidecars re-registered, edges
//! subscribed) within a bounded time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (http, url, body) = (mesh.http.clone(), url.clone(), body.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http.post_json(&url, &body).await {
                    Ok(reply) if reply.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {:?}", other.map(|r| (r.status, r.text())));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    mesh.kill_control_plane().await;
    mesh.etcd.kill().await;
    let down = Instant::now();
    let served_before = ok.load(Ordering::Relaxed);
    while down.elapsed() < outage() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            failed.load(Ordering::Relaxed),
            0,
            "a request failed during the outage"
        );
    }
    assert!(
        ok.load(Ordering::Relaxed) > served_before + 10,
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
    let after = ok.load(Ordering::Relaxed);
    wait::until("traffic after the return", Duration::from_secs(30), || {
        let ok = ok.clone();
        async move { (ok.load(Ordering::Relaxed) > after + 20).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    eprintln!("converged {converged:?} after etcd and the control plane returned");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
    assert!(converged < Duration::from_secs(20), "{converged:?}");
}
