//! Which fields of each endpoint's body carry the prompt, and how each is
//! read: the token estimate and prefix affinity take their text.

use crate::openai::Endpoint;

/// How a prompt-carrying field is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Chat messages: an array of objects with a role and content.
    Messages,
    /// A string or an array; any other shape is refused.
    Text,
    /// Anything; the text found in it is kept.
    Any,
}

/// One prompt-carrying field of an endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PromptField {
    pub name: &'static str,
    pub shape: Shape,
    /// The request is refused without it, as by the engine.
    pub required: bool,
}

const fn field(name: &'static str, shape: Shape, required: bool) -> PromptField {
    PromptField {
        name,
        shape,
        required,
    }
}

use Shape::{Any, Messages, Text};

const CHAT: &[PromptField] = &[field("messages", Messages, true)];
const COMPLETIONS: &[PromptField] = &[field("prompt", Text, true)];
const EMBEDDINGS: &[PromptField] = &[field("input", Text, true)];
const RESPONSES: &[PromptField] = &[
    field("instructions", Any, false),
    field("input", Text, true),
];
const ANTHROPIC: &[PromptField] = &[
    field("system", Any, false),
    field("messages", Messages, true),
];
const RERANK: &[PromptField] = &[field("query", Any, false), field("documents", Any, false)];
const SCORE: &[PromptField] = &[
    field("text_1", Any, false),
    field("text_2", Any, false),
    field("queries", Any, false),
    field("documents", Any, false),
    field("data_1", Any, false),
    field("data_2", Any, false),
];
const INPUT: &[PromptField] = &[field("input", Any, false)];
const TOKENIZE: &[PromptField] = &[
    field("prompt", Any, false),
    field("messages", Messages, false),
];
const DETOKENIZE: &[PromptField] = &[field("tokens", Any, false)];

/// The prompt-carrying fields of `endpoint`'s requests.
pub(crate) fn prompt_fields(endpoint: Endpoint) -> &'static [PromptField] {
    match endpoint {
        Endpoint::ChatCompletions => CHAT,
        Endpoint::Completions => COMPLETIONS,
        Endpoint::Embeddings => EMBEDDINGS,
        Endpoint::Responses => RESPONSES,
        Endpoint::Messages => ANTHROPIC,
        Endpoint::Rerank => RERANK,
        Endpoint::Score => SCORE,
        Endpoint::Pooling | Endpoint::Classify => INPUT,
        Endpoint::Tokenize => TOKENIZE,
        Endpoint::Detokenize => DETOKENIZE,
    }
}

/// The prompt-carrying field of `endpoint` named `name`.
pub(crate) fn prompt_field(endpoint: Endpoint, name: &str) -> Option<PromptField> {
    prompt_fields(endpoint)
        .iter()
        .find(|f| f.name == name)
        .copied()
}
