//! What the shard actor receives and hands out: consumed records, its messages, its checkpoint
//! contribution. Apart from the actor, so the consumer, the restorer and the router import these
//! and not the actor.

use std::sync::Arc;

use ractor::RpcReplyPort;

use crate::commands::{CommandMeta, DirectCommand};
use crate::dlq::DeadLetter;
use crate::entity::{Entity, EntityId, EntityMap, Stored};

/// One record read from this shard's partition.
pub(crate) struct ConsumedRecord<Ev> {
    pub offset: i64,
    /// The record's timestamp (ms since the epoch): the input's time for its entity.
    pub at_ms: i64,
    pub content: RecordContent<Ev>,
}

pub(crate) enum RecordContent<Ev> {
    Event(EntityId, Ev),
    /// A command (see `commands`): run like an event, and answered once committed. `Err`: its
    /// value did not decode (dead-lettered, and the sender told why).
    Command(EntityId, Result<Ev, String>, Box<CommandMeta>),
    /// Its key belongs to another shard: written to the key's partition with the checkpoint
    /// that commits past it.
    Reroute(Box<Reroute>),
    /// Malformed: nothing to apply; it goes to the dead-letter topic with the checkpoint that
    /// commits past it.
    DeadLetter(Box<DeadLetter>),
}

/// A record read from this partition whose key belongs to another shard (its producer used
/// another partitioner): written, as it was read, to its key's partition inside the checkpoint
/// transaction that commits past it, so the owner consumes it exactly once.
#[derive(Debug, Clone)]
pub(crate) struct Reroute {
    pub source_offset: i64,
    pub target_partition: u32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A record a checkpoint writes besides states and offsets, in the same transaction.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    Reroute(Box<Reroute>),
    DeadLetter(Box<DeadLetter>),
    /// A message to an entity or an emitted record (see `effects`).
    Record(Box<OutRecord>),
}

/// A record an entity's effects write.
#[derive(Debug, Clone)]
pub(crate) struct OutRecord {
    pub topic: String,
    /// `None`: by the key, as Kafka's Java producer partitions.
    pub partition: Option<u32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
}

/// What a shard contributes to one checkpoint transaction.
pub(crate) struct Checkpoint<S> {
    pub partition: u32,
    /// Sequence number to confirm with [`ShardMsg::Checkpointed`] once committed.
    pub seq: u64,
    /// Next offset to commit; `None` if nothing was acknowledged yet.
    pub commit_offset: Option<i64>,
    pub states: Vec<(EntityId, Stored<S>)>,
    pub outgoing: Vec<Outgoing>,
}

impl<S> Checkpoint<S> {
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.outgoing.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EntityCounts {
    /// Live entities (active recently; the others are passivated).
    pub live: usize,
    /// Entities with state in this shard (live or passivated).
    pub known: usize,
    /// Next offset after the records run so far (what the next checkpoint commits); `None`
    /// before the first record. Its movement is the shard's progress.
    pub processed_offset: Option<i64>,
}

pub(crate) enum ShardMsg<E: Entity> {
    /// The partition's changelog, read to its end: the shard may start. `timers`: whether any
    /// state may hold a pending timer (the shard then indexes them; see `changelog::fold`).
    Restored {
        states: EntityMap<Stored<E::State>>,
        timers: bool,
    },
    /// A batch read from the partition, in offset order.
    Consumed(Vec<ConsumedRecord<E::Event>>),
    /// The partition's changelog holds a state this build cannot read (why): the shard
    /// refuses to start (see `changelog::UnreadableState`).
    Refused(Arc<str>),
    /// A query; an entity never seen is answered from the default state (no actor created).
    /// A refused shard answers why it cannot.
    Query {
        id: EntityId,
        query: E::Query,
        reply: RpcReplyPort<Result<E::Reply, Arc<str>>>,
    },
    /// A command to run here without a record (`commands::direct`), or to decline.
    Command(Box<DirectCommand>),
    EntityCounts(RpcReplyPort<EntityCounts>),
    /// Answer once every batch dispatched before it has run. The shard is being handed off:
    /// from now on it declines direct commands (their callers write them as records, for the
    /// partition's next owner).
    Drain(RpcReplyPort<()>),
    Checkpoint(RpcReplyPort<Checkpoint<E::State>>),
    /// The checkpoint with this sequence number was committed.
    Checkpointed {
        seq: u64,
    },
    /// Passivate idle entities.
    Tick,
    /// Fire the timers that are due.
    Timers,
}

impl<E: Entity> ractor::Message for ShardMsg<E> {}
