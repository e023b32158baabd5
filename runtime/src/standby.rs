//! Standby replicas: warm copies of other nodes' shards, kept by tailing their changelog.
//!
//! Each shard is kept warm on `--standby-replicas` nodes other than its owner, chosen by
//! rendezvous hashing over the members of the allocation table ([`standby_nodes`]): every node
//! computes the same placement from the same table without asking anyone, shards spread evenly,
//! and a node joining or leaving moves only the standbys it gains or held. The placement is
//! recomputed whenever the table changes.
//!
//! One consumer per node and entity type (assign-only, read_committed) tails the changelog
//! partitions of this node's standbys and folds their records into one map per shard, as a
//! restore does (`changelog::fold`). Standbys never see input events and never write: they hold
//! exactly what the owner's checkpoints committed, at most one checkpoint interval behind it.
//!
//! When Kafka assigns a shard here, the restore takes its standby (states and next offset) and
//! reads only the changelog after it ([`Standbys::take`], used by `restore`). Folding records in
//! order is the same whether one reader or two (standby, then restore) did it, so the restored
//! state is the one a cold restore would build. Which survivor Kafka gives a dead node's
//! partitions to is the assignor's choice (cooperative-sticky), not this placement's: with N
//! standbys among k survivors about N/k of the moved shards land on a standby, and with
//! `--standby-replicas` one less than the nodes, all do. A shard without an owner (its owner
//! left, the next one has not claimed it) keeps its standbys: that is when they are needed.
//!
//! Memory: a standby holds the shard's states as the owner does, at about the same cost per
//! entity, once its reader's prefetch is small and a warm-up's freed memory is returned (see
//! the reader's settings and `memory.rs`; figures in docs/BENCHMARKS.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::allocation::AllocationTable;
use crate::changelog;
use crate::entity::{Entity, EntityMap, Stored};
use crate::kafka_batch::{ConsumerReader, Read};
use crate::kafka_config::KafkaConnection;
use crate::kafka_health::QuietContext;
use crate::metrics::Metrics;
use crate::partitioner::murmur2;
use crate::readiness::GroupReadiness;

/// How long the reader waits for records before looking at the placement again.
const POLL: Duration = Duration::from_millis(100);
/// How often the lag of every standby is measured (one ListOffsets request for all of them).
const LAG_EVERY: Duration = Duration::from_secs(1);
/// The placement is recomputed at least this often, besides on every table change.
const PLACEMENT_EVERY: Duration = Duration::from_secs(2);
/// Records folded per lock of the standby maps (a restore taking one waits at most this long).
const RECORDS_PER_LOCK: usize = 2_000;
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);
/// Warm-ups reading at least this many records in one go give freed memory back to the OS.
const TRIM_AFTER_WARMING_FROM: u64 = 50_000;

/// The `replicas` members other than `owner` that keep a standby of `shard`: those with the
/// highest rendezvous score. The same on every node that knows the same members.
pub(crate) fn standby_nodes<'a>(
    shard: u32,
    owner: &str,
    members: impl IntoIterator<Item = &'a str>,
    replicas: usize,
) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &str)> = members
        .into_iter()
        .filter(|m| *m != owner)
        .map(|m| (score(shard, m), m))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.truncate(replicas);
    scored.into_iter().map(|(_, m)| m).collect()
}

/// A node's weight for a shard: murmur2 of the node id with the shard, through a 64-bit
/// finaliser (splitmix64) so that nearby shard numbers do not give correlated orders.
fn score(shard: u32, node: &str) -> u64 {
    let mut z = (u64::from(murmur2(node.as_bytes()) as u32) << 32 | u64::from(shard))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shards `local` keeps a standby of: those owned by another member for which `local` is
/// among [`standby_nodes`], and those of `current` that have no owner right now or that
/// `local` was just given (their restore takes the standby; until then it is kept).
pub(crate) fn placement(
    local: &str,
    members: &BTreeMap<String, BTreeSet<u32>>,
    partitions: u32,
    replicas: usize,
    current: &BTreeSet<u32>,
) -> BTreeSet<u32> {
    let mut owners: BTreeMap<u32, &str> = BTreeMap::new();
    for (node, shards) in members {
        for shard in shards {
            owners.insert(*shard, node);
        }
    }
    (0..partitions)
        .filter(|shard| match owners.get(shard) {
            // Kept until the restore of the shard here takes it (`Standbys::take`).
            Some(owner) if *owner == local => current.contains(shard),
            Some(owner) => {
                standby_nodes(*shard, owner, members.keys().map(String::as_str), replicas)
                    .contains(&local)
            }
            None => current.contains(shard),
        })
        .collect()
}

/// A standby's states and how far it has read.
pub(crate) struct Warm<S> {
    pub states: EntityMap<Stored<S>>,
    /// Whether a folded state held a timer (see `changelog::fold`).
    pub timers: bool,
    /// The changelog offset after the last folded record (every committed record before it is
    /// in `states`); `None` before the first.
    pub next_offset: Option<i64>,
    /// Records folded since the standby started.
    pub records: u64,
    started: Instant,
    /// Whether it reached the end of the committed changelog once.
    warmed: bool,
    /// Whether nothing arrived since it last reached the end.
    at_end: bool,
    /// The end offset read last, if no record came after it: the consumer's position is then
    /// one past it (see `kafka_batch::Read::End`).
    end_read: Option<i64>,
    /// When it was last known to be at the end.
    caught_up_at: Instant,
    /// Offsets between its position and the changelog's end, at the last measurement.
    lag_records: i64,
}

impl<S> Warm<S> {
    /// It has read every committed record (as of now); `newly_warm` collects the shards for
    /// which that is the first time.
    fn caught_up(&mut self, shard: u32, newly_warm: &mut Vec<u32>) {
        self.at_end = true;
        self.caught_up_at = Instant::now();
        if !self.warmed {
            self.warmed = true;
            newly_warm.push(shard);
        }
    }

    fn new() -> Self {
        let now = Instant::now();
        Self {
            states: EntityMap::default(),
            timers: false,
            next_offset: None,
            records: 0,
            started: now,
            warmed: false,
            at_end: false,
            end_read: None,
            caught_up_at: now,
            lag_records: 0,
        }
    }
}

/// How far a standby's answer may be behind its owner's committed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    /// Changelog offsets between the standby's position and the changelog's end (an open
    /// checkpoint transaction counts too).
    pub records: i64,
    /// Time since the standby was last known to have read every committed record.
    pub behind: Duration,
}

#[derive(Default)]
struct Inner<S> {
    shards: BTreeMap<u32, Warm<S>>,
    /// Shards whose standby a restore took: the reader stops reading them.
    taken: Vec<u32>,
}

/// This node's standby replicas of one entity type.
pub(crate) struct Standbys<E: Entity> {
    replicas: usize,
    partitions: u32,
    table: Arc<AllocationTable>,
    inner: Mutex<Inner<E::State>>,
    metrics: Arc<Metrics>,
    /// New standbys start only once this type's own shards are live here (`settled`).
    readiness: Arc<GroupReadiness>,
}

/// How the standby reader reaches the changelog.
pub(crate) struct Reader {
    pub kafka: KafkaConnection,
    pub changelog_topic: String,
    /// The entity type's changelog offsets (for the standbys' lag; shared with its restores).
    pub ends: Arc<changelog::ChangelogEnds>,
    pub context: QuietContext,
    pub kafka_debug: Option<String>,
}

impl<E: Entity> Standbys<E> {
    pub fn new(
        replicas: usize,
        partitions: u32,
        table: Arc<AllocationTable>,
        metrics: Arc<Metrics>,
        readiness: Arc<GroupReadiness>,
    ) -> Self {
        Self {
            readiness,
            replicas,
            partitions,
            table,
            inner: Mutex::new(Inner {
                shards: BTreeMap::new(),
                taken: Vec::new(),
            }),
            metrics,
        }
    }

    /// Starts the reader thread (it idles until the placement gives this node a standby).
    pub fn start(self: &Arc<Self>, reader: Reader) {
        if self.replicas == 0 {
            return;
        }
        let this = self.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("standby-reader".into())
            .spawn(move || {
                let _in_type = span.enter();
                this.run(&reader);
            })
            .expect("cannot spawn the standby reader thread");
    }

    /// Hands the standby of `shard` over to its restore (this node now owns the shard); the
    /// reader stops reading it. `None` when this node kept none or it had read nothing yet.
    pub fn take(&self, shard: u32) -> Option<Warm<E::State>> {
        let mut inner = self.lock();
        let warm = inner.shards.remove(&shard)?;
        inner.taken.push(shard);
        warm.next_offset.is_some().then_some(warm)
    }

    /// The state of entity `id` in the standby of `shard` (the default state for an entity it
    /// has no record of) and how stale it may be; `None` when this node keeps no standby of
    /// the shard or it has not yet read the changelog to its end once.
    pub fn read(&self, shard: u32, id: &str) -> Option<(E::State, Staleness)> {
        let inner = self.lock();
        let warm = inner.shards.get(&shard).filter(|w| w.warmed)?;
        let state = warm
            .states
            .get(id)
            .map(|s| s.state.clone())
            .unwrap_or_default();
        let behind = if warm.at_end {
            Duration::ZERO
        } else {
            warm.caught_up_at.elapsed()
        };
        Some((
            state,
            Staleness {
                records: warm.lag_records,
                behind,
            },
        ))
    }

    /// Standby replicas per shard (`--standby-replicas`).
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<E::State>> {
        self.inner.lock().expect("standby lock poisoned")
    }

    fn run(&self, reader: &Reader) {
        let mut changes = self.table.subscribe();
        let mut consumer: Option<Clients> = None;
        let mut assigned: BTreeSet<u32> = BTreeSet::new();
        let mut placed_at: Option<Instant> = None;
        let mut measured_at = Instant::now();
        let mut failures = 0u32;
        loop {
            let taken = std::mem::take(&mut self.lock().taken);
            let due = placed_at.is_none_or(|at| at.elapsed() >= PLACEMENT_EVERY);
            if !taken.is_empty() || due || changes.has_changed().unwrap_or(false) {
                changes.mark_unchanged();
                placed_at = Some(Instant::now());
                // A taken standby is read no more; if this node keeps it again later, it
                // starts over.
                if let Some(c) = &consumer {
                    let stop: BTreeSet<u32> = taken.into_iter().collect();
                    self.unassign(&c.consumer, reader, &stop, &mut assigned);
                }
                let wanted = placement(
                    self.table.local_node(),
                    &self.table.members(),
                    self.partitions,
                    self.replicas,
                    &assigned,
                );
                if wanted != assigned {
                    if consumer.is_none() {
                        match Self::clients(reader) {
                            Ok(clients) => consumer = Some(clients),
                            Err(e) => {
                                failures += 1;
                                if failures == 1 || failures.is_multiple_of(20) {
                                    tracing::warn!(
                                        "cannot create the standby reader ({e}); retrying"
                                    );
                                }
                                std::thread::sleep(Duration::from_millis(500));
                                continue;
                            }
                        }
                    }
                    if let Some(c) = &consumer {
                        self.reassign(&c.consumer, reader, &wanted, &mut assigned);
                    }
                }
            }
            let Some(c) = &mut consumer else {
                std::thread::sleep(POLL);
                continue;
            };
            if assigned.is_empty() {
                std::thread::sleep(POLL);
                continue;
            }
            let mut warmed_from = self.fold_available(&c.consumer, &mut c.records, reader);
            if measured_at.elapsed() >= LAG_EVERY {
                measured_at = Instant::now();
                warmed_from += self.measure(&c.consumer, reader, &assigned);
            }
            // A warm-up reads whole changelog partitions through librdkafka's prefetch and
            // grows the maps by doubling: the allocator keeps what that freed unless asked.
            if warmed_from >= TRIM_AFTER_WARMING_FROM {
                crate::memory::release_free_memory();
            }
        }
    }

    /// The tailing consumer and its reader.
    fn clients(reader: &Reader) -> Result<Clients, KafkaError> {
        let consumer = changelog::reader(
            &reader.kafka,
            &reader.changelog_topic,
            "standby",
            &[
                // Reaching the end is how a standby knows it is current (see `Staleness`).
                ("enable.partition.eof", "true"),
                // A standby is at most one fetch wait behind the last committed checkpoint.
                ("fetch.wait.max.ms", "100"),
                // The prefetch queue (librdkafka's default is 64 MiB, which also caps one fetch
                // response): a warm-up filled it and the memory stayed with the process. Keeping
                // up with checkpoints needs far less.
                ("queued.max.messages.kbytes", "8192"),
            ],
            reader.kafka_debug.as_deref(),
            &reader.context,
        )?;
        Ok(Clients {
            records: ConsumerReader::new(&consumer, RECORDS_PER_LOCK, "the standby consumer")?,
            consumer,
        })
    }

    fn reassign(
        &self,
        consumer: &BaseConsumer<QuietContext>,
        reader: &Reader,
        wanted: &BTreeSet<u32>,
        assigned: &mut BTreeSet<u32>,
    ) {
        let dropped: BTreeSet<u32> = assigned.difference(wanted).copied().collect();
        self.unassign(consumer, reader, &dropped, assigned);
        let added: Vec<u32> = wanted.difference(assigned).copied().collect();
        // A new standby reads its changelog partition from the start: not while this node's own
        // shards restore or its group rebalances (the placement is looked at again shortly).
        if added.is_empty() || !self.readiness.settled() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for shard in &added {
            if let Err(e) =
                tpl.add_partition_offset(&reader.changelog_topic, *shard as i32, Offset::Beginning)
            {
                tracing::warn!("cannot keep a standby of shard {shard}: {e}");
                return;
            }
        }
        {
            let mut inner = self.lock();
            for shard in &added {
                inner.shards.insert(*shard, Warm::new());
            }
        }
        if let Err(e) = consumer.incremental_assign(&tpl) {
            tracing::warn!("cannot start the standby replicas of shards {added:?} ({e}); retrying");
            let mut inner = self.lock();
            for shard in &added {
                inner.shards.remove(shard);
            }
            return;
        }
        assigned.extend(added.iter().copied());
        self.metrics.standby_shards.set(assigned.len() as i64);
        tracing::info!(
            "standby replicas of shards {added:?} started on this node ({} kept here)",
            assigned.len()
        );
    }

    fn unassign(
        &self,
        consumer: &BaseConsumer<QuietContext>,
        reader: &Reader,
        shards: &BTreeSet<u32>,
        assigned: &mut BTreeSet<u32>,
    ) {
        let shards: Vec<u32> = shards.intersection(assigned).copied().collect();
        if shards.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for shard in &shards {
            tpl.add_partition(&reader.changelog_topic, *shard as i32);
        }
        if let Err(e) = consumer.incremental_unassign(&tpl) {
            tracing::warn!("cannot stop reading the standbys of shards {shards:?}: {e}");
        }
        let mut inner = self.lock();
        for shard in &shards {
            inner.shards.remove(shard);
            assigned.remove(shard);
            self.metrics.set_standby_lag(*shard, None);
        }
        self.metrics.standby_shards.set(assigned.len() as i64);
        self.count_entities(&inner);
        tracing::info!(
            "standby replicas of shards {shards:?} dropped ({} kept here)",
            assigned.len()
        );
    }

    /// Folds what the consumer has (waiting up to [`POLL`] for the first record); returns the
    /// records the standbys that just got warm read.
    fn fold_available(
        &self,
        consumer: &BaseConsumer<QuietContext>,
        records: &mut ConsumerReader<QuietContext>,
        reader: &Reader,
    ) -> u64 {
        // At most one lock's worth: the positions move past every record read, so each is
        // folded before the next read (one dropped would be missing from the standby for good,
        // and a restore from it would lose that entity's latest state).
        let batch = records.read_now_or_first(RECORDS_PER_LOCK, POLL);
        if batch.is_empty() {
            return 0;
        }
        let mut newly_warm = Vec::new();
        let mut inner = self.lock();
        for read in batch.records() {
            match read {
                Read::Record(record) => {
                    let shard = record.partition as u32;
                    if let Some(warm) = inner.shards.get_mut(&shard) {
                        match changelog::fold::<E>(
                            &mut warm.states,
                            &mut warm.timers,
                            &reader.changelog_topic,
                            record,
                        ) {
                            Ok(()) => {
                                warm.next_offset = Some(record.offset + 1);
                                warm.records += 1;
                                warm.at_end = false;
                                warm.end_read = None;
                            }
                            Err(unreadable) => {
                                // Kept without this state, the replica would make a promoted
                                // shard start its entity from an older one: dropped instead,
                                // and a restore reads (and refuses) the record itself.
                                inner.shards.remove(&shard);
                                self.metrics.set_standby_lag(shard, None);
                                refused(consumer, reader, shard, &unreadable);
                            }
                        }
                    }
                }
                Read::End { partition, offset } => {
                    if let Some(warm) = inner.shards.get_mut(&(partition as u32)) {
                        warm.end_read = Some(offset);
                        warm.caught_up(partition as u32, &mut newly_warm);
                    }
                }
                Read::Failed(e) => reader.context.health.client_error(&e, "standby read"),
            }
        }
        drop(batch);
        if !newly_warm.is_empty() || inner.shards.values().any(|w| w.at_end) {
            advance_to_positions(consumer, reader, &mut inner);
        }
        log_warm(&inner, &newly_warm)
    }

    /// Measures each standby's lag (changelog end − read position) for the metrics and reads;
    /// returns the records the standbys that just got warm read.
    fn measure(
        &self,
        consumer: &BaseConsumer<QuietContext>,
        reader: &Reader,
        assigned: &BTreeSet<u32>,
    ) -> u64 {
        let ends = match reader.ends.list(
            &reader.changelog_topic,
            assigned.iter().copied(),
            Offset::End,
            WATERMARK_TIMEOUT,
        ) {
            Ok(ends) => ends,
            Err(e) => {
                reader.context.health.client_error(&e, "standby lag");
                return 0;
            }
        };
        let Ok(positions) = consumer.position() else {
            return 0;
        };
        let mut inner = self.lock();
        let mut newly_warm = Vec::new();
        for (shard, warm) in inner.shards.iter_mut() {
            let Some(end) = ends.get(shard) else {
                continue;
            };
            // Before its first fetch a partition has no position: it has read nothing.
            let position = match positions
                .find_partition(&reader.changelog_topic, *shard as i32)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(position)) => position,
                _ => warm.next_offset.unwrap_or(0),
            };
            warm.lag_records = (end - position).max(0);
            self.metrics.set_standby_lag(*shard, Some(warm.lag_records));
            // At the end now (librdkafka's end-of-partition event is not delivered for every
            // partition, e.g. not always for an empty one), or still there since the last event.
            if warm.lag_records == 0 || warm.at_end {
                warm.caught_up(*shard, &mut newly_warm);
            }
        }
        let warmed_from = log_warm(&inner, &newly_warm);
        self.count_entities(&inner);
        warmed_from
    }

    fn count_entities(&self, inner: &Inner<E::State>) {
        self.metrics
            .standby_entities
            .set(inner.shards.values().map(|w| w.states.len()).sum::<usize>() as i64);
    }
}

/// The standby reader's consumer; the batch reader first, so it is dropped before the
/// consumer whose queues it holds.
struct Clients {
    records: ConsumerReader<QuietContext>,
    consumer: BaseConsumer<QuietContext>,
}

/// Moves each standby's next offset to its consumer position: past the transaction markers
/// after its last record, which deliver nothing (a restore taking it then has nothing left to
/// read, instead of a marker). The position counts only what was read, all folded.
fn advance_to_positions<S>(
    consumer: &BaseConsumer<QuietContext>,
    reader: &Reader,
    inner: &mut Inner<S>,
) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for (shard, warm) in inner.shards.iter_mut() {
        if let Some(Offset::Offset(position)) = positions
            .find_partition(&reader.changelog_topic, *shard as i32)
            .map(|e| e.offset())
        {
            let position = warm.end_read.map_or(position, |end| position.min(end));
            if warm.next_offset.is_none_or(|next| position > next) {
                warm.next_offset = Some(position);
            }
        }
    }
}

/// One line for every standby that just read its shard's changelog to the end the first time;
/// returns the records they read.
fn log_warm<S>(inner: &Inner<S>, newly_warm: &[u32]) -> u64 {
    let warmed: Vec<&Warm<S>> = newly_warm
        .iter()
        .filter_map(|s| inner.shards.get(s))
        .collect();
    let Some(slowest) = warmed.iter().map(|w| w.started.elapsed()).max() else {
        return 0;
    };
    let records = warmed.iter().map(|w| w.records).sum::<u64>();
    tracing::info!(
        "standby replicas of shards {newly_warm:?} warm: {} entities from {records} changelog \
         records, in {} ms",
        warmed.iter().map(|w| w.states.len()).sum::<usize>(),
        slowest.as_millis()
    );
    records
}

/// Stops reading shard `shard`'s changelog for its standby, which cannot hold `unreadable`.
fn refused(
    consumer: &BaseConsumer<QuietContext>,
    reader: &Reader,
    shard: u32,
    unreadable: &changelog::UnreadableState,
) {
    tracing::error!("standby replica of shard {shard} dropped: {unreadable}");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&reader.changelog_topic, shard as i32);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!("cannot pause the standby read of shard {shard}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More records than one fold takes: a warm-up reads them in several folds, and every
    /// record must reach the standby (each is an entity's only state here). librdkafka's mock
    /// cluster stands in for the broker: what is tested is the fold loop.
    #[test]
    fn a_standby_folds_every_record_of_a_warm_up_longer_than_one_fold() {
        use crate::entity::tests::{Sum, SumState};
        use crate::entity::EntityId;
        use crate::kafka_health::KafkaHealth;
        use crate::metrics::MetricsRegistry;
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

        const RECORDS: usize = RECORDS_PER_LOCK * 2 + 500;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("changelog", 1, 1).unwrap();
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        for n in 0..RECORDS {
            let value = changelog::encode::<Sum>(&Stored::new(
                SumState {
                    count: 1,
                    sum: n as i64,
                },
                n as i64,
            ))
            .unwrap();
            producer
                .send(
                    BaseRecord::to("changelog")
                        .partition(0)
                        .key(&format!("k{n}"))
                        .payload(&value),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        let kafka = KafkaConnection::new(cluster.bootstrap_servers());
        let context = QuietContext::new(KafkaHealth::new(&kafka));
        let reader = Reader {
            ends: Arc::new(changelog::ChangelogEnds::new(&kafka, &context).unwrap()),
            context,
            kafka,
            changelog_topic: "changelog".into(),
            kafka_debug: None,
        };
        let (_, metrics) = MetricsRegistry::new("test").entity_type("g", "input", 4);
        let standbys = Standbys::<Sum>::new(
            1,
            1,
            Arc::new(AllocationTable::new("me")),
            Arc::new(metrics),
            Arc::new(GroupReadiness::new("g")),
        );
        standbys.lock().shards.insert(0, Warm::new());
        let mut clients = Standbys::<Sum>::clients(&reader).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("changelog", 0, Offset::Beginning)
            .unwrap();
        clients.consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !standbys.lock().shards[&0].warmed {
            assert!(
                Instant::now() < deadline,
                "the standby never read to the end"
            );
            standbys.fold_available(&clients.consumer, &mut clients.records, &reader);
        }
        let inner = standbys.lock();
        let warm = &inner.shards[&0];
        assert_eq!(warm.records as usize, RECORDS);
        assert_eq!(warm.states.len(), RECORDS, "a record was dropped");
        assert_eq!(warm.next_offset, Some(RECORDS as i64));
        assert_eq!(warm.states[&EntityId::from("k2000")].state.sum, 2000);
    }

    fn members(owned: &[(&str, &[u32])]) -> BTreeMap<String, BTreeSet<u32>> {
        owned
            .iter()
            .map(|(n, s)| (n.to_string(), s.iter().copied().collect()))
            .collect()
    }

    #[test]
    fn standbys_are_never_the_owner_and_are_the_same_on_every_node() {
        let nodes = ["p-1", "p-2", "p-3", "p-4"];
        for shard in 0..64 {
            let a = standby_nodes(shard, "p-2", nodes, 2);
            let mut reversed = nodes;
            reversed.reverse();
            let b = standby_nodes(shard, "p-2", reversed, 2);
            assert_eq!(a, b, "order of members does not matter");
            assert_eq!(a.len(), 2);
            assert!(!a.contains(&"p-2"));
            assert_ne!(a[0], a[1]);
        }
        assert_eq!(standby_nodes(3, "p-1", ["p-1"], 1), Vec::<&str>::new());
    }

    #[test]
    fn standbys_spread_evenly_and_a_departure_moves_only_its_own() {
        let all: Vec<String> = (1..=4).map(|i| format!("processor-{}", 2550 + i)).collect();
        // Shards owned round robin; one standby each.
        let owner = |shard: u32, nodes: &[String]| nodes[shard as usize % nodes.len()].clone();
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for shard in 0..256 {
            for n in standby_nodes(
                shard,
                &owner(shard, &all),
                all.iter().map(String::as_str),
                1,
            ) {
                *per_node.entry(n).or_default() += 1;
            }
        }
        assert_eq!(per_node.len(), 4);
        assert!(
            per_node.values().all(|c| (44..=84).contains(c)),
            "64 each expected: {per_node:?}"
        );
        // processor-2554 leaves; shards keep their owner: only standbys it held move.
        let survivors = &all[..3];
        for shard in 0..256 {
            let o = owner(shard, &all);
            if o == all[3] {
                continue;
            }
            let before = standby_nodes(shard, &o, all.iter().map(String::as_str), 1);
            let after = standby_nodes(shard, &o, survivors.iter().map(String::as_str), 1);
            if before[0] != all[3] {
                assert_eq!(before, after, "shard {shard}");
            }
        }
    }

    #[test]
    fn a_node_keeps_its_placed_standbys_and_those_without_owner() {
        let m = members(&[("a", &[0, 1, 2, 3]), ("b", &[4, 5, 6, 7]), ("c", &[])]);
        let for_b = placement("b", &m, 10, 1, &BTreeSet::new());
        let for_c = placement("c", &m, 10, 1, &BTreeSet::new());
        let for_a = placement("a", &m, 10, 1, &BTreeSet::new());
        // Every owned shard has exactly one standby, never on its owner.
        for shard in 0..8 {
            let holders = [&for_a, &for_b, &for_c]
                .iter()
                .filter(|p| p.contains(&shard))
                .count();
            assert_eq!(holders, 1, "shard {shard}");
        }
        assert!(for_a.iter().all(|s| *s >= 4));
        assert!(for_b.iter().all(|s| *s < 4 || *s >= 8));
        // Shards 8 and 9 have no owner: kept where they were, not started anywhere.
        assert!(!for_c.contains(&8));
        let current: BTreeSet<u32> = [8, 1].into();
        let kept = placement("c", &m, 10, 1, &current);
        assert!(kept.contains(&8));
        // A shard just assigned to the node keeping its standby: kept for its restore.
        let for_b_now_owning_1: BTreeSet<u32> = [1].into();
        let m = members(&[("a", &[0, 2, 3]), ("b", &[1, 4, 5, 6, 7]), ("c", &[])]);
        assert!(placement("b", &m, 10, 1, &for_b_now_owning_1).contains(&1));
        assert!(!placement("b", &m, 10, 1, &BTreeSet::new()).contains(&1));
        // Two replicas among three nodes: every other node keeps every shard.
        let both = placement("c", &m, 10, 2, &BTreeSet::new());
        assert_eq!(both, (0..8).collect());
    }
}
