//! LoRA adapters as vLLM serves them with runtime updating on
//! (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`):
//! `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, adapters
//! served under their own name in `model`, and listed by `/v1/models` with
//! their base model as `parent`. Loading takes `--lora-load-ms`; only
//! `--max-loras` adapters sit in the GPU's slots at once, and a request for
//! one that does not pays `--lora-switch-ms` before its first token (the
//! least recently used one leaves its slot).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::Config;

/// A refusal of the adapter API: status and vLLM's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraError {
    /// HTTP status.
    pub status: u16,
    /// What vLLM says.
    pub message: String,
}

/// The engine's adapters.
#[derive(Debug, Default)]
pub struct Loras {
    /// Loaded adapters: name → the path it was loaded from.
    loaded: Mutex<HashMap<String, String>>,
    /// Adapters in GPU slots, least recently used first.
    slots: Mutex<VecDeque<String>>,
    /// Loads that succeeded.
    pub loads: AtomicU64,
    /// Loads that failed.
    pub load_failures: AtomicU64,
    /// Adapters moved into a GPU slot for a request.
    pub switches: AtomicU64,
}

fn refused(status: u16, message: String) -> LoraError {
    LoraError { status, message }
}

/// `lora_name` of a load or unload body.
fn lora_name(body: &[u8]) -> Result<(String, Value), LoraError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| refused(400, format!("invalid JSON body: {e}")))?;
    let name = value
        .get("lora_name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| refused(400, "lora_name is required".into()))?
        .to_string();
    Ok((name, value))
}

impl Loras {
    /// Loads an adapter (`{"lora_name", "lora_path"}`); the text vLLM answers.
    pub async fn load(&self, config: &Config, body: &[u8]) -> Result<String, LoraError> {
        let (name, value) = lora_name(body)?;
        let path = value
            .get("lora_path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| refused(400, "lora_path is required".into()))?
            .to_string();
        if self.lock_loaded().contains_key(&name) {
            return Err(refused(
                400,
                format!("The lora adapter '{name}' has already been loaded."),
            ));
        }
        tokio::time::sleep(Duration::from_millis(config.lora_load_ms)).await;
        if config.fail_lora_loads || path.contains("missing") {
            self.load_failures.fetch_add(1, Ordering::Relaxed);
            return Err(refused(
                400,
                format!("Loading lora {name} failed: No adapter found for {path}"),
            ));
        }
        self.lock_loaded().insert(name.clone(), path);
        self.loads.fetch_add(1, Ordering::Relaxed);
        Ok(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    }

    /// Unloads an adapter (`{"lora_name"}`); the text vLLM answers.
    pub fn unload(&self, body: &[u8]) -> Result<String, LoraError> {
        let (name, _) = lora_name(body)?;
        if self.lock_loaded().remove(&name).is_none() {
            return Err(refused(
                404,
                format!("The lora adapter '{name}' cannot be found."),
            ));
        }
        self.lock_slots().retain(|n| *n != name);
        Ok(format!(
            "Success: LoRA adapter '{name}' removed successfully."
        ))
    }

    /// Whether `name` is a loaded adapter.
    pub fn is_loaded(&self, name: &str) -> bool {
        self.lock_loaded().contains_key(name)
    }

    /// Puts adapter `name` in a GPU slot for a request; what that costs.
    pub fn use_adapter(&self, config: &Config, name: &str) -> Duration {
        let mut slots = self.lock_slots();
        if let Some(at) = slots.iter().position(|n| n == name) {
            let held = slots.remove(at).unwrap_or_default();
            slots.push_back(held);
            return Duration::ZERO;
        }
        while slots.len() >= config.max_loras.max(1) {
            slots.pop_front();
        }
        slots.push_back(name.to_string());
        self.switches.fetch_add(1, Ordering::Relaxed);
        Duration::from_millis(config.lora_switch_ms)
    }

    /// `/v1/models` entries of the loaded adapters.
    pub fn models(&self, base: &str, created: u64) -> Vec<Value> {
        let mut loaded: Vec<(String, String)> = self
            .lock_loaded()
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        loaded.sort();
        loaded
            .into_iter()
            .map(|(name, path)| {
                json!({"id": name, "object": "model", "created": created, "owned_by": "vllm",
                    "root": path, "parent": base})
            })
            .collect()
    }

    /// Names of the adapters in GPU slots.
    pub fn in_slots(&self) -> Vec<String> {
        self.lock_slots().iter().cloned().collect()
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["sim", "--enable-lora", "--lora-load-ms", "0"];
        all.extend_from_slice(args);
        Config::parse_from(all)
    }

    #[tokio::test]
    async fn loads_unloads_and_refuses_as_vllm_does() {
        let config = config(&[]);
        let loras = Loras::default();
        let body = br#"{"lora_name": "bot", "lora_path": "/adapters/bot"}"#;
        assert!(loras.load(&config, body).await.unwrap().contains("added"));
        assert!(loras.is_loaded("bot"));
        let again = loras.load(&config, body).await.unwrap_err();
        assert_eq!(again.status, 400);
        assert!(again.message.contains("already been loaded"));
        let missing = br#"{"lora_name": "x", "lora_path": "/adapters/missing"}"#;
        assert_eq!(loras.load(&config, missing).await.unwrap_err().status, 400);
        assert_eq!(loras.models("base", 1)[0]["parent"], "base");
        assert!(loras.unload(br#"{"lora_name": "bot"}"#).is_ok());
        assert_eq!(
            loras.unload(br#"{"lora_name": "bot"}"#).unwrap_err().status,
            404
        );
        assert_eq!(loras.loads.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_request_for_an_adapter_out_of_the_slots_pays_the_switch() {
        let config = config(&["--max-loras", "2", "--lora-switch-ms", "30"]);
        let loras = Loras::default();
        assert_eq!(loras.use_adapter(&config, "a"), Duration::from_millis(30));
        assert_eq!(loras.use_adapter(&config, "b"), Duration::from_millis(30));
        assert_eq!(loras.use_adapter(&config, "a"), Duration::ZERO);
        // c takes b's slot (least recently used), so b pays again.
        assert_eq!(loras.use_adapter(&config, "c"), Duration::from_millis(30));
        assert_eq!(loras.in_slots(), ["a", "c"]);
        assert_eq!(loras.use_adapter(&config, "b"), Duration::from_millis(30));
        assert_eq!(loras.switches.load(Ordering::Relaxed), 4);
    }
}
