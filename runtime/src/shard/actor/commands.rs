//! Commands in a shard: the entity's `handle` runs them and computes the reply, which is owed
//! until a checkpoint that includes the change commits (never sooner: no reply is given for a
//! change a crash can undo). A retry with a remembered idempotency key is answered as the
//! first time and runs nothing. A command arrives as a record of the input topic, or directly
//! from a caller on this node or forwarded by another (`commands::direct`), declined unless the
//! shard may commit it now.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use super::outputs::describe;
use super::timers::unix_ms;
use super::{panic_message, BatchOutcome, ShardState};
use crate::cluster::wire::CommandOutcome;
use crate::commands::{failed, CommandMeta, Direct, DirectCommand};
use crate::effects::{Effects, Input};
use crate::entity::{Entity, EntityId};
use crate::stats::NodeStats;

/// A command's answer, for whoever waits for it.
pub(super) struct Owed {
    to: AnswerTo,
    outcome: CommandOutcome,
}

pub(super) enum AnswerTo {
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
pub(super) struct CommandInput<'v> {
    /// The record's offset; `None` for a command run without a record.
    pub(super) offset: Option<i64>,
    /// A direct command's value (kept in a dead letter, since no record holds it).
    pub(super) value: &'v [u8],
    pub(super) idempotency_key: Option<String>,
    pub(super) at_ms: i64,
    pub(super) to: AnswerTo,
}

impl<E: Entity> ShardState<E> {
    /// Runs a command (unless its state already includes it) and owes its answer. A command
    /// whose idempotency key the entity remembers is answered as it was the first time and
    /// not run again.
    pub(super) fn command(
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
    pub(super) fn direct_command(&mut self, command: DirectCommand) {
        let DirectCommand {
            id,
            value,
            idempotency_key,
            answer,
        } = command;
        // Restoring: its states are not here yet. Refused: it runs nothing. Closing: its last
        // checkpoint may already be collected. Nothing consumed: no offset, so this node is
        // not the committer a new owner would fence (`restore::fence_committers`); a checkpoint
        // leaves an offset out only once it committed it naming this node.
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

    /// `answer` goes to the command's sender once the next checkpoint (or a later one) commits.
    pub(super) fn owe(&mut self, to: AnswerTo, outcome: CommandOutcome) {
        self.owe_after(self.outbox.next(), to, outcome);
    }

    /// `answer` goes to the command's sender once checkpoint `first` (or a later one) commits.
    pub(super) fn owe_after(&mut self, first: u64, to: AnswerTo, outcome: CommandOutcome) {
        self.owed.push((first, Owed { to, outcome }));
        self.env.commit_soon.request();
    }

    pub(super) fn answer_now(&mut self, to: AnswerTo, outcome: CommandOutcome) {
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
    pub(super) fn answer_committed(&mut self, seq: u64) {
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
}
