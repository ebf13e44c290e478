//! The prompt, taken from the endpoint's prompt-carrying fields as the
//! pass read them, with the checks the engine would make of their shape.

use std::borrow::Cow;

use super::fields::{Shape, prompt_fields};
use super::prompt::{Message, Piece, Prompt};
use super::tree::Json;
use super::wire::Collected;
use crate::error::ApiError;
use crate::openai::Endpoint;

/// The prompt of the collected request, or a 400 naming the field.
pub(crate) fn prompt<'a>(endpoint: Endpoint, c: &Collected<'a>) -> Result<Prompt<'a>, ApiError> {
    let mut prompt = Prompt::default();
    for field in prompt_fields(endpoint) {
        let value = c.get(field.name).filter(|v| **v != Json::Null);
        let Some(value) = value else {
            if field.required {
                return Err(ApiError::invalid(
                    field.name,
                    format!("you must provide {}", field.name),
                ));
            }
            continue;
        };
        match field.shape {
            Shape::Messages => prompt.messages.extend(messages(field.name, value)?),
            Shape::Text => match value {
                Json::Str(_) | Json::Array(_) => prompt.pieces.push(piece(value)),
                other => {
                    return Err(ApiError::invalid(
                        field.name,
                        format!("{} must be a string or an array, got {other}", field.name),
                    ));
                }
            },
            Shape::Any => prompt.pieces.push(piece(value)),
        }
    }
    Ok(prompt)
}

/// Chat messages: a non-empty array of objects with a non-empty string
/// `role` and a `content` that is a string, an array of parts, or null.
fn messages<'a>(param: &'static str, value: &Json<'a>) -> Result<Vec<Message<'a>>, ApiError> {
    let Json::Array(items) = value else {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be an array of message objects, got {value}"),
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("{param} must not be empty"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| message(param, i, item))
        .collect()
}

fn message<'a>(param: &'static str, i: usize, item: &Json<'a>) -> Result<Message<'a>, ApiError> {
    if !matches!(item, Json::Object(_)) {
        return Err(ApiError::invalid(
            param,
            format!("{param}[{i}] must be an object with `role` and `content`"),
        ));
    }
    let role = match item.get("role") {
        Some(Json::Str(role)) if !role.is_empty() => role.clone(),
        _ => {
            return Err(ApiError::invalid(
                param,
                format!("{param}[{i}].role must be a non-empty string"),
            ));
        }
    };
    let parts = match item.get("content") {
        None | Some(Json::Null) => Vec::new(),
        Some(content @ Json::Str(_)) => vec![piece(content)],
        Some(Json::Array(parts)) => parts.iter().map(piece).collect(),
        Some(other) => {
            return Err(ApiError::invalid(
                param,
                format!(
                    "{param}[{i}].content must be a string or an array of content parts, got {other}"
                ),
            ));
        }
    };
    Ok(Message { role, parts })
}

/// The text in a value: strings, token ids, and the `text` or `content`
/// of objects (content parts, input items, documents).
fn piece<'a>(value: &Json<'a>) -> Piece<'a> {
    match value {
        Json::Str(s) => Piece::Text(s.clone()),
        Json::UInt(_) | Json::Int(_) | Json::Float(_) => {
            Piece::Token(Cow::Owned(value.to_string()))
        }
        Json::Array(items) => Piece::Many(items.iter().map(piece).collect()),
        Json::Object(members) => {
            let mut found: Vec<Piece<'a>> = members
                .iter()
                .filter(|(name, _)| name == "text" || name == "content")
                .map(|(_, v)| piece(v))
                .collect();
            match found.len() {
                0 => Piece::Nothing,
                1 => found.swap_remove(0),
                _ => Piece::Many(found),
            }
        }
        Json::Null | Json::Bool(_) => Piece::Nothing,
    }
}
