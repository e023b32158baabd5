//! What an entity's input sends out: messages to entities, emitted records, timers set and
//! cancelled, and dead letters. All of them go into the outbox and leave with the checkpoint
//! that commits the state that produced them; one that cannot be written is dead-lettered with
//! the reason.

use super::ShardState;
use crate::dlq::DeadLetter;
use crate::effects::{Output, HEADER_MESSAGE_FROM};
use crate::entity::{Entity, EntityId, MAX_ID_BYTES};
use crate::partitioner::partition_for_key;
use crate::shard::messages::{OutRecord, Outgoing};
use crate::stats::NodeStats;
use crate::timers::{PendingTimer, Target};

/// An input for log lines: a record's offset, or a command run without a record.
pub(super) fn describe(source: Result<i64, &[u8]>) -> String {
    match source {
        Ok(offset) => format!("input at offset {offset}"),
        Err(_) => "a command run without a record".to_owned(),
    }
}

impl<E: Entity> ShardState<E> {
    /// The messages, records and timers an input of entity `from` produced (the record at an
    /// offset, or a command's value run without a record), for the next checkpoint. One that
    /// cannot be written (a message or timer to a type this node does not host or to an
    /// invalid id, a record without a topic, a timer beyond the entity's limit) is
    /// dead-lettered with the reason instead.
    pub(super) fn send_outputs(
        &mut self,
        from: &EntityId,
        source: Result<i64, &[u8]>,
        outputs: Vec<Output>,
    ) {
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
    pub(super) fn destination(
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
    pub(super) fn sender(&self, id: &EntityId) -> String {
        format!("{}/{id}", self.env.input_topic)
    }

    /// A record of `id` at `offset` goes to the dead-letter topic with `reason`, with the
    /// checkpoint that commits past it.
    pub(super) fn dead_letter(&mut self, id: &EntityId, offset: i64, reason: String) {
        self.dead_letter_input(id, Ok(offset), reason);
    }

    /// [`Self::dead_letter`] for a record (`Ok(offset)`; its value stays in the input topic) or
    /// for a command run without a record (`Err(value)`: the letter keeps the value, and its
    /// source offset is -1).
    pub(super) fn dead_letter_input(
        &mut self,
        id: &EntityId,
        source: Result<i64, &[u8]>,
        reason: String,
    ) {
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
}
