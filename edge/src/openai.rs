//! The OpenAI endpoints the edge serves and the checks on their requests
//! that come before the body is read (the body itself is `request`'s).

use crate::error::ApiError;

/// The inference endpoints the edge proxies: every JSON inference path
/// that vLLM and SGLang serve, each routed by its body's `model` with the
/// same authentication, limits, accounting and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses` (OpenAI's Responses API).
    Responses,
    /// `POST /v1/messages` (Anthropic's Messages API, as vLLM serves it).
    Messages,
    /// `POST /v1/rerank`, `/rerank` and `/v2/rerank`.
    Rerank,
    /// `POST /v1/score` and `/score`.
    Score,
    /// `POST /pooling`.
    Pooling,
    /// `POST /classify`.
    Classify,
    /// `POST /tokenize`.
    Tokenize,
    /// `POST /detokenize`.
    Detokenize,
}

impl Endpoint {
    /// The endpoint served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/messages" => Endpoint::Messages,
            "/v1/rerank" | "/rerank" | "/v2/rerank" => Endpoint::Rerank,
            "/v1/score" | "/score" => Endpoint::Score,
            "/pooling" => Endpoint::Pooling,
            "/classify" => Endpoint::Classify,
            "/tokenize" => Endpoint::Tokenize,
            "/detokenize" => Endpoint::Detokenize,
            _ => return None,
        })
    }

    /// The name used in logs, metrics and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::Rerank => "rerank",
            Endpoint::Score => "score",
            Endpoint::Pooling => "pooling",
            Endpoint::Classify => "classify",
            Endpoint::Tokenize => "tokenize",
            Endpoint::Detokenize => "detokenize",
        }
    }

    /// Whether the endpoint generates tokens (and so has an output budget).
    pub fn generates(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Responses
                | Endpoint::Messages
        )
    }

    /// Whether streamed answers report usage only when asked with
    /// `stream_options.include_usage` (which the edge then asks for itself).
    pub fn takes_stream_options(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// Whether its answers may be kept in the response cache. Responses
    /// and Messages are not: they carry server-side state
    /// (`previous_response_id`, `store`) and event streams of their own.
    pub fn cacheable(self) -> bool {
        !matches!(self, Endpoint::Responses | Endpoint::Messages)
    }

    /// Whether every answer is the same for the same request, whatever
    /// its sampling parameters.
    pub fn deterministic(self) -> bool {
        !self.generates()
    }
}

/// Checks the `Content-Type` of an inference request: JSON, or none at all.
pub fn check_content_type(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, got {:?}",
            value.to_str().unwrap_or("<not text>")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_endpoints() {
        for (path, endpoint) in [
            ("/v1/chat/completions", Endpoint::ChatCompletions),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/v1/responses", Endpoint::Responses),
            ("/v1/messages", Endpoint::Messages),
            ("/rerank", Endpoint::Rerank),
            ("/v2/rerank", Endpoint::Rerank),
            ("/score", Endpoint::Score),
            ("/tokenize", Endpoint::Tokenize),
        ] {
            assert_eq!(Endpoint::from_path(path), Some(endpoint), "{path}");
        }
        assert_eq!(Endpoint::from_path("/v1/chat"), None);
        assert_eq!(Endpoint::from_path("/v1/audio/transcriptions"), None);
    }
}
