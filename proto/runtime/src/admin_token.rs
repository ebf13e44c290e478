//! Admin bearer tokens: the secret format, and the file of their hashes the
//! control plane reads at start. A token reads `imadm_<48 random>` (285
//! bits), so a plain SHA-256 is the right hash at rest; the file holds one
//! `<name> sha256:<hex>` line per token and never the token itself.
//! Comparison is constant-time and checks every entry.

use std::path::{Path, PathBuf};

use rand::Rng;
use rand::distr::Alphanumeric;
use subtle::ConstantTimeEq;

use crate::api_key::digest;

/// What every admin token starts with, so that leaked ones are easy to spot.
pub const PREFIX: &str = "imadm_";
/// Length of the random part.
pub const RANDOM_LEN: usize = 48;
const HASH_PREFIX: &str = "sha256:";

/// One accepted token: who it belongs to and the hash of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Operator or tool the token was issued to; names it in logs.
    pub name: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TokenEntry {
    /// The entry's line in a tokens file.
    pub fn line(&self) -> String {
        format!("{} {HASH_PREFIX}{}", self.name, hex::encode(self.sha256))
    }
}

/// A token name that is empty, longer than 64 bytes, or has characters
/// other than letters, digits, '-', '_', '.' and '@'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token name {0:?}: use 1 to 64 letters, digits, '-', '_', '.' or '@'")]
pub struct BadTokenName(pub String);

/// Why a tokens file's text is refused: the line and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct TokensFileError {
    /// The line, counted from 1.
    pub line: usize,
    /// What is wrong with it.
    pub problem: LineProblem,
}

/// What is wrong with one line of a tokens file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    /// Not two fields.
    #[error("expected `<name> sha256:<64 hex digits>`")]
    Shape,
    /// The name is not allowed.
    #[error(transparent)]
    Name(BadTokenName),
    /// The hash lacks its `sha256:` prefix.
    #[error("the hash must start with {HASH_PREFIX:?}")]
    HashPrefix,
    /// A token where its hash belongs.
    #[error("this is a token, not its hash; the file holds only hashes")]
    TokenNotHash,
    /// The hash is not 64 hex digits.
    #[error("the hash must be 64 hex digits")]
    HashDigits,
    /// An earlier line has the same name.
    #[error("token name {0:?} appears twice")]
    Duplicate(String),
}

/// Why a tokens file could not be loaded; names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadTokensError {
    /// The file could not be read.
    #[error("{}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        error: std::io::Error,
    },
    /// Its text is refused.
    #[error("{}: {error}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line refused and why.
        error: TokensFileError,
    },
}

/// A new token: the secret to hand out once, and its file entry.
pub fn generate(name: &str) -> Result<(String, TokenEntry), BadTokenName> {
    check_name(name)?;
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(RANDOM_LEN)
        .map(char::from)
        .collect();
    let secret = format!("{PREFIX}{random}");
    let entry = TokenEntry {
        name: name.to_string(),
        sha256: digest(&secret),
    };
    Ok((secret, entry))
}

fn check_name(name: &str) -> Result<(), BadTokenName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(BadTokenName(name.to_string()))
    }
}

/// The accepted admin tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

impl TokenSet {
    /// Parses a tokens file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, TokensFileError> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |problem| TokensFileError {
                line: index + 1,
                problem,
            };
            let mut fields = line.split_whitespace();
            let (Some(name), Some(hash), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(at(LineProblem::Shape));
            };
            check_name(name).map_err(|bad| at(LineProblem::Name(bad)))?;
            let hex_digits = hash
                .strip_prefix(HASH_PREFIX)
                .ok_or_else(|| at(LineProblem::HashPrefix))?;
            if hex_digits.starts_with(PREFIX) {
                return Err(at(LineProblem::TokenNotHash));
            }
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(hex_digits, &mut sha256)
                .map_err(|_| at(LineProblem::HashDigits))?;
            if entries.iter().any(|e| e.name == name) {
                return Err(at(LineProblem::Duplicate(name.to_string())));
            }
            entries.push(TokenEntry {
                name: name.to_string(),
                sha256,
            });
        }
        Ok(Self { entries })
    }

    /// Reads and parses the file at `path`; errors name it.
    pub fn load(path: &Path) -> Result<Self, LoadTokensError> {
        let text = std::fs::read_to_string(path).map_err(|error| LoadTokensError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text).map_err(|error| LoadTokensError::Parse {
            path: path.to_path_buf(),
            error,
        })
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is accepted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the token `presented` is, if any; compares against every
    /// entry in constant time so timing tells nothing about which matched.
    pub fn verify(&self, presented: &str) -> Option<&str> {
        let computed = digest(presented);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(computed.ct_eq(&entry.sha256)) {
                found = Some(entry.name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_verifies_through_its_file_line_and_others_do_not() {
        let (secret, entry) = generate("ops").unwrap();
        assert!(secret.starts_with(PREFIX));
        assert_eq!(secret.len(), PREFIX.len() + RANDOM_LEN);
        let (_, other) = generate("ci").unwrap();
        let text = format!("# admin tokens\n\n{}\n{}\n", entry.line(), other.line());
        assert!(!text.contains(&secret));
        let set = TokenSet::parse(&text).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.verify(&secret), Some("ops"));
        assert_eq!(set.verify("imadm_wrong"), None);
        assert_eq!(set.verify(""), None);
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            ("ops", "line 1: expected"),
            ("ops sha256:abc", "64 hex digits"),
            ("ops md5:00", "must start with"),
            ("bad/name sha256:00", "token name"),
            ("ops sha256:imadm_abc", "not its hash"),
            ("ops extra fields here", "line 1: expected"),
        ];
        for (text, expected) in cases {
            let error = TokenSet::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let (_, entry) = generate("ops").unwrap();
        let twice = format!("{}\n{}\n", entry.line(), entry.line());
        assert!(
            TokenSet::parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
    }

    #[test]
    fn debug_output_never_shows_the_hash() {
        let (_, entry) = generate("ops").unwrap();
        let shown = format!("{entry:?}");
        assert!(!shown.contains(&hex::encode(entry.sha256)), "{shown}");
    }
}
