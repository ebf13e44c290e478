//! The fleet as operators ask for it: each routing-table stream's
//! subscriber state, kept by the replica the stream is attached to and
//! shared with the other replicas through the load digests, so that every
//! replica lists every replica's subscribers. Nothing here decides routing.

pub mod subscribers;
pub mod view;

pub use subscribers::{StreamId, Subscriber, SubscriberBook, SubscriberState};
pub use view::{SubscriberFilter, SubscriberList, SubscriberView};
