//! `bench-ingest`: what load reports cost the control plane at fleet scale.
//! Opens N load-report streams as sidecars (real gRPC over mutual TLS, one
//! process), each registering an endpoint (an etcd lease and key, as a real
//! sidecar does) and then reporting its load every second, and measures the
//! control plane's CPU and resident memory over a window once every
//! endpoint is registered, with the reports per second it took.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ulimit -n 30000
//! INFERMESH_BIN_DIR=target/release target/release/bench-ingest --sidecars 1000,10000 --seconds 20
//! ```
//! `--lease-ttl-seconds` sets the endpoint lease (default 5, the control
//! plane's default).
//! Prints a Markdown table.

use std::time::{Duration, Instant};

use infermesh_integration_tests::bench::{arg, arg_u64};
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use infermesh_proto::v1::load_report_service_client::LoadReportServiceClient;
use infermesh_proto::v1::{EngineKind, Load, LoadReportRequest, Register, load_report_request};
use infermesh_runtime::control_plane::ControlPlaneClient;
use infermesh_runtime::tls::{PeerRole, client_config};
use rand::Rng;
use tokio_stream::wrappers::ReceiverStream;

/// One simulated sidecar: registers (again after any failure, with
/// backoff, as a real sidecar does), then reports every `interval` until aborted.
async fn sidecar(client: ControlPlaneClient, address: String, id: String, interval: Duration) {
    let mut backoff = infermesh_runtime::backoff::Backoff::default();
    loop {
        report(&client, &address, &id, interval).await;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One registration and its reports, until the stream fails.
async fn report(client: &ControlPlaneClient, address: &str, id: &str, interval: Duration) {
    let Ok(channel) = client.connect(address, Duration::from_secs(60)).await else {
        return;
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let register = Register {
        endpoint_id: id.to_string(),
        pool: "llama-eu".into(),
        model: "llama".into(),
        region: "eu-west".into(),
        zone: "eu-west-a".into(),
        address: format!("127.0.0.1:{}", rand::rng().random_range(20000..60000)),
        engine: EngineKind::Vllm as i32,
        fingerprint: String::new(),
    };
    let message = |kind| LoadReportRequest { kind: Some(kind) };
    let _ = tx
        .send(message(load_report_request::Kind::Register(register)))
        .await;
    let Ok(response) = LoadReportServiceClient::new(channel)
        .report(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = response.into_inner();
    // Reports spread over the interval, as independent sidecars' would be.
    let offset = rand::rng().random_range(0..interval.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(offset)).await;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            answer = inbound.message() => match answer {
                Ok(Some(_)) => continue,
                _ => return,
            },
        }
        let load = {
            let mut rng = rand::rng();
            Load {
                running: rng.random_range(0..16),
                waiting: rng.random_range(0..4),
                kv_cache_usage: rng.random_range(0.0..1.0),
                prefix_cache_hit_rate: rng.random_range(0.0..1.0),
                engine_healthy: true,
                observed_at_unix_ms: infermesh_runtime::time::now_unix_ms(),
                ..Default::default()
            }
        };
        if tx
            .send(message(load_report_request::Kind::Load(load)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A counter or gauge's value in Prometheus text, summed over its series.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = arg("--sidecars", "1000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let seconds = arg_u64("--seconds", 20);
    let mut mesh = Mesh::start().await;
    // The control plane's default endpoint lease (tests use 2 s).
    mesh.lease_ttl_seconds = arg_u64("--lease-ttl-seconds", 5) as u32;
    // Every simulated sidecar shares one certificate, so registrations
    // cannot be bound to an endpoint or limited per identity here.
    mesh.control_plane_extra = [
        "--allow-unbound-sidecars",
        "--registrations-per-minute",
        "100000000",
    ]
    .map(String::from)
    .to_vec();
    mesh.kill_control_plane().await;
    mesh.start_control_plane().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let cert = mesh.pki.client(PeerRole::Sidecar, "bench");
    let tls = client_config(&mesh.pki.ca_cert, Some((&cert.cert, &cert.key))).expect("client TLS");
    let client = ControlPlaneClient::tls(tls);
    let pid = mesh
        .control_plane
        .as_ref()
        .and_then(|p| p.pid())
        .expect("control plane pid");
    let ticks_per_second = 100.0;
    let metrics = |mesh: &Mesh| {
        let url = mesh.control_plane_metrics_url.clone();
        let http = mesh.http.clone();
        async move { http.get(&url).await.map(|r| r.text()).unwrap_or_default() }
    };

    let etcd_pid = mesh.etcd.pid().expect("etcd pid");
    let own_pid = std::process::id();
    println!(
        "| sidecars | registered in s | reports/s | control-plane CPU (cores) | control-plane RSS MiB | etcd CPU (cores) | benchmark process CPU (cores) | target |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (round, &n) in sizes.iter().enumerate() {
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tasks.push(tokio::spawn(sidecar(
                client.clone(),
                mesh.control_plane_address.clone(),
                format!("ingest-{round}-{i}"),
                Duration::from_secs(1),
            )));
            // Pods come up over time, not in one instant.
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        wait::until(
            "every endpoint registered",
            Duration::from_secs(600),
            || async {
                let text = metrics(&mesh).await;
                (metric(&text, "infermesh_control_plane_pool_serving_endpoints") as usize >= n)
                    .then_some(())
            },
        )
        .await;
        let registered = started.elapsed();
        // Let the ramp-up's writes settle, then measure a window.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let others_before = (cpu_ticks(etcd_pid), cpu_ticks(own_pid));
        let before = (
            cpu_ticks(pid),
            metric(
                &metrics(&mesh).await,
                "infermesh_control_plane_load_reports_total",
            ),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let others_after = (cpu_ticks(etcd_pid), cpu_ticks(own_pid));
        let after = (
            cpu_ticks(pid),
            metric(
                &metrics(&mesh).await,
                "infermesh_control_plane_load_reports_total",
            ),
            Instant::now(),
        );
        let window = (after.2 - before.2).as_secs_f64();
        let cores = |before: Option<u64>, after: Option<u64>| match (before, after) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / ticks_per_second / window,
            _ => f64::NAN,
        };
        let etcd_cores = cores(others_before.0, others_after.0);
        let own_cores = cores(others_before.1, others_after.1);
        let cores = cores(before.0, after.0);
        let reports = (after.1 - before.1) / window;
        let rss = mesh
            .control_plane
            .as_ref()
            .and_then(|p| p.rss_bytes())
            .map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0));
        let target = if n >= 10_000 {
            "10,000 reports/s in 1 core, < 1 GiB"
        } else {
            ""
        };
        println!(
            "| {n} | {:.1} | {reports:.0} | {cores:.2} | {rss:.1} | {etcd_cores:.2} | {own_cores:.2} | {target} |",
            registered.as_secs_f64()
        );
        for task in tasks {
            task.abort();
        }
        wait::until("every endpoint gone", Duration::from_secs(600), || async {
            let text = metrics(&mesh).await;
            (metric(&text, "infermesh_control_plane_pool_serving_endpoints") < 1.0).then_some(())
        })
        .await;
    }
}
