//! The changelog's record format (the runtime's envelope around the application's state
//! codec), the start-up check that a changelog belongs to this input topic and format, and the
//! clients that read it back (a restore's or the standbys' reader, and [`ChangelogEnds`], the
//! partitions' offsets they read between).
//!
//! One record per changed entity: key = entity id, value = the envelope
//! `[last_offset: 8 bytes big-endian][state bytes of the entity's codec]`, headers
//! `input.topic` = the topic those offsets are offsets of, and `changelog.format`. A state's
//! `last_offset` only means something for that topic: restored into a node consuming another
//! topic, it would make entities skip that topic's events as replays. The node therefore
//! refuses, at start, a changelog written for another topic or in another format.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kafka_config::{ClientKind, KafkaConnection};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::acting::Acting;
use crate::entity::{Codec, DecodeError, EncodeError, Entity, EntityId, EntityMap, Stored};
use crate::kafka_admin::{list_offsets, with_debug};
use crate::kafka_batch::RawRecord;
use crate::kafka_health::{IdleClient, QuietContext};

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

/// The topic settings a node creates a changelog with (an existing changelog keeps its own).
///
/// - Compacted: the latest state of every entity is what a restore needs; `min.cleanable.dirty.ratio`
///   0.1 and ten-minute segments let the cleaner drop superseded states sooner than Kafka's defaults
///   (0.5, a week), which bounds a restore's read.
/// - `segment.index.bytes` 1 MiB instead of 10 MiB. A broker preallocates each segment's offset
///   and time index at that size as a sparse file and writes them through `mmap`. The first write to
///   an index faults in a read-around window of the file (`read_ahead_kb`, 8 MiB on the machine the
///   benchmarks run on), which the kernel zero-fills page by page: 16 MiB of new memory per
///   partition of a fresh changelog, 2 GiB for 128 partitions, all on the broker's request threads
///   while a node's first checkpoints wait on them (docs/BENCHMARKS.md, "The brokers' index
///   files"). 1 MiB still indexes at least 340 MiB of a segment (more than ten minutes' worth of
///   a partition at a million states a second over 128 partitions) before the index fills and
///   rolls it.
pub const CHANGELOG_TOPIC_CONFIG: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("min.cleanable.dirty.ratio", "0.1"),
    ("segment.ms", "600000"),
    ("segment.index.bytes", "1048576"),
];

/// The changelog readers' librdkafka settings that the operator's `consumer.` properties may
/// change.
///
/// A reader (a restore, a standby warming up) empties its prefetch queue as fast as the broker
/// fills it. librdkafka stops fetching a partition while the queue holds `queued.min.messages`
/// (counted over every partition the reader is assigned, 100 000 by default), and then waits
/// `fetch.queue.backoff.ms` (1 s by default) before it looks again. A reader that empties the
/// queue sooner sits idle for the rest of that second: restoring ten million states took 7.3 s
/// with the default and 4.1 s with 10 ms (docs/BENCHMARKS.md).
pub const CHANGELOG_READER_DEFAULTS: &[(&str, &str)] = &[("fetch.queue.backoff.ms", "10")];

/// A client that reads a changelog (a restore, the standbys): an assign-only read_committed
/// consumer, group id `<changelog>-<role>` (it never joins or commits, but librdkafka needs a
/// group id to report positions), with the reader's `settings` over the operator's `consumer.`
/// properties (those are meant for the group consumer) over [`CHANGELOG_READER_DEFAULTS`]. Read
/// it through a [`crate::kafka_batch::ConsumerReader`].
pub(crate) fn reader(
    kafka: &KafkaConnection,
    changelog_topic: &str,
    role: &str,
    settings: &[(&str, &str)],
    kafka_debug: Option<&str>,
    context: &QuietContext,
) -> Result<BaseConsumer<QuietContext>, KafkaError> {
    let mut config = kafka.client_with(ClientKind::Consumer, CHANGELOG_READER_DEFAULTS);
    with_debug(&mut config, kafka_debug)
        .set("group.id", format!("{changelog_topic}-{role}"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    config.create_with_context(context.clone())
}

/// Asks for a changelog's partitions' first offsets and high watermarks (read_uncommitted: a
/// read_committed client is told the last stable offset, which stops short of an open
/// transaction). One per entity type, shared by its restores and standbys, and its client is
/// kept between requests: a client made for each restore spent 0.5–0.7 s on its first requests
/// about once in 200 (docs/BENCHMARKS.md). A kept client can go stale, though: after the broker
/// leading some partitions was killed, it answered "leader not available" for them for minutes
/// where a new client asks for fresh metadata. So a request that fails, or leaves a partition
/// without an offset, retires the client, and the next request makes a new one.
pub(crate) struct ChangelogEnds {
    kafka: KafkaConnection,
    context: QuietContext,
    client: Mutex<Option<Arc<BaseConsumer<QuietContext>>>>,
}

impl ChangelogEnds {
    /// Makes the first client now, so the first restore finds it connected.
    pub fn new(kafka: &KafkaConnection, context: &QuietContext) -> Result<Self, KafkaError> {
        let ends = Self {
            kafka: kafka.clone(),
            context: context.clone(),
            client: Mutex::new(None),
        };
        ends.client()?;
        Ok(ends)
    }

    /// The offset of each of `partitions` (`Offset::Beginning` or `Offset::End`, as
    /// [`list_offsets`]); partitions the broker gave none for are absent.
    pub fn list(
        &self,
        topic: &str,
        partitions: impl IntoIterator<Item = u32>,
        which: Offset,
        timeout: Duration,
    ) -> Result<BTreeMap<u32, i64>, KafkaError> {
        let partitions: Vec<u32> = partitions.into_iter().collect();
        let client = self.client()?;
        let listed = list_offsets(&client, topic, partitions.iter().copied(), which, timeout);
        let complete = listed
            .as_ref()
            .is_ok_and(|offsets| partitions.iter().all(|p| offsets.contains_key(p)));
        if !complete {
            self.retire(&client);
        }
        listed
    }

    fn client(&self) -> Result<Arc<BaseConsumer<QuietContext>>, KafkaError> {
        let mut kept = self.client.lock().expect("changelog ends lock poisoned");
        if let Some(client) = kept.as_ref() {
            return Ok(client.clone());
        }
        let client: Arc<BaseConsumer<QuietContext>> = Arc::new(
            self.kafka
                .client(ClientKind::Consumer)
                .set("isolation.level", "read_uncommitted")
                .create_with_context(self.context.clone())?,
        );
        *kept = Some(client.clone());
        Ok(client)
    }

    /// Drops `client` from use, unless another request already replaced it.
    fn retire(&self, client: &Arc<BaseConsumer<QuietContext>>) {
        let mut kept = self.client.lock().expect("changelog ends lock poisoned");
        if kept.as_ref().is_some_and(|k| Arc::ptr_eq(k, client)) {
            *kept = None;
        }
    }
}

impl IdleClient for ChangelogEnds {
    fn serve_events(&self) {
        let kept = self
            .client
            .lock()
            .expect("changelog ends lock poisoned")
            .clone();
        if let Some(client) = kept {
            client.serve_events();
        }
    }
}

/// The changelog value for a state: the envelope around the entity's state codec. An entity
/// with remembered command answers or pending timers (`acting`), or whose state encoding is
/// past version 1 ([`Entity::STATE_VERSION`]), gets the extended envelope
/// `[marker: 8 bytes][length: 4 bytes big-endian][answers, timers, version][state bytes]`,
/// where the marker is `-(last_offset + 3)`: always below -1, which no `last_offset` is, so
/// both shapes read back without a header and plain entities pay nothing.
pub(crate) fn encode<E: Entity>(stored: &Stored<E::State>) -> Result<Vec<u8>, EncodeError> {
    let state = <E::Codec as Codec<E::State>>::encode(&stored.state)?;
    let acting = stored.acting.as_deref().filter(|a| !a.is_empty());
    if acting.is_none() && E::STATE_VERSION == 1 {
        let mut value = Vec::with_capacity(8 + state.len());
        value.extend_from_slice(&stored.last_offset.to_be_bytes());
        value.extend_from_slice(&state);
        return Ok(value);
    }
    let runtime_part = Acting::encode(acting, E::STATE_VERSION);
    let mut value = Vec::with_capacity(12 + runtime_part.len() + state.len());
    value.extend_from_slice(&(-(stored.last_offset + 3)).to_be_bytes());
    value.extend_from_slice(&(runtime_part.len() as u32).to_be_bytes());
    value.extend_from_slice(&runtime_part);
    value.extend_from_slice(&state);
    Ok(value)
}

/// The state in a changelog value, upcast to this build's [`Entity::STATE_VERSION`].
pub(crate) fn decode<E: Entity>(value: &[u8]) -> Result<Stored<E::State>, DecodeError> {
    let short = || DecodeError(format!("{} bytes: shorter than the envelope", value.len()));
    let (first, rest) = value.split_first_chunk::<8>().ok_or_else(short)?;
    let first = i64::from_be_bytes(*first);
    if first >= -1 {
        return Ok(Stored::new(decode_state::<E>(1, rest)?, first));
    }
    let (length, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let length = u32::from_be_bytes(*length) as usize;
    if rest.len() < length {
        return Err(short());
    }
    let (runtime_part, state) = rest.split_at(length);
    let (acting, version) = Acting::decode(runtime_part)?;
    Ok(Stored {
        state: decode_state::<E>(version, state)?,
        last_offset: -first - 3,
        acting: (!acting.is_empty()).then(|| Box::new(acting)),
    })
}

/// A state's bytes written in encoding `version`: decoded, or migrated from an older version.
fn decode_state<E: Entity>(version: u32, bytes: &[u8]) -> Result<E::State, DecodeError> {
    let current = E::STATE_VERSION;
    match version.cmp(&current) {
        std::cmp::Ordering::Equal => <E::Codec as Codec<E::State>>::decode(bytes).map_err(|e| {
            DecodeError(format!("the state (version {version}) does not decode: {e}"))
        }),
        std::cmp::Ordering::Less => E::migrate(version, bytes).map_err(|e| {
            DecodeError(format!(
                "the state was written in version {version}, this build reads version {current}, and it does not migrate: {e}"
            ))
        }),
        std::cmp::Ordering::Greater => Err(DecodeError(format!(
            "the state was written in version {version} by a later build; this one reads up to version {current}"
        ))),
    }
}

/// A changelog value read from outside the runtime (inspection tools, benchmarks):
/// the entity's state and the offset, in the entity's input partition, of the last event
/// applied to it. A record without a value (a tombstone) deletes the entity.
pub fn decode_value<E: Entity>(value: &[u8]) -> Result<(E::State, i64), DecodeError> {
    decode::<E>(value).map(|stored| (stored.state, stored.last_offset))
}

/// A changelog record whose state this build cannot read. Its shard is refused rather than
/// restored without it: skipping the record would bring the entity back with an older state or
/// none (after a codec change, every entity), and its next checkpoint would overwrite the
/// state for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "changelog {topic} partition {partition} offset {offset} (entity {key}): {reason}. The shard \
     processes nothing until a build that reads this state runs (raise Entity::STATE_VERSION and \
     write Entity::migrate for an incompatible change)"
)]
pub struct UnreadableState {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    /// The record's key (lossily as text).
    pub key: String,
    pub reason: DecodeError,
}

/// Folds one changelog record into a partition's states (a tombstone deletes); restores and
/// standbys read the changelog alike. A record whose key or state cannot be read is an error:
/// see [`UnreadableState`].
///
/// Sets `timers` when the folded state holds a pending timer: only then must the shard that
/// takes the states walk every one of them for timers.
pub(crate) fn fold<E: Entity>(
    states: &mut EntityMap<Stored<E::State>>,
    timers: &mut bool,
    topic: &str,
    record: RawRecord<'_>,
) -> Result<(), UnreadableState> {
    let unreadable = |reason: String| UnreadableState {
        topic: topic.to_string(),
        partition: record.partition as u32,
        offset: record.offset,
        key: record
            .key
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_else(|| "(none)".into()),
        reason: DecodeError(reason),
    };
    let Some(id) = record.key.and_then(|k| std::str::from_utf8(k).ok()) else {
        return Err(unreadable("the record has no UTF-8 key".into()));
    };
    let Some(value) = record.payload else {
        states.remove(id);
        return Ok(());
    };
    let stored = decode::<E>(value).map_err(|e| unreadable(e.0))?;
    *timers |= stored.acting.as_ref().is_some_and(|a| !a.timers.is_empty());
    states.insert(EntityId::from(id), stored);
    Ok(())
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
    use crate::entity::Prost;

    #[test]
    fn a_state_survives_its_envelope() {
        let mut stored = Stored::new(
            SumState {
                count: 3,
                sum: 4_250,
            },
            77,
        );
        assert_eq!(
            decode::<Sum>(&encode::<Sum>(&stored).unwrap()).unwrap(),
            stored
        );
        // With remembered answers: the extended envelope, at every offset a state can have.
        for last_offset in [-1, 0, 77, i64::MAX - 3] {
            stored.last_offset = last_offset;
            let mut acting = crate::acting::Acting::default();
            acting
                .remembered
                .remember("key-1".into(), crate::commands::failed("no".into()), 5);
            acting
                .timers
                .set(crate::timers::PendingTimer::new("t", 7, &[1, 2], None));
            stored.acting = Some(Box::new(acting));
            let value = encode::<Sum>(&stored).unwrap();
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

    fn record(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        offset: i64,
    ) -> rdkafka::message::OwnedMessage {
        rdkafka::message::OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "cl".into(),
            rdkafka::Timestamp::NotAvailable,
            3,
            offset,
            None,
        )
    }

    #[test]
    fn records_fold_to_the_latest_state_and_tombstones_delete() {
        let mut states = EntityMap::default();
        let mut timers = false;
        let s1 = Stored::new(SumState { count: 1, sum: 10 }, 4);
        let s2 = Stored::new(SumState { count: 2, sum: 30 }, 9);
        let value = |s: &Stored<SumState>| encode::<Sum>(s).unwrap();
        for (key, value) in [
            (Some(&b"7"[..]), Some(value(&s1))),
            (Some(b"8"), Some(value(&s1))),
            (Some(b"7"), Some(value(&s2))),
            (Some(b"8"), None),
        ] {
            fold::<Sum>(
                &mut states,
                &mut timers,
                "cl",
                RawRecord::detached(&record(key, value.as_deref(), 0)),
            )
            .unwrap();
        }
        assert_eq!(states.len(), 1);
        assert_eq!(states["7"], s2);
        assert!(!timers, "no state held a timer");
    }

    #[test]
    fn a_folded_state_with_a_pending_timer_is_flagged() {
        let mut states = EntityMap::default();
        let mut timers = false;
        let mut alarm = Stored::new(SumState::default(), 2);
        let value = |s: &Stored<SumState>| encode::<Sum>(s).unwrap();
        let fold_value = |states: &mut _, timers: &mut bool, value: &[u8]| {
            fold::<Sum>(
                states,
                timers,
                "cl",
                RawRecord::detached(&record(Some(b"a"), Some(value), 0)),
            )
            .unwrap()
        };
        // Remembered answers alone are no timer.
        alarm.acting.get_or_insert_default().remembered.remember(
            "key-1".into(),
            crate::commands::failed("no".into()),
            5,
        );
        fold_value(&mut states, &mut timers, &value(&alarm));
        assert!(!timers);
        alarm
            .acting
            .get_or_insert_default()
            .timers
            .set(crate::timers::PendingTimer::new("t", 7, &[], None));
        fold_value(&mut states, &mut timers, &value(&alarm));
        assert!(timers, "the state holds a timer");
        // Once set, the flag stays: a later state of the same entity may have dropped the
        // timer, and scanning for none is only a cost.
        fold_value(
            &mut states,
            &mut timers,
            &value(&Stored::new(SumState::default(), 3)),
        );
        assert!(timers);
    }

    #[test]
    fn a_record_that_does_not_decode_is_an_error_naming_where_it_is() {
        let mut states = EntityMap::default();
        let mut timers = false;
        let error = fold::<Sum>(
            &mut states,
            &mut timers,
            "cl",
            RawRecord::detached(&record(Some(b"u9"), Some(b"\xff\xff"), 41)),
        )
        .unwrap_err();
        assert_eq!(
            (
                error.topic.as_str(),
                error.partition,
                error.offset,
                error.key.as_str()
            ),
            ("cl", 3, 41, "u9")
        );
        assert!(
            error.to_string().contains("shorter than the envelope"),
            "{error}"
        );
        let garbage = [&7i64.to_be_bytes()[..], b"\xff\xff\xff"].concat();
        let error = fold::<Sum>(
            &mut states,
            &mut timers,
            "cl",
            RawRecord::detached(&record(Some(b"u9"), Some(&garbage), 42)),
        )
        .unwrap_err();
        assert!(error.to_string().contains("does not decode"), "{error}");
        let valid = encode::<Sum>(&Stored::new(SumState::default(), 1)).unwrap();
        assert!(fold::<Sum>(
            &mut states,
            &mut timers,
            "cl",
            RawRecord::detached(&record(None, Some(&valid), 43))
        )
        .is_err());
        assert!(states.is_empty(), "nothing folded from unreadable records");
    }

    /// [`Sum`] after an incompatible change: sums in hundredths, state version 2.
    struct SumInCents;

    impl Entity for SumInCents {
        type Event = i64;
        type State = SumState;
        type Query = SumState;
        type Reply = SumState;
        type Codec = Prost;
        const STATE_VERSION: u32 = 2;

        fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, crate::entity::Rejection> {
            Sum::decode(id, value)
        }
        fn apply(state: &mut SumState, event: &i64) {
            Sum::apply(state, &(event * 100))
        }
        fn query(state: &SumState, _: &SumState) -> SumState {
            state.clone()
        }
        fn migrate(version: u32, bytes: &[u8]) -> Result<SumState, DecodeError> {
            assert_eq!(version, 1);
            let mut state = <Prost as Codec<SumState>>::decode(bytes)?;
            state.sum *= 100;
            Ok(state)
        }
    }

    #[test]
    fn older_states_are_migrated_and_newer_ones_refused() {
        let v1 = encode::<Sum>(&Stored::new(SumState { count: 2, sum: 7 }, 5)).unwrap();
        let migrated = decode::<SumInCents>(&v1).unwrap();
        assert_eq!(migrated, Stored::new(SumState { count: 2, sum: 700 }, 5));
        // Written back in version 2, it reads as itself (not migrated again).
        let v2 = encode::<SumInCents>(&migrated).unwrap();
        assert_eq!(decode::<SumInCents>(&v2).unwrap(), migrated);
        let newer = decode::<Sum>(&v2).unwrap_err();
        assert!(newer.0.contains("version 2 by a later build"), "{newer}");
        // Without a migration, an older state is refused, not defaulted.
        struct NoMigration;
        impl Entity for NoMigration {
            type Event = i64;
            type State = SumState;
            type Query = SumState;
            type Reply = SumState;
            type Codec = Prost;
            const STATE_VERSION: u32 = 2;
            fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, crate::entity::Rejection> {
                Sum::decode(id, value)
            }
            fn apply(state: &mut SumState, event: &i64) {
                Sum::apply(state, event)
            }
            fn query(state: &SumState, _: &SumState) -> SumState {
                state.clone()
            }
        }
        let refused = decode::<NoMigration>(&v1).unwrap_err();
        assert!(refused.0.contains("written in version 1"), "{refused}");
        assert!(
            refused.0.contains("no migration from state version 1"),
            "{refused}"
        );
    }

    /// The ends client is kept while it answers for every partition asked, and replaced after
    /// a request that left one out (a stale client's "leader not available" looks the same).
    #[test]
    fn the_ends_client_is_kept_while_it_answers_and_replaced_when_it_does_not() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("changelog", 2, 1).unwrap();
        let kafka = KafkaConnection::new(cluster.bootstrap_servers());
        let context = QuietContext::new(crate::kafka_health::KafkaHealth::new(&kafka));
        let ends = ChangelogEnds::new(&kafka, &context).unwrap();
        let kept = |ends: &ChangelogEnds| ends.client.lock().unwrap().clone();
        let first = kept(&ends).unwrap();
        let timeout = Duration::from_secs(10);
        let listed = ends
            .list("changelog", [0, 1], Offset::End, timeout)
            .unwrap();
        assert_eq!(listed, BTreeMap::from([(0, 0), (1, 0)]));
        assert!(
            Arc::ptr_eq(&first, &kept(&ends).unwrap()),
            "replaced while answering"
        );
        // Partition 7 does not exist: the broker gives no offset for it.
        let listed = ends.list("changelog", [0, 7], Offset::End, timeout);
        assert!(listed.map_or(true, |offsets| !offsets.contains_key(&7)));
        assert!(kept(&ends).is_none(), "kept after leaving a partition out");
        ends.list("changelog", [1], Offset::Beginning, timeout)
            .unwrap();
        assert!(
            !Arc::ptr_eq(&first, &kept(&ends).unwrap()),
            "no new client was made"
        );
    }
}
