//! Static stability: an edge saves every routing table it accepts, and an
//! edge started while no control plane is reachable serves from the saved
//! one (marked stale in /readyz and its metrics) until a push replaces it.

use std::time::Duration;

use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use serde_json::json;

#[tokio::test]
async fn an_edge_restarted_without_a_control_plane_serves_from_its_saved_table() {
    let mut mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let cache = mesh.dir.path().join("edge-state/table.pb");
    let cache_flag = cache.display().to_string();
    let flags = ["--table-cache", cache_flag.as_str()];
    let body =
        json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});

    let mut first = mesh.start_edge("eu-west", &flags).await;
    mesh.wait_until_served(&format!("{}/v1/chat/completions", first.url), &body)
        .await;
    assert!(cache.exists(), "the accepted table is saved");
    first.process.kill().await;

    // No control plane anywhere: the new edge still routes, from the file.
    mesh.kill_control_plane().await;
    let second = mesh.start_edge("eu-west", &flags).await;
    let url = format!("{}/v1/chat/completions", second.url);
    let reply = mesh.http.post_json(&url, &body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let ready = mesh
        .http
        .get(&format!("{}/readyz", second.url))
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["stale"], true, "{}", ready.text());
    let metrics = mesh.http.get(&second.metrics_url).await.unwrap().text();
    assert!(
        metrics.contains("infermesh_edge_routing_table_stale{region=\"eu-west\"} 1"),
        "{metrics}"
    );

    // The control plane returns: its push replaces the saved table.
    mesh.start_control_plane().await;
    wait::until(
        "a fresh push to replace the saved table",
        Duration::from_secs(30),
        || async {
            let ready = mesh
                .http
                .get(&format!("{}/readyz", second.url))
                .await
                .ok()?;
            (ready.json()["stale"] == false).then_some(())
        },
    )
    .await;
    assert_eq!(mesh.http.post_json(&url, &body).await.unwrap().status, 200);
}
