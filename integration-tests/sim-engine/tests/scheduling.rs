//! The engine's GPU model on tokio's paused clock: the running batch is
//! bounded and the rest queue, a repeated prompt finds its prefix cached,
//! and a client that goes away frees its slot.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use infermesh_sim_engine::config::Config;
use infermesh_sim_engine::engine::{Engine, Event, Usage};
use infermesh_sim_engine::tokens::tokenize;
use tokio::sync::mpsc;

fn engine(flags: &[&str]) -> Arc<Engine> {
    let mut args = vec!["sim"];
    args.extend_from_slice(flags);
    Engine::new(Config::parse_from(args))
}

async fn run_to_end(engine: &Arc<Engine>, prompt: &str, max_tokens: usize) -> Usage {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(
        engine
            .clone()
            .generate(tokenize(prompt), max_tokens, 1, None, tx),
    );
    let mut tokens = 0;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token(_) => tokens += 1,
            Event::Done(usage) => {
                assert_eq!(tokens, max_tokens);
                return usage;
            }
        }
    }
    panic!("generation ended without Done");
}

#[tokio::test(start_paused = true)]
async fn requests_beyond_the_batch_wait_in_the_queue() {
    let engine = engine(&["--max-num-seqs", "1", "--decode-ms-per-token", "100"]);
    let first = tokio::spawn({
        let e = engine.clone();
        async move { run_to_end(&e, "first request", 5).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn({
        let e = engine.clone();
        async move { run_to_end(&e, "second request", 5).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(engine.running.load(Ordering::Relaxed), 1);
    assert_eq!(engine.waiting.load(Ordering::Relaxed), 1);
    assert!(engine.kv_cache_usage() > 0.0);
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(engine.running.load(Ordering::Relaxed), 0);
    assert_eq!(engine.waiting.load(Ordering::Relaxed), 0);
    assert_eq!(
        engine.kv_cache_usage(),
        0.0,
        "finished requests free their blocks"
    );
}

#[tokio::test(start_paused = true)]
async fn a_repeated_prompt_hits_the_prefix_cache_and_starts_sooner() {
    let engine = engine(&["--block-size", "4", "--prefill-us-per-token", "1000"]);
    let prompt = (0..64)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let start = tokio::time::Instant::now();
    let cold = run_to_end(&engine, &prompt, 1).await;
    let cold_ttft = start.elapsed();
    let start = tokio::time::Instant::now();
    let warm = run_to_end(&engine, &prompt, 1).await;
    let warm_ttft = start.elapsed();
    assert_eq!(cold.cached, 0);
    assert_eq!(warm.cached, 64, "every full block of the prompt was cached");
    assert!(
        warm_ttft < cold_ttft,
        "warm {warm_ttft:?} vs cold {cold_ttft:?}"
    );
    assert_eq!(engine.counters.prefix_hits.load(Ordering::Relaxed), 64);
    assert_eq!(engine.counters.prefix_queries.load(Ordering::Relaxed), 128);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_frees_its_slot() {
    let engine = engine(&["--max-num-seqs", "1", "--decode-ms-per-token", "100"]);
    let (tx, mut rx) = mpsc::channel(64);
    let generation =
        tokio::spawn(
            engine
                .clone()
                .generate(tokenize("long answer"), 1000, 1, None, tx),
        );
    assert!(matches!(rx.recv().await, Some(Event::Token(_))));
    assert_eq!(engine.running.load(Ordering::Relaxed), 1);
    drop(rx);
    generation.await.unwrap();
    assert_eq!(engine.running.load(Ordering::Relaxed), 0);
    assert_eq!(engine.counters.finished_abort.load(Ordering::Relaxed), 1);
    run_to_end(&engine, "next", 2).await;
}
