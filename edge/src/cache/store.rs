//! Where cached responses live: in this edge's memory (bounded by bytes,
//! per-entry TTL, moka's eviction) or in Redis shared by a region's edges.
//! Every call has a deadline and reports failure as an error for the
//! caller to count; the request path never fails because of the cache.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use moka::Expiry;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use infermesh_runtime::backoff::Backoff;

/// Why a cache store could not be set up or a call to it failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheStoreError {
    /// The Redis URL is unusable.
    #[error("redis URL {url:?}: {source}")]
    Url {
        /// The URL, its password hidden.
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// The first connection to Redis has not been made yet.
    #[error("not connected to Redis")]
    NotConnected,
    /// A call took longer than the store's timeout.
    #[error("{op} took over {after:?}")]
    Timeout {
        /// The command (`GET`, `SET`).
        op: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// Redis answered with an error or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// A store of cached response bodies by key.
pub trait CacheStore: Send + Sync + 'static {
    /// The backend's name, for metrics (`memory`, `redis`).
    fn backend(&self) -> &'static str;
    /// The value under `key`, if present and fresh.
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Bytes>, CacheStoreError>>;
    /// Stores `value` under `key` for `ttl`.
    fn put(
        &self,
        key: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), CacheStoreError>>;
}

#[derive(Clone)]
struct Stored {
    value: Bytes,
    ttl: Duration,
}

struct PerEntryTtl;

// moka's expiry callbacks are given std's clock; nothing here reads it.
#[allow(clippy::disallowed_types)]
impl Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Stored,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Stored,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The in-memory store: at most `capacity_bytes` of keys and values.
pub struct MemoryStore {
    cache: moka::future::Cache<String, Stored>,
}

impl MemoryStore {
    /// A store holding at most `capacity_bytes`.
    pub fn new(capacity_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|key: &String, value: &Stored| {
                u32::try_from(key.len() + value.value.len()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self { cache }
    }
}

impl CacheStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Bytes>, CacheStoreError>> {
        Box::pin(async move { Ok(self.cache.get(&key).await.map(|s| s.value)) })
    }

    fn put(
        &self,
        key: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), CacheStoreError>> {
        Box::pin(async move {
            self.cache.insert(key, Stored { value, ttl }).await;
            Ok(())
        })
    }
}

/// The Redis store. Connects in the background and keeps reconnecting, so
/// an edge starts (and serves from its engines) while Redis is down.
pub struct RedisStore {
    connection: Arc<ArcSwapOption<redis::aio::ConnectionManager>>,
    timeout: Duration,
    prefix: String,
}

/// `url` with any password in its user info replaced by `***`, for
/// messages: a Redis URL may carry the server's password.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info
                .split_once(':')
                .map_or(user_info, |(user, _)| user);
            let shown = if user_info.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_string()
            };
            format!("{scheme}://{shown}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

impl RedisStore {
    /// A store at `url` whose calls give up after `timeout`; stops retrying
    /// the first connection when `cancel` fires.
    pub fn connect(
        url: &str,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<Self, CacheStoreError> {
        let client = redis::Client::open(url).map_err(|source| CacheStoreError::Url {
            url: redacted_url(url),
            source,
        })?;
        let connection = Arc::new(ArcSwapOption::empty());
        let slot = connection.clone();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(timeout))
            .set_max_delay(Duration::from_secs(2));
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                match redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                {
                    Ok(manager) => {
                        tracing::info!("response cache connected to Redis");
                        slot.store(Some(Arc::new(manager)));
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "response cache: Redis not reachable yet"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        });
        Ok(Self {
            connection,
            timeout,
            prefix: "infermesh:cache:v1:".into(),
        })
    }

    fn manager(&self) -> Result<redis::aio::ConnectionManager, CacheStoreError> {
        self.connection
            .load_full()
            .map(|m| (*m).clone())
            .ok_or(CacheStoreError::NotConnected)
    }
}

impl CacheStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Bytes>, CacheStoreError>> {
        Box::pin(async move {
            let mut manager = self.manager()?;
            let key = format!("{}{key}", self.prefix);
            let read = manager.get::<_, Option<Vec<u8>>>(key);
            match tokio::time::timeout(self.timeout, read).await {
                Err(_) => Err(CacheStoreError::Timeout {
                    op: "GET",
                    after: self.timeout,
                }),
                Ok(Err(error)) => Err(error.into()),
                Ok(Ok(value)) => Ok(value.map(Bytes::from)),
            }
        })
    }

    fn put(
        &self,
        key: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), CacheStoreError>> {
        Box::pin(async move {
            let mut manager = self.manager()?;
            let key = format!("{}{key}", self.prefix);
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let write = manager.pset_ex::<_, _, ()>(key, value.as_ref(), millis);
            match tokio::time::timeout(self.timeout, write).await {
                Err(_) => Err(CacheStoreError::Timeout {
                    op: "SET",
                    after: self.timeout,
                }),
                Ok(Err(error)) => Err(error.into()),
                Ok(Ok(())) => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_in_redis_urls_are_never_shown() {
        for (url, shown) in [
            ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
            (
                "rediss://user:s3cret@cache:6380",
                "rediss://user:***@cache:6380",
            ),
            ("redis://s3cret@cache:6379", "redis://***@cache:6379"),
            ("redis://cache:6379/1", "redis://cache:6379/1"),
            ("redis://:p@ss@word@cache:6379", "redis://:***@cache:6379"),
        ] {
            assert_eq!(redacted_url(url), shown);
            assert!(!redacted_url(url).contains("s3cret"));
        }
        let Err(error) = RedisStore::connect(
            "redis://:s3cret@cache:notaport",
            Duration::from_millis(100),
            CancellationToken::new(),
        ) else {
            panic!("a URL with a bad port is refused");
        };
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    use super::*;

    #[tokio::test]
    async fn memory_entries_expire_by_their_own_ttl() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(
                "short".into(),
                Bytes::from_static(b"a"),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
        store
            .put(
                "long".into(),
                Bytes::from_static(b"b"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            store.get("short".into()).await.unwrap().as_deref(),
            Some(&b"a"[..])
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.get("short".into()).await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the short entry never expired"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(
            store.get("long".into()).await.unwrap().as_deref(),
            Some(&b"b"[..])
        );
    }

    #[tokio::test]
    async fn redis_that_is_not_there_is_an_error_not_a_hang() {
        let cancel = CancellationToken::new();
        let store = RedisStore::connect(
            "redis://127.0.0.1:1/",
            Duration::from_millis(50),
            cancel.clone(),
        )
        .unwrap();
        let error = store.get("k".into()).await.unwrap_err().to_string();
        assert!(error.contains("not connected"), "{error}");
        cancel.cancel();
    }
}
