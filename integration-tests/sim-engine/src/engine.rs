//! The simulated GPU: a bounded running batch with a FIFO waiting queue,
//! prefill time that grows with the prompt's uncached tokens, a per-token
//! decode delay, KV-cache accounting, and the counters `/metrics` shows.
//! Generation stops as soon as nobody listens (a client that went away).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};

use crate::config::Config;
use crate::prefix_cache::{PrefixCache, block_keys};
use crate::tokens::output_word;

/// Time-to-first-token histogram bucket bounds, seconds (vLLM's).
pub const TTFT_BUCKETS: [f64; 17] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0,
];

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: AtomicU64,
    /// Prompt tokens found there.
    pub prefix_hits: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Requests finished because they reached max_tokens.
    pub finished_length: AtomicU64,
    /// Requests abandoned by their client.
    pub finished_abort: AtomicU64,
    /// Time-to-first-token observations per bucket (last is +Inf).
    pub ttft_buckets: [AtomicU64; TTFT_BUCKETS.len() + 1],
    /// Sum of time to first token, microseconds.
    pub ttft_sum_us: AtomicU64,
}

/// The engine's shared state.
#[derive(Debug)]
pub struct Engine {
    /// Settings.
    pub config: Config,
    slots: Semaphore,
    /// Requests decoding now.
    pub running: AtomicUsize,
    /// Requests queued for a slot.
    pub waiting: AtomicUsize,
    kv_blocks_in_use: AtomicUsize,
    cache: Mutex<PrefixCache>,
    /// Counters for `/metrics`.
    pub counters: Counters,
    /// What `/health` answers.
    pub healthy: AtomicBool,
    error_rate_ppm: AtomicU64,
    accepted: AtomicU64,
    last_request: Mutex<(bytes::Bytes, Heard)>,
    /// LoRA adapters.
    pub loras: crate::lora::Loras,
}

/// What the engine keeps of a request's headers.
#[derive(Debug, Clone, Default)]
pub struct Heard {
    /// Its `traceparent`.
    pub traceparent: Option<String>,
    /// Comma-separated names of the credential headers it carried.
    pub credentials: String,
}

/// What one generation produces, in order.
#[derive(Debug)]
pub enum Event {
    /// One output token's text.
    Token(String),
    /// The end, with token counts.
    Done(Usage),
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: usize,
    /// Generated tokens.
    pub completion: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached: usize,
}

/// What to do with an accepted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Serve it.
    Serve,
    /// Answer 500.
    Fail,
    /// Never answer.
    Hang,
}

impl Engine {
    /// An idle engine.
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            slots: Semaphore::new(config.max_num_seqs),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            kv_blocks_in_use: AtomicUsize::new(0),
            cache: Mutex::new(PrefixCache::new(config.kv_cache_blocks)),
            counters: Counters::default(),
            healthy: AtomicBool::new(!config.unhealthy),
            error_rate_ppm: AtomicU64::new((config.error_rate * 1e6) as u64),
            accepted: AtomicU64::new(0),
            last_request: Mutex::new((bytes::Bytes::new(), Heard::default())),
            loras: crate::lora::Loras::default(),
            config,
        })
    }

    /// Keeps `body` and what was heard of its headers as the last inference request received.
    pub fn remember_request(&self, body: &bytes::Bytes, heard: Heard) {
        *self.last_request.lock().unwrap_or_else(|e| e.into_inner()) = (body.clone(), heard);
    }

    /// The body of the last inference request, byte for byte, and what
    /// was heard of its headers (`GET /sim/last-request`).
    pub fn last_request(&self) -> (bytes::Bytes, Heard) {
        self.last_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the injected error rate at run time.
    pub fn set_error_rate(&self, rate: f64) {
        self.error_rate_ppm
            .store((rate.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// KV-cache use as a fraction of all blocks.
    pub fn kv_cache_usage(&self) -> f64 {
        (self.kv_blocks_in_use.load(Ordering::Relaxed) as f64 / self.config.kv_cache_blocks as f64)
            .min(1.0)
    }

    /// Counts an accepted completion and draws its injected fate; exits the
    /// process when `--exit-after` is reached.
    pub fn accept(&self) -> Fate {
        let n = self.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        if self.config.exit_after > 0 && n >= self.config.exit_after {
            eprintln!("exiting after {n} requests (--exit-after)");
            std::process::exit(1);
        }
        let draw: f64 = rand::random();
        let error_rate = self.error_rate_ppm.load(Ordering::Relaxed) as f64 / 1e6;
        if draw < error_rate {
            Fate::Fail
        } else if draw < error_rate + self.config.hang_rate {
            Fate::Hang
        } else {
            Fate::Serve
        }
    }

    /// Queues, prefills and decodes one request of `choices` sequences
    /// side by side, sending events to `out` until done or until `out` is
    /// closed.
    pub async fn generate(
        self: Arc<Self>,
        tokens: Vec<u32>,
        max_tokens: usize,
        choices: usize,
        adapter: Option<String>,
        out: mpsc::Sender<Event>,
    ) {
        let arrived = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::select! {
            permit = self.slots.acquire() => permit,
            _ = out.closed() => {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                self.counters.finished_abort.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let Ok(_permit) = permit else { return };
        let bs = self.config.block_size;
        let blocks = (tokens.len() + max_tokens).div_ceil(bs);
        let _running = Running::start(&self, blocks);

        // An adapter's KV blocks are its own: the same prompt under another
        // adapter (or the base model) shares nothing.
        let keys = match &adapter {
            Some(name) => {
                let salt = name
                    .bytes()
                    .fold(0x9e37_79b9u32, |h, b| h.rotate_left(5) ^ u32::from(b));
                let salted: Vec<u32> = std::iter::once(salt)
                    .chain(tokens.iter().copied())
                    .collect();
                block_keys(&salted, bs)
            }
            None => block_keys(&tokens, bs),
        };
        let switch = adapter.as_deref().map_or(Duration::ZERO, |name| {
            self.loras.use_adapter(&self.config, name)
        });
        let hit_blocks = match self.cache.lock() {
            Ok(mut cache) => cache.admit(&keys),
            Err(_) => 0,
        };
        let cached = (hit_blocks * bs).min(tokens.len());
        let c = &self.counters;
        c.prefix_queries
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        c.prefix_hits.fetch_add(cached as u64, Ordering::Relaxed);
        c.prompt_tokens
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        let prefill = switch
            + Duration::from_millis(self.config.base_ttft_ms)
            + Duration::from_micros(
                self.config.prefill_us_per_token * (tokens.len() - cached) as u64,
            );
        let decode = Duration::from_millis(self.config.decode_ms_per_token);
        for i in 0..max_tokens {
            let delay = if i == 0 { prefill } else { decode };
            // No delay means none: a zero sleep still waits for the timer's
            // next millisecond tick.
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = out.closed() => {
                        c.finished_abort.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            if i == 0 {
                self.observe_ttft(arrived.elapsed());
            }
            c.generation_tokens
                .fetch_add(choices as u64, Ordering::Relaxed);
            if out
                .send(Event::Token(output_word(&tokens, i)))
                .await
                .is_err()
            {
                c.finished_abort.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        c.finished_length.fetch_add(1, Ordering::Relaxed);
        let usage = Usage {
            prompt: tokens.len(),
            completion: max_tokens * choices,
            cached,
        };
        let _ = out.send(Event::Done(usage)).await;
    }

    fn observe_ttft(&self, ttft: Duration) {
        let seconds = ttft.as_secs_f64();
        let bucket = TTFT_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(TTFT_BUCKETS.len());
        self.counters.ttft_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.counters
            .ttft_sum_us
            .fetch_add(ttft.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Counts a request as running and its KV blocks as used while it lives.
struct Running<'a> {
    engine: &'a Engine,
    blocks: usize,
}

impl<'a> Running<'a> {
    fn start(engine: &'a Engine, blocks: usize) -> Self {
        engine.running.fetch_add(1, Ordering::Relaxed);
        engine.kv_blocks_in_use.fetch_add(blocks, Ordering::Relaxed);
        Self { engine, blocks }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.engine.running.fetch_sub(1, Ordering::Relaxed);
        self.engine
            .kv_blocks_in_use
            .fetch_sub(self.blocks, Ordering::Relaxed);
    }
}
