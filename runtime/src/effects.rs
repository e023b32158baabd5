//! What an entity's [`crate::Entity::handle`] does besides changing its state: answer a
//! command, message other entities, emit records. Everything is collected here while `handle`
//! runs and leaves with the checkpoint that commits the state change (`shard::actor`), so an
//! effect happens exactly when the change does: once, or, if the change is rolled back, not at
//! all (the input is then run again by the partition's next owner, and its effects with it).

use std::any::TypeId;

use crate::cluster::wire::{command_outcome, CommandOutcome};
use std::collections::HashMap;

use crate::entity::{Codec, Entity};

/// The effects of one input, given to [`Entity::handle`].
pub struct Effects<'a, E: Entity> {
    id: &'a str,
    /// The input's partition and offset (its identity in the input topic).
    input: (u32, i64),
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
}

impl<'a, E: Entity> Effects<'a, E> {
    /// For the input at `offset` of `partition`, to entity `id`; `command` if a caller waits.
    pub(crate) fn new(id: &'a str, partition: u32, offset: i64, command: bool) -> Self {
        Self {
            id,
            input: (partition, offset),
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
    /// again after a crash: `<partition>-<offset>`. For naming what the input starts (a
    /// transfer, an order) when the caller gave no name.
    pub fn input_id(&self) -> String {
        format!("{}-{}", self.input.0, self.input.1)
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
        self.outputs.push(Output::Message {
            to_type: TypeId::of::<T>(),
            to_type_name: std::any::type_name::<T>(),
            id: id.into(),
            value: <T::Codec as Codec<T::Event>>::encode(&message),
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

    /// What leaves with the checkpoint.
    pub(crate) fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// The answer as it crosses nodes and the changelog; a command answered with nothing
    /// fails (the caller must not wait for ever).
    pub(crate) fn into_outcome(self) -> CommandOutcome {
        let result = match self.answer {
            Some(Ok(reply)) => {
                command_outcome::Result::Reply(<E::Codec as Codec<E::Reply>>::encode(&reply))
            }
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
