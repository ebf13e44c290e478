//! The API key secret format, shared by the control plane (which makes
//! secrets and stores their hashes) and the edge (which checks them).
//!
//! A secret reads `imk_<id>_<random>`: the id is public and names the key
//! in logs and the admin API; the random part carries 238 bits, so a plain
//! SHA-256 is the right hash at rest (a slow password hash buys nothing
//! against a secret that cannot be guessed). Comparison is constant-time.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every secret starts with, so that leaked keys are easy to spot.
pub const PREFIX: &str = "imk_";
/// Length of the public id.
pub const ID_LEN: usize = 12;
/// Length of the random part.
pub const RANDOM_LEN: usize = 40;

/// A freshly made key: its id, the secret to hand out once, and its hash.
pub struct NewSecret {
    /// Public id.
    pub id: String,
    /// The whole secret, `imk_<id>_<random>`.
    pub secret: String,
    /// SHA-256 of the whole secret.
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Makes a new random key.
pub fn generate() -> NewSecret {
    let mut rng = rand::rng();
    let id: String = (0..ID_LEN)
        .map(|_| {
            const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            ALPHABET[rng.random_range(0..ALPHABET.len())] as char
        })
        .collect();
    let random: String = (&mut rng)
        .sample_iter(Alphanumeric)
        .take(RANDOM_LEN)
        .map(char::from)
        .collect();
    let secret = format!("{PREFIX}{id}_{random}");
    let sha256 = digest(&secret);
    NewSecret { id, secret, sha256 }
}

/// The visible prefix of a key's secret, for operators.
pub fn display_prefix(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// Whether `id` has the shape of a key id.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The key id a presented secret claims, if it has the secret's shape.
pub fn claimed_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, random) = rest.split_once('_')?;
    (is_valid_id(id) && random.len() == RANDOM_LEN).then_some(id)
}

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `presented` hashes to `stored`, in time independent of where they differ.
pub fn matches(presented: &str, stored: &[u8]) -> bool {
    let computed = digest(presented);
    stored.len() == computed.len() && bool::from(computed.ct_eq(stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_parse_back_to_their_id_and_match_their_hash() {
        let key = generate();
        assert!(key.secret.starts_with("imk_"));
        assert_eq!(claimed_id(&key.secret), Some(key.id.as_str()));
        assert!(matches(&key.secret, &key.sha256));
        let other = generate();
        assert_ne!(key.id, other.id);
        assert!(!matches(&other.secret, &key.sha256));
        assert!(!format!("{key:?}").contains(&key.secret));
    }

    #[test]
    fn malformed_secrets_claim_no_id() {
        let key = generate();
        assert_eq!(claimed_id(""), None);
        assert_eq!(claimed_id("sk-abc"), None);
        assert_eq!(claimed_id(&key.secret[..key.secret.len() - 1]), None);
        assert_eq!(
            claimed_id(&format!("imk_ABCDEFGHIJKL_{}", "a".repeat(40))),
            None
        );
        assert_eq!(claimed_id(&format!("imk_short_{}", "a".repeat(40))), None);
    }

    #[test]
    fn a_truncated_or_wrong_length_hash_never_matches() {
        let key = generate();
        assert!(!matches(&key.secret, &key.sha256[..31]));
        assert!(!matches(&key.secret, &[]));
    }
}
