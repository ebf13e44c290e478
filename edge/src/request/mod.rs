//! A request body, parsed once. The one validating pass fills a
//! [`Parsed`] with everything the request path acts on: the model, the
//! delivery flags, `n` and the output budget, the token estimate, a
//! borrowed view of the prompt for prefix affinity, and where each
//! top-level field lies. The forwarding rewrites (canonical model name,
//! `stream_options`, engine fields removed) and the cache key work from
//! those places on the raw bytes, so nothing parses the body again.
//! Unknown fields pass to the engine untouched.

mod checks;
mod extract;
mod fields;
mod layout;
mod prompt;
mod rewrite;
mod tree;
mod wire;

use bytes::Bytes;
use infermesh_runtime::engine_fields::FieldSet;

pub use prompt::{Message, Piece, Prompt};

use crate::error::ApiError;
use crate::openai::Endpoint;

/// Largest `max_tokens` accepted: far above any context window, so only
/// nonsense is refused.
pub const MAX_TOKENS_LIMIT: u64 = 10_000_000;
/// Largest `n` accepted.
pub const MAX_CHOICES: u64 = 128;

/// A request body and what the edge read from it.
#[derive(Debug, Clone)]
pub struct Parsed<'a> {
    /// The endpoint it was sent to.
    pub endpoint: Endpoint,
    /// Model name or alias.
    pub model: String,
    /// Whether the client asked for SSE.
    pub stream: bool,
    /// Whether the client asked for usage in the stream.
    pub include_usage: bool,
    /// Choices asked for (`n`, 1 when absent).
    pub n: u64,
    /// The output budget: `max_completion_tokens`, else `max_output_tokens`
    /// (Responses), else `max_tokens`; 0 for endpoints that generate nothing.
    pub max_output_tokens: Option<u64>,
    /// Prompt tokens, estimated from the text (about four bytes a token).
    pub prompt_tokens_estimate: u64,
    /// The OpenAI `user` field, when a non-empty string (session affinity).
    pub user: Option<String>,
    /// `temperature`, when a number.
    pub temperature: Option<f64>,
    /// Engine-specific fields the body carries (`engine_fields::GATED`).
    pub engine_fields: FieldSet,
    /// The prompt, viewed in place.
    pub prompt: Prompt<'a>,
    body: &'a Bytes,
    /// Every top-level field: where its key starts, and its value when read.
    fields: Vec<wire::Field<'a>>,
}

/// Parses and checks `body` sent to `endpoint`, reading every field so
/// that the cache material can be made from it.
pub fn parse(endpoint: Endpoint, body: &Bytes) -> Result<Parsed<'_>, ApiError> {
    parse_with(endpoint, body, true)
}

/// Parses and checks `body` sent to `endpoint`; without `for_cache`, the
/// fields the request path does not act on are skimmed, not read, and the
/// request has no cache material.
pub fn parse_with(
    endpoint: Endpoint,
    body: &Bytes,
    for_cache: bool,
) -> Result<Parsed<'_>, ApiError> {
    counter::count();
    checks::envelope(body)?;
    let collected =
        wire::collect(endpoint, body, for_cache).map_err(|e| checks::parse_error(&e))?;
    checks::no_duplicates(&collected.fields)?;
    checks::fields(endpoint, body, collected)
}

impl Parsed<'_> {
    /// The body as the client sent it.
    pub fn body(&self) -> &Bytes {
        self.body
    }
}

/// Counts full parses of request bodies on this thread, so tests can
/// prove the request path parses each body once.
pub mod counter {
    use std::cell::Cell;

    thread_local! {
        static PARSES: Cell<u64> = const { Cell::new(0) };
    }

    /// Records one parse of a whole body.
    pub(crate) fn count() {
        PARSES.with(|p| p.set(p.get() + 1));
    }

    /// Parses counted on this thread so far.
    pub fn parses() -> u64 {
        PARSES.with(Cell::get)
    }
}

#[cfg(test)]
mod tests;
