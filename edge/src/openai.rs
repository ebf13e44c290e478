//! Reads only what routing needs from an OpenAI request body (`model`,
//! `stream`), skipping the rest without building it, and refuses bodies
//! that are not a JSON object with a string `model`.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::error::ApiError;

/// The inference endpoints the edge proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The endpoint served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }
}

/// What routing needs from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingFields {
    /// Model name or alias.
    pub model: String,
    /// Whether the client asked for SSE.
    pub stream: bool,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(flatten)]
    _rest: std::collections::HashMap<String, IgnoredAny>,
}

/// Parses the routing fields of `body`.
pub fn routing_fields(body: &Bytes) -> Result<RoutingFields, ApiError> {
    if body.is_empty() {
        return Err(ApiError::InvalidRequest {
            message: "request body is empty; expected a JSON object".into(),
            param: None,
        });
    }
    let wire: Wire = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("request body is not a valid JSON object: {e}"),
        param: None,
    })?;
    let model = match wire.model {
        Some(serde_json::Value::String(model)) if !model.is_empty() => model,
        Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => {
            return Err(ApiError::invalid(
                "model",
                "you must provide a model parameter",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "model",
                format!("model must be a string, got {other}"),
            ));
        }
    };
    let stream = match wire.stream {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(other) => {
            return Err(ApiError::invalid(
                "stream",
                format!("stream must be a boolean, got {other}"),
            ));
        }
    };
    Ok(RoutingFields { model, stream })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RoutingFields, ApiError> {
        routing_fields(&Bytes::from(s.to_string()))
    }

    fn param_of(result: Result<RoutingFields, ApiError>) -> Option<&'static str> {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected invalid request, got {other:?}"),
        }
    }

    #[test]
    fn model_and_stream_are_read_and_the_rest_skipped() {
        let f = parse(
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"llama","stream":true,"n":1}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            RoutingFields {
                model: "llama".into(),
                stream: true
            }
        );
        assert!(!parse(r#"{"model":"m"}"#).unwrap().stream);
    }

    #[test]
    fn malformed_bodies_name_what_is_wrong() {
        assert_eq!(param_of(parse("")), None);
        assert_eq!(param_of(parse("{not json")), None);
        assert_eq!(param_of(parse("[1,2]")), None);
        assert_eq!(param_of(parse(r#"{"messages":[]}"#)), Some("model"));
        assert_eq!(param_of(parse(r#"{"model":""}"#)), Some("model"));
        assert_eq!(param_of(parse(r#"{"model":42}"#)), Some("model"));
        assert_eq!(
            param_of(parse(r#"{"model":"m","stream":"yes"}"#)),
            Some("stream")
        );
    }

    #[test]
    fn paths_map_to_endpoints() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/embeddings"),
            Some(Endpoint::Embeddings)
        );
        assert_eq!(Endpoint::from_path("/v1/chat"), None);
    }
}
