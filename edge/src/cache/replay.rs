//! Cached answers are kept in one form, the non-streamed OpenAI response,
//! and served in the form each request asks for: as is, or replayed as an
//! SSE stream (one content chunk per choice, the finish chunk, the usage
//! chunk when asked for, `[DONE]`). A streamed answer from the engine is
//! assembled into that form, event by event as the edge's SSE framer reads
//! them, before it is stored; streams carrying anything beyond text (tool
//! calls, logprobs) are not stored.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

use crate::openai::Endpoint;
use crate::sse::{self, Framer, Part};

/// The SSE stream of the stored `answer`, with usage when `include_usage`.
pub fn to_sse(answer: &Value, endpoint: Endpoint, include_usage: bool) -> Bytes {
    let chat = endpoint == Endpoint::ChatCompletions;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let envelope = |choices: Value| {
        json!({
            "id": answer.get("id").cloned().unwrap_or(Value::Null),
            "object": object,
            "created": answer.get("created").cloned().unwrap_or(Value::Null),
            "model": answer.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        })
    };
    let mut out = BytesMut::new();
    let mut event = |value: &Value| sse::write_event(&mut out, value.to_string().as_bytes());
    let choices = answer
        .get("choices")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for choice in &choices {
        let index = choice.get("index").cloned().unwrap_or(json!(0));
        let content = if chat {
            let message = choice.get("message").cloned().unwrap_or_default();
            json!({"index": index, "delta": {
                "role": message.get("role").cloned().unwrap_or(json!("assistant")),
                "content": message.get("content").cloned().unwrap_or(json!("")),
            }, "logprobs": null, "finish_reason": null})
        } else {
            json!({"index": index, "text": choice.get("text").cloned().unwrap_or(json!("")),
                   "logprobs": null, "finish_reason": null})
        };
        event(&envelope(json!([content])));
    }
    for choice in &choices {
        let index = choice.get("index").cloned().unwrap_or(json!(0));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let end = if chat {
            json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish})
        };
        event(&envelope(json!([end])));
    }
    if include_usage && let Some(usage) = answer.get("usage") {
        let mut last = envelope(json!([]));
        last["usage"] = usage.clone();
        event(&last);
    }
    sse::write_event(&mut out, b"[DONE]");
    out.freeze()
}

/// The non-streamed answer a complete SSE stream amounts to, or `None` when
/// it cannot be stored (incomplete, no usage, or more than text).
pub fn assemble(stream: &[u8], endpoint: Endpoint) -> Option<Value> {
    let mut framer = Framer::default();
    let mut answer = Assembler::new(endpoint);
    framer.push(stream);
    while let Some(part) = framer.next_part() {
        answer.add(&part);
    }
    if let Some(rest) = framer.finish() {
        answer.add(&rest);
    }
    answer.finish()
}

/// Builds the stored answer from a stream's events as they arrive; gives
/// up at the first event that makes the stream unstorable.
pub struct Assembler {
    chat: bool,
    head: Option<Value>,
    /// Role, text and finish reason of each choice so far.
    choices: Vec<(String, String, Value)>,
    usage: Option<Value>,
    done: bool,
    refused: bool,
}

impl Assembler {
    /// An empty answer for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            chat: endpoint == Endpoint::ChatCompletions,
            head: None,
            choices: Vec::new(),
            usage: None,
            done: false,
            refused: false,
        }
    }

    /// Adds the next part of the stream.
    pub fn add(&mut self, part: &Part) {
        if self.refused {
            return;
        }
        match part {
            Part::Event(event) => {
                // An event without data (a comment, a keep-alive) says nothing.
                let Some(data) = event.data() else { return };
                if event.is_done() {
                    self.done = true;
                } else if self.chunk(data).is_none() {
                    self.refused = true;
                }
            }
            // The rest of a line end says nothing either.
            Part::LineEndTail(_) => {}
            // An event never read, or never ended: the answer is not known whole.
            Part::Oversize(_) | Part::Unfinished(_) => self.refused = true,
        }
    }

    /// Takes in one chunk; `None` when the stream cannot be stored.
    fn chunk(&mut self, data: &[u8]) -> Option<()> {
        let chunk: Value = serde_json::from_slice(data).ok()?;
        if chunk.get("error").is_some() {
            return None;
        }
        if let Some(found) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(found.clone());
        }
        for choice in chunk.get("choices").and_then(Value::as_array)? {
            if !choice.get("logprobs").is_none_or(Value::is_null) {
                return None;
            }
            let index = usize::try_from(choice.get("index")?.as_u64()?).ok()?;
            if index > 128 {
                return None;
            }
            while self.choices.len() <= index {
                self.choices
                    .push(("assistant".into(), String::new(), Value::Null));
            }
            let slot = &mut self.choices[index];
            if self.chat {
                let delta = choice.get("delta")?.as_object()?;
                if delta.keys().any(|k| k != "role" && k != "content") {
                    return None;
                }
                if let Some(role) = delta.get("role").and_then(Value::as_str) {
                    slot.0 = role.to_string();
                }
                if let Some(content) = delta.get("content").and_then(Value::as_str) {
                    slot.1.push_str(content);
                }
            } else if let Some(piece) = choice.get("text").and_then(Value::as_str) {
                slot.1.push_str(piece);
            }
            if let Some(finish) = choice.get("finish_reason").filter(|f| !f.is_null()) {
                slot.2 = finish.clone();
            }
        }
        if self.head.is_none() {
            self.head = Some(chunk);
        }
        Some(())
    }

    /// The answer, or `None` when the stream was incomplete, had no usage,
    /// or carried more than text.
    pub fn finish(self) -> Option<Value> {
        let chat = self.chat;
        if self.refused {
            return None;
        }
        let (head, usage) = (self.head?, self.usage?);
        let choices = self.choices;
        if !self.done || choices.is_empty() || choices.iter().any(|c| c.2.is_null()) {
            return None;
        }
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(index, (role, content, finish))| {
                if chat {
                    json!({"index": index, "message": {"role": role, "content": content},
                           "logprobs": null, "finish_reason": finish})
                } else {
                    json!({"index": index, "text": content, "logprobs": null, "finish_reason": finish})
                }
            })
            .collect();
        let mut answer = Map::new();
        answer.insert("id".into(), head.get("id").cloned().unwrap_or(Value::Null));
        answer.insert(
            "object".into(),
            json!(if chat {
                "chat.completion"
            } else {
                "text_completion"
            }),
        );
        answer.insert(
            "created".into(),
            head.get("created").cloned().unwrap_or(Value::Null),
        );
        answer.insert(
            "model".into(),
            head.get("model").cloned().unwrap_or(Value::Null),
        );
        answer.insert("choices".into(), Value::Array(choices));
        answer.insert("usage".into(), usage);
        Some(Value::Object(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: Option<&str>, finish: Option<&str>) -> String {
        let delta = match content {
            Some(c) => json!({"content": c}),
            None => json!({}),
        };
        let value = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
            "model": "llama", "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]});
        format!("data: {value}\n\n")
    }

    #[test]
    fn a_stream_assembles_into_the_answer_and_replays_to_the_same_text() {
        let usage = json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5});
        let stream = format!(
            "data: {}\n\n{}{}{}data: {}\n\ndata: [DONE]\n\n",
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "llama",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}),
            chunk(Some("Hello"), None),
            chunk(Some(" there"), None),
            chunk(None, Some("stop")),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "llama",
                   "choices": [], "usage": usage}),
        );
        let answer = assemble(stream.as_bytes(), Endpoint::ChatCompletions).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello there");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        assert_eq!(answer["usage"], usage);
        assert_eq!(answer["object"], "chat.completion");

        let replayed = to_sse(&answer, Endpoint::ChatCompletions, true);
        let again = assemble(&replayed, Endpoint::ChatCompletions).unwrap();
        assert_eq!(again, answer);
        let without_usage = to_sse(&answer, Endpoint::ChatCompletions, false);
        assert!(!String::from_utf8_lossy(&without_usage).contains("usage"));
        assert!(without_usage.ends_with(b"data: [DONE]\n\n"));
    }

    #[test]
    fn incomplete_or_tool_call_streams_are_not_stored() {
        let cut_short = chunk(Some("Hel"), None);
        assert!(assemble(cut_short.as_bytes(), Endpoint::ChatCompletions).is_none());
        let tool = format!(
            "data: {}\n\ndata: [DONE]\n\n",
            json!({"id": "c", "created": 1, "model": "m", "choices": [{"index": 0,
                "delta": {"tool_calls": [{"index": 0}]}, "finish_reason": "tool_calls"}],
                "usage": {"total_tokens": 1}})
        );
        assert!(assemble(tool.as_bytes(), Endpoint::ChatCompletions).is_none());
    }

    #[test]
    fn a_crlf_stream_with_keep_alives_is_stored_like_its_lf_twin() {
        let usage = json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5});
        let lf = format!(
            "{}{}data: {}\n\ndata: [DONE]\n\n",
            chunk(Some("Hi"), None),
            chunk(None, Some("stop")),
            json!({"id": "chatcmpl-1", "created": 7, "model": "llama", "choices": [], "usage": usage}),
        );
        let answer = assemble(lf.as_bytes(), Endpoint::ChatCompletions).unwrap();
        let crlf = format!(": keep-alive\r\n\r\n{}", lf.replace('\n', "\r\n"));
        assert_eq!(
            assemble(crlf.as_bytes(), Endpoint::ChatCompletions),
            Some(answer)
        );
        let unfinished = lf.trim_end_matches('\n');
        assert_eq!(
            assemble(unfinished.as_bytes(), Endpoint::ChatCompletions),
            None,
            "a stream that ends inside its [DONE] event is not whole"
        );
    }

    #[test]
    fn completions_replay_as_text_chunks() {
        let answer = json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "abc", "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}});
        let replayed = to_sse(&answer, Endpoint::Completions, true);
        assert_eq!(assemble(&replayed, Endpoint::Completions).unwrap(), answer);
    }
}
