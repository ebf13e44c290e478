//! What a table build leaves out: the kinds of objects, one skipped object
//! with its reason, and the log a build (and the key reader) writes them
//! to. Kept apart so that what reads objects can report into it without
//! depending on the table.

use std::fmt;

/// What kind of table object was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A registered replica.
    Endpoint,
    /// A model (its routing policy is unknown to this edge).
    Model,
    /// A model name or alias claimed by more than one model.
    Alias,
    /// A region's edge address (spillover target).
    Region,
    /// An API key.
    ApiKey,
    /// A LoRA adapter (its base model is not routed here).
    Adapter,
}

impl ObjectKind {
    /// Every kind, for metrics that report zero as well.
    pub const ALL: [ObjectKind; 6] = [
        ObjectKind::Endpoint,
        ObjectKind::Model,
        ObjectKind::Alias,
        ObjectKind::Region,
        ObjectKind::ApiKey,
        ObjectKind::Adapter,
    ];

    /// The kind as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Endpoint => "endpoint",
            ObjectKind::Model => "model",
            ObjectKind::Alias => "alias",
            ObjectKind::Region => "region",
            ObjectKind::ApiKey => "api_key",
            ObjectKind::Adapter => "adapter",
        }
    }
}

/// One object of a pushed table that the edge left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// What it is.
    pub kind: ObjectKind,
    /// Its id or name (never a secret).
    pub name: String,
    /// Why it could not be used.
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}: {}", self.kind.as_str(), self.name, self.reason)
    }
}

/// Collects what a build left out.
#[derive(Debug, Default)]
pub(crate) struct SkipLog(pub(crate) Vec<Skipped>);

impl SkipLog {
    pub(crate) fn skip(&mut self, kind: ObjectKind, name: &str, reason: impl fmt::Display) {
        self.0.push(Skipped {
            kind,
            name: name.to_string(),
            reason: reason.to_string(),
        });
    }
}
