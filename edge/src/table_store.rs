//! The last routing table on disk, so an edge keeps serving when every
//! control plane is unreachable, across its own restarts too (static
//! stability). Written atomically (a temporary file renamed over the old
//! one, owner-only: it holds API-key hashes) after every table the edge
//! accepts; read once at start, before the first push.

use std::path::PathBuf;

use infermesh_proto::v1::RoutingTable;
use prost::Message;

/// Why the stored table could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum TableStoreError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not hold a routing table.
    #[error("{}: not a routing table: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What prost said.
        source: prost::DecodeError,
    },
}

/// Where the table is kept.
#[derive(Debug, Clone)]
pub struct TableStore {
    path: PathBuf,
}

impl TableStore {
    /// A store at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The stored table, if there is one; an unreadable or corrupt file is an error.
    pub fn load(&self) -> Result<Option<RoutingTable>, TableStoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => RoutingTable::decode(bytes.as_slice())
                .map(Some)
                .map_err(|source| TableStoreError::Corrupt {
                    path: self.path.clone(),
                    source,
                }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TableStoreError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Replaces the stored table with `table`.
    pub fn save(&self, table: &RoutingTable) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        infermesh_runtime::fs::write_private(&self.path, &table.encode_to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_table_loads_back_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = TableStore::new(dir.path().join("edge/table.pb"));
        assert_eq!(store.load().unwrap(), None);
        let table = RoutingTable {
            version: 42,
            region: "eu".into(),
            ..Default::default()
        };
        store.save(&table).unwrap();
        assert_eq!(store.load().unwrap(), Some(table));
        std::fs::write(dir.path().join("edge/table.pb"), b"\xff\xff\xff").unwrap();
        assert!(
            store
                .load()
                .unwrap_err()
                .to_string()
                .contains("not a routing table")
        );
    }
}
