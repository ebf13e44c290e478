//! Failures under load through real processes: a replica killed mid-traffic
//! costs no request (retried on another replica before any byte reached the
//! client), and a replica that hangs is ejected so traffic moves to the
//! healthy one within a bounded time.

use std::time::{Duration, Instant};

use infermesh_integration_tests::load::SteadyLoad;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use serde_json::json;

#[tokio::test]
async fn killing_a_replica_under_steady_load_fails_no_request() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _survivor = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let mut victim = mesh
        .start_replica("llama-1", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "steady"}], "max_tokens": 8});
    mesh.wait_until_served(&url, &body).await;

    let load = SteadyLoad::start(&mesh.http, &url, &body, 4);
    load.wait_for(20, Duration::from_secs(20)).await;
    victim.sidecar.kill().await;
    victim.engine.kill().await;
    // Keep the load on through the lease expiry and the push that removes it.
    load.wait_for(60, Duration::from_secs(20)).await;
    wait::until(
        "the dead replica to leave the table",
        Duration::from_secs(20),
        || async { (mesh.endpoint_ids("llama-eu").await == ["llama-0"]).then_some(()) },
    )
    .await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed during the kill");
    let metrics = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("infermesh_edge_retries_total")),
        "the kill was absorbed by retries:\n{metrics}"
    );
}

#[tokio::test]
async fn a_hanging_replica_is_ejected_and_traffic_moves_within_seconds() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _healthy = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let _hanging = mesh
        .start_replica(
            "llama-1",
            "llama-eu",
            "llama",
            "eu-west",
            &["--hang-rate", "1.0"],
        )
        .await;
    let edge = mesh
        .start_edge(
            "eu-west",
            &[
                "--upstream-response-timeout-ms",
                "300",
                "--ejection-ms",
                "60000",
            ],
        )
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hang?"}], "max_tokens": 2});
    wait::until(
        "both replicas in the edge's table",
        Duration::from_secs(20),
        || async {
            let text = mesh
                .http
                .get(&format!("{}/readyz", edge.url))
                .await
                .ok()?
                .text();
            (mesh.endpoint_ids("llama-eu").await.len() == 2 && text.contains("ready")).then_some(())
        },
    )
    .await;

    // Sequential requests until ten in a row succeed.
    let started = Instant::now();
    let mut in_a_row = 0;
    let mut timeouts = 0;
    while in_a_row < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "traffic never moved"
        );
        let reply = mesh.http.post_json(&url, &body).await.unwrap();
        match reply.status {
            200 => in_a_row += 1,
            504 => {
                timeouts += 1;
                in_a_row = 0;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    let moved_after = started.elapsed();
    eprintln!("traffic moved off the hanging replica after {moved_after:?} ({timeouts} timeouts)");
    assert!(
        timeouts <= 3,
        "ejected after 3 failures in a row: {timeouts}"
    );
    assert!(moved_after < Duration::from_secs(5), "{moved_after:?}");
    let metrics = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    let ejected = metrics
        .lines()
        .find(|l| l.starts_with("infermesh_edge_ejections_total") && l.contains("llama-1"));
    assert!(ejected.is_some_and(|l| l.ends_with(" 1")), "{metrics}");
}

#[tokio::test]
async fn a_models_own_deadlines_cut_a_silent_stream_and_a_slow_first_byte() {
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "slow", "timeouts": {"idle_ms": 150, "first_byte_ms": 3000}}}),
    )
    .await
    .unwrap();
    mesh.register("eu-west", "slow", "slow-eu").await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "stuck", "timeouts": {"first_byte_ms": 200}}}),
    )
    .await
    .unwrap();
    mesh.register("eu-west", "stuck", "stuck-eu").await;
    let slow = mesh
        .start_replica(
            "slow-0",
            "slow-eu",
            "slow",
            "eu-west",
            &["--decode-ms-per-token", "400"],
        )
        .await;
    let _stuck = mesh
        .start_replica(
            "stuck-0",
            "stuck-eu",
            "stuck",
            "eu-west",
            &["--hang-rate", "1.0"],
        )
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let ask = |model: &str, stream: bool| {
        json!({"model": model, "stream": stream, "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]})
    };
    wait::until("both models routable", Duration::from_secs(20), || async {
        let ids = (
            mesh.endpoint_ids("slow-eu").await,
            mesh.endpoint_ids("stuck-eu").await,
        );
        (ids.0.len() == 1 && ids.1.len() == 1).then_some(())
    })
    .await;

    // 400 ms between tokens against a 150 ms idle deadline: the stream is cut.
    let started = Instant::now();
    let streamed = mesh.http.post_stream(&url, &ask("slow", true)).await;
    let elapsed = started.elapsed();
    let cut = match &streamed {
        Err(_) => true,
        Ok(s) => !s.events().iter().any(|e| e == "[DONE]"),
    };
    assert!(cut, "the stream ran to the end: {streamed:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "{elapsed:?} for 20 tokens at 400 ms"
    );
    // The engine stops generating for the client that was cut off.
    wait::until(
        "the engine to drop the cut request",
        Duration::from_secs(20),
        || async {
            let text = mesh
                .http
                .get(&format!("{}/metrics", slow.engine_url))
                .await
                .ok()?
                .text();
            text.lines()
                .find(|l| l.starts_with("vllm:num_requests_running"))
                .filter(|l| l.ends_with(" 0"))
                .map(|_| ())
        },
    )
    .await;

    // A 200 ms first-byte deadline against a replica that never answers.
    let started = Instant::now();
    let reply = mesh
        .http
        .post_json(&url, &ask("stuck", false))
        .await
        .unwrap();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_replica_far_slower_than_its_peers_is_ejected() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let mut replicas = Vec::new();
    for (id, decode_ms) in [("llama-0", "10"), ("llama-1", "10"), ("llama-slow", "150")] {
        replicas.push(
            mesh.start_replica(
                id,
                "llama-eu",
                "llama",
                "eu-west",
                &["--decode-ms-per-token", decode_ms],
            )
            .await,
        );
    }
    let edge = mesh
        .start_edge("eu-west", &["--ejection-ms", "60000"])
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "pace"}], "max_tokens": 4});
    wait::until(
        "three replicas routable",
        Duration::from_secs(20),
        || async { (mesh.endpoint_ids("llama-eu").await.len() == 3).then_some(()) },
    )
    .await;
    mesh.wait_until_served(&url, &body).await;

    let ejected = wait::until(
        "the slow replica to be ejected",
        Duration::from_secs(60),
        || async {
            let reply = mesh.http.post_json(&url, &body).await.ok()?;
            assert_eq!(reply.status, 200, "{}", reply.text());
            let metrics = mesh.http.get(&edge.metrics_url).await.ok()?.text();
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("infermesh_edge_ejections_total") && l.contains("llama-slow")
                })
                .map(String::from)
        },
    )
    .await;
    assert!(ejected.ends_with(" 1"), "{ejected}");
    // Only the fast replicas serve from now on.
    let slow = &replicas[2];
    let before = mesh.last_engine_request(slow).await.body;
    for _ in 0..10 {
        let unique = json!({"model": "llama", "messages": [{"role": "user", "content": format!("after {}", uuid_like())}], "max_tokens": 2});
        assert_eq!(
            mesh.http.post_json(&url, &unique).await.unwrap().status,
            200
        );
    }
    assert_eq!(
        mesh.last_engine_request(slow).await.body,
        before,
        "the slow replica got traffic"
    );
}

/// A value that differs between calls, for distinct prompts.
fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Starts replica `id` of llama-eu again, waits until the pool has
/// `replicas` endpoints and `load` has succeeded 5 more times.
async fn restart(
    mesh: &Mesh,
    id: &str,
    engine_flags: &[&str],
    replicas: usize,
    load: &SteadyLoad,
) -> infermesh_integration_tests::mesh::Replica {
    let replica = mesh
        .start_replica(id, "llama-eu", "llama", "eu-west", engine_flags)
        .await;
    wait::until(
        "the restarted replica back in the table",
        Duration::from_secs(20),
        || async { (mesh.endpoint_ids("llama-eu").await.len() == replicas).then_some(()) },
    )
    .await;
    load.wait_for(5, Duration::from_secs(20)).await;
    replica
}

#[tokio::test]
async fn a_rolling_restart_of_every_replica_under_streaming_load_fails_no_request() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(
            mesh.start_replica(&format!("llama-{i}"), "llama-eu", "llama", "eu-west", &[])
                .await,
        );
    }
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "stream": true, "max_tokens": 12,
        "messages": [{"role": "user", "content": "keep streaming"}]});
    wait::until(
        "three replicas routable",
        Duration::from_secs(20),
        || async { (mesh.endpoint_ids("llama-eu").await.len() == 3).then_some(()) },
    )
    .await;
    mesh.wait_until_served(&url, &body).await;
    let load = SteadyLoad::start(&mesh.http, &url, &body, 4);
    load.wait_for(10, Duration::from_secs(20)).await;

    // One replica at a time: the sidecar drains on SIGTERM (streams in
    // flight finish), then the engine goes, then both come back.
    for replica in &mut replicas {
        let id = replica.id.clone();
        assert_eq!(
            replica.sidecar.terminate().await,
            Some(0),
            "{id}'s sidecar drained and exited"
        );
        replica.engine.kill().await;
        *replica = restart(&mesh, &id, &[], 3, &load).await;
    }
    let (ok, failed) = load.stop().await;
    assert!(ok > 20, "{ok}");
    assert_eq!(failed, 0, "requests failed during the rolling restart");
}

#[tokio::test]
async fn pod_shutdown_through_pre_stop_hooks_stops_the_engine_after_its_last_stream() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let engine_flags = ["--decode-ms-per-token", "30"];
    let mut replicas = Vec::new();
    for i in 0..2 {
        replicas.push(
            mesh.start_replica(
                &format!("llama-{i}"),
                "llama-eu",
                "llama",
                "eu-west",
                &engine_flags,
            )
            .await,
        );
    }
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "stream": true, "max_tokens": 20,
        "messages": [{"role": "user", "content": "keep streaming"}]});
    wait::until("two replicas routable", Duration::from_secs(20), || async {
        (mesh.endpoint_ids("llama-eu").await.len() == 2).then_some(())
    })
    .await;
    mesh.wait_until_served(&url, &body).await;
    let load = SteadyLoad::start(&mesh.http, &url, &body, 4);
    load.wait_for(10, Duration::from_secs(20)).await;

    // As the kubelet deletes a pod: every container's preStop hook, as the
    // webhook injects them (the sidecar's runs `infermesh-sidecar
    // --prestop-hook` on the shared socket; the engine's waits for the
    // `drained` marker beside it), then each container gets its signal
    // when its own hook returns. The engine is killed outright, so any
    // request still on it would fail.
    for replica in &mut replicas {
        let id = replica.id.clone();
        let socket = replica.prestop_socket.clone();
        let marker = socket.with_file_name("drained");
        let sidecar_hook = tokio::process::Command::new(
            infermesh_integration_tests::binaries::path("infermesh-sidecar"),
        )
        .arg("--prestop-hook")
        .arg(&socket)
        .kill_on_drop(true)
        .output();
        let engine_hook = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "while [ -S '{}' ] && [ ! -e '{}' ]; do sleep 0.1; done",
                socket.display(),
                marker.display()
            ))
            .kill_on_drop(true)
            .output();
        let (sidecar_hook, engine_hook) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(sidecar_hook, engine_hook)
        })
        .await
        .expect("both preStop hooks return within 30 s");
        let sidecar_hook = sidecar_hook.expect("sidecar hook ran");
        assert!(sidecar_hook.status.success(), "{sidecar_hook:?}");
        let answered: serde_json::Value =
            serde_json::from_slice(&sidecar_hook.stdout).expect("the hook prints the answer");
        assert_eq!(answered["status"], "drained", "{answered}");
        assert_eq!(answered["in_flight"], 0);
        assert!(engine_hook.expect("engine hook ran").status.success());
        assert!(marker.exists(), "the engine's hook returned on the marker");
        replica.engine.kill().await;
        assert_eq!(
            replica.sidecar.terminate().await,
            Some(0),
            "{id}'s sidecar exited"
        );
        *replica = restart(&mesh, &id, &engine_flags, 2, &load).await;
    }
    let (ok, failed) = load.stop().await;
    assert!(ok > 20, "{ok}");
    assert_eq!(failed, 0, "requests failed while pods were deleted");
}
