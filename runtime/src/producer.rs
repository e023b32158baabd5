//! Writing an entity type's input from an application: a producer that puts each record on its
//! key's shard exactly as the runtime computes it (Kafka's Java murmur2 over the key), and
//! creates the topic when it is missing.
//!
//! Any other producer works if it does the same: key = the entity id (UTF-8, 1 to
//! [`crate::MAX_ID_BYTES`] bytes) and the partition of the Java client's default partitioner
//! (librdkafka: `partitioner=murmur2_random`; its own default, `consistent_random`, is CRC32
//! and puts keys elsewhere). A record on another partition is still applied, once, but
//! re-routed through Kafka by the node that reads it (`events_forwarded_out`).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::kafka_admin::{ensure_topic, AdminError};
use crate::kafka_config::{ClientKind, KafkaConnection};
use crate::partitioner::partition_for_key;
use crate::MAX_ID_BYTES;

/// How long one send may wait for the broker's acknowledgement.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The topic could not be found or created.
    #[error(transparent)]
    Topic(#[from] AdminError),
    /// The key is not an entity id the runtime accepts.
    #[error("an entity id (the key) must be 1 to {MAX_ID_BYTES} bytes, got {0}")]
    InvalidKey(usize),
    /// The producer could not be created or the broker did not acknowledge the record.
    #[error("cannot write to Kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Writes records keyed by entity id to their shard's partition: idempotent, acknowledged by
/// all in-sync replicas.
pub struct KeyedProducer {
    producer: FutureProducer,
    topic: String,
    partitions: u32,
}

impl KeyedProducer {
    /// A producer for `topic`, created with `partitions` partitions (and the broker's default
    /// replication) if it does not exist; an existing topic keeps its own partition count.
    pub async fn create(
        kafka: &KafkaConnection,
        topic: &str,
        partitions: u32,
    ) -> Result<Self, ProducerError> {
        let partitions = ensure_topic(kafka, topic, partitions, -1, &[]).await?;
        let producer = kafka
            .client(ClientKind::Producer)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.into(),
            partitions,
        })
    }

    /// The topic's partition count (= the entity type's shard count).
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Writes `value` for entity `id`; returns the partition and offset it got.
    pub async fn send(&self, id: &str, value: &[u8]) -> Result<(u32, i64), ProducerError> {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(ProducerError::InvalidKey(id.len()));
        }
        let partition = partition_for_key(id.as_bytes(), self.partitions);
        let record = FutureRecord::to(&self.topic)
            .key(id)
            .payload(value)
            .partition(partition as i32);
        match self.producer.send(record, SEND_TIMEOUT).await {
            Ok(delivery) => Ok((delivery.partition as u32, delivery.offset)),
            Err((e, _)) => Err(e.into()),
        }
    }
}
