//! etcd access: one key per object under a configurable prefix, values are
//! protobuf-encoded, and every write is a transaction guarded by what the
//! caller read. The control plane is the only writer of these keys.

pub mod endpoints;
mod keys;
pub mod objects;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::ControlPlaneMetrics;
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
    metrics: Option<Arc<ControlPlaneMetrics>>,
}

impl Store {
    /// Connects to the etcd cluster at `endpoints`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self {
            client,
            keys: Keys::new(prefix),
            metrics: None,
        })
    }

    /// Times requests and records committed writes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ControlPlaneMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs `request`, timed under `op` when metrics are kept.
    pub(crate) async fn timed<T>(&self, op: &str, request: impl Future<Output = T>) -> T {
        match &self.metrics {
            Some(metrics) => metrics.etcd(op, request).await,
            None => request.await,
        }
    }

    /// Notes a write committed at `revision`.
    pub(crate) fn committed(&self, revision: i64) {
        if let Some(metrics) = &self.metrics {
            metrics.write_committed(revision);
        }
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
        let mut resp = self
            .timed("get", self.client.clone().get(key, None))
            .await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Every key under `prefix`, with the store revision the read saw.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut client = self.client();
        let mut resp = self
            .timed(
                "range",
                client.get(prefix, Some(GetOptions::new().with_prefix())),
            )
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
        let mut client = self.client();
        let resp = self
            .timed("txn", client.txn(Txn::new().when(compares).and_then(ops)))
            .await?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            self.committed(revision);
            Ok(Some(revision))
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
