//! The edge's request parser on arbitrary bodies: it must never panic, and
//! every body it accepts must stay accepted, with the same meaning, after
//! the rewrites the edge applies before forwarding (the canonical model
//! name in place of an alias, usage asked for on streamed requests, engine
//! fields the model does not allow removed). Its cache material must be
//! JSON too.

#![no_main]

use bytes::Bytes;
use infermesh_edge::openai::Endpoint;
use infermesh_edge::request::parse;
use infermesh_runtime::engine_fields::{FieldSet, GATED};
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [Endpoint; 3] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
];

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    for endpoint in ENDPOINTS {
        let Ok(fields) = parse(endpoint, &body) else {
            continue;
        };
        if let Some(material) = fields.cache_material("canonical/model-1") {
            let material = Bytes::from(material);
            let read = parse(endpoint, &material).expect("cache material reads back");
            assert_eq!(read.model, "canonical/model-1");
            assert_eq!(read.prompt, fields.prompt);
        }
        let all = FieldSet::of(GATED);
        for (canonical, allowed) in [
            (fields.model.as_str(), all),
            (fields.model.as_str(), FieldSet::default()),
            ("canonical/model-1", all),
            ("canonical/model-1", FieldSet::default()),
        ] {
            let Ok(sent) = fields.upstream_body(canonical, allowed) else {
                // Refused with a 400: a body the rewrites cannot read is never forwarded.
                continue;
            };
            let after = parse(endpoint, &sent)
                .expect("a valid request stays valid after the edge's rewrites");
            assert_eq!(after.model, canonical);
            assert_eq!(after.stream, fields.stream);
            assert_eq!(after.include_usage, fields.stream || fields.include_usage);
            assert_eq!(after.max_output_tokens, fields.max_output_tokens);
            assert_eq!(after.n, fields.n);
            assert_eq!(after.prompt, fields.prompt, "the prompt is carried as it was");
            assert_eq!(
                after.engine_fields,
                fields.engine_fields.without(fields.engine_fields.without(allowed)),
                "exactly the engine fields not allowed are removed"
            );
            let refused = fields.engine_fields.without(allowed);
            if canonical == fields.model
                && refused.is_empty()
                && !(fields.stream && !fields.include_usage)
            {
                assert_eq!(
                    sent, body,
                    "a body needing no rewrite is passed on untouched"
                );
            }
        }
    }
});
