//! The fleet as operators ask for it: each routing-table stream's
//! subscriber state, kept by the replica the stream is attached to.
//! Nothing here decides routing.

pub mod subscribers;

pub use subscribers::{StreamId, Subscriber, SubscriberBook, SubscriberState};
