//! etcd access: one key per object under a configurable prefix, values are
//! protobuf-encoded, and every write is a transaction guarded by what the
//! caller read. The control plane is the only writer of these keys.

pub mod endpoints;
mod keys;
pub mod objects;

use std::time::Duration;

use etcd_client::{Client, Compare, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp};
pub use keys::{Keys, ObjectKind, prefix_end};

/// Errors talking to etcd or decoding what it holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A stored value is not the protobuf it should be.
    #[error("stored value at {key} does not decode: {source}")]
    Decode {
        /// The key read.
        key: String,
        /// What prost said.
        source: prost::DecodeError,
    },
}

/// A connection to etcd scoped to one key prefix.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
}

impl Store {
    /// Connects to the etcd cluster at `endpoints`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self {
            client,
            keys: Keys::new(prefix),
        })
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle to the underlying client (cheap clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// One key's current value, if any.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut resp = self.client().get(key, None).await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Every key under `prefix`, with the store revision the read saw.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut resp = self
            .client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs(), revision))
    }

    /// Runs `ops` if every compare holds; `Some(revision)` when it did.
    pub async fn guarded(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>, StoreError> {
        let resp = self
            .client()
            .txn(Txn::new().when(compares).and_then(ops))
            .await?;
        if resp.succeeded() {
            Ok(Some(resp.header().map_or(0, |h| h.revision())))
        } else {
            Ok(None)
        }
    }
}

/// Decodes a stored protobuf value, naming the key on failure.
pub fn decode<T: prost::Message + Default>(kv: &KeyValue) -> Result<T, StoreError> {
    T::decode(kv.value()).map_err(|source| StoreError::Decode {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        source,
    })
}
