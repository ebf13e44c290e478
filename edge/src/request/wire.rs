//! The one pass over a request body: a serde visitor over the top-level
//! object that decodes the fields the edge acts on, skims the rest without
//! building it, and notes where each field's key starts so that rewrites
//! and cache keys can work on the raw bytes afterwards.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use infermesh_runtime::engine_fields::FieldSet;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::prompt::{Message, Piece};
use crate::openai::Endpoint;

/// One top-level field as the pass met it.
#[derive(Debug)]
pub(crate) struct Field<'a> {
    /// Its name, borrowed from the body unless it was escaped.
    pub name: Cow<'a, str>,
    /// Offset of its key's opening quote; `None` for an escaped name.
    pub key_at: Option<usize>,
}

/// What the pass collects.
#[derive(Debug, Default)]
pub(crate) struct Collected<'a> {
    pub model: Option<Value>,
    pub stream: Option<Value>,
    pub stream_options: Option<Value>,
    pub max_tokens: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub n: Option<Value>,
    pub user: Option<Value>,
    pub temperature: Option<Value>,
    /// Chat messages (chat completions only).
    pub messages: Option<Vec<Message<'a>>>,
    /// The prompt (completions) or input (embeddings).
    pub pieces: Option<Vec<Piece<'a>>>,
    /// Whether `prompt`/`input` was present but neither a string nor an array.
    pub pieces_shape: Option<&'static str>,
    pub engine_fields: FieldSet,
    pub fields: Vec<Field<'a>>,
}

/// Runs the pass over `body`. `current` names the field being decoded
/// when an error occurs, so the error can blame it.
pub(crate) fn collect<'a>(
    endpoint: Endpoint,
    body: &'a [u8],
    current: &Cell<Option<&'static str>>,
) -> Result<Collected<'a>, serde_json::Error> {
    let mut collected = Collected::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    deserializer.deserialize_map(Top {
        endpoint,
        base: body.as_ptr() as usize,
        out: &mut collected,
        current,
    })?;
    deserializer.end()?;
    Ok(collected)
}

struct Top<'c, 'a> {
    endpoint: Endpoint,
    base: usize,
    out: &'c mut Collected<'a>,
    current: &'c Cell<Option<&'static str>>,
}

impl<'de> Visitor<'de> for Top<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
            let key_at = match &name {
                Cow::Borrowed(s) => (s.as_ptr() as usize).checked_sub(self.base + 1),
                Cow::Owned(_) => None,
            };
            self.decode(&name, &mut map)?;
            self.out.fields.push(Field { name, key_at });
        }
        Ok(())
    }
}

impl<'de> Top<'_, 'de> {
    fn decode<A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<(), A::Error> {
        let out = &mut *self.out;
        let slot = match name {
            "model" => &mut out.model,
            "stream" => &mut out.stream,
            "stream_options" => &mut out.stream_options,
            "max_tokens" => &mut out.max_tokens,
            "max_completion_tokens" => &mut out.max_completion_tokens,
            "n" => &mut out.n,
            "user" => &mut out.user,
            "temperature" => &mut out.temperature,
            _ => return self.decode_bulk(name, map),
        };
        *slot = Some(map.next_value::<Value>()?);
        Ok(())
    }

    /// The prompt-carrying fields, decoded without copying their text, and
    /// every other field, skimmed.
    fn decode_bulk<A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<(), A::Error> {
        match (self.endpoint, name) {
            (Endpoint::ChatCompletions, "messages") => {
                self.current.set(Some("messages"));
                self.out.messages = Some(map.next_value::<Messages<'de>>()?.0);
                self.current.set(None);
            }
            (Endpoint::Completions, "prompt") | (Endpoint::Embeddings, "input") => {
                let mut pieces = Vec::new();
                let shape = map.next_value_seed(TopPieces { out: &mut pieces })?;
                self.out.pieces = Some(pieces);
                self.out.pieces_shape = shape;
            }
            _ => {
                if let Some(gated) = infermesh_runtime::engine_fields::GATED
                    .iter()
                    .find(|g| **g == name)
                {
                    self.out.engine_fields.insert(gated);
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A field name, borrowed from the body when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Text, borrowed from the body when it has no escapes.
fn text<'de, E>(v: Cow<'de, str>) -> Result<Piece<'de>, E> {
    Ok(Piece::Text(v))
}

/// `messages`: an array of objects with a non-empty string `role` and a
/// `content` that is a string, an array of parts, or null.
struct Messages<'a>(Vec<Message<'a>>);

impl<'de> de::Deserialize<'de> for Messages<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("messages to be an array of message objects")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Messages<'de>, S::Error> {
                let mut messages = Vec::new();
                while let Some(message) = seq.next_element_seed(MessageSeed(messages.len()))? {
                    messages.push(message);
                }
                if messages.is_empty() {
                    return Err(de::Error::custom("messages must not be empty"));
                }
                Ok(Messages(messages))
            }
        }
        deserializer.deserialize_seq(V)
    }
}

struct MessageSeed(usize);

impl<'de> DeserializeSeed<'de> for MessageSeed {
    type Value = Message<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Message<'de>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed {
    type Value = Message<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "messages[{}] to be an object with `role` and `content`",
            self.0
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'de>, A::Error> {
        let i = self.0;
        let mut role = None;
        let mut parts = Vec::new();
        while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
            match &*name {
                "role" => match map.next_value::<Piece<'de>>()? {
                    Piece::Text(r) if !r.is_empty() => role = Some(r),
                    _ => {
                        return Err(de::Error::custom(format!(
                            "messages[{i}].role must be a non-empty string"
                        )));
                    }
                },
                "content" => map.next_value_seed(Content {
                    index: i,
                    out: &mut parts,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let Some(role) = role else {
            return Err(de::Error::custom(format!(
                "messages[{i}].role must be a non-empty string"
            )));
        };
        Ok(Message { role, parts })
    }
}

/// A message's `content`: null, a string, or an array of content parts
/// (objects whose `text` is kept; images and the like are skipped).
struct Content<'c, 'a> {
    index: usize,
    out: &'c mut Vec<Piece<'a>>,
}

impl<'de> DeserializeSeed<'de> for Content<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Content<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "messages[{}].content to be a string or an array of content parts",
            self.index
        )
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        self.out.push(Piece::Text(Cow::Borrowed(v)));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.out.push(Piece::Text(Cow::Owned(v.to_owned())));
        Ok(())
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(piece) = seq.next_element::<Piece<'de>>()? {
            self.out.push(piece);
        }
        Ok(())
    }
}

/// A piece of prompt: a string, a token id, or the `text` of a content
/// part; anything else is skimmed and counts as nothing.
impl<'de> de::Deserialize<'de> for Piece<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Piece<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id or a content part")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Piece<'de>, E> {
                text(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Piece<'de>, E> {
                text(Cow::Owned(v.to_owned()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Piece<'de>, E> {
                Ok(Piece::Token(v.to_string().into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Piece<'de>, E> {
                Ok(Piece::Token(v.to_string().into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Piece<'de>, E> {
                Ok(Piece::Token(v.to_string().into()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Piece<'de>, E> {
                Ok(Piece::Nothing)
            }
            fn visit_unit<E>(self) -> Result<Piece<'de>, E> {
                Ok(Piece::Nothing)
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Piece<'de>, S::Error> {
                let mut pieces = Vec::new();
                while let Some(piece) = seq.next_element::<Piece<'de>>()? {
                    pieces.push(piece);
                }
                Ok(Piece::Many(pieces))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Piece<'de>, A::Error> {
                let mut found = Piece::Nothing;
                while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
                    if name == "text" {
                        found = map.next_value::<Piece<'de>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(found)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `prompt` or `input`: a string or an array; any other shape is noted
/// (and refused by the checks) rather than failing the parse.
struct TopPieces<'c, 'a> {
    out: &'c mut Vec<Piece<'a>>,
}

impl<'de> DeserializeSeed<'de> for TopPieces<'_, 'de> {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopPieces<'_, 'de> {
    type Value = Option<&'static str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an array")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        self.out.push(Piece::Text(Cow::Borrowed(v)));
        Ok(None)
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        self.out.push(Piece::Text(Cow::Owned(v.to_owned())));
        Ok(None)
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        while let Some(piece) = seq.next_element::<Piece<'de>>()? {
            self.out.push(piece);
        }
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Some("a number"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Some("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Some("a number"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Some("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Some("null"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Some("an object"))
    }
}
