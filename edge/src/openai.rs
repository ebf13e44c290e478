//! Reads what the edge acts on from an OpenAI request body (`model`,
//! `stream`, `stream_options`, `max_tokens`, and the prompt for its token
//! estimate), skipping the rest without building it, and refuses bodies
//! of the wrong shape with the field to blame. Unknown fields pass to the
//! engine untouched: the edge forwards the original bytes.

use bytes::Bytes;
use infermesh_runtime::engine_fields::FieldSet;
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

/// What the edge needs from a request: routing, validation and the
/// token estimate that rate limits reserve at admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingFields {
    /// Model name or alias.
    pub model: String,
    /// Whether the client asked for SSE.
    pub stream: bool,
    /// Whether the client asked for usage in the stream (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Prompt tokens, estimated from the text (about four bytes a token).
    pub prompt_tokens_estimate: u64,
    /// `max_tokens` or `max_completion_tokens`, if sent.
    pub max_tokens: Option<u64>,
    /// The OpenAI `user` field, when a non-empty string (session affinity).
    pub user: Option<String>,
    /// Engine-specific fields the body carries (`engine_fields::GATED`).
    pub engine_fields: FieldSet,
}

/// Largest `max_tokens` accepted: far above any context window, so only
/// nonsense is refused.
pub const MAX_TOKENS_LIMIT: u64 = 10_000_000;

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(default)]
    stream_options: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    #[serde(default)]
    messages: Option<serde_json::Value>,
    #[serde(default)]
    user: Option<serde_json::Value>,
    #[serde(default)]
    prompt: Option<serde_json::Value>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    priority: Option<IgnoredAny>,
    #[serde(default)]
    request_id: Option<IgnoredAny>,
    #[serde(default)]
    rid: Option<IgnoredAny>,
    #[serde(default)]
    chat_template: Option<IgnoredAny>,
    #[serde(default)]
    chat_template_kwargs: Option<IgnoredAny>,
    #[serde(default)]
    kv_transfer_params: Option<IgnoredAny>,
    // Every other field is read too, so that a body the rewrites before
    // forwarding cannot parse (a number out of range) is refused here.
    #[serde(flatten)]
    _rest: std::collections::HashMap<String, IgnoredAny>,
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

/// Bytes of text in a prompt-like value: strings, arrays of strings or of
/// token ids (each counted as one token's worth), and content parts.
fn text_bytes(value: &serde_json::Value) -> u64 {
    match value {
        serde_json::Value::String(s) => s.len() as u64,
        serde_json::Value::Number(_) => 4,
        serde_json::Value::Array(items) => items.iter().map(text_bytes).sum(),
        serde_json::Value::Object(map) => map.get("text").map_or(0, text_bytes),
        _ => 0,
    }
}

/// Appends the text of a prompt-like value (as `text_bytes` counts it).
fn push_text(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::String(s) => out.extend_from_slice(s.as_bytes()),
        serde_json::Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        serde_json::Value::Array(items) => items.iter().for_each(|item| push_text(item, out)),
        serde_json::Value::Object(map) => {
            if let Some(text) = map.get("text") {
                push_text(text, out);
            }
        }
        _ => {}
    }
}

/// The prompt as one byte string, for prefix affinity: each message's role
/// and text in order (chat), the prompt (completions) or the input
/// (embeddings). `None` when the body is not a JSON object.
pub fn prompt_text(endpoint: Endpoint, body: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object()?;
    let mut out = Vec::with_capacity(body.len());
    match endpoint {
        Endpoint::ChatCompletions => {
            for message in object.get("messages")?.as_array()? {
                if let Some(role) = message.get("role").and_then(|r| r.as_str()) {
                    out.extend_from_slice(role.as_bytes());
                    out.extend_from_slice(b": ");
                }
                if let Some(content) = message.get("content") {
                    push_text(content, &mut out);
                }
                out.push(b'\n');
            }
        }
        Endpoint::Completions => push_text(object.get("prompt")?, &mut out),
        Endpoint::Embeddings => push_text(object.get("input")?, &mut out),
    }
    Some(out)
}

fn check_messages(value: &serde_json::Value) -> Result<u64, ApiError> {
    let serde_json::Value::Array(messages) = value else {
        return Err(ApiError::invalid(
            "messages",
            "messages must be an array of message objects",
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut bytes = 0;
    for (i, message) in messages.iter().enumerate() {
        let serde_json::Value::Object(fields) = message else {
            return Err(ApiError::invalid(
                "messages",
                format!("messages[{i}] must be an object with `role` and `content`"),
            ));
        };
        match fields.get("role") {
            Some(serde_json::Value::String(role)) if !role.is_empty() => {}
            _ => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("messages[{i}].role must be a non-empty string"),
                ));
            }
        }
        match fields.get("content") {
            None | Some(serde_json::Value::Null) => {}
            Some(content @ (serde_json::Value::String(_) | serde_json::Value::Array(_))) => {
                bytes += text_bytes(content);
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].content must be a string or an array of content parts, got {other}"
                    ),
                ));
            }
        }
        // Role markers and separators cost a few tokens per message.
        bytes += 16;
    }
    Ok(bytes)
}

fn token_count(
    param: &'static str,
    value: Option<serde_json::Value>,
) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(v) if (1..=MAX_TOKENS_LIMIT).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::invalid(
                param,
                format!("{param} must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {n}"),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            param,
            format!("{param} must be an integer, got {other}"),
        )),
    }
}

/// Parses and checks the fields of `body` the edge acts on; every other
/// field passes to the engine untouched.
pub fn routing_fields(endpoint: Endpoint, body: &Bytes) -> Result<RoutingFields, ApiError> {
    if body.is_empty() {
        return Err(ApiError::InvalidRequest {
            message: "request body is empty; expected a JSON object".into(),
            param: None,
        });
    }
    // JSON text is UTF-8 (RFC 8259); fields the parse skips are not checked
    // otherwise, and the rewrites before forwarding need the whole body.
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::InvalidRequest {
            message: "request body is not valid UTF-8".into(),
            param: None,
        });
    }
    // Derived deserializers also take a JSON array (fields by position).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest {
            message: "request body is not a valid JSON object".into(),
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
    let include_usage = match wire.stream_options {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(options)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "stream_options is only allowed when stream is true",
                ));
            }
            match options.get("include_usage") {
                None | Some(serde_json::Value::Null) => false,
                Some(serde_json::Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ApiError::invalid(
                        "stream_options",
                        format!("stream_options.include_usage must be a boolean, got {other}"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("stream_options must be an object, got {other}"),
            ));
        }
    };
    let max_tokens = match token_count("max_tokens", wire.max_tokens)? {
        Some(v) => Some(v),
        None => token_count("max_completion_tokens", wire.max_completion_tokens)?,
    };
    let prompt_bytes = match endpoint {
        Endpoint::ChatCompletions => match &wire.messages {
            Some(messages) => check_messages(messages)?,
            None => return Err(ApiError::invalid("messages", "you must provide messages")),
        },
        Endpoint::Completions => match &wire.prompt {
            Some(p @ (serde_json::Value::String(_) | serde_json::Value::Array(_))) => text_bytes(p),
            Some(other) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("prompt must be a string or an array, got {other}"),
                ));
            }
            None => return Err(ApiError::invalid("prompt", "you must provide a prompt")),
        },
        Endpoint::Embeddings => match &wire.input {
            Some(i @ (serde_json::Value::String(_) | serde_json::Value::Array(_))) => text_bytes(i),
            Some(other) => {
                return Err(ApiError::invalid(
                    "input",
                    format!("input must be a string or an array, got {other}"),
                ));
            }
            None => return Err(ApiError::invalid("input", "you must provide an input")),
        },
    };
    let mut engine_fields = FieldSet::default();
    for (name, present) in [
        ("priority", wire.priority.is_some()),
        ("request_id", wire.request_id.is_some()),
        ("rid", wire.rid.is_some()),
        ("chat_template", wire.chat_template.is_some()),
        ("chat_template_kwargs", wire.chat_template_kwargs.is_some()),
        ("kv_transfer_params", wire.kv_transfer_params.is_some()),
    ] {
        if present {
            engine_fields.insert(name);
        }
    }
    Ok(RoutingFields {
        engine_fields,
        model,
        stream,
        include_usage,
        prompt_tokens_estimate: prompt_bytes.div_ceil(4),
        max_tokens,
        user: match wire.user {
            Some(serde_json::Value::String(user)) if !user.is_empty() => Some(user),
            _ => None,
        },
    })
}

/// The body sent to the engine: the canonical model name in place of an
/// alias (engines know a model only by the name they serve it as), and, on
/// streamed requests, `stream_options.include_usage` set, since usage is what
/// settles token limits and fills the access log. A body needing neither is
/// passed on untouched.
pub fn upstream_body(
    body: Bytes,
    fields: &RoutingFields,
    canonical_model: &str,
    allowed: FieldSet,
) -> Result<Bytes, ApiError> {
    let refused = fields.engine_fields.without(allowed);
    let body = if fields.model != canonical_model || !refused.is_empty() {
        rewritten(&body, canonical_model, refused)?
    } else {
        body
    };
    Ok(if fields.stream && !fields.include_usage {
        with_usage_requested(&body)
    } else {
        body
    })
}

/// The body with `stream_options.include_usage` set, so that the engine
/// reports usage at the end of the stream. The rest of the body is kept
/// byte for byte when the client sent no `stream_options`.
pub fn with_usage_requested(body: &Bytes) -> Bytes {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    let has_options = contains_bytes(body, b"\"stream_options\"");
    match start {
        Some(i) if body[i] == b'{' && !has_options => {
            let rest = &body[i + 1..];
            let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
            let mut out = Vec::with_capacity(body.len() + 48);
            out.extend_from_slice(b"{\"stream_options\":{\"include_usage\":true}");
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
            Bytes::from(out)
        }
        _ => {
            // The client sent stream_options without include_usage: rewrite it.
            let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else {
                return body.clone();
            };
            if let Some(map) = value.as_object_mut() {
                let options = map
                    .entry("stream_options")
                    .or_insert_with(|| serde_json::json!({}));
                if let Some(options) = options.as_object_mut() {
                    options.insert("include_usage".into(), serde_json::Value::Bool(true));
                }
            }
            serde_json::to_vec(&value).map_or_else(|_| body.clone(), Bytes::from)
        }
    }
}

/// The body with `model` set to the canonical name (engines know a model
/// only by the name they serve it as) and the engine fields in `remove`
/// taken out.
/// A body that cannot be rewritten (a number beyond what JSON tools read,
/// which the skimming parse lets through) is refused rather than forwarded
/// as it is: a field the model does not allow must never reach the engine.
pub fn rewritten(body: &Bytes, canonical: &str, remove: FieldSet) -> Result<Bytes, ApiError> {
    let unreadable = |e: serde_json::Error| ApiError::InvalidRequest {
        message: format!("request body cannot be read as JSON values: {e}"),
        param: None,
    };
    let mut value = serde_json::from_slice::<serde_json::Value>(body).map_err(unreadable)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("model".into(), serde_json::Value::String(canonical.into()));
        for field in remove.names() {
            map.remove(field);
        }
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(unreadable)
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RoutingFields, ApiError> {
        routing_fields(Endpoint::Completions, &Bytes::from(s.to_string()))
    }

    fn chat(s: &str) -> Result<RoutingFields, ApiError> {
        routing_fields(Endpoint::ChatCompletions, &Bytes::from(s.to_string()))
    }

    fn param_of(result: Result<RoutingFields, ApiError>) -> Option<&'static str> {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected invalid request, got {other:?}"),
        }
    }

    #[test]
    fn model_and_stream_are_read_and_the_rest_skipped() {
        let f = chat(
            r#"{"messages":[{"role":"user","content":"hi there, 16 b."}],"model":"llama","stream":true,"n":1,"max_tokens":9,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            RoutingFields {
                model: "llama".into(),
                stream: true,
                include_usage: true,
                prompt_tokens_estimate: 8,
                max_tokens: Some(9),
                user: None,
                engine_fields: FieldSet::default(),
            }
        );
        assert!(!parse(r#"{"model":"m","prompt":"x"}"#).unwrap().stream);
    }

    #[test]
    fn malformed_bodies_name_what_is_wrong() {
        assert_eq!(param_of(parse("")), None);
        assert_eq!(param_of(parse("{not json")), None);
        assert_eq!(param_of(parse("[1,2]")), None);
        assert_eq!(
            param_of(routing_fields(
                Endpoint::Completions,
                &Bytes::from_static(b"{\"model\":\"m\",\"prompt\":\"x\",\"k\xff\":1}")
            )),
            None
        );
        assert_eq!(param_of(parse(r#"{"messages":[]}"#)), Some("model"));
        assert_eq!(param_of(parse(r#"{"model":""}"#)), Some("model"));
        assert_eq!(param_of(parse(r#"{"model":42}"#)), Some("model"));
        assert_eq!(
            param_of(parse(r#"{"model":"m","prompt":"x","stream":"yes"}"#)),
            Some("stream")
        );
        assert_eq!(param_of(parse(r#"{"model":"m"}"#)), Some("prompt"));
        assert_eq!(param_of(chat(r#"{"model":"m"}"#)), Some("messages"));
        assert_eq!(
            param_of(chat(r#"{"model":"m","messages":"hi"}"#)),
            Some("messages")
        );
        assert_eq!(
            param_of(chat(r#"{"model":"m","messages":[]}"#)),
            Some("messages")
        );
        assert_eq!(
            param_of(chat(r#"{"model":"m","messages":["hi"]}"#)),
            Some("messages")
        );
        assert_eq!(
            param_of(chat(r#"{"model":"m","messages":[{"content":"x"}]}"#)),
            Some("messages")
        );
        assert_eq!(
            param_of(chat(
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#
            )),
            Some("messages")
        );
        for bad in ["-1", "0", "1.5", "\"10\"", "100000000000"] {
            let body = format!(r#"{{"model":"m","prompt":"x","max_tokens":{bad}}}"#);
            assert_eq!(param_of(parse(&body)), Some("max_tokens"), "{bad}");
        }
        assert_eq!(
            param_of(parse(
                r#"{"model":"m","prompt":"x","stream_options":{"include_usage":true}}"#
            )),
            Some("stream_options")
        );
    }

    #[test]
    fn usage_is_requested_without_touching_the_rest_of_the_body() {
        let body = Bytes::from(r#" {"model":"m","stream":true,"x_unknown":[1]}"#);
        let out = with_usage_requested(&body);
        assert_eq!(
            &out[..],
            br#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"x_unknown":[1]}"#
        );
        let body =
            Bytes::from(r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#);
        let value: serde_json::Value =
            serde_json::from_slice(&with_usage_requested(&body)).unwrap();
        assert_eq!(value["stream_options"]["include_usage"], true);
    }

    #[test]
    fn an_alias_is_replaced_by_the_canonical_name_and_other_fields_kept() {
        let body = Bytes::from(r#"{"model":"l3","x_unknown":{"a":1},"prompt":"hi"}"#);
        let value: serde_json::Value =
            serde_json::from_slice(&rewritten(&body, "llama-3", FieldSet::default()).unwrap())
                .unwrap();
        assert_eq!(value["model"], "llama-3");
        assert_eq!(value["x_unknown"]["a"], 1);
    }

    #[test]
    fn engine_fields_pass_only_where_the_model_allows_them() {
        let body = Bytes::from(
            r#"{"model":"m","prompt":"hi","priority":-10,"request_id":"victim","chat_template":"{{x}}","temperature":0}"#,
        );
        let fields = parse(std::str::from_utf8(&body).unwrap()).unwrap();
        assert_eq!(
            fields.engine_fields.names().collect::<Vec<_>>(),
            ["priority", "request_id", "chat_template"]
        );
        let sent = |allowed: &[&str]| -> serde_json::Value {
            let out = upstream_body(
                body.clone(),
                &fields,
                "m",
                FieldSet::of(allowed.iter().copied()),
            )
            .unwrap();
            serde_json::from_slice(&out).unwrap()
        };
        let default = sent(&[]);
        for gone in ["priority", "request_id", "chat_template"] {
            assert!(default.get(gone).is_none(), "{gone}: {default}");
        }
        assert_eq!(default["temperature"], 0);
        assert_eq!(default["prompt"], "hi");
        let allowed = sent(&["priority"]);
        assert_eq!(allowed["priority"], -10);
        assert!(allowed.get("request_id").is_none(), "{allowed}");
        // A body with no engine field and the canonical name goes as sent.
        let plain = Bytes::from(r#"{"model":"m", "prompt":"hi"}"#);
        let fields = parse(r#"{"model":"m", "prompt":"hi"}"#).unwrap();
        assert_eq!(
            upstream_body(plain.clone(), &fields, "m", FieldSet::default()).unwrap(),
            plain
        );
        // A field that must go, in a body whose numbers JSON tools cannot
        // read: refused, never forwarded as it is.
        let huge = r#"{"model":"m","prompt":"p","chat_template_kwargs":1e99999}"#;
        let fields = parse(huge).unwrap();
        assert!(upstream_body(Bytes::from(huge), &fields, "m", FieldSet::default()).is_err());
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
