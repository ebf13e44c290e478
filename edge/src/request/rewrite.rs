//! What is made from a parsed body without parsing it again: the body sent
//! to the engine, and the request as the cache key hashes it.

use bytes::Bytes;
use infermesh_runtime::engine_fields::FieldSet;

use super::layout::Span;
use super::tree::write_json;
use super::{Parsed, counter};
use crate::error::ApiError;

/// Fields left out of the cached request: they change how the answer is
/// delivered (`stream`, `stream_options`) or who asked (`user`), not what it is.
const DELIVERY_FIELDS: &[&str] = &["stream", "stream_options", "user"];

/// What is written for a field in a rewritten body.
enum Edit {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

impl Parsed<'_> {
    /// Whether the edge asks the engine for usage the client did not ask
    /// for (and so removes it from the answer): streamed chat and text
    /// completions without `stream_options.include_usage`.
    pub fn usage_injected(&self) -> bool {
        self.stream && !self.include_usage && self.endpoint.takes_stream_options()
    }

    /// The body sent to the engine: the canonical model name in place of an
    /// alias (engines know a model only by the name they serve it as),
    /// engine fields the model does not allow removed, and, on streamed
    /// requests, `stream_options.include_usage` set, since usage settles
    /// token limits and fills the access log. A body needing none of it is
    /// passed on untouched; otherwise the top-level object is written anew
    /// from the raw bytes of the fields it keeps.
    pub fn upstream_body(&self, canonical: &str, allowed: FieldSet) -> Result<Bytes, ApiError> {
        let refused = self.engine_fields.without(allowed);
        let rename = self.model != canonical;
        let usage = self.usage_injected();
        if !rename && refused.is_empty() && !usage {
            return Ok(self.body.clone());
        }
        let body = &self.body[..];
        let Some(spans) = super::layout::spans(body, &self.fields) else {
            return reparsed(self.body, canonical, refused, usage);
        };
        let name = |span: &Span| &body[span.key.start + 1..span.key.end - 1];
        let mut out = Vec::with_capacity(body.len() + 48);
        out.push(b'{');
        let mut options_seen = false;
        for span in &spans {
            let field = name(span);
            let edit = match field {
                b"model" if rename => Edit::Replace(json_string(canonical)),
                b"stream_options" if usage => {
                    options_seen = true;
                    Edit::Replace(with_include_usage(&body[span.value.clone()])?)
                }
                _ if refused.names().any(|r| r.as_bytes() == field) => Edit::Drop,
                _ => Edit::Keep,
            };
            let value: &[u8] = match &edit {
                Edit::Drop => continue,
                Edit::Keep => &body[span.value.clone()],
                Edit::Replace(value) => value,
            };
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(&body[span.key.clone()]);
            out.push(b':');
            out.extend_from_slice(value);
        }
        if usage && !options_seen {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        }
        out.push(b'}');
        Ok(Bytes::from(out))
    }

    /// The request as the cache key hashes it, or `None` when a field was
    /// skimmed rather than read: every field but the delivery fields, sorted by name
    /// at every level, without whitespace, with the canonical model name.
    /// Two requests that differ only in the order of fields, spacing,
    /// escapes, alias or delivery share it.
    pub fn cache_material(&self, canonical: &str) -> Option<Vec<u8>> {
        let mut fields: Vec<_> = self
            .fields
            .iter()
            .filter(|f| !DELIVERY_FIELDS.contains(&&*f.name))
            .collect();
        fields.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::with_capacity(self.body.len());
        out.push(b'{');
        for (i, field) in fields.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json(&mut out, &*field.name);
            out.push(b':');
            match (&*field.name, &field.value) {
                ("model", _) => write_json(&mut out, canonical),
                (_, Some(value)) => value.write_canonical(&mut out),
                (_, None) => return None,
            }
        }
        out.push(b'}');
        Some(out)
    }
}

fn json_string(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec())
}

/// `stream_options` (an object, as the checks made sure) with
/// `include_usage` set and its other options kept.
fn with_include_usage(raw: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut options: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(raw).map_err(unreadable)?;
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&options).map_err(unreadable)
}

fn unreadable(e: serde_json::Error) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("request body cannot be read as JSON values: {e}"),
        param: None,
    }
}

/// The rewrite for a body whose field places are unknown (a field name was
/// written with escapes): parsed again as a whole. A body that cannot be
/// read that way is refused rather than forwarded as it is: a field the
/// model does not allow must never reach the engine.
fn reparsed(
    body: &Bytes,
    canonical: &str,
    remove: FieldSet,
    usage: bool,
) -> Result<Bytes, ApiError> {
    counter::count();
    let mut value = serde_json::from_slice::<serde_json::Value>(body).map_err(unreadable)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("model".into(), serde_json::Value::String(canonical.into()));
        for field in remove.names() {
            map.remove(field);
        }
        if usage {
            let options = map
                .entry("stream_options")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(options) = options.as_object_mut() {
                options.insert("include_usage".into(), serde_json::Value::Bool(true));
            }
        }
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(unreadable)
}
