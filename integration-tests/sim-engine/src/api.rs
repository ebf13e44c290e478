//! The OpenAI request and response bodies the engine speaks: parsing with
//! errors that name the field (vLLM answers 400 for these), and the JSON of
//! completions, chunks and embeddings.

use serde_json::{Value, json};

use crate::engine::Usage;
use crate::tokens::tokenize;

/// The generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
    /// `/v1/responses` (OpenAI's Responses API).
    Responses,
    /// `/v1/messages` (Anthropic's Messages API).
    Messages,
}

/// The engine's build, as `system_fingerprint` reports it.
pub const SYSTEM_FINGERPRINT: &str = "fp_sim_engine";

/// A refused request: status, message and the offending field.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What is wrong.
    pub message: String,
    /// Field to blame.
    pub param: Option<&'static str>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            400 | 404 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Chat or plain completion.
    pub kind: Kind,
    /// Prompt tokens.
    pub tokens: Vec<u32>,
    /// Tokens to generate, for each choice.
    pub max_tokens: usize,
    /// Choices (`n`), generated side by side.
    pub choices: usize,
    /// SSE or one JSON body.
    pub stream: bool,
    /// Append a usage chunk to the stream.
    pub include_usage: bool,
}

fn text_of(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => Ok(parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" ")),
        _ => Err(ApiError::bad(
            "messages",
            "message content must be a string or an array of parts",
        )),
    }
}

/// The chat messages as one prompt: each role and text on a line.
fn chat_prompt(messages: Option<&Value>) -> Result<String, ApiError> {
    let messages = messages
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("messages", "messages must be an array"))?;
    let mut prompt = String::new();
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("messages", "every message needs a role"))?;
        prompt.push_str(role);
        prompt.push_str(": ");
        prompt.push_str(&text_of(m.get("content").unwrap_or(&Value::Null))?);
        prompt.push('\n');
    }
    Ok(prompt)
}

/// The text of a Responses API input: a string, or items whose content is
/// a string or parts.
fn input_text(input: Option<&Value>) -> Result<String, ApiError> {
    match input {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => Ok(items
            .iter()
            .map(|item| text_of(item.get("content").unwrap_or(item)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err(ApiError::bad("input", "input must be a string or an array")),
    }
}

/// The prompt of a generation request of `kind`.
fn prompt_of(kind: Kind, object: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    let text = |name: &str| object.get(name).map(|v| text_of(v).unwrap_or_default());
    Ok(match kind {
        Kind::Chat => chat_prompt(object.get("messages"))?,
        Kind::Messages => {
            text("system").unwrap_or_default() + &chat_prompt(object.get("messages"))?
        }
        Kind::Responses => {
            text("instructions").unwrap_or_default() + &input_text(object.get("input"))?
        }
        Kind::Completion => match object.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::bad("prompt", "prompt must be a string or an array of strings")
                })?
                .to_string(),
            _ => {
                return Err(ApiError::bad(
                    "prompt",
                    "prompt must be a string or an array of strings",
                ));
            }
        },
    })
}

/// Refuses a request whose `model` is missing or not the one served, as vLLM does.
pub fn check_model(request: &Value, model: &str) -> Result<(), ApiError> {
    match request.get("model").and_then(Value::as_str) {
        Some(m) if m == model => Ok(()),
        Some(m) => Err(ApiError {
            status: 404,
            message: format!("The model `{m}` does not exist."),
            param: Some("model"),
            code: Some("model_not_found"),
        }),
        None => Err(ApiError::bad("model", "model is required")),
    }
}

/// Parses a generation request for the engine serving `model`.
pub fn parse_generation(
    kind: Kind,
    body: &[u8],
    model: &str,
    max_model_len: usize,
) -> Result<Generation, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        message: format!("invalid JSON body: {e}"),
        param: None,
        code: None,
    })?;
    let Some(object) = request.as_object() else {
        return Err(ApiError {
            status: 400,
            message: "request body must be a JSON object".into(),
            param: None,
            code: None,
        });
    };
    check_model(&request, model)?;
    let prompt = prompt_of(kind, object)?;
    let max_tokens =
        match object
            .get("max_completion_tokens")
            .or_else(|| object.get("max_output_tokens"))
            .or_else(|| object.get("max_tokens"))
        {
            None | Some(Value::Null) => 16,
            Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::bad("max_tokens", "max_tokens must be a positive integer")
            })? as usize,
        };
    let choices = match object.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match (v.as_u64(), kind) {
            (Some(1), _) => 1,
            (Some(n @ 2..=MAX_CHOICES), Kind::Chat | Kind::Completion) => n as usize,
            (Some(_), Kind::Chat | Kind::Completion) | (None, _) => {
                return Err(ApiError::bad(
                    "n",
                    format!("n must be an integer from 1 to {MAX_CHOICES}"),
                ));
            }
            (Some(_), _) => return Err(ApiError::bad("n", "only n=1 is supported")),
        },
    };
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("stream", "stream must be a boolean")),
    };
    let include_usage = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let tokens = tokenize(&prompt);
    if tokens.len() + max_tokens > max_model_len {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({} in the messages, {max_tokens} in the completion).",
                tokens.len() + max_tokens,
                tokens.len()
            ),
        ));
    }
    Ok(Generation {
        kind,
        tokens,
        max_tokens,
        choices,
        stream,
        include_usage,
    })
}

/// The `usage` object.
pub fn usage(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached},
    })
}

/// The most choices (`n`) one request may ask for.
const MAX_CHOICES: u64 = 128;

/// A whole (non-streamed) response of `choices` identical choices.
pub fn completion(
    kind: Kind,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    choices: usize,
    u: Usage,
) -> Value {
    let (object, choices): (&str, Vec<Value>) = match kind {
        Kind::Chat => (
            "chat.completion",
            (0..choices).map(|i| json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "length", "logprobs": null})).collect(),
        ),
        Kind::Completion => (
            "text_completion",
            (0..choices).map(|i| json!({"index": i, "text": text, "finish_reason": "length", "logprobs": null})).collect(),
        ),
        Kind::Responses => return response(id, created, model, "completed", text, Some(u)),
        Kind::Messages => {
            return json!({"id": id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
                "stop_sequence": null,
                "usage": {"input_tokens": u.prompt, "output_tokens": u.completion}});
        }
    };
    json!({"id": id, "object": object, "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, "usage": usage(u)})
}

/// A Responses API response object.
pub fn response(
    id: &str,
    created: u64,
    model: &str,
    status: &str,
    text: &str,
    u: Option<Usage>,
) -> Value {
    let usage = u.map(|u| {
        json!({"input_tokens": u.prompt, "output_tokens": u.completion,
            "total_tokens": u.prompt + u.completion})
    });
    json!({"id": id, "object": "response", "created_at": created, "model": model,
        "status": status, "output": [{"type": "message", "id": format!("msg_{id}"),
        "role": "assistant", "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": usage})
}

/// What every chunk of one stream repeats.
#[derive(Debug, Clone, Copy)]
pub struct ChunkHead<'a> {
    /// Chat or plain completion.
    pub kind: Kind,
    /// The generation's id.
    pub id: &'a str,
    /// When it began, in seconds since the Unix epoch.
    pub created: u64,
    /// The model's name.
    pub model: &'a str,
}

/// One streamed chunk of choice `index`; `delta` is the new text,
/// `finish` the finish reason.
pub fn chunk(
    head: &ChunkHead<'_>,
    index: usize,
    delta: Option<&str>,
    first: bool,
    finish: Option<&str>,
) -> Value {
    let ChunkHead {
        kind,
        id,
        created,
        model,
    } = *head;
    let (object, choice) = match kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if first {
                d.insert("role".into(), json!("assistant"));
            }
            d.insert("content".into(), json!(delta.unwrap_or("")));
            (
                "chat.completion.chunk",
                json!({"index": index, "delta": d, "finish_reason": finish, "logprobs": null}),
            )
        }
        Kind::Completion | Kind::Responses | Kind::Messages => (
            "text_completion",
            json!({"index": index, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": null}),
        ),
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
}

/// The final usage chunk (empty `choices`).
pub fn usage_chunk(kind: Kind, id: &str, created: u64, model: &str, u: Usage) -> Value {
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    json!({"id": id, "object": object, "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [], "usage": usage(u)})
}

/// An embeddings response for `body`, with deterministic 16-dimension vectors.
pub fn embeddings(body: &[u8], model: &str) -> Result<Value, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        message: format!("invalid JSON body: {e}"),
        param: None,
        code: None,
    })?;
    match request.get("model").and_then(Value::as_str) {
        Some(m) if m == model => {}
        Some(m) => {
            return Err(ApiError {
                status: 404,
                message: format!("The model `{m}` does not exist."),
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
        None => return Err(ApiError::bad("model", "model is required")),
    }
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && !items.is_empty() => {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        }
        _ => {
            return Err(ApiError::bad(
                "input",
                "input must be a string or a non-empty array of strings",
            ));
        }
    };
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let tokens = tokenize(text);
            prompt_tokens += tokens.len();
            let seed = tokens
                .iter()
                .fold(7u64, |a, t| a.wrapping_mul(131).wrapping_add(u64::from(*t)));
            let vector: Vec<f64> = (0..16u64)
                .map(|d| ((seed.rotate_left(d as u32 * 4) % 2000) as f64 / 1000.0) - 1.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    Ok(
        json!({"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: Kind, body: &str) -> Result<Generation, ApiError> {
        parse_generation(kind, body.as_bytes(), "m", 64)
    }

    #[test]
    fn chat_and_completion_requests_parse() {
        let g = parse(Kind::Chat, r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a b"}]}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(
            (g.tokens.len(), g.max_tokens, g.stream, g.include_usage),
            (3, 3, true, true)
        );
        let g = parse(Kind::Completion, r#"{"model":"m","prompt":["x y z"]}"#).unwrap();
        assert_eq!((g.tokens.len(), g.max_tokens), (3, 16));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let param = |kind, body| parse(kind, body).unwrap_err().param;
        assert_eq!(parse(Kind::Chat, "{").unwrap_err().status, 400);
        assert_eq!(param(Kind::Chat, r#"{"model":"m"}"#), Some("messages"));
        assert_eq!(
            param(Kind::Completion, r#"{"model":"m","prompt":3}"#),
            Some("prompt")
        );
        assert_eq!(
            param(
                Kind::Completion,
                r#"{"model":"m","prompt":"x","max_tokens":0}"#
            ),
            Some("max_tokens")
        );
        assert_eq!(
            param(
                Kind::Completion,
                r#"{"model":"m","prompt":"x","max_tokens":100}"#
            ),
            Some("max_tokens")
        );
        assert_eq!(
            param(Kind::Completion, r#"{"model":"m","prompt":"x","n":500}"#),
            Some("n")
        );
        let other = parse(Kind::Chat, r#"{"model":"other","messages":[]}"#).unwrap_err();
        assert_eq!((other.status, other.code), (404, Some("model_not_found")));
    }
}
