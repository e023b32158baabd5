//! The shard actor: one per partition this node consumes (shard id == partition).
//!
//! Lifecycle: it starts *restoring* until the restorer delivers the partition's changelog;
//! events and queries that arrive meanwhile wait in the shard. Then it hands each batch of
//! consumed events to its entities grouped by id (one message per entity per batch, in
//! partition order) and tracks which offsets are acknowledged ([`acks`]). For each checkpoint (a
//! Kafka transaction run by the consumer) it gives the committable offset, the states changed
//! since the last committed checkpoint and the records to write besides ([`outbox`]).
//!
//! It keeps the state of every entity of the partition, so idle entity actors can be
//! passivated ([`passivation`]) and re-activated with their state, and the number of live
//! actors on the node stays under a cap.

mod acks;
mod entity_actor;
mod messages;
mod outbox;
mod passivation;

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::backpressure::InFlightGate;
use crate::entity::{Entity, EntityId, EntityMap, Stored};
use crate::readiness::GroupReadiness;
use crate::stats::NodeStats;
use acks::Acks;
use entity_actor::{EntityActor, EntityArgs, EntityMsg};
use outbox::Outbox;

pub(crate) use messages::{
    Checkpoint, ConsumedRecord, EntityCounts, Outgoing, RecordContent, Reroute, ShardMsg,
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
    /// Live entity actors on the node (all types), and the cap on them.
    pub live_entities: Arc<AtomicUsize>,
    pub max_live_entities: usize,
    /// An entity with nothing in flight for this long is passivated.
    pub passivate_after: Duration,
    /// Counts the shards still restoring (a node is not ready while any is).
    pub readiness: Arc<GroupReadiness>,
}

pub(crate) struct ShardActor<E>(PhantomData<fn() -> E>);

impl<E> ShardActor<E> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

pub(crate) struct ShardArgs {
    pub shard: u32,
    pub env: Arc<ShardEnv>,
}

struct LiveEntity<E: Entity> {
    actor: ActorRef<EntityMsg<E>>,
    last_active: Instant,
    in_flight: usize,
}

type PendingQuery<E> = (
    EntityId,
    <E as Entity>::Query,
    RpcReplyPort<<E as Entity>::Reply>,
);

/// What arrives while the shard waits for its changelog: served once it is restored.
struct WaitingForRestore<E: Entity> {
    batches: Vec<Vec<ConsumedRecord<E::Event>>>,
    queries: Vec<PendingQuery<E>>,
}

pub(crate) struct ShardState<E: Entity> {
    shard: u32,
    env: Arc<ShardEnv>,
    /// Until the changelog is restored: batches and queries that arrived meanwhile.
    restoring: Option<WaitingForRestore<E>>,
    /// Latest acknowledged state of every entity of the partition.
    known: EntityMap<Stored<E::State>>,
    live: EntityMap<LiveEntity<E>>,
    acks: Acks,
    drain_waiters: Vec<RpcReplyPort<()>>,
    outbox: Outbox<Outgoing>,
}

impl<E: Entity> ShardState<E> {
    /// Moves the committable offset past the acknowledged prefix; answers drains when empty.
    fn advance(&mut self, acknowledged: usize) {
        self.acks.advance();
        self.env.gate.release(acknowledged);
        if self.acks.is_drained() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// The entity's actor, activated (from its stored state, if any) when not live.
    async fn activate(
        &mut self,
        myself: &ActorRef<ShardMsg<E>>,
        id: &EntityId,
    ) -> Result<ActorRef<EntityMsg<E>>, ActorProcessingErr> {
        if let Some(live) = self.live.get_mut(id) {
            live.last_active = Instant::now();
            return Ok(live.actor.clone());
        }
        let args = EntityArgs {
            id: id.clone(),
            shard: myself.clone(),
            stored: self.known.get(id).cloned().unwrap_or_default(),
        };
        let (actor, _) =
            Actor::spawn_linked(None, EntityActor::<E>::new(), args, myself.get_cell()).await?;
        self.live.insert(
            id.clone(),
            LiveEntity {
                actor: actor.clone(),
                last_active: Instant::now(),
                in_flight: 0,
            },
        );
        let live_now = self.env.live_entities.fetch_add(1, Ordering::Relaxed) + 1;
        if live_now > self.env.max_live_entities {
            // The cap is soft: only idle entities other than this one can make room.
            let activated = id.clone();
            self.passivate(
                |other, _| *other != activated,
                live_now - self.env.max_live_entities,
            );
        }
        Ok(actor)
    }

    /// Stops up to `limit` idle entities (nothing in flight) matching `eligible`, oldest first.
    /// Their state stays in `known`.
    fn passivate(&mut self, eligible: impl Fn(&EntityId, Instant) -> bool, limit: usize) {
        let chosen = passivation::oldest_idle(
            self.live
                .iter()
                .map(|(id, e)| (id, e.last_active, e.in_flight)),
            eligible,
            limit,
        );
        for id in chosen {
            self.passivate_entity(&id);
        }
    }

    /// Stops one entity actor; its state stays in `known`.
    fn passivate_entity(&mut self, id: &EntityId) {
        if let Some(entity) = self.live.remove(id) {
            entity.actor.stop(Some("passivated".into()));
            self.env.live_entities.fetch_sub(1, Ordering::Relaxed);
            NodeStats::add(&self.env.stats.entities_passivated, 1);
        }
    }

    async fn dispatch(
        &mut self,
        myself: &ActorRef<ShardMsg<E>>,
        batch: Vec<ConsumedRecord<E::Event>>,
    ) -> Result<(), ActorProcessingErr> {
        let mut by_entity: EntityMap<Vec<(i64, E::Event)>> = EntityMap::default();
        let mut settled = 0usize;
        for record in batch {
            match record.content {
                RecordContent::Event(id, event) => {
                    self.acks.dispatched(record.offset);
                    by_entity
                        .entry(id)
                        .or_default()
                        .push((record.offset, event));
                }
                RecordContent::Reroute(reroute) => {
                    // Settled once the checkpoint that commits past it also writes it to its shard.
                    self.acks.settled(record.offset);
                    settled += 1;
                    NodeStats::add(&self.env.stats.events_forwarded_out, 1);
                    tracing::debug!(
                        "event {}/{} belongs to shard {}: re-routing it to that partition",
                        self.shard,
                        record.offset,
                        reroute.target_partition
                    );
                    self.outbox.push(Outgoing::Reroute(reroute));
                }
                RecordContent::DeadLetter(letter) => {
                    // Settled once the checkpoint that commits past it also writes the letter.
                    self.acks.settled(record.offset);
                    settled += 1;
                    self.outbox.push(Outgoing::DeadLetter(letter));
                }
            }
        }
        for (id, events) in by_entity {
            let count = events.len();
            let entity = self.activate(myself, &id).await?;
            if let Some(live) = self.live.get_mut(&id) {
                live.in_flight += count;
            }
            entity.cast(EntityMsg::Apply(events))?;
        }
        if settled > 0 {
            self.advance(settled);
        }
        Ok(())
    }

    async fn query(
        &mut self,
        myself: &ActorRef<ShardMsg<E>>,
        id: EntityId,
        query: E::Query,
        reply: RpcReplyPort<E::Reply>,
    ) -> Result<(), ActorProcessingErr> {
        if !self.live.contains_key(&id) && !self.known.contains_key(&id) {
            let _ = reply.send(E::query(&E::State::default(), &query));
            return Ok(());
        }
        let entity = self.activate(myself, &id).await?;
        entity.cast(EntityMsg::Query(query, reply))?;
        Ok(())
    }

    fn checkpoint(&mut self) -> Checkpoint<E::State> {
        let (seq, changed, outgoing) = self.outbox.checkpoint();
        Checkpoint {
            partition: self.shard,
            seq,
            commit_offset: self.acks.committable(),
            states: changed
                .into_iter()
                .filter_map(|id| self.known.get(&id).cloned().map(|s| (id, s)))
                .collect(),
            outgoing,
        }
    }
}

impl<E: Entity> Actor for ShardActor<E> {
    type Msg = ShardMsg<E>;
    type State = ShardState<E>;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ShardArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let tick = (args.env.passivate_after / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        myself.send_interval(tick, || ShardMsg::Tick);
        args.env.readiness.shard_restoring();
        Ok(ShardState {
            shard: args.shard,
            env: args.env,
            restoring: Some(WaitingForRestore {
                batches: Vec::new(),
                queries: Vec::new(),
            }),
            known: EntityMap::default(),
            live: EntityMap::default(),
            acks: Acks::default(),
            drain_waiters: Vec::new(),
            outbox: Outbox::default(),
        })
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: ractor::SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A failed entity must not take the shard down; its acknowledged state is in `known`
        // and it is re-activated on the next event or query.
        if let ractor::SupervisionEvent::ActorFailed(cell, error) = event {
            tracing::error!("an entity of shard {} failed: {error}", state.shard);
            let id = cell.get_id();
            let before = state.live.len();
            state.live.retain(|_, e| e.actor.get_id() != id);
            state
                .env
                .live_entities
                .fetch_sub(before - state.live.len(), Ordering::Relaxed);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Entities are linked children and stop with the shard.
        state
            .env
            .live_entities
            .fetch_sub(state.live.len(), Ordering::Relaxed);
        // Whatever is still pending will be re-read by the partition's next owner.
        let buffered: usize = state
            .restoring
            .as_ref()
            .map_or(0, |w| w.batches.iter().map(Vec::len).sum());
        state
            .env
            .gate
            .release(state.acks.unacknowledged() + buffered);
        if state.restoring.is_some() {
            state.env.readiness.shard_restored();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A returned error would stop the shard and strand its partition; log it instead. The
        // events it concerns stay unacknowledged, so they are never committed as done.
        if let Err(e) = state.handle(&myself, msg).await {
            tracing::error!("shard {}: {e}", state.shard);
        }
        Ok(())
    }
}

impl<E: Entity> ShardState<E> {
    async fn handle(
        &mut self,
        myself: &ActorRef<ShardMsg<E>>,
        msg: ShardMsg<E>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Restored(known) => {
                let Some(WaitingForRestore { batches, queries }) = self.restoring.take() else {
                    return Ok(());
                };
                self.env.readiness.shard_restored();
                NodeStats::add(&self.env.stats.entities_restored, known.len() as u64);
                self.known = known;
                for batch in batches {
                    self.dispatch(myself, batch).await?;
                }
                for (id, query, reply) in queries {
                    self.query(myself, id, query, reply).await?;
                }
            }
            ShardMsg::Consumed(batch) => match &mut self.restoring {
                Some(waiting) => waiting.batches.push(batch),
                None => self.dispatch(myself, batch).await?,
            },
            ShardMsg::Applied {
                id,
                offsets,
                replays,
                stored,
            } => {
                NodeStats::add(
                    &self.env.stats.events_processed_local,
                    offsets.len() as u64 - replays,
                );
                NodeStats::add(&self.env.stats.events_skipped_replayed, replays);
                let now_idle = self.live.get_mut(&id).is_some_and(|live| {
                    live.in_flight = live.in_flight.saturating_sub(offsets.len());
                    live.last_active = Instant::now();
                    live.in_flight == 0
                });
                // Over the cap, an entity is passivated as soon as it is idle. Waiting for the
                // activating shard to find idle entities does not work in a backlog: that
                // shard's own entities are all in flight (their acknowledgements queue behind
                // its batches) while the idle ones belong to other shards; the live count then
                // overshot the cap by the whole backlog (measured: docs/BENCHMARKS.md).
                if now_idle
                    && self.env.live_entities.load(Ordering::Relaxed) > self.env.max_live_entities
                {
                    self.passivate_entity(&id);
                }
                self.outbox.changed(&id);
                self.known.insert(id, stored);
                let acknowledged: usize = offsets.iter().map(|o| self.acks.acknowledge(*o)).sum();
                self.advance(acknowledged);
            }
            ShardMsg::Query { id, query, reply } => match &mut self.restoring {
                Some(waiting) => waiting.queries.push((id, query, reply)),
                None => self.query(myself, id, query, reply).await?,
            },
            ShardMsg::EntityCounts(reply) => {
                let _ = reply.send(EntityCounts {
                    live: self.live.len(),
                    known: self.known.len(),
                    processed_offset: self.acks.committable(),
                });
            }
            ShardMsg::Drain(reply) => {
                if self.acks.is_drained() && self.restoring.is_none() {
                    let _ = reply.send(());
                } else {
                    self.drain_waiters.push(reply);
                }
            }
            ShardMsg::Checkpoint(reply) => {
                let _ = reply.send(self.checkpoint());
            }
            ShardMsg::Checkpointed { seq } => self.outbox.committed(seq),
            ShardMsg::Tick => {
                let idle_for = self.env.passivate_after;
                self.passivate(
                    |_, last_active| last_active.elapsed() >= idle_for,
                    usize::MAX,
                );
                // A burst can exceed the cap (entities with events in flight are never
                // evicted); bring it back down once they are idle.
                let excess = self
                    .env
                    .live_entities
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.env.max_live_entities);
                if excess > 0 {
                    self.passivate(|_, _| true, excess);
                }
            }
        }
        Ok(())
    }
}
