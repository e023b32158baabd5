//! An entity type's counters on this node, shown at `GET /cluster/stats` (JSON) and `GET /metrics` (Prometheus).
//!
//! Each counter is a series of a Prometheus counter family (an atomic behind an `Arc`), so both
//! views read the same numbers; one `NodeStats` per hosted entity type.

use prometheus_client::metrics::counter::Counter;
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
    /// Entities passivated for idleness or the live cap (their state is kept).
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
    /// Durable timers set by entities / fired (their message written) here.
    pub timers_set: Counter,
    pub timers_fired: Counter,
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
    pub timers_set: u64,
    pub timers_fired: u64,
}

impl NodeStats {
    pub fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// Every counter's metric name (without the `_total` Prometheus adds) and help, in the
    /// order of [`NodeStats::from_counters`].
    pub const NAMES: [(&'static str, &'static str); 14] = [
        (
            "events_consumed",
            "Valid events read from Kafka by this node",
        ),
        (
            "events_processed_local",
            "Events applied by an entity on the node that consumed them",
        ),
        (
            "events_forwarded_out",
            "Mis-keyed events re-routed to their key's partition",
        ),
        ("events_forwarded_in", "Re-routed events consumed here"),
        (
            "events_skipped_replayed",
            "Redelivered events already applied (not counted again)",
        ),
        ("entities_restored", "Entity states read from the changelog"),
        (
            "entities_passivated",
            "Entities passivated for idleness or the live cap",
        ),
        ("checkpoints_committed", "Checkpoint transactions committed"),
        ("checkpoints_aborted", "Checkpoint transactions aborted"),
        (
            "events_dead_lettered",
            "Malformed records found (written to the dead-letter topic with the next checkpoint)",
        ),
        ("partitions_assigned", "Partitions assigned to this node"),
        ("partitions_revoked", "Partitions revoked from this node"),
        ("timers_set", "Durable timers set by entities here"),
        (
            "timers_fired",
            "Durable timers fired here (their message written with a checkpoint)",
        ),
    ];

    /// Stats counting into `counters` (the metric families' series), in [`NodeStats::NAMES`]'
    /// order.
    pub fn from_counters(counters: impl IntoIterator<Item = Counter>) -> Self {
        let mut c = counters.into_iter();
        let mut next = || c.next().expect("one counter per name");
        Self {
            events_consumed: next(),
            events_processed_local: next(),
            events_forwarded_out: next(),
            events_forwarded_in: next(),
            events_skipped_replayed: next(),
            entities_restored: next(),
            entities_passivated: next(),
            checkpoints_committed: next(),
            checkpoints_aborted: next(),
            dead_lettered: next(),
            partitions_assigned: next(),
            partitions_revoked: next(),
            timers_set: next(),
            timers_fired: next(),
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
            timers_set: self.timers_set.get(),
            timers_fired: self.timers_fired.get(),
        }
    }
}

impl std::ops::AddAssign for StatsSnapshot {
    /// Node-wide sums over the hosted types.
    fn add_assign(&mut self, other: Self) {
        self.events_consumed += other.events_consumed;
        self.events_processed_local += other.events_processed_local;
        self.events_forwarded_out += other.events_forwarded_out;
        self.events_forwarded_in += other.events_forwarded_in;
        self.events_skipped_replayed += other.events_skipped_replayed;
        self.entities_restored += other.entities_restored;
        self.entities_passivated += other.entities_passivated;
        self.checkpoints_committed += other.checkpoints_committed;
        self.checkpoints_aborted += other.checkpoints_aborted;
        self.dead_lettered += other.dead_lettered;
        self.partitions_assigned += other.partitions_assigned;
        self.partitions_revoked += other.partitions_revoked;
        self.timers_set += other.timers_set;
        self.timers_fired += other.timers_fired;
    }
}
