//! Where each top-level field of a parsed body lies, so that the rewrites
//! before forwarding and the cache key work on the raw bytes instead of
//! parsing the body again. Between one value's end and the next key there
//! is only whitespace and a comma, which is what makes the spans exact.

use std::ops::Range;

use super::wire::Field;

/// One top-level field's key (quotes included) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub key: Range<usize>,
    pub value: Range<usize>,
}

/// The spans of every top-level field, in body order; `None` when a field
/// name was escaped (its place is then unknown).
pub(crate) fn spans(body: &[u8], fields: &[Field<'_>]) -> Option<Vec<Span>> {
    let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    let mut spans = Vec::with_capacity(fields.len());
    for (i, field) in fields.iter().enumerate() {
        let key_at = field.key_at?;
        let key_end = key_at + field.name.len() + 2;
        (body.get(key_at) == Some(&b'"') && body.get(key_end - 1) == Some(&b'"')).then_some(())?;
        let colon = skip_ws(body, key_end);
        (body.get(colon) == Some(&b':')).then_some(())?;
        let value_start = skip_ws(body, colon + 1);
        let value_end = match fields.get(i + 1) {
            Some(next) => {
                let comma = trim_ws_back(body, next.key_at?);
                (comma > 0 && body[comma - 1] == b',').then_some(())?;
                trim_ws_back(body, comma - 1)
            }
            None => trim_ws_back(body, close),
        };
        (value_start < value_end).then_some(())?;
        spans.push(Span {
            key: key_at..key_end,
            value: value_start..value_end,
        });
    }
    Some(spans)
}

fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while body.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The end of the bytes before `at` once trailing whitespace is dropped.
fn trim_ws_back(body: &[u8], mut at: usize) -> usize {
    while at > 0 && body[at - 1].is_ascii_whitespace() {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Endpoint;

    fn spans_of(body: &str) -> Option<Vec<(String, String)>> {
        let collected =
            super::super::wire::collect(Endpoint::Completions, body.as_bytes(), false).unwrap();
        spans(body.as_bytes(), &collected.fields).map(|spans| {
            spans
                .into_iter()
                .map(|s| (body[s.key].to_string(), body[s.value].to_string()))
                .collect()
        })
    }

    #[test]
    fn every_field_is_found_whatever_the_spacing() {
        let body = " {\n \"model\" :\t\"m\" ,\"prompt\":[1, {\"a\":\"}\"}] ,\"x\":null\n}\n ";
        assert_eq!(
            spans_of(body).unwrap(),
            [
                ("\"model\"".into(), "\"m\"".into()),
                ("\"prompt\"".into(), "[1, {\"a\":\"}\"}]".into()),
                ("\"x\"".into(), "null".into()),
            ]
        );
        assert_eq!(spans_of("{}").unwrap(), []);
    }

    #[test]
    fn an_escaped_field_name_has_no_known_place() {
        assert_eq!(spans_of(r#"{"mod\u0065l":"m","prompt":"p"}"#), None);
    }
}
