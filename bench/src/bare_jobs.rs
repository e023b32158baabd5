//! Plain rdkafka programs doing the jobs the runtime does, with no runtime: what the broker and
//! librdkafka on this machine give a program that keeps state as a changelog record per entity,
//! committed in Kafka transactions. A row beside the runtime's own in the same run says what the
//! runtime costs or saves against writing it by hand. They are references, not bounds: the
//! runtime can beat them (it overlaps work these do one step after another).
//!
//! - [`bare_writes`]: the changelog records of new entities alone, from memory, nothing read.
//! - [`bare_pipeline`]: read a topic and write one record per distinct key changed since the
//!   last transaction (the last value read for it) to a compacted changelog partition of the
//!   same number, in transactions that carry the consumed offsets, begun every 500 ms or at
//!   100 000 pending keys, written on a thread of their own while reading goes on (the node's
//!   checkpoint policy and thread). No decoding, no entities, no headers.
//! - [`bare_transactions`]: transactions of N changelog records for N accounts, back to back on
//!   one or more transactional producers, with or without consumed offsets: the commits callers
//!   need that each wait for their change to commit (a command's reply), at most N per
//!   transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kafka_sharding::partitioner::partition_for_key;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(30);
/// The node's defaults: a checkpoint every 500 ms, or as soon as 100 000 states are pending.
const INTERVAL: Duration = Duration::from_millis(500);
const BACKLOG: usize = 100_000;

/// Creates `name` as the node creates a changelog: compacted, `partitions` partitions.
pub async fn create_changelog(bootstrap: &str, name: &str, partitions: u32) -> anyhow::Result<()> {
    kafka_sharding::admin::ensure_topic(
        &kafka_sharding::KafkaConnection::new(bootstrap),
        name,
        partitions,
        -1,
        kafka_sharding::CHANGELOG_TOPIC_CONFIG,
    )
    .await?;
    Ok(())
}

/// A transactional producer set up as the node's checkpoint producer is.
fn transactional(
    bootstrap: &str,
    id: &str,
) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    let mut config = ClientConfig::new();
    for (key, value) in kafka_sharding::CHECKPOINT_PRODUCER_DEFAULTS {
        config.set(*key, *value);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = config
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    producer.init_transactions(TIMEOUT)?;
    Ok(producer)
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Waits for every record sent to be acknowledged, as the node's checkpoint does.
fn delivered(producer: &ThreadedProducer<DefaultProducerContext>) -> anyhow::Result<()> {
    Ok(kafka_sharding::delivered(
        producer,
        Instant::now() + TIMEOUT,
    )?)
}

/// What one bare pipeline run did.
pub struct PipelineRun {
    pub records: u64,
    pub states: u64,
    pub transactions: u64,
    /// From assigning the partitions to the last transaction committed (its offsets at the end).
    pub time: Duration,
}

/// The changed keys and the offsets after them, handed from the reader to the writer.
struct Batch {
    states: HashMap<Vec<u8>, (i32, Vec<u8>)>,
    offsets: Vec<(i32, i64)>,
}

/// Reads `topic` from the start to `ends` (read_committed) and writes each changed key's last
/// value to `changelog` (compacted, as many partitions) in transactions with the offsets of
/// group `group`. See the module's comment.
pub fn bare_pipeline(
    bootstrap: &str,
    topic: &str,
    ends: &BTreeMap<u32, i64>,
    changelog: &str,
    group: &str,
) -> anyhow::Result<PipelineRun> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .create()?;
    let metadata = consumer
        .group_metadata()
        .context("the pipeline consumer's group metadata")?;
    let producer = transactional(bootstrap, &format!("{group}-pipeline"))?;
    let (to_writer, batches) = sync_channel::<Batch>(1);
    // Whether the writer waits for a batch: the reader hands one over only then, as the node
    // starts a checkpoint only when the one in flight has ended.
    let idle = Arc::new(AtomicBool::new(true));
    let (topic_name, changelog_name, writer_idle) =
        (topic.to_string(), changelog.to_string(), idle.clone());
    let writer = std::thread::Builder::new()
        .name("bare-pipeline-writer".into())
        .spawn(move || {
            write_batches(
                &producer,
                &batches,
                &writer_idle,
                &topic_name,
                &changelog_name,
                &metadata,
            )
        })?;

    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p as i32, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let positions = |consumer: &BaseConsumer| -> anyhow::Result<Vec<(i32, i64)>> {
        Ok(consumer
            .position()?
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                // Partitions nothing was read from yet have no position to commit.
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect())
    };
    let (mut records, mut since_check) = (0u64, 0u32);
    let mut pending: HashMap<Vec<u8>, (i32, Vec<u8>)> = HashMap::new();
    let mut handed = Instant::now();
    loop {
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(message) = &polled {
            let message = message
                .as_ref()
                .map_err(|e| anyhow::anyhow!("pipeline consumer: {e}"))?;
            records += 1;
            since_check += 1;
            let key = message.key().unwrap_or_default();
            let value = message.payload().unwrap_or_default().to_vec();
            match pending.get_mut(key) {
                Some(state) => state.1 = value,
                None => {
                    pending.insert(key.to_vec(), (message.partition(), value));
                }
            }
        }
        let due = pending.len() >= BACKLOG || (handed.elapsed() >= INTERVAL && !pending.is_empty());
        if due && idle.swap(false, Ordering::AcqRel) {
            let batch = Batch {
                states: std::mem::take(&mut pending),
                offsets: positions(&consumer)?,
            };
            if to_writer.send(batch).is_err() {
                break; // the writer failed: its error is returned below
            }
            handed = Instant::now();
        }
        if polled.is_none() || since_check >= 10_000 {
            since_check = 0;
            let at = positions(&consumer)?;
            let done = ends
                .iter()
                .all(|(p, end)| *end == 0 || at.iter().any(|(q, o)| *q == *p as i32 && *o >= *end));
            if done {
                let last = Batch {
                    states: std::mem::take(&mut pending),
                    offsets: at,
                };
                let _ = to_writer.send(last);
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the bare pipeline did not drain {topic}"
            );
        }
    }
    drop(to_writer);
    let (states, transactions) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the pipeline's writer panicked"))??;
    Ok(PipelineRun {
        records,
        states,
        transactions,
        time: started.elapsed(),
    })
}

/// The pipeline's writer: one transaction per batch. Returns (states written, transactions).
fn write_batches(
    producer: &ThreadedProducer<DefaultProducerContext>,
    batches: &std::sync::mpsc::Receiver<Batch>,
    idle: &AtomicBool,
    topic: &str,
    changelog: &str,
    group: &ConsumerGroupMetadata,
) -> anyhow::Result<(u64, u64)> {
    let (mut states, mut transactions) = (0u64, 0u64);
    for batch in batches {
        producer.begin_transaction()?;
        for (key, (partition, value)) in &batch.states {
            send(
                producer,
                BaseRecord::to(changelog)
                    .partition(*partition)
                    .key(key.as_slice())
                    .payload(value.as_slice()),
            )?;
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in &batch.offsets {
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        producer.send_offsets_to_transaction(&offsets, group, TIMEOUT)?;
        delivered(producer)?;
        producer.commit_transaction(TIMEOUT)?;
        states += batch.states.len() as u64;
        transactions += 1;
        idle.store(true, Ordering::Release);
    }
    Ok((states, transactions))
}

/// Writes `records` states of distinct keys (`user-{i}`, on their key's partition of
/// `changelog`, `partitions` partitions) from memory, in transactions of 100 000 records, on
/// `lanes` transactional producers at once (key `i` on lane `i % lanes`), reading nothing.
/// Returns the time from all producers ready to the last commit.
pub fn bare_writes(
    bootstrap: &str,
    changelog: &str,
    partitions: u32,
    records: u64,
    lanes: usize,
) -> anyhow::Result<Duration> {
    let ready = std::sync::Arc::new(std::sync::Barrier::new(lanes + 1));
    let threads: Vec<_> = (0..lanes)
        .map(|lane| {
            let (bootstrap, changelog, ready) =
                (bootstrap.to_string(), changelog.to_string(), ready.clone());
            std::thread::Builder::new()
                .name(format!("bare-writes-{lane}"))
                .spawn(move || -> anyhow::Result<()> {
                    let producer = transactional(&bootstrap, &format!("{changelog}-writes-{lane}"));
                    ready.wait();
                    let producer = producer?;
                    let value = br#"{"total_cents":1999,"purchases":1}"#;
                    let mut keys = (lane as u64..records).step_by(lanes).peekable();
                    while keys.peek().is_some() {
                        producer.begin_transaction()?;
                        for i in keys.by_ref().take(BACKLOG) {
                            let id = format!("user-{i}");
                            send(
                                &producer,
                                BaseRecord::to(&changelog)
                                    .partition(partition_for_key(id.as_bytes(), partitions) as i32)
                                    .key(id.as_bytes())
                                    .payload(value.as_slice()),
                            )?;
                        }
                        delivered(&producer)?;
                        producer.commit_transaction(TIMEOUT)?;
                    }
                    Ok(())
                })
        })
        .collect::<Result<_, _>>()?;
    ready.wait();
    let started = Instant::now();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a writes lane panicked"))??;
    }
    Ok(started.elapsed())
}

/// Transactions of `per_transaction` records each, back to back, on `lanes` transactional
/// producers at once (a thread each), to `changelog` (`partitions` partitions). Each record is
/// the state of one of `per_transaction` accounts of its lane, on the account's partition, as a
/// command's state change is; lane k's accounts are on partitions `p % lanes == k`, so no two
/// lanes write to one partition. With `offsets`, each transaction also commits an offset for
/// each of the lane's partitions to one consumer group shared by the lanes, as every checkpoint
/// of the node does (AddOffsetsToTxn and TxnOffsetCommit, two more requests to the
/// coordinators, and the transaction's markers on the group's offsets partition). Returns the
/// records committed per second over `measure`, after `warm_up`.
#[allow(clippy::too_many_arguments)]
pub fn bare_transactions(
    bootstrap: &str,
    changelog: &str,
    partitions: u32,
    lanes: usize,
    per_transaction: usize,
    offsets: bool,
    warm_up: Duration,
    measure: Duration,
) -> anyhow::Result<f64> {
    let measure_from = Instant::now() + warm_up;
    let end = measure_from + measure;
    let threads: Vec<_> = (0..lanes)
        .map(|lane| {
            let (bootstrap, changelog) = (bootstrap.to_string(), changelog.to_string());
            std::thread::Builder::new()
                .name(format!("bare-transactions-{lane}"))
                .spawn(move || -> anyhow::Result<u64> {
                    let producer = transactional(&bootstrap, &format!("{changelog}-lane-{lane}"))?;
                    let accounts: Vec<(String, i32)> = (0..)
                        .map(|a| {
                            let id = format!("account-{lane}-{a}");
                            let partition = partition_for_key(id.as_bytes(), partitions) as i32;
                            (id, partition)
                        })
                        .filter(|(_, p)| *p as usize % lanes == lane)
                        .take(per_transaction)
                        .collect();
                    let group = offsets
                        .then(|| -> anyhow::Result<_> {
                            let consumer: BaseConsumer = ClientConfig::new()
                                .set("bootstrap.servers", &bootstrap)
                                .set("group.id", format!("{changelog}-group"))
                                .create()?;
                            let metadata = consumer
                                .group_metadata()
                                .context("the bare transactions' group metadata")?;
                            Ok((consumer, metadata))
                        })
                        .transpose()?;
                    let lane_partitions: Vec<i32> = (0..partitions as i32)
                        .filter(|p| *p as usize % lanes == lane)
                        .collect();
                    let mut committed = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < end {
                        n += 1;
                        let value = format!("{{\"balance\":{n},\"answers\":[\"key-{n}\"]}}");
                        producer.begin_transaction()?;
                        for (id, partition) in &accounts {
                            send(
                                &producer,
                                BaseRecord::to(&changelog)
                                    .partition(*partition)
                                    .key(id.as_bytes())
                                    .payload(value.as_bytes()),
                            )?;
                        }
                        if let Some((_, metadata)) = &group {
                            let mut consumed = TopicPartitionList::new();
                            for p in &lane_partitions {
                                consumed.add_partition_offset(
                                    &changelog,
                                    *p,
                                    Offset::Offset(n as i64),
                                )?;
                            }
                            producer.send_offsets_to_transaction(&consumed, metadata, TIMEOUT)?;
                        }
                        delivered(&producer)?;
                        producer.commit_transaction(TIMEOUT)?;
                        let now = Instant::now();
                        if now >= measure_from && now < end {
                            committed += accounts.len() as u64;
                        }
                    }
                    Ok(committed)
                })
        })
        .collect::<Result<_, _>>()?;
    let mut committed = 0;
    for thread in threads {
        committed += thread
            .join()
            .map_err(|_| anyhow::anyhow!("a transactions lane panicked"))??;
    }
    Ok(committed as f64 / measure.as_secs_f64())
}
