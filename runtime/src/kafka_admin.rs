//! Topic metadata and creation (shared with the producer binary).

use std::time::{Duration, Instant};

/// How long a created topic may take to appear in the metadata.
const METADATA_WAIT: Duration = Duration::from_secs(30);

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka_config::{ClientKind, KafkaConnection};
use crate::kafka_health::QuietContext;

/// A topic could not be found or created (each variant's message says which and why).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum AdminError {
    #[error("cannot reach Kafka at {bootstrap}: {reason}")]
    Unreachable { bootstrap: String, reason: String },
    #[error("Kafka at {bootstrap} refused this client's credentials or permissions: {reason}")]
    NotAuthorized { bootstrap: String, reason: String },
    #[error("topic {topic} does not exist (after waiting {waited_s} s)")]
    NoSuchTopic { topic: String, waited_s: u64 },
    #[error("cannot create topic {topic}: {reason}")]
    Create { topic: String, reason: String },
}

/// Remembers the last error a client reported: librdkafka tells a refused login through the
/// error callback, while the request that needed the connection only times out.
#[derive(Default)]
struct LastError(std::sync::Mutex<Option<rdkafka::error::KafkaError>>);

impl LastError {
    fn take(&self) -> Option<rdkafka::error::KafkaError> {
        self.0.lock().expect("last error lock poisoned").take()
    }
}

impl rdkafka::ClientContext for LastError {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!("librdkafka: {error}: {reason}");
        *self.0.lock().expect("last error lock poisoned") = Some(error);
    }
}

impl ConsumerContext for LastError {}

/// How a topic is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLayout {
    pub partitions: u32,
    /// Replicas of its first partition.
    pub replication: i32,
}

/// The layout of `topic`, or `None` if the topic does not exist (one metadata request).
pub fn topic_layout(
    kafka: &KafkaConnection,
    topic: &str,
) -> Result<Option<TopicLayout>, AdminError> {
    let consumer: BaseConsumer<LastError> = kafka
        .client(ClientKind::Consumer)
        .create_with_context(LastError::default())
        .map_err(|e| AdminError::Unreachable {
            bootstrap: kafka.bootstrap.clone(),
            reason: kafka.describe(&e),
        })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| metadata_error(kafka, &consumer, &e))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| TopicLayout {
            partitions: t.partitions().len() as u32,
            replication: t.partitions()[0].replicas().len() as i32,
        }))
}

/// Why a metadata request failed: a refused login if the client reported one, else the
/// cluster was not reached.
fn metadata_error(
    kafka: &KafkaConnection,
    consumer: &BaseConsumer<LastError>,
    failed: &rdkafka::error::KafkaError,
) -> AdminError {
    // Error events reach the context only through poll (nothing is subscribed, so these polls
    // return no records).
    for _ in 0..3 {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let bootstrap = kafka.bootstrap.clone();
    match consumer.context().take() {
        Some(cause)
            if cause
                .rdkafka_error_code()
                .is_some_and(crate::kafka_health::is_authorization) =>
        {
            AdminError::NotAuthorized {
                bootstrap,
                reason: kafka.describe(&cause),
            }
        }
        Some(cause) => AdminError::Unreachable {
            bootstrap,
            reason: format!("{} ({})", kafka.describe(failed), kafka.describe(&cause)),
        },
        None => AdminError::Unreachable {
            bootstrap,
            reason: kafka.describe(failed),
        },
    }
}

/// Waits until `topic` exists, logging while it waits, and returns its layout.
pub fn wait_for_topic(
    kafka: &KafkaConnection,
    topic: &str,
    wait: Duration,
) -> Result<TopicLayout, AdminError> {
    let started = Instant::now();
    let mut next_log = Instant::now();
    loop {
        if let Some(layout) = topic_layout(kafka, topic)? {
            return Ok(layout);
        }
        if started.elapsed() >= wait {
            return Err(AdminError::NoSuchTopic {
                topic: topic.into(),
                waited_s: wait.as_secs(),
            });
        }
        if Instant::now() >= next_log {
            tracing::info!("waiting for topic {topic} to be created (e.g. by the producer)");
            next_log = Instant::now() + Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Creates `topic` with `partitions` partitions and `replication` replicas (-1: the broker's
/// `default.replication.factor`) unless it exists; returns its partition count.
pub async fn ensure_topic(
    kafka: &KafkaConnection,
    topic: &str,
    partitions: u32,
    replication: i32,
    config: &[(&str, &str)],
) -> Result<u32, AdminError> {
    if let Some(layout) = topic_layout(kafka, topic)? {
        return Ok(layout.partitions);
    }
    let admin: AdminClient<DefaultClientContext> = kafka
        .client(ClientKind::Admin)
        .create()
        .map_err(|e| AdminError::Unreachable {
            bootstrap: kafka.bootstrap.clone(),
            reason: kafka.describe(&e),
        })?;
    let mut new_topic = NewTopic::new(
        topic,
        partitions as i32,
        TopicReplication::Fixed(replication),
    );
    for (k, v) in config {
        new_topic = new_topic.set(k, v);
    }
    let results = admin
        .create_topics(
            &[new_topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| AdminError::Create {
            topic: topic.into(),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(_) => tracing::info!("created topic {topic} with {partitions} partitions"),
            // Another process created it first: fine.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(AdminError::Create {
                    topic: topic.into(),
                    reason: code.to_string(),
                })
            }
        }
    }
    // Metadata lags creation: briefly on a fresh broker, for seconds on one just started with
    // thousands of partitions to load.
    let deadline = Instant::now() + METADATA_WAIT;
    while Instant::now() < deadline {
        if let Some(layout) = topic_layout(kafka, topic)? {
            return Ok(layout.partitions);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(AdminError::NoSuchTopic {
        topic: topic.into(),
        waited_s: METADATA_WAIT.as_secs(),
    })
}

/// Every one of `partitions`' first (`Offset::Beginning`) or end (`Offset::End`) offset, in one
/// ListOffsets request. The end is the high watermark for a read_uncommitted `client`, the last
/// stable offset for a read_committed one. Partitions the broker gave no offset for are absent.
pub fn list_offsets<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
    partitions: impl IntoIterator<Item = u32>,
    which: Offset,
    timeout: Duration,
) -> KafkaResult<std::collections::BTreeMap<u32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p as i32, which)?;
    }
    Ok(offsets_by_partition(
        &client.offsets_for_times(tpl, timeout)?,
    ))
}

/// `partitions` of `topic`, as a list to ask about.
fn partition_list(topic: &str, partitions: impl IntoIterator<Item = u32>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, p as i32);
    }
    tpl
}

/// The valid (non-negative) offsets in `tpl`, by partition.
pub fn offsets_by_partition(tpl: &TopicPartitionList) -> std::collections::BTreeMap<u32, i64> {
    tpl.elements()
        .iter()
        .filter_map(|e| {
            Some((
                e.partition() as u32,
                e.offset().to_raw().filter(|o| *o >= 0)?,
            ))
        })
        .collect()
}

/// A client of `group` that never joins it, for reading the group's committed offsets (the lag
/// probe, the restorer). read_committed: it asks for *stable* offsets, i.e. the broker answers
/// only once no transaction has offsets pending for the partitions asked.
pub fn group_offsets_client(
    kafka: &KafkaConnection,
    group: &str,
    context: QuietContext,
) -> KafkaResult<BaseConsumer<QuietContext>> {
    kafka
        .client(ClientKind::Consumer)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create_with_context(context)
}

/// The group's committed offset of each of `partitions` (absent when none), through a
/// [`group_offsets_client`]; waits (up to `timeout`) while a transaction has offsets pending.
pub fn committed_offsets<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
    partitions: impl IntoIterator<Item = u32>,
    timeout: Duration,
) -> KafkaResult<std::collections::BTreeMap<u32, i64>> {
    Ok(offsets_by_partition(&client.committed_offsets(
        partition_list(topic, partitions),
        timeout,
    )?))
}

/// The committer (`fencing::committer`) of the group's stable committed offset of each of
/// `partitions` that has one, through a [`group_offsets_client`]; waits like
/// [`committed_offsets`].
pub fn committers<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
    partitions: impl IntoIterator<Item = u32>,
    timeout: Duration,
) -> KafkaResult<std::collections::BTreeMap<u32, String>> {
    let committed = client.committed_offsets(partition_list(topic, partitions), timeout)?;
    // SAFETY: `committed` owns the list and outlives this borrow; librdkafka keeps `cnt`
    // elements at `elems`, each with `metadata_size` bytes at `metadata` (or none when null).
    // Read raw because rust-rdkafka's `metadata()` panics on metadata that is not UTF-8, which
    // any client may have committed.
    let elements = unsafe {
        let list = &*committed.ptr();
        std::slice::from_raw_parts(list.elems, list.cnt.max(0) as usize)
    };
    Ok(elements
        .iter()
        .filter(|e| !e.metadata.is_null() && e.metadata_size > 0 && e.partition >= 0)
        .filter_map(|e| {
            // SAFETY: as above.
            let bytes =
                unsafe { std::slice::from_raw_parts(e.metadata as *const u8, e.metadata_size) };
            let node = crate::fencing::committer(std::str::from_utf8(bytes).ok()?)?;
            Some((e.partition as u32, node.to_string()))
        })
        .collect())
}

/// Turns on librdkafka's debug `contexts` (e.g. `fetch`), if any, for a client built from `config`.
pub fn with_debug<'a>(
    config: &'a mut ClientConfig,
    contexts: Option<&str>,
) -> &'a mut ClientConfig {
    if let Some(contexts) = contexts {
        config
            .set("debug", contexts)
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    config
}
