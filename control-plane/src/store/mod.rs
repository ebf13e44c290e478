//! etcd access: one key per object under a configurable prefix, values are
//! protobuf-encoded, and every write is a transaction guarded by what the
//! caller read. The control plane is the only writer of these keys.

pub mod endpoints;
mod keys;
pub mod objects;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::metrics::ControlPlaneMetrics;
pub use endpoints::lease_gone;
use etcd_client::{Client, Compare, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp};
pub use keys::{Keys, ObjectKind, identity_name, prefix_end};

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
    /// A lease could not be kept.
    #[error("etcd: {0}")]
    Lease(#[from] LeaseError),
    /// The TLS files for etcd are unusable.
    #[error("--etcd-ca/--etcd-cert: {0}")]
    Tls(#[source] infermesh_runtime::tls::TlsError),
    /// Other writers kept changing the keys a guarded write read.
    #[error("{0}: other writers kept changing it; try again")]
    Contended(String),
}

/// Why a lease could not be renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// etcd says the lease is gone.
    #[error("lease {lease} has expired")]
    Expired {
        /// The lease.
        lease: i64,
    },
    /// etcd did not answer the keep-alive in time.
    #[error("lease {lease}: no keep-alive answer within 5 s")]
    Unanswered {
        /// The lease.
        lease: i64,
    },
    /// The keep-alive stream ended before answering.
    #[error("lease {lease}: the keep-alive stream closed without an answer")]
    StreamClosed {
        /// The lease.
        lease: i64,
    },
}

/// A connection to etcd scoped to one key prefix.
#[derive(Clone)]
pub struct Store {
    /// The client new calls use; replaced when the TLS files change
    /// (`reconnect_on_change`).
    client: Arc<ArcSwap<Client>>,
    keys: Keys,
    metrics: Option<Arc<ControlPlaneMetrics>>,
}

/// The files of the control plane's TLS to etcd: the CA and, optionally,
/// a client certificate and key.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// CA that signed etcd's certificate.
    pub ca: PathBuf,
    /// Client certificate and key.
    pub pair: Option<(PathBuf, PathBuf)>,
}

impl EtcdTlsFiles {
    fn config(&self) -> Result<tonic::transport::ClientTlsConfig, StoreError> {
        let pair = self.pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        infermesh_runtime::tls::client_config(&self.ca, pair).map_err(StoreError::Tls)
    }

    async fn read(&self) -> Vec<Option<Vec<u8>>> {
        let mut paths = vec![self.ca.clone()];
        if let Some((cert, key)) = &self.pair {
            paths.extend([cert.clone(), key.clone()]);
        }
        let mut contents = Vec::with_capacity(paths.len());
        for path in paths {
            contents.push(tokio::fs::read(path).await.ok());
        }
        contents
    }
}

async fn connect_client(
    endpoints: &[String],
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    Client::connect(endpoints, Some(options)).await
}

impl Store {
    /// Connects to the etcd cluster at `endpoints`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&EtcdTlsFiles>,
    ) -> Result<Self, StoreError> {
        let tls = tls.map(EtcdTlsFiles::config).transpose()?;
        let client = connect_client(endpoints, tls).await?;
        Ok(Self {
            client: Arc::new(ArcSwap::from_pointee(client)),
            keys: Keys::new(prefix),
            metrics: None,
        })
    }

    /// Checks `files` every `every` until `cancel`; when they change and
    /// make a working configuration, new calls go through a new client
    /// presenting the renewed certificate (calls and watches under way
    /// finish on the old one).
    pub fn reconnect_on_change(
        &self,
        endpoints: Vec<String>,
        files: EtcdTlsFiles,
        every: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut seen = files.read().await;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = files.read().await;
                if now == seen || now.iter().any(Option::is_none) {
                    continue;
                }
                let config = match files.config() {
                    Ok(config) => config,
                    Err(error) => {
                        tracing::warn!(%error, "new etcd TLS files refused; keeping the current client");
                        seen = now;
                        continue;
                    }
                };
                match connect_client(&endpoints, Some(config)).await {
                    Ok(fresh) => {
                        client.store(Arc::new(fresh));
                        seen = now;
                        tracing::info!("etcd TLS files changed; new calls use a client with them");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not connect to etcd with the new TLS files; trying again")
                    }
                }
            }
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

    /// Runs the request `make` builds, timed under `op`, again on a fresh
    /// call when it failed to reach etcd (a member down: the client's next
    /// call may go to a live one); at most 4 tries over about 1.5 s.
    pub(crate) async fn call<T, Fut>(
        &self,
        op: &str,
        mut make: impl FnMut(Client) -> Fut,
    ) -> Result<T, etcd_client::Error>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            tries += 1;
            match self.timed(op, make(self.client())).await {
                Err(error) if tries < 4 && unreachable(&error) => {
                    tracing::debug!(op, %error, "etcd call failed to reach a member; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                result => return result,
            }
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
        Client::clone(&self.client.load())
    }

    /// One key's current value, if any.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        let mut resp = self
            .call("get", |mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Every key under `prefix`, with the store revision the read saw.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let prefix = prefix.to_string();
        let mut resp = self
            .call("range", |mut client| {
                let prefix = prefix.clone();
                async move {
                    client
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs(), revision))
    }

    /// The newest modification revision of any key under `prefix` (0 when
    /// there is none): what a watch of the prefix must have delivered by
    /// now. Reads one key name, not the values.
    pub async fn latest_under(&self, prefix: &str) -> Result<i64, StoreError> {
        let mut client = self.client();
        let options = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(1)
            .with_sort(
                etcd_client::SortTarget::Mod,
                etcd_client::SortOrder::Descend,
            );
        let resp = client.get(prefix, Some(options)).await?;
        Ok(resp.kvs().first().map_or(0, KeyValue::mod_revision))
    }

    /// Runs `ops` if every compare holds; `Some(revision)` when it did.
    pub async fn guarded(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>, StoreError> {
        // A transaction is guarded by revisions, so sending it again after a
        // failure to reach etcd cannot apply it twice.
        let resp = self
            .call("txn", |mut client| {
                let txn = Txn::new().when(compares.clone()).and_then(ops.clone());
                async move { client.txn(txn).await }
            })
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

/// Whether `error` means the call did not reach a working etcd member.
fn unreachable(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// Decodes a stored protobuf value, naming the key on failure.
pub fn decode<T: prost::Message + Default>(kv: &KeyValue) -> Result<T, StoreError> {
    T::decode(kv.value()).map_err(|source| StoreError::Decode {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        source,
    })
}
