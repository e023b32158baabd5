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

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::live::LiveSet;
use super::messages::{
    Checkpoint, ConsumedRecord, EntityCounts, OutRecord, Outgoing, RecordContent, ShardMsg,
};
use super::outbox::Outbox;
use super::timer_index::{TimerIndex, HELD_TIMERS};
use super::ShardEnv;
use crate::cluster::wire::CommandOutcome;
use crate::commands::{failed, CommandMeta, Direct, DirectCommand};
use crate::dlq::DeadLetter;
use crate::effects::{Effects, Input, Output, HEADER_MESSAGE_FROM};
use crate::entity::{Entity, EntityId, EntityMap, Stored, MAX_ID_BYTES};
use crate::partitioner::partition_for_key;
use crate::stats::NodeStats;
use crate::timers::{PendingTimer, Target, HEADER_TIMER};

/// The most timers one round fires before the shard serves its other messages.
const FIRE_PER_ROUND: usize = 2_000;

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

/// A command's answer, for whoever waits for it.
struct Owed {
    to: AnswerTo,
    outcome: CommandOutcome,
}

enum AnswerTo {
    /// A command record's sender: the node its headers name, and its number for the command.
    Node { reply_to: String, request: u64 },
    /// A command run here without a record. Dropped unanswered when the shard stops before the
    /// change commits: its caller learns at once that the outcome is unknown.
    Here(tokio::sync::oneshot::Sender<Direct>),
}

impl From<CommandMeta> for AnswerTo {
    fn from(meta: CommandMeta) -> Self {
        Self::Node {
            reply_to: meta.reply_to,
            request: meta.request,
        }
    }
}

/// The command a shard runs: where it came from and who waits for its answer.
struct CommandInput<'v> {
    /// The record's offset; `None` for a command run without a record.
    offset: Option<i64>,
    /// A direct command's value (kept in a dead letter, since no record holds it).
    value: &'v [u8],
    idempotency_key: Option<String>,
    at_ms: i64,
    to: AnswerTo,
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

    /// Runs a command (unless its state already includes it) and owes its answer. A command
    /// whose idempotency key the entity remembers is answered as it was the first time and
    /// not run again.
    fn command(
        &mut self,
        input: CommandInput<'_>,
        id: EntityId,
        command: &E::Event,
        now: Instant,
        outcome: &mut BatchOutcome,
    ) {
        if self.live.touch(&id, now) {
            outcome.activated += 1;
        }
        let stored = self.states.entry(id.clone()).or_default();
        let remembered = input
            .idempotency_key
            .as_deref()
            .and_then(|key| stored.acting.as_ref()?.remembered.get(key));
        if let Some(answer) = remembered {
            let answer = answer.clone();
            outcome.replays += 1;
            match (input.offset, self.outbox.pending(&id)) {
                // A retry run without a record, of a command whose change (and remembered
                // answer) is committed: nothing to wait for, and no checkpoint would come for
                // it (a record's offset at least moves one).
                (None, None) => self.answer_now(input.to, answer),
                // Its answer is durable once the change that remembered it commits.
                (None, Some(first)) => self.owe_after(first, input.to, answer),
                (Some(_), _) => self.owe(input.to, answer),
            }
            return;
        }
        if input
            .offset
            .is_some_and(|offset| offset <= stored.last_offset)
        {
            // Already in the state (a replay): a command with a key was answered above; one
            // without gets no answer (its caller timed out long ago).
            outcome.replays += 1;
            return;
        }
        let origin = match input.offset {
            Some(offset) => Input::Record(self.shard, offset),
            None => Input::Direct(self.shard, fastrand::u64(..)),
        };
        let mut effects = Effects::<E>::of(&id, origin, input.at_ms, true);
        let ran = catch_unwind(AssertUnwindSafe(|| {
            E::handle(&mut stored.state, command, &mut effects)
        }));
        if let Some(offset) = input.offset {
            stored.last_offset = offset;
        }
        let source = input.offset.ok_or(input.value);
        let answer = match ran {
            Ok(()) => {
                outcome.applied += 1;
                let outputs = effects.take_outputs();
                if !outputs.is_empty() {
                    self.send_outputs(&id, source, outputs);
                }
                effects.into_outcome()
            }
            Err(panic) => {
                let reason = format!(
                    "the entity's handle panicked: {}{}",
                    panic_message(&*panic),
                    match input.offset {
                        Some(_) => "; the record is still in the input topic at this offset",
                        None => " (a command run without a record: its value is this letter's)",
                    }
                );
                tracing::error!(
                    "entity {id} of shard {}: command {} dead-lettered: {reason}",
                    self.shard,
                    describe(source)
                );
                self.dead_letter_input(&id, source, reason.clone());
                failed(reason)
            }
        };
        if let Some(key) = input.idempotency_key {
            let stored = self
                .states
                .get_mut(&id)
                .expect("the entity was just stored");
            stored.acting.get_or_insert_default().remembered.remember(
                key,
                answer.clone(),
                input.at_ms,
            );
        }
        self.outbox.changed(&id);
        self.owe(input.to, answer);
    }

    /// A command sent to this shard without a record: run now if the shard may commit it
    /// (see `commands::direct`), else declined for the caller to write as a record.
    fn direct_command(&mut self, command: DirectCommand) {
        let DirectCommand {
            id,
            value,
            idempotency_key,
            answer,
        } = command;
        // Restoring: its states are not here yet. Refused: it runs nothing. Closing: its last
        // checkpoint may already be collected. Nothing consumed: no offset to commit with the
        // change, and that offset's group generation is what fences a zombie's commit.
        if self.restoring.is_some()
            || self.refused.is_some()
            || self.closing
            || self.processed.is_none()
        {
            let _ = answer.send(Direct::Declined);
            return;
        }
        let event = match E::decode(&id, Some(&value)) {
            Ok(event) => event,
            Err(e) => {
                // Nothing ran and nothing is owed: the caller is told at once.
                let reason = format!("the command does not decode: {e}");
                let _ = answer.send(Direct::Answered(failed(reason)));
                return;
            }
        };
        let input = CommandInput {
            offset: None,
            value: &value,
            idempotency_key,
            at_ms: unix_ms(),
            to: AnswerTo::Here(answer),
        };
        let mut outcome = BatchOutcome::default();
        self.command(input, id, &event, Instant::now(), &mut outcome);
        NodeStats::add(&self.env.stats.events_processed_local, outcome.applied);
        self.activated(outcome.activated);
        self.report_changed();
        // It may have set a timer earlier than any the shard waits for.
        self.arm_timers();
    }

    /// The messages, records and timers an input of entity `from` produced (the record at an
    /// offset, or a command's value run without a record), for the next checkpoint. One that
    /// cannot be written (a message or timer to a type this node does not host or to an
    /// invalid id, a record without a topic, a timer beyond the entity's limit) is
    /// dead-lettered with the reason instead.
    fn send_outputs(&mut self, from: &EntityId, source: Result<i64, &[u8]>, outputs: Vec<Output>) {
        let mut writes = false;
        for output in outputs {
            let done = match output {
                Output::Message {
                    to_type,
                    to_type_name,
                    id,
                    value,
                } => self
                    .destination(to_type, to_type_name, &id)
                    .map(|(topic, partition)| {
                        self.outbox.push(Outgoing::Record(Box::new(OutRecord {
                            topic,
                            partition: Some(partition),
                            key: Some(id.into_bytes()),
                            value: Some(value),
                            headers: vec![(HEADER_MESSAGE_FROM, self.sender(from))],
                        })));
                        writes = true;
                    }),
                Output::Record { topic, .. } if topic.is_empty() => {
                    Err("an emitted record without a topic".to_owned())
                }
                Output::Record { topic, key, value } => {
                    self.outbox.push(Outgoing::Record(Box::new(OutRecord {
                        topic,
                        partition: None,
                        key,
                        value,
                        headers: Vec::new(),
                    })));
                    writes = true;
                    Ok(())
                }
                Output::SetTimer {
                    name,
                    at_ms,
                    to,
                    value,
                } => {
                    let target = match to {
                        None => Ok(None),
                        Some((to_type, to_type_name, id)) => self
                            .destination(to_type, to_type_name, &id)
                            .map(|(topic, partition)| {
                                Some(Box::new(Target {
                                    topic,
                                    partition,
                                    id,
                                }))
                            }),
                    };
                    target.and_then(|to| {
                        self.set_timer(from, PendingTimer::new(&name, at_ms, &value, to))
                    })
                }
                Output::CancelTimer { name } => {
                    self.cancel_timer(from, &name);
                    Ok(())
                }
                Output::Unencodable(reason) => Err(reason),
            };
            if let Err(reason) = done {
                tracing::warn!(
                    "entity {from} of shard {} ({}): {reason}: dead-lettered",
                    self.shard,
                    describe(source)
                );
                self.dead_letter_input(from, source, reason);
            }
        }
        if writes {
            self.env.commit_soon.request();
        }
    }

    /// The input topic and partition of entity `id` of a hosted type.
    fn destination(
        &self,
        to_type: std::any::TypeId,
        to_type_name: &str,
        id: &str,
    ) -> Result<(String, u32), String> {
        match self.env.destinations.of(to_type) {
            None => Err(format!(
                "a message to entity {id} of {to_type_name}, a type this node does not host"
            )),
            Some(_) if id.is_empty() || id.len() > MAX_ID_BYTES => Err(format!(
                "a message to an entity id of {} bytes (1 to {MAX_ID_BYTES} allowed)",
                id.len()
            )),
            Some((topic, partitions)) => Ok((
                topic.to_owned(),
                partition_for_key(id.as_bytes(), partitions),
            )),
        }
    }

    /// The `message.from` header of what entity `id` sends.
    fn sender(&self, id: &EntityId) -> String {
        format!("{}/{id}", self.env.input_topic)
    }

    /// Stores `timer` with entity `id`'s state (replacing one of the same name) and indexes it.
    fn set_timer(&mut self, id: &EntityId, timer: PendingTimer) -> Result<(), String> {
        let stored = self.states.get_mut(id).expect("the entity just ran");
        let acting = stored.acting.get_or_insert_default();
        acting.timers.room_for(timer.name())?;
        let key = (timer.at_ms, id.clone(), timer.name().to_string());
        if let Some(old) = acting.timers.set(timer) {
            self.timers
                .remove(&(old.at_ms, id.clone(), old.name().to_string()));
        }
        self.timers.insert(key);
        NodeStats::add(&self.env.stats.timers_set, 1);
        Ok(())
    }

    fn cancel_timer(&mut self, id: &EntityId, name: &str) {
        let Some(stored) = self.states.get_mut(id) else {
            return;
        };
        let Some(acting) = stored.acting.as_mut() else {
            return;
        };
        if let Some(old) = acting.timers.remove(name) {
            self.timers
                .remove(&(old.at_ms, id.clone(), old.name().to_string()));
        }
        if acting.is_empty() {
            stored.acting = None;
        }
    }

    /// Fires the timers due now (up to [`FIRE_PER_ROUND`]): each leaves its entity's state and
    /// its message is written to the target, both with the next checkpoint, so a timer fires
    /// exactly once (see `timers`).
    fn fire_due_timers(&mut self) {
        if self.restoring.is_some() {
            return;
        }
        if self.timers.needs_rebuild() {
            self.rebuild_timer_index();
        }
        let now = unix_ms();
        let due = self.timers.take_due(now, FIRE_PER_ROUND);
        let mut fired = 0;
        for (_, id, name) in due {
            let Some(stored) = self.states.get_mut(&id) else {
                continue;
            };
            let Some(acting) = stored.acting.as_mut() else {
                continue;
            };
            let Some(timer) = acting.timers.remove(&name) else {
                continue;
            };
            if acting.is_empty() {
                stored.acting = None;
            }
            let value = timer.message().to_vec();
            let (topic, partition, key) = match timer.to {
                None => (self.env.input_topic.clone(), self.shard, id.to_string()),
                Some(to) => (to.topic, to.partition, to.id),
            };
            tracing::debug!("timer {name} of entity {id} (shard {}) fired", self.shard);
            self.outbox.push(Outgoing::Record(Box::new(OutRecord {
                topic,
                partition: Some(partition),
                key: Some(key.into_bytes()),
                value: Some(value),
                headers: vec![
                    (HEADER_MESSAGE_FROM, self.sender(&id)),
                    (HEADER_TIMER, name),
                ],
            })));
            self.outbox.changed(&id);
            fired += 1;
        }
        if fired > 0 {
            NodeStats::add(&self.env.stats.timers_fired, fired);
            self.env.commit_soon.request();
        }
        self.wake_at = None;
        self.arm_timers();
    }

    /// Schedules a [`ShardMsg::Timers`] for the earliest pending timer, unless one is due by then.
    fn arm_timers(&mut self) {
        if self.timers.needs_rebuild() {
            self.rebuild_timer_index();
        }
        let Some(next) = self.timers.next_at() else {
            return;
        };
        if self.wake_at.is_some_and(|at| at <= next) {
            return;
        }
        self.wake_at = Some(next);
        let delay = Duration::from_millis(u64::try_from(next - unix_ms()).unwrap_or(0));
        self.myself.send_after(delay, || ShardMsg::Timers);
    }

    /// Indexes the earliest of every entity's timers (after a restore, or once the held ones
    /// have fired).
    fn rebuild_timer_index(&mut self) {
        let all = self.states.iter().flat_map(|(id, stored)| {
            stored.acting.iter().flat_map(move |acting| {
                acting
                    .timers
                    .iter()
                    .map(move |t| (t.at_ms, id.clone(), t.name().to_string()))
            })
        });
        self.timers.rebuild(all);
    }

    /// `answer` goes to the command's sender once the next checkpoint (or a later one) commits.
    fn owe(&mut self, to: AnswerTo, outcome: CommandOutcome) {
        self.owe_after(self.outbox.next(), to, outcome);
    }

    /// `answer` goes to the command's sender once checkpoint `first` (or a later one) commits.
    fn owe_after(&mut self, first: u64, to: AnswerTo, outcome: CommandOutcome) {
        self.owed.push((first, Owed { to, outcome }));
        self.env.commit_soon.request();
    }

    fn answer_now(&mut self, to: AnswerTo, outcome: CommandOutcome) {
        match to {
            AnswerTo::Node { reply_to, request } => {
                self.env.commands.answer(&reply_to, request, outcome)
            }
            AnswerTo::Here(waiting) => {
                let _ = waiting.send(Direct::Answered(outcome));
            }
        }
    }

    /// Checkpoint `seq` committed: the answers it made durable go to their senders.
    fn answer_committed(&mut self, seq: u64) {
        if self.owed.is_empty() {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.owed)
            .into_iter()
            .partition(|(first, _)| *first <= seq);
        self.owed = later;
        if !due.is_empty() {
            self.env.commit_soon.answered(due.len());
        }
        for (_, owed) in due {
            self.answer_now(owed.to, owed.outcome);
        }
    }

    /// A record of `id` at `offset` goes to the dead-letter topic with `reason`, with the
    /// checkpoint that commits past it.
    fn dead_letter(&mut self, id: &EntityId, offset: i64, reason: String) {
        self.dead_letter_input(id, Ok(offset), reason);
    }

    /// [`Self::dead_letter`] for a record (`Ok(offset)`; its value stays in the input topic) or
    /// for a command run without a record (`Err(value)`: the letter keeps the value, and its
    /// source offset is -1).
    fn dead_letter_input(&mut self, id: &EntityId, source: Result<i64, &[u8]>, reason: String) {
        NodeStats::add(&self.env.stats.dead_lettered, 1);
        let (value, offset) = match source {
            Ok(offset) => (None, offset),
            Err(value) => (Some(value.to_vec()), -1),
        };
        self.outbox.push(Outgoing::DeadLetter(Box::new(DeadLetter {
            key: Some(id.as_bytes().to_vec()),
            value,
            reason,
            source_topic: self.env.input_topic.clone(),
            source_partition: self.shard,
            source_offset: offset,
        })));
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
            ShardMsg::Restored(states) => {
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
                self.rebuild_timer_index();
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

/// An input for log lines: a record's offset, or a command run without a record.
fn describe(source: Result<i64, &[u8]>) -> String {
    match source {
        Ok(offset) => format!("input at offset {offset}"),
        Err(_) => "a command run without a record".to_owned(),
    }
}

/// Wall-clock time in ms since the epoch: timers are due by it.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backpressure::InFlightGate;
    use crate::entity::tests::{Sum, SumState};
    use crate::entity::{Prost, Rejection};
    use crate::readiness::GroupReadiness;
    use std::sync::atomic::AtomicUsize;

    /// Sums like [`Sum`], but its `apply` panics on 13 after counting it (a half-applied event).
    struct Unlucky;

    impl Entity for Unlucky {
        type Event = i64;
        type State = SumState;
        type Query = SumState;
        type Reply = SumState;
        type Codec = Prost;

        fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
            Sum::decode(id, value)
        }
        fn apply(state: &mut SumState, event: &i64) {
            state.count += 1;
            assert_ne!(*event, 13, "unlucky number");
            state.sum += event;
        }
        fn query(state: &SumState, _: &SumState) -> SumState {
            state.clone()
        }
    }

    fn env(max_live: usize) -> Arc<ShardEnv> {
        Arc::new(ShardEnv {
            gate: Arc::new(InFlightGate::new(1_000)),
            stats: Arc::new(NodeStats::default()),
            live_entities: Arc::new(AtomicUsize::new(0)),
            max_live_entities: max_live,
            passivate_after: Duration::from_secs(600),
            readiness: Arc::new(GroupReadiness::new("g")),
            input_topic: "input".into(),
            commands: Arc::new(crate::commands::PendingCommands::new("me".into())),
            destinations: Arc::new(crate::effects::Destinations::default()),
            commit_soon: Arc::default(),
            changed_states: Arc::default(),
        })
    }

    fn events(records: &[(i64, &str, i64)]) -> Vec<ConsumedRecord<i64>> {
        records
            .iter()
            .map(|(offset, id, value)| ConsumedRecord {
                offset: *offset,
                at_ms: 0,
                content: RecordContent::Event((*id).into(), *value),
            })
            .collect()
    }

    async fn start<E: Entity>(env: &Arc<ShardEnv>) -> ActorRef<ShardMsg<E>> {
        let args = ShardArgs {
            shard: 3,
            env: env.clone(),
        };
        let (shard, _) = Actor::spawn(None, ShardActor::<E>::new(), args)
            .await
            .unwrap();
        shard
    }

    async fn ask<E: Entity<Query = SumState, Reply = SumState>>(
        shard: &ActorRef<ShardMsg<E>>,
        id: &str,
    ) -> SumState {
        shard
            .call(
                |reply| ShardMsg::Query {
                    id: id.into(),
                    query: SumState::default(),
                    reply,
                },
                None,
            )
            .await
            .unwrap()
            .unwrap()
            .expect("the shard is not refused")
    }

    #[tokio::test]
    async fn a_refused_shard_runs_nothing_commits_nothing_and_answers_why() {
        let env = env(100);
        let shard = start::<Sum>(&env).await;
        env.gate.acquire(2, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(events(&[(0, "a", 5)])))
            .unwrap();
        let query = |shard: ActorRef<ShardMsg<Sum>>| async move {
            shard
                .call(
                    |reply| ShardMsg::Query {
                        id: "a".into(),
                        query: SumState::default(),
                        reply,
                    },
                    None,
                )
                .await
                .unwrap()
                .unwrap()
        };
        let waiting = tokio::spawn(query(shard.clone()));
        shard
            .cast(ShardMsg::Refused("offset 7 does not decode".into()))
            .unwrap();
        assert_eq!(
            waiting.await.unwrap().unwrap_err().as_ref(),
            "offset 7 does not decode",
            "a query that waited for the restore"
        );
        shard
            .cast(ShardMsg::Consumed(events(&[(1, "a", 6)])))
            .unwrap();
        assert!(query(shard.clone()).await.is_err());
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.commit_offset, None, "no offset committed");
        assert!(checkpoint.states.is_empty());
        assert_eq!(env.gate.in_flight(), 0, "dropped batches left the window");
        assert_eq!(env.readiness.refused().1, [3]);
        shard.stop(None);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            env.readiness.refused().1.is_empty(),
            "a shard that left is no longer refused here"
        );
    }

    /// An entity that acts: a command adds its value to the sum unless that would make it
    /// negative (then it is refused); it answers with the new state.
    struct Guarded;

    impl Entity for Guarded {
        type Event = i64;
        type State = SumState;
        type Query = SumState;
        type Reply = SumState;
        type Codec = Prost;

        fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
            Sum::decode(id, value)
        }
        fn apply(state: &mut SumState, event: &i64) {
            Sum::apply(state, event)
        }
        fn query(state: &SumState, _: &SumState) -> SumState {
            state.clone()
        }
        fn handle(state: &mut SumState, event: &i64, effects: &mut Effects<'_, Self>) {
            if state.sum + event < 0 {
                effects.refuse("insufficient funds");
                return;
            }
            Self::apply(state, event);
            effects.reply(state.clone());
        }
    }

    fn command(
        offset: i64,
        id: &str,
        value: i64,
        request: u64,
        key: Option<&str>,
    ) -> ConsumedRecord<i64> {
        ConsumedRecord {
            offset,
            at_ms: 1_000 + offset,
            content: RecordContent::Command(
                id.into(),
                Ok(value),
                Box::new(CommandMeta {
                    reply_to: "me".into(),
                    request,
                    idempotency_key: key.map(String::from),
                    at_ms: 1_000 + offset,
                }),
            ),
        }
    }

    #[tokio::test]
    async fn commands_are_answered_after_their_checkpoint_commits_and_once_per_key() {
        let env = env(100);
        let shard = start::<Guarded>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        let (mut deposit, mut overdraw) = (env.commands.register(), env.commands.register());
        env.gate.acquire(2, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(vec![
                command(5, "acc", 100, deposit.request, Some("d-1")),
                command(6, "acc", -150, overdraw.request, Some("w-1")),
            ]))
            .unwrap();
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert!(env.commit_soon.is_wanted(), "answers owed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            deposit.arrived().is_none(),
            "no answer before the change is committed"
        );
        // The checkpoint's state includes the change and the remembered answers.
        let (_, stored) = &checkpoint.states[0];
        assert_eq!(stored.state, SumState { count: 1, sum: 100 });
        assert!(stored
            .acting
            .as_ref()
            .unwrap()
            .remembered
            .get("d-1")
            .is_some());
        shard
            .cast(ShardMsg::Checkpointed {
                seq: checkpoint.seq,
            })
            .unwrap();
        let reply = |outcome: CommandOutcome| match outcome.result {
            Some(crate::cluster::wire::command_outcome::Result::Reply(bytes)) => {
                <Prost as crate::entity::Codec<SumState>>::decode(&bytes).unwrap()
            }
            other => panic!("not a reply: {other:?}"),
        };
        assert_eq!(
            reply(deposit.outcome().await.unwrap()),
            SumState { count: 1, sum: 100 }
        );
        assert_eq!(
            overdraw.outcome().await.unwrap().result,
            Some(crate::cluster::wire::command_outcome::Result::Refused(
                "insufficient funds".into()
            ))
        );

        // The deposit retried with its key (a new record, through another node): the first
        // answer, not a second deposit. A replayed record without a key: nothing.
        let (mut retry, mut replayed) = (env.commands.register(), env.commands.register());
        env.gate.acquire(2, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(vec![
                command(9, "acc", 100, retry.request, Some("d-1")),
                command(5, "acc", 100, replayed.request, None),
            ]))
            .unwrap();
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        shard
            .cast(ShardMsg::Checkpointed {
                seq: checkpoint.seq,
            })
            .unwrap();
        assert_eq!(
            reply(retry.outcome().await.unwrap()),
            SumState { count: 1, sum: 100 }
        );
        assert_eq!(ask(&shard, "acc").await, SumState { count: 1, sum: 100 });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            replayed.arrived().is_none(),
            "a keyless replay gets no answer"
        );
        shard.stop(None);
    }

    /// A command sent to the shard without a record (`commands::direct`): its answer as the
    /// shard gives it, or `None` if the shard dropped it unanswered.
    async fn direct<E: Entity>(
        shard: &ActorRef<ShardMsg<E>>,
        id: &str,
        value: &str,
        key: Option<&str>,
    ) -> tokio::sync::oneshot::Receiver<Direct> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        shard
            .cast(ShardMsg::Command(Box::new(DirectCommand {
                id: id.into(),
                value: value.as_bytes().to_vec(),
                idempotency_key: key.map(String::from),
                answer,
            })))
            .unwrap();
        answered
    }

    async fn commit(shard: &ActorRef<ShardMsg<Guarded>>) -> Checkpoint<SumState> {
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        shard
            .cast(ShardMsg::Checkpointed {
                seq: checkpoint.seq,
            })
            .unwrap();
        checkpoint
    }

    fn sum_of(answer: Direct) -> SumState {
        match answer {
            Direct::Answered(CommandOutcome {
                result: Some(crate::cluster::wire::command_outcome::Result::Reply(bytes)),
            }) => <Prost as crate::entity::Codec<SumState>>::decode(&bytes).unwrap(),
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_direct_command_is_declined_until_the_shard_may_commit_it() {
        let env = env(100);
        let shard = start::<Guarded>(&env).await;
        assert_eq!(
            direct(&shard, "acc", "5", None).await.await.unwrap(),
            Direct::Declined,
            "restoring"
        );
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        assert_eq!(
            direct(&shard, "acc", "5", None).await.await.unwrap(),
            Direct::Declined,
            "nothing consumed: no offset whose generation fences the commit"
        );
        env.gate.acquire(1, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(events(&[(0, "other", 1)])))
            .unwrap();
        let answered = direct(&shard, "acc", "5", Some("k")).await;
        let checkpoint = commit(&shard).await;
        assert_eq!(
            checkpoint.commit_offset,
            Some(1),
            "its offset commits with it"
        );
        assert_eq!(
            sum_of(answered.await.unwrap()),
            SumState { count: 1, sum: 5 }
        );
        shard.call(ShardMsg::Drain, None).await.unwrap().unwrap();
        assert_eq!(
            direct(&shard, "acc", "5", Some("k")).await.await.unwrap(),
            Direct::Declined,
            "handing off: even a remembered key goes to the next owner as a record"
        );
        shard.stop(None);
    }

    #[tokio::test]
    async fn a_direct_command_is_answered_after_its_commit_and_dropped_unanswered_with_its_shard() {
        let env = env(100);
        let shard = start::<Guarded>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        env.gate.acquire(1, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(events(&[(0, "acc", 100)])))
            .unwrap();
        env.commit_soon.take();
        let mut deposit = direct(&shard, "acc", "50", Some("d-1")).await;
        let overdraw = direct(&shard, "acc", "-500", None).await;
        let mut garbage = direct(&shard, "acc", "fifty", None).await;
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert!(env.commit_soon.is_wanted(), "answers owed");
        match garbage.try_recv() {
            Ok(Direct::Answered(outcome)) => assert!(
                matches!(&outcome.result, Some(crate::cluster::wire::command_outcome::Result::Failed(r)) if r.contains("does not decode")),
                "{outcome:?}"
            ),
            other => panic!("an undecodable command is answered at once: {other:?}"),
        }
        assert!(deposit.try_recv().is_err(), "no answer before the commit");
        let (_, stored) = &checkpoint.states[0];
        assert_eq!(stored.state, SumState { count: 2, sum: 150 });
        assert_eq!(stored.last_offset, 0, "a direct command has no offset");
        shard
            .cast(ShardMsg::Checkpointed {
                seq: checkpoint.seq,
            })
            .unwrap();
        assert_eq!(
            sum_of(deposit.await.unwrap()),
            SumState { count: 2, sum: 150 }
        );
        assert_eq!(
            overdraw.await.unwrap(),
            Direct::Answered(refused("insufficient funds"))
        );
        // The same key again, directly or as a record: the first answer, nothing more.
        let again = direct(&shard, "acc", "50", Some("d-1")).await;
        let mut as_record = env.commands.register();
        env.gate.acquire(1, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(vec![command(
                1,
                "acc",
                50,
                as_record.request,
                Some("d-1"),
            )]))
            .unwrap();
        commit(&shard).await;
        assert_eq!(
            sum_of(again.await.unwrap()),
            SumState { count: 2, sum: 150 }
        );
        assert!(as_record.outcome().await.is_some());
        assert_eq!(ask(&shard, "acc").await, SumState { count: 2, sum: 150 });
        // Applied, then the shard stops before a checkpoint commits it: the caller is told at
        // once (the oneshot closes) instead of waiting out its timeout.
        let lost = direct(&shard, "acc", "1", None).await;
        shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        shard.stop(None);
        assert!(lost.await.is_err(), "dropped unanswered");
    }

    fn refused(reason: &str) -> CommandOutcome {
        CommandOutcome {
            result: Some(crate::cluster::wire::command_outcome::Result::Refused(
                reason.into(),
            )),
        }
    }

    /// Sends each positive event on as a message to entity "to-<value>" of its own type, sends
    /// one to a type the node does not host, and emits a record.
    struct Relay;

    impl Entity for Relay {
        type Event = SumState;
        type State = SumState;
        type Query = SumState;
        type Reply = SumState;
        type Codec = Prost;

        fn decode(_id: &str, value: Option<&[u8]>) -> Result<SumState, Rejection> {
            Ok(<Prost as crate::entity::Codec<SumState>>::decode(
                value.unwrap_or_default(),
            )?)
        }
        fn apply(state: &mut SumState, event: &SumState) {
            state.count += 1;
            state.sum += event.sum;
        }
        fn query(state: &SumState, _: &SumState) -> SumState {
            state.clone()
        }
        fn handle(state: &mut SumState, event: &SumState, effects: &mut Effects<'_, Self>) {
            Self::apply(state, event);
            if event.sum > 0 {
                let forward = SumState {
                    count: 0,
                    sum: -event.sum,
                };
                effects.send(format!("to-{}", event.sum), forward.clone());
                effects.send_to::<Guarded>("elsewhere", 1);
                effects.emit("relayed", Some(effects.id().as_bytes()), Some(vec![7]));
            }
        }
    }

    #[tokio::test]
    async fn messages_and_emitted_records_leave_with_the_checkpoint_and_a_bad_one_is_dead_lettered()
    {
        let mut destinations = crate::effects::Destinations::default();
        destinations.add(std::any::TypeId::of::<Relay>(), "relay-input", 8);
        let env = Arc::new(ShardEnv {
            destinations: Arc::new(destinations),
            ..Arc::into_inner(env(100)).unwrap()
        });
        let shard = start::<Relay>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        env.gate.acquire(1, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(vec![ConsumedRecord {
                offset: 4,
                at_ms: 0,
                content: RecordContent::Event("a".into(), SumState { count: 0, sum: 5 }),
            }]))
            .unwrap();
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.states.len(), 1);
        let mut records = Vec::new();
        let mut letters = Vec::new();
        for outgoing in checkpoint.outgoing {
            match outgoing {
                Outgoing::Record(r) => records.push(*r),
                Outgoing::DeadLetter(l) => letters.push(*l),
                Outgoing::Reroute(_) => panic!("nothing to re-route"),
            }
        }
        assert_eq!(records.len(), 2, "the message and the emitted record");
        let message = &records[0];
        assert_eq!(message.topic, "relay-input");
        assert_eq!(message.partition, Some(partition_for_key(b"to-5", 8)));
        assert_eq!(message.key.as_deref(), Some(&b"to-5"[..]));
        assert_eq!(
            <Prost as crate::entity::Codec<SumState>>::decode(message.value.as_deref().unwrap()),
            Ok(SumState { count: 0, sum: -5 })
        );
        assert_eq!(
            message.headers,
            vec![(HEADER_MESSAGE_FROM, "input/a".to_string())]
        );
        let emitted = &records[1];
        assert_eq!(
            (
                emitted.topic.as_str(),
                emitted.partition,
                emitted.key.as_deref()
            ),
            ("relayed", None, Some(&b"a"[..]))
        );
        assert_eq!(letters.len(), 1);
        assert!(
            letters[0].reason.contains("a type this node does not host"),
            "{}",
            letters[0].reason
        );
        assert_eq!(letters[0].source_offset, 4);
        shard.stop(None);
    }

    /// Sets a timer "ring" at its input's time + n ms for a positive n (its message: -1),
    /// cancels it on 0, and counts the rings (negative inputs).
    struct Alarm;

    impl Entity for Alarm {
        type Event = i64;
        type State = SumState;
        type Query = SumState;
        type Reply = SumState;
        type Codec = Prost;

        fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
            Sum::decode(id, value)
        }
        fn apply(state: &mut SumState, event: &i64) {
            Sum::apply(state, event)
        }
        fn query(state: &SumState, _: &SumState) -> SumState {
            state.clone()
        }
        fn handle(state: &mut SumState, event: &i64, effects: &mut Effects<'_, Self>) {
            match *event {
                0 => effects.cancel_timer("ring"),
                n if n > 0 => effects
                    .set_timer("ring", effects.now_ms() + n, -1)
                    .expect("within the limits"),
                n => Self::apply(state, &n),
            }
        }
    }

    /// The records a checkpoint writes for entities' effects.
    fn records<S>(checkpoint: Checkpoint<S>) -> Vec<OutRecord> {
        checkpoint
            .outgoing
            .into_iter()
            .filter_map(|o| match o {
                Outgoing::Record(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_timer_fires_once_when_due_from_the_state_that_holds_it_and_a_cancelled_one_never() {
        let env = env(100);
        let shard = start::<Alarm>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        // Inputs stamped 10 s ago: "a" rings 10.1 s after its input (100 ms from now), "b"
        // too but is cancelled, "c" is set for a day and then reset to ring with "a".
        let then = unix_ms() - 10_000;
        let input = |offset, id: &str, n| ConsumedRecord {
            offset,
            at_ms: then,
            content: RecordContent::Event(id.into(), n),
        };
        env.gate.acquire(5, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(vec![
                input(1, "a", 10_100),
                input(2, "b", 10_100),
                input(3, "b", 0),
                input(4, "c", 86_400_000),
                input(5, "c", 10_100),
            ]))
            .unwrap();
        let checkpoint = |shard: ActorRef<ShardMsg<Alarm>>| async move {
            shard
                .call(ShardMsg::Checkpoint, None)
                .await
                .unwrap()
                .unwrap()
        };
        let first = checkpoint(shard.clone()).await;
        let pending = |c: &Checkpoint<SumState>, id: &str| {
            let (_, stored) = c.states.iter().find(|(i, _)| i == id).unwrap();
            stored.acting.as_ref().map_or(0, |a| a.timers.len())
        };
        assert_eq!(
            (
                pending(&first, "a"),
                pending(&first, "b"),
                pending(&first, "c")
            ),
            (1, 0, 1),
            "the timers travel in the states"
        );
        let seq = first.seq;
        assert!(records(first).is_empty(), "nothing is due yet");
        shard.cast(ShardMsg::Checkpointed { seq }).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let fired = checkpoint(shard.clone()).await;
        let seq = fired.seq;
        assert_eq!(fired.states.len(), 2, "a and c lost their timers");
        assert!(fired.states.iter().all(|(_, s)| s.acting.is_none()));
        let mut rings = records(fired);
        rings.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(rings.len(), 2, "a and c rang, b was cancelled");
        for (ring, id) in rings.iter().zip(["a", "c"]) {
            assert_eq!(ring.topic, "input");
            assert_eq!(ring.partition, Some(3), "the entity's own partition");
            assert_eq!(ring.key.as_deref(), Some(id.as_bytes()));
            assert_eq!(
                <Prost as crate::entity::Codec<i64>>::decode(ring.value.as_deref().unwrap()),
                Ok(-1)
            );
            assert_eq!(
                ring.headers,
                vec![
                    (HEADER_MESSAGE_FROM, format!("input/{id}")),
                    (HEADER_TIMER, "ring".to_string())
                ]
            );
        }
        shard.cast(ShardMsg::Checkpointed { seq }).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(records(checkpoint(shard.clone()).await).is_empty(), "once");
        assert_eq!(env.stats.timers_fired.get(), 2);
        shard.stop(None);

        // A restored state with an overdue timer (a standby's, a new owner's): it fires at once.
        let mut overdue = Stored::new(SumState::default(), 9);
        overdue
            .acting
            .get_or_insert_default()
            .timers
            .set(PendingTimer::new("late", then, &[], None));
        let shard = start::<Alarm>(&env).await;
        shard
            .cast(ShardMsg::Restored(
                [("d".into(), overdue)].into_iter().collect(),
            ))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let restored = checkpoint(shard.clone()).await;
        assert_eq!(restored.states.len(), 1);
        let rings = records(restored);
        assert_eq!(rings.len(), 1);
        assert_eq!(rings[0].headers[1], (HEADER_TIMER, "late".to_string()));
        shard.stop(None);
    }

    #[tokio::test]
    async fn a_timer_set_by_a_command_run_without_a_record_fires_when_due() {
        let env = env(100);
        let shard = start::<Alarm>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        env.gate.acquire(1, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(vec![ConsumedRecord {
                offset: 0,
                at_ms: unix_ms(),
                content: RecordContent::Event("other".into(), -1),
            }]))
            .unwrap();
        // Its clock is the owner's: the timer is due 100 ms from now. No record follows that
        // would wake the shard: the command itself must arm the wake-up.
        let set = direct(&shard, "a", "100", None).await;
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        shard
            .cast(ShardMsg::Checkpointed {
                seq: checkpoint.seq,
            })
            .unwrap();
        assert!(matches!(set.await, Ok(Direct::Answered(_))));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let fired = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        let rings = records(fired);
        assert_eq!(rings.len(), 1, "the timer fired");
        assert_eq!(rings[0].key.as_deref(), Some(&b"a"[..]));
        shard.stop(None);
    }

    async fn counts<E: Entity>(shard: &ActorRef<ShardMsg<E>>) -> EntityCounts {
        shard
            .call(ShardMsg::EntityCounts, None)
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_shard_runs_its_entities_in_partition_order_and_skips_replays() {
        let env = env(100);
        let shard = start::<Sum>(&env).await;
        // Consumed before the restore: waits, then runs on top of the restored states.
        env.gate.acquire(3, Duration::ZERO);
        shard
            .cast(ShardMsg::Consumed(events(&[
                (10, "a", 5),
                (11, "b", 7),
                (12, "a", 1),
            ])))
            .unwrap();
        let restored = EntityMap::from_iter([(
            EntityId::from("a"),
            // Offset 10 is already in this state: a replay.
            Stored::new(SumState { count: 1, sum: 100 }, 10),
        )]);
        shard.cast(ShardMsg::Restored(restored)).unwrap();
        assert_eq!(ask(&shard, "a").await, SumState { count: 2, sum: 101 });
        assert_eq!(ask(&shard, "b").await, SumState { count: 1, sum: 7 });
        assert_eq!(ask(&shard, "never").await, SumState::default());
        assert_eq!(env.gate.in_flight(), 0, "the batch released its window");
        assert_eq!(env.stats.events_skipped_replayed.get(), 1);
        assert_eq!(env.stats.events_processed_local.get(), 2);
        assert_eq!(
            env.changed_states.load(Ordering::Relaxed),
            2,
            "two states wait for the next checkpoint, and the consumer is told"
        );

        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.commit_offset, Some(13));
        let mut states = checkpoint.states;
        states.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            states,
            vec![
                ("a".into(), Stored::new(SumState { count: 2, sum: 101 }, 12)),
                ("b".into(), Stored::new(SumState { count: 1, sum: 7 }, 11)),
            ]
        );
        shard
            .cast(ShardMsg::Checkpointed {
                seq: checkpoint.seq,
            })
            .unwrap();
        let next = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert!(
            next.is_empty(),
            "nothing changed since the committed checkpoint"
        );
        let _ = shard.call(ShardMsg::Drain, None).await.unwrap();
        shard.stop(None);
    }

    #[tokio::test]
    async fn the_live_cap_passivates_the_least_recently_active_and_keeps_their_state() {
        let env = env(2);
        let shard = start::<Sum>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        shard
            .cast(ShardMsg::Consumed(events(&[
                (0, "a", 1),
                (1, "b", 2),
                (2, "c", 3),
                (3, "d", 4),
            ])))
            .unwrap();
        let after = counts(&shard).await;
        assert_eq!((after.live, after.known), (2, 4));
        assert_eq!(env.live_entities.load(Ordering::Relaxed), 2);
        assert_eq!(env.stats.entities_passivated.get(), 2);
        // A query brings a passivated entity back, with its state, and passivates another.
        assert_eq!(ask(&shard, "a").await, SumState { count: 1, sum: 1 });
        let after = counts(&shard).await;
        assert_eq!((after.live, after.known), (2, 4));
        assert_eq!(env.stats.entities_passivated.get(), 3);
        shard.stop(None);
    }

    #[tokio::test]
    async fn an_apply_that_panics_dead_letters_its_event_and_the_shard_goes_on() {
        let env = env(100);
        let shard = start::<Unlucky>(&env).await;
        shard
            .cast(ShardMsg::Restored(EntityMap::default()))
            .unwrap();
        shard
            .cast(ShardMsg::Consumed(events(&[
                (0, "a", 1),
                (1, "a", 13),
                (2, "a", 2),
                (3, "b", 13),
            ])))
            .unwrap();
        // The half-applied event's count stays (no rollback), its sum does not.
        assert_eq!(ask(&shard, "a").await, SumState { count: 3, sum: 3 });
        let checkpoint = shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            checkpoint.commit_offset,
            Some(4),
            "the poison events count as done"
        );
        let letters: Vec<_> = checkpoint
            .outgoing
            .iter()
            .map(|o| match o {
                Outgoing::DeadLetter(letter) => letter,
                other => panic!("only dead letters expected, got {other:?}"),
            })
            .collect();
        assert_eq!(letters.len(), 2);
        assert_eq!(
            (letters[0].key.as_deref(), letters[0].source_offset),
            (Some(&b"a"[..]), 1)
        );
        assert_eq!(
            (
                letters[1].source_topic.as_str(),
                letters[1].source_partition
            ),
            ("input", 3)
        );
        assert!(
            letters[0].reason.contains("unlucky number"),
            "{}",
            letters[0].reason
        );
        assert_eq!(env.stats.dead_lettered.get(), 2);
        // Replayed (a crash before this checkpoint committed), the poison event is skipped with
        // the state that recorded it.
        let b = checkpoint.states.iter().find(|(id, _)| id == "b").unwrap();
        assert_eq!(b.1.last_offset, 3);
        assert_eq!(b.1.state, SumState { count: 1, sum: 0 });
        shard.stop(None);
    }
}
