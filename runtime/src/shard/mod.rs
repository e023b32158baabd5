//! Shards: one per partition this node consumes (shard id == partition), each a ractor actor
//! ([`actor`]) that holds its partition's entities as cells and runs their events itself.
//!
//! - [`actor`]: the shard's lifecycle (restoring, live, handed off), its entities' events and
//!   queries, passivation, its checkpoint contribution;
//! - [`live`]: which entities are live, least recently active first;
//! - [`outbox`]: what a checkpoint still has to write;
//! - [`timer_index`]: the shard's earliest pending timers;
//! - [`messages`]: what the shard receives and hands out.
//!
//! This file: the handles the rest of the node reaches a type's shards with.

mod actor;
mod live;
mod messages;
mod outbox;
mod timer_index;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ractor::ActorRef;

use crate::backpressure::InFlightGate;
use crate::commands::PendingCommands;
use crate::commit_soon::CommitSoon;
use crate::effects::Destinations;
use crate::entity::Entity;
use crate::readiness::GroupReadiness;
use crate::stats::NodeStats;

pub(crate) use actor::{ShardActor, ShardArgs};
pub(crate) use messages::{
    Checkpoint, ConsumedRecord, EntityCounts, OutRecord, Outgoing, RecordContent, Reroute, ShardMsg,
};

/// What the node keeps about one local shard.
pub(crate) struct LocalShard<E: Entity> {
    pub actor: ActorRef<ShardMsg<E>>,
}

impl<E: Entity> Clone for LocalShard<E> {
    fn clone(&self) -> Self {
        Self {
            actor: self.actor.clone(),
        }
    }
}

/// The shards of one entity type hosted on this node, by shard id.
pub(crate) struct LocalShards<E: Entity> {
    shards: DashMap<u32, LocalShard<E>>,
}

impl<E: Entity> Default for LocalShards<E> {
    fn default() -> Self {
        Self {
            shards: DashMap::new(),
        }
    }
}

impl<E: Entity> LocalShards<E> {
    pub fn get(&self, shard: u32) -> Option<LocalShard<E>> {
        self.shards.get(&shard).map(|s| s.value().clone())
    }
    pub fn insert(&self, shard: u32, handle: LocalShard<E>) {
        self.shards.insert(shard, handle);
    }
    pub fn remove(&self, shard: u32) -> Option<LocalShard<E>> {
        self.shards.remove(&shard).map(|(_, s)| s)
    }
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.shards.iter().map(|e| *e.key()).collect();
        ids.sort_unstable();
        ids
    }
}

/// The local shards of some entity type, as the management endpoints see them.
pub(crate) trait HostedShards: Send + Sync {
    /// Shard ids hosted here, in order.
    fn ids(&self) -> Vec<u32>;
    /// Entity counts of every local shard. A shard being handed off may not answer; it is
    /// still listed, with zeros.
    fn entity_counts(&self) -> futures::future::BoxFuture<'_, Vec<(u32, EntityCounts)>>;
}

impl<E: Entity> HostedShards for LocalShards<E> {
    fn ids(&self) -> Vec<u32> {
        LocalShards::ids(self)
    }

    fn entity_counts(&self) -> futures::future::BoxFuture<'_, Vec<(u32, EntityCounts)>> {
        let shards: Vec<_> = self
            .ids()
            .into_iter()
            .filter_map(|id| self.get(id).map(|s| (id, s)))
            .collect();
        Box::pin(futures::future::join_all(shards.into_iter().map(
            |(id, handle)| async move {
                match handle
                    .actor
                    .call(ShardMsg::EntityCounts, Some(Duration::from_secs(2)))
                    .await
                {
                    Ok(ractor::rpc::CallResult::Success(counts)) => (id, counts),
                    _ => (id, EntityCounts::default()),
                }
            },
        )))
    }
}

/// Services and limits the shards of one entity type use.
pub(crate) struct ShardEnv {
    pub gate: Arc<InFlightGate>,
    pub stats: Arc<NodeStats>,
    /// Live entities on the node (all types), and the cap on them.
    pub live_entities: Arc<AtomicUsize>,
    pub max_live_entities: usize,
    /// An entity inactive for this long is passivated.
    pub passivate_after: Duration,
    /// Counts the shards still restoring (a node is not ready while any is).
    pub readiness: Arc<GroupReadiness>,
    /// The type's input topic (named in dead letters the shards write).
    pub input_topic: String,
    /// Where committed command answers go (see `commands`).
    pub commands: Arc<PendingCommands>,
    /// Where messages to each hosted type go.
    pub destinations: Arc<Destinations>,
    /// Set when a shard owes answers, has messages or emitted records to write or fired
    /// timers: the consumer starts a checkpoint at once instead of at the next interval, so
    /// they wait for one commit, not for the interval.
    pub commit_soon: Arc<CommitSoon>,
    /// States changed since the consumer last started a checkpoint, as the shards report them
    /// after each batch: a backlog of them starts the next checkpoint without waiting for the
    /// interval (see `consumer::BACKLOG_STATES`).
    pub changed_states: Arc<AtomicUsize>,
}
