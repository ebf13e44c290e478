//! A deterministic stand-in tokenizer (one whitespace-separated word is one
//! token) and deterministic output text, so identical requests get identical
//! answers and shared prompt prefixes share leading tokens.

use std::hash::{DefaultHasher, Hash, Hasher};

const WORDS: [&str; 24] = [
    "the", "mesh", "routes", "tokens", "to", "a", "warm", "replica", "with", "its", "prefix",
    "cached", "so", "latency", "stays", "low", "while", "queues", "drain", "and", "every", "gpu",
    "keeps", "busy",
];

/// Token ids of `text`.
pub fn tokenize(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|word| {
            let mut h = DefaultHasher::new();
            word.hash(&mut h);
            h.finish() as u32
        })
        .collect()
}

/// The `i`-th output token for a prompt, as text with a trailing space.
pub fn output_word(tokens: &[u32], i: usize) -> String {
    let seed = tokens.iter().fold(0usize, |acc, t| {
        acc.wrapping_mul(31).wrapping_add(*t as usize)
    });
    format!("{} ", WORDS[(seed.wrapping_add(i)) % WORDS.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_tokens_and_output_is_deterministic() {
        let a = tokenize("You are  helpful.\nHi there");
        assert_eq!(a.len(), 5);
        assert_eq!(a, tokenize("You are helpful. Hi there"));
        assert_eq!(output_word(&a, 3), output_word(&a, 3));
    }
}
