//! Sending a command: the record the sending node writes, and what the owner reads back from
//! its headers.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::pending::PendingCommands;
use super::{headers, CommandError};
use crate::cluster::wire::CommandOutcome;
use crate::kafka_config::{ClientKind, KafkaConnection};
use crate::kafka_health::QuietContext;
use crate::partitioner::partition_for_key;

/// Who sent a command, as its record's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandMeta {
    pub reply_to: String,
    pub request: u64,
    pub idempotency_key: Option<String>,
    /// The record's timestamp (ms since the epoch): remembered answers expire by it.
    pub at_ms: i64,
}

impl CommandMeta {
    /// `None` for a record that is not a command; `Some(Err)` for a command whose headers are
    /// malformed (written by something other than a node).
    pub fn from_headers<'h>(
        headers: impl IntoIterator<Item = Header<'h, &'h [u8]>>,
        at_ms: i64,
    ) -> Option<Result<Self, String>> {
        let (mut reply_to, mut request, mut key) = (None, None, None);
        for header in headers {
            match header.key {
                headers::REPLY_TO => reply_to = header.value,
                headers::REQUEST => request = header.value,
                headers::IDEMPOTENCY_KEY => key = header.value,
                _ => {}
            }
        }
        let request = request?;
        let text = |v: &[u8], what: &str| {
            std::str::from_utf8(v)
                .map(str::to_owned)
                .map_err(|_| format!("command header {what} is not UTF-8"))
        };
        Some((|| {
            Ok(Self {
                reply_to: text(
                    reply_to.ok_or("command without a reply_to header")?,
                    headers::REPLY_TO,
                )?,
                request: text(request, headers::REQUEST)?
                    .parse()
                    .map_err(|e| format!("command header {}: {e}", headers::REQUEST))?,
                idempotency_key: key.map(|k| text(k, headers::IDEMPOTENCY_KEY)).transpose()?,
                at_ms,
            })
        })())
    }
}

/// Writes one entity type's commands to its input topic and waits for their answers.
pub(crate) struct CommandSender {
    producer: FutureProducer<QuietContext>,
    topic: String,
    partitions: u32,
    pending: Arc<PendingCommands>,
    /// How long a command may wait for its answer, the write included.
    timeout: Duration,
}

impl CommandSender {
    pub fn new(
        kafka: &KafkaConnection,
        context: QuietContext,
        topic: &str,
        partitions: u32,
        pending: Arc<PendingCommands>,
        timeout: Duration,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        // Idempotent and acknowledged by every in-sync replica: a command the write reports
        // as done is in the topic for its owner to read.
        let producer = kafka
            .client_with(ClientKind::Producer, &[("linger.ms", "1")])
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            .create_with_context(context)?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            partitions,
            pending,
            timeout,
        })
    }

    /// How long a command may wait for its answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Writes the command `value` for entity `id` and waits for its committed answer.
    pub async fn send(
        &self,
        id: &str,
        value: Vec<u8>,
        idempotency_key: Option<&str>,
    ) -> Result<CommandOutcome, CommandError> {
        super::check(id, idempotency_key)?;
        let mut waiting = self.pending.register();
        let request = waiting.request.to_string();
        let mut record_headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: headers::REPLY_TO,
                value: Some(self.pending.local_node().as_bytes()),
            })
            .insert(Header {
                key: headers::REQUEST,
                value: Some(request.as_bytes()),
            });
        if let Some(key) = idempotency_key {
            record_headers = record_headers.insert(Header {
                key: headers::IDEMPOTENCY_KEY,
                value: Some(key.as_bytes()),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .partition(partition_for_key(id.as_bytes(), self.partitions) as i32)
            .key(id)
            .payload(&value)
            .headers(record_headers);
        let answered = async {
            self.producer
                .send(record, self.timeout)
                .await
                .map_err(|(e, _)| CommandError::Unavailable(format!("writing the command: {e}")))?;
            waiting
                .outcome()
                .await
                .ok_or_else(|| CommandError::Unavailable("the node stopped".into()))
        };
        match tokio::time::timeout(self.timeout, answered).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CommandError::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}
