//! The node's Kafka consumer, on its own OS thread.
//!
//! One consumer per node in the shared group, cooperative-sticky assignment, `client.id` = the
//! node id (so the broker's group description shows which node holds which partition). The poll
//! loop reads records a batch at a time (`intake`), decodes them, dead-letters malformed ones
//! (`classify`), batches the rest to their shards (`dispatch`), and commits checkpoint
//! transactions. Rebalance callbacks run inside `poll` on this thread and may block, which is
//! why it is not a tokio task.
//! A failed checkpoint producer is recovered from here too (`recovery`); the loop ends only on
//! a stop request or for what a restart cannot fix ([`Unrecoverable`]).

pub(crate) mod checkpoint;
mod checkpoint_worker;
mod classify;
mod commit_hold;
mod context;
mod dispatch;
mod intake;
mod recovery;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

use crate::backpressure::InFlightGate;
use crate::commit_soon::{CommitSoon, GATHER};
use crate::entity::Entity;
use crate::handoff::Handoff;
use crate::kafka_batch::{Batch, RawRecord, Read};
use crate::kafka_config::{ClientKind, KafkaConnection};
use crate::kafka_health::{KafkaHealth, Unrecoverable};
use crate::metrics::Metrics;
use crate::readiness::GroupReadiness;
use crate::shard::LocalShards;
use crate::stats::NodeStats;
use checkpoint::{Checkpointer, CheckpointerConfig};
use checkpoint_worker::CheckpointWorker;
use classify::Reading;
use context::NodeContext;
use dispatch::Dispatcher;
use intake::Intake;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create the Kafka consumer: {0}")]
    Create(rdkafka::error::KafkaError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

pub(crate) struct ConsumerSettings {
    pub kafka: KafkaConnection,
    pub topic: String,
    pub group: String,
    pub client_id: String,
    pub session_timeout: Duration,
    pub commit_interval: Duration,
    pub partitions: u32,
    /// How often librdkafka reports statistics (0 = never).
    pub statistics_interval: Duration,
    /// librdkafka debug contexts, if any.
    pub debug: Option<String>,
    /// Join as a static member (KIP-345), the client id being the instance id.
    pub static_membership: bool,
}

/// Shared pieces the consumer drives.
pub(crate) struct ConsumerParts<E: Entity> {
    pub handoff: Arc<Handoff<E>>,
    pub local: Arc<LocalShards<E>>,
    pub gate: Arc<InFlightGate>,
    pub stats: Arc<NodeStats>,
    pub metrics: Arc<Metrics>,
    pub checkpointer: Checkpointer,
    /// How to make a new producer when the current one fails.
    pub checkpointer_config: CheckpointerConfig,
    pub health: Arc<KafkaHealth>,
    pub readiness: Arc<GroupReadiness>,
    /// Where librdkafka's statistics are kept (see `NodeContext::kafka_stats`).
    pub kafka_stats: Arc<Mutex<String>>,
    pub runtime: tokio::runtime::Handle,
    /// Set by shards that owe command answers (see `ShardEnv::commit_soon`).
    pub commit_soon: Arc<CommitSoon>,
    /// Counted by shards as states change (see `ShardEnv::changed_states`).
    pub changed_states: Arc<AtomicUsize>,
}

pub(crate) struct ConsumerHandle {
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<ConsumerExit>>,
}

/// Why the consumer thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsumerExit {
    Stopped,
    /// Something a restart cannot fix (the shards were handed off first where possible).
    Unrecoverable(Unrecoverable),
    /// The thread panicked.
    Panicked,
}

impl ConsumerHandle {
    /// Asks the loop to stop; the consumer then leaves the group, which revokes (drains and
    /// commits) every partition it holds.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    pub fn join(&mut self) -> ConsumerExit {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(exit)) => exit,
            Some(Err(_)) => ConsumerExit::Panicked,
            None => ConsumerExit::Stopped,
        }
    }
}

pub(crate) fn start<E: Entity>(
    settings: ConsumerSettings,
    parts: ConsumerParts<E>,
) -> Result<ConsumerHandle, ConsumerError> {
    let stopping = Arc::new(AtomicBool::new(false));
    let producer_failed = Arc::new(AtomicBool::new(false));
    let ConsumerParts {
        handoff,
        local,
        gate,
        stats,
        metrics,
        checkpointer,
        checkpointer_config,
        health,
        readiness,
        kafka_stats,
        runtime,
        commit_soon,
        changed_states,
    } = parts;
    let context = NodeContext {
        topic: settings.topic.clone(),
        handoff,
        dispatcher: Mutex::new(Dispatcher::new(local.clone(), gate, stopping.clone())),
        checkpoints: Mutex::new(CheckpointWorker::start(
            checkpointer,
            runtime.clone(),
            stats.clone(),
            producer_failed.clone(),
        )),
        metrics,
        producer_failed,
        health,
        readiness,
        kafka_stats,
        handoff_checkpoint_budget: checkpointer_config.transaction_timeout,
        records: Mutex::new(None),
        changed_states,
    };
    let session_ms = settings.session_timeout.as_millis().max(1_000);
    let heartbeat_ms = (session_ms / 4).max(250).to_string();
    let mut config = settings.kafka.client_with(
        ClientKind::Consumer,
        &[("heartbeat.interval.ms", heartbeat_ms.as_str())],
    );
    if settings.static_membership {
        config.set("group.instance.id", &settings.client_id);
    }
    let consumer: BaseConsumer<NodeContext<E>> =
        crate::kafka_admin::with_debug(&mut config, settings.debug.as_deref())
            .set("group.id", &settings.group)
            .set("client.id", &settings.client_id)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", session_ms.to_string())
            .set(
                "statistics.interval.ms",
                settings.statistics_interval.as_millis().to_string(),
            )
            .create_with_context(context)
            .map_err(ConsumerError::Create)?;
    consumer
        .subscribe(&[&settings.topic])
        .map_err(|source| ConsumerError::Subscribe {
            topic: settings.topic.clone(),
            source,
        })?;
    tracing::info!(
        "consuming {} ({} partitions) in group {} as {}{}",
        settings.topic,
        settings.partitions,
        settings.group,
        settings.client_id,
        if settings.static_membership {
            " (static member)"
        } else {
            ""
        }
    );
    let loop_stopping = stopping.clone();
    // Every line the loop and its rebalance callbacks log names the entity type (a node may
    // host several: "partition 3 assigned to this node" must say of which).
    let span = tracing::info_span!("shards", of = %settings.group);
    let thread = std::thread::Builder::new()
        .name("kafka-consumer".into())
        .spawn(move || {
            let _in_type = span.enter();
            poll_loop(
                consumer,
                settings,
                LoopParts {
                    local,
                    commit_soon,
                    stats,
                    checkpointer_config,
                },
                loop_stopping,
            )
        })
        .expect("cannot spawn the consumer thread");
    Ok(ConsumerHandle {
        stopping,
        thread: Some(thread),
    })
}

struct LoopParts<E: Entity> {
    local: Arc<LocalShards<E>>,
    commit_soon: Arc<CommitSoon>,
    stats: Arc<NodeStats>,
    checkpointer_config: CheckpointerConfig,
}

fn poll_loop<E: Entity>(
    mut consumer: BaseConsumer<NodeContext<E>>,
    settings: ConsumerSettings,
    parts: LoopParts<E>,
    stopping: Arc<AtomicBool>,
) -> ConsumerExit {
    let mut intake = Intake::new(&mut consumer);
    consumer.context().set_records_queue(Some(intake.records()));
    // Weak: once the loop has dropped the queue, a late call wakes nothing.
    let records = Arc::downgrade(&intake.records());
    parts.commit_soon.wake_with(Some(Box::new(move || {
        if let Some(records) = records.upgrade() {
            records.wake();
        }
    })));
    let context = consumer.context();
    let mut reading = Reading {
        topic: &settings.topic,
        partitions: settings.partitions,
        stats: &parts.stats,
        last_command: None,
    };
    let mut last_commit = Instant::now();
    // Records dispatched since the last checkpoint started: a caught-up node commits them at once.
    let mut uncommitted = false;
    let mut unrecoverable = None;
    let mut last_soon = Instant::now();
    let mut refusals = Refusals::default();
    while !stopping.load(Ordering::SeqCst) {
        if let Some(cause) = context.health.unrecoverable() {
            unrecoverable = Some(cause);
            break;
        }
        refusals.follow(&consumer, &context.readiness, &settings.topic);
        if context.producer_failed.load(Ordering::SeqCst) {
            recovery::recover(&consumer, &parts.checkpointer_config, &stopping);
            uncommitted = false;
            last_commit = Instant::now();
            continue;
        }
        // The group's events first: a rebalance runs its callbacks in here. A record can only
        // come this way if librdkafka had no queue of its partition's own (see `intake`).
        let mut events = 0;
        while events < EVENTS_PER_ROUND && intake.events_waiting() {
            events += 1;
            match consumer.poll(Duration::ZERO) {
                None => {}
                // A deleted topic or a changed partition count is found by the health monitor.
                Some(Err(e)) => context.health.client_error(&e, "consumer"),
                Some(Ok(message)) => {
                    let record = reading.consumed::<E>(RawRecord::of(&message));
                    let mut dispatcher =
                        context.dispatcher.lock().expect("dispatcher lock poisoned");
                    dispatcher.push(message.partition() as u32, record);
                    uncommitted = true;
                }
            }
        }
        let mut read = dispatch(context, &mut reading, intake.available());
        if read == 0 {
            // Caught up: what is buffered goes to the shards now, not after the wait.
            context
                .dispatcher
                .lock()
                .expect("dispatcher lock poisoned")
                .flush_all();
            // While commands are coming in (or a checkpoint is wanted and one was in flight),
            // their answers wait for this loop to start a checkpoint: wait briefly so it
            // notices at once. (A call for one raised during a longer wait ends the wait.)
            let wait = if parts.commit_soon.is_wanted()
                || reading
                    .last_command
                    .is_some_and(|t| t.elapsed() < COMMANDS_RECENTLY)
            {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(50)
            };
            read = dispatch(context, &mut reading, intake.wait(wait));
        }
        if read > 0 {
            uncommitted = true;
        } else {
            let dispatcher = context.dispatcher.lock().expect("dispatcher lock poisoned");
            // Caught up and every event run: commit now instead of at the next
            // interval, so the committed offsets (and a crash's replay) trail by milliseconds
            // when the input pauses. Spaced by half the interval at least, so light traffic
            // does not turn every record into a transaction.
            if uncommitted
                && dispatcher.all_run()
                && last_commit.elapsed() >= settings.commit_interval / 2
            {
                drop(dispatcher);
                context.checkpoint_in_background(&consumer);
                last_commit = Instant::now();
                uncommitted = false;
            }
        }
        // Answers are owed (or messages, emitted records, fired timers wait): commit now (one
        // checkpoint at a time; what is owed meanwhile rides with the next), so they wait for
        // one commit rather than for the interval. Looked at once a millisecond at most: while
        // a checkpoint runs the flag stays set, and flushing the batches on every read would
        // undo the batching.
        if last_soon.elapsed() >= SOON_AT_MOST_EVERY
            && !parts.commit_soon.gathering(GATHER)
            && parts.commit_soon.take()
        {
            last_soon = Instant::now();
            context
                .dispatcher
                .lock()
                .expect("dispatcher lock poisoned")
                .flush_all();
            if context.checkpoint_in_background(&consumer) {
                last_commit = Instant::now();
                uncommitted = false;
            } else {
                parts.commit_soon.keep();
            }
        }
        // Many states changed (events for many distinct entities): the next checkpoint starts
        // as soon as the one in flight ends, so the changelog writes run while the events are
        // applied instead of piling up for the interval and then holding the commit back for
        // as long as the broker takes to write them all. A few thousand entities changing
        // never get here: their writes stay at two per interval however many events they take.
        if context.changed_states.load(Ordering::Relaxed) >= BACKLOG_STATES
            && context.checkpoint_in_background(&consumer)
        {
            last_commit = Instant::now();
            uncommitted = false;
        }
        if last_commit.elapsed() >= settings.commit_interval {
            context.checkpoint_in_background(&consumer);
            last_commit = Instant::now();
            uncommitted = false;
        }
    }
    context
        .dispatcher
        .lock()
        .expect("dispatcher lock poisoned")
        .flush_all();
    if settings.static_membership {
        // Unsubscribing would send LeaveGroup, and every other node would rebalance. Closing
        // (the drop below) revokes every partition through the same callback (drain + commit)
        // but, for a static member, keeps its place in the group for the session timeout: a
        // node back by then gets its partitions back and nobody else's move.
        tracing::info!(
            "consumer stopping: keeping this static member's place in the group (drains and \
             checkpoints every shard)"
        );
    } else {
        tracing::info!("consumer stopping: leaving the group (drains and checkpoints every shard)");
        // Unsubscribing revokes every partition through the rebalance callback (drain + commit).
        consumer.unsubscribe();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && (!parts.local.ids().is_empty()
                || consumer
                    .assignment()
                    .map(|a| a.count() > 0)
                    .unwrap_or(false))
        {
            let _ = consumer.poll(Duration::from_millis(50));
        }
    }
    // The records' queue goes before the consumer (`Intake::new`); a static member's partitions
    // still forwarded there are revoked by the close, and their unread records read again by
    // their next owner.
    consumer.context().set_records_queue(None);
    parts.commit_soon.wake_with(None);
    drop(intake);
    drop(consumer);
    tracing::info!("consumer closed");
    match unrecoverable {
        Some(cause) => ConsumerExit::Unrecoverable(cause),
        None => ConsumerExit::Stopped,
    }
}

/// The partitions the loop paused because their shards refused their changelog state
/// (`changelog::UnreadableState`): their records would only be dropped by the shard, so they
/// are not fetched. Paused here, outside the rebalance callbacks (see `post_rebalance`), and
/// resumed once their shard has left (a partition no longer assigned ignores it).
#[derive(Default)]
struct Refusals {
    seen: u64,
    paused: std::collections::BTreeSet<u32>,
}

impl Refusals {
    fn follow<C: rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        readiness: &GroupReadiness,
        topic: &str,
    ) {
        // Every poll round: no lock, no allocation unless the refusals changed.
        if readiness.refusal_generation() == self.seen {
            return;
        }
        let (generation, refused) = readiness.refused();
        self.seen = generation;
        let refused: std::collections::BTreeSet<u32> = refused.into_iter().collect();
        let list = |partitions: Vec<u32>| {
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(topic, *p as i32);
            }
            (partitions, tpl)
        };
        let (pause, tpl) = list(refused.difference(&self.paused).copied().collect());
        if !pause.is_empty() {
            match consumer.pause(&tpl) {
                Ok(()) => tracing::warn!(
                    "partitions {pause:?} paused: their shards refused their changelog state"
                ),
                Err(e) => tracing::warn!("cannot pause partitions {pause:?}: {e}"),
            }
        }
        let (resume, tpl) = list(self.paused.difference(&refused).copied().collect());
        if !resume.is_empty() {
            let _ = consumer.resume(&tpl);
        }
        self.paused = refused;
    }
}

/// Reads a batch's records into the dispatcher; returns how many there were.
fn dispatch<E: Entity>(
    context: &NodeContext<E>,
    reading: &mut Reading<'_>,
    batch: Batch<'_>,
) -> usize {
    if batch.is_empty() {
        return 0;
    }
    let mut dispatcher = context.dispatcher.lock().expect("dispatcher lock poisoned");
    for read in batch.records() {
        match read {
            Read::Record(record) => {
                dispatcher.push(record.partition as u32, reading.consumed::<E>(record))
            }
            // Not asked for (`enable.partition.eof` is off).
            Read::End { .. } => {}
            Read::Failed(e) => context.health.client_error(&e, "consumer"),
        }
    }
    if dispatcher.should_flush() {
        dispatcher.flush_all();
    }
    batch.len()
}

/// Events `poll` serves per round of the loop, at most (records wait meanwhile).
const EVENTS_PER_ROUND: usize = 16;
/// How long after the last command the loop waits briefly (see `poll_loop`).
const COMMANDS_RECENTLY: Duration = Duration::from_millis(200);
/// States changed since the last checkpoint began that start the next one without waiting for
/// the interval (once the one in flight ends). A checkpoint of this many takes ~0.15 s to write
/// on one broker; fewer entities than this changing within an interval never reach it.
const BACKLOG_STATES: usize = 100_000;
/// How often the poll loop looks at `commit_soon`, at most.
const SOON_AT_MOST_EVERY: Duration = Duration::from_millis(1);
