//! Cache keys. A key is the SHA-256 of the tenant, the canonical model
//! name, the serving replicas' engine fingerprint and the request's cache
//! material (`Parsed::cache_material`: top-level fields sorted, no
//! whitespace, no delivery fields, the canonical model name). Different
//! tenants never share a key.

use sha2::{Digest, Sha256};

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
    fn tenant_model_fingerprint_and_request_change_the_key() {
        let base = key("acme", "llama", "fp1", b"{}");
        assert_ne!(base, key("globex", "llama", "fp1", b"{}"));
        assert_ne!(base, key("acme", "llama2", "fp1", b"{}"));
        assert_ne!(base, key("acme", "llama", "fp2", b"{}"));
        assert_ne!(base, key("acme", "llama", "fp1", b"{\"n\":2}"));
        assert_ne!(key("ab", "c", "", b""), key("a", "bc", "", b""));
        assert_eq!(base, key("acme", "llama", "fp1", b"{}"));
    }
}
