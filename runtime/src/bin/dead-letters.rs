//! `dead-letters`: what a kafka-sharding entity type could not process, listed and replayed.
//!
//! A node copies a record it cannot process to the type's dead-letter topic with the reason and
//! its origin in headers (`kafka_sharding::dead_letters`), inside the checkpoint that commits
//! past it. An operator reads them here (`list`), and once the cause is fixed (a new build that
//! reads them, a corrected producer) writes them back to the topic they came from (`replay`).
//!
//! A replay is exactly once per dead letter however often it is run or interrupted: it reads as
//! a consumer group of its own and commits that group's offsets in the same transaction as the
//! records it writes, so a second run starts after the last committed one, and a run that dies
//! mid-way leaves neither its records nor its offsets. Its transactional id is the group's, so
//! two replays of one group at once cannot both write (the second fences the first).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use kafka_sharding::dead_letters::DeadLetter;
use kafka_sharding::{ClientKind, KafkaClientArgs, KafkaConnection};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// Records a replay writes per transaction (each commits with the offsets it reached).
const PER_TRANSACTION: usize = 10_000;
/// How long a read waits for records that are not there (a transaction still open on a
/// partition holds a read_committed reader back until it ends) before it stops short.
const IDLE_LIMIT: Duration = Duration::from_secs(10);
/// Kafka's calls that wait for the broker.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// The header a replayed record carries: the dead letter it came from (`topic/partition/offset`).
const HEADER_REPLAYED_FROM: &str = "dlq.replayed.from";

#[derive(Debug, Parser)]
#[command(
    name = "dead-letters",
    version,
    about = "Lists the records a kafka-sharding entity type dead-lettered, and replays them",
    after_help = "Examples:\n  dead-letters list orders-dlq\n  dead-letters list orders-dlq --pending --json\n  dead-letters replay orders-dlq          # each once, to the topic it came from"
)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap_servers: String,

    #[command(flatten)]
    kafka_client: KafkaClientArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the committed dead letters of TOPIC, in order per partition, and a count per reason.
    List {
        /// The dead-letter topic (a node's `--dlq-topic`, by default `<input topic>-dlq`).
        topic: String,
        /// Only those the replay group has not replayed yet.
        #[arg(long)]
        pending: bool,
        /// The replay group `--pending` looks at (default: `<TOPIC>-replay`).
        #[arg(long)]
        group: Option<String>,
        /// One JSON object per dead letter.
        #[arg(long)]
        json: bool,
    },
    /// Write the dead letters not replayed yet back to the topic each came from (or `--to`),
    /// keyed as they were, exactly once each.
    Replay {
        /// The dead-letter topic.
        topic: String,
        /// Write them all to this topic instead.
        #[arg(long)]
        to: Option<String>,
        /// The replay group whose committed offsets say what was replayed (default:
        /// `<TOPIC>-replay`); also the replay's transactional id.
        #[arg(long)]
        group: Option<String>,
    },
}

/// What went wrong, said once on stderr.
#[derive(Debug, thiserror::Error)]
enum ToolError {
    #[error("{0}")]
    Usage(String),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("the reader has no consumer group metadata to commit the replay's offsets with")]
    NoGroupMetadata,
    #[error("{what}: {source}")]
    Kafka {
        what: &'static str,
        source: KafkaError,
    },
}

fn failed(what: &'static str) -> impl FnOnce(KafkaError) -> ToolError {
    move |source| ToolError::Kafka { what, source }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let properties = match args.kafka_client.properties() {
        Ok(properties) => properties,
        Err(message) => {
            eprintln!("dead-letters: {message}");
            return ExitCode::from(2);
        }
    };
    let kafka = KafkaConnection::new(args.bootstrap_servers).with_properties(properties);
    let result = match args.command {
        Command::List {
            topic,
            pending,
            group,
            json,
        } => {
            let group = group.unwrap_or_else(|| format!("{topic}-replay"));
            list(&kafka, &topic, &group, pending, json)
        }
        Command::Replay { topic, to, group } => {
            let group = group.unwrap_or_else(|| format!("{topic}-replay"));
            replay(&kafka, &topic, &group, to.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(ToolError::Usage(message)) => {
            eprintln!("dead-letters: {message}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("dead-letters: {}", kafka.describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// A record of the dead-letter topic, read.
struct Read {
    partition: i32,
    offset: i64,
    letter: Result<DeadLetter, String>,
}

/// A read_committed reader of `topic` in `group` (which it never joins: it assigns), from the
/// group's committed offsets (`from_committed`) or the start, to the ends there were when it
/// began.
struct Reader {
    consumer: BaseConsumer,
    topic: String,
    /// Per partition, the end to reach.
    ends: BTreeMap<i32, i64>,
}

impl Reader {
    fn open(
        kafka: &KafkaConnection,
        topic: &str,
        group: &str,
        from_committed: bool,
    ) -> Result<Self, ToolError> {
        let consumer: BaseConsumer = kafka
            .client(ClientKind::Consumer)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(failed("cannot create the reader"))?;
        let metadata = consumer
            .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
            .map_err(failed("cannot read the topic's metadata"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if partitions.is_empty() {
            return Err(ToolError::NoTopic(topic.to_string()));
        }
        let mut wanted = TopicPartitionList::new();
        for &p in &partitions {
            wanted
                .add_partition_offset(topic, p, Offset::Beginning)
                .map_err(failed("cannot list the partitions"))?;
        }
        let start = if from_committed {
            let committed = consumer
                .committed_offsets(wanted, KAFKA_TIMEOUT)
                .map_err(failed("cannot read the replay group's offsets"))?;
            let mut start = TopicPartitionList::new();
            for element in committed.elements() {
                let offset = match element.offset() {
                    Offset::Offset(offset) => Offset::Offset(offset),
                    _ => Offset::Beginning,
                };
                start
                    .add_partition_offset(topic, element.partition(), offset)
                    .map_err(failed("cannot list the partitions"))?;
            }
            start
        } else {
            wanted
        };
        let mut ends = BTreeMap::new();
        for element in start.elements() {
            let p = element.partition();
            let (low, high) = consumer
                .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
                .map_err(failed("cannot read the topic's ends"))?;
            let from = match element.offset() {
                Offset::Offset(offset) => offset.max(low),
                _ => low,
            };
            if high > from {
                ends.insert(p, high);
            }
        }
        consumer
            .assign(&start)
            .map_err(failed("cannot assign the partitions"))?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            ends,
        })
    }

    /// Reads up to `max` records, then the next ones on the next call; empty once every
    /// partition reached its end, or when nothing came for [`IDLE_LIMIT`] (said on stderr).
    fn next_batch(&mut self, max: usize) -> Result<Vec<Read>, ToolError> {
        let mut batch = Vec::new();
        let mut idle_since = Instant::now();
        while batch.len() < max && !self.ends.is_empty() {
            let Some(polled) = self.consumer.poll(Duration::from_millis(200)) else {
                self.drop_reached_ends()?;
                if idle_since.elapsed() >= IDLE_LIMIT {
                    for (p, end) in std::mem::take(&mut self.ends) {
                        eprintln!(
                            "dead-letters: partition {p} of {} stopped short of its end {end} \
                             (a transaction still open there?); run again to see the rest",
                            self.topic
                        );
                    }
                }
                continue;
            };
            idle_since = Instant::now();
            let message = polled.map_err(failed("cannot read the topic"))?;
            let partition = message.partition();
            let headers: Vec<(&str, Option<&[u8]>)> = message
                .headers()
                .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default();
            batch.push(Read {
                partition,
                offset: message.offset(),
                letter: DeadLetter::parse(message.key(), message.payload(), headers)
                    .map_err(|e| e.to_string()),
            });
            if self
                .ends
                .get(&partition)
                .is_some_and(|&end| message.offset() + 1 >= end)
            {
                self.ends.remove(&partition);
            }
        }
        Ok(batch)
    }

    /// Drops the partitions whose position reached their end: transaction markers and aborted
    /// records move the position without a record to see.
    fn drop_reached_ends(&mut self) -> Result<(), ToolError> {
        let positions = self
            .consumer
            .position()
            .map_err(failed("cannot read the positions"))?;
        for element in positions.elements() {
            if let Offset::Offset(position) = element.offset() {
                if self
                    .ends
                    .get(&element.partition())
                    .is_some_and(|&end| position >= end)
                {
                    self.ends.remove(&element.partition());
                }
            }
        }
        Ok(())
    }

    /// Where the reader is now, per partition (what a replay commits).
    fn positions(&self) -> Result<TopicPartitionList, ToolError> {
        let positions = self
            .consumer
            .position()
            .map_err(failed("cannot read the positions"))?;
        let mut reached = TopicPartitionList::new();
        for element in positions.elements() {
            if let Offset::Offset(position) = element.offset() {
                reached
                    .add_partition_offset(
                        &self.topic,
                        element.partition(),
                        Offset::Offset(position),
                    )
                    .map_err(failed("cannot list the positions"))?;
            }
        }
        Ok(reached)
    }
}

fn list(
    kafka: &KafkaConnection,
    topic: &str,
    group: &str,
    pending: bool,
    json: bool,
) -> Result<(), ToolError> {
    let mut reader = Reader::open(kafka, topic, group, pending)?;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    loop {
        let batch = reader.next_batch(1_000)?;
        if batch.is_empty() {
            break;
        }
        for read in batch {
            total += 1;
            let reason = match &read.letter {
                Ok(letter) => letter.reason.clone(),
                Err(e) => format!("not a dead letter ({e})"),
            };
            *reasons.entry(reason).or_default() += 1;
            println!(
                "{}",
                if json {
                    as_json(topic, &read).to_string()
                } else {
                    as_text(&read)
                }
            );
        }
    }
    let what = if pending { " not replayed yet" } else { "" };
    eprintln!("{total} dead letters{what} in {topic}");
    for (reason, count) in reasons {
        eprintln!("  {count:>8} × {reason}");
    }
    Ok(())
}

fn replay(
    kafka: &KafkaConnection,
    topic: &str,
    group: &str,
    to: Option<&str>,
) -> Result<(), ToolError> {
    if to == Some(topic) {
        return Err(ToolError::Usage(format!(
            "--to {topic} is the dead-letter topic itself"
        )));
    }
    let mut reader = Reader::open(kafka, topic, group, true)?;
    if reader.ends.is_empty() {
        eprintln!("dead-letters: nothing to replay in {topic} (group {group} is at its end)");
        return Ok(());
    }
    let producer: ThreadedProducer<DefaultProducerContext> = kafka
        .client(ClientKind::Producer)
        .set("transactional.id", group)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The partitioner the runtime's producers use (Java's): a key lands on its shard.
        .set("partitioner", "murmur2_random")
        .create()
        .map_err(failed("cannot create the producer"))?;
    producer
        .init_transactions(KAFKA_TIMEOUT)
        .map_err(failed("cannot start the replay's transactions"))?;
    let (mut replayed, mut skipped) = (0u64, 0u64);
    let mut per_topic: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let batch = reader.next_batch(PER_TRANSACTION)?;
        if batch.is_empty() {
            break;
        }
        producer
            .begin_transaction()
            .map_err(failed("cannot begin a transaction"))?;
        for read in &batch {
            let letter = match &read.letter {
                Ok(letter) => letter,
                Err(e) => {
                    skipped += 1;
                    eprintln!(
                        "dead-letters: skipped {topic} {}/{}: not a dead letter ({e})",
                        read.partition, read.offset
                    );
                    continue;
                }
            };
            let target = to.unwrap_or(&letter.source_topic);
            let from = format!("{topic}/{}/{}", read.partition, read.offset);
            let mut record =
                BaseRecord::<[u8], [u8]>::to(target).headers(OwnedHeaders::new().insert(Header {
                    key: HEADER_REPLAYED_FROM,
                    value: Some(from.as_str()),
                }));
            if let Some(key) = &letter.key {
                record = record.key(key);
            }
            if let Some(value) = &letter.value {
                record = record.payload(value);
            }
            send(&producer, record)?;
            replayed += 1;
            *per_topic.entry(target.to_string()).or_default() += 1;
        }
        let reached = reader.positions()?;
        producer
            .send_offsets_to_transaction(
                &reached,
                &reader
                    .consumer
                    .group_metadata()
                    .ok_or(ToolError::NoGroupMetadata)?,
                KAFKA_TIMEOUT,
            )
            .map_err(failed(
                "cannot add the replay group's offsets to the transaction",
            ))?;
        producer.commit_transaction(KAFKA_TIMEOUT).map_err(failed(
            "cannot commit the replay (nothing of this batch was written)",
        ))?;
        eprintln!("dead-letters: {replayed} replayed so far");
    }
    let targets: Vec<String> = per_topic
        .iter()
        .map(|(topic, count)| format!("{count} to {topic}"))
        .collect();
    eprintln!(
        "dead-letters: replayed {replayed} dead letters of {topic} ({}); group {group} is at \
         the end{}",
        if targets.is_empty() {
            "none".to_string()
        } else {
            targets.join(", ")
        },
        if skipped > 0 {
            format!("; {skipped} records that are not dead letters skipped")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Hands `record` to the producer, waiting while its queue is full.
fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> Result<(), ToolError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                returned,
            )) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(failed("cannot write a replayed record")(e)),
        }
    }
}

/// Bytes as text when they are UTF-8, else as hex; long ones cut (the JSON has them whole).
fn shown(bytes: Option<&[u8]>) -> String {
    const SHOWN: usize = 120;
    match bytes {
        None => "(none)".to_string(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) if text.chars().count() > SHOWN => {
                format!(
                    "{:?}… ({} bytes)",
                    text.chars().take(SHOWN).collect::<String>(),
                    bytes.len()
                )
            }
            Ok(text) => format!("{text:?}"),
            Err(_) => format!(
                "0x{}{} ({} bytes)",
                hex(&bytes[..bytes.len().min(SHOWN / 2)]),
                if bytes.len() > SHOWN / 2 { "…" } else { "" },
                bytes.len()
            ),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn as_text(read: &Read) -> String {
    match &read.letter {
        Ok(letter) => format!(
            "{}/{}  from {} {}/{}  key {}  value {}  reason: {}",
            read.partition,
            read.offset,
            letter.source_topic,
            letter.source_partition,
            letter.source_offset,
            shown(letter.key.as_deref()),
            shown(letter.value.as_deref()),
            letter.reason
        ),
        Err(e) => format!(
            "{}/{}  not a dead letter ({e})",
            read.partition, read.offset
        ),
    }
}

/// One dead letter as JSON: key and value as text when they are UTF-8, else as hex
/// (`key_hex`, `value_hex`).
fn as_json(topic: &str, read: &Read) -> serde_json::Value {
    let mut object = serde_json::json!({
        "topic": topic,
        "partition": read.partition,
        "offset": read.offset,
    });
    match &read.letter {
        Ok(letter) => {
            object["reason"] = letter.reason.clone().into();
            object["source_topic"] = letter.source_topic.clone().into();
            object["source_partition"] = letter.source_partition.into();
            object["source_offset"] = letter.source_offset.into();
            for (name, bytes) in [("key", &letter.key), ("value", &letter.value)] {
                match bytes.as_deref().map(std::str::from_utf8) {
                    None => object[name] = serde_json::Value::Null,
                    Some(Ok(text)) => object[name] = text.into(),
                    Some(Err(_)) => {
                        object[name] = serde_json::Value::Null;
                        object[format!("{name}_hex")] = hex(bytes.as_deref().unwrap()).into();
                    }
                }
            }
        }
        Err(e) => object["not_a_dead_letter"] = e.clone().into(),
    }
    object
}
