//! What a consumed record is, decided on the consumer thread before it goes to its shard: an
//! event, a command, a record for another shard, or a dead letter.

use std::time::Instant;

use super::checkpoint::HEADER_REROUTED_FROM;
use crate::commands::CommandMeta;
use crate::dlq::DeadLetter;
use crate::entity::{Entity, EntityId, MAX_ID_BYTES};
use crate::kafka_batch::RawRecord;
use crate::partitioner::partition_for_key;
use crate::shard::{ConsumedRecord, RecordContent, Reroute};
use crate::stats::NodeStats;

/// Reads records of one topic for the poll loop.
pub(super) struct Reading<'a> {
    pub topic: &'a str,
    pub partitions: u32,
    pub stats: &'a NodeStats,
    /// When the last command was read.
    pub last_command: Option<Instant>,
}

impl Reading<'_> {
    /// What `record`'s shard gets for it. Malformed records are logged and counted here (one
    /// line each: a flood of garbage is a flood of distinct records).
    pub fn consumed<E: Entity>(&mut self, record: RawRecord<'_>) -> ConsumedRecord<E::Event> {
        let partition = record.partition as u32;
        let offset = record.offset;
        let at_ms = record.timestamp_ms.unwrap_or(0);
        let command = CommandMeta::from_headers(record.headers.iter(), at_ms);
        let classified = match (
            classify::<E>(record.key, record.payload, partition, self.partitions),
            command,
        ) {
            (Classified::Event(id, event), Some(Ok(meta))) => {
                Classified::Command(id, Ok(event), Box::new(meta))
            }
            (Classified::Undecodable(id, reason), Some(Ok(meta))) => {
                Classified::Command(id, Err(reason), Box::new(meta))
            }
            (_, Some(Err(reason))) => {
                Classified::Rejected(format!("malformed command headers: {reason}"))
            }
            (classified, _) => classified,
        };
        let content = match classified {
            Classified::Command(id, event, meta) => {
                self.last_command = Some(Instant::now());
                NodeStats::add(&self.stats.events_consumed, 1);
                RecordContent::Command(id, event, meta)
            }
            Classified::Undecodable(_, reason) | Classified::Rejected(reason) => {
                tracing::warn!("record {partition}/{offset} is malformed ({reason}): dead-lettered with the next checkpoint");
                NodeStats::add(&self.stats.dead_lettered, 1);
                RecordContent::DeadLetter(Box::new(DeadLetter::of(&record, self.topic, reason)))
            }
            Classified::Event(id, event) => {
                NodeStats::add(&self.stats.events_consumed, 1);
                if record.headers.iter().any(|h| h.key == HEADER_REROUTED_FROM) {
                    NodeStats::add(&self.stats.events_forwarded_in, 1);
                }
                RecordContent::Event(id, event)
            }
            Classified::ForShard(target_partition) => RecordContent::Reroute(Box::new(Reroute {
                source_offset: offset,
                target_partition,
                key: record.key.map(<[u8]>::to_vec).unwrap_or_default(),
                value: record.payload.map(<[u8]>::to_vec),
            })),
        };
        ConsumedRecord {
            offset,
            at_ms,
            content,
        }
    }
}

/// What a consumed record is, decided on the consumer thread.
#[derive(Debug, PartialEq)]
enum Classified<Ev> {
    Event(EntityId, Ev),
    /// A command (see `commands`); `Err`: its value did not decode.
    Command(EntityId, Result<Ev, String>, Box<CommandMeta>),
    /// A valid key whose value the entity rejects (dead-lettered; a command's sender is told).
    Undecodable(EntityId, String),
    /// Its key belongs to this other partition (its producer used another partitioner).
    ForShard(u32),
    /// Malformed, with the reason for the dead-letter topic.
    Rejected(String),
}

/// The runtime's checks on a record's key (an entity id: present, UTF-8, bounded, on its own
/// partition), then the application's decoding of its value.
fn classify<E: Entity>(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    partition: u32,
    partitions: u32,
) -> Classified<E::Event> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Classified::Rejected("record has no key (the key must be the entity id)".into());
    };
    let Ok(id) = std::str::from_utf8(key) else {
        return Classified::Rejected("record key is not UTF-8".into());
    };
    if id.len() > MAX_ID_BYTES {
        return Classified::Rejected(format!("record key is longer than {MAX_ID_BYTES} bytes"));
    }
    let shard = partition_for_key(key, partitions);
    if shard != partition {
        return Classified::ForShard(shard);
    }
    match E::decode(id, value) {
        Ok(event) => Classified::Event(EntityId::from(id), event),
        Err(rejection) => Classified::Undecodable(EntityId::from(id), rejection.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::tests::Sum;

    #[test]
    fn keys_are_checked_by_the_runtime_and_values_by_the_entity() {
        let p = partition_for_key(b"7", 8);
        assert_eq!(
            classify::<Sum>(Some(b"7"), Some(b"12"), p, 8),
            Classified::Event("7".into(), 12)
        );
        let rejected = |c: Classified<i64>| match c {
            Classified::Rejected(reason) => reason,
            other => panic!("not rejected: {other:?}"),
        };
        assert!(rejected(classify::<Sum>(None, Some(b"1"), p, 8)).contains("no key"));
        assert!(rejected(classify::<Sum>(Some(b""), Some(b"1"), p, 8)).contains("no key"));
        assert!(rejected(classify::<Sum>(Some(&[0xff, 0xfe]), None, p, 8)).contains("UTF-8"));
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(rejected(classify::<Sum>(Some(long.as_bytes()), None, 0, 1)).contains("longer"));
        match classify::<Sum>(Some(b"7"), Some(b"x"), p, 8) {
            Classified::Undecodable(id, reason) => {
                assert_eq!(id, "7");
                assert!(reason.contains("invalid digit"), "{reason}");
            }
            other => panic!("not undecodable: {other:?}"),
        }
        assert_eq!(
            classify::<Sum>(Some(b"7"), Some(b"garbage"), (p + 1) % 8, 8),
            Classified::ForShard(p),
            "re-routed as read, not decoded"
        );
    }
}
