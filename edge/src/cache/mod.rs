//! The response cache: exact-match answers for deterministic requests,
//! keyed per tenant, model, engine fingerprint and canonical request
//! (`key`), kept in memory or in Redis (`store`), served as JSON or
//! replayed as a stream (`replay`), recorded as they stream by (`tap`).
//! Concurrent identical misses are collapsed: one goes to the engine, the
//! others wait for its answer up to a deadline. Cache trouble is counted,
//! never returned: the request is then served by the engine.

pub mod key;
pub mod replay;
pub mod store;
pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::HeaderMap;
use infermesh_proto::v1::CachePolicy;
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;

use crate::request::Parsed;
use store::CacheStore;

/// Header that reports the outcome, and that a client sets to `force` to
/// cache a request that is not deterministic by its parameters.
pub const CACHE_HEADER: &str = "x-infermesh-cache";

/// Edge-wide cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// TTL when the model's policy sets none.
    pub default_ttl: Duration,
    /// Largest entry when the model's policy sets none.
    pub max_entry_bytes: usize,
    /// How long a request waits for an identical one already at the engine.
    pub flight_wait: Duration,
}

/// What the cache does with one request.
#[derive(Debug)]
pub enum Decision {
    /// The model does not cache.
    Off,
    /// Not cacheable (sampling, or the client said no).
    Bypass,
    /// Look up (unless `lookup` is false) and store (unless `store` is false).
    Use(Lookup),
}

/// How one request uses the cache.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Candidate keys, one per engine fingerprint serving the model.
    pub keys: Vec<(String, String)>,
    /// Whether to look the answer up (`Cache-Control: no-cache` says no).
    pub lookup: bool,
    /// Whether to store the engine's answer (`no-store` says no).
    pub store: bool,
    /// Entry lifetime.
    pub ttl: Duration,
    /// Largest body stored.
    pub max_bytes: usize,
}

impl Lookup {
    /// The key under which an answer from a replica with `fingerprint` is stored.
    pub fn key_for(&self, fingerprint: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(f, _)| f == fingerprint)
            .map(|(_, k)| k.as_str())
    }
}

/// One request's part in a collapsed miss.
pub enum Joined {
    /// This request goes to the engine; the flight tells the others.
    Leader(Flight),
    /// Another request is at the engine; wait on this.
    Follower(watch::Receiver<Option<Option<Bytes>>>),
}

/// The engine request of a collapsed miss; waiters learn its answer (or
/// that there is none) when it resolves or is dropped.
pub struct Flight {
    key: String,
    cache: Arc<ResponseCache>,
    tx: Option<watch::Sender<Option<Option<Bytes>>>>,
}

impl Flight {
    /// Tells the waiters: `Some(answer)`, or `None` (go to the engine yourselves).
    pub fn resolve(mut self, answer: Option<Bytes>) {
        if let Some(tx) = self.tx.take() {
            self.cache.flights.remove(&self.key);
            tx.send_replace(Some(answer));
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.cache.flights.remove(&self.key);
            tx.send_replace(Some(None));
        }
    }
}

/// See the module docs.
pub struct ResponseCache {
    store: Arc<dyn CacheStore>,
    config: CacheConfig,
    flights: DashMap<String, watch::Receiver<Option<Option<Bytes>>>>,
    errors: IntCounterVec,
}

impl ResponseCache {
    /// A cache over `store`; its error counter is registered with `registry`.
    pub fn new(
        store: Arc<dyn CacheStore>,
        config: CacheConfig,
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        let errors = IntCounterVec::new(
            Opts::new(
                "infermesh_edge_cache_errors_total",
                "Cache backend calls that failed or timed out (the request was served by the engine), by backend and operation.",
            ),
            &["backend", "op"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Arc::new(Self {
            store,
            config,
            flights: DashMap::new(),
            errors,
        }))
    }

    /// How the request uses the cache, given the model's `policy`, the
    /// caller's `tenant` and the `fingerprints` of the model's replicas.
    pub fn decide<'a>(
        &self,
        headers: &HeaderMap,
        request: &Parsed<'_>,
        policy: Option<&CachePolicy>,
        tenant: &str,
        model: &str,
        fingerprints: impl Iterator<Item = &'a str>,
    ) -> Decision {
        let Some(policy) = policy.filter(|p| p.enabled) else {
            return Decision::Off;
        };
        let cache_control = headers
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect::<Vec<_>>();
        let no_cache = cache_control.iter().any(|d| d == "no-cache");
        let no_store = cache_control.iter().any(|d| d == "no-store");
        if no_cache && no_store {
            return Decision::Bypass;
        }
        let forced = headers
            .get(CACHE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("force"));
        if !request.endpoint.cacheable() {
            return Decision::Bypass;
        }
        let deterministic = policy.deterministic
            || forced
            || request.endpoint.deterministic()
            || request.temperature == Some(0.0);
        if !deterministic {
            return Decision::Bypass;
        }
        let Some(canonical) = request.cache_material(model) else {
            return Decision::Bypass;
        };
        let mut keys: Vec<(String, String)> = Vec::new();
        for fingerprint in fingerprints {
            if !keys.iter().any(|(f, _)| f == fingerprint) {
                let key = key::key(tenant, model, fingerprint, &canonical);
                keys.push((fingerprint.to_string(), key));
            }
        }
        let ttl = match policy.ttl_seconds {
            0 => self.config.default_ttl,
            seconds => Duration::from_secs(u64::from(seconds)),
        };
        let max_bytes = match policy.max_entry_bytes {
            0 => self.config.max_entry_bytes,
            bytes => bytes as usize,
        };
        Decision::Use(Lookup {
            keys,
            lookup: !no_cache,
            store: !no_store,
            ttl,
            max_bytes,
        })
    }

    /// The stored answer under any of `lookup`'s keys.
    pub async fn get(&self, lookup: &Lookup) -> Option<Bytes> {
        for (_, key) in &lookup.keys {
            match self.store.get(key.clone()).await {
                Ok(Some(answer)) => return Some(answer),
                Ok(None) => {}
                Err(error) => {
                    self.failed("get", &error);
                    return None;
                }
            }
        }
        None
    }

    /// Writes `answer` under `key`.
    pub async fn store(&self, key: String, answer: Bytes, ttl: Duration) {
        if let Err(error) = self.store.put(key, answer, ttl).await {
            self.failed("put", &error);
        }
    }

    fn failed(&self, op: &str, error: &store::CacheStoreError) {
        tracing::debug!(backend = self.store.backend(), op, %error, "cache call failed");
        self.errors
            .with_label_values(&[self.store.backend(), op])
            .inc();
    }

    /// Joins the miss on `key`: the first request leads, later ones follow.
    pub fn join(self: &Arc<Self>, key: &str) -> Joined {
        use dashmap::mapref::entry::Entry;
        match self.flights.entry(key.to_string()) {
            Entry::Occupied(entry) => Joined::Follower(entry.get().clone()),
            Entry::Vacant(entry) => {
                let (tx, rx) = watch::channel(None);
                entry.insert(rx);
                Joined::Leader(Flight {
                    key: key.to_string(),
                    cache: self.clone(),
                    tx: Some(tx),
                })
            }
        }
    }

    /// Waits for the leader of a collapsed miss, up to the flight deadline;
    /// `None` means go to the engine.
    pub async fn follow(&self, mut rx: watch::Receiver<Option<Option<Bytes>>>) -> Option<Bytes> {
        let waited = tokio::time::timeout(self.config.flight_wait, rx.wait_for(Option::is_some));
        match waited.await {
            Ok(Ok(state)) => state.clone().flatten(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Endpoint;

    fn cache() -> Arc<ResponseCache> {
        ResponseCache::new(
            Arc::new(store::MemoryStore::new(1 << 20)),
            CacheConfig {
                default_ttl: Duration::from_secs(60),
                max_entry_bytes: 1 << 20,
                flight_wait: Duration::from_secs(5),
            },
            &Registry::new(),
        )
        .unwrap()
    }

    fn decide(cache: &ResponseCache, headers: &HeaderMap, body: &str) -> Decision {
        let policy = CachePolicy {
            enabled: true,
            ..Default::default()
        };
        let body = Bytes::from(body.to_string());
        cache.decide(
            headers,
            &crate::request::parse(Endpoint::Completions, &body).unwrap(),
            Some(&policy),
            "acme",
            "llama",
            ["fp"].into_iter(),
        )
    }

    #[test]
    fn only_deterministic_requests_are_cached_unless_forced() {
        let cache = cache();
        let none = HeaderMap::new();
        assert!(matches!(
            decide(
                &cache,
                &none,
                r#"{"model":"llama","prompt":"p","temperature":0}"#
            ),
            Decision::Use(_)
        ));
        assert!(matches!(
            decide(
                &cache,
                &none,
                r#"{"model":"llama","prompt":"p","temperature":0.7}"#
            ),
            Decision::Bypass
        ));
        assert!(matches!(
            decide(&cache, &none, r#"{"model":"llama","prompt":"p"}"#),
            Decision::Bypass
        ));
        let mut forced = HeaderMap::new();
        forced.insert(CACHE_HEADER, "force".parse().unwrap());
        assert!(matches!(
            decide(&cache, &forced, r#"{"model":"llama","prompt":"p"}"#),
            Decision::Use(_)
        ));
        let body = Bytes::from_static(br#"{"model":"llama","prompt":"p"}"#);
        let off = cache.decide(
            &none,
            &crate::request::parse(Endpoint::Completions, &body).unwrap(),
            None,
            "t",
            "llama",
            [""].into_iter(),
        );
        assert!(matches!(off, Decision::Off));
    }

    #[test]
    fn cache_control_turns_lookup_and_store_off() {
        let cache = cache();
        let body = r#"{"model":"llama","prompt":"p","temperature":0}"#;
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CACHE_CONTROL, "no-cache".parse().unwrap());
        let Decision::Use(lookup) = decide(&cache, &headers, body) else {
            panic!()
        };
        assert!(!lookup.lookup && lookup.store);
        headers.insert(http::header::CACHE_CONTROL, "No-Store".parse().unwrap());
        let Decision::Use(lookup) = decide(&cache, &headers, body) else {
            panic!()
        };
        assert!(lookup.lookup && !lookup.store);
        headers.insert(
            http::header::CACHE_CONTROL,
            "no-cache, no-store".parse().unwrap(),
        );
        assert!(matches!(decide(&cache, &headers, body), Decision::Bypass));
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer_or_are_released_when_it_fails() {
        let cache = cache();
        let Joined::Leader(flight) = cache.join("k") else {
            panic!("first joins as leader")
        };
        let Joined::Follower(rx) = cache.join("k") else {
            panic!("second follows")
        };
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move { cache.follow(rx).await }
        });
        flight.resolve(Some(Bytes::from_static(b"answer")));
        assert_eq!(waiter.await.unwrap().as_deref(), Some(&b"answer"[..]));

        let Joined::Leader(flight) = cache.join("k") else {
            panic!("the key is free again")
        };
        let Joined::Follower(rx) = cache.join("k") else {
            panic!()
        };
        drop(flight);
        assert_eq!(cache.follow(rx).await, None);
    }
}
