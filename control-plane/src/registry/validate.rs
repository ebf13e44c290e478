//! Shape checks of registry objects, independent of what else is stored.
//! Every refusal names the field path the operator sent, e.g.
//! `pool.max_replicas`. References to other objects are checked by the
//! registry against etcd, not here.

use std::collections::BTreeSet;

use infermesh_proto::v1::{DayOfWeek, EngineKind, Model, Pool, Region, RoutingPolicy};

use super::RegistryError;

const MAX_MODEL_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 1000;
/// Largest cached answer a model's policy may allow.
const MAX_CACHE_ENTRY_BYTES: u32 = 64 * 1024 * 1024;
const MAX_CACHE_TTL_SECONDS: u32 = 7 * 24 * 3600;

/// Checks a model name or alias as clients would send it.
pub fn model_name(field: &str, name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME {
        return Err(RegistryError::invalid(
            field,
            format!(
                "must be 1 to {MAX_MODEL_NAME} characters, got {}",
                name.len()
            ),
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(RegistryError::invalid(
            field,
            format!("{name:?} contains {c:?}; only printable ASCII without spaces is allowed"),
        ));
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Err(RegistryError::invalid(
            field,
            format!("{name:?} must not start or end with '/' or contain '//'"),
        ));
    }
    Ok(())
}

/// Checks a DNS-label name (pools, regions, zones): `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63.
pub fn dns_label(field: &str, name: &str) -> Result<(), RegistryError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty() || name.len() > 63 || !ok_chars || !ok_ends {
        return Err(RegistryError::invalid(
            field,
            format!(
                "{name:?} must be 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Checks a replica id (a pod name): a DNS subdomain of at most 253 characters.
pub fn endpoint_id(field: &str, id: &str) -> Result<(), RegistryError> {
    if id.is_empty() || id.len() > 253 {
        return Err(RegistryError::invalid(
            field,
            format!("must be 1 to 253 characters, got {}", id.len()),
        ));
    }
    for label in id.split('.') {
        dns_label(field, label).map_err(|_| {
            RegistryError::invalid(
                field,
                format!("{id:?} must be dot-separated lowercase labels of letters, digits and '-'"),
            )
        })?;
    }
    Ok(())
}

/// Checks a `host:port` address (IPv6 hosts in brackets, no scheme) with
/// the function edges read addresses with, so what is written here every
/// edge can use.
pub fn host_port(field: &str, address: &str) -> Result<(), RegistryError> {
    infermesh_runtime::address::host_port(address)
        .map(|_| ())
        .map_err(|e| RegistryError::invalid(field, e.to_string()))
}

fn unique<'a>(
    field: &str,
    items: impl IntoIterator<Item = &'a String>,
) -> Result<BTreeSet<&'a str>, RegistryError> {
    let mut seen = BTreeSet::new();
    for item in items {
        if !seen.insert(item.as_str()) {
            return Err(RegistryError::invalid(
                field,
                format!("{item:?} appears twice"),
            ));
        }
    }
    Ok(seen)
}

fn fraction(field: &str, value: f64) -> Result<(), RegistryError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(RegistryError::invalid(
            field,
            format!("must be a fraction in [0, 1], got {value}"),
        ));
    }
    Ok(())
}

/// Checks a model as sent to create or update.
pub fn model(m: &Model) -> Result<(), RegistryError> {
    model_name("model.name", &m.name)?;
    for (i, alias) in m.aliases.iter().enumerate() {
        model_name(&format!("model.aliases[{i}]"), alias)?;
        if *alias == m.name {
            return Err(RegistryError::invalid(
                format!("model.aliases[{i}]"),
                "must differ from model.name",
            ));
        }
    }
    unique("model.aliases", &m.aliases)?;
    if RoutingPolicy::try_from(m.routing_policy).is_err() {
        return Err(RegistryError::invalid(
            "model.routing_policy",
            format!("unknown policy {}", m.routing_policy),
        ));
    }
    for (i, fallback) in m.fallbacks.iter().enumerate() {
        let field = format!("model.fallbacks[{i}]");
        model_name(&field, fallback)?;
        if *fallback == m.name || m.aliases.contains(fallback) {
            return Err(RegistryError::invalid(
                field,
                "a model cannot fall back to itself",
            ));
        }
    }
    unique("model.fallbacks", &m.fallbacks)?;
    if let Some(cache) = &m.cache_policy
        && cache.ttl_seconds > MAX_CACHE_TTL_SECONDS
    {
        return Err(RegistryError::invalid(
            "model.cache_policy.ttl_seconds",
            format!(
                "must be at most {MAX_CACHE_TTL_SECONDS} (7 days), got {}",
                cache.ttl_seconds
            ),
        ));
    }
    if let Some(cache) = &m.cache_policy
        && cache.max_entry_bytes > MAX_CACHE_ENTRY_BYTES
    {
        return Err(RegistryError::invalid(
            "model.cache_policy.max_entry_bytes",
            format!(
                "must be at most {MAX_CACHE_ENTRY_BYTES} (64 MiB), got {}",
                cache.max_entry_bytes
            ),
        ));
    }
    if let Some(price) = &m.price {
        for (field, text) in [
            ("model.price.input_per_1k", &price.input_per_1k),
            ("model.price.output_per_1k", &price.output_per_1k),
        ] {
            infermesh_runtime::money::Price::parse(text, "")
                .map_err(|e| RegistryError::invalid(field, e.to_string()))?;
        }
    }
    infermesh_runtime::engine_fields::check(&m.engine_fields)
        .map_err(|reason| RegistryError::invalid("model.engine_fields", reason.to_string()))?;
    if m.description.len() > MAX_DESCRIPTION {
        return Err(RegistryError::invalid(
            "model.description",
            format!("must be at most {MAX_DESCRIPTION} bytes"),
        ));
    }
    Ok(())
}

/// Checks a pool as sent to create or update.
pub fn pool(p: &Pool) -> Result<(), RegistryError> {
    dns_label("pool.name", &p.name)?;
    model_name("pool.model", &p.model)?;
    dns_label("pool.region", &p.region)?;
    match EngineKind::try_from(p.engine) {
        Ok(EngineKind::Vllm | EngineKind::Sglang) => {}
        _ => {
            return Err(RegistryError::invalid(
                "pool.engine",
                format!("must be VLLM or SGLANG, got {}", p.engine),
            ));
        }
    }
    if p.max_replicas == 0 {
        return Err(RegistryError::invalid(
            "pool.max_replicas",
            "must be at least 1",
        ));
    }
    if p.min_replicas > p.max_replicas {
        return Err(RegistryError::invalid(
            "pool.min_replicas",
            format!(
                "{} is more than pool.max_replicas {}",
                p.min_replicas, p.max_replicas
            ),
        ));
    }
    if let Some(t) = &p.scaling_targets {
        if !(t.waiting_per_replica.is_finite() && t.waiting_per_replica >= 0.0) {
            return Err(RegistryError::invalid(
                "pool.scaling_targets.waiting_per_replica",
                format!(
                    "must be a finite number >= 0, got {}",
                    t.waiting_per_replica
                ),
            ));
        }
        fraction("pool.scaling_targets.kv_cache_usage", t.kv_cache_usage)?;
        fraction("pool.scaling_targets.gpu_utilization", t.gpu_utilization)?;
    }
    pool_scaling(p)
}

/// Floors, time zone, behaviour, scale to zero and the scale target.
fn pool_scaling(p: &Pool) -> Result<(), RegistryError> {
    use crate::autoscale::floors;
    floors::time_zone(&p.time_zone)
        .map_err(|e| RegistryError::invalid("pool.time_zone", e.to_string()))?;
    if p.floors.len() > 32 {
        return Err(RegistryError::invalid(
            "pool.floors",
            format!("at most 32 windows, got {}", p.floors.len()),
        ));
    }
    for (i, w) in p.floors.iter().enumerate() {
        floors::parse_time(&w.start).map_err(|e| {
            RegistryError::invalid(format!("pool.floors[{i}].start"), e.to_string())
        })?;
        floors::parse_time(&w.end)
            .map_err(|e| RegistryError::invalid(format!("pool.floors[{i}].end"), e.to_string()))?;
        if let Some(day) = w
            .days
            .iter()
            .find(|d| !matches!(DayOfWeek::try_from(**d), Ok(d) if d != DayOfWeek::Unspecified))
        {
            return Err(RegistryError::invalid(
                format!("pool.floors[{i}].days"),
                format!("{day} is not a day (MONDAY to SUNDAY)"),
            ));
        }
        if w.min_replicas > p.max_replicas {
            return Err(RegistryError::invalid(
                format!("pool.floors[{i}].min_replicas"),
                format!(
                    "{} is more than pool.max_replicas {}",
                    w.min_replicas, p.max_replicas
                ),
            ));
        }
    }
    if let Some(b) = &p.behavior {
        for (field, value) in [
            (
                "pool.behavior.scale_up_stabilization_seconds",
                b.scale_up_stabilization_seconds,
            ),
            (
                "pool.behavior.scale_down_stabilization_seconds",
                b.scale_down_stabilization_seconds,
            ),
        ] {
            if value.is_some_and(|v| v > 3600) {
                return Err(RegistryError::invalid(
                    field,
                    format!("{} is more than 3600", value.unwrap_or_default()),
                ));
            }
        }
    }
    if p.scale_to_zero_idle_seconds > 7 * 24 * 3600 {
        return Err(RegistryError::invalid(
            "pool.scale_to_zero_idle_seconds",
            "must be at most 604800 (a week)",
        ));
    }
    if p.cold_start_timeout_seconds > 900 {
        return Err(RegistryError::invalid(
            "pool.cold_start_timeout_seconds",
            format!("{} is more than 900", p.cold_start_timeout_seconds),
        ));
    }
    if let Some(t) = &p.scale_target {
        dns_label("pool.scale_target.namespace", &t.namespace)?;
        if t.name.is_empty()
            || t.name.len() > 253
            || !t
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(RegistryError::invalid(
                "pool.scale_target.name",
                format!(
                    "{:?} must be a Kubernetes object name (lowercase letters, digits, '-', '.')",
                    t.name
                ),
            ));
        }
        if !matches!(t.kind.as_str(), "" | "Deployment" | "StatefulSet") {
            return Err(RegistryError::invalid(
                "pool.scale_target.kind",
                format!("{:?} must be Deployment or StatefulSet", t.kind),
            ));
        }
    }
    Ok(())
}

/// Checks a free-text description.
pub fn description(field: &str, text: &str) -> Result<(), RegistryError> {
    if text.len() > MAX_DESCRIPTION {
        return Err(RegistryError::invalid(
            field,
            format!("must be at most {MAX_DESCRIPTION} bytes"),
        ));
    }
    Ok(())
}

/// Checks a region as sent to create or update.
pub fn region(r: &Region) -> Result<(), RegistryError> {
    dns_label("region.name", &r.name)?;
    for (i, zone) in r.zones.iter().enumerate() {
        dns_label(&format!("region.zones[{i}]"), zone)?;
    }
    unique("region.zones", &r.zones)?;
    for (i, other) in r.failover.iter().enumerate() {
        let field = format!("region.failover[{i}]");
        dns_label(&field, other)?;
        if *other == r.name {
            return Err(RegistryError::invalid(
                field,
                "a region cannot fail over to itself",
            ));
        }
    }
    unique("region.failover", &r.failover)?;
    if !r.edge_address.is_empty() {
        host_port("region.edge_address", &r.edge_address)?;
    }
    Ok(())
}

/// Checks the spend budgets of limits sent for a key or tenant: decimal
/// currency amounts (`field` is where the limits sit, e.g. `tenant.limits`).
pub fn limits(
    field: &str,
    limits: Option<&infermesh_proto::v1::RateLimits>,
) -> Result<(), RegistryError> {
    let Some(limits) = limits else {
        return Ok(());
    };
    for (name, text) in [
        ("spend_per_day", &limits.spend_per_day),
        ("spend_per_month", &limits.spend_per_month),
    ] {
        infermesh_runtime::money::budget_micros(text)
            .map_err(|e| RegistryError::invalid(format!("{field}.{name}"), e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
