//! The dead-letter topic: records that cannot be processed are copied there, with the reason and
//! their origin in headers, before the consumer commits past them. Nothing is dropped silently.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub const HEADER_REASON: &str = "dlq.reason";
pub const HEADER_TOPIC: &str = "dlq.source.topic";
pub const HEADER_PARTITION: &str = "dlq.source.partition";
pub const HEADER_OFFSET: &str = "dlq.source.offset";

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    runtime: tokio::runtime::Handle,
}

impl DeadLetters {
    pub fn new(
        bootstrap: &str,
        topic: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.into(),
            runtime,
        })
    }

    /// Copies `record` to the dead-letter topic, retrying until the broker acknowledges it.
    /// Blocks the calling (consumer) thread: malformed records are rare, and the consumer must
    /// not commit past one before it is safely stored.
    pub fn send_blocking(&self, record: &BorrowedMessage<'_>, reason: &str) {
        let partition = record.partition().to_string();
        let offset = record.offset().to_string();
        let mut attempt = 0u32;
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_REASON,
                    value: Some(reason),
                })
                .insert(Header {
                    key: HEADER_TOPIC,
                    value: Some(record.topic()),
                })
                .insert(Header {
                    key: HEADER_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: HEADER_OFFSET,
                    value: Some(offset.as_str()),
                });
            let mut out: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(key) = record.key() {
                out = out.key(key);
            }
            if let Some(value) = record.payload() {
                out = out.payload(value);
            }
            let delivery = self
                .runtime
                .block_on(self.producer.send(out, Duration::from_secs(10)));
            match delivery {
                Ok(_) => {
                    tracing::warn!(
                        "record {}/{} dead-lettered to {}: {reason}",
                        record.partition(),
                        record.offset(),
                        self.topic
                    );
                    return;
                }
                Err((e, _)) => {
                    attempt += 1;
                    tracing::error!(
                        "cannot dead-letter record {}/{} (attempt {attempt}): {e}",
                        record.partition(),
                        record.offset()
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}
