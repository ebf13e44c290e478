//! The route receipt (`x-infermesh-route`) a client sees when its model has
//! receipts on: which policy routed it, in which region and table version,
//! how many retries, and which replica, as an opaque reference. Nothing in
//! it shows the fleet's layout or other tenants' traffic: no pod names or
//! addresses (the reference is a keyed hash that changes with each edge
//! process), and no routing reason, because "prefix match: 12 of 14
//! blocks" tells a client that someone else sent the same prompt prefix.
//! The full reason stays in the route span and the access log.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// The receipt's header name.
pub const ROUTE_HEADER: &str = "x-infermesh-route";

/// An opaque, stable (for this edge process) reference to `endpoint`.
pub fn replica_ref(endpoint: &str) -> String {
    static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut hasher = KEY
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    hasher.write(endpoint.as_bytes());
    format!("r-{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// The receipt's value.
pub fn render(policy: &str, endpoint: &str, region: &str, table: u64, retries: u32) -> String {
    let replica = if endpoint.is_empty() {
        String::new()
    } else if endpoint == "cache" || endpoint.starts_with("edge/") {
        // The response cache and another region's edge are not replicas.
        endpoint.to_string()
    } else {
        replica_ref(endpoint)
    };
    format!("policy={policy}; replica={replica}; region={region}; table={table}; retries={retries}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_names_no_pod_address_or_reason() {
        let receipt = render("prefix_affinity", "vllm-llama-7f9c-0", "eu-west", 42, 1);
        assert!(!receipt.contains("vllm-llama"), "{receipt}");
        assert!(!receipt.contains("reason"), "{receipt}");
        assert!(
            receipt.starts_with("policy=prefix_affinity; replica=r-"),
            "{receipt}"
        );
        assert!(
            receipt.ends_with("region=eu-west; table=42; retries=1"),
            "{receipt}"
        );
    }

    #[test]
    fn the_same_replica_gets_the_same_reference_and_others_differ() {
        assert_eq!(replica_ref("a-0"), replica_ref("a-0"));
        assert_ne!(replica_ref("a-0"), replica_ref("a-1"));
        assert!(render("round_robin", "edge/us-east", "eu", 1, 0).contains("replica=edge/us-east"));
    }
}
