//! The cluster layer: ractor_cluster membership (with its peer exchange), the per-node gateway
//! actor (the only remotable actor application traffic crosses), ownership announcements,
//! query batching to peers, the query link to peers, whether peers answer, the wire format
//! between nodes, and TLS for their sessions.

pub mod announce;
pub mod endpoint;
pub mod gateway;
pub mod membership;
pub mod peer_health;
pub mod query_batcher;
pub mod query_link;
pub mod tls;
pub mod wire;
