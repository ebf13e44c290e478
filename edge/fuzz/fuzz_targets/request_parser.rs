//! The edge's request parser on arbitrary bodies: it must never panic, and
//! every body it accepts must stay accepted, with the same meaning, after
//! the rewrites the edge applies before forwarding (the canonical model
//! name in place of an alias, usage asked for on streamed requests).

#![no_main]

use bytes::Bytes;
use infermesh_edge::openai::{Endpoint, routing_fields, upstream_body};
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [Endpoint; 3] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
];

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    for endpoint in ENDPOINTS {
        let Ok(fields) = routing_fields(endpoint, &body) else {
            continue;
        };
        for canonical in [fields.model.as_str(), "canonical/model-1"] {
            let sent = upstream_body(body.clone(), &fields, canonical);
            let after = routing_fields(endpoint, &sent)
                .expect("a valid request stays valid after the edge's rewrites");
            assert_eq!(after.model, canonical);
            assert_eq!(after.stream, fields.stream);
            assert_eq!(after.include_usage, fields.stream || fields.include_usage);
            assert_eq!(after.max_tokens, fields.max_tokens);
            if canonical == fields.model && !(fields.stream && !fields.include_usage) {
                assert_eq!(
                    sent, body,
                    "a body needing no rewrite is passed on untouched"
                );
            }
        }
    }
});
