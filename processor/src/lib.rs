//! A Kafka-aligned actor-sharding cluster node.
//!
//! Shard id == Kafka partition: each node hosts the entities of the partitions its consumer is
//! assigned, so processing never crosses the network, and any node answers queries for any user
//! by routing to the shard's owner. See `docs/ARCHITECTURE.md`.
//!
//! Module map (data flows top to bottom):
//! - [`consumer`]: Kafka consumer thread; batches records to shards, commits checkpoint
//!   transactions (changed states + offsets: exactly once); its rebalance callbacks drive [`handoff`].
//! - [`handoff`]: the take-over / hand-off protocol on assignment and revocation; [`restore`]
//!   reads a newly assigned shard's state from the changelog ([`changelog`]: its record format).
//! - [`shard`]: per-partition actor owning that partition's [`entity`] actors.
//! - [`allocation`]: the shard -> node table every node keeps; [`cluster`] keeps it current
//!   (membership, announcements, the per-node gateway actor, wire types).
//! - [`routing`]: reaching a shard locally or on its owner, with bounded waits.
//! - [`kafka_health`]: Kafka reachability (one log line per outage, not per retry) and what a
//!   node cannot recover from; [`readiness`]: `/alive`, `/ready` and gRPC health.
//! - [`grpc`], [`http`]: the front ends; [`stats`] and [`metrics`] what they report. [`event`], [`dlq`]: input validation and dead letters.

pub mod allocation;
pub mod backpressure;
pub mod changelog;
pub mod cli;
pub mod cluster;
pub mod consumer;
pub mod dlq;
pub mod entity;
pub mod event;
pub mod grpc;
pub mod handoff;
pub mod http;
pub mod kafka_admin;
pub mod kafka_health;
pub mod lag;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod readiness;
pub mod restore;
pub mod routing;
pub mod shard;
pub mod stats;
