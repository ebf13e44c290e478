//! Everything the sidecar learns from its engine on localhost: the
//! Prometheus metrics (queue, running, KV cache, prefix cache) and the
//! health probe, turned into one `Load` every scrape interval.

pub mod metrics;
pub mod scrape;

/// The engine family, which decides the metric names read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// vLLM's OpenAI server.
    Vllm,
    /// SGLang's OpenAI server.
    Sglang,
}

impl EngineKind {
    /// The engine's name, as the flag takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
        }
    }

    /// The wire value.
    pub fn to_proto(self) -> infermesh_proto::v1::EngineKind {
        match self {
            EngineKind::Vllm => infermesh_proto::v1::EngineKind::Vllm,
            EngineKind::Sglang => infermesh_proto::v1::EngineKind::Sglang,
        }
    }
}
