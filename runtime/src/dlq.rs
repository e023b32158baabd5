//! Dead letters: records that cannot be processed, copied to the dead-letter topic with the
//! reason and their origin in headers. Nothing is dropped silently.
//!
//! A dead letter is written inside the checkpoint transaction that commits past its record (the
//! shard keeps it in its outbox like a re-routed event), so it is stored exactly once, and the
//! poll loop never waits for the broker to take it: while Kafka is away the poll loop would
//! otherwise block past `max.poll.interval.ms`.

use rdkafka::message::{Header, OwnedHeaders};

use crate::kafka_batch::RawRecord;

/// Why the record could not be processed.
pub const HEADER_REASON: &str = "dlq.reason";
/// The topic the record was read from.
pub const HEADER_TOPIC: &str = "dlq.source.topic";
/// Its partition.
pub const HEADER_PARTITION: &str = "dlq.source.partition";
/// Its offset.
pub const HEADER_OFFSET: &str = "dlq.source.offset";

/// A malformed record, waiting in its shard's outbox for the next checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub reason: String,
    pub source_topic: String,
    pub source_partition: u32,
    pub source_offset: i64,
}

impl DeadLetter {
    pub(crate) fn of(record: &RawRecord<'_>, topic: &str, reason: String) -> Self {
        Self {
            key: record.key.map(<[u8]>::to_vec),
            value: record.payload.map(<[u8]>::to_vec),
            reason,
            source_topic: topic.to_string(),
            source_partition: record.partition as u32,
            source_offset: record.offset,
        }
    }

    /// The headers saying why and where from.
    pub fn headers(&self) -> OwnedHeaders {
        let partition = self.source_partition.to_string();
        let offset = self.source_offset.to_string();
        OwnedHeaders::new()
            .insert(Header {
                key: HEADER_REASON,
                value: Some(self.reason.as_str()),
            })
            .insert(Header {
                key: HEADER_TOPIC,
                value: Some(self.source_topic.as_str()),
            })
            .insert(Header {
                key: HEADER_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: HEADER_OFFSET,
                value: Some(offset.as_str()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn headers_carry_reason_and_origin() {
        let letter = DeadLetter {
            key: None,
            value: Some(b"garbage".to_vec()),
            reason: "record has no key".into(),
            source_topic: "events".into(),
            source_partition: 7,
            source_offset: 42,
        };
        let headers = letter.headers();
        let found: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap()).to_string(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (HEADER_REASON, "record has no key"),
                (HEADER_TOPIC, "events"),
                (HEADER_PARTITION, "7"),
                (HEADER_OFFSET, "42")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
