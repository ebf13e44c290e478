//! A simulated vLLM/SGLang engine: the OpenAI API with SSE streaming, a
//! bounded running batch and waiting queue, prefill time that follows the
//! prompt's uncached tokens, an LRU prefix cache, vLLM's metric names,
//! LoRA adapters loaded at run time, and failure injection. It stands in for GPUs in tests and local runs.

pub mod api;
pub mod config;
pub mod engine;
pub mod extras;
pub mod lora;
pub mod metrics;
pub mod prefix_cache;
pub mod server;
pub mod stream;
pub mod tokens;
