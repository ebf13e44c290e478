//! Request fields that only inference engines understand and that change
//! how an engine treats a request beyond the OpenAI API: who goes first,
//! which id it runs under, which chat template renders it, where its KV
//! cache comes from. Clients may send them only for models whose registry
//! entry allows them (`Model.engine_fields`); edges remove the others.

/// Every gated field, as it appears in a request body.
pub const GATED: [&str; 6] = [
    "priority",
    "request_id",
    "rid",
    "chat_template",
    "chat_template_kwargs",
    "kv_transfer_params",
];

/// Why a model's list of engine fields is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineFieldsError {
    /// A name that is not in `GATED`.
    #[error("{0:?} is not an engine field infermesh gates (one of {gated})", gated = GATED.join(", "))]
    NotGated(String),
    /// A name listed more than once.
    #[error("{0:?} is listed twice")]
    Twice(String),
}

/// Checks a model's list: known names, each once.
pub fn check(fields: &[String]) -> Result<(), EngineFieldsError> {
    for (i, field) in fields.iter().enumerate() {
        if !GATED.contains(&field.as_str()) {
            return Err(EngineFieldsError::NotGated(field.clone()));
        }
        if fields[..i].contains(field) {
            return Err(EngineFieldsError::Twice(field.clone()));
        }
    }
    Ok(())
}

/// A set of gated fields, one bit per entry of `GATED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldSet(u8);

impl FieldSet {
    /// The set naming `fields` (unknown names are left out).
    pub fn of<'a>(fields: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for field in fields {
            set.insert(field);
        }
        set
    }

    /// Adds `field` when it is gated.
    pub fn insert(&mut self, field: &str) {
        if let Some(i) = GATED.iter().position(|g| *g == field) {
            self.0 |= 1 << i;
        }
    }

    /// Whether no field is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The fields of this set not in `allowed`.
    pub fn without(self, allowed: FieldSet) -> FieldSet {
        FieldSet(self.0 & !allowed.0)
    }

    /// The names in the set.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        GATED
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, name)| *name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_fields_once_each_may_be_allowed() {
        assert!(check(&["priority".into(), "request_id".into()]).is_ok());
        assert!(
            check(&["temperature".into()])
                .unwrap_err()
                .to_string()
                .contains("one of priority")
        );
        assert!(
            check(&["rid".into(), "rid".into()])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn a_set_removes_what_is_allowed() {
        let sent = FieldSet::of(["priority", "chat_template", "temperature"]);
        let allowed = FieldSet::of(["chat_template"]);
        assert_eq!(
            sent.without(allowed).names().collect::<Vec<_>>(),
            ["priority"]
        );
        assert!(sent.without(sent).is_empty());
    }
}
