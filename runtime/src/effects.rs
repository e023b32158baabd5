//! What an entity's [`crate::Entity::handle`] does besides changing its state: answer a
//! command, message other entities, emit records, set and cancel timers. Everything is collected here while `handle`
//! runs and leaves with the checkpoint that commits the state change (`shard::actor`), so an
//! effect happens exactly when the change does: once, or, if the change is rolled back, not at
//! all (the input is then run again by the partition's next owner, and its effects with it).

use std::any::TypeId;

use crate::cluster::wire::{command_outcome, CommandOutcome};
use std::collections::HashMap;

use crate::entity::{Codec, EncodeError, Entity};
use crate::timers::{self, TimerError};

/// The effects of one input, given to [`Entity::handle`].
///
/// An entity that acts: a reminder per id that a command arms (answered once the timer is
/// committed), that a command cancels, and whose ring (the timer's own message, run by
/// `handle` on whichever node owns the entity when it is due) is counted and emitted.
///
/// ```
/// use std::time::Duration;
/// use kafka_sharding::{Codec, DecodeError, EncodeError, Effects, Entity, Rejection};
///
/// struct Reminder;
///
/// #[derive(Debug, Clone, Copy, PartialEq)]
/// enum Input { Arm(u64), Cancel, Ring }
///
/// impl Entity for Reminder {
///     type Event = Input;
///     type State = u64; // rings so far
///     type Query = ();
///     type Reply = u64;
///     type Codec = Text;
///
///     fn decode(_id: &str, value: Option<&[u8]>) -> Result<Input, Rejection> {
///         Ok(Text::decode(value.unwrap_or_default())?)
///     }
///     fn apply(rings: &mut u64, input: &Input) {
///         if *input == Input::Ring {
///             *rings += 1;
///         }
///     }
///     fn query(rings: &u64, _: &()) -> u64 {
///         *rings
///     }
///     fn handle(rings: &mut u64, input: &Input, effects: &mut Effects<'_, Self>) {
///         match *input {
///             // The delay counts from the input's timestamp (`effects.now_ms()`): deterministic.
///             Input::Arm(ms) => match effects.set_timer_after("ring", Duration::from_millis(ms), Input::Ring) {
///                 Ok(()) => effects.reply(*rings),
///                 Err(too_far) => effects.refuse(too_far.to_string()),
///             },
///             Input::Cancel => {
///                 effects.cancel_timer("ring");
///                 effects.reply(*rings);
///             }
///             Input::Ring => {
///                 *rings += 1;
///                 // Exactly once, with the commit of this change (the topic must exist).
///                 let count = rings.to_string().into_bytes();
///                 effects.emit("rings", Some(effects.id().as_bytes()), Some(count));
///             }
///         }
///     }
/// }
///
/// /// Inputs as text ("arm 500", "cancel", "ring"); counts as decimal text.
/// struct Text;
/// impl Codec<Input> for Text {
///     fn encode(input: &Input) -> Result<Vec<u8>, EncodeError> {
///         Ok(match input {
///             Input::Arm(ms) => format!("arm {ms}").into_bytes(),
///             Input::Cancel => b"cancel".to_vec(),
///             Input::Ring => b"ring".to_vec(),
///         })
///     }
///     fn decode(bytes: &[u8]) -> Result<Input, DecodeError> {
///         match std::str::from_utf8(bytes).unwrap_or("").split_once(' ') {
///             Some(("arm", ms)) => ms.parse().map(Input::Arm).map_err(|e| DecodeError(e.to_string())),
///             None if bytes == b"cancel" => Ok(Input::Cancel),
///             None if bytes == b"ring" => Ok(Input::Ring),
///             _ => Err(DecodeError(format!("not an input: {}", String::from_utf8_lossy(bytes)))),
///         }
///     }
/// }
/// impl Codec<u64> for Text {
///     fn encode(n: &u64) -> Result<Vec<u8>, EncodeError> { Ok(n.to_string().into_bytes()) }
///     fn decode(bytes: &[u8]) -> Result<u64, DecodeError> {
///         std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok())
///             .ok_or_else(|| DecodeError("not a count".into()))
///     }
/// }
/// impl Codec<()> for Text {
///     fn encode(_: &()) -> Result<Vec<u8>, EncodeError> { Ok(Vec::new()) }
///     fn decode(_: &[u8]) -> Result<(), DecodeError> { Ok(()) }
/// }
///
/// assert_eq!(Reminder::decode("r-1", Some(b"arm 500")), Ok(Input::Arm(500)));
/// assert_eq!(<Text as Codec<Input>>::decode(&Text::encode(&Input::Ring).unwrap()), Ok(Input::Ring));
/// assert!(Reminder::decode("r-1", Some(b"arm soon")).is_err());
/// ```
pub struct Effects<'a, E: Entity> {
    id: &'a str,
    /// The input's identity: its partition and offset, or a command run without a record.
    input: Input,
    /// The input record's timestamp (ms since the epoch).
    at_ms: i64,
    command: bool,
    answer: Option<Result<E::Reply, String>>,
    outputs: Vec<Output>,
}

/// An effect that leaves the entity: written with the checkpoint.
pub(crate) enum Output {
    /// To an entity of a hosted type (its input topic and partition are the shard's to find).
    Message {
        to_type: TypeId,
        to_type_name: &'static str,
        id: String,
        value: Vec<u8>,
    },
    /// A record for any topic.
    Record {
        topic: String,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    },
    /// A timer to set (replacing one of the same name) on the entity.
    SetTimer {
        name: String,
        at_ms: i64,
        /// Another entity's type and id; `None`: the entity itself.
        to: Option<(TypeId, &'static str, String)>,
        value: Vec<u8>,
    },
    CancelTimer {
        name: String,
    },
    /// A message or timer whose message its codec could not write: the input is
    /// dead-lettered with this reason.
    Unencodable(String),
}

/// Where an input came from, for [`Effects::input_id`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input {
    /// A record of the input topic: its partition and offset.
    Record(u32, i64),
    /// A command its owner ran without a record (`commands::direct`): its partition and a
    /// random number drawn for it.
    Direct(u32, u64),
}

impl<'a, E: Entity> Effects<'a, E> {
    /// For the input at `offset` of `partition`, stamped `at_ms`, to entity `id`; `command`
    /// if a caller waits.
    pub(crate) fn new(id: &'a str, partition: u32, offset: i64, at_ms: i64, command: bool) -> Self {
        Self::of(id, Input::Record(partition, offset), at_ms, command)
    }

    /// For `input` to entity `id`, at `at_ms`.
    pub(crate) fn of(id: &'a str, input: Input, at_ms: i64, command: bool) -> Self {
        Self {
            id,
            input,
            at_ms,
            command,
            answer: None,
            outputs: Vec::new(),
        }
    }

    /// The entity's id (the input's record key).
    pub fn id(&self) -> &'a str {
        self.id
    }

    /// An id for this input, unique in the input topic and the same when the input is run
    /// again after a crash: `<partition>-<offset>`; for a command its owner ran without a
    /// record (it is never run again: a crash before its commit undoes it), `<partition>-c`
    /// and 64 random bits in hex. For naming what the input starts (a transfer, an order) when
    /// the caller gave no name.
    pub fn input_id(&self) -> String {
        match self.input {
            Input::Record(partition, offset) => format!("{partition}-{offset}"),
            Input::Direct(partition, nonce) => format!("{partition}-c{nonce:016x}"),
        }
    }

    /// The input's time: its record's timestamp (ms since the epoch). The entity's clock:
    /// the same when the input runs again, so `handle` stays deterministic.
    pub fn now_ms(&self) -> i64 {
        self.at_ms
    }

    /// Whether the input is a command (a caller waits for [`Effects::reply`] or
    /// [`Effects::refuse`]); for an event or a message both are ignored.
    pub fn is_command(&self) -> bool {
        self.command
    }

    /// Answers the command with `reply` (the last answer given counts).
    pub fn reply(&mut self, reply: E::Reply) {
        self.answer = Some(Ok(reply));
    }

    /// Refuses the command (the caller gets [`crate::CommandError::Refused`] with `reason`).
    /// Refuse before changing the state: a refused command should change nothing.
    pub fn refuse(&mut self, reason: impl Into<String>) {
        self.answer = Some(Err(reason.into()));
    }

    /// Sends `message` to the entity `id` of this type, on whichever node hosts it: written to
    /// its partition of the input topic with the checkpoint that commits this input, so it is
    /// delivered exactly once, after every earlier message from this entity to that one. The
    /// receiver runs it with `handle` like an event. A reply is another message (there is no
    /// blocking ask between entities: it would deadlock).
    pub fn send(&mut self, id: impl Into<String>, message: E::Event)
    where
        E::Codec: Codec<E::Event>,
    {
        self.send_to::<E>(id, message);
    }

    /// [`Effects::send`] to an entity of type `T`, which this node must host too (a message
    /// to a type it does not host is dead-lettered with the reason).
    pub fn send_to<T: Entity>(&mut self, id: impl Into<String>, message: T::Event)
    where
        T::Codec: Codec<T::Event>,
    {
        let id = id.into();
        self.outputs
            .push(match <T::Codec as Codec<T::Event>>::encode(&message) {
                Ok(value) => Output::Message {
                    to_type: TypeId::of::<T>(),
                    to_type_name: std::any::type_name::<T>(),
                    id,
                    value,
                },
                Err(e) => {
                    Output::Unencodable(format!("a message to entity {id} does not encode: {e}"))
                }
            });
    }

    /// Emits a record to `topic` (which must exist), partitioned by `key` as Kafka's Java
    /// producer would: written with the checkpoint that commits this input, so a
    /// `read_committed` consumer sees it exactly once, and never for a change that was rolled
    /// back.
    pub fn emit(&mut self, topic: impl Into<String>, key: Option<&[u8]>, value: Option<Vec<u8>>) {
        self.outputs.push(Output::Record {
            topic: topic.into(),
            key: key.map(<[u8]>::to_vec),
            value,
        });
    }

    /// Sets a durable timer called `name` that sends `message` to this entity at `at_ms` (ms
    /// since the epoch) or later, replacing a pending timer of the same name. It is stored with
    /// the entity's state once this input commits and fires exactly once, on whichever node
    /// owns the entity then (after downtime, as soon as the entity's shard is back); the
    /// message is run by `handle` like any input. A time at or before [`Effects::now_ms`] fires
    /// at once. Refused: a name of 0 or more than [`timers::MAX_TIMER_NAME_BYTES`] bytes, a
    /// time more than [`timers::MAX_TIMER_DELAY`] after the input's. Beyond
    /// [`timers::MAX_TIMERS_PER_ENTITY`] pending timers the input is dead-lettered with the
    /// reason.
    pub fn set_timer(
        &mut self,
        name: impl Into<String>,
        at_ms: i64,
        message: E::Event,
    ) -> Result<(), TimerError>
    where
        E::Codec: Codec<E::Event>,
    {
        self.push_timer(
            name.into(),
            at_ms,
            None,
            <E::Codec as Codec<E::Event>>::encode(&message),
        )
    }

    /// [`Effects::set_timer`] at `delay` after the input's time.
    pub fn set_timer_after(
        &mut self,
        name: impl Into<String>,
        delay: std::time::Duration,
        message: E::Event,
    ) -> Result<(), TimerError>
    where
        E::Codec: Codec<E::Event>,
    {
        let at_ms = self
            .at_ms
            .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        self.set_timer(name, at_ms, message)
    }

    /// [`Effects::set_timer`] with a message to the entity `id` of type `T` (a type this node
    /// hosts; otherwise the input is dead-lettered with the reason). The timer is this
    /// entity's: it names and cancels it.
    pub fn set_timer_to<T: Entity>(
        &mut self,
        name: impl Into<String>,
        at_ms: i64,
        id: impl Into<String>,
        message: T::Event,
    ) -> Result<(), TimerError>
    where
        T::Codec: Codec<T::Event>,
    {
        let to = (TypeId::of::<T>(), std::any::type_name::<T>(), id.into());
        self.push_timer(
            name.into(),
            at_ms,
            Some(to),
            <T::Codec as Codec<T::Event>>::encode(&message),
        )
    }

    fn push_timer(
        &mut self,
        name: String,
        at_ms: i64,
        to: Option<(TypeId, &'static str, String)>,
        value: Result<Vec<u8>, EncodeError>,
    ) -> Result<(), TimerError> {
        timers::check(&name, at_ms, self.at_ms)?;
        self.outputs.push(match value {
            Ok(value) => Output::SetTimer {
                name,
                at_ms,
                to,
                value,
            },
            Err(e) => {
                Output::Unencodable(format!("the message of timer {name} does not encode: {e}"))
            }
        });
        Ok(())
    }

    /// Cancels the pending timer called `name` (nothing if there is none), once this input
    /// commits. A timer whose message is already written (it fired) is not recalled: its
    /// message arrives.
    pub fn cancel_timer(&mut self, name: impl Into<String>) {
        self.outputs.push(Output::CancelTimer { name: name.into() });
    }

    /// What leaves with the checkpoint.
    pub(crate) fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// The answer as it crosses nodes and the changelog; a command answered with nothing
    /// fails (the caller must not wait for ever).
    pub(crate) fn into_outcome(self) -> CommandOutcome {
        let result = match self.answer {
            Some(Ok(reply)) => match <E::Codec as Codec<E::Reply>>::encode(&reply) {
                Ok(bytes) => command_outcome::Result::Reply(bytes),
                Err(e) => {
                    command_outcome::Result::Failed(format!("the reply does not encode: {e}"))
                }
            },
            Some(Err(reason)) => command_outcome::Result::Refused(reason),
            None => command_outcome::Result::Failed("the entity gave the command no answer".into()),
        };
        CommandOutcome {
            result: Some(result),
        }
    }
}

/// Header on a message between entities: `<sender's input topic>/<sender's id>`.
pub const HEADER_MESSAGE_FROM: &str = "message.from";

/// Where messages to each hosted entity type go: its input topic and partition count.
#[derive(Debug, Default)]
pub(crate) struct Destinations {
    by_type: HashMap<TypeId, (String, u32)>,
}

impl Destinations {
    pub fn add(&mut self, entity: TypeId, topic: &str, partitions: u32) {
        self.by_type.insert(entity, (topic.to_owned(), partitions));
    }

    /// The input topic and partition count of a hosted type.
    pub fn of(&self, entity: TypeId) -> Option<(&str, u32)> {
        self.by_type.get(&entity).map(|(t, p)| (t.as_str(), *p))
    }
}

/// A failed command's outcome.
pub(crate) fn failed(reason: String) -> CommandOutcome {
    CommandOutcome {
        result: Some(command_outcome::Result::Failed(reason)),
    }
}
