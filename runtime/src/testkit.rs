//! Driving an entity in memory, without Kafka or a node (feature `testkit`): records, events,
//! commands, messages and timers on a virtual clock, with the runtime's own rules, so a test
//! asserts on states, answers and effects in microseconds.
//!
//! What it keeps of the runtime: each input gets the next offset and runs through the same
//! replay rule (an offset at or below the entity's last one changes nothing, [`TestKit::replay`]);
//! commands are encoded with the type's codec and decoded with [`Entity::decode`] as on a node,
//! answered from the state they were applied to, and a command with an idempotency key the
//! entity remembers is answered as the first time without running again; messages to the
//! entity's own type are delivered (in order) after the input that sent them, messages to
//! other types and emitted records are collected ([`TestKit::take_effects`]); timers are kept
//! with the state, limited as on a node, and fire in time order when the clock passes them
//! ([`TestKit::advance`]), each once. [`TestKit::restart`] round-trips every state through the
//! changelog's envelope, as a node restoring it would. What it leaves out: partitions, nodes,
//! transactions and Kafka (`processor/tests/` prove those on a broker). A panic in `handle`
//! fails the test (a node dead-letters that input instead).
//!
//! ```
//! use kafka_sharding::testkit::TestKit;
//! use kafka_sharding::{Entity, Json, Rejection};
//!
//! struct Counter;
//! impl Entity for Counter {
//!     type Event = i64;
//!     type State = i64;
//!     type Query = ();
//!     type Reply = i64;
//!     type Codec = Json;
//!     fn decode(_: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
//!         Ok(std::str::from_utf8(value.unwrap_or_default())?.parse()?)
//!     }
//!     fn apply(sum: &mut i64, value: &i64) { *sum += value }
//!     fn query(sum: &i64, _: &()) -> i64 { *sum }
//! }
//!
//! let mut kit = TestKit::<Counter>::new();
//! kit.record("k7", Some(b"5")).unwrap();
//! assert!(kit.record("k7", Some(b"five")).is_err()); // a node dead-letters it
//! let offset = kit.last_offset("k7");
//! assert!(!kit.replay("k7", offset, &5));            // a replay changes nothing
//! kit.restart();                                     // through the changelog and back
//! assert_eq!(kit.query("k7", &()), 5);
//! ```

use std::any::TypeId;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::changelog;
use crate::commands::CommandError;
use crate::effects::{Effects, Output};
use crate::entity::{Codec, Entity, Rejection, Stored, MAX_ID_BYTES};
use crate::timers::{PendingTimer, Target};

/// Self-messages one input may cause before the kit calls it a loop.
const MAX_DELIVERIES: usize = 100_000;

/// Something that left an entity for outside this type: what a node would write with the
/// input's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A message to entity `id` of another type (`to_type`: its Rust type name), in that
    /// type's codec.
    Message {
        /// The target type's Rust type name.
        to_type: String,
        /// The target entity.
        id: String,
        /// The message in the target type's codec.
        value: Vec<u8>,
    },
    /// A record emitted to `topic`.
    Record {
        /// Where it goes.
        topic: String,
        /// Its key (partitioned by it as Kafka's Java producer does).
        key: Option<Vec<u8>>,
        /// Its value.
        value: Option<Vec<u8>>,
    },
    /// An input a node would dead-letter (an output it cannot write: a message to an invalid
    /// id, a timer beyond the entity's limit), with the reason.
    DeadLetter {
        /// The entity whose input it was.
        id: String,
        /// Why.
        reason: String,
    },
}

/// An entity type in memory. Entities start from the default state, as on a node.
pub struct TestKit<E: Entity> {
    states: BTreeMap<String, Stored<E::State>>,
    next_offset: i64,
    clock_ms: i64,
    effects: Vec<Effect>,
    /// Messages to entities of this type, in order, not yet run.
    inbox: VecDeque<(String, Vec<u8>)>,
}

impl<E: Entity> Default for TestKit<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Entity> TestKit<E> {
    /// No entities; the clock at 1 000 000 000 000 ms (September 2001), offsets from 0.
    pub fn new() -> Self {
        Self {
            states: BTreeMap::new(),
            next_offset: 0,
            clock_ms: 1_000_000_000_000,
            effects: Vec::new(),
            inbox: VecDeque::new(),
        }
    }

    /// The virtual clock: the time (ms since the epoch) the next input is stamped with
    /// ([`Effects::now_ms`]).
    pub fn now_ms(&self) -> i64 {
        self.clock_ms
    }

    /// A record of the input topic with key `id`, decoded by [`Entity::decode`] and run; a
    /// rejection (which a node dead-letters) changes nothing.
    pub fn record(&mut self, id: &str, value: Option<&[u8]>) -> Result<(), Rejection> {
        let event = E::decode(id, value)?;
        self.event(id, &event);
        Ok(())
    }

    /// Runs `event` for entity `id` at the next offset (and then the messages it sent to
    /// entities of this type).
    pub fn event(&mut self, id: &str, event: &E::Event) {
        let offset = self.take_offset();
        self.run(id, offset, event);
        self.deliver();
    }

    /// Runs `event` for entity `id` at `offset`, as a replay after a crash would: returns
    /// whether it ran (it does not if the entity's state already includes that offset).
    pub fn replay(&mut self, id: &str, offset: i64, event: &E::Event) -> bool {
        let ran = self.run(id, offset, event);
        self.deliver();
        ran
    }

    /// Sends `command` to entity `id`, as [`crate::Entities::command`] does: the entity's
    /// answer (its reply, or [`CommandError::Refused`] / [`CommandError::Failed`]). A
    /// command with an `idempotency_key` the entity remembers is answered as the first time
    /// and not run.
    pub fn command(
        &mut self,
        id: &str,
        command: &E::Event,
        idempotency_key: Option<&str>,
    ) -> Result<E::Reply, CommandError>
    where
        E::Codec: Codec<E::Event>,
    {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(CommandError::InvalidId(id.len()));
        }
        let bytes = <E::Codec as Codec<E::Event>>::encode(command)
            .map_err(|e| CommandError::Failed(format!("the command does not encode: {e}")))?;
        let command = E::decode(id, Some(&bytes))
            .map_err(|e| CommandError::Failed(format!("the command does not decode: {e}")))?;
        let remembered = idempotency_key.and_then(|key| {
            let acting = self.states.get(id)?.acting.as_ref()?;
            acting.remembered.get(key).cloned()
        });
        let outcome = match remembered {
            Some(outcome) => outcome,
            None => {
                let offset = self.take_offset();
                let at_ms = self.clock_ms;
                let stored = self.states.entry(id.to_owned()).or_default();
                let mut effects = Effects::<E>::new(id, 0, offset, at_ms, true);
                E::handle(&mut stored.state, &command, &mut effects);
                stored.last_offset = offset;
                let outputs = effects.take_outputs();
                let outcome = effects.into_outcome();
                if let Some(key) = idempotency_key {
                    let stored = self.states.get_mut(id).expect("stored above");
                    stored.acting.get_or_insert_default().remembered.remember(
                        key.to_owned(),
                        outcome.clone(),
                        at_ms,
                    );
                }
                self.outputs(id, outputs);
                self.deliver();
                outcome
            }
        };
        crate::commands::answer::<E>(outcome)
    }

    /// Moves the clock `by` forward and fires every timer due by then, in time order, each
    /// once (a timer a firing sets that is due by then fires too).
    pub fn advance(&mut self, by: Duration) {
        let to = self
            .clock_ms
            .saturating_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX));
        self.advance_to(to);
    }

    /// Moves the clock to `at_ms` (never back) and fires the timers due by then.
    pub fn advance_to(&mut self, at_ms: i64) {
        for _ in 0..MAX_DELIVERIES {
            let due = self
                .states
                .iter()
                .flat_map(|(id, stored)| {
                    let timers = stored.acting.iter().flat_map(|a| a.timers.iter());
                    timers.map(move |t| (t.at_ms, id.clone(), t.name().to_string()))
                })
                .filter(|(due, _, _)| *due <= at_ms)
                .min();
            let Some((due, id, name)) = due else {
                self.clock_ms = self.clock_ms.max(at_ms);
                return;
            };
            self.clock_ms = self.clock_ms.max(due);
            let stored = self.states.get_mut(&id).expect("found above");
            let acting = stored.acting.as_mut().expect("found above");
            let timer = acting.timers.remove(&name).expect("found above");
            if acting.is_empty() {
                stored.acting = None;
            }
            match timer.to.as_deref() {
                None => self.message(&id, timer.message()),
                Some(target) if target.topic.is_empty() => {
                    self.message(&target.id, timer.message())
                }
                Some(target) => self.effects.push(Effect::Message {
                    to_type: target.topic.clone(),
                    id: target.id.clone(),
                    value: timer.message().to_vec(),
                }),
            }
            self.deliver();
        }
        panic!(
            "timers fired {MAX_DELIVERIES} times without the clock reaching {at_ms}: a timer loop"
        );
    }

    /// Every state through the changelog's envelope and back, as a node restoring them would
    /// (so a state its codec cannot read back fails here, with the reason).
    pub fn restart(&mut self) {
        for (id, stored) in &mut self.states {
            let value = changelog::encode::<E>(stored).unwrap_or_else(|e| {
                panic!("the state of entity {id} does not encode for the changelog: {e}")
            });
            *stored = changelog::decode::<E>(&value).unwrap_or_else(|e| {
                panic!("the state of entity {id} does not survive the changelog: {e}")
            });
        }
    }

    /// Entity `id`'s state, if it ever had an input.
    pub fn state(&self, id: &str) -> Option<&E::State> {
        self.states.get(id).map(|s| &s.state)
    }

    /// Asks entity `id` (the default state if it never had an input), as a query would.
    pub fn query(&self, id: &str, query: &E::Query) -> E::Reply {
        match self.states.get(id) {
            Some(stored) => E::query(&stored.state, query),
            None => E::query(&E::State::default(), query),
        }
    }

    /// The offset of the last input entity `id` ran (-1: none).
    pub fn last_offset(&self, id: &str) -> i64 {
        self.states.get(id).map_or(-1, |s| s.last_offset)
    }

    /// Entity `id`'s pending timers: name and due time, earliest first.
    pub fn timers(&self, id: &str) -> Vec<(String, i64)> {
        let mut timers: Vec<(String, i64)> = self
            .states
            .get(id)
            .and_then(|s| s.acting.as_ref())
            .map(|a| {
                a.timers
                    .iter()
                    .map(|t| (t.name().to_string(), t.at_ms))
                    .collect()
            })
            .unwrap_or_default();
        timers.sort_by_key(|(name, at)| (*at, name.clone()));
        timers
    }

    /// What left the entities for other types and topics since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    fn take_offset(&mut self) -> i64 {
        let offset = self.next_offset;
        self.next_offset += 1;
        offset
    }

    /// Runs one input unless the entity's state includes `offset`; returns whether it ran.
    fn run(&mut self, id: &str, offset: i64, event: &E::Event) -> bool {
        self.next_offset = self.next_offset.max(offset + 1);
        let stored = self.states.entry(id.to_owned()).or_default();
        let mut effects = Effects::<E>::new(id, 0, offset, self.clock_ms, false);
        if !stored.apply::<E>(offset, event, &mut effects) {
            return false;
        }
        let outputs = effects.take_outputs();
        self.outputs(id, outputs);
        true
    }

    /// A message to entity `id` of this type, in its codec: decoded by [`Entity::decode`] as
    /// a node's consumer would, and queued.
    fn message(&mut self, id: &str, value: &[u8]) {
        self.inbox.push_back((id.to_owned(), value.to_vec()));
    }

    /// Runs the queued messages to this type, in order, each at the next offset (and those
    /// they send in turn).
    fn deliver(&mut self) {
        for _ in 0..MAX_DELIVERIES {
            let Some((id, value)) = self.inbox.pop_front() else {
                return;
            };
            match E::decode(&id, Some(&value)) {
                Ok(event) => {
                    let offset = self.take_offset();
                    self.run(&id, offset, &event);
                }
                Err(rejection) => {
                    self.dead_letter(&id, format!("a message that does not decode: {rejection}"))
                }
            }
        }
        panic!("{MAX_DELIVERIES} messages delivered for one input: a message loop");
    }

    /// What an input produced: messages to this type queued, the rest collected, timers kept
    /// with the state.
    fn outputs(&mut self, from: &str, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Message { id, .. } if id.is_empty() || id.len() > MAX_ID_BYTES => self
                    .dead_letter(
                        from,
                        format!("a message to an entity id of {} bytes", id.len()),
                    ),
                Output::Message {
                    to_type, id, value, ..
                } if to_type == TypeId::of::<E>() => self.message(&id, &value),
                Output::Message {
                    to_type_name,
                    id,
                    value,
                    ..
                } => self.effects.push(Effect::Message {
                    to_type: to_type_name.to_owned(),
                    id,
                    value,
                }),
                Output::Record { topic, .. } if topic.is_empty() => {
                    self.dead_letter(from, "an emitted record without a topic".into())
                }
                Output::Record { topic, key, value } => {
                    self.effects.push(Effect::Record { topic, key, value })
                }
                Output::SetTimer {
                    name,
                    at_ms,
                    to,
                    value,
                } => {
                    let to = match to {
                        Some((to_type, _, id)) if to_type == TypeId::of::<E>() => {
                            Some(Box::new(Target {
                                topic: String::new(),
                                partition: 0,
                                id,
                            }))
                        }
                        Some((_, to_type_name, id)) => Some(Box::new(Target {
                            topic: to_type_name.to_owned(),
                            partition: 0,
                            id,
                        })),
                        None => None,
                    };
                    let acting = self
                        .states
                        .get_mut(from)
                        .expect("the entity just ran")
                        .acting
                        .get_or_insert_default();
                    if let Err(reason) = acting.timers.room_for(&name) {
                        self.dead_letter(from, reason);
                        continue;
                    }
                    acting
                        .timers
                        .set(PendingTimer::new(&name, at_ms, &value, to));
                }
                Output::Unencodable(reason) => self.dead_letter(from, reason),
                Output::CancelTimer { name } => {
                    if let Some(stored) = self.states.get_mut(from) {
                        if let Some(acting) = stored.acting.as_mut() {
                            acting.timers.remove(&name);
                            if acting.is_empty() {
                                stored.acting = None;
                            }
                        }
                    }
                }
            }
        }
    }

    fn dead_letter(&mut self, id: &str, reason: String) {
        self.effects.push(Effect::DeadLetter {
            id: id.to_owned(),
            reason,
        });
    }
}

#[cfg(all(test, feature = "json"))]
mod tests {
    use super::*;
    use crate::entity::Json;
    use std::collections::BTreeMap;

    /// Notes keyed by a pair, which JSON cannot write (map keys must be strings): its
    /// replies, messages and states fail to encode once they hold one.
    struct Notes;

    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    enum Input {
        Add(String),
        Pair(u8, u8),
        Forward(String),
        ForwardPairs(String),
        Pairs(BTreeMap<(u8, u8), u8>),
    }

    #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
    struct State {
        notes: Vec<String>,
        pairs: BTreeMap<(u8, u8), u8>,
    }

    impl Entity for Notes {
        type Event = Input;
        type State = State;
        type Query = ();
        type Reply = State;
        type Codec = Json;

        fn decode(_id: &str, value: Option<&[u8]>) -> Result<Input, Rejection> {
            Ok(serde_json::from_slice(value.unwrap_or_default())?)
        }
        fn apply(_: &mut State, _: &Input) {}
        fn query(state: &State, _: &()) -> State {
            state.clone()
        }
        fn handle(state: &mut State, input: &Input, effects: &mut Effects<'_, Self>) {
            match input {
                Input::Add(note) => state.notes.push(note.clone()),
                Input::Pair(a, b) => {
                    state.pairs.insert((*a, *b), 1);
                }
                Input::Forward(to) => {
                    effects.send(to.clone(), Input::Add(format!("from {}", effects.id())))
                }
                Input::ForwardPairs(to) => {
                    effects.send(to.clone(), Input::Pairs(BTreeMap::from([((1, 2), 3)])))
                }
                Input::Pairs(pairs) => state.pairs.extend(pairs),
            }
            effects.reply(state.clone());
        }
    }

    #[test]
    fn what_does_not_encode_is_reported_where_it_happens_never_a_panic() {
        let mut kit = TestKit::<Notes>::new();
        assert!(kit.command("a", &Input::Add("x".into()), None).is_ok());
        kit.event("a", &Input::Forward("b".into()));
        assert_eq!(
            kit.state("b").unwrap().notes,
            ["from a"],
            "a message delivered"
        );
        // The reply (the state with a pair) does not encode: the command fails with why.
        match kit.command("c", &Input::Pair(1, 2), None) {
            Err(CommandError::Failed(why)) => {
                assert!(why.contains("the reply does not encode"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            changelog::encode::<Notes>(&Stored::new(kit.state("c").unwrap().clone(), 0)).is_err()
        );
        assert!(kit.take_effects().is_empty());
        // A message that does not encode: its input is dead-lettered with why (as on a node).
        kit.event("a", &Input::ForwardPairs("d".into()));
        match &kit.take_effects()[..] {
            [Effect::DeadLetter { id, reason }] => {
                assert_eq!(id, "a");
                assert!(
                    reason.contains("a message to entity d does not encode"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(kit.state("d").is_none(), "nothing delivered");
    }

    #[test]
    #[should_panic(expected = "does not encode for the changelog")]
    fn a_state_that_does_not_encode_fails_the_restart() {
        let mut kit = TestKit::<Notes>::new();
        kit.event("c", &Input::Pair(1, 2));
        kit.restart();
    }
}
