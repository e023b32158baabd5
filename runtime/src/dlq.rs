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

/// A record that could not be processed: what the shard keeps in its outbox until the next
/// checkpoint, and what a record of the dead-letter topic says ([`DeadLetter::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The record's key, as it was.
    pub key: Option<Vec<u8>>,
    /// The record's value, as it was.
    pub value: Option<Vec<u8>>,
    /// Why it could not be processed.
    pub reason: String,
    /// The topic it was read from.
    pub source_topic: String,
    /// Its partition there.
    pub source_partition: u32,
    /// Its offset there.
    pub source_offset: i64,
}

/// Why a record of a dead-letter topic is not a dead letter the runtime wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotADeadLetter {
    /// A header every dead letter has is missing.
    #[error("no {0} header")]
    Missing(&'static str),
    /// A header's value is not what the runtime writes there.
    #[error("its {header} header is not {expected}: {value:?}")]
    Malformed {
        /// The header.
        header: &'static str,
        /// What it should be.
        expected: &'static str,
        /// What it is (lossy UTF-8).
        value: String,
    },
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

    /// A record of a dead-letter topic read back: its key and value, and its headers in order
    /// (name, value). Other headers are ignored; the last of a repeated one counts.
    pub fn parse<'h>(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    ) -> Result<Self, NotADeadLetter> {
        let (mut reason, mut topic, mut partition, mut offset) = (None, None, None, None);
        for (name, header) in headers {
            let slot = match name {
                HEADER_REASON => &mut reason,
                HEADER_TOPIC => &mut topic,
                HEADER_PARTITION => &mut partition,
                HEADER_OFFSET => &mut offset,
                _ => continue,
            };
            *slot = Some(header.unwrap_or_default());
        }
        fn text<'v>(
            header: &'static str,
            value: Option<&'v [u8]>,
        ) -> Result<&'v str, NotADeadLetter> {
            let value = value.ok_or(NotADeadLetter::Missing(header))?;
            std::str::from_utf8(value).map_err(|_| NotADeadLetter::Malformed {
                header,
                expected: "UTF-8",
                value: String::from_utf8_lossy(value).into_owned(),
            })
        }
        fn number(header: &'static str, value: Option<&[u8]>) -> Result<i64, NotADeadLetter> {
            let value = text(header, value)?;
            value.parse::<i64>().map_err(|_| NotADeadLetter::Malformed {
                header,
                expected: "a number",
                value: value.to_string(),
            })
        }
        let source_partition = number(HEADER_PARTITION, partition)?;
        Ok(Self {
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            reason: text(HEADER_REASON, reason)?.to_string(),
            source_topic: text(HEADER_TOPIC, topic)?.to_string(),
            source_partition: u32::try_from(source_partition).map_err(|_| {
                NotADeadLetter::Malformed {
                    header: HEADER_PARTITION,
                    expected: "a partition",
                    value: source_partition.to_string(),
                }
            })?,
            source_offset: number(HEADER_OFFSET, offset)?,
        })
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

    #[test]
    fn a_dead_letter_read_back_is_the_one_written_and_anything_else_is_refused() {
        let letter = DeadLetter {
            key: Some(b"7".to_vec()),
            value: None,
            reason: "no value".into(),
            source_topic: "events".into(),
            source_partition: 3,
            source_offset: 9,
        };
        let written = letter.headers();
        let mut headers: Vec<(&str, Option<&[u8]>)> =
            written.iter().map(|h| (h.key, h.value)).collect();
        headers.insert(0, ("someone.else", Some(b"x".as_slice())));
        assert_eq!(
            DeadLetter::parse(Some(b"7"), None, headers.iter().copied()),
            Ok(letter)
        );
        assert_eq!(
            DeadLetter::parse(None, None, headers[..4].iter().copied()),
            Err(NotADeadLetter::Missing(HEADER_OFFSET))
        );
        headers[3] = (HEADER_PARTITION, Some(b"-1".as_slice()));
        assert!(matches!(
            DeadLetter::parse(None, None, headers.iter().copied()),
            Err(NotADeadLetter::Malformed {
                header: HEADER_PARTITION,
                ..
            })
        ));
    }
}
