//! Checkpoints: one Kafka transaction that writes the changed entity states to the changelog,
//! re-routes mis-keyed events to their key's partition, and commits the consumed offsets.
//!
//! This is what makes every event count exactly once. The transaction is atomic: after a crash
//! the next owner restores (read_committed) exactly the states whose offsets were committed,
//! and re-reads from there. A shard hands out its states and its offset in one message, so they
//! match; should a state ever be ahead of the committed offsets, its entity skips events at or
//! below the offset its state records (`entity::Stored`). The offsets are sent with the
//! consumer's group metadata, so a
//! node whose group generation is stale (a zombie that was frozen past its session timeout)
//! cannot commit them: its transaction fails and nothing it wrote becomes visible.
//!
//! An offset this producer already committed is left out once the producer has *announced*
//! that it may leave it out (commands run at their owner change states without moving it): the
//! offsets cost the transaction two round trips to the coordinators and a marker
//! (docs/BENCHMARKS.md). Such a transaction has no generation to fence it, so the offset that
//! announces it names its committer (`fencing::committer_metadata`), as every later one of the
//! partition's by this producer does, and a partition's next owner fences that committer before
//! it restores unless the group lists it (then it has let the partition go); see `restore` and
//! docs/ARCHITECTURE.md. A partition whose offsets always move (events only) never announces,
//! so its next owner fences nobody.
//!
//! Errors come in two kinds. An abortable one ([`CheckpointError::Aborted`]) is aborted and its
//! content stays dirty in the shards, so the next checkpoint retries it. After a fatal one, or
//! when even the abort fails (the transaction's state is then unknown), the producer is of no
//! further use ([`CheckpointError::Fatal`]): the consumer recovers (see `consumer::recovery`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka_config::{ClientKind, KafkaConnection};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::changelog::{self, record_headers};
use crate::dlq::DeadLetter;
use crate::entity::Entity;
use crate::kafka_health::QuietContext;
use crate::shard::{Checkpoint, LocalShard, OutRecord, Outgoing, Reroute, ShardMsg};

/// Waits until every record sent is acknowledged, in 1 ms steps, by `deadline`, sending what
/// lingers at once. For any producer about to commit a transaction (the checkpoint's, and
/// programs that write as a node does).
///
/// rust-rdkafka's `commit_transaction` flushes first, and its flush waits in polls of up to
/// 100 ms for delivery events, which this producer's own polling thread serves (and, with
/// delivery reports for errors only, which never come): every commit took at least 100 ms,
/// the whole of a command's wait. After this, that flush finds nothing outstanding.
///
/// librdkafka sends a partition's batch before `linger.ms` only while a flush call is under
/// way (`rk_flushing`, checked by each broker thread when it wakes). rust-rdkafka's flush
/// calls `rd_kafka_flush` with no wait, which leaves that window too short for the broker
/// threads to see, so a commit would wait out the linger; each step here holds it for 1 ms.
/// So a commit never waits for the linger, whatever an operator sets it to.
pub fn delivered<P: Producer<C>, C: rdkafka::producer::ProducerContext>(
    producer: &P,
    deadline: Instant,
) -> Result<(), KafkaError> {
    let client = producer.client().native_ptr();
    loop {
        // SAFETY: `client` is the producer's handle, alive while `producer` is borrowed;
        // rd_kafka_flush may be called from any thread, alongside the producer's own polling.
        let outcome = unsafe { rdkafka::bindings::rd_kafka_flush(client, 1) };
        match RDKafkaErrorCode::from(outcome) {
            RDKafkaErrorCode::NoError => return Ok(()),
            RDKafkaErrorCode::OperationTimedOut if Instant::now() < deadline => {}
            error => return Err(KafkaError::Flush(error)),
        }
    }
}

/// The checkpoint producer's settings that an operator may change (`KAFKA_CLIENT_PRODUCER_*`,
/// `-X producer.…`); the transactional ones are the node's own.
///
/// - Delivery reports are ignored (a failed record fails the transaction), so only errors get
///   one: with a report per record the producer's polling thread took a tenth of a node's CPU
///   writing a million new entities' states, 2% without.
/// - A transaction begun right after a commit is refused (CONCURRENT_TRANSACTIONS) until the
///   broker has written the commit's markers, and retried after the backoff: librdkafka's
///   100 ms made every back-to-back checkpoint (commands arriving while one commits) take
///   100 ms more.
/// - A commit sends what lingers at once (`delivered`, above), so a longer linger would not delay a
///   command's reply; 20 ms did not make a million new entities' checkpoints measurably
///   cheaper for the broker (docs/BENCHMARKS.md), so it stays short.
pub const CHECKPOINT_PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "1"),
    ("compression.type", "lz4"),
    ("delivery.report.only.error", "true"),
    ("retry.backoff.ms", "5"),
];

/// Header on a re-routed event: where it was first read.
pub const HEADER_REROUTED_FROM: &str = "rerouted.from";

/// How long `init_transactions` may take when the producer is first created.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an abort may take after a checkpoint failed or ran out of time. Past it the
/// transaction's state is unknown and the producer is re-created (a recovery), which costs a
/// restore: worth a few seconds' wait.
pub(super) const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a shard may take to hand its checkpoint over.
const SHARD_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot create the transactional producer: {0}")]
    Create(KafkaError),
    /// The transaction was aborted; its content is retried by the next checkpoint.
    #[error("checkpoint aborted: {0}")]
    Aborted(KafkaError),
    #[error("the consumer has no group membership to commit offsets for")]
    NotInGroup,
    #[error("the checkpoint thread has stopped")]
    WorkerGone,
    /// Its deadline passed before it began (the checkpoint in flight before it used the time).
    #[error("no time was left before the checkpoint's deadline")]
    Expired,
    /// librdkafka did not return from the transaction by its deadline and the abort's time
    /// (see `checkpoint_worker`): the producer is given up.
    #[error("the checkpoint transaction did not end by its deadline")]
    Stuck,
    /// The producer is of no further use (fenced by another instance, or its transaction state
    /// is unknown after a failed abort): it must be re-created.
    #[error("checkpoint producer failed fatally: {0}")]
    Fatal(KafkaError),
}

/// Everything needed to (re-)create a node's transactional producer.
#[derive(Clone)]
pub(crate) struct CheckpointerConfig {
    pub kafka: KafkaConnection,
    /// Stable per node: a restarted node (or a re-created producer) fences the previous one.
    pub transactional_id: String,
    /// The node's id, which the offsets that announce this producer name
    /// (`fencing::committer_metadata`).
    pub node: String,
    pub transaction_timeout: Duration,
    pub changelog_topic: String,
    pub input_topic: String,
    pub dlq_topic: String,
    pub context: QuietContext,
    /// librdkafka debug contexts (`--kafka-debug`, e.g. `eos`), if any.
    pub kafka_debug: Option<String>,
}

pub(crate) struct Checkpointer {
    producer: ThreadedProducer<QuietContext>,
    changelog_topic: String,
    input_topic: String,
    dlq_topic: String,
    /// Every changelog record says which input topic its offsets belong to.
    changelog_headers: OwnedHeaders,
    /// The offsets this producer committed. Only a successful commit adds one, and a partition
    /// let go is forgotten, so a partition's first checkpoint after it is taken over (or by a
    /// new producer) always sends it.
    committed: HashMap<u32, i64>,
    /// The partitions whose committed offset announced that this producer may leave it out
    /// (see [`OffsetPlan`]); forgotten with `committed`.
    announced: HashSet<u32>,
    /// The metadata of an announcing offset: this node, as its committer.
    offset_metadata: String,
    /// How long one checkpoint may take unless its caller says otherwise.
    transaction_timeout: Duration,
}

impl Checkpointer {
    /// Creates the producer and initialises its transactions, which fences any earlier
    /// producer with the same transactional id (aborting its open transaction).
    pub fn new(config: &CheckpointerConfig) -> Result<Self, CheckpointError> {
        let this = Self::create(config)?;
        this.init(INIT_TIMEOUT)?;
        Ok(this)
    }

    /// Creates the producer without contacting the broker; [`Checkpointer::init`] must follow.
    pub fn create(config: &CheckpointerConfig) -> Result<Self, CheckpointError> {
        let mut client = config
            .kafka
            .client_with(ClientKind::Producer, CHECKPOINT_PRODUCER_DEFAULTS);
        crate::kafka_admin::with_debug(&mut client, config.kafka_debug.as_deref());
        let producer: ThreadedProducer<QuietContext> = client
            .set("transactional.id", &config.transactional_id)
            .set(
                "transaction.timeout.ms",
                config.transaction_timeout.as_millis().to_string(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .create_with_context(config.context.clone())
            .map_err(CheckpointError::Create)?;
        Ok(Self {
            producer,
            changelog_topic: config.changelog_topic.clone(),
            input_topic: config.input_topic.clone(),
            dlq_topic: config.dlq_topic.clone(),
            changelog_headers: record_headers(&config.input_topic),
            committed: HashMap::new(),
            announced: HashSet::new(),
            offset_metadata: crate::fencing::committer_metadata(&config.node),
            transaction_timeout: config.transaction_timeout,
        })
    }

    /// `init_transactions`. A [`CheckpointError::Fatal`] leaves the producer unusable; any other
    /// error (a timeout while the broker is away) may be retried on the same producer.
    pub fn init(&self, timeout: Duration) -> Result<(), CheckpointError> {
        self.producer
            .init_transactions(timeout)
            .map_err(|e| match self.classify(e) {
                CheckpointError::Aborted(e) => CheckpointError::Create(e),
                fatal => fatal,
            })
    }

    /// How long a transaction may stay open before the broker aborts it.
    pub fn transaction_timeout(&self) -> Duration {
        self.transaction_timeout
    }

    /// Collects a checkpoint from each shard and commits them in one transaction. Returns
    /// whether there was anything to commit.
    ///
    /// Every wait on the broker is given the time left until `deadline` (then the transaction
    /// is aborted, within [`ABORT_TIMEOUT`] more). librdkafka does not always keep to it
    /// (`send_offsets_to_transaction` can wait on a lost coordinator for good,
    /// confluentinc/librdkafka#5456), so the checkpoint thread's caller bounds the wait too.
    pub fn run<E: Entity>(
        &mut self,
        runtime: &tokio::runtime::Handle,
        group: &ConsumerGroupMetadata,
        shards: &[(u32, LocalShard<E>)],
        deadline: Instant,
    ) -> Result<bool, CheckpointError> {
        if Instant::now() >= deadline {
            return Err(CheckpointError::Expired);
        }
        let started = Instant::now();
        let shard_timeout = remaining(deadline).min(SHARD_CHECKPOINT_TIMEOUT);
        let checkpoints: Vec<(LocalShard<E>, Checkpoint<E::State>)> = runtime
            .block_on(futures::future::join_all(shards.iter().map(
                |(_, shard)| async move {
                    let cp = shard
                        .actor
                        .call(ShardMsg::Checkpoint, Some(shard_timeout))
                        .await;
                    match cp {
                        Ok(ractor::rpc::CallResult::Success(cp)) => Some((shard.clone(), cp)),
                        _ => None,
                    }
                },
            )))
            .into_iter()
            .flatten()
            .collect();
        // States are encoded before anything is written: a shard with a state its codec cannot
        // write contributes nothing (not its offset either: committing past the change without
        // its state would lose it) and is refused (see `changelog::UnreadableState`).
        let checkpoints: Vec<Encoded<E>> = checkpoints
            .into_iter()
            .filter_map(|(shard, cp)| match encode_states::<E>(&cp) {
                Ok(values) => Some((shard, cp, values)),
                Err(why) => {
                    tracing::error!("shard {} not checkpointed: {why}", cp.partition);
                    let _ = shard.actor.cast(ShardMsg::Refused(Arc::from(why)));
                    None
                }
            })
            .collect();
        let moved = |cp: &Checkpoint<E::State>| {
            cp.commit_offset
                .is_some_and(|o| self.committed.get(&cp.partition) != Some(&o))
        };
        if checkpoints
            .iter()
            .all(|(_, cp, _)| cp.is_empty() && !moved(cp))
        {
            return Ok(false);
        }
        let plans: Vec<OffsetPlan> = checkpoints
            .iter()
            .map(|(_, cp, _)| self.plan::<E>(cp))
            .collect();
        let collected = started.elapsed();
        super::commit_hold::before_write(
            checkpoints.iter().map(|(_, cp, _)| cp.states.len()).sum(),
        );
        self.producer
            .begin_transaction()
            .map_err(|e| self.classify(e))?;
        let mut offsets = TopicPartitionList::new();
        for ((_, cp, values), plan) in checkpoints.iter().zip(&plans) {
            if let Err(e) = self.write::<E>(cp, values, *plan, &mut offsets, deadline) {
                return Err(self.abort(e));
            }
        }
        let written = started.elapsed();
        let states = checkpoints.iter().map(|(_, cp, _)| cp.states.len()).sum();
        if let Err(e) = self.commit(&offsets, group, deadline, states) {
            return Err(self.abort(e));
        }
        tracing::debug!(
            "checkpoint of {states} states from {} shards committed in {:?} (collected and encoded by {:?}, written by {:?})",
            checkpoints.len(),
            started.elapsed(),
            collected,
            written
        );
        for ((shard, cp, _), plan) in checkpoints.into_iter().zip(plans) {
            if let Some(offset) = cp.commit_offset {
                self.committed.insert(cp.partition, offset);
            }
            if plan == OffsetPlan::Announce {
                self.announced.insert(cp.partition);
            }
            let _ = shard.actor.cast(ShardMsg::Checkpointed { seq: cp.seq });
        }
        Ok(true)
    }

    /// Adds the consumed offsets that moved (if any) to the open transaction (which holds
    /// `states` state records) and commits it, both by `deadline`.
    fn commit(
        &self,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
        deadline: Instant,
        states: usize,
    ) -> Result<(), KafkaError> {
        let started = Instant::now();
        if offsets.count() > 0 {
            self.producer
                .send_offsets_to_transaction(offsets, group, remaining(deadline))?;
        }
        let offsets_sent = started.elapsed();
        delivered(&self.producer, deadline)?;
        let delivered_by = started.elapsed();
        super::commit_hold::before_commit(states);
        self.producer.commit_transaction(remaining(deadline))?;
        tracing::trace!(
            "checkpoint commit: offsets sent in {offsets_sent:?}, records delivered by {delivered_by:?}, committed by {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// Forgets what was committed for partitions no longer owned.
    pub fn forget(&mut self, partitions: &[u32]) {
        for p in partitions {
            self.committed.remove(p);
            self.announced.remove(p);
        }
    }

    /// What `cp`'s offset does in this checkpoint.
    fn plan<E: Entity>(&self, cp: &Checkpoint<E::State>) -> OffsetPlan {
        let Some(offset) = cp.commit_offset else {
            return OffsetPlan::LeaveOut;
        };
        let moved = self.committed.get(&cp.partition) != Some(&offset);
        let announced = self.announced.contains(&cp.partition);
        match (moved, announced) {
            (false, true) => OffsetPlan::LeaveOut,
            (true, true) => OffsetPlan::Announce,
            // Changes without a moved offset (commands run at their owner): from now on.
            (false, false) if !cp.is_empty() => OffsetPlan::Announce,
            // Nothing of the partition's to commit.
            (false, false) => OffsetPlan::LeaveOut,
            (true, false) => OffsetPlan::Send,
        }
    }

    fn write<E: Entity>(
        &self,
        cp: &Checkpoint<E::State>,
        values: &[Vec<u8>],
        plan: OffsetPlan,
        offsets: &mut TopicPartitionList,
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        for ((id, _), value) in cp.states.iter().zip(values) {
            self.send(
                BaseRecord::to(&self.changelog_topic)
                    .partition(cp.partition as i32)
                    .key(id.as_bytes())
                    .payload(value)
                    .headers(self.changelog_headers.clone()),
                deadline,
            )?;
        }
        for outgoing in &cp.outgoing {
            match outgoing {
                Outgoing::Reroute(reroute) => self.send_reroute(cp.partition, reroute, deadline)?,
                Outgoing::DeadLetter(letter) => self.send_dead_letter(letter, deadline)?,
                Outgoing::Record(record) => self.send_record(record, deadline)?,
            }
        }
        if let (Some(offset), OffsetPlan::Send | OffsetPlan::Announce) = (cp.commit_offset, plan) {
            let mut element = offsets.add_partition(&self.input_topic, cp.partition as i32);
            element.set_offset(Offset::Offset(offset))?;
            if plan == OffsetPlan::Announce {
                element.set_metadata(&self.offset_metadata);
            }
        }
        Ok(())
    }

    /// A mis-keyed record read from `partition`, as it was read, to its key's partition.
    fn send_reroute(
        &self,
        partition: u32,
        reroute: &Reroute,
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        let origin = format!("{partition}/{}", reroute.source_offset);
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER_REROUTED_FROM,
            value: Some(origin.as_str()),
        });
        let mut record = BaseRecord::to(&self.input_topic)
            .partition(reroute.target_partition as i32)
            .key(reroute.key.as_slice())
            .headers(headers);
        if let Some(value) = &reroute.value {
            record = record.payload(value);
        }
        self.send(record, deadline)
    }

    /// A message between entities or an emitted record (see `effects`).
    fn send_record(&self, out: &OutRecord, deadline: Instant) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (key, value) in &out.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        let mut record: BaseRecord<'_, [u8], Vec<u8>> = BaseRecord::to(&out.topic).headers(headers);
        if let Some(partition) = out.partition {
            record = record.partition(partition as i32);
        }
        if let Some(key) = &out.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &out.value {
            record = record.payload(value);
        }
        self.send(record, deadline)
    }

    /// A malformed record, as it was read, to the dead-letter topic.
    fn send_dead_letter(&self, letter: &DeadLetter, deadline: Instant) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(&self.dlq_topic).headers(letter.headers());
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &letter.value {
            record = record.payload(value);
        }
        self.send(record, deadline)
    }

    /// Sends one record, waiting while the producer queue is full (until `deadline`).
    fn send(
        &self,
        mut record: BaseRecord<'_, [u8], Vec<u8>>,
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn abort(&self, e: KafkaError) -> CheckpointError {
        let error = self.classify(e);
        if let CheckpointError::Aborted(_) = error {
            if let Err(abort_error) = self.producer.abort_transaction(ABORT_TIMEOUT) {
                // The transaction's state is unknown (e.g. the broker is away): only a new
                // producer, whose init_transactions aborts it, gets a clean state again.
                return CheckpointError::Fatal(abort_error);
            }
        }
        error
    }

    fn classify(&self, e: KafkaError) -> CheckpointError {
        match &e {
            KafkaError::Transaction(t) if t.is_fatal() => CheckpointError::Fatal(e),
            _ => CheckpointError::Aborted(e),
        }
    }
}

/// What a checkpoint does with a partition's offset.
///
/// A producer may leave a partition's offset out of a transaction that changes its states
/// only after it *announced* it: committed the offset with metadata naming this node as the
/// committer, which the partition's next owner reads and fences (`restore`). Every later offset
/// of the partition this producer commits announces again, so the last committed offset tells
/// whether its committer may have changed states without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OffsetPlan {
    /// Not sent: it did not move and was announced, or nothing of the partition's changed.
    LeaveOut,
    /// Sent as it always was: the generation check covers this transaction.
    Send,
    /// Sent naming this node as its committer.
    Announce,
}

/// The time left until `deadline`; zero once it passed (librdkafka then fails the call at once
/// unless it is already done).
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
/// A shard's checkpoint with its states' changelog values, ready to write.
type Encoded<E> = (
    LocalShard<E>,
    Checkpoint<<E as Entity>::State>,
    Vec<Vec<u8>>,
);

/// The changelog values of a checkpoint's states, in order; or why one does not encode.
fn encode_states<E: Entity>(cp: &Checkpoint<E::State>) -> Result<Vec<Vec<u8>>, String> {
    cp.states
        .iter()
        .map(|(id, stored)| {
            changelog::encode::<E>(stored).map_err(|e| {
                format!(
                    "the state of entity {id} does not encode ({e}); nothing of the shard is committed \
                     (its input is read again once a build that encodes it runs)"
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::{Json, Rejection, Stored};
    use std::collections::BTreeMap;

    /// Pairs by a pair of numbers: JSON cannot write a map with such keys once it holds one.
    struct Pairs;

    impl Entity for Pairs {
        type Event = (u8, u8);
        type State = BTreeMap<(u8, u8), u8>;
        type Query = ();
        type Reply = ();
        type Codec = Json;
        fn decode(_: &str, _: Option<&[u8]>) -> Result<(u8, u8), Rejection> {
            Err(Rejection::new("unused"))
        }
        fn apply(state: &mut Self::State, pair: &(u8, u8)) {
            state.insert(*pair, 1);
        }
        fn query(_: &Self::State, _: &()) {}
    }

    // librdkafka's mock cluster: when the client sends is the client's behaviour, not the
    // broker's. Without the flush held open, the record waits out its linger and the deadline
    // passes first.
    #[test]
    fn delivered_sends_what_lingers_at_once() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("changelog", 1, 1).unwrap();
        let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .set("linger.ms", "60000")
                .create()
                .unwrap();
        producer
            .send(
                BaseRecord::to("changelog")
                    .partition(0)
                    .key("a")
                    .payload("1"),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        delivered(&producer, Instant::now() + Duration::from_secs(10))
            .expect("the record is sent and acknowledged long before its 60 s linger");
        assert_eq!(producer.in_flight_count(), 0);
    }

    /// A partition's offset is sent when it moved; a checkpoint that changes states without
    /// moving it announces this node as the committer first, and only then leaves it out; the
    /// announcement sticks to the partition until it is let go.
    #[test]
    fn an_offset_is_left_out_only_after_it_named_its_committer() {
        // Created, never connected: planning and `write` only fill the offsets here.
        let kafka = KafkaConnection::new("127.0.0.1:1");
        let mut checkpointer = Checkpointer::create(&CheckpointerConfig {
            context: QuietContext::new(crate::kafka_health::KafkaHealth::new(&kafka)),
            kafka,
            transactional_id: "group-node-7".into(),
            node: "node-7".into(),
            transaction_timeout: Duration::from_secs(10),
            changelog_topic: "changelog".into(),
            input_topic: "input".into(),
            dlq_topic: "dlq".into(),
            kafka_debug: None,
        })
        .unwrap();
        let cp = |offset, changed: bool| Checkpoint::<BTreeMap<(u8, u8), u8>> {
            partition: 2,
            seq: 1,
            commit_offset: Some(offset),
            states: if changed {
                vec![("a".into(), Stored::new(BTreeMap::new(), 8))]
            } else {
                Vec::new()
            },
            outgoing: Vec::new(),
        };
        // Plans `cp` as a checkpoint would and writes its offset (its states would need an
        // open transaction), then records it as committed.
        let commit = |checkpointer: &mut Checkpointer, offset, changed| {
            let plan = checkpointer.plan::<Pairs>(&cp(offset, changed));
            let mut offsets = TopicPartitionList::new();
            let deadline = Instant::now() + Duration::from_secs(1);
            checkpointer
                .write::<Pairs>(&cp(offset, false), &[], plan, &mut offsets, deadline)
                .unwrap();
            checkpointer.committed.insert(2, offset);
            if plan == OffsetPlan::Announce {
                checkpointer.announced.insert(2);
            }
            offsets
                .elements()
                .iter()
                .map(|e| (e.offset(), e.metadata().to_string()))
                .collect::<Vec<_>>()
        };
        let named = crate::fencing::committer_metadata("node-7");
        let at = Offset::Offset;
        assert_eq!(
            commit(&mut checkpointer, 9, true),
            vec![(at(9), String::new())],
            "moved"
        );
        assert_eq!(
            commit(&mut checkpointer, 9, false),
            vec![],
            "nothing changed"
        );
        assert_eq!(
            commit(&mut checkpointer, 9, true),
            vec![(at(9), named.clone())],
            "changes without a moved offset: announced first"
        );
        assert_eq!(
            commit(&mut checkpointer, 9, true),
            vec![],
            "announced: left out"
        );
        assert_eq!(
            commit(&mut checkpointer, 10, true),
            vec![(at(10), named.clone())],
            "moved, and still announcing"
        );
        checkpointer.forget(&[2]);
        assert_eq!(
            commit(&mut checkpointer, 10, true),
            vec![(at(10), String::new())],
            "let go, then taken again: sent, not announced"
        );
    }

    #[test]
    fn a_checkpoint_with_a_state_that_does_not_encode_names_it_and_writes_nothing() {
        type PairsState = BTreeMap<(u8, u8), u8>;
        let cp = |states: Vec<(&str, PairsState)>| Checkpoint {
            partition: 2,
            seq: 1,
            commit_offset: Some(9),
            states: states
                .into_iter()
                .map(|(id, s)| (id.into(), Stored::new(s, 8)))
                .collect(),
            outgoing: Vec::new(),
        };
        let fine = cp(vec![("a", BTreeMap::new()), ("b", BTreeMap::new())]);
        assert_eq!(encode_states::<Pairs>(&fine).unwrap().len(), 2);
        let bad = cp(vec![
            ("a", BTreeMap::new()),
            ("b", BTreeMap::from([((1, 2), 1)])),
        ]);
        let why = encode_states::<Pairs>(&bad).unwrap_err();
        assert!(
            why.contains("the state of entity b does not encode")
                && why.contains("nothing of the shard is committed"),
            "{why}"
        );
    }
}
