//! API keys and rate limits through the real processes: keys made and
//! revoked with grpcurl, checked at every edge, and one key's request limit
//! held across three edges under uneven load, and across edges connected
//! to different control-plane replicas. An idle edge takes a burst the
//! global remainder covers, borrowing from the control plane's reserve.

use std::time::{Duration, Instant};

use http::Method;
use infermesh_integration_tests::client::{Http, Reply};
use infermesh_integration_tests::mesh::{Edge, Mesh, Replica};
use infermesh_integration_tests::wait;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(20);

fn chat(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1,
    })
}

async fn post(http: &Http, edge: &Edge, body: &Value, headers: &[(&str, &str)]) -> Reply {
    http.send(
        Method::POST,
        &format!("{}/v1/chat/completions", edge.url),
        Some(bytes::Bytes::from(body.to_string())),
        headers,
    )
    .await
    .expect("edge answers")
}

/// Waits until `http` gets a 200 for `model` through `edge`.
async fn until_served(http: &Http, edge: &Edge, model: &str) {
    wait::until(
        &format!("{model} served at {}", edge.url),
        DEADLINE,
        || async { (post(http, edge, &chat(model), &[]).await.status == 200).then_some(()) },
    )
    .await;
}

fn code(reply: &Reply) -> String {
    reply.json()["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn requests_need_a_valid_key_and_a_key_reaches_only_its_models() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    mesh.register("eu-west", "qwen", "qwen-eu").await;
    let _r = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let secret = mesh
        .create_key(
            "acme",
            json!({"allowed_models": ["llama"], "limits": {"requests_per_minute": 1000}}),
        )
        .await;
    let http = Http::with_key(&secret);
    until_served(&http, &edge, "llama").await;

    let anonymous = post(&http, &edge, &chat("llama"), &[("x-no-auth", "1")]).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(code(&anonymous), "invalid_api_key");
    assert!(anonymous.headers.contains_key("www-authenticate"));
    // The last character changed (to one it is not), so the forgery never equals the secret.
    let last = if secret.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{last}", &secret[..secret.len() - 1]);
    let wrong = post(
        &http,
        &edge,
        &chat("llama"),
        &[("authorization", &format!("Bearer {forged}"))],
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(
        !wrong.text().contains(&forged),
        "the secret is never echoed"
    );
    let by_header = post(&http, &edge, &chat("llama"), &[("x-api-key", &secret)]).await;
    assert_eq!(by_header.status, 200, "{}", by_header.text());
    assert_eq!(by_header.headers["x-ratelimit-limit-requests"], "1000");

    let forbidden = post(&http, &edge, &chat("qwen"), &[]).await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.text());
    assert_eq!(code(&forbidden), "model_not_allowed");
    let models = http.get(&format!("{}/v1/models", edge.url)).await.unwrap();
    let ids: Vec<_> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["llama"], "a key lists only the models it may call");

    // The admin API never shows the secret or its hash, and reports use.
    let id = secret.split('_').nth(1).unwrap();
    let listed = mesh
        .admin("ListApiKeys", json!({"tenant": "acme"}))
        .await
        .unwrap();
    let text = listed.to_string();
    assert!(
        !text.contains(&secret) && !text.contains("secretSha256"),
        "{text}"
    );
    assert_eq!(listed["keys"][0]["prefix"], format!("imk_{id}"));
    let bad = mesh
        .admin("CreateApiKey", json!({"tenant": "Not A Label"}))
        .await
        .unwrap_err();
    assert_eq!(bad.code, "InvalidArgument", "{bad:?}");
    assert!(bad.message.contains("tenant"), "{bad:?}");
    let expired = mesh
        .admin(
            "CreateApiKey",
            json!({"tenant": "acme", "expires_at_unix_ms": "1000"}),
        )
        .await
        .unwrap_err();
    assert!(
        expired.message.contains("expires_at_unix_ms"),
        "{expired:?}"
    );
}

#[tokio::test]
async fn revoked_key_is_refused_at_every_edge_within_one_push() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _r = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edges = [
        mesh.start_edge("eu-west", &[]).await,
        mesh.start_edge("eu-west", &[]).await,
    ];
    let secret = mesh.create_key("acme", json!({})).await;
    let http = Http::with_key(&secret);
    for edge in &edges {
        until_served(&http, edge, "llama").await;
    }
    let id = secret.split('_').nth(1).unwrap().to_string();
    let revoked_at = Instant::now();
    let revoked = mesh.admin("RevokeApiKey", json!({"id": id})).await.unwrap();
    assert_eq!(revoked["revoked"], true);
    for edge in &edges {
        wait::until("revoked key refused", Duration::from_secs(5), || async {
            (post(&http, edge, &chat("llama"), &[]).await.status == 401).then_some(())
        })
        .await;
    }
    let took = revoked_at.elapsed();
    eprintln!("revocation refused at both edges {took:?} after RevokeApiKey returned");
    assert!(took < Duration::from_secs(5));
    // And it stays refused: the key record is kept, marked revoked.
    let shown = mesh.admin("GetApiKey", json!({"id": id})).await.unwrap();
    assert_eq!(shown["revoked"], true);
}

/// Sends twice `limit` requests, one every 50 ms, to `edges` in the order
/// `pattern` repeats; asserts the admitted total is the limit plus the
/// refill over the run (within `tolerance` of the limit); admitted per edge.
async fn offer_twice_the_limit(
    http: &Http,
    edges: &[Edge],
    pattern: &[usize],
    limit: u64,
    tolerance: f64,
) -> Vec<u64> {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut calls = Vec::new();
    for i in 0..(2 * limit as usize) {
        tick.tick().await;
        let edge = edges[pattern[i % pattern.len()]].url.clone();
        let http = http.clone();
        calls.push(tokio::spawn(async move {
            let reply = http
                .send(
                    Method::POST,
                    &format!("{edge}/v1/chat/completions"),
                    Some(bytes::Bytes::from(chat("llama").to_string())),
                    &[],
                )
                .await
                .expect("edge answers");
            reply.status
        }));
    }
    let mut admitted = vec![0u64; edges.len()];
    let mut refused = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            200 => admitted[pattern[i % pattern.len()]] += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = admitted.iter().sum();
    // The bucket starts full and refills continuously over the minute.
    let expected = limit as f64 * (1.0 + elapsed / 60.0);
    eprintln!(
        "admitted {total} ({admitted:?}), refused {refused}, in {elapsed:.1}s; expected {expected:.1}"
    );
    assert!(
        (total as f64 - expected).abs() <= tolerance * limit as f64,
        "admitted {total}, expected {expected:.1} ± {tolerance} of {limit} ({admitted:?})"
    );
    admitted
}

/// Registers llama in eu-west with one replica that answers at once.
async fn one_fast_replica(mesh: &Mesh) -> Replica {
    mesh.register("eu-west", "llama", "llama-eu").await;
    mesh.start_replica(
        "llama-0",
        "llama-eu",
        "llama",
        "eu-west",
        &["--decode-ms-per-token", "0"],
    )
    .await
}

/// A key limited to `limit` requests per minute, known to every edge.
async fn limited_key(mesh: &Mesh, edges: &[Edge], limit: u64) -> Http {
    let secret = mesh
        .create_key("acme", json!({"limits": {"requests_per_minute": limit}}))
        .await;
    let http = Http::with_key(&secret);
    key_known(&http, edges).await;
    http
}

/// Waits until every edge knows the key `http` sends.
async fn key_known(http: &Http, edges: &[Edge]) {
    for edge in edges {
        wait::until("key pushed", DEADLINE, || async {
            (post(http, edge, &json!({"model": "llama"}), &[])
                .await
                .status
                == 400)
                .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn request_limit_holds_across_control_plane_replicas() {
    const LIMIT: u64 = 60;
    let mut mesh = Mesh::start().await;
    let _r = one_fast_replica(&mesh).await;
    // A second replica; each edge streams to its own replica.
    let second = format!(
        "127.0.0.1:{}",
        infermesh_integration_tests::binaries::free_port()
    );
    let second_metrics = format!(
        "127.0.0.1:{}",
        infermesh_integration_tests::binaries::free_port()
    );
    let _cp = mesh.spawn_control_plane("control-plane-b", &second, &second_metrics);
    let first = mesh.start_edge("eu-west", &[]).await;
    let original = std::mem::replace(&mut mesh.control_plane_address, second);
    let other = mesh.start_edge("eu-west", &[]).await;
    mesh.control_plane_address = original;
    let edges = [first, other];
    for edge in &edges {
        until_served(&mesh.http, edge, "llama").await;
    }
    let http = limited_key(&mesh, &edges, LIMIT).await;
    // 70/30 over edges on different control-plane replicas. Replicas move
    // their parts of the limit once a second, after the demand: 15%, where
    // a limit enforced per replica would admit about half as much again.
    offer_twice_the_limit(&http, &edges, &[0, 0, 0, 0, 0, 0, 0, 1, 1, 1], LIMIT, 0.15).await;
}

#[tokio::test]
async fn request_limit_holds_across_three_edges_under_uneven_load() {
    const LIMIT: u64 = 60;
    let mesh = Mesh::start().await;
    let _r = one_fast_replica(&mesh).await;
    let edges = [
        mesh.start_edge("eu-west", &[]).await,
        mesh.start_edge("eu-west", &[]).await,
        mesh.start_edge("eu-west", &[]).await,
    ];
    for edge in &edges {
        until_served(&mesh.http, edge, "llama").await;
    }
    // The key is known everywhere before the load starts.
    let http = limited_key(&mesh, &edges, LIMIT).await;
    // Twice the limit, 70/20/10 over the three edges, paced over about 6 s.
    let admitted =
        offer_twice_the_limit(&http, &edges, &[0, 0, 0, 0, 0, 0, 0, 1, 1, 2], LIMIT, 0.1).await;
    assert!(
        admitted[0] > LIMIT / 3 + 5,
        "the busy edge got more than a third: {admitted:?}"
    );
}

#[tokio::test]
async fn probing_for_models_spends_the_keys_requests() {
    let mesh = Mesh::start().await;
    let _r = one_fast_replica(&mesh).await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    until_served(&mesh.http, &edge, "llama").await;
    let http = limited_key(&mesh, std::slice::from_ref(&edge), 3).await;
    // Two probes spend two of the three requests.
    for model in ["no-such-model", "another-guess"] {
        let probe = post(&http, &edge, &chat(model), &[]).await;
        assert_eq!(probe.status, 404, "{}", probe.text());
    }
    let last = post(&http, &edge, &chat("llama"), &[]).await;
    assert_eq!(last.status, 200, "{}", last.text());
    let refused = post(&http, &edge, &chat("llama"), &[]).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.headers.contains_key("retry-after"));
}

/// `x-ratelimit-remaining-requests` of a reply.
fn remaining_requests(reply: &Reply) -> Option<i64> {
    reply
        .headers
        .get("x-ratelimit-remaining-requests")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn an_idle_edge_takes_a_burst_the_global_remainder_covers() {
    const LIMIT: u64 = 120;
    let mesh = Mesh::start().await;
    let _r = one_fast_replica(&mesh).await;
    // A loan is one round trip on the edge's stream; the default wait of
    // 20 ms is widened for debug builds sharing two cores with the fleet.
    let wait = ["--quota-borrow-wait-ms", "200"];
    let edges = [
        mesh.start_edge("eu-west", &wait).await,
        mesh.start_edge("eu-west", &wait).await,
    ];
    for edge in &edges {
        until_served(&mesh.http, edge, "llama").await;
    }
    let http = limited_key(&mesh, &edges, LIMIT).await;
    // Traffic at the first edge until it admits from a share-out: its
    // remaining count then falls by one a request, where its cold-start
    // half of the limit, scaled to the whole, falls by two. The same
    // share-out gave the idle edge its small part.
    let mut previous = None;
    let mut shared_out = false;
    let started = Instant::now();
    while !shared_out && started.elapsed() < DEADLINE {
        let reply = post(&http, &edges[0], &chat("llama"), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let now = remaining_requests(&reply);
        shared_out = matches!((previous, now), (Some(a), Some(b)) if a - b == 1);
        previous = now;
    }
    assert!(shared_out, "the first edge never admitted from a grant");
    let used = LIMIT as i64 - previous.unwrap_or(0);
    // A burst at the idle edge, all at once, well within what is left.
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (http, edge) = (http.clone(), edges[1].url.clone());
            tokio::spawn(async move {
                http.send(
                    Method::POST,
                    &format!("{edge}/v1/chat/completions"),
                    Some(bytes::Bytes::from(chat("llama").to_string())),
                    &[],
                )
                .await
                .expect("edge answers")
            })
        })
        .collect();
    let mut refused = Vec::new();
    for reply in burst {
        let reply = reply.await.unwrap();
        if reply.status != 200 {
            refused.push(format!("{} {}", reply.status, reply.text()));
        }
    }
    let metrics = mesh.http.get(&edges[1].metrics_url).await.unwrap().text();
    let loans: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("infermesh_edge_quota_loans_total"))
        .collect();
    assert!(
        refused.is_empty(),
        "about {used} of {LIMIT} used; refused: {refused:?}; loans: {loans:?}"
    );
    let lent = infermesh_integration_tests::scrape::value(
        &metrics,
        "infermesh_edge_quota_loans_total",
        &[("outcome", "lent")],
    );
    assert!(
        lent.unwrap_or(0.0) >= 1.0,
        "the idle edge borrowed: {lent:?}"
    );
}

#[tokio::test]
async fn guessing_keys_from_one_address_is_blocked_counted_and_logged_without_the_secret() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh
        .start_edge("eu-west", &["--auth-failures-per-minute", "5"])
        .await;
    let secret = mesh.create_key("acme", json!({})).await;
    let good = Http::with_key(&secret);
    until_served(&good, &edge, "llama").await;

    let guess = "imk_aaaaaaaaaaaa_notthesecretnotthesecret";
    let guesser = Http::with_key(guess);
    for _ in 0..5 {
        assert_eq!(post(&guesser, &edge, &chat("llama"), &[]).await.status, 401);
    }
    // Past its failures the address is refused without its key being
    // checked: even the right key waits for the minute to pass.
    let blocked = post(&guesser, &edge, &chat("llama"), &[]).await;
    assert_eq!(blocked.status, 429, "{}", blocked.text());
    assert!(blocked.headers.contains_key("retry-after"));
    assert!(
        blocked.text().contains("failed authentication"),
        "{}",
        blocked.text()
    );
    let right_key_same_address = post(&good, &edge, &chat("llama"), &[]).await;
    assert_eq!(right_key_same_address.status, 429);

    let metrics = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    let value = |outcome| {
        infermesh_integration_tests::scrape::value(
            &metrics,
            "infermesh_edge_auth_failures_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(value("unauthorized"), Some(5.0), "{metrics}");
    assert_eq!(value("blocked"), Some(2.0), "{metrics}");
    // Refused requests are in the request metrics and the access log too.
    let requests = |code, error| {
        infermesh_integration_tests::scrape::value(
            &metrics,
            "infermesh_edge_requests_total",
            &[("code", code), ("error", error)],
        )
    };
    assert_eq!(requests("401", "unauthorized"), Some(5.0), "{metrics}");
    assert_eq!(requests("429", "auth_failures"), Some(2.0), "{metrics}");
    let log = edge.process.log();
    assert!(log.contains("authentication failed"), "401s are logged");
    // Access lines are written in batches, shortly after the answer.
    wait::until(
        "every 401 to have its access-log line",
        Duration::from_secs(10),
        || {
            let lines = edge
                .process
                .log()
                .lines()
                .filter(|l| {
                    l.contains(r#""status":401"#) && l.contains(r#""error":"unauthorized""#)
                })
                .count();
            async move { (lines == 5).then_some(()) }
        },
    )
    .await;
    assert!(
        !log.contains("notthesecret"),
        "the guessed secret is never logged"
    );
}
