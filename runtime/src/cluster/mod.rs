//! The cluster layer: ractor_cluster membership, the per-node gateway actor (the only remotable
//! actor), ownership announcements, query batching to peers, and the wire format between nodes.

pub mod announce;
pub mod endpoint;
pub mod gateway;
pub mod membership;
pub mod query_batcher;
pub mod wire;
