//! The shard actor: one per partition this node consumes. Its entities are cells it holds (a
//! state each, in one map), not actors of their own: `apply` is pure and synchronous, so the
//! shard runs every event itself, in partition order, and answers queries from the same map.
//! That keeps what users rely on from an actor (one message at a time per entity, partition
//! order, passivation, a live cap) at the cost of a map entry per entity instead of a task, a
//! mailbox and a second copy of the state (docs/BENCHMARKS.md, "Lean entities").
//!
//! Lifecycle: it starts *restoring* until the restorer delivers the partition's changelog;
//! events and queries that arrive meanwhile wait in the shard. Then each batch is run as it
//! arrives, and the next offset after it becomes committable. For each checkpoint (a Kafka
//! transaction run by the consumer) it gives the committable offset, the states changed since
//! the last committed checkpoint and the records to write besides ([`super::outbox`]).
//!
//! This file holds the lifecycle (restore, refusal, hand-off), batches, queries and the live
//! cap; what an entity does besides folding its input has a file each: [`commands`] (run, reply
//! owed until its checkpoint commits), [`outputs`] (messages, emitted records and dead letters
//! into the outbox) and [`timers`] (kept in the states, indexed, fired with a checkpoint).

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::live::LiveSet;
use super::messages::{
    Checkpoint, ConsumedRecord, EntityCounts, Outgoing, RecordContent, ShardMsg,
};
use super::outbox::Outbox;
use super::timer_index::{TimerIndex, HELD_TIMERS};
use super::ShardEnv;
use crate::commands::failed;
use crate::effects::Effects;
use crate::entity::{Entity, EntityId, EntityMap, Stored};
use crate::stats::NodeStats;

mod commands;
mod outputs;
#[cfg(test)]
mod tests;
mod timers;

use commands::{CommandInput, Owed};

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

type PendingQuery<E> = (
    EntityId,
    <E as Entity>::Query,
    RpcReplyPort<Result<<E as Entity>::Reply, Arc<str>>>,
);

/// What arrives while the shard waits for its changelog: served once it is restored.
struct WaitingForRestore<E: Entity> {
    batches: Vec<Vec<ConsumedRecord<E::Event>>>,
    queries: Vec<PendingQuery<E>>,
    /// Drains asked meanwhile: answered once the batches above have run.
    drains: Vec<RpcReplyPort<()>>,
}

pub(crate) struct ShardState<E: Entity> {
    shard: u32,
    env: Arc<ShardEnv>,
    myself: ActorRef<ShardMsg<E>>,
    /// Until the changelog is restored: batches and queries that arrived meanwhile.
    restoring: Option<WaitingForRestore<E>>,
    /// Why the shard refused its changelog (a state this build cannot read): it then runs
    /// nothing (its batches are dropped uncommitted, and its partition paused by the consumer)
    /// and answers every query with this reason.
    refused: Option<Arc<str>>,
    /// The entities: every one's state, live or passivated. The only copy.
    states: EntityMap<Stored<E::State>>,
    live: LiveSet,
    /// Next offset to commit: after the last record run; `None` before the first.
    processed: Option<i64>,
    outbox: Outbox<Outgoing>,
    /// Command answers owed, each with the first checkpoint that may commit its change: sent
    /// once a checkpoint at or after it commits, never before.
    owed: Vec<(u64, Owed)>,
    /// The earliest pending timers of the shard's entities (the timers live in their states).
    timers: TimerIndex,
    /// When the next [`ShardMsg::Timers`] is due, if one is scheduled.
    wake_at: Option<i64>,
    /// Being handed off ([`ShardMsg::Drain`]): direct commands are declined.
    closing: bool,
}

/// What running one batch did, for the counters.
#[derive(Default)]
struct BatchOutcome {
    applied: u64,
    replays: u64,
    activated: usize,
}

impl<E: Entity> ShardState<E> {
    fn new(shard: u32, env: Arc<ShardEnv>, myself: ActorRef<ShardMsg<E>>) -> Self {
        Self {
            shard,
            env,
            myself,
            restoring: Some(WaitingForRestore {
                batches: Vec::new(),
                queries: Vec::new(),
                drains: Vec::new(),
            }),
            refused: None,
            states: EntityMap::default(),
            live: LiveSet::default(),
            processed: None,
            outbox: Outbox::default(),
            owed: Vec::new(),
            timers: TimerIndex::new(HELD_TIMERS),
            wake_at: None,
            closing: false,
        }
    }

    /// Runs a batch read from the partition, in offset order.
    fn run(&mut self, batch: Vec<ConsumedRecord<E::Event>>) {
        let count = batch.len();
        let now = Instant::now();
        let mut outcome = BatchOutcome::default();
        for record in batch {
            match record.content {
                RecordContent::Event(id, event) => {
                    let input = (record.offset, record.at_ms);
                    self.apply(input, id, &event, now, &mut outcome)
                }
                RecordContent::Command(id, Ok(command), meta) => {
                    let meta = *meta;
                    let input = CommandInput {
                        offset: Some(record.offset),
                        value: &[],
                        idempotency_key: meta.idempotency_key.clone(),
                        at_ms: meta.at_ms,
                        to: meta.into(),
                    };
                    self.command(input, id, &command, now, &mut outcome)
                }
                RecordContent::Command(id, Err(reason), meta) => {
                    let reason = format!("the command does not decode: {reason}");
                    self.dead_letter(&id, record.offset, reason.clone());
                    self.owe((*meta).into(), failed(reason));
                }
                RecordContent::Reroute(reroute) => {
                    // Done once the checkpoint that commits past it also writes it to its shard.
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
                    // Done once the checkpoint that commits past it also writes the letter.
                    self.outbox.push(Outgoing::DeadLetter(letter));
                }
            }
            self.processed = Some(record.offset + 1);
        }
        NodeStats::add(&self.env.stats.events_processed_local, outcome.applied);
        NodeStats::add(&self.env.stats.events_skipped_replayed, outcome.replays);
        self.activated(outcome.activated);
        self.report_changed();
        self.env.gate.release(count);
        self.arm_timers();
    }

    /// Tells the consumer how many states the outbox gained (see `ShardEnv::changed_states`).
    fn report_changed(&mut self) {
        let changed = self.outbox.take_newly_changed();
        if changed > 0 {
            self.env
                .changed_states
                .fetch_add(changed, Ordering::Relaxed);
        }
    }

    /// Applies one event (at its offset and time) to its entity (activating it) unless its
    /// state already includes it.
    fn apply(
        &mut self,
        (offset, at_ms): (i64, i64),
        id: EntityId,
        event: &E::Event,
        now: Instant,
        outcome: &mut BatchOutcome,
    ) {
        if self.live.touch(&id, now) {
            outcome.activated += 1;
        }
        let stored = self.states.entry(id.clone()).or_default();
        let mut effects = Effects::new(&id, self.shard, offset, at_ms, false);
        match catch_unwind(AssertUnwindSafe(|| {
            stored.apply::<E>(offset, event, &mut effects)
        })) {
            Ok(true) => {
                outcome.applied += 1;
                let outputs = effects.take_outputs();
                if !outputs.is_empty() {
                    self.send_outputs(&id, Ok(offset), outputs);
                }
            }
            Ok(false) => {
                outcome.replays += 1;
                return;
            }
            Err(panic) => {
                // A bug in the entity, met again on every replay: the event goes to the dead-letter
                // topic with the panic's message and counts as done (as Kafka Streams' processing
                // exception handler's CONTINUE does). Whatever `apply` changed before panicking
                // stays: Rust unwinding rolls nothing back, and a copy of every state before every
                // event is what this design avoids.
                stored.last_offset = offset;
                let reason = format!(
                    "the entity's apply panicked: {}; the record is still in the input topic at this offset",
                    panic_message(&*panic)
                );
                tracing::error!(
                    "entity {id} of shard {}: event at offset {offset} dead-lettered: {reason}",
                    self.shard
                );
                self.dead_letter(&id, offset, reason);
            }
        }
        self.outbox.changed(&id);
    }

    /// `count` entities became live. Over the node's cap, this shard makes room from its own least
    /// recently active entities (the cap is node-wide; each shard that activates brings it back
    /// down).
    fn activated(&mut self, count: usize) {
        if count > 0 {
            let live_now = self.env.live_entities.fetch_add(count, Ordering::Relaxed) + count;
            self.passivate_oldest(live_now.saturating_sub(self.env.max_live_entities));
        }
    }

    /// Passivates up to `limit` of this shard's live entities, least recently active first.
    fn passivate_oldest(&mut self, limit: usize) {
        if limit > 0 {
            let passivated = self.live.passivate_oldest(limit);
            self.passivated(passivated);
        }
    }

    fn passivated(&self, count: usize) {
        if count > 0 {
            self.env.live_entities.fetch_sub(count, Ordering::Relaxed);
            NodeStats::add(&self.env.stats.entities_passivated, count as u64);
        }
    }

    fn query(
        &mut self,
        id: EntityId,
        query: E::Query,
        reply: RpcReplyPort<Result<E::Reply, Arc<str>>>,
    ) {
        if let Some(why) = &self.refused {
            let _ = reply.send(Err(why.clone()));
            return;
        }
        let answer = match self.states.get(&id) {
            Some(stored) => {
                let answer = E::query(&stored.state, &query);
                // A query re-activates a passivated entity, as its next event would.
                let became_live = self.live.touch(&id, Instant::now());
                self.activated(usize::from(became_live));
                answer
            }
            // An entity never seen: the default state, and nothing kept for it.
            None => E::query(&E::State::default(), &query),
        };
        let _ = reply.send(Ok(answer));
    }

    /// Stops the shard for good (on this node): its changelog holds a state this build cannot
    /// read, or one of its states does not encode for a checkpoint. What it holds is dropped
    /// uncommitted (the next owner, or the next run of a build that reads and writes its states,
    /// restores the last checkpoint and reads the input after it again); owed answers are
    /// never given (their callers time out: outcome unknown, and indeed uncommitted).
    fn refuse(&mut self, why: Arc<str>) {
        if self.refused.is_some() {
            return;
        }
        let waiting = self.restoring.take();
        if waiting.is_some() {
            self.env.readiness.shard_restored();
        }
        self.env.readiness.refuse(self.shard, &why);
        self.refused = Some(why);
        let forgotten = self.live.len();
        self.live = LiveSet::default();
        self.env
            .live_entities
            .fetch_sub(forgotten, Ordering::Relaxed);
        self.states = EntityMap::default();
        self.outbox = Outbox::default();
        self.owed.clear();
        self.timers = TimerIndex::new(HELD_TIMERS);
        self.processed = None;
        if let Some(waiting) = waiting {
            for batch in waiting.batches {
                self.drop_refused(batch);
            }
            for (id, query, reply) in waiting.queries {
                self.query(id, query, reply);
            }
            for reply in waiting.drains {
                let _ = reply.send(());
            }
        }
    }

    /// A batch for a refused shard: not run and not committed (whoever restores the shard
    /// later reads it again).
    fn drop_refused(&mut self, batch: Vec<ConsumedRecord<E::Event>>) {
        self.env.gate.release(batch.len());
    }

    fn checkpoint(&mut self) -> Checkpoint<E::State> {
        let (seq, changed, outgoing) = self.outbox.checkpoint();
        Checkpoint {
            partition: self.shard,
            seq,
            commit_offset: self.processed,
            states: changed
                .into_iter()
                .filter_map(|id| self.states.get(&id).cloned().map(|s| (id, s)))
                .collect(),
            outgoing,
        }
    }

    fn handle(&mut self, msg: ShardMsg<E>) {
        match msg {
            ShardMsg::Restored { states, timers } => {
                let Some(WaitingForRestore {
                    batches,
                    queries,
                    drains,
                }) = self.restoring.take()
                else {
                    return;
                };
                self.env.readiness.shard_restored();
                NodeStats::add(&self.env.stats.entities_restored, states.len() as u64);
                self.states = states;
                // The restored states' timers: overdue ones fire now, once each.
                if timers {
                    self.rebuild_timer_index();
                }
                self.wake_at = None;
                self.arm_timers();
                for batch in batches {
                    self.run(batch);
                }
                for (id, query, reply) in queries {
                    self.query(id, query, reply);
                }
                for reply in drains {
                    let _ = reply.send(());
                }
            }
            ShardMsg::Refused(why) => self.refuse(why),
            ShardMsg::Consumed(batch) => match &mut self.restoring {
                Some(waiting) => waiting.batches.push(batch),
                None if self.refused.is_some() => self.drop_refused(batch),
                None => self.run(batch),
            },
            ShardMsg::Query { id, query, reply } => match &mut self.restoring {
                Some(waiting) => waiting.queries.push((id, query, reply)),
                None => self.query(id, query, reply),
            },
            ShardMsg::Command(command) => self.direct_command(*command),
            ShardMsg::EntityCounts(reply) => {
                let _ = reply.send(EntityCounts {
                    live: self.live.len(),
                    known: self.states.len(),
                    processed_offset: self.processed,
                });
            }
            // Every batch is run when it arrives, so once this message's turn comes nothing
            // dispatched before it is pending, unless the shard is still restoring (then the
            // drain timeout bounds the wait).
            ShardMsg::Drain(reply) => {
                self.closing = true;
                match &mut self.restoring {
                    Some(waiting) => waiting.drains.push(reply),
                    None => {
                        let _ = reply.send(());
                    }
                }
            }
            ShardMsg::Checkpoint(reply) => {
                let _ = reply.send(self.checkpoint());
            }
            ShardMsg::Checkpointed { seq } => {
                self.outbox.committed(seq);
                self.answer_committed(seq);
            }
            ShardMsg::Timers => self.fire_due_timers(),
            ShardMsg::Tick => {
                let passivated = self
                    .live
                    .passivate_idle(self.env.passivate_after, Instant::now());
                self.passivated(passivated);
                // Another shard's activations can leave the node over its cap while this shard
                // holds the oldest entities; each tick brings it back down.
                let excess = self
                    .env
                    .live_entities
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.env.max_live_entities);
                self.passivate_oldest(excess);
            }
        }
    }
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
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
        Ok(ShardState::new(args.shard, args.env, myself))
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state
            .env
            .live_entities
            .fetch_sub(state.live.len(), Ordering::Relaxed);
        if state.refused.is_some() {
            state.env.readiness.forget_refusal(state.shard);
        }
        // Batches still waiting for the restore are re-read by the partition's next owner.
        if let Some(waiting) = &state.restoring {
            let buffered: usize = waiting.batches.iter().map(Vec::len).sum();
            state.env.gate.release(buffered);
            state.env.readiness.shard_restored();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.handle(msg);
        Ok(())
    }
}
