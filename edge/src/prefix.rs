//! Prefix affinity: which replica most likely still holds a prompt's
//! prefix in its KV cache. Prompts are cut into fixed blocks of bytes, each
//! keyed by a hash chained over every block before it (as vLLM keys its
//! KV blocks), so a key stands for the whole prefix up to its block. The
//! index maps keys to the replica that last served them, bounded in
//! entries (least recently used evicted), like an approximate radix tree.
//! The hash is XXH3 seeded with the previous block's key: fixed by its
//! specification, so edges built apart (or by another Rust release) agree.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes per block (about 16 tokens of English text).
pub const BLOCK_BYTES: usize = 64;
/// Most blocks remembered per model.
const CAPACITY: u64 = 200_000;

/// Chained keys of the full blocks of `prompt`.
pub fn block_keys(prompt: &[u8]) -> Vec<u64> {
    let mut previous = 0u64;
    prompt
        .chunks_exact(BLOCK_BYTES)
        .map(|block| {
            previous = xxh3_64_with_seed(block, previous);
            previous
        })
        .collect()
}

/// One model's prefix index.
pub struct PrefixIndex {
    owners: moka::sync::Cache<u64, Arc<str>>,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("blocks", &self.owners.entry_count())
            .finish()
    }
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self {
            owners: moka::sync::Cache::new(CAPACITY),
        }
    }
}

impl PrefixIndex {
    /// The replica holding the longest prefix of `keys` among those `eligible`
    /// says yes to, and how many blocks it holds.
    pub fn longest(
        &self,
        keys: &[u64],
        eligible: impl Fn(&str) -> bool,
    ) -> Option<(Arc<str>, usize)> {
        keys.iter().enumerate().rev().find_map(|(i, key)| {
            self.owners
                .get(key)
                .filter(|owner| eligible(owner))
                .map(|owner| (owner, i + 1))
        })
    }

    /// How many leading blocks of `keys` `endpoint` holds: the blocks up
    /// to the last one it was recorded for.
    pub fn held_by(&self, keys: &[u64], endpoint: &str) -> usize {
        keys.iter()
            .rposition(|key| self.owners.get(key).is_some_and(|o| &*o == endpoint))
            .map_or(0, |i| i + 1)
    }

    /// `endpoint` now holds every block of `keys`.
    pub fn record(&self, keys: &[u64], endpoint: &Arc<str>) {
        for key in keys {
            self.owners.insert(*key, endpoint.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_are_the_same_on_every_build() {
        // Pinned: two edges built apart, by different Rust releases, must
        // cut and key the same prompt the same way.
        let keys = block_keys(&[b'a'; 130]);
        assert_eq!(keys, [3305025233846988428, 298704837528572388]);
    }

    #[test]
    fn the_longest_shared_prefix_wins_and_a_different_start_matches_nothing() {
        let index = PrefixIndex::default();
        let system = "You are a helpful assistant. ".repeat(10);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let short = block_keys(system.as_bytes());
        index.record(&short, &a);
        let long = block_keys(format!("{system}{}", "user: tell me more ".repeat(8)).as_bytes());
        index.record(&long, &b);
        let (owner, blocks) = index.longest(&long, |_| true).unwrap();
        assert_eq!((&*owner, blocks), ("b", long.len()));
        let (owner, blocks) = index.longest(&short, |_| true).unwrap();
        assert_eq!(&*owner, "b", "b served the same leading blocks last");
        assert_eq!(blocks, short.len());
        let (owner, _) = index
            .longest(&long, |id| id != "b")
            .unwrap_or((Arc::from("none"), 0));
        assert_eq!(&*owner, "none", "a's blocks were taken over by b");
        let other = block_keys(format!("X{system}").as_bytes());
        assert!(index.longest(&other, |_| true).is_none());
    }
}
