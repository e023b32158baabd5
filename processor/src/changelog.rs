//! The changelog's record format, and the check that a changelog belongs to this input topic.
//!
//! One record per changed entity: key = user id, value = `StoredEntity` (totals and the input
//! offset of the last event applied), header `input.topic` = the topic those offsets are
//! offsets of. A state's `last_offset` only means something for that topic: restored into a
//! node consuming another topic, it would make entities skip that topic's events as replays.
//! The node therefore refuses, at start, a changelog written for another topic.

use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::cluster::wire::StoredEntity;
use crate::entity::{EntityState, Totals};
use crate::kafka_admin::list_offsets;

/// Header on every changelog record: the input topic its state's offsets refer to.
pub const HEADER_INPUT_TOPIC: &str = "input.topic";

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
    #[error("cannot read changelog topic {changelog}: {reason}")]
    Unreadable { changelog: String, reason: String },
}

/// The changelog value for a state.
pub fn encode_state(state: &EntityState) -> Vec<u8> {
    StoredEntity {
        purchases: state.totals.purchases,
        amount_spent: state.totals.amount_spent,
        last_offset: state.last_offset,
    }
    .encode_to_vec()
}

/// The state in a changelog value.
pub fn decode_state(value: &[u8]) -> Result<EntityState, prost::DecodeError> {
    let stored = StoredEntity::decode(value)?;
    Ok(EntityState {
        totals: Totals {
            purchases: stored.purchases,
            amount_spent: stored.amount_spent,
        },
        last_offset: stored.last_offset,
    })
}

/// The headers every changelog record of a node consuming `input_topic` carries.
pub fn record_headers(input_topic: &str) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: HEADER_INPUT_TOPIC,
        value: Some(input_topic),
    })
}

/// Fails unless `changelog` is empty or its first record was written for `input_topic`.
/// Blocking: a few broker round trips, plus one fetch when the changelog has records.
pub fn check_written_for(
    bootstrap: &str,
    changelog: &str,
    input_topic: &str,
    partitions: u32,
) -> Result<(), ChangelogError> {
    let unreadable = |e: KafkaError| ChangelogError::Unreadable {
        changelog: changelog.into(),
        reason: e.to_string(),
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
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
                let written_for = record
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == HEADER_INPUT_TOPIC))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                return match written_for {
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

    #[test]
    fn a_state_survives_its_encoding() {
        let state = EntityState {
            totals: Totals {
                purchases: 3,
                amount_spent: 4_250,
            },
            last_offset: 77,
        };
        assert_eq!(decode_state(&encode_state(&state)).unwrap(), state);
        assert!(decode_state(b"\xff\xff garbage").is_err());
    }

    #[test]
    fn records_are_labelled_with_their_input_topic() {
        let headers = record_headers("user-events");
        let header = headers
            .iter()
            .find(|h| h.key == HEADER_INPUT_TOPIC)
            .expect("header");
        assert_eq!(header.value, Some(&b"user-events"[..]));
    }
}
