//! Writing certificates and keys to disk: each file is written to a
//! temporary sibling and renamed into place, so a process polling the path
//! (the certificate reloader) sees the old file or the new one, never half
//! of one. Private keys are created readable by their owner only.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Io { path, source }
    };
    let tmp = temporary_sibling(path);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = options.open(&tmp).and_then(|mut file| {
        // `mode` applies only on creation; a stale temporary file keeps its bits otherwise.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(source));
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(source)
    })
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_owner_only_and_replace_the_old_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("server-key.pem");
        write_private(&key, b"old").unwrap();
        write_private(&key, b"new").unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temporary file left behind");
    }
}
