//! Restoring shards from the changelog when their partitions are assigned here.
//!
//! One consumer per assignment reads every newly assigned changelog partition at once
//! (read_committed, from the beginning to the end, or from the position of this node's standby
//! replica of the shard: see `standby`), and hands each shard its states as soon as
//! *its* partition is complete, so a large shard does not hold up small ones. The changelog is
//! compacted: it holds about one record per entity. A partition with an open transaction of a
//! failed or frozen node is only read to its end once that transaction is resolved: committed
//! (a frozen node that resumes can still commit it) or aborted. A previous owner that has left
//! the consumer group has its transaction aborted at once, beside the restore (see
//! [`Restorer::fence_departed`]);
//! otherwise the abort comes after the producers' `transaction.timeout.ms`, which is logged
//! while waiting.
//!
//! Before it reads a changelog partition, the restore fences the node named by the partition's
//! last committed offset unless the group lists that node (see [`Restorer::fence_committers`]):
//! that node's checkpoints may leave out offsets that have not moved, so nothing else would stop
//! its late transaction from changing the states after they were read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka_config::KafkaConnection;
use ractor::ActorRef;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::allocation::AllocationTable;
use crate::changelog;
use crate::entity::{Entity, EntityMap, Stored};
use crate::fencing::{fence, transactional_id};
use crate::kafka_admin::committers;
use crate::kafka_batch::{ConsumerReader, Read};
use crate::kafka_health::QuietContext;
use crate::metrics::Metrics;
use crate::shard::ShardMsg;
use crate::standby::Standbys;

/// How often the read positions are checked while records keep coming.
const POSITION_CHECK_EVERY: Duration = Duration::from_millis(20);
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a previous owner's pending offsets (bounded by its transaction timeout).
const STABLE_OFFSETS_TIMEOUT: Duration = Duration::from_secs(60);
/// A restore that takes this long before it reads a record says where the time went.
const SLOW_START: Duration = Duration::from_millis(200);
/// How long to wait for the group's description before fencing its departed members.
const FENCE_DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the group is described while a departed node may still be a member.
const EARLY_FENCE_EVERY: Duration = Duration::from_millis(100);
/// How long after its departure a node is watched for (well past any session timeout: a node
/// still listed then is alive, and the assignment-time fence is left to deal with it).
const EARLY_FENCE_FOR: Duration = Duration::from_secs(120);
/// How often a restore still under way says how far it is (or that it waits).
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Records between two looks at the clock (reading it per record showed in the profile).
const CLOCK_EVERY_RECORDS: usize = 64;
/// Records read from librdkafka at once (`kafka_batch`).
const READ_BATCH: usize = 1024;
/// How long a read waits for a full batch: librdkafka returns what it has then. Short, so a
/// partition's last records (and an idle reader's position checks) wait at most this long.
const BATCH_WAIT: Duration = Duration::from_millis(5);
/// Upper bound on a partition's map sized up front from its record count.
const MAX_PRESIZED_ENTITIES: usize = 1 << 20;
/// Restores reading at least this many records give freed memory back to the OS.
const TRIM_AFTER_RESTORING_FROM: u64 = 50_000;

pub(crate) struct Restorer<E: Entity> {
    /// The entity type's consumer group.
    pub group: String,
    pub kafka: KafkaConnection,
    pub changelog_topic: String,
    /// The node's [`crate::kafka_admin::group_offsets_client`] and the group's input topic: the
    /// restore waits for their committed offsets to be stable (see `run`).
    pub group_offsets: Arc<BaseConsumer<QuietContext>>,
    pub input_topic: String,
    /// The entity type's changelog offsets (shared with its standbys).
    pub changelog_ends: Arc<changelog::ChangelogEnds>,
    pub metrics: Arc<Metrics>,
    /// librdkafka debug contexts for the restore consumer (`--kafka-debug`).
    pub kafka_debug: Option<String>,
    /// The node's Kafka client context (errors feed its health, not the log).
    pub context: QuietContext,
    /// This node's standby replicas: a restore starts from one's position when it has one.
    pub standbys: Arc<Standbys<E>>,
    /// This node's id (its own checkpoints' committer, never fenced by it).
    pub node: String,
}

/// Why one attempt at a restore failed; the restore tries again.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("cannot describe group {group} to learn its members: {source}")]
    Members { group: String, source: KafkaError },
    #[error(
        "cannot fence node {node}, which committed the last checkpoint of partitions \
         {partitions:?} and is not in the group: {source}"
    )]
    Fence {
        node: String,
        partitions: Vec<u32>,
        source: Box<KafkaError>,
    },
}

struct PartitionRestore<E: Entity> {
    shard: ActorRef<ShardMsg<E>>,
    states: EntityMap<Stored<E::State>>,
    /// Whether a folded state held a timer (see `changelog::fold`).
    timers: bool,
    /// How far reading got: from the log start or the standby's position, advanced at each
    /// position check (for the records-remaining gauge).
    position: i64,
    end: i64,
    records: u64,
    /// Records a standby had folded before this restore took it.
    from_standby: Option<u64>,
}

impl<E: Entity> Restorer<E> {
    /// Starts restoring `shards` on a background thread, retrying until every shard is restored
    /// or stopped (a shard that was handed off meanwhile needs no restore). `orphaned`: the
    /// shards whose owner left holding them, with when this node saw it leave (their failover
    /// ends when they are live here).
    pub fn restore(
        self: &Arc<Self>,
        shards: Vec<(u32, ActorRef<ShardMsg<E>>)>,
        orphaned: BTreeMap<u32, Instant>,
    ) {
        if shards.is_empty() {
            return;
        }
        let this = self.clone();
        let assigned_at = Instant::now();
        // Called from the consumer's rebalance callback: its span names the entity type.
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("changelog-restore".into())
            .spawn(move || {
                let _in_type = span.enter();
                let mut shards = shards;
                let mut failures = 0u32;
                loop {
                    match this.run(&mut shards, assigned_at, &orphaned) {
                        Ok(records) => {
                            // The restore consumer is gone by now: its fetch buffers (up to
                            // `fetch.max.bytes` each) were freed, and the allocator keeps them
                            // unless asked (1 M users restored: 320 MiB resident with glibc,
                            // 135 MiB after a trim; docs/BENCHMARKS.md).
                            if records >= TRIM_AFTER_RESTORING_FROM {
                                crate::memory::release_free_memory();
                            }
                            return;
                        }
                        Err(e) => {
                            shards.retain(|(_, shard)| {
                                shard.get_status() != ractor::ActorStatus::Stopped
                            });
                            if shards.is_empty() {
                                return;
                            }
                            // Every attempt fails alike while Kafka is away: say it now and then.
                            failures += 1;
                            if failures == 1 || failures.is_multiple_of(20) {
                                tracing::warn!(
                                    "changelog restore failed ({e}); retrying (attempt {failures})"
                                );
                            }
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })
            .expect("cannot spawn the restore thread");
    }

    /// Aborts the open checkpoint transaction of every previous owner that is no longer a member
    /// of the group, so the restore does not wait for its transaction timeout (a SIGKILLed
    /// node's open checkpoint held a restore for 13–19 s with a 10 s timeout).
    ///
    /// Why this is safe: Kafka assigns a partition here only in a generation the previous owner
    /// is not part of. A node out of the group can no longer commit offsets (the group metadata
    /// sent with its offsets is of an older generation), and one whose offsets were accepted
    /// before it froze would commit them only when it resumes: aborting that transaction is
    /// what the restore needs anyway (nothing of it becomes visible; its events are re-read
    /// from the committed offsets), and the fenced node's next checkpoint fails and it
    /// recovers (`consumer::recovery`). A node still in the group (a static member restarting,
    /// or a member whose revoke already committed) is left alone. If the group cannot be
    /// described, nothing is fenced and the restore waits as before.
    ///
    /// It runs beside the restore, which waits for whatever transaction is open and so goes on
    /// as soon as the fence has ended it (and at once when none was open). Each fenced node is
    /// forgotten as departed in `table`, so a later assignment does not fence it again.
    pub fn fence_departed(
        self: &Arc<Self>,
        previous_owners: BTreeSet<String>,
        table: Arc<AllocationTable>,
    ) {
        if previous_owners.is_empty() {
            return;
        }
        let this = self.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("fence-departed".into())
            .spawn(move || {
                let _in_type = span.enter();
                for node in this.fence_not_in_group(&previous_owners) {
                    table.forget_departed(&node);
                }
            })
            .expect("cannot spawn the fencing thread");
    }

    /// Fences a departed node as soon as the group no longer lists it (its session expired),
    /// not only once Kafka assigns its partitions here: that comes a rebalance later, and the
    /// restore of a shard whose transaction it left open waits for the fence (0.3–1.6 s after
    /// the assignment in the bench). The rule is the same as [`Self::fence_departed`]'s: only
    /// a node the group does not list. One node does it, the first member by name (the
    /// assignment-time fence remains for the others and as a fallback; when the two run at once
    /// both initialise the id, which is harmless); the departure stays in `table`, marked
    /// fenced, to date its shards' failover.
    pub fn fence_departures_early(self: &Arc<Self>, table: Arc<AllocationTable>) {
        let this = self.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("fence-early".into())
            .spawn(move || {
                let _in_type = span.enter();
                // A fence that failed is left to the assignment-time one.
                let mut failed: BTreeSet<String> = BTreeSet::new();
                loop {
                    std::thread::sleep(EARLY_FENCE_EVERY);
                    let departed: BTreeSet<String> = table
                        .departed_unfenced(EARLY_FENCE_FOR)
                        .into_iter()
                        .filter(|n| !failed.contains(n))
                        .collect();
                    if departed.is_empty()
                        || table.members().into_keys().next().as_deref()
                            != Some(&**table.local_node())
                    {
                        continue;
                    }
                    let Some(members) = this.group_members(false) else {
                        continue;
                    };
                    for node in departed.difference(&members) {
                        if this.fence_departed_node(node, "before its partitions moved: ") {
                            table.mark_fenced(node);
                        } else {
                            failed.insert(node.clone());
                        }
                    }
                }
            })
            .expect("cannot spawn the early fencing thread");
    }

    /// The client ids of the group's members.
    fn members(&self) -> Result<BTreeSet<String>, RestoreError> {
        let list = self
            .group_offsets
            .fetch_group_list(Some(&self.group), FENCE_DESCRIBE_TIMEOUT)
            .map_err(|source| RestoreError::Members {
                group: self.group.clone(),
                source,
            })?;
        Ok(list
            .groups()
            .iter()
            .flat_map(|g| g.members())
            .map(|m| m.client_id().to_string())
            .collect())
    }

    /// The client ids of the group's members; `None` if it cannot be described (said when
    /// `say`).
    fn group_members(&self, say: bool) -> Option<BTreeSet<String>> {
        self.members()
            .inspect_err(|e| {
                if say {
                    tracing::warn!("{e}: previous owners' open transactions are left to time out");
                }
            })
            .ok()
    }

    /// Fences `node`, which the group no longer lists; returns whether that worked. `when`
    /// begins what is logged.
    fn fence_departed_node(&self, node: &str, when: &str) -> bool {
        let id = transactional_id(&self.group, node);
        match fence(&self.kafka, &id, self.context.clone()) {
            Ok(()) => {
                tracing::info!(
                    "{when}node {node} is no longer in the group: its open checkpoint \
                     transaction (if any) is aborted and its transactional id {id} fenced"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot fence {id} of node {node}, which left the group ({e}); its open \
                     transaction is left to time out"
                );
                false
            }
        }
    }

    /// Fences each of `previous_owners` the group does not list as a member; returns those
    /// fenced.
    fn fence_not_in_group(&self, previous_owners: &BTreeSet<String>) -> Vec<String> {
        let Some(members) = self.group_members(true) else {
            return Vec::new();
        };
        previous_owners
            .difference(&members)
            .filter(|node| self.fence_departed_node(node, ""))
            .cloned()
            .collect()
    }

    /// Fences each node in `committers` (by partition: the node that committed its last
    /// offset, named in it) that is not this node and that the group does not list; fails
    /// unless every such fence succeeded.
    ///
    /// Why: a checkpoint may leave out an offset its producer already committed, so a node
    /// running commands at their owner commits state changes without an offset whose group
    /// generation a zombie's transaction would fail on. It does so only after an offset it
    /// committed named it, so only the producer named by a partition's last offset can (every
    /// earlier one has since let the partition go or been fenced, by this same rule; one whose
    /// last offset named nobody sends the offset with every change), and only while it still
    /// runs the partition's shard. A node the
    /// group lists has let the shard go: Kafka assigns a partition elsewhere only after its
    /// owner's revoke callback returned, or after the owner left the group (its session
    /// expired), and a member that left rejoins only after its lost callback dropped its
    /// shards. A node the group does not list may be such a zombie: fencing its transactional
    /// id aborts its open transaction and fails every later one, so the changelog read after
    /// this holds every state it can ever commit. Fencing a node that has just rejoined costs
    /// it a recovery (`consumer::recovery`), nothing else.
    fn fence_committers(&self, committers: &BTreeMap<u32, String>) -> Result<(), RestoreError> {
        let mut by_node: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (partition, node) in committers {
            if *node != self.node {
                by_node.entry(node).or_default().push(*partition);
            }
        }
        if by_node.is_empty() {
            return Ok(());
        }
        let listed = self.members()?;
        for (node, partitions) in by_node {
            if listed.contains(node) {
                continue;
            }
            let id = transactional_id(&self.group, node);
            fence(&self.kafka, &id, self.context.clone()).map_err(|source| {
                RestoreError::Fence {
                    node: node.to_string(),
                    partitions: partitions.clone(),
                    source: Box::new(source),
                }
            })?;
            tracing::info!(
                "node {node} committed the last checkpoint of partitions {partitions:?} and is not \
                 in the group: its transactional id {id} is fenced before they are restored"
            );
        }
        Ok(())
    }

    /// Restores `shards`, removing each from the list once it has its state (so a retry after
    /// an error only does the rest); returns how many changelog records it read.
    fn run(
        &self,
        shards: &mut Vec<(u32, ActorRef<ShardMsg<E>>)>,
        assigned_at: Instant,
        orphaned: &BTreeMap<u32, Instant>,
    ) -> Result<u64, RestoreError> {
        let started = Instant::now();
        let cpu_at_start = thread_cpu_time();
        // Reading to the high watermark covers a previous owner's open transaction only once its
        // records are in the changelog. A frozen owner's checkpoint can have its offsets accepted
        // (TxnOffsetCommit) before its changelog records are appended, and commit both after it
        // resumes: this node's consumer then starts after those offsets while a restore that
        // sampled the high watermark before the append missed the states (events lost; seen in
        // the zombie test). So first wait until the group's committed offsets for these
        // partitions are stable (a read_committed OffsetFetch requires stable offsets: the
        // broker answers only once no transaction has offsets pending for them); by then every
        // record such a transaction will ever commit is in the changelog. This runs before the
        // restore consumer is created: created first, its first fetch came about a second late
        // (measured: docs/BENCHMARKS.md). The stable offsets name their committers, which are
        // fenced (if need be) before the changelog's ends are asked.
        let committers = committers(
            &self.group_offsets,
            &self.input_topic,
            shards.iter().map(|(p, _)| *p),
            STABLE_OFFSETS_TIMEOUT,
        )?;
        let stable_wait = started.elapsed();
        self.fence_committers(&committers)?;
        let fence_wait = started.elapsed() - stable_wait;
        // The end to read to is the partition's high watermark (asked with read_uncommitted):
        // reading (read_committed) up to it waits until every transaction already in the
        // partition is committed or aborted. Reading to the last stable offset instead, a frozen
        // node's checkpoint that it commits after resuming (its offsets were accepted before it
        // froze) is missing from the restored state, while this node's consumer, which waits for
        // stable offsets, resumes after it: those events would be lost.
        let consumer = changelog::reader(
            &self.kafka,
            &self.changelog_topic,
            "restore",
            // The end is known: do not let the broker hold an empty fetch for the default
            // 500 ms (two such waits were most of a small restore's time).
            &[
                ("fetch.wait.max.ms", "10"),
                ("fetch.max.bytes", "52428800"),
                ("max.partition.fetch.bytes", "10485760"),
            ],
            self.kafka_debug.as_deref(),
            &self.context,
        )?;
        // One ListOffsets request each for all partitions: asking per partition cost a broker
        // round trip each, a noticeable part of restoring 128 shards.
        let partitions = || shards.iter().map(|(p, _)| *p);
        let lows = self.changelog_ends.list(
            &self.changelog_topic,
            partitions(),
            Offset::Beginning,
            WATERMARK_TIMEOUT,
        )?;
        let highs = self.changelog_ends.list(
            &self.changelog_topic,
            partitions(),
            Offset::End,
            WATERMARK_TIMEOUT,
        )?;
        // All of a hand-over from warm standbys happens before this point when the standbys are
        // at the changelog's end: say where the time went when it is noticeable.
        let ends_wait = started.elapsed() - stable_wait - fence_wait;
        if stable_wait + fence_wait + ends_wait >= SLOW_START {
            tracing::info!(
                "restore of {} shards: {} ms waiting for the group's committed offsets to be \
                 stable (a previous owner's transaction completing), {} ms checking (and fencing) \
                 their committers, {} ms starting the readers and asking the changelog's ends",
                shards.len(),
                stable_wait.as_millis(),
                fence_wait.as_millis(),
                ends_wait.as_millis()
            );
        }
        let mut pending: BTreeMap<u32, PartitionRestore<E>> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for (partition, shard) in shards.clone() {
            let (Some(&low), Some(&high)) = (lows.get(&partition), highs.get(&partition)) else {
                return Err(KafkaError::MetadataFetch(
                    rdkafka::types::RDKafkaErrorCode::LeaderNotAvailable,
                )
                .into());
            };
            // A standby that read past the log start holds every committed record before its
            // position: only the rest is read (one whose position the log start passed, which
            // deleting records could do, is of no use).
            let warm = self
                .standbys
                .take(partition)
                .filter(|w| w.next_offset.is_some_and(|next| next >= low));
            let (start, states, timers, from_standby) = match warm {
                Some(warm) => (
                    warm.next_offset.unwrap_or(low),
                    warm.states,
                    warm.timers,
                    Some(warm.records),
                ),
                None => {
                    // A compacted changelog holds about one record per entity: sizing the map
                    // up front saves rehashing it as it grows (visible in the profile).
                    let expected = usize::try_from(high - low)
                        .unwrap_or(0)
                        .min(MAX_PRESIZED_ENTITIES);
                    (
                        low,
                        EntityMap::with_capacity_and_hasher(expected, Default::default()),
                        false,
                        None,
                    )
                }
            };
            let restore = PartitionRestore {
                shard,
                states,
                timers,
                position: start,
                end: high,
                records: 0,
                from_standby,
            };
            if high <= start {
                self.restored(partition, restore, assigned_at, started, orphaned);
                shards.retain(|(p, _)| *p != partition);
                continue;
            }
            // From the known offset: `Offset::Beginning` would make librdkafka look it up
            // again, one request per partition, before the first fetch.
            tpl.add_partition_offset(
                &self.changelog_topic,
                partition as i32,
                Offset::Offset(start),
            )?;
            pending.insert(partition, restore);
        }
        if pending.is_empty() {
            return Ok(0);
        }
        let warm = pending
            .values()
            .filter(|r| r.from_standby.is_some())
            .count();
        tracing::info!(
            "restoring {} shards from {} ({warm} from a standby's position)",
            pending.len(),
            self.changelog_topic
        );
        let to_read: i64 = pending.values().map(|r| r.end - r.position).sum();
        self.metrics.restore_records_remaining.inc_by(to_read);
        let mut reader = ConsumerReader::new(&consumer, READ_BATCH, "the restore consumer")?;
        consumer.assign(&tpl)?;
        let mut last_report = Instant::now();
        let mut last_position_check = Instant::now();
        let mut records_since_clock = 0usize;
        let mut records = 0u64;
        let mut records_at_report = 0u64;
        while !pending.is_empty() {
            let mut complete = Vec::new();
            // Short: a partition whose tail is only a transaction marker delivers no record, and
            // is seen complete at the position check after an empty read.
            let batch = reader.read(BATCH_WAIT);
            let idle = batch.is_empty();
            records_since_clock += batch.len();
            let look_at_clock = idle || records_since_clock >= CLOCK_EVERY_RECORDS;
            if look_at_clock {
                records_since_clock = 0;
            }
            for polled in batch.records() {
                let record = match polled {
                    Read::Record(record) => record,
                    // Not asked for (`enable.partition.eof` is off): ends are positions.
                    Read::End { .. } => continue,
                    Read::Failed(e) => {
                        self.context.health.client_error(&e, "changelog read");
                        continue;
                    }
                };
                records += 1;
                let partition = record.partition as u32;
                let Some(restore) = pending.get_mut(&partition) else {
                    continue;
                };
                restore.records += 1;
                let folded = changelog::fold::<E>(
                    &mut restore.states,
                    &mut restore.timers,
                    &self.changelog_topic,
                    record,
                );
                if let Err(unreadable) = folded {
                    let restore = pending.remove(&partition).expect("pending above");
                    self.refused(partition, restore, unreadable);
                    shards.retain(|(p, _)| *p != partition);
                    continue;
                }
                if record.offset + 1 >= restore.end {
                    complete.push(partition);
                }
            }
            drop(batch);
            // A partition is complete once the read position reached the high watermark it had
            // at start (transaction markers included, so a partition ending in a marker is only
            // seen complete by its position; later writes are this node's own). Positions are
            // asked when idle and every few ms, not per record: asking costs more than a record.
            if idle || (look_at_clock && last_position_check.elapsed() >= POSITION_CHECK_EVERY) {
                last_position_check = Instant::now();
                let positions = consumer.position()?;
                let position = |p: u32| {
                    positions
                        .find_partition(&self.changelog_topic, p as i32)
                        .and_then(|e| e.offset().to_raw())
                };
                for (p, restore) in pending.iter_mut() {
                    let read_to = position(*p)
                        .unwrap_or(restore.position)
                        .clamp(restore.position, restore.end);
                    self.metrics
                        .restore_records_remaining
                        .dec_by(read_to - restore.position);
                    restore.position = read_to;
                }
                complete.extend(
                    pending
                        .iter()
                        .filter(|(p, r)| position(**p).is_some_and(|pos| pos >= r.end))
                        .map(|(p, _)| *p),
                );
                complete.sort_unstable();
                complete.dedup();
            }
            for partition in complete {
                let Some(restore) = pending.remove(&partition) else {
                    continue;
                };
                self.restored(partition, restore, assigned_at, started, orphaned);
                shards.retain(|(p, _)| *p != partition);
            }
            if look_at_clock && !pending.is_empty() && last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                // A large restore reads for many seconds: say how far it is. Only a restore that
                // read nothing since the last report is waiting, and that is worth a warning.
                if records > records_at_report {
                    tracing::info!(
                        "restoring {} shards from {}: {records} records read of at most {to_read}",
                        pending.len(),
                        self.changelog_topic
                    );
                } else {
                    tracing::warn!(
                        "still restoring shards {:?}: nothing read for {} s, waiting for their \
                         changelog end (an open transaction of a failed node is aborted after the \
                         transaction timeout)",
                        pending.keys().collect::<Vec<_>>(),
                        REPORT_EVERY.as_secs()
                    );
                }
                records_at_report = records;
            }
        }
        // Whether a restore was bound by this thread or waited for the broker.
        let cpu = thread_cpu_time()
            .zip(cpu_at_start)
            .map(|(now, then)| {
                format!(
                    ", {} ms of it on the restore thread's CPU",
                    (now - then).as_millis()
                )
            })
            .unwrap_or_default();
        tracing::info!(
            "restore from {} done: {records} records read in {} ms{cpu}",
            self.changelog_topic,
            started.elapsed().as_millis()
        );
        Ok(records)
    }

    /// Tells `restore`'s shard that its changelog holds a state this build cannot read: the
    /// shard is refused (see `changelog::UnreadableState`), its states are dropped.
    fn refused(
        &self,
        partition: u32,
        restore: PartitionRestore<E>,
        unreadable: changelog::UnreadableState,
    ) {
        self.metrics
            .restore_records_remaining
            .dec_by((restore.end - restore.position).max(0));
        tracing::error!("shard {partition} not restored: {unreadable}");
        let _ = restore
            .shard
            .cast(ShardMsg::Refused(Arc::from(unreadable.to_string())));
    }

    /// Hands `restore`'s states to its shard, which goes live.
    fn restored(
        &self,
        partition: u32,
        mut restore: PartitionRestore<E>,
        assigned_at: Instant,
        started: Instant,
        orphaned: &BTreeMap<u32, Instant>,
    ) {
        // The remaining count only reaches the end at the position checks.
        self.metrics
            .restore_records_remaining
            .dec_by((restore.end - restore.position).max(0));
        // Many updates per entity (an uncompacted tail) made the map larger than needed.
        if restore.states.capacity() > 2 * restore.states.len() + 1024 {
            restore.states.shrink_to_fit();
        }
        let source = match restore.from_standby {
            Some(folded) => format!(
                "{} changelog records after its standby replica (which had read {folded})",
                restore.records
            ),
            None => format!("{} changelog records", restore.records),
        };
        tracing::info!(
            "shard {partition} restored: {} entities from {source} in {} ms",
            restore.states.len(),
            started.elapsed().as_millis()
        );
        let _ = restore.shard.cast(ShardMsg::Restored {
            states: restore.states,
            timers: restore.timers,
        });
        self.metrics
            .restore_seconds
            .observe(assigned_at.elapsed().as_secs_f64());
        self.metrics.count_restore(restore.from_standby.is_some());
        if let Some(left_at) = orphaned.get(&partition) {
            let took = left_at.elapsed();
            self.metrics.failover_seconds.observe(took.as_secs_f64());
            tracing::info!(
                "shard {partition} live here {} ms after its owner left",
                took.as_millis()
            );
        }
    }
}

/// The CPU time the calling thread has used, if the platform says.
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (read == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}
