//! Cache keys. A key is the SHA-256 of the tenant, the canonical model
//! name, the serving replicas' engine fingerprint and a canonical form of
//! the request: JSON with sorted keys and no whitespace, without the fields
//! that only change how the answer is delivered (`stream`,
//! `stream_options`) or who asked (`user`), and with the model's canonical
//! name in place of an alias. Two requests that differ only in key order,
//! spacing, alias or delivery share a key; different tenants never do.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Fields left out of the canonical request.
const DELIVERY_FIELDS: &[&str] = &["stream", "stream_options", "user"];

/// The request as it is hashed, or `None` when the body is not a JSON object.
pub fn canonical_request(body: &[u8], canonical_model: &str) -> Option<Vec<u8>> {
    let Value::Object(mut map) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    for field in DELIVERY_FIELDS {
        map.remove(*field);
    }
    map.insert("model".into(), Value::String(canonical_model.into()));
    // serde_json's map is ordered by key, so serialising sorts every level.
    serde_json::to_vec(&Value::Object(map)).ok()
}

/// The key of `canonical` for `tenant`, `model` and `fingerprint`, as hex.
pub fn key(tenant: &str, model: &str, fingerprint: &str, canonical: &[u8]) -> String {
    let mut hash = Sha256::new();
    for part in [tenant.as_bytes(), model.as_bytes(), fingerprint.as_bytes()] {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(canonical);
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_spacing_alias_and_delivery_do_not_change_the_key() {
        let a = br#"{"model":"l3","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true}"#;
        let b = br#"{ "temperature" : 0, "messages" : [ {"content":"hi", "role":"user"} ],
                     "model": "llama", "user": "u-1" }"#;
        let ka = key(
            "acme",
            "llama",
            "fp",
            &canonical_request(a, "llama").unwrap(),
        );
        let kb = key(
            "acme",
            "llama",
            "fp",
            &canonical_request(b, "llama").unwrap(),
        );
        assert_eq!(ka, kb);
    }

    #[test]
    fn tenant_fingerprint_and_sampling_change_the_key() {
        let body = br#"{"model":"llama","prompt":"x","temperature":0}"#;
        let canonical = canonical_request(body, "llama").unwrap();
        let base = key("acme", "llama", "fp1", &canonical);
        assert_ne!(base, key("globex", "llama", "fp1", &canonical));
        assert_ne!(base, key("acme", "llama", "fp2", &canonical));
        let other = canonical_request(
            br#"{"model":"llama","prompt":"x","temperature":0,"max_tokens":5}"#,
            "llama",
        )
        .unwrap();
        assert_ne!(base, key("acme", "llama", "fp1", &other));
        assert_ne!(key("ab", "c", "", b""), key("a", "bc", "", b""));
    }

    #[test]
    fn a_body_that_is_not_an_object_has_no_canonical_form() {
        assert!(canonical_request(b"[1,2]", "m").is_none());
        assert!(canonical_request(b"nope", "m").is_none());
    }
}
