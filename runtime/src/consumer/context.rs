//! The consumer's rebalance callbacks, which drive the hand-off protocol, and the checkpoint
//! step shared by the poll loop and the revoke callback.
//!
//! librdkafka calls the callbacks inside `poll` on the consumer thread, so they may block:
//! Kafka does not give a revoked partition to another member until the revoke callback returns.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, TopicPartitionList};

use super::checkpoint::CheckpointError;
use super::checkpoint_worker::CheckpointWorker;
use super::dispatch::Dispatcher;
use crate::entity::Entity;
use crate::handoff::Handoff;
use crate::kafka_batch::Queue;
use crate::kafka_health::KafkaHealth;
use crate::metrics::Metrics;
use crate::readiness::GroupReadiness;
use crate::shard::LocalShard;

/// Checkpoint attempts for revoked partitions before giving them up uncommitted.
const REVOKE_CHECKPOINT_ATTEMPTS: u32 = 3;

pub(crate) struct NodeContext<E: Entity> {
    pub topic: String,
    pub handoff: Arc<Handoff<E>>,
    pub dispatcher: Mutex<Dispatcher<E>>,
    pub checkpoints: Mutex<CheckpointWorker<E>>,
    pub metrics: Arc<Metrics>,
    /// Set when the checkpoint producer failed for good; the poll loop then recovers.
    pub producer_failed: Arc<AtomicBool>,
    pub health: Arc<KafkaHealth>,
    pub readiness: Arc<GroupReadiness>,
    /// librdkafka's latest statistics JSON (per-partition fetch state and offsets), when
    /// `statistics.interval.ms` is enabled; served at `/cluster/kafka-stats` for diagnosis.
    pub kafka_stats: Arc<Mutex<String>>,
    /// How long the revoke callback may spend on its final checkpoint, attempts and the wait
    /// for the one in flight included (the transaction timeout: past it the broker would abort
    /// the transaction anyway).
    pub handoff_checkpoint_budget: Duration,
    /// The poll loop's queue for records (`intake`), which the partitions are forwarded to as
    /// they are assigned; set while the loop runs.
    pub records: Mutex<Option<Arc<Queue>>>,
    /// States the shards changed since the last checkpoint began (see
    /// `ShardEnv::changed_states`); starting a checkpoint resets it.
    pub changed_states: Arc<AtomicUsize>,
}

impl<E: Entity> NodeContext<E> {
    pub fn set_records_queue(&self, queue: Option<Arc<Queue>>) {
        *self.records.lock().expect("records queue lock poisoned") = queue;
    }

    /// Sends the records of partitions about to be assigned to the poll loop's queue.
    fn forward_records(&self, tpl: &TopicPartitionList) {
        let queue = self
            .records
            .lock()
            .expect("records queue lock poisoned")
            .clone();
        let Some(queue) = queue else {
            return;
        };
        let unforwarded: Vec<u32> = self
            .partitions_of(tpl)
            .into_iter()
            .filter(|p| !queue.take_partition(&self.topic, *p as i32))
            .collect();
        if !unforwarded.is_empty() {
            tracing::warn!(
                "partitions {unforwarded:?} have no queue of their own in librdkafka: their records are read one at a time"
            );
        }
    }

    pub fn partitions_of(&self, tpl: &TopicPartitionList) -> Vec<u32> {
        let mut partitions: Vec<u32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic && e.partition() >= 0)
            .map(|e| e.partition() as u32)
            .collect();
        partitions.sort_unstable();
        partitions
    }

    fn shards(&self, partitions: Option<&[u32]>) -> Vec<(u32, LocalShard<E>)> {
        let local = self.handoff.local();
        let ids = partitions
            .map(<[u32]>::to_vec)
            .unwrap_or_else(|| local.ids());
        ids.into_iter()
            .filter_map(|p| local.get(p).map(|s| (p, s)))
            .collect()
    }

    /// Starts the periodic checkpoint of every local shard (on the checkpoint thread).
    /// Returns whether a checkpoint started (not if one is still running, or there is nothing
    /// to checkpoint).
    pub fn checkpoint_in_background(&self, consumer: &BaseConsumer<Self>) -> bool {
        if self.producer_failed.load(Ordering::SeqCst) {
            return false;
        }
        if self
            .checkpoints
            .lock()
            .expect("checkpoint lock poisoned")
            .busy()
        {
            return false;
        }
        let shards = self.shards(None);
        let started = match (shards.is_empty(), consumer.group_metadata()) {
            (false, Some(group)) => self
                .checkpoints
                .lock()
                .expect("checkpoint lock poisoned")
                .start_periodic(shards, group),
            _ => false,
        };
        if started {
            self.changed_states.store(0, Ordering::Relaxed);
        }
        started
    }

    /// Commits one checkpoint transaction for `partitions` and waits for it (after the one in
    /// flight), all by `deadline`.
    fn checkpoint_now(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[u32],
        deadline: Instant,
    ) -> Result<(), CheckpointError> {
        let shards = self.shards(Some(partitions));
        if shards.is_empty() {
            return Ok(());
        }
        let group = consumer
            .group_metadata()
            .ok_or(CheckpointError::NotInGroup)?;
        self.checkpoints
            .lock()
            .expect("checkpoint lock poisoned")
            .run_now(shards, group, deadline)
            .map(|_| ())
    }
}

impl<E: Entity> NodeContext<E> {
    /// The revoked partitions' last checkpoint: retried after an abortable failure while
    /// attempts and the budget last. Each failed attempt is one log line; giving up is safe (the
    /// next owner resumes from the previous checkpoint and re-reads the rest), waiting longer
    /// only holds the whole group's rebalance.
    fn final_checkpoint(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[u32],
        started: Instant,
    ) {
        let deadline = started + self.handoff_checkpoint_budget;
        for attempt in 1..=REVOKE_CHECKPOINT_ATTEMPTS {
            let Err(e) = self.checkpoint_now(consumer, partitions, deadline) else {
                return;
            };
            let retry = matches!(e, CheckpointError::Aborted(_))
                && attempt < REVOKE_CHECKPOINT_ATTEMPTS
                && Instant::now() < deadline;
            if retry {
                tracing::warn!(
                    "the final checkpoint of partitions {partitions:?} failed (attempt {attempt}, {} ms into the hand-off): {e}; retrying",
                    started.elapsed().as_millis()
                );
            } else {
                tracing::warn!(
                    "handing off partitions {partitions:?} without a final checkpoint after {attempt} attempt(s) in {} ms ({e}): the next owner resumes from the previous one",
                    started.elapsed().as_millis()
                );
                return;
            }
        }
    }

    /// The last step of giving up `partitions`, after their final checkpoint or without one
    /// (lost, or dropped by a recovery): a checkpoint still in flight may include them (if they
    /// were lost it will fail), so it ends first; then their shards stop and the claim shrinks.
    pub fn let_go(&self, partitions: &[u32]) {
        let mut checkpoints = self.checkpoints.lock().expect("checkpoint lock poisoned");
        // A stuck one (`None`) has been given up: the node recovers, fencing it.
        let _ = checkpoints.wait_in_flight();
        checkpoints.forget(partitions);
        drop(checkpoints);
        self.handoff.release(partitions);
    }
}

impl<E: Entity> ClientContext for NodeContext<E> {
    fn stats_raw(&self, statistics: &[u8]) {
        *self.kafka_stats.lock().expect("stats lock poisoned") =
            String::from_utf8_lossy(statistics).into_owned();
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.health.client_error(&error, reason);
    }
}

impl<E: Entity> ConsumerContext for NodeContext<E> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let tpl = match rebalance {
            Rebalance::Revoke(tpl) => tpl,
            Rebalance::Assign(tpl) => return self.forward_records(tpl),
            Rebalance::Error(_) => return,
        };
        let partitions = self.partitions_of(tpl);
        if partitions.is_empty() {
            return;
        }
        let started = Instant::now();
        let lost = consumer.assignment_lost();
        if lost {
            // Kafka will rejoin the group and assign anew; until then this node is no member.
            self.readiness.set_in_group(false);
        }
        tracing::info!(
            "partitions {:?} {} this node; handing off their shards",
            partitions,
            if lost {
                "were lost by"
            } else {
                "are being revoked from"
            }
        );
        // Everything read from these partitions goes to their shards before the drain. A lost
        // partition is drained too (its results are discarded), so no batch is dropped unseen
        // with its in-flight permits when the shard stops.
        self.dispatcher
            .lock()
            .expect("dispatcher lock poisoned")
            .flush(&partitions);
        self.handoff.drain(&partitions);
        self.metrics
            .observe_handoff_step("drain", started.elapsed());
        let checkpoint_started = Instant::now();
        if lost {
            tracing::warn!(
                "partitions {:?} were lost (session timeout?): not committing; their next owner restores the last checkpoint",
                partitions
            );
        } else {
            self.final_checkpoint(consumer, &partitions, checkpoint_started);
            self.metrics
                .observe_handoff_step("checkpoint", checkpoint_started.elapsed());
        }
        self.let_go(&partitions);
        self.metrics
            .observe_rebalance(if lost { "lost" } else { "revoked" }, started.elapsed());
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.readiness.set_in_group(true);
                // The partitions are deliberately not paused while their shards restore: pausing
                // inside the assign callback can lose the assigned start offset (librdkafka
                // issue #2190) and skip events. Events that arrive early wait in the shard.
                let started = Instant::now();
                self.handoff.take_over(&self.partitions_of(tpl));
                self.metrics
                    .observe_rebalance("assigned", started.elapsed());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::error!("rebalance error: {e}"),
        }
    }
}
