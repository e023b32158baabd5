//! Node-wide counters, shown at `GET /cluster/stats` and used by the tests.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct NodeStats {
    /// Valid events read from Kafka by this node's consumer.
    pub events_consumed: AtomicU64,
    /// Events applied by an entity on the node that consumed them.
    pub events_processed_local: AtomicU64,
    /// Events consumed here whose key belongs to another shard (non-local): re-routed to the
    /// key's partition, where its owner consumes them.
    pub events_forwarded_out: AtomicU64,
    /// Re-routed events consumed here (their key's shard is here).
    pub events_forwarded_in: AtomicU64,
    /// Redelivered events an entity had already applied (after a crash or hand-off): not counted again.
    pub events_skipped_replayed: AtomicU64,
    /// Entity states read from the changelog when shards were assigned here.
    pub entities_restored: AtomicU64,
    /// Entity actors stopped for idleness or the live-actor cap (their state is kept).
    pub entities_passivated: AtomicU64,
    /// Checkpoint transactions committed / aborted.
    pub checkpoints_committed: AtomicU64,
    pub checkpoints_aborted: AtomicU64,
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
    pub events_skipped_replayed: u64,
    pub entities_restored: u64,
    pub entities_passivated: u64,
    pub checkpoints_committed: u64,
    pub checkpoints_aborted: u64,
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
            events_skipped_replayed: get(&self.events_skipped_replayed),
            entities_restored: get(&self.entities_restored),
            entities_passivated: get(&self.entities_passivated),
            checkpoints_committed: get(&self.checkpoints_committed),
            checkpoints_aborted: get(&self.checkpoints_aborted),
            dead_lettered: get(&self.dead_lettered),
            partitions_assigned: get(&self.partitions_assigned),
            partitions_revoked: get(&self.partitions_revoked),
        }
    }
}
