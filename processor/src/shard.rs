//! The shard actor: one per partition this node consumes (shard id == partition).
//!
//! Lifecycle: it starts *restoring* until the restorer delivers the partition's changelog;
//! events and queries that arrive meanwhile wait in the shard. Then it
//! hands each batch of consumed events to its entities grouped by user (one message per user
//! per batch, in partition order) and tracks which offsets are acknowledged; only the contiguous
//! acknowledged prefix is committable. For each checkpoint (a Kafka transaction run by the
//! consumer) it gives the committable offset, the states changed since the last successful
//! checkpoint, and the events to re-route, and forgets them once the transaction committed.
//!
//! It keeps the compact state of every user of the partition, so idle entity actors can be
//! passivated (stopped) and re-activated with their totals, and the number of live actors on
//! the node stays under a cap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use crate::backpressure::InFlightGate;
use crate::dlq::DeadLetter;
use crate::entity::{EntityArgs, EntityMsg, EntityState, Totals, UserEntity, UserId, UserMap};
use crate::event::Purchase;
use crate::readiness::Readiness;
use crate::stats::NodeStats;

/// One record read from this shard's partition.
pub struct ConsumedRecord {
    pub offset: i64,
    pub content: RecordContent,
}

pub enum RecordContent {
    Event(Purchase),
    /// Malformed: nothing to apply; it goes to the dead-letter topic with the checkpoint that
    /// commits past it.
    DeadLetter(Box<DeadLetter>),
}

/// An event read from this partition whose key belongs to another shard: it is written to its
/// key's partition inside the checkpoint transaction that commits past it, so the owner
/// consumes it exactly once.
#[derive(Debug, Clone)]
pub struct Reroute {
    pub source_offset: i64,
    pub target_partition: u32,
    pub purchase: Purchase,
}

/// A record a checkpoint writes besides states and offsets, in the same transaction.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Reroute(Reroute),
    DeadLetter(Box<DeadLetter>),
}

/// What a shard contributes to one checkpoint transaction.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub partition: u32,
    /// Sequence number to confirm with [`ShardMsg::Checkpointed`] once committed.
    pub seq: u64,
    /// Next offset to commit; `None` if nothing was acknowledged yet.
    pub commit_offset: Option<i64>,
    pub states: Vec<(UserId, EntityState)>,
    pub outgoing: Vec<Outgoing>,
}

impl Checkpoint {
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.outgoing.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntityCounts {
    /// Live entity actors.
    pub live: usize,
    /// Users with state in this shard (live or passivated).
    pub known: usize,
    /// Next offset after the events applied so far without a gap (what the next checkpoint
    /// commits); `None` before the first event. Its movement is the shard's progress.
    pub processed_offset: Option<i64>,
}

#[derive(RactorMessage)]
pub enum ShardMsg {
    /// The partition's changelog, read to its end: the shard may start.
    Restored(UserMap<EntityState>),
    /// A batch read from the partition, in offset order.
    Consumed(Vec<ConsumedRecord>),
    /// An entity applied these offsets (`replays` of them were already in its state).
    Applied {
        user_id: UserId,
        offsets: Vec<i64>,
        replays: u64,
        state: EntityState,
    },
    /// A user's totals; zeros (and no entity created) for a user never seen.
    Query {
        user_id: UserId,
        reply: RpcReplyPort<Totals>,
    },
    EntityCounts(RpcReplyPort<EntityCounts>),
    /// Answer once every dispatched event is acknowledged.
    Drain(RpcReplyPort<()>),
    Checkpoint(RpcReplyPort<Checkpoint>),
    /// The checkpoint with this sequence number was committed.
    Checkpointed {
        seq: u64,
    },
    /// Passivate idle entities.
    Tick,
}

/// What the node keeps about one local shard.
#[derive(Clone)]
pub struct LocalShard {
    pub actor: ActorRef<ShardMsg>,
}

/// The shards hosted on this node, by shard id.
#[derive(Default)]
pub struct LocalShards {
    shards: DashMap<u32, LocalShard>,
}

impl LocalShards {
    pub fn get(&self, shard: u32) -> Option<LocalShard> {
        self.shards.get(&shard).map(|s| s.value().clone())
    }
    pub fn insert(&self, shard: u32, handle: LocalShard) {
        self.shards.insert(shard, handle);
    }
    pub fn remove(&self, shard: u32) -> Option<LocalShard> {
        self.shards.remove(&shard).map(|(_, s)| s)
    }
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.shards.iter().map(|e| *e.key()).collect();
        ids.sort_unstable();
        ids
    }
}

/// Node-wide services and limits a shard uses.
pub struct ShardEnv {
    pub partitions: u32,
    pub gate: Arc<InFlightGate>,
    pub stats: Arc<NodeStats>,
    /// Live entity actors on the node, and the cap on them.
    pub live_entities: AtomicUsize,
    pub max_live_entities: usize,
    /// An entity with nothing in flight for this long is passivated.
    pub passivate_after: Duration,
    /// Counts the shards still restoring (a node is not ready while any is).
    pub readiness: Arc<Readiness>,
}

pub struct ShardActor;

pub struct ShardArgs {
    pub shard: u32,
    pub env: Arc<ShardEnv>,
}

struct LiveEntity {
    actor: ActorRef<EntityMsg>,
    last_active: Instant,
    in_flight: usize,
}

/// What arrives while the shard waits for its changelog: served once it is restored.
#[derive(Default)]
struct WaitingForRestore {
    batches: Vec<Vec<ConsumedRecord>>,
    queries: Vec<(UserId, RpcReplyPort<Totals>)>,
}

pub struct ShardState {
    shard: u32,
    env: Arc<ShardEnv>,
    /// Until the changelog is restored: batches and queries that arrived meanwhile.
    restoring: Option<WaitingForRestore>,
    /// Latest acknowledged state of every user of the partition.
    known: UserMap<EntityState>,
    live: UserMap<LiveEntity>,
    /// Dispatched offsets in order, with whether each is acknowledged.
    pending: VecDeque<(i64, bool)>,
    /// Next offset to commit: after the last contiguous acknowledged event.
    committable: Option<i64>,
    drain_waiters: Vec<RpcReplyPort<()>>,
    /// Checkpoints handed out so far; `dirty` and `outbox` entries carry the first checkpoint
    /// that may include them and stay until a checkpoint at or after it is confirmed.
    checkpoint_seq: u64,
    dirty: UserMap<u64>,
    outbox: Vec<(u64, Outgoing)>,
}

impl ShardState {
    fn mark_acknowledged(&mut self, offset: i64) -> usize {
        match self.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) if !self.pending[i].1 => {
                self.pending[i].1 = true;
                1
            }
            _ => 0,
        }
    }

    /// Moves the committable offset past the acknowledged prefix; answers drains when empty.
    fn advance(&mut self, acknowledged: usize) {
        let mut last = None;
        while let Some((offset, true)) = self.pending.front().copied() {
            last = Some(offset);
            self.pending.pop_front();
        }
        if let Some(offset) = last {
            self.committable = Some(offset + 1);
        }
        self.env.gate.release(acknowledged);
        if self.pending.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// The user's entity actor, activated (from its stored state, if any) when not live.
    async fn activate(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        user_id: &UserId,
    ) -> Result<ActorRef<EntityMsg>, ActorProcessingErr> {
        if let Some(live) = self.live.get_mut(user_id) {
            live.last_active = Instant::now();
            return Ok(live.actor.clone());
        }
        let state = self.known.get(user_id).copied().unwrap_or_default();
        let args = EntityArgs {
            user_id: user_id.clone(),
            shard: myself.clone(),
            state,
        };
        let (actor, _) = Actor::spawn_linked(None, UserEntity, args, myself.get_cell()).await?;
        self.live.insert(
            user_id.clone(),
            LiveEntity {
                actor: actor.clone(),
                last_active: Instant::now(),
                in_flight: 0,
            },
        );
        let live_now = self.env.live_entities.fetch_add(1, Ordering::Relaxed) + 1;
        if live_now > self.env.max_live_entities {
            // The cap is soft: only idle entities other than this one can make room.
            let activated = user_id.clone();
            self.passivate(
                |user, _| *user != activated,
                live_now - self.env.max_live_entities,
            );
        }
        Ok(actor)
    }

    /// Stops up to `limit` idle entities (nothing in flight) matching `eligible`, oldest first.
    /// Their state stays in `known`.
    fn passivate(&mut self, eligible: impl Fn(&UserId, &LiveEntity) -> bool, limit: usize) {
        let mut idle: Vec<(Instant, UserId)> = self
            .live
            .iter()
            .filter(|(u, e)| e.in_flight == 0 && eligible(u, e))
            .map(|(u, e)| (e.last_active, u.clone()))
            .collect();
        if idle.is_empty() {
            return;
        }
        idle.sort_unstable();
        for (_, user) in idle.into_iter().take(limit) {
            self.passivate_entity(&user);
        }
    }

    /// Stops one entity actor; its state stays in `known`.
    fn passivate_entity(&mut self, user_id: &UserId) {
        if let Some(entity) = self.live.remove(user_id) {
            entity.actor.stop(Some("passivated".into()));
            self.env.live_entities.fetch_sub(1, Ordering::Relaxed);
            NodeStats::add(&self.env.stats.entities_passivated, 1);
        }
    }

    async fn dispatch(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        batch: Vec<ConsumedRecord>,
    ) -> Result<(), ActorProcessingErr> {
        let mut by_user: UserMap<Vec<(i64, Purchase)>> = UserMap::default();
        let mut settled = 0usize;
        for record in batch {
            let purchase = match record.content {
                RecordContent::Event(purchase) => purchase,
                RecordContent::DeadLetter(letter) => {
                    // Settled once the checkpoint that commits past it also writes the letter.
                    self.pending.push_back((record.offset, true));
                    settled += 1;
                    self.outbox
                        .push((self.checkpoint_seq + 1, Outgoing::DeadLetter(letter)));
                    continue;
                }
            };
            let shard = proto::partitioner::partition_for_key(
                purchase.user_id.as_bytes(),
                self.env.partitions,
            );
            if shard == self.shard {
                self.pending.push_back((record.offset, false));
                tracing::debug!(
                    "Forwarding message for entity {} to shard {shard}",
                    purchase.user_id
                );
                by_user
                    .entry(purchase.user_id.clone())
                    .or_default()
                    .push((record.offset, purchase));
            } else {
                // Settled once the checkpoint that commits past it also writes it to its shard.
                self.pending.push_back((record.offset, true));
                settled += 1;
                NodeStats::add(&self.env.stats.events_forwarded_out, 1);
                tracing::debug!(
                    "event {}/{} is for user {} of shard {shard}: re-routing it to that partition",
                    self.shard,
                    record.offset,
                    purchase.user_id
                );
                let reroute = Reroute {
                    source_offset: record.offset,
                    target_partition: shard,
                    purchase,
                };
                self.outbox
                    .push((self.checkpoint_seq + 1, Outgoing::Reroute(reroute)));
            }
        }
        for (user_id, events) in by_user {
            let count = events.len();
            let entity = self.activate(myself, &user_id).await?;
            if let Some(live) = self.live.get_mut(&user_id) {
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
        myself: &ActorRef<ShardMsg>,
        user_id: UserId,
        reply: RpcReplyPort<Totals>,
    ) -> Result<(), ActorProcessingErr> {
        if !self.live.contains_key(&user_id) && !self.known.contains_key(&user_id) {
            let _ = reply.send(Totals::default());
            return Ok(());
        }
        let entity = self.activate(myself, &user_id).await?;
        entity.cast(EntityMsg::Get(reply))?;
        Ok(())
    }

    fn checkpoint(&mut self) -> Checkpoint {
        self.checkpoint_seq += 1;
        Checkpoint {
            partition: self.shard,
            seq: self.checkpoint_seq,
            commit_offset: self.committable,
            states: self
                .dirty
                .keys()
                .filter_map(|u| self.known.get(u).map(|s| (u.clone(), *s)))
                .collect(),
            outgoing: self.outbox.iter().map(|(_, r)| r.clone()).collect(),
        }
    }

    fn checkpointed(&mut self, seq: u64) {
        self.dirty.retain(|_, first| *first > seq);
        self.outbox.retain(|(first, _)| *first > seq);
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
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
            restoring: Some(WaitingForRestore::default()),
            known: UserMap::default(),
            live: UserMap::default(),
            pending: VecDeque::new(),
            committable: None,
            drain_waiters: Vec::new(),
            checkpoint_seq: 0,
            dirty: UserMap::default(),
            outbox: Vec::new(),
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
        let unacknowledged = state.pending.iter().filter(|(_, done)| !done).count();
        let buffered: usize = state
            .restoring
            .as_ref()
            .map_or(0, |w| w.batches.iter().map(Vec::len).sum());
        state.env.gate.release(unacknowledged + buffered);
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

impl ShardState {
    async fn handle(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        msg: ShardMsg,
    ) -> Result<(), ActorProcessingErr> {
        let state = self;
        let myself = myself.clone();
        match msg {
            ShardMsg::Restored(known) => {
                let Some(WaitingForRestore { batches, queries }) = state.restoring.take() else {
                    return Ok(());
                };
                state.env.readiness.shard_restored();
                NodeStats::add(&state.env.stats.entities_restored, known.len() as u64);
                state.known = known;
                for batch in batches {
                    state.dispatch(&myself, batch).await?;
                }
                for (user_id, reply) in queries {
                    state.query(&myself, user_id, reply).await?;
                }
            }
            ShardMsg::Consumed(batch) => match &mut state.restoring {
                Some(waiting) => waiting.batches.push(batch),
                None => state.dispatch(&myself, batch).await?,
            },
            ShardMsg::Applied {
                user_id,
                offsets,
                replays,
                state: entity_state,
            } => {
                NodeStats::add(
                    &state.env.stats.events_processed_local,
                    offsets.len() as u64 - replays,
                );
                NodeStats::add(&state.env.stats.events_skipped_replayed, replays);
                let now_idle = state.live.get_mut(&user_id).is_some_and(|live| {
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
                    && state.env.live_entities.load(Ordering::Relaxed) > state.env.max_live_entities
                {
                    state.passivate_entity(&user_id);
                }
                let seq = state.checkpoint_seq + 1;
                state.dirty.insert(user_id.clone(), seq);
                state.known.insert(user_id, entity_state);
                let acknowledged: usize = offsets.iter().map(|o| state.mark_acknowledged(*o)).sum();
                state.advance(acknowledged);
            }
            ShardMsg::Query { user_id, reply } => match &mut state.restoring {
                Some(waiting) => waiting.queries.push((user_id, reply)),
                None => state.query(&myself, user_id, reply).await?,
            },
            ShardMsg::EntityCounts(reply) => {
                let _ = reply.send(EntityCounts {
                    live: state.live.len(),
                    known: state.known.len(),
                    processed_offset: state.committable,
                });
            }
            ShardMsg::Drain(reply) => {
                if state.pending.is_empty() && state.restoring.is_none() {
                    let _ = reply.send(());
                } else {
                    state.drain_waiters.push(reply);
                }
            }
            ShardMsg::Checkpoint(reply) => {
                let _ = reply.send(state.checkpoint());
            }
            ShardMsg::Checkpointed { seq } => state.checkpointed(seq),
            ShardMsg::Tick => {
                let idle_for = state.env.passivate_after;
                state.passivate(|_, e| e.last_active.elapsed() >= idle_for, usize::MAX);
                // A burst can exceed the cap (entities with events in flight are never
                // evicted); bring it back down once they are idle.
                let excess = state
                    .env
                    .live_entities
                    .load(Ordering::Relaxed)
                    .saturating_sub(state.env.max_live_entities);
                if excess > 0 {
                    state.passivate(|_, _| true, excess);
                }
            }
        }
        Ok(())
    }
}
