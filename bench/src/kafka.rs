//! Broker-side measurements: end and committed offsets, and the bare-consumer baselines (a drain
//! with no processing, and a plain consumer group going through the same membership changes).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use kafka_sharding::decode_changelog_value;
use processor::purchases::Purchases;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::progress::Progress;

const TIMEOUT: Duration = Duration::from_secs(10);

fn client(bootstrap: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    config
}

/// How many partitions `topic` has (from the broker's metadata).
pub fn partition_count(bootstrap: &str, topic: &str) -> anyhow::Result<u32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    anyhow::ensure!(
        partitions > 0,
        "topic {topic} has no partitions (or is missing)"
    );
    Ok(partitions as u32)
}

/// High watermark of every partition.
pub fn end_offsets(
    bootstrap: &str,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<BTreeMap<u32, i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    (0..partitions)
        .map(|p| Ok((p, consumer.fetch_watermarks(topic, p as i32, TIMEOUT)?.1)))
        .collect()
}

/// Polls the group's committed offsets until every partition's reaches `ends`.
pub fn wait_committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    ends: &BTreeMap<u32, i64>,
    within: Duration,
) -> anyhow::Result<Instant> {
    let consumer: BaseConsumer = client(bootstrap, group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p as i32);
    }
    let deadline = Instant::now() + within;
    loop {
        if let Ok(committed) = consumer.committed_offsets(tpl.clone(), TIMEOUT) {
            let done = ends.iter().all(|(p, end)| {
                committed
                    .find_partition(topic, *p as i32)
                    .and_then(|e| e.offset().to_raw())
                    .is_some_and(|o| o >= *end)
            });
            if done {
                return Ok(Instant::now());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "group {group} did not commit to the end of {topic} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// [`wait_committed`] off the async runtime; up to 15 minutes.
pub async fn committed_to_end(
    bootstrap: &str,
    group: &str,
    topic: &str,
    ends: &BTreeMap<u32, i64>,
) -> anyhow::Result<Instant> {
    let (bootstrap, group, topic, ends) = (
        bootstrap.to_string(),
        group.to_string(),
        topic.to_string(),
        ends.clone(),
    );
    tokio::task::spawn_blocking(move || {
        wait_committed(&bootstrap, &group, &topic, &ends, Duration::from_secs(900))
    })
    .await?
}

/// Where a bare drain starts.
#[derive(Debug, Clone, Copy)]
pub enum StartFrom {
    /// `Offset::Beginning`: librdkafka looks each partition's start up before fetching, as a
    /// group consumer without committed offsets (`auto.offset.reset=earliest`, the node) does.
    Beginning,
    /// The start offsets asked in one request first, then assigned as they are (the restorer).
    KnownOffsets,
}

/// A bare read of a topic: records read, the time from assigning the partitions to the end,
/// and the part of it from the first record on (the rest is start-up: lookups, first fetch).
pub struct BareDrain {
    pub records: u64,
    pub time: Duration,
    pub from_first_record: Duration,
}

/// The baseline: a bare consumer (read_committed, as the processor) reads every partition from
/// the start to `ends`, doing nothing with the records, with the fetch sizes of the node's
/// restore and the node's `defaults` for the reader it stands beside (none for the group
/// consumer, `CHANGELOG_READER_DEFAULTS` for a changelog read).
pub fn bare_drain(
    bootstrap: &str,
    topic: &str,
    ends: &BTreeMap<u32, i64>,
    from: StartFrom,
    defaults: &[(&str, &str)],
) -> anyhow::Result<BareDrain> {
    let mut config = client(bootstrap, &format!("bench-bare-{topic}"));
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .create()?;
    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p as i32, Offset::Beginning)?;
    }
    match from {
        StartFrom::Beginning => consumer.assign(&tpl)?,
        StartFrom::KnownOffsets => consumer.assign(&consumer.offsets_for_times(tpl, TIMEOUT)?)?,
    }
    let mut records = 0u64;
    let mut since_check = 0u32;
    let mut first_record = None;
    loop {
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(message) = &polled {
            let message = message
                .as_ref()
                .map_err(|e| anyhow::anyhow!("bare consumer: {e}"))?;
            first_record.get_or_insert_with(Instant::now);
            records += 1;
            since_check += 1;
            // Touch the payload as any consumer would, without decoding it.
            std::hint::black_box(message.payload().map(<[u8]>::len));
        }
        // Positions include transaction markers, so the end is judged by position, not count.
        if polled.is_none() || since_check >= 10_000 {
            since_check = 0;
            let positions = consumer.position()?;
            let done = ends.iter().all(|(p, end)| {
                *end == 0
                    || positions
                        .find_partition(topic, *p as i32)
                        .and_then(|e| e.offset().to_raw())
                        .is_some_and(|o| o >= *end)
            });
            if done {
                let time = started.elapsed();
                return Ok(BareDrain {
                    records,
                    time,
                    from_first_record: first_record.map_or(time, |t| t.elapsed()),
                });
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "bare drain of {topic} did not finish"
            );
        }
    }
}

/// Records every partition's end offset (the last stable offset, what a read_committed consumer
/// can read) into a [`Progress`] every `every`, in one ListOffsets request each time, until dropped.
pub struct EndPoller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EndPoller {
    pub fn start(
        bootstrap: &str,
        topic: &str,
        partitions: u32,
        progress: Arc<Mutex<Progress>>,
        every: Duration,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = client(bootstrap, &format!("bench-ends-{topic}")).create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::End)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                let asked = Instant::now();
                if let Ok(ends) = consumer.offsets_for_times(tpl.clone(), TIMEOUT) {
                    // The answer describes the partition at some point during the request: the
                    // time it was asked is the conservative (earliest) one.
                    let mut progress = progress.lock().expect("progress lock");
                    for e in ends.elements() {
                        if let Some(end) = e.offset().to_raw().filter(|o| *o >= 0) {
                            progress.observe_end(e.partition() as u32, end, asked);
                        }
                    }
                }
                std::thread::sleep(every.saturating_sub(asked.elapsed()));
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EndPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Members of a plain consumer group (cooperative-sticky, the processor's session timeout)
/// that only note when each partition delivers: the group's own rebalance cost, as a baseline.
pub struct BareGroup {
    bootstrap: String,
    topic: String,
    group: String,
    session_timeout_ms: u64,
    pub progress: Arc<Mutex<Progress>>,
    members: Vec<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl BareGroup {
    pub fn new(bootstrap: &str, topic: &str, session_timeout_ms: u64) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            topic: topic.into(),
            group: format!("bench-bare-group-{topic}"),
            session_timeout_ms,
            progress: Arc::new(Mutex::new(Progress::default())),
            members: Vec::new(),
        }
    }

    pub fn add_member(&mut self) -> anyhow::Result<()> {
        let consumer: BaseConsumer = client(&self.bootstrap, &self.group)
            .set("auto.offset.reset", "latest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout_ms / 4).to_string(),
            )
            .set("client.id", format!("bare-{}", self.members.len() + 1))
            .create()?;
        consumer
            .subscribe(&[&self.topic])
            .context("bare member subscribe")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (progress, stopping) = (self.progress.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(20)) {
                    let now = Instant::now();
                    progress.lock().expect("progress lock").observe(
                        message.partition() as u32,
                        message.offset() + 1,
                        now,
                    );
                }
            }
            // Dropping the consumer closes it: it leaves the group (a graceful leave).
        });
        self.members.push((stop, thread));
        Ok(())
    }

    /// The newest member leaves gracefully.
    pub fn remove_member(&mut self) {
        if let Some((stop, thread)) = self.members.pop() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

impl Drop for BareGroup {
    fn drop(&mut self) {
        while !self.members.is_empty() {
            self.remove_member();
        }
    }
}

/// Per user: (when visible, purchases) of each committed changelog record, in order.
type Timelines = HashMap<String, Vec<(Instant, i64)>>;

/// The committed states of some users, as a read_committed reader of the changelog sees them,
/// with when each record became visible: the owner's committed state over time, which answers
/// from standbys are held against. Runs until dropped.
pub struct CommittedTimeline {
    seen: Arc<Mutex<Timelines>>,
    /// Set once every partition was read to its end: times noted before that are catch-up
    /// times, not when the states became visible.
    caught_up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CommittedTimeline {
    pub fn start(
        bootstrap: &str,
        changelog: &str,
        partitions: u32,
        users: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = client(bootstrap, &format!("bench-timeline-{changelog}"))
            // Records are seen at most this long after they became readable.
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "true")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(changelog, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let seen: Arc<Mutex<Timelines>> = Arc::new(Mutex::new(
            users.into_iter().map(|u| (u, Vec::new())).collect(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let caught_up = Arc::new(AtomicBool::new(false));
        let (stopping, timelines, at_end) = (stop.clone(), seen.clone(), caught_up.clone());
        let thread = std::thread::spawn(move || {
            let mut ended = std::collections::HashSet::new();
            while !stopping.load(Ordering::SeqCst) {
                let record = match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(record)) => record,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                        if ended.insert(p) && ended.len() == partitions as usize {
                            at_end.store(true, Ordering::SeqCst);
                        }
                        continue;
                    }
                    _ => continue,
                };
                let at = Instant::now();
                let (Some(Ok(user)), Some(value)) =
                    (record.key().map(std::str::from_utf8), record.payload())
                else {
                    continue;
                };
                let mut timelines = timelines.lock().expect("timeline lock");
                if let Some(timeline) = timelines.get_mut(user) {
                    if let Ok((totals, _)) = decode_changelog_value::<Purchases>(value) {
                        timeline.push((at, totals.purchases));
                    }
                }
            }
        });
        Ok(Self {
            seen,
            caught_up,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until every partition was read to its end once.
    pub async fn wait_caught_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.caught_up.load(Ordering::SeqCst) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the changelog reader did not reach the end within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// When the first committed state of `user` with more than `purchases` purchases became
    /// visible, if one did.
    pub fn first_beyond(&self, user: &str, purchases: i64) -> Option<Instant> {
        let seen = self.seen.lock().expect("timeline lock");
        seen.get(user)?
            .iter()
            .find(|(_, p)| *p > purchases)
            .map(|(at, _)| *at)
    }

    /// When the last committed state of `user` visible before `before` became visible.
    pub fn last_before(&self, user: &str, before: Instant) -> Option<Instant> {
        let seen = self.seen.lock().expect("timeline lock");
        seen.get(user)?
            .iter()
            .map(|(at, _)| *at)
            .take_while(|at| *at < before)
            .last()
    }
}

impl Drop for CommittedTimeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every committed record of `topic` up to its current end (read_committed), as `read` makes of
/// each.
pub fn read_committed<T>(
    bootstrap: &str,
    topic: &str,
    read: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
) -> anyhow::Result<Vec<T>> {
    let ends = end_offsets(bootstrap, topic, partition_count(bootstrap, topic)?)?;
    let consumer: BaseConsumer = client(bootstrap, &format!("{topic}-bench-reader")).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p as i32, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut records = Vec::new();
    loop {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            records.push(read(&message?));
            continue;
        }
        let positions = consumer.position()?;
        let done = ends.iter().all(|(p, end)| {
            *end == 0
                || positions
                    .find_partition(topic, *p as i32)
                    .and_then(|e| e.offset().to_raw())
                    .is_some_and(|position| position >= *end)
        });
        if done {
            return Ok(records);
        }
        anyhow::ensure!(Instant::now() < deadline, "could not read all of {topic}");
    }
}

/// The broker setting that makes every partition's leader check with the transaction
/// coordinator that a transactional produce's partition is in the transaction (KIP-890 part 1;
/// on by default since Kafka 3.6). It guards against hanging transactions and costs a round
/// trip inside the cluster per partition per transaction.
pub const PARTITION_VERIFICATION: &str = "transaction.partition.verification.enable";

/// Sets `name` to `value` as a dynamic per-broker config on every broker, or with `None` removes
/// the per-broker dynamic configs again (each broker falls back to its `server.properties`).
/// AlterConfigs replaces a broker's whole set of dynamic configs, so a broker that has others
/// (an operator's) is left alone and reported.
pub async fn set_broker_config(
    bootstrap: &str,
    name: &str,
    value: Option<&str>,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ConfigSource, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let specifiers: Vec<ResourceSpecifier> = admin
        .inner()
        .fetch_metadata(None, TIMEOUT)?
        .brokers()
        .iter()
        .map(|b| ResourceSpecifier::Broker(b.id()))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(TIMEOUT));
    for described in admin.describe_configs(&specifiers, &options).await? {
        let resource = described.context("describing a broker's configs")?;
        let others: Vec<&str> = resource
            .entries
            .iter()
            .filter(|e| e.source == ConfigSource::DynamicBroker && e.name != name)
            .map(|e| e.name.as_str())
            .collect();
        anyhow::ensure!(
            others.is_empty(),
            "broker {:?} has per-broker dynamic configs ({}) that setting {name} would remove",
            resource.specifier,
            others.join(", ")
        );
    }
    let changes: Vec<AlterConfig> = specifiers
        .iter()
        .map(|s| {
            let change = AlterConfig::new(*s);
            match value {
                Some(value) => change.set(name, value),
                None => change,
            }
        })
        .collect();
    for altered in admin.alter_configs(&changes, &options).await? {
        altered.map_err(|(resource, e)| anyhow::anyhow!("altering {resource:?}: {e}"))?;
    }
    Ok(())
}
