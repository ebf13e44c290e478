//! The serving certificate, swapped in place when its files change: a
//! `ResolvesServerCert` that hands every handshake the current pair from an
//! `ArcSwap`, and the watcher task that polls the files and swaps in a new
//! pair only when both parse and the key matches. A bad pair never replaces
//! a good one; the process keeps serving what it had.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::tls::pem::{self, TlsError};

const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The bytes a pair was last read as; any change triggers a reload attempt.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Serves the certificate currently on disk at a fixed cert/key path pair.
pub struct ReloadingCertResolver {
    current: ArcSwap<CertifiedKey>,
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Seen,
    reloads: AtomicU64,
    rejections: AtomicU64,
}

impl std::fmt::Debug for ReloadingCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCertResolver")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("reloads", &self.reloads())
            .field("rejections", &self.rejections())
            .finish_non_exhaustive()
    }
}

impl ReloadingCertResolver {
    /// Loads the pair at `cert` and `key`, failing if either is unusable or they do not match.
    pub fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let loaded = Seen {
            cert: pem::read(cert)?,
            key: pem::read(key)?,
        };
        let certified =
            pem::certified_key_from_pem((cert, &loaded.cert), (key, &loaded.key), &provider)?;
        Ok(Self {
            current: ArcSwap::from_pointee(certified),
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            provider,
            loaded,
            reloads: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
        })
    }

    /// The pair handed to new handshakes now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// How many times a new pair has been swapped in.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// How many changed pairs were refused (unreadable, unparsable or mismatched).
    pub fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }

    /// Spawns the task that polls the files every `every` (at least 10ms) until
    /// `cancel` fires or the watcher is dropped.
    pub fn watch(self: &Arc<Self>, every: Duration, cancel: CancellationToken) -> CertWatcher {
        // A zero period would make `interval` panic; a tiny one would spin on the disk.
        let every = every.max(MIN_POLL_INTERVAL);
        let cancel = cancel.child_token();
        let resolver = Arc::clone(self);
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = resolver.loaded.clone();
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {}
                }
                resolver.poll(&mut seen, &mut failing).await;
            }
        });
        CertWatcher {
            cancel,
            task: Some(task),
        }
    }

    /// Reads the files once and swaps in the pair if it changed and is valid.
    async fn poll(&self, seen: &mut Seen, failing: &mut bool) {
        let read = async |path: &Path| {
            tokio::fs::read(path)
                .await
                .map_err(|source| TlsError::Read {
                    path: path.to_owned(),
                    source,
                })
        };
        let now = match (read(&self.cert_path).await, read(&self.key_path).await) {
            (Ok(cert), Ok(key)) => Seen { cert, key },
            (Err(error), _) | (_, Err(error)) => {
                // Warn once per outage, not on every poll while a file is missing.
                if !*failing {
                    *failing = true;
                    self.rejections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "cannot read the serving certificate; keeping the current one");
                }
                return;
            }
        };
        *failing = false;
        if now == *seen {
            return;
        }
        let parsed = pem::certified_key_from_pem(
            (&self.cert_path, &now.cert),
            (&self.key_path, &now.key),
            &self.provider,
        );
        *seen = now;
        match parsed {
            Ok(certified) => {
                self.current.store(Arc::new(certified));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
            }
            Err(error) => {
                self.rejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "new serving certificate refused; keeping the current one");
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Owns the file-polling task; it stops when this is dropped, stopped, or its token fires.
#[derive(Debug)]
#[must_use = "the certificate stops reloading when its watcher is dropped"]
pub struct CertWatcher {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl CertWatcher {
    /// Stops polling and waits for the task to finish.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(%error, "certificate watcher ended abnormally");
        }
    }
}

impl Drop for CertWatcher {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::LocalCa;

    #[tokio::test(start_paused = true)]
    async fn a_mismatched_pair_is_refused_and_the_old_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("s.pem"), dir.path().join("s-key.pem"));
        let ca = LocalCa::generate().unwrap();
        ca.issue_server(&["localhost"], &[])
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        let resolver = Arc::new(ReloadingCertResolver::load(&cert, &key, pem::provider()).unwrap());
        let before = resolver.current();

        let other = ca.issue_server(&["other"], &[]).unwrap();
        std::fs::write(&cert, &other.cert_pem).unwrap();
        let mut seen = resolver.loaded.clone();
        let mut failing = false;
        resolver.poll(&mut seen, &mut failing).await;
        assert_eq!(resolver.rejections(), 1);
        assert_eq!(resolver.current().cert, before.cert);

        std::fs::write(&key, &other.key_pem).unwrap();
        resolver.poll(&mut seen, &mut failing).await;
        assert_eq!(resolver.reloads(), 1);
        assert_ne!(resolver.current().cert, before.cert);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("s.pem"), dir.path().join("s-key.pem"));
        let ca = LocalCa::generate().unwrap();
        ca.issue_server(&["localhost"], &[])
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        let resolver = Arc::new(ReloadingCertResolver::load(&cert, &key, pem::provider()).unwrap());
        let watcher = resolver.watch(Duration::from_secs(2), CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(5), watcher.stop())
            .await
            .expect("watcher stops");
    }
}
