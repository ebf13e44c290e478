//! The checks that turn what the pass collected into a [`Parsed`], or into
//! a 400 that names the field to blame.

use bytes::Bytes;
use serde_json::Value;

use super::layout::Span;
use super::wire::{Collected, Field};
use super::{MAX_CHOICES, MAX_TOKENS_LIMIT, Parsed, Prompt};
use crate::error::ApiError;
use crate::openai::Endpoint;

fn invalid_body(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: None,
    }
}

/// What must hold before the pass: a non-empty UTF-8 JSON object.
pub(super) fn envelope(body: &Bytes) -> Result<(), ApiError> {
    if body.is_empty() {
        return Err(invalid_body(
            "request body is empty; expected a JSON object",
        ));
    }
    // JSON text is UTF-8 (RFC 8259); fields the pass skims are not checked
    // otherwise, and the rewrites copy them as they are.
    if std::str::from_utf8(body).is_err() {
        return Err(invalid_body("request body is not valid UTF-8"));
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(invalid_body("request body is not a valid JSON object"));
    }
    Ok(())
}

/// A failed pass: a syntax error blames the body, a shape error the
/// field being decoded.
pub(super) fn parse_error(error: &serde_json::Error, field: Option<&'static str>) -> ApiError {
    match (error.classify(), field) {
        (serde_json::error::Category::Data, Some(field)) => {
            ApiError::invalid(field, error.to_string())
        }
        _ => invalid_body(format!("request body is not a valid JSON object: {error}")),
    }
}

/// A field given twice is refused: engines differ on which one counts.
pub(super) fn no_duplicates(fields: &[Field<'_>]) -> Result<(), ApiError> {
    let mut names: Vec<&str> = fields.iter().map(|f| &*f.name).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(pair) => Err(invalid_body(format!(
            "request body has the field `{}` more than once",
            pair[0]
        ))),
        None => Ok(()),
    }
}

/// Checks the collected fields and assembles the parsed request.
pub(super) fn fields<'a>(
    endpoint: Endpoint,
    body: &'a Bytes,
    c: Collected<'a>,
    spans: Option<Vec<Span>>,
) -> Result<Parsed<'a>, ApiError> {
    let model = model(c.model)?;
    let stream = flag("stream", c.stream)?;
    let include_usage = include_usage(c.stream_options, stream)?;
    let max_tokens = token_count("max_tokens", c.max_tokens)?;
    let max_completion_tokens = token_count("max_completion_tokens", c.max_completion_tokens)?;
    let n = match c.n {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| (1..=MAX_CHOICES).contains(&v)) => {
            n.as_u64().unwrap_or(1)
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be an integer from 1 to {MAX_CHOICES}, got {other}"),
            ));
        }
    };
    let prompt = prompt(endpoint, c.messages, c.pieces, c.pieces_shape)?;
    Ok(Parsed {
        endpoint,
        model,
        stream,
        include_usage,
        n,
        max_output_tokens: max_completion_tokens.or(max_tokens),
        prompt_tokens_estimate: prompt.text_bytes().div_ceil(4),
        user: match c.user {
            Some(Value::String(user)) if !user.is_empty() => Some(user),
            _ => None,
        },
        temperature: c.temperature.as_ref().and_then(Value::as_f64),
        engine_fields: c.engine_fields,
        prompt,
        body,
        spans,
    })
}

fn model(value: Option<Value>) -> Result<String, ApiError> {
    match value {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        )),
        Some(other) => Err(ApiError::invalid(
            "model",
            format!("model must be a string, got {other}"),
        )),
    }
}

fn flag(param: &'static str, value: Option<Value>) -> Result<bool, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => Err(ApiError::invalid(
            param,
            format!("{param} must be a boolean, got {other}"),
        )),
    }
}

fn include_usage(options: Option<Value>, stream: bool) -> Result<bool, ApiError> {
    let options = match options {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Object(options)) => options,
        Some(other) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("stream_options must be an object, got {other}"),
            ));
        }
    };
    if !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    match options.get("include_usage") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            "stream_options",
            format!("stream_options.include_usage must be a boolean, got {other}"),
        )),
    }
}

fn token_count(param: &'static str, value: Option<Value>) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
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

fn prompt<'a>(
    endpoint: Endpoint,
    messages: Option<Vec<super::Message<'a>>>,
    pieces: Option<Vec<super::Piece<'a>>>,
    shape: Option<&'static str>,
) -> Result<Prompt<'a>, ApiError> {
    let (param, article) = match endpoint {
        Endpoint::ChatCompletions => {
            return match messages {
                Some(messages) => Ok(Prompt::Chat(messages)),
                None => Err(ApiError::invalid("messages", "you must provide messages")),
            };
        }
        Endpoint::Completions => ("prompt", "a prompt"),
        Endpoint::Embeddings => ("input", "an input"),
    };
    match (pieces, shape) {
        (Some(_), Some(shape)) if shape != "null" => Err(ApiError::invalid(
            param,
            format!("{param} must be a string or an array, got {shape}"),
        )),
        (Some(pieces), None) => Ok(Prompt::Text(pieces)),
        _ => Err(ApiError::invalid(
            param,
            format!("you must provide {article}"),
        )),
    }
}
