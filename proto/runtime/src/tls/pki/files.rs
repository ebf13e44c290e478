//! Writing certificates and keys to disk: each file is written to a
//! temporary sibling and renamed into place, so a process polling the path
//! (the certificate reloader) sees the old file or the new one, never half
//! of one. Private keys are created readable by their owner only.

use std::path::Path;

use super::PkiError;

/// Writes a private key, readable and writable by the owner only (0600).
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomically(path, bytes, 0o600)
}

/// Writes a certificate, readable by everyone (0644).
pub(super) fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomically(path, bytes, 0o644)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    crate::fs::write_atomically(path, bytes, mode).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}
