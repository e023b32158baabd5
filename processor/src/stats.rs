//! Node-wide counters, shown at `GET /cluster/stats` and used by the tests.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct NodeStats {
    /// Valid events read from Kafka by this node's consumer.
    pub events_consumed: AtomicU64,
    /// Events applied by an entity on the node that consumed them.
    pub events_processed_local: AtomicU64,
    /// Events consumed here whose shard another shard or node owns (non-local processing).
    pub events_forwarded_out: AtomicU64,
    /// Events other shards or nodes forwarded here and an entity here applied.
    pub events_forwarded_in: AtomicU64,
    /// Records copied to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Partitions assigned to / revoked from this node since start.
    pub partitions_assigned: AtomicU64,
    pub partitions_revoked: AtomicU64,
}

/// A point-in-time copy, for JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub events_consumed: u64,
    pub events_processed_local: u64,
    pub events_forwarded_out: u64,
    pub events_forwarded_in: u64,
    pub dead_lettered: u64,
    pub partitions_assigned: u64,
    pub partitions_revoked: u64,
}

impl NodeStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            events_consumed: get(&self.events_consumed),
            events_processed_local: get(&self.events_processed_local),
            events_forwarded_out: get(&self.events_forwarded_out),
            events_forwarded_in: get(&self.events_forwarded_in),
            dead_lettered: get(&self.dead_lettered),
            partitions_assigned: get(&self.partitions_assigned),
            partitions_revoked: get(&self.partitions_revoked),
        }
    }
}
