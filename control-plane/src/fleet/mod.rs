//! The fleet as operators ask for it (AdminService GetFleetStatus and
//! ListSubscribers): each routing-table stream's subscriber state, kept by
//! the replica the stream is attached to and shared with the other
//! replicas through the load digests; and the registry's regions, pools
//! and endpoints with their latest load. Nothing here decides routing.

pub mod explain;
pub mod status;
pub mod subscribers;
pub mod view;

pub use explain::{AskError, ExplainDesk};
pub use subscribers::{StreamId, Subscriber, SubscriberBook, SubscriberState};
pub use view::{SubscriberFilter, SubscriberList, SubscriberView};
