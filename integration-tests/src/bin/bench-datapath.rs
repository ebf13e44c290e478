//! `bench-datapath`: what each proxy adds to every request and every
//! token, against the same simulated engines, in one run on one machine so
//! the figures compare. Paths: straight to the engine; nginx as a plain
//! reverse proxy (keep-alive upstream, no buffering, no access log: the
//! lower bound); Envoy (static listener, router filter, no access log);
//! infermesh's edge straight to the engine (API key checked, limits,
//! metrics, access log, routing); and the full infermesh path, edge then
//! sidecar then engine, in plain HTTP and over mutual TLS.
//!
//! Non-streaming: latency at fixed open-loop rates and the highest rate
//! under a closed loop. Streaming: time to first token, and the gaps
//! between chunks of a stream the engine paces at 10 ms per token (what a
//! path adds to each chunk shows as the gap's spread beyond the engine's).
//!
//! `scripts/bench-datapath.sh` installs nginx and Envoy and runs this with
//! the release binaries; flags: `--nginx PATH`, `--envoy PATH` (a path is
//! skipped when absent), `--seconds S` per phase (default 5), `--rates
//! A,B` (default 100,400), `--concurrency C` (default 32), `--perf FILE`
//! (only record the edge's profile with perf under the closed loop).

use std::time::{Duration, Instant};

use infermesh_integration_tests::bench::{arg, arg_u64, percentile};
use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::process::Process;
use infermesh_integration_tests::wait;
use serde_json::{Value, json};

/// p50, p99 and failures at one rate.
type Percentiles = (Duration, Duration, usize);

/// One way to the engines.
struct Path {
    name: &'static str,
    /// Non-streaming endpoint and the model to ask for.
    fast: (String, &'static str),
    /// Streaming endpoint and model.
    stream: (String, &'static str),
}

fn body(model: &str, stream: bool) -> Value {
    if stream {
        json!({"model": model, "stream": true, "max_tokens": 32,
            "messages": [{"role": "user", "content": "hello"}]})
    } else {
        json!({"model": model, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]})
    }
}

/// Latencies of requests sent at `rate` per second (open loop) for `seconds`; and failures.
async fn at_rate(
    http: &Http,
    url: &str,
    body: &Value,
    rate: u64,
    seconds: u64,
) -> (Vec<Duration>, usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = Vec::new();
    for _ in 0..rate * seconds {
        tick.tick().await;
        let (http, url, body) = (http.clone(), url.to_string(), body.clone());
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let ok = http
                .post_json(&url, &body)
                .await
                .is_ok_and(|r| r.status == 200);
            ok.then(|| started.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(calls.len());
    let mut failed = 0;
    for call in calls {
        match call.await.ok().flatten() {
            Some(latency) => latencies.push(latency),
            None => failed += 1,
        }
    }
    latencies.sort();
    (latencies, failed)
}

/// Requests per second `concurrency` clients sustain back to back for `seconds`; and failures.
async fn closed_loop(
    http: &Http,
    url: &str,
    body: &Value,
    concurrency: usize,
    seconds: u64,
) -> (f64, usize) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, body) = (http.clone(), url.to_string(), body.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while Instant::now() < deadline {
                match http.post_json(&url, &body).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for worker in workers {
        let (o, f) = worker.await.unwrap_or((0, 1));
        ok += o;
        failed += f;
    }
    (ok as f64 / started.elapsed().as_secs_f64(), failed)
}

/// Times to first token and gaps between chunks of streams run by
/// `concurrency` clients for `seconds`; and failures.
async fn streams(
    http: &Http,
    url: &str,
    body: &Value,
    concurrency: usize,
    seconds: u64,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, body) = (http.clone(), url.to_string(), body.clone());
        workers.push(tokio::spawn(async move {
            let (mut ttfts, mut gaps, mut failed) = (Vec::new(), Vec::new(), 0usize);
            while Instant::now() < deadline {
                match http.post_stream(&url, &body).await {
                    Ok(s) if s.status == 200 && s.frames.len() > 2 => {
                        ttfts.push(s.headers_after + s.frames[0].0);
                        gaps.extend(s.frames.windows(2).map(|w| w[1].0 - w[0].0));
                    }
                    _ => failed += 1,
                }
            }
            (ttfts, gaps, failed)
        }));
    }
    let (mut ttfts, mut gaps, mut failed) = (Vec::new(), Vec::new(), 0);
    for worker in workers {
        if let Ok((t, g, f)) = worker.await {
            ttfts.extend(t);
            gaps.extend(g);
            failed += f;
        }
    }
    ttfts.sort();
    gaps.sort();
    (ttfts, gaps, failed)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn us_signed(a: Duration, b: Duration) -> String {
    format!("{:+.0}", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}

/// nginx as a plain reverse proxy with `workers` worker processes.
fn nginx_config(dir: &std::path::Path, workers: u64, routes: &[(u16, u16)]) -> String {
    let mut servers = String::new();
    for (i, (listen, upstream)) in routes.iter().enumerate() {
        servers.push_str(&format!(
            "  upstream engine{i} {{ server 127.0.0.1:{upstream}; keepalive 256; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      proxy_pass http://engine{i};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_request_buffering off;\n    }}\n  }}\n"
        ));
    }
    let d = dir.display();
    format!(
        "worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n  keepalive_requests 1000000;\n{servers}}}\n"
    )
}

/// Envoy with a listener and a cluster per route, no admin interface.
fn envoy_config(routes: &[(u16, u16)]) -> String {
    let mut listeners = String::new();
    let mut clusters = String::new();
    for (i, (listen, upstream)) in routes.iter().enumerate() {
        listeners.push_str(&format!(
            r#"  - name: l{i}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l{i}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: c{i}, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        ));
        clusters.push_str(&format!(
            r#"  - name: c{i}
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: c{i}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
"#
        ));
    }
    format!("static_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}")
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("url with a port")
}

/// Sends `kill -QUIT` to nginx's master (a graceful stop of every worker) when dropped.
struct NginxGuard(Process);

impl Drop for NginxGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
    }
}

async fn until_ok(http: &Http, url: &str, body: &Value) {
    wait::until(
        &format!("{url} to answer"),
        Duration::from_secs(30),
        || async {
            http.post_json(url, body)
                .await
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ())
        },
    )
    .await;
}

#[tokio::main]
async fn main() {
    let seconds = arg_u64("--seconds", 5);
    let concurrency = arg_u64("--concurrency", 32) as usize;
    let rates: Vec<u64> = arg("--rates", "100,400")
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let nginx = arg("--nginx", "");
    let envoy = arg("--envoy", "");

    let mesh = Mesh::start().await;
    let engine_flags = |decode: &'static str| {
        [
            "--base-ttft-ms",
            "0",
            "--prefill-us-per-token",
            "0",
            "--decode-ms-per-token",
            decode,
            "--max-num-seqs",
            "1024",
        ]
    };
    let (fast_engine, _fast) = mesh.start_engine("fast", "sim", &engine_flags("0")).await;
    let (stream_engine, _stream) = mesh
        .start_engine("stream", "sim-stream", &engine_flags("10"))
        .await;
    // Region "direct": the sidecars register their engine's own address, so
    // the edge sends straight to the engine; region "full": edge, sidecar,
    // engine in plain HTTP; region "mtls": the same over mutual TLS (the
    // default).
    let mut sidecars = Vec::new();
    for (region, advertise, tls) in [
        ("direct", true, "off"),
        ("full", false, "off"),
        ("mtls", false, "mutual"),
    ] {
        for (model, engine) in [("sim", &fast_engine), ("sim-stream", &stream_engine)] {
            let pool = format!("{model}-{region}");
            mesh.register(region, model, &pool).await;
            let address = engine.trim_start_matches("http://").to_string();
            let pair = mesh.pki.sidecar(region, &pool, &pool);
            let identity = [
                "--control-plane-ca",
                mesh.pki.ca_cert.to_str().expect("UTF-8 path"),
                "--control-plane-cert",
                pair.cert.to_str().expect("UTF-8 path"),
                "--control-plane-key",
                pair.key.to_str().expect("UTF-8 path"),
                "--serve-tls",
                tls,
            ]
            .map(String::from)
            .to_vec();
            sidecars.push(
                mesh.start_sidecar_as(
                    &pool,
                    &pool,
                    model,
                    region,
                    engine,
                    advertise.then_some(address.as_str()),
                    identity,
                )
                .await,
            );
        }
    }
    let plain = ["--upstream-tls", "off"];
    let edge = mesh.start_edge("direct", &plain).await;
    // The same edge, every connection resting as soon as it idles (instead
    // of after 1 s for up to 32 of them): what resting costs.
    let resting_edge = mesh
        .start_edge(
            "direct",
            &["--upstream-tls", "off", "--idle-connection-rest-ms", "0"],
        )
        .await;
    let full_edge = mesh.start_edge("full", &plain).await;
    let mtls_edge = mesh.start_edge("mtls", &[]).await;
    let routes = [
        (free_port(), port_of(&fast_engine)),
        (free_port(), port_of(&stream_engine)),
    ];
    let url = |port: u16| format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut paths = vec![Path {
        name: "direct to the engine",
        fast: (format!("{fast_engine}/v1/chat/completions"), "sim"),
        stream: (format!("{stream_engine}/v1/chat/completions"), "sim-stream"),
    }];
    let mut _guards = Vec::new();
    if std::path::Path::new(&nginx).exists() {
        let config = mesh.dir.path().join("nginx.conf");
        std::fs::write(&config, nginx_config(mesh.dir.path(), 2, &routes)).expect("nginx config");
        let process = Process::spawn(
            "nginx",
            std::path::Path::new(&nginx),
            &[
                "-c".into(),
                config.display().to_string(),
                "-g".into(),
                "daemon off;".into(),
            ],
            mesh.dir.path(),
            &[],
        );
        _guards.push(Box::new(NginxGuard(process)) as Box<dyn Send>);
        paths.push(Path {
            name: "nginx",
            fast: (url(routes[0].0), "sim"),
            stream: (url(routes[1].0), "sim-stream"),
        });
    }
    let envoy_routes = [(free_port(), routes[0].1), (free_port(), routes[1].1)];
    if std::path::Path::new(&envoy).exists() {
        let config = mesh.dir.path().join("envoy.yaml");
        std::fs::write(&config, envoy_config(&envoy_routes)).expect("envoy config");
        let process = Process::spawn(
            "envoy",
            std::path::Path::new(&envoy),
            &[
                "--config-path".into(),
                config.display().to_string(),
                "--concurrency".into(),
                "2".into(),
                "--disable-hot-restart".into(),
                "--log-level".into(),
                "warn".into(),
            ],
            mesh.dir.path(),
            &[],
        );
        _guards.push(Box::new(process) as Box<dyn Send>);
        paths.push(Path {
            name: "Envoy",
            fast: (url(envoy_routes[0].0), "sim"),
            stream: (url(envoy_routes[1].0), "sim-stream"),
        });
    }
    let edge_url = format!("{}/v1/chat/completions", edge.url);
    paths.push(Path {
        name: "infermesh edge",
        fast: (edge_url.clone(), "sim"),
        stream: (edge_url, "sim-stream"),
    });
    let resting_url = format!("{}/v1/chat/completions", resting_edge.url);
    paths.push(Path {
        name: "infermesh edge, resting at once",
        fast: (resting_url.clone(), "sim"),
        stream: (resting_url, "sim-stream"),
    });
    let full_url = format!("{}/v1/chat/completions", full_edge.url);
    paths.push(Path {
        name: "infermesh edge + sidecar",
        fast: (full_url.clone(), "sim"),
        stream: (full_url, "sim-stream"),
    });
    let mtls_url = format!("{}/v1/chat/completions", mtls_edge.url);
    paths.push(Path {
        name: "infermesh edge + sidecar, mutual TLS",
        fast: (mtls_url.clone(), "sim"),
        stream: (mtls_url, "sim-stream"),
    });

    let http = mesh.http.clone();
    for path in &paths {
        until_ok(&http, &path.fast.0, &body(path.fast.1, false)).await;
        until_ok(&http, &path.stream.0, &body(path.stream.1, false)).await;
        // Warm connection pools and caches.
        at_rate(&http, &path.fast.0, &body(path.fast.1, false), 200, 1).await;
    }

    // `--perf FILE`: record the edge's CPU profile (perf, call graphs)
    // under the closed loop instead of measuring.
    let perf = arg("--perf", "");
    if !perf.is_empty() {
        let pid = edge.process.pid().expect("edge pid").to_string();
        let record = tokio::process::Command::new("perf")
            .args([
                "record", "-F", "999", "-g", "-o", &perf, "-p", &pid, "--", "sleep",
            ])
            .arg(seconds.to_string())
            .spawn()
            .expect("perf runs");
        let edge_path = paths
            .iter()
            .find(|p| p.name == "infermesh edge")
            .expect("the edge's path");
        let (rps, _) = closed_loop(
            &http,
            &edge_path.fast.0,
            &body(edge_path.fast.1, false),
            concurrency,
            seconds,
        )
        .await;
        let _ = record.wait_with_output().await;
        eprintln!("profiled the edge at {rps:.0} req/s into {perf}");
        return;
    }

    println!("## Data path: infermesh against nginx and Envoy\n");
    println!(
        "One run, {seconds} s per phase, every path against the same simulated engines (no delay for the non-streamed requests, 8 tokens; 10 ms per token for the streams, 32 tokens).\n"
    );
    let mut latency_rows: Vec<(String, Vec<Percentiles>)> = Vec::new();
    for path in &paths {
        let mut cells = Vec::new();
        for &rate in &rates {
            let (lat, failed) = at_rate(
                &http,
                &path.fast.0,
                &body(path.fast.1, false),
                rate,
                seconds,
            )
            .await;
            cells.push((percentile(&lat, 0.5), percentile(&lat, 0.99), failed));
        }
        eprintln!("{}: latency {:?}", path.name, cells);
        latency_rows.push((path.name.to_string(), cells));
    }
    let direct = latency_rows[0].1.clone();
    let nginx_row = latency_rows
        .iter()
        .find(|(n, _)| n == "nginx")
        .map(|(_, c)| c.clone());
    print!("| path |");
    for rate in &rates {
        print!(" p50 @{rate}/s (ms) | p99 @{rate}/s (ms) | added p99 @{rate}/s (µs) |");
    }
    println!(" added p99 / nginx's |");
    print!("|---|");
    for _ in &rates {
        print!("---:|---:|---:|");
    }
    println!("---:|");
    for (name, cells) in &latency_rows {
        print!("| {name} |");
        for (i, (p50, p99, failed)) in cells.iter().enumerate() {
            let failed = if *failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            };
            print!(
                " {} | {}{failed} | {} |",
                ms(*p50),
                ms(*p99),
                us_signed(*p99, direct[i].1)
            );
        }
        let last = rates.len() - 1;
        let ratio = nginx_row.as_ref().map_or("n/a".to_string(), |n| {
            let added = cells[last].1.as_secs_f64() - direct[last].1.as_secs_f64();
            let nginx_added = n[last].1.as_secs_f64() - direct[last].1.as_secs_f64();
            if nginx_added > 0.0 {
                format!("{:.2}", added / nginx_added)
            } else {
                "n/a".into()
            }
        });
        println!(" {ratio} |");
    }

    println!("\nHighest rate, {concurrency} clients back to back:\n");
    println!("| path | requests/s | failed | / Envoy's |");
    println!("|---|---:|---:|---:|");
    let mut throughput = Vec::new();
    for path in &paths {
        let (rps, failed) = closed_loop(
            &http,
            &path.fast.0,
            &body(path.fast.1, false),
            concurrency,
            seconds,
        )
        .await;
        eprintln!("{}: {rps:.0} req/s", path.name);
        throughput.push((path.name, rps, failed));
    }
    let envoy_rps = throughput
        .iter()
        .find(|(n, _, _)| *n == "Envoy")
        .map(|t| t.1);
    for (name, rps, failed) in &throughput {
        let ratio = envoy_rps.map_or("n/a".to_string(), |e| format!("{:.2}", rps / e));
        println!("| {name} | {rps:.0} | {failed} | {ratio} |");
    }

    let stream_clients = (concurrency / 2).max(1);
    println!("\nStreams, {stream_clients} clients back to back (32 chunks 10 ms apart):\n");
    println!(
        "| path | TTFT p50 (ms) | TTFT p99 (ms) | chunk gap p50 (ms) | chunk gap p99 (ms) | added per chunk p99 (µs) | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut direct_gap = None;
    for path in &paths {
        let (ttfts, gaps, failed) = streams(
            &http,
            &path.stream.0,
            &body(path.stream.1, true),
            stream_clients,
            seconds,
        )
        .await;
        if ttfts.is_empty() {
            println!("| {} | | | | | | {failed} |", path.name);
            continue;
        }
        let gap99 = percentile(&gaps, 0.99);
        let base = *direct_gap.get_or_insert(gap99);
        println!(
            "| {} | {} | {} | {} | {} | {} | {failed} |",
            path.name,
            ms(percentile(&ttfts, 0.5)),
            ms(percentile(&ttfts, 0.99)),
            ms(percentile(&gaps, 0.5)),
            ms(gap99),
            us_signed(gap99, base),
        );
    }
    drop(sidecars);
}
