//! The server-sent events of a streamed generation, as each API writes
//! them: OpenAI chunks ending in `[DONE]` (with a usage chunk when asked),
//! the Responses API's typed events ending in `response.completed`, and
//! Anthropic's message events ending in `message_stop`.

use serde_json::{Value, json};

use crate::api::{self, Kind};
use crate::engine::Usage;

/// One streamed generation's events.
pub struct Stream {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    prompt_tokens: usize,
    choices: usize,
    first: bool,
    text: String,
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn event(name: &str, v: &Value) -> String {
    format!("event: {name}\ndata: {v}\n\n")
}

impl Stream {
    /// The events of generation `id` of `kind` for a prompt of `prompt_tokens`.
    pub fn new(
        kind: Kind,
        id: &str,
        created: u64,
        model: &str,
        include_usage: bool,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            kind,
            id: id.to_string(),
            created,
            model: model.to_string(),
            include_usage,
            prompt_tokens,
            choices: 1,
            first: true,
            text: String::new(),
        }
    }

    /// The same stream with `choices` choices (chat and completions).
    pub fn with_choices(mut self, choices: usize) -> Self {
        self.choices = choices.max(1);
        self
    }

    fn head(&self) -> api::ChunkHead<'_> {
        api::ChunkHead {
            kind: self.kind,
            id: &self.id,
            created: self.created,
            model: &self.model,
        }
    }

    /// The events before the first token.
    pub fn start(&self) -> Vec<String> {
        match self.kind {
            Kind::Chat | Kind::Completion => vec![],
            Kind::Responses => {
                let response =
                    api::response(&self.id, self.created, &self.model, "in_progress", "", None);
                vec![event(
                    "response.created",
                    &json!({"type": "response.created", "response": response}),
                )]
            }
            Kind::Messages => vec![
                event(
                    "message_start",
                    &json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}}),
                ),
                event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ),
            ],
        }
    }

    /// The event for one generated token.
    pub fn token(&mut self, t: &str) -> String {
        let first = std::mem::replace(&mut self.first, false);
        self.text.push_str(t);
        match self.kind {
            Kind::Chat | Kind::Completion => (0..self.choices)
                .map(|index| data(&api::chunk(&self.head(), index, Some(t), first, None)))
                .collect(),
            Kind::Responses => event(
                "response.output_text.delta",
                &json!({
                "type": "response.output_text.delta", "item_id": format!("msg_{}", self.id),
                "output_index": 0, "content_index": 0, "delta": t}),
            ),
            Kind::Messages => event(
                "content_block_delta",
                &json!({"type": "content_block_delta",
                "index": 0, "delta": {"type": "text_delta", "text": t}}),
            ),
        }
    }

    /// The events that end the stream, with its usage.
    pub fn done(&self, u: Usage) -> Vec<String> {
        match self.kind {
            Kind::Chat | Kind::Completion => {
                let mut out = Vec::new();
                for index in 0..self.choices {
                    let mut finish = api::chunk(&self.head(), index, None, false, Some("length"));
                    // As vLLM: the fingerprint comes once, on the last chunk
                    // with choices, or on the usage chunk when one follows.
                    if !self.include_usage && index + 1 == self.choices {
                        finish["system_fingerprint"] = json!(api::SYSTEM_FINGERPRINT);
                    }
                    out.push(data(&finish));
                }
                if self.include_usage {
                    out.push(data(&api::usage_chunk(
                        self.kind,
                        &self.id,
                        self.created,
                        &self.model,
                        u,
                    )));
                }
                out.push("data: [DONE]\n\n".to_string());
                out
            }
            Kind::Responses => {
                let response = api::response(
                    &self.id,
                    self.created,
                    &self.model,
                    "completed",
                    &self.text,
                    Some(u),
                );
                vec![event(
                    "response.completed",
                    &json!({"type": "response.completed", "response": response}),
                )]
            }
            Kind::Messages => vec![
                event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                event(
                    "message_delta",
                    &json!({"type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
                    "usage": {"output_tokens": u.completion}}),
                ),
                event("message_stop", &json!({"type": "message_stop"})),
            ],
        }
    }
}
