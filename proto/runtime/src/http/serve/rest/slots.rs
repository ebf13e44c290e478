//! The bound on idle connections that keep hyper's buffers while they wait
//! out the rest delay: past it, an idle connection rests at once.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A bounded count of idle connections keeping their buffers.
pub(in crate::http::serve) struct Slots {
    taken: AtomicUsize,
    max: usize,
}

impl Slots {
    /// `max` slots, none taken.
    pub(in crate::http::serve) fn new(max: usize) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max,
        }
    }

    /// A slot, unless all `max` are taken.
    pub(super) fn take(&self) -> Option<Slot<'_>> {
        let taken = self.taken.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self))
    }
}

/// One idle connection's place among those keeping their buffers.
pub(super) struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_connections_linger_than_there_are_slots_and_a_dropped_slot_is_free_again() {
        let slots = Slots::new(2);
        let first = slots.take().expect("a first slot");
        let _second = slots.take().expect("a second slot");
        assert!(slots.take().is_none(), "only two slots");
        drop(first);
        assert!(slots.take().is_some(), "the first slot is free again");
        assert!(Slots::new(0).take().is_none(), "no slots, none to take");
    }
}
