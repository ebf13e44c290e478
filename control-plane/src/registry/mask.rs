//! Update masks (AIP-134): which fields of a stored object an Update RPC
//! takes from its request. Each message type has one table here saying,
//! per field, whether an update may set it, go into it (a message field),
//! or must leave it alone (immutable, or set by the server); checking a
//! mask's paths and merging read nothing but these tables. Whether the
//! merged object is valid is not decided here: the registry validates what
//! it is about to write.

use std::marker::PhantomData;

use infermesh_proto::v1::{
    Adapter, ApiKey, CachePolicy, Model, ModelTimeouts, Pool, Price, RateLimits, Region,
    ScaleTarget, ScalingBehavior, ScalingTargets, Tenant,
};
use prost_types::FieldMask;

use super::RegistryError;
use crate::store::objects::Object;

/// A message whose fields an update can name.
pub trait Masked: Default + Sized + 'static {
    /// Every field of the message, in proto order.
    const FIELDS: &'static [Field<Self>];
}

/// One field of a masked message.
pub struct Field<T> {
    /// Its proto name, as mask paths spell it.
    pub name: &'static str,
    /// What an update may do with it.
    pub rule: Rule<T>,
}

/// What an update may do with one field.
pub enum Rule<T> {
    /// Written when the mask names it, or without a mask when it is set.
    Value {
        /// The request sets it (not empty, not zero).
        is_set: fn(&T) -> bool,
        /// Takes it from the request.
        copy: fn(&mut T, &T),
    },
    /// A message field: written whole like a value, or field by field
    /// through a longer path (`cache_policy.ttl_seconds`).
    Message {
        /// The request holds the message.
        is_set: fn(&T) -> bool,
        /// Takes the whole message from the request.
        copy: fn(&mut T, &T),
        /// Applies the rest of a path inside the message.
        path: fn(&mut T, &T, &Step) -> Result<(), RegistryError>,
        /// Writes the fields set inside the request's message.
        set: fn(&mut T, &T, &str) -> Result<(), RegistryError>,
    },
    /// Names the object or was fixed when it was created: a request may
    /// send it back as read, never change it.
    Immutable {
        /// The request sets it to something other than what is stored.
        differs: fn(&T, &T) -> bool,
        /// The stored value, for the refusal.
        shown: fn(&T) -> String,
    },
    /// Set by the server; ignored in a request's object.
    OutputOnly,
}

/// A mask path being resolved, for refusals that name it.
pub struct Step<'a> {
    /// The whole path as sent.
    path: &'a str,
    /// The message that holds what is left, e.g. `model.cache_policy`.
    owner: &'a str,
    /// What is left of the path.
    rest: &'a str,
}

fn is_default<V: Default + PartialEq>(value: &V) -> bool {
    *value == V::default()
}

/// Builds each type's table: `value` fields are written as they are,
/// `message` fields may be named whole or by a longer path, `immutable`
/// fields never change, `output_only` fields are the server's.
macro_rules! masked {
    ($($ty:ty { $($field:ident: $rule:ident),* $(,)? })*) => {$(
        impl Masked for $ty {
            const FIELDS: &'static [Field<Self>] = &[$(Field {
                name: stringify!($field),
                rule: masked!(@rule $ty, $field, $rule),
            }),*];
        }
    )*};
    (@rule $ty:ty, $f:ident, value) => {
        Rule::Value {
            is_set: |m: &$ty| !is_default(&m.$f),
            copy: |to: &mut $ty, from: &$ty| to.$f.clone_from(&from.$f),
        }
    };
    (@rule $ty:ty, $f:ident, message) => {
        Rule::Message {
            is_set: |m: &$ty| m.$f.is_some(),
            copy: |to: &mut $ty, from: &$ty| to.$f.clone_from(&from.$f),
            path: |to: &mut $ty, from: &$ty, step: &Step| {
                let absent = Default::default();
                at_path(
                    to.$f.get_or_insert_with(Default::default),
                    from.$f.as_ref().unwrap_or(&absent),
                    step,
                )
            },
            set: |to: &mut $ty, from: &$ty, owner: &str| match &from.$f {
                Some(from) => set_fields(to.$f.get_or_insert_with(Default::default), from, owner),
                None => Ok(()),
            },
        }
    };
    (@rule $ty:ty, $f:ident, immutable) => {
        Rule::Immutable {
            differs: |stored: &$ty, sent: &$ty| !is_default(&sent.$f) && sent.$f != stored.$f,
            shown: |m: &$ty| format!("{:?}", m.$f),
        }
    };
    (@rule $ty:ty, $f:ident, output_only) => {
        Rule::OutputOnly
    };
}

masked! {
    Model {
        name: immutable,
        aliases: value,
        routing_policy: value,
        cache_policy: message,
        fallbacks: value,
        description: value,
        route_receipts: value,
        timeouts: message,
        engine_fields: value,
        price: message,
        revision: output_only,
    }
    Price {
        input_per_1k: value,
        output_per_1k: value,
    }
    CachePolicy {
        enabled: value,
        ttl_seconds: value,
        max_entry_bytes: value,
        deterministic: value,
    }
    ModelTimeouts {
        connect_ms: value,
        first_byte_ms: value,
        idle_ms: value,
        total_ms: value,
        queue_ms: value,
    }
    Pool {
        name: immutable,
        model: value,
        region: value,
        engine: value,
        min_replicas: value,
        max_replicas: value,
        scaling_targets: message,
        floors: value,
        time_zone: value,
        behavior: message,
        scale_to_zero_idle_seconds: value,
        cold_start_timeout_seconds: value,
        scale_target: message,
        max_concurrency: value,
        revision: output_only,
    }
    ScalingTargets {
        waiting_per_replica: value,
        kv_cache_usage: value,
        gpu_utilization: value,
    }
    ScalingBehavior {
        scale_up_stabilization_seconds: value,
        scale_down_stabilization_seconds: value,
    }
    ScaleTarget {
        namespace: value,
        kind: value,
        name: value,
    }
    Region {
        name: immutable,
        zones: value,
        failover: value,
        edge_address: value,
        revision: output_only,
    }
    Adapter {
        name: immutable,
        base_model: immutable,
        source: value,
        version: value,
        owner_tenant: value,
        description: value,
        revision: output_only,
    }
    Tenant {
        name: immutable,
        limits: message,
        description: value,
        id: immutable,
        priority: value,
        revision: output_only,
    }
    RateLimits {
        requests_per_minute: value,
        tokens_per_minute: value,
        tokens_per_day: value,
        spend_per_day: value,
        spend_per_month: value,
    }
    ApiKey {
        id: immutable,
        tenant: immutable,
        name: value,
        secret_sha256: output_only,
        allowed_models: value,
        limits: message,
        created_at_unix_ms: output_only,
        expires_at_unix_ms: value,
        revoked: output_only,
        revoked_at_unix_ms: output_only,
        last_used_at_unix_ms: output_only,
        prefix: output_only,
        tenant_id: output_only,
        priority: value,
        revision: output_only,
    }
}

fn refused(message: String) -> RegistryError {
    RegistryError::invalid("update_mask", message)
}

/// The fields of `T` a mask may name.
fn settable<T: Masked>() -> String {
    T::FIELDS
        .iter()
        .filter(|f| matches!(f.rule, Rule::Value { .. } | Rule::Message { .. }))
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes the field `step.rest` names from `sent` into `stored`.
fn at_path<T: Masked>(stored: &mut T, sent: &T, step: &Step) -> Result<(), RegistryError> {
    let (head, tail) = match step.rest.split_once('.') {
        Some((head, tail)) => (head, Some(tail)),
        None => (step.rest, None),
    };
    let Some(field) = T::FIELDS.iter().find(|f| f.name == head) else {
        return Err(refused(format!(
            "{:?} is not a field of {}; an update may set {}",
            step.path,
            step.owner,
            settable::<T>()
        )));
    };
    match (&field.rule, tail) {
        (Rule::Immutable { .. }, _) => Err(refused(format!(
            "{:?} cannot be changed after creation",
            step.path
        ))),
        (Rule::OutputOnly, _) => Err(refused(format!(
            "{:?} is set by the server, not by an update",
            step.path
        ))),
        (Rule::Value { copy, .. } | Rule::Message { copy, .. }, None) => {
            copy(stored, sent);
            Ok(())
        }
        (Rule::Value { .. }, Some(_)) => Err(refused(format!(
            "{:?}: {}.{head} has no fields of its own; name it whole",
            step.path, step.owner
        ))),
        (Rule::Message { path, .. }, Some(rest)) => path(
            stored,
            sent,
            &Step {
                path: step.path,
                owner: &format!("{}.{head}", step.owner),
                rest,
            },
        ),
    }
}

/// Writes every field set in `sent` into `stored`, going into message
/// fields, and refuses a change of an immutable field.
fn set_fields<T: Masked>(stored: &mut T, sent: &T, owner: &str) -> Result<(), RegistryError> {
    for field in T::FIELDS {
        match &field.rule {
            Rule::Value { is_set, copy } => {
                if is_set(sent) {
                    copy(stored, sent);
                }
            }
            Rule::Message { is_set, set, .. } => {
                if is_set(sent) {
                    set(stored, sent, &format!("{owner}.{}", field.name))?;
                }
            }
            Rule::Immutable { differs, shown } => {
                if differs(stored, sent) {
                    return Err(RegistryError::invalid(
                        format!("{owner}.{}", field.name),
                        format!("cannot change (it is {})", shown(stored)),
                    ));
                }
            }
            Rule::OutputOnly => {}
        }
    }
    Ok(())
}

/// The fields an update writes: the paths of its `update_mask`, checked
/// against `T`, or every field set in the request when the mask is absent
/// or empty.
pub struct UpdateMask<T> {
    paths: Vec<String>,
    object: PhantomData<fn() -> T>,
}

impl<T: Object + Masked> UpdateMask<T> {
    /// Checks every path of `mask`; a refusal names the path.
    pub fn parse(mask: Option<FieldMask>) -> Result<Self, RegistryError> {
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        for path in &paths {
            at_path(&mut T::default(), &T::default(), &Self::step(path))?;
        }
        Ok(Self {
            paths,
            object: PhantomData,
        })
    }

    fn step(path: &str) -> Step<'_> {
        Step {
            path,
            owner: T::KIND.noun(),
            rest: path,
        }
    }

    /// `stored` with the update `sent` applied.
    pub fn apply(&self, stored: &T, sent: &T) -> Result<T, RegistryError> {
        let mut next = stored.clone();
        if self.paths.is_empty() {
            set_fields(&mut next, sent, T::KIND.noun())?;
        }
        for path in &self.paths {
            at_path(&mut next, sent, &Self::step(path))?;
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests;
