//! Automatic prefix caching the way vLLM does it: prompts are cut into
//! full blocks of tokens, each block keyed by a hash chained over every
//! block before it, so a block hits only when the whole prefix up to it is
//! the same. Blocks are evicted least recently used first.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Keys of the full blocks of `tokens`.
pub fn block_keys(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut previous = 0u64;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let mut h = DefaultHasher::new();
            previous.hash(&mut h);
            block.hash(&mut h);
            previous = h.finish();
            previous
        })
        .collect()
}

/// An LRU set of block keys.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    last_use: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
    clock: u64,
}

impl PrefixCache {
    /// A cache holding at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
            clock: 0,
        }
    }

    /// Counts the leading blocks already cached, then caches all of them.
    pub fn admit(&mut self, keys: &[u64]) -> usize {
        let hits = keys
            .iter()
            .take_while(|k| self.last_use.contains_key(k))
            .count();
        for key in keys {
            self.touch(*key);
        }
        hits
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }

    fn touch(&mut self, key: u64) {
        self.clock += 1;
        if let Some(old) = self.last_use.insert(key, self.clock) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.clock, key);
        while self.last_use.len() > self.capacity {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.last_use.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_prefix_hits_and_a_different_first_block_misses_everything() {
        let mut cache = PrefixCache::new(100);
        let a: Vec<u32> = (0..64).collect();
        assert_eq!(cache.admit(&block_keys(&a, 16)), 0);
        let mut b = a[..32].to_vec();
        b.extend(1000..1032);
        assert_eq!(
            cache.admit(&block_keys(&b, 16)),
            2,
            "two shared leading blocks"
        );
        let mut c = a.clone();
        c[0] = 9999;
        assert_eq!(
            cache.admit(&block_keys(&c, 16)),
            0,
            "same later blocks, different prefix"
        );
        assert_eq!(
            block_keys(&a[..15], 16).len(),
            0,
            "partial blocks are not cached"
        );
    }

    #[test]
    fn least_recently_used_blocks_are_evicted_first() {
        let mut cache = PrefixCache::new(2);
        cache.admit(&[1]);
        cache.admit(&[2]);
        cache.admit(&[1]);
        cache.admit(&[3]);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.admit(&[1]), 1, "recently used block kept");
        assert_eq!(cache.admit(&[2]), 0, "oldest block evicted");
    }
}
