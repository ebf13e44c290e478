use bytes::Bytes;
use infermesh_runtime::engine_fields::{FieldSet, GATED};

use super::*;

fn parse_as(endpoint: Endpoint, s: &str) -> Result<Parsed<'static>, ApiError> {
    let body: &'static Bytes = Box::leak(Box::new(Bytes::from(s.to_string())));
    super::parse(endpoint, body)
}

fn completion(s: &str) -> Result<Parsed<'static>, ApiError> {
    parse_as(Endpoint::Completions, s)
}

fn chat(s: &str) -> Result<Parsed<'static>, ApiError> {
    parse_as(Endpoint::ChatCompletions, s)
}

fn param_of(result: Result<Parsed<'_>, ApiError>) -> Option<&'static str> {
    match result {
        Err(ApiError::InvalidRequest { param, .. }) => param,
        other => panic!("expected invalid request, got {other:?}"),
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn the_fields_the_edge_acts_on_are_read_and_the_rest_skipped() {
    let f = chat(
        r#"{"messages":[{"role":"user","content":"hi there, 16 b.","name":"x"}],"model":"llama","stream":true,"n":2,"max_tokens":9,"max_completion_tokens":7,"stream_options":{"include_usage":true},"temperature":0,"user":"u1"}"#,
    )
    .unwrap();
    assert_eq!(f.model, "llama");
    assert!(f.stream && f.include_usage);
    assert_eq!(f.n, 2);
    assert_eq!(f.max_output_tokens, Some(7), "max_completion_tokens first");
    assert_eq!(f.prompt_tokens_estimate, 8);
    assert_eq!(f.user.as_deref(), Some("u1"));
    assert_eq!(f.temperature, Some(0.0));
    assert_eq!(f.engine_fields, FieldSet::default());
    assert_eq!(f.prompt.text(), b"user: hi there, 16 b.\n");
    let plain = completion(r#"{"model":"m","prompt":"x","max_tokens":5}"#).unwrap();
    assert!(!plain.stream);
    assert_eq!((plain.n, plain.max_output_tokens), (1, Some(5)));
}

#[test]
fn prompt_text_is_borrowed_from_the_body_unless_escaped() {
    let f = completion(r#"{"model":"m","prompt":["plain","esc\"aped",[1,2]]}"#).unwrap();
    let Piece::Many(pieces) = &f.prompt.pieces[0] else {
        panic!("{:?}", f.prompt)
    };
    assert!(matches!(
        &pieces[0],
        Piece::Text(std::borrow::Cow::Borrowed("plain"))
    ));
    assert!(matches!(&pieces[1], Piece::Text(std::borrow::Cow::Owned(s)) if s == "esc\"aped"));
    assert_eq!(f.prompt.text(), b"plainesc\"aped12");
    let embed = parse_as(Endpoint::Embeddings, r#"{"model":"m","input":[[5,6],[7]]}"#).unwrap();
    assert_eq!(embed.prompt_tokens_estimate, 3);
}

#[test]
fn malformed_bodies_name_what_is_wrong() {
    assert_eq!(param_of(completion("")), None);
    assert_eq!(param_of(completion("{not json")), None);
    assert_eq!(param_of(completion("[1,2]")), None);
    assert_eq!(
        param_of(completion(r#"{"model":"m","prompt":"x"} trailing"#)),
        None
    );
    let body: &'static Bytes = Box::leak(Box::new(Bytes::from_static(
        b"{\"model\":\"m\",\"prompt\":\"x\",\"k\xff\":1}",
    )));
    assert_eq!(param_of(super::parse(Endpoint::Completions, body)), None);
    assert_eq!(param_of(completion(r#"{"messages":[]}"#)), Some("model"));
    assert_eq!(param_of(completion(r#"{"model":""}"#)), Some("model"));
    assert_eq!(param_of(completion(r#"{"model":42}"#)), Some("model"));
    assert_eq!(
        param_of(completion(r#"{"model":"m","prompt":"x","stream":"yes"}"#)),
        Some("stream")
    );
    assert_eq!(param_of(completion(r#"{"model":"m"}"#)), Some("prompt"));
    assert_eq!(
        param_of(completion(r#"{"model":"m","prompt":5}"#)),
        Some("prompt")
    );
    assert_eq!(
        param_of(completion(r#"{"model":"m","prompt":{"text":"x"}}"#)),
        Some("prompt")
    );
    assert_eq!(param_of(chat(r#"{"model":"m"}"#)), Some("messages"));
    for bad in [
        r#""hi""#,
        "[]",
        r#"["hi"]"#,
        r#"[{"content":"x"}]"#,
        r#"[{"role":"","content":"x"}]"#,
        r#"[{"role":"user","content":5}]"#,
        r#"[{"role":"user","content":{"a":1}}]"#,
    ] {
        let body = format!(r#"{{"model":"m","messages":{bad}}}"#);
        assert_eq!(param_of(chat(&body)), Some("messages"), "{bad}");
    }
    for bad in ["-1", "0", "1.5", "\"10\"", "100000000000"] {
        let body = format!(r#"{{"model":"m","prompt":"x","max_tokens":{bad}}}"#);
        assert_eq!(param_of(completion(&body)), Some("max_tokens"), "{bad}");
        let body = format!(r#"{{"model":"m","prompt":"x","max_completion_tokens":{bad}}}"#);
        assert_eq!(
            param_of(completion(&body)),
            Some("max_completion_tokens"),
            "{bad}"
        );
        let body = format!(r#"{{"model":"m","prompt":"x","n":{bad}}}"#);
        assert_eq!(param_of(completion(&body)), Some("n"), "{bad}");
    }
    assert_eq!(
        param_of(completion(
            r#"{"model":"m","prompt":"x","stream_options":{"include_usage":true}}"#
        )),
        Some("stream_options")
    );
}

#[test]
fn a_field_given_twice_is_refused_even_when_escaped() {
    assert_eq!(
        param_of(completion(r#"{"model":"a","prompt":"x","model":"b"}"#)),
        None
    );
    assert_eq!(
        param_of(completion(r#"{"model":"a","prompt":"x","mod\u0065l":"b"}"#)),
        None
    );
}

#[test]
fn usage_is_requested_and_other_options_and_fields_kept() {
    let f =
        completion(r#" {"model":"m","prompt":"p","stream":true, "x_unknown":[1, 2]} "#).unwrap();
    let out = f.upstream_body("m", FieldSet::default()).unwrap();
    assert_eq!(
        &out[..],
        br#"{"model":"m","prompt":"p","stream":true,"x_unknown":[1, 2],"stream_options":{"include_usage":true}}"#
    );
    let f = completion(
        r#"{"model":"m","prompt":"p","stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#,
    )
    .unwrap();
    let value = json(&f.upstream_body("m", FieldSet::default()).unwrap());
    assert_eq!(value["stream_options"]["include_usage"], true);
    assert_eq!(value["stream_options"]["continuous_usage_stats"], true);
}

#[test]
fn an_alias_is_replaced_by_the_canonical_name_and_other_fields_kept() {
    let f = completion(r#"{"model":"l3","x_unknown":{"a":1},"prompt":"hi"}"#).unwrap();
    let out = f.upstream_body("llama-3", FieldSet::default()).unwrap();
    assert_eq!(
        &out[..],
        br#"{"model":"llama-3","x_unknown":{"a":1},"prompt":"hi"}"#
    );
}

#[test]
fn engine_fields_pass_only_where_the_model_allows_them() {
    let text = r#"{"model":"m","prompt":"hi","priority":-10,"request_id":"victim","chat_template":"{{x}}","temperature":0}"#;
    let fields = completion(text).unwrap();
    assert_eq!(
        fields.engine_fields.names().collect::<Vec<_>>(),
        ["priority", "request_id", "chat_template"]
    );
    let sent = |allowed: &[&str]| {
        json(
            &fields
                .upstream_body("m", FieldSet::of(allowed.iter().copied()))
                .unwrap(),
        )
    };
    let default = sent(&[]);
    for gone in ["priority", "request_id", "chat_template"] {
        assert!(default.get(gone).is_none(), "{gone}: {default}");
    }
    assert_eq!(default["temperature"], 0);
    assert_eq!(default["prompt"], "hi");
    let allowed = sent(&["priority"]);
    assert_eq!(allowed["priority"], -10);
    assert!(allowed.get("request_id").is_none(), "{allowed}");
    // A body with no engine field and the canonical name goes as sent.
    let plain = completion(r#"{"model":"m", "prompt":"hi"}"#).unwrap();
    assert_eq!(
        plain.upstream_body("m", FieldSet::default()).unwrap(),
        plain.body()
    );
    // Numbers beyond what JSON tools read are copied, never re-read: the
    // field that must go still goes.
    let text = r#"{"model":"m","prompt":"p","chat_template_kwargs":1e99999,"x":2e99999}"#;
    assert!(
        completion(text).is_err(),
        "read whole, such a number is refused"
    );
    let body: &'static Bytes = Box::leak(Box::new(Bytes::from(text)));
    let huge = super::parse_with(Endpoint::Completions, body, false).unwrap();
    let out = huge.upstream_body("m", FieldSet::default()).unwrap();
    assert_eq!(&out[..], br#"{"model":"m","prompt":"p","x":2e99999}"#);
    // A field whose name is escaped is found and removed all the same.
    let escaped = completion(r#"{"model":"m","prompt":"p","priorit\u0079":1}"#).unwrap();
    let out = json(&escaped.upstream_body("m", FieldSet::default()).unwrap());
    assert!(out.get("priority").is_none(), "{out}");
}

#[test]
fn every_rewrite_reads_back_as_the_same_request() {
    let all = FieldSet::of(GATED);
    for text in [
        r#"{"model":"a","prompt":"p"}"#,
        r#"{"priority":1,"model":"a","prompt":"p"}"#,
        r#"{"model":"a","prompt":"p","priority":1,"rid":"x"}"#,
        r#"{"rid":"x","priority":1}"#,
        r#"{ "model" : "a" , "stream" : true , "prompt" : "p" , "rid" : 1 }"#,
    ] {
        let Ok(fields) = completion(text) else {
            continue;
        };
        for (canonical, allowed) in [
            ("a", all),
            ("a", FieldSet::default()),
            ("z/1", FieldSet::default()),
        ] {
            let sent = fields.upstream_body(canonical, allowed).unwrap();
            let sent: &'static Bytes = Box::leak(Box::new(sent));
            let after = super::parse(Endpoint::Completions, sent).unwrap();
            assert_eq!(after.model, canonical, "{text}");
            assert_eq!(after.include_usage, fields.stream, "{text}");
            assert_eq!(
                after.engine_fields,
                fields
                    .engine_fields
                    .without(fields.engine_fields.without(allowed))
            );
        }
    }
}

#[test]
fn cache_material_ignores_order_spacing_alias_and_delivery() {
    let a = chat(r#"{"model":"l3","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true}"#).unwrap();
    let b = chat(
        r#"{ "temperature" : 0, "messages" : [ {"content":"h\u0069", "role":"user"} ],
             "model": "llama", "user": "u-1" }"#,
    )
    .unwrap();
    assert_eq!(a.cache_material("llama"), b.cache_material("llama"));
    assert_eq!(
        a.cache_material("llama").unwrap(),
        br#"{"messages":[{"content":"hi","role":"user"}],"model":"llama","temperature":0}"#
    );
    let c = chat(r#"{"model":"l3","messages":[{"role":"user","content":"hi "}],"temperature":0}"#)
        .unwrap();
    assert_ne!(a.cache_material("llama"), c.cache_material("llama"));
}

#[test]
fn one_parse_per_body() {
    let before = counter::parses();
    let f = completion(r#"{"model":"a","prompt":"p","stream":true,"priority":1}"#).unwrap();
    f.upstream_body("b", FieldSet::default()).unwrap();
    f.cache_material("b").unwrap();
    let _ = f.prompt.text();
    assert_eq!(counter::parses() - before, 1);
}

#[test]
fn each_endpoint_reads_its_own_prompt_fields() {
    let responses = parse_as(
        Endpoint::Responses,
        r#"{"model":"m","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"max_output_tokens":12,"stream":true}"#,
    )
    .unwrap();
    assert_eq!(responses.prompt.text(), b"be briefhi");
    assert_eq!(responses.max_output_tokens, Some(12));
    assert!(
        !responses.usage_injected(),
        "usage comes with response.completed"
    );
    assert_eq!(
        param_of(parse_as(Endpoint::Responses, r#"{"model":"m"}"#)),
        Some("input")
    );
    let anthropic = parse_as(
        Endpoint::Messages,
        r#"{"model":"m","system":"sys","max_tokens":9,"messages":[{"role":"user","content":[{"type":"text","text":"hey"}]}]}"#,
    )
    .unwrap();
    assert_eq!(anthropic.prompt.text(), b"sysuser: hey\n");
    assert_eq!(anthropic.max_output_tokens, Some(9));
    let rerank = parse_as(
        Endpoint::Rerank,
        r#"{"model":"m","query":"q","documents":["d1",{"text":"d2"}]}"#,
    )
    .unwrap();
    assert_eq!(rerank.prompt.text(), b"qd1d2");
    assert_eq!(rerank.max_output_tokens, Some(0), "nothing is generated");
    let tokens = parse_as(Endpoint::Detokenize, r#"{"model":"m","tokens":[1,2,3]}"#).unwrap();
    assert_eq!(tokens.prompt.text(), b"123");
    assert_eq!(
        param_of(parse_as(Endpoint::Tokenize, r#"{"prompt":"x"}"#)),
        Some("model")
    );
}
