//! Priority bands: what a key or tenant's registry priority means to the
//! edge's flow control, and the header that may lower it.

/// A request's priority band, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    /// Never shed, served first.
    Critical,
    /// The default.
    Standard,
    /// Shed when the fleet is full.
    Sheddable,
}

impl Band {
    /// The band's name in metrics and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Critical => "critical",
            Band::Standard => "standard",
            Band::Sheddable => "sheddable",
        }
    }

    /// A band named in a request header (`critical`, `standard`, `sheddable`).
    pub fn parse(name: &str) -> Option<Band> {
        match name.trim().to_ascii_lowercase().as_str() {
            "critical" => Some(Band::Critical),
            "standard" => Some(Band::Standard),
            "sheddable" => Some(Band::Sheddable),
            _ => None,
        }
    }

    /// The band of the registry's priority (unset: standard).
    pub fn of(priority: infermesh_proto::v1::Priority) -> Band {
        use infermesh_proto::v1::Priority;
        match priority {
            Priority::Critical => Band::Critical,
            Priority::Sheddable => Band::Sheddable,
            Priority::Standard | Priority::Unspecified => Band::Standard,
        }
    }
}
