//! The engine's knobs: served model, batch size, latency model, prefix
//! cache geometry, metric dialect and failure injection.

use std::net::SocketAddr;

use clap::Parser;

/// Which engine's metric names to expose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    /// `vllm:*` names.
    Vllm,
    /// `sglang:*` names.
    Sglang,
}

/// A simulated vLLM/SGLang OpenAI-compatible server.
#[derive(Debug, Clone, Parser)]
#[command(name = "infermesh-sim-engine", version)]
pub struct Config {
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long, env = "SIM_ENGINE_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Served model name.
    #[arg(long, env = "SIM_ENGINE_MODEL", default_value = "sim-model")]
    pub model: String,
    /// Requests decoded at once; the rest wait in a FIFO queue.
    #[arg(long, env = "SIM_ENGINE_MAX_NUM_SEQS", default_value_t = 8)]
    pub max_num_seqs: usize,
    /// Prefill time per uncached prompt token, microseconds.
    #[arg(long, env = "SIM_ENGINE_PREFILL_US_PER_TOKEN", default_value_t = 200)]
    pub prefill_us_per_token: u64,
    /// Fixed part of the time to first token, milliseconds.
    #[arg(long, env = "SIM_ENGINE_BASE_TTFT_MS", default_value_t = 5)]
    pub base_ttft_ms: u64,
    /// Delay between output tokens, milliseconds.
    #[arg(long, env = "SIM_ENGINE_DECODE_MS_PER_TOKEN", default_value_t = 10)]
    pub decode_ms_per_token: u64,
    /// Tokens per KV-cache block.
    #[arg(long, env = "SIM_ENGINE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache blocks in all (prefix cache capacity and the usage denominator).
    #[arg(long, env = "SIM_ENGINE_KV_CACHE_BLOCKS", default_value_t = 2048)]
    pub kv_cache_blocks: usize,
    /// Longest prompt + max_tokens accepted.
    #[arg(long, env = "SIM_ENGINE_MAX_MODEL_LEN", default_value_t = 8192)]
    pub max_model_len: usize,
    /// Metric names to expose.
    #[arg(
        long,
        env = "SIM_ENGINE_METRICS_DIALECT",
        value_enum,
        default_value = "vllm"
    )]
    pub metrics_dialect: Dialect,
    /// Fraction of completions answered 500.
    #[arg(long, env = "SIM_ENGINE_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of completions that never answer.
    #[arg(long, env = "SIM_ENGINE_HANG_RATE", default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Exit with status 1 on accepting this many completions (0: never).
    #[arg(long, env = "SIM_ENGINE_EXIT_AFTER", default_value_t = 0)]
    pub exit_after: u64,
    /// Start with /health failing.
    #[arg(long, env = "SIM_ENGINE_UNHEALTHY")]
    pub unhealthy: bool,
    /// Serve LoRA adapters loaded at run time (vLLM's `--enable-lora` with
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).
    #[arg(long, env = "SIM_ENGINE_ENABLE_LORA")]
    pub enable_lora: bool,
    /// Adapters in GPU slots at once (vLLM's `--max-loras`).
    #[arg(long, env = "SIM_ENGINE_MAX_LORAS", default_value_t = 4)]
    pub max_loras: usize,
    /// Time one adapter load takes, milliseconds.
    #[arg(long, env = "SIM_ENGINE_LORA_LOAD_MS", default_value_t = 100)]
    pub lora_load_ms: u64,
    /// Time added to the first token of a request whose adapter is not in
    /// a GPU slot, milliseconds.
    #[arg(long, env = "SIM_ENGINE_LORA_SWITCH_MS", default_value_t = 20)]
    pub lora_switch_ms: u64,
    /// Fail every adapter load (as a missing adapter path does).
    #[arg(long, env = "SIM_ENGINE_FAIL_LORA_LOADS")]
    pub fail_lora_loads: bool,
}

impl Config {
    /// Checks values clap cannot, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_num_seqs == 0 {
            return Err("--max-num-seqs: must be at least 1".into());
        }
        if self.block_size == 0 || self.kv_cache_blocks == 0 {
            return Err("--block-size and --kv-cache-blocks: must be at least 1".into());
        }
        for (flag, rate) in [
            ("--error-rate", self.error_rate),
            ("--hang-rate", self.hang_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{flag}: {rate} is not a fraction in [0, 1]"));
            }
        }
        Ok(())
    }
}
