//! Node-wide counters, shown at `GET /cluster/stats` (JSON) and `GET /metrics` (Prometheus).
//!
//! Each counter is a Prometheus counter (an atomic behind an `Arc`), so both views read the same
//! numbers; [`NodeStats::register`] hands them to the metrics registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;

#[derive(Debug, Default)]
pub struct NodeStats {
    /// Valid events read from Kafka by this node's consumer.
    pub events_consumed: Counter,
    /// Events applied by an entity on the node that consumed them.
    pub events_processed_local: Counter,
    /// Events consumed here whose key belongs to another shard (non-local): re-routed to the
    /// key's partition, where its owner consumes them.
    pub events_forwarded_out: Counter,
    /// Re-routed events consumed here (their key's shard is here).
    pub events_forwarded_in: Counter,
    /// Redelivered events an entity had already applied (after a crash or hand-off): not counted again.
    pub events_skipped_replayed: Counter,
    /// Entity states read from the changelog when shards were assigned here.
    pub entities_restored: Counter,
    /// Entity actors stopped for idleness or the live-actor cap (their state is kept).
    pub entities_passivated: Counter,
    /// Checkpoint transactions committed / aborted.
    pub checkpoints_committed: Counter,
    pub checkpoints_aborted: Counter,
    /// Malformed records found; each is written to the dead-letter topic by the checkpoint that
    /// commits past it.
    pub dead_lettered: Counter,
    /// Partitions assigned to / revoked from this node since start.
    pub partitions_assigned: Counter,
    pub partitions_revoked: Counter,
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
    pub fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// Every counter with its metric name (without the `_total` Prometheus adds) and help.
    fn named(&self) -> [(&'static str, &'static str, &Counter); 12] {
        [
            (
                "events_consumed",
                "Valid events read from Kafka by this node",
                &self.events_consumed,
            ),
            (
                "events_processed_local",
                "Events applied by an entity on the node that consumed them",
                &self.events_processed_local,
            ),
            (
                "events_forwarded_out",
                "Mis-keyed events re-routed to their key's partition",
                &self.events_forwarded_out,
            ),
            (
                "events_forwarded_in",
                "Re-routed events consumed here",
                &self.events_forwarded_in,
            ),
            (
                "events_skipped_replayed",
                "Redelivered events already applied (not counted again)",
                &self.events_skipped_replayed,
            ),
            (
                "entities_restored",
                "Entity states read from the changelog",
                &self.entities_restored,
            ),
            (
                "entities_passivated",
                "Entity actors stopped for idleness or the live-actor cap",
                &self.entities_passivated,
            ),
            (
                "checkpoints_committed",
                "Checkpoint transactions committed",
                &self.checkpoints_committed,
            ),
            (
                "checkpoints_aborted",
                "Checkpoint transactions aborted",
                &self.checkpoints_aborted,
            ),
            (
                "events_dead_lettered",
                "Malformed records found (written to the dead-letter topic with the next checkpoint)",
                &self.dead_lettered,
            ),
            (
                "partitions_assigned",
                "Partitions assigned to this node",
                &self.partitions_assigned,
            ),
            (
                "partitions_revoked",
                "Partitions revoked from this node",
                &self.partitions_revoked,
            ),
        ]
    }

    pub fn register(&self, registry: &mut Registry) {
        for (name, help, counter) in self.named() {
            registry.register(name, help, counter.clone());
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            events_consumed: self.events_consumed.get(),
            events_processed_local: self.events_processed_local.get(),
            events_forwarded_out: self.events_forwarded_out.get(),
            events_forwarded_in: self.events_forwarded_in.get(),
            events_skipped_replayed: self.events_skipped_replayed.get(),
            entities_restored: self.entities_restored.get(),
            entities_passivated: self.entities_passivated.get(),
            checkpoints_committed: self.checkpoints_committed.get(),
            checkpoints_aborted: self.checkpoints_aborted.get(),
            dead_lettered: self.dead_lettered.get(),
            partitions_assigned: self.partitions_assigned.get(),
            partitions_revoked: self.partitions_revoked.get(),
        }
    }
}
