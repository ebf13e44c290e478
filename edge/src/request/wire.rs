//! The one pass over a request body: a serde visitor over the top-level
//! object that reads the fields the edge acts on (and, when the cache
//! needs them, every field) into borrowed trees, skims the rest without
//! building anything, and notes where each field's key starts so that the
//! rewrites can work on the raw bytes afterwards.

use std::borrow::Cow;
use std::fmt;

use infermesh_runtime::engine_fields::{FieldSet, GATED};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use super::tree::{Json, Name};
use crate::openai::Endpoint;

/// The top-level fields the checks read whatever the endpoint.
const SCALARS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "user",
    "temperature",
];

/// One top-level field as the pass met it.
#[derive(Debug, Clone)]
pub(crate) struct Field<'a> {
    /// Its name, borrowed from the body unless it was escaped.
    pub name: Cow<'a, str>,
    /// Offset of its key's opening quote; `None` for an escaped name.
    pub key_at: Option<usize>,
    /// Its value, when read (see the module docs); `None` when skimmed.
    pub value: Option<Json<'a>>,
}

/// What the pass collects.
#[derive(Debug, Default)]
pub(crate) struct Collected<'a> {
    /// Every top-level field, in body order.
    pub fields: Vec<Field<'a>>,
    /// Engine-specific fields the body carries (`engine_fields::GATED`).
    pub engine_fields: FieldSet,
    /// Whether every field's value was read.
    pub whole: bool,
}

impl<'a> Collected<'a> {
    /// The value of the top-level field `name`, if present and read.
    pub fn get(&self, name: &str) -> Option<&Json<'a>> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .and_then(|f| f.value.as_ref())
    }
}

/// Runs the pass over `body`; `whole` reads every field's value, not just
/// those the request path acts on.
pub(crate) fn collect(
    endpoint: Endpoint,
    body: &[u8],
    whole: bool,
) -> Result<Collected<'_>, serde_json::Error> {
    let mut collected = Collected {
        whole,
        ..Collected::default()
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    deserializer.deserialize_map(Top {
        endpoint,
        base: body.as_ptr() as usize,
        out: &mut collected,
    })?;
    deserializer.end()?;
    Ok(collected)
}

struct Top<'c, 'a> {
    endpoint: Endpoint,
    base: usize,
    out: &'c mut Collected<'a>,
}

impl<'de> Visitor<'de> for Top<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            let key_at = match &name {
                Cow::Borrowed(s) => (s.as_ptr() as usize).checked_sub(self.base + 1),
                Cow::Owned(_) => None,
            };
            if let Some(gated) = GATED.iter().find(|g| **g == name) {
                self.out.engine_fields.insert(gated);
            }
            let read = self.out.whole
                || SCALARS.contains(&&*name)
                || super::fields::prompt_field(self.endpoint, &name).is_some();
            let value = if read {
                Some(map.next_value::<Json<'de>>()?)
            } else {
                map.next_value::<IgnoredAny>()?;
                None
            };
            self.out.fields.push(Field {
                name,
                key_at,
                value,
            });
        }
        Ok(())
    }
}
