//! The changelog's record format (the runtime's envelope around the application's state
//! codec), and the start-up check that a changelog belongs to this input topic and format.
//!
//! One record per changed entity: key = entity id, value = the envelope
//! `[last_offset: 8 bytes big-endian][state bytes of the entity's codec]`, headers
//! `input.topic` = the topic those offsets are offsets of, and `changelog.format`. A state's
//! `last_offset` only means something for that topic: restored into a node consuming another
//! topic, it would make entities skip that topic's events as replays. The node therefore
//! refuses, at start, a changelog written for another topic or in another format.

use std::time::{Duration, Instant};

use crate::kafka_config::{ClientKind, KafkaConnection};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::acting::Acting;
use crate::entity::{Codec, DecodeError, Entity, EntityId, EntityMap, Stored};
use crate::kafka_admin::{list_offsets, with_debug};
use crate::kafka_health::QuietContext;

/// Header on every changelog record: the input topic its state's offsets refer to.
pub const HEADER_INPUT_TOPIC: &str = "input.topic";
/// Header on every changelog record: the envelope's format.
pub const HEADER_FORMAT: &str = "changelog.format";
/// The envelope written by this version: 2 added remembered command answers and timers (see
/// [`encode`]);
/// a format-1 value reads the same under format 2.
pub const FORMAT: &str = "kafka-sharding/2";
/// Formats this version reads.
const READABLE_FORMATS: [&str; 2] = ["kafka-sharding/1", FORMAT];

/// How long the start-up check waits for the changelog's offsets and its first record.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error(
        "changelog topic {changelog} holds state written for input topic {written_for}, not {topic}: its offsets \
         would make entities skip events. Use another --changelog-topic (the default is <group>-<topic>-state)"
    )]
    ForeignTopic {
        changelog: String,
        written_for: String,
        topic: String,
    },
    #[error(
        "changelog topic {changelog} has records without an {HEADER_INPUT_TOPIC} header (not written by this \
         processor): use another --changelog-topic"
    )]
    Unlabelled { changelog: String },
    #[error(
        "changelog topic {changelog} was written in an older format ({found}; this version writes {FORMAT}): \
         use another --changelog-topic, or delete the topic to rebuild the state from the input topic"
    )]
    OldFormat { changelog: String, found: String },
    #[error("cannot read changelog topic {changelog}: {reason}")]
    Unreadable { changelog: String, reason: String },
}

/// The two clients that read a changelog (restores and standbys): an assign-only read_committed
/// consumer, group id `<changelog>-<role>` (it never joins or commits, but librdkafka needs a
/// group id to report positions), with the reader's `settings` over the operator's `consumer.`
/// properties (those are meant for the group consumer); and a read_uncommitted client for the
/// partitions' high watermarks (a read_committed client is told the last stable offset, which
/// stops short of an open transaction).
pub(crate) fn readers(
    kafka: &KafkaConnection,
    changelog_topic: &str,
    role: &str,
    settings: &[(&str, &str)],
    kafka_debug: Option<&str>,
    context: &QuietContext,
) -> Result<(BaseConsumer<QuietContext>, BaseConsumer<QuietContext>), KafkaError> {
    let mut config = kafka.client(ClientKind::Consumer);
    with_debug(&mut config, kafka_debug)
        .set("group.id", format!("{changelog_topic}-{role}"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let reader = config.create_with_context(context.clone())?;
    let watermarks = kafka
        .client(ClientKind::Consumer)
        .set("isolation.level", "read_uncommitted")
        .create_with_context(context.clone())?;
    Ok((reader, watermarks))
}

/// The changelog value for a state: the envelope around the entity's state codec. An entity
/// with remembered command answers or pending timers (`acting`) gets the extended envelope
/// `[marker: 8 bytes][length: 4 bytes big-endian][answers and timers][state bytes]`, where the
/// marker is `-(last_offset + 3)`: always below -1, which no `last_offset` is, so both shapes
/// read back without a header and entities that never answer commands pay nothing.
pub(crate) fn encode<E: Entity>(stored: &Stored<E::State>) -> Vec<u8> {
    let state = <E::Codec as Codec<E::State>>::encode(&stored.state);
    let Some(acting) = stored.acting.as_ref().filter(|a| !a.is_empty()) else {
        let mut value = Vec::with_capacity(8 + state.len());
        value.extend_from_slice(&stored.last_offset.to_be_bytes());
        value.extend_from_slice(&state);
        return value;
    };
    let answers = acting.encode();
    let mut value = Vec::with_capacity(12 + answers.len() + state.len());
    value.extend_from_slice(&(-(stored.last_offset + 3)).to_be_bytes());
    value.extend_from_slice(&(answers.len() as u32).to_be_bytes());
    value.extend_from_slice(&answers);
    value.extend_from_slice(&state);
    value
}

/// The state in a changelog value.
pub(crate) fn decode<E: Entity>(value: &[u8]) -> Result<Stored<E::State>, DecodeError> {
    let short = || DecodeError(format!("{} bytes: shorter than the envelope", value.len()));
    let (first, rest) = value.split_first_chunk::<8>().ok_or_else(short)?;
    let first = i64::from_be_bytes(*first);
    if first >= -1 {
        return Ok(Stored::new(
            <E::Codec as Codec<E::State>>::decode(rest)?,
            first,
        ));
    }
    let (length, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let length = u32::from_be_bytes(*length) as usize;
    if rest.len() < length {
        return Err(short());
    }
    let (answers, state) = rest.split_at(length);
    Ok(Stored {
        state: <E::Codec as Codec<E::State>>::decode(state)?,
        last_offset: -first - 3,
        acting: Some(Box::new(Acting::decode(answers)?)),
    })
}

/// A changelog record's value read from outside the runtime (inspection tools, benchmarks):
/// the entity's state and the offset, in the entity's input partition, of the last event
/// applied to it. A record without a value (a tombstone) deletes the entity.
pub fn decode_value<E: Entity>(value: &[u8]) -> Result<(E::State, i64), DecodeError> {
    decode::<E>(value).map(|stored| (stored.state, stored.last_offset))
}

/// Folds one changelog record into a partition's states (a tombstone deletes); restores and
/// standbys read the changelog alike.
pub(crate) fn fold<E: Entity>(
    states: &mut EntityMap<Stored<E::State>>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let Some(id) = key.and_then(|k| std::str::from_utf8(k).ok()) else {
        tracing::error!("changelog record without a UTF-8 key: skipped");
        return;
    };
    let Some(value) = value else {
        states.remove(id);
        return;
    };
    match decode::<E>(value) {
        Ok(stored) => {
            states.insert(EntityId::from(id), stored);
        }
        Err(e) => {
            tracing::error!("changelog record for entity {id} does not decode ({e}): skipped")
        }
    }
}

/// The headers every changelog record of a node consuming `input_topic` carries.
pub(crate) fn record_headers(input_topic: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: HEADER_INPUT_TOPIC,
            value: Some(input_topic),
        })
        .insert(Header {
            key: HEADER_FORMAT,
            value: Some(FORMAT),
        })
}

/// Fails unless `changelog` is empty or its first record was written for `input_topic` in
/// this version's format.
/// Blocking: a few broker round trips, plus one fetch when the changelog has records.
pub(crate) fn check_written_for(
    kafka: &KafkaConnection,
    changelog: &str,
    input_topic: &str,
    partitions: u32,
) -> Result<(), ChangelogError> {
    let unreadable = |e: KafkaError| ChangelogError::Unreadable {
        changelog: changelog.into(),
        reason: kafka.describe(&e),
    };
    let consumer: BaseConsumer = kafka
        .client(ClientKind::Consumer)
        .set("group.id", format!("{changelog}-check"))
        .set("enable.auto.commit", "false")
        // Any record tells whose it is, committed or not: do not wait for open transactions.
        .set("isolation.level", "read_uncommitted")
        .create()
        .map_err(unreadable)?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    // A topic created moments ago has no partition leaders yet: retry until the deadline.
    let (starts, ends) = loop {
        let listed = list_offsets(
            &consumer,
            changelog,
            0..partitions,
            Offset::Beginning,
            CHECK_TIMEOUT,
        )
        .and_then(|starts| {
            Ok((
                starts,
                list_offsets(
                    &consumer,
                    changelog,
                    0..partitions,
                    Offset::End,
                    CHECK_TIMEOUT,
                )?,
            ))
        });
        match listed {
            Ok(offsets) => break offsets,
            Err(e) if Instant::now() >= deadline => return Err(unreadable(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut with_records = TopicPartitionList::new();
    for (partition, start) in &starts {
        if ends.get(partition).is_some_and(|end| end > start) {
            with_records
                .add_partition_offset(changelog, *partition as i32, Offset::Offset(*start))
                .map_err(unreadable)?;
        }
    }
    if with_records.count() == 0 {
        return Ok(());
    }
    consumer.assign(&with_records).map_err(unreadable)?;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(record)) => {
                let header = |name: &str| {
                    record
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                let written_for = header(HEADER_INPUT_TOPIC);
                let format = header(HEADER_FORMAT);
                return match written_for {
                    Some(_)
                        if !format
                            .as_deref()
                            .is_some_and(|f| READABLE_FORMATS.contains(&f)) =>
                    {
                        Err(ChangelogError::OldFormat {
                            changelog: changelog.into(),
                            found: format.unwrap_or_else(|| {
                                "no format header: before the runtime's envelope".into()
                            }),
                        })
                    }
                    Some(t) if t == input_topic => Ok(()),
                    Some(written_for) => Err(ChangelogError::ForeignTopic {
                        changelog: changelog.into(),
                        written_for,
                        topic: input_topic.into(),
                    }),
                    None => Err(ChangelogError::Unlabelled {
                        changelog: changelog.into(),
                    }),
                };
            }
            Some(Err(e)) => return Err(unreadable(e)),
            None => {}
        }
    }
    Err(ChangelogError::Unreadable {
        changelog: changelog.into(),
        reason: format!(
            "it has records but none arrived within {} s",
            CHECK_TIMEOUT.as_secs()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::entity::tests::{Sum, SumState};

    #[test]
    fn a_state_survives_its_envelope() {
        let mut stored = Stored::new(
            SumState {
                count: 3,
                sum: 4_250,
            },
            77,
        );
        assert_eq!(decode::<Sum>(&encode::<Sum>(&stored)).unwrap(), stored);
        // With remembered answers: the extended envelope, at every offset a state can have.
        for last_offset in [-1, 0, 77, i64::MAX - 3] {
            stored.last_offset = last_offset;
            let mut acting = crate::acting::Acting::default();
            acting
                .remembered
                .remember("key-1".into(), crate::commands::failed("no".into()), 5);
            acting.timers.set(crate::timers::PendingTimer {
                name: "t".into(),
                at_ms: 7,
                message: Box::new([1, 2]),
                to: None,
            });
            stored.acting = Some(Box::new(acting));
            let value = encode::<Sum>(&stored);
            assert!(i64::from_be_bytes(value[..8].try_into().unwrap()) < -1);
            assert_eq!(decode::<Sum>(&value).unwrap(), stored);
        }
        assert!(
            decode::<Sum>(b"\x01\x02").is_err(),
            "shorter than the envelope"
        );
        assert!(decode::<Sum>(b"\0\0\0\0\0\0\0\x01\xff\xff garbage").is_err());
    }

    #[test]
    fn records_are_labelled_with_their_input_topic() {
        let headers = record_headers("events");
        let header = headers
            .iter()
            .find(|h| h.key == HEADER_INPUT_TOPIC)
            .expect("header");
        assert_eq!(header.value, Some(&b"events"[..]));
        let format = headers.iter().find(|h| h.key == HEADER_FORMAT).unwrap();
        assert_eq!(format.value, Some(FORMAT.as_bytes()));
    }

    #[test]
    fn records_fold_to_the_latest_state_and_tombstones_delete() {
        let mut states = EntityMap::default();
        let s1 = Stored::new(SumState { count: 1, sum: 10 }, 4);
        let s2 = Stored::new(SumState { count: 2, sum: 30 }, 9);
        let value = |s: &Stored<SumState>| encode::<Sum>(s);
        fold::<Sum>(&mut states, Some(b"7"), Some(&value(&s1)));
        fold::<Sum>(&mut states, Some(b"8"), Some(&value(&s1)));
        fold::<Sum>(&mut states, Some(b"7"), Some(&value(&s2)));
        fold::<Sum>(&mut states, Some(b"8"), None);
        fold::<Sum>(&mut states, None, Some(&value(&s1)));
        fold::<Sum>(&mut states, Some(b"9"), Some(b"\xff\xff"));
        assert_eq!(states.len(), 1);
        assert_eq!(states["7"], s2);
    }
}
