//! LoRA adapters in this replica's engine. The sidecar alone loads and
//! unloads them, through the engine's runtime API (vLLM's
//! `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, SGLang's
//! `/load_lora_adapter` and `/unload_lora_adapter`), and only adapters the
//! registry puts on this replica's model (its sidecar table), from the
//! source the registry names: a caller gives a name, never a path.
//!
//! A request the edge tags with `x-infermesh-adapter` has its adapter
//! loaded first when it is not resident (loads are one at a time, so
//! concurrent first requests cause one load). At most `--max-adapters` are
//! resident: loading one more unloads the least recently used adapter
//! that no request is using, and when every one is in use the load is
//! refused. Every answer carries the resident set, `x-infermesh-adapters:
//! name@version …`, and load reports carry it with last use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use http::{Method, Request, Uri};
use http_body_util::BodyExt;
use infermesh_proto::v1::{Adapter, ResidentAdapter};
use infermesh_runtime::http::{UpstreamClient, full};
use infermesh_runtime::time::now_unix_ms;
use serde_json::json;

use crate::engine::EngineKind;

/// Request header naming the adapter a request uses (set by the edge).
pub const ADAPTER_HEADER: &str = "x-infermesh-adapter";
/// Set on a refusal when the adapter could not be made resident (`load`:
/// the engine failed the load; `busy`: every slot in use).
pub const FAILED_HEADER: &str = "x-infermesh-adapter-failed";
/// Response header listing the resident adapters, `name@version` apart by spaces.
pub const RESIDENT_HEADER: &str = "x-infermesh-adapters";

/// Why an adapter could not be made resident.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterError {
    /// The registry puts no adapter of that name on this replica's model.
    #[error("adapter {0:?} is not registered for this replica's model")]
    Unknown(String),
    /// Every resident adapter is in use and none may be unloaded.
    #[error("all {0} adapter slots of this replica are in use")]
    Busy(usize),
    /// The engine refused or failed the load.
    #[error("the engine could not load adapter {name:?}: {reason}")]
    Load {
        /// The adapter.
        name: String,
        /// What the engine said.
        reason: String,
    },
}

#[derive(Debug)]
struct Resident {
    version: String,
    last_used_ms: i64,
    in_flight: Arc<AtomicU32>,
}

/// See the module docs.
pub struct Adapters {
    client: UpstreamClient,
    engine: String,
    kind: EngineKind,
    max: usize,
    known: RwLock<HashMap<String, Adapter>>,
    resident: Mutex<HashMap<String, Resident>>,
    loading: tokio::sync::Mutex<()>,
}

/// Counts one request using an adapter while it lives.
#[derive(Debug)]
pub struct InUse(Arc<AtomicU32>);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Adapters {
    /// Adapters of the engine at `engine` (scheme and authority), at most
    /// `max` resident.
    pub fn new(client: UpstreamClient, engine: &Uri, kind: EngineKind, max: usize) -> Self {
        Self {
            client,
            engine: engine.to_string().trim_end_matches('/').to_string(),
            kind,
            max: max.max(1),
            known: RwLock::default(),
            resident: Mutex::default(),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// The registry's adapters for this replica's model.
    pub fn set_known(&self, adapters: &[Adapter]) {
        let known = adapters
            .iter()
            .map(|a| (a.name.clone(), a.clone()))
            .collect();
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = known;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Resident>> {
        self.resident.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `name` used by one request, when resident at `version`.
    fn claim(&self, name: &str, version: &str) -> Option<InUse> {
        let mut resident = self.lock();
        let held = resident.get_mut(name).filter(|r| r.version == version)?;
        held.last_used_ms = now_unix_ms();
        held.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InUse(held.in_flight.clone()))
    }

    /// Makes adapter `name` resident at its registered version (loading it,
    /// after unloading an older version or the least recently used idle
    /// adapter where needed) and counts one request using it.
    pub async fn acquire(&self, name: &str) -> Result<InUse, AdapterError> {
        let adapter = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| AdapterError::Unknown(name.to_string()))?;
        if let Some(in_use) = self.claim(name, &adapter.version) {
            return Ok(in_use);
        }
        let _one_at_a_time = self.loading.lock().await;
        if let Some(in_use) = self.claim(name, &adapter.version) {
            return Ok(in_use);
        }
        let stale = self.lock().contains_key(name);
        if stale {
            self.unload(name).await;
        }
        while self.lock().len() >= self.max {
            let idle = self
                .lock()
                .iter()
                .filter(|(_, r)| r.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, r)| r.last_used_ms)
                .map(|(n, _)| n.clone());
            match idle {
                Some(victim) => self.unload(&victim).await,
                None => return Err(AdapterError::Busy(self.max)),
            }
        }
        self.load(&adapter).await?;
        self.lock().insert(
            name.to_string(),
            Resident {
                version: adapter.version.clone(),
                last_used_ms: now_unix_ms(),
                in_flight: Arc::default(),
            },
        );
        self.claim(name, &adapter.version)
            .ok_or_else(|| AdapterError::Load {
                name: name.to_string(),
                reason: "unloaded while loading".into(),
            })
    }

    fn path(&self, verb: &str) -> String {
        match self.kind {
            EngineKind::Vllm => format!("{}/v1/{verb}_lora_adapter", self.engine),
            EngineKind::Sglang => format!("{}/{verb}_lora_adapter", self.engine),
        }
    }

    async fn call(&self, verb: &str, body: serde_json::Value) -> Result<(u16, String), String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.path(verb))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(full(body.to_string()))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("engine unreachable: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("engine answer cut: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        Ok((status, text))
    }

    async fn load(&self, adapter: &Adapter) -> Result<(), AdapterError> {
        let failed = |reason: String| AdapterError::Load {
            name: adapter.name.clone(),
            reason,
        };
        let (status, text) = self
            .call(
                "load",
                json!({"lora_name": adapter.name, "lora_path": adapter.source}),
            )
            .await
            .map_err(failed)?;
        match status {
            200..=299 => {
                tracing::info!(adapter = %adapter.name, version = %adapter.version, "adapter loaded");
                Ok(())
            }
            // Loaded before this sidecar started (or restarted).
            400 if text.contains("already been loaded") => Ok(()),
            _ => {
                tracing::warn!(adapter = %adapter.name, status, answer = %text, "adapter load failed");
                Err(failed(format!("{status}: {}", text.trim())))
            }
        }
    }

    async fn unload(&self, name: &str) {
        match self.call("unload", json!({"lora_name": name})).await {
            Ok((200..=299 | 404, _)) => tracing::info!(adapter = %name, "adapter unloaded"),
            Ok((status, text)) => {
                tracing::warn!(adapter = %name, status, answer = %text, "adapter unload refused")
            }
            Err(error) => tracing::warn!(adapter = %name, %error, "adapter unload failed"),
        }
        self.lock().remove(name);
    }

    /// The resident adapters, by name, for load reports.
    pub fn resident(&self) -> Vec<ResidentAdapter> {
        let mut resident: Vec<ResidentAdapter> = self
            .lock()
            .iter()
            .map(|(name, r)| ResidentAdapter {
                name: name.clone(),
                version: r.version.clone(),
                last_used_unix_ms: r.last_used_ms,
                in_flight: r.in_flight.load(Ordering::Acquire),
            })
            .collect();
        resident.sort_by(|a, b| a.name.cmp(&b.name));
        resident
    }

    /// `name@version` of each resident adapter, apart by spaces.
    pub fn stamp(&self) -> String {
        self.resident()
            .iter()
            .map(|r| format!("{}@{}", r.name, r.version))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
