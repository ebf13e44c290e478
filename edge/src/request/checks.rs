//! The checks that turn what the pass collected into a [`Parsed`], or into
//! a 400 that names the field to blame.

use bytes::Bytes;

use super::tree::Json;
use super::wire::{Collected, Field};
use super::{MAX_CHOICES, MAX_TOKENS_LIMIT, Parsed};
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

/// A failed pass: the body is not JSON the edge can read.
pub(super) fn parse_error(error: &serde_json::Error) -> ApiError {
    invalid_body(format!("request body is not a valid JSON object: {error}"))
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
) -> Result<Parsed<'a>, ApiError> {
    let model = model(c.get("model"))?;
    let stream = flag("stream", c.get("stream"))?;
    let include_usage = include_usage(c.get("stream_options"), stream)?;
    let max_tokens = token_count("max_tokens", c.get("max_tokens"))?;
    let max_completion_tokens =
        token_count("max_completion_tokens", c.get("max_completion_tokens"))?;
    let max_output_tokens = token_count("max_output_tokens", c.get("max_output_tokens"))?;
    let n = match c.get("n") {
        None | Some(Json::Null) => 1,
        Some(Json::UInt(v)) if (1..=MAX_CHOICES).contains(v) => *v,
        Some(other) => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be an integer from 1 to {MAX_CHOICES}, got {other}"),
            ));
        }
    };
    let prompt = super::extract::prompt(endpoint, &c)?;
    // Endpoints that generate nothing have nothing to reserve beyond the prompt.
    let budget = match endpoint.generates() {
        true => max_completion_tokens.or(max_output_tokens).or(max_tokens),
        false => Some(0),
    };
    let user = c
        .get("user")
        .and_then(Json::as_str)
        .filter(|u| !u.is_empty())
        .map(String::from);
    let temperature = c.get("temperature").and_then(Json::as_f64);
    Ok(Parsed {
        endpoint,
        model,
        stream,
        include_usage,
        n,
        max_output_tokens: budget,
        prompt_tokens_estimate: prompt.text_bytes().div_ceil(4),
        user,
        temperature,
        engine_fields: c.engine_fields,
        prompt,
        body,
        fields: c.fields,
    })
}

fn model(value: Option<&Json<'_>>) -> Result<String, ApiError> {
    match value {
        Some(Json::Str(model)) if !model.is_empty() => Ok(model.to_string()),
        Some(Json::Str(_)) | None | Some(Json::Null) => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        )),
        Some(other) => Err(ApiError::invalid(
            "model",
            format!("model must be a string, got {other}"),
        )),
    }
}

fn flag(param: &'static str, value: Option<&Json<'_>>) -> Result<bool, ApiError> {
    match value {
        None | Some(Json::Null) => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            param,
            format!("{param} must be a boolean, got {other}"),
        )),
    }
}

fn include_usage(options: Option<&Json<'_>>, stream: bool) -> Result<bool, ApiError> {
    let options = match options {
        None | Some(Json::Null) => return Ok(false),
        Some(options @ Json::Object(_)) => options,
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
        None | Some(Json::Null) => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            "stream_options",
            format!("stream_options.include_usage must be a boolean, got {other}"),
        )),
    }
}

fn token_count(param: &'static str, value: Option<&Json<'_>>) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::UInt(v)) if (1..=MAX_TOKENS_LIMIT).contains(v) => Ok(Some(*v)),
        Some(n @ (Json::UInt(_) | Json::Int(_) | Json::Float(_))) => Err(ApiError::invalid(
            param,
            format!("{param} must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {n}"),
        )),
        Some(other) => Err(ApiError::invalid(
            param,
            format!("{param} must be an integer, got {other}"),
        )),
    }
}
