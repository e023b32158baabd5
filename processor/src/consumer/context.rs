//! The consumer's rebalance callbacks, which drive the hand-off protocol, and the checkpoint
//! step shared by the poll loop and the revoke callback.
//!
//! librdkafka calls the callbacks inside `poll` on the consumer thread, so they may block:
//! Kafka does not give a revoked partition to another member until the revoke callback returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

use super::checkpoint::{CheckpointError, Checkpointer};
use super::dispatch::Dispatcher;
use crate::handoff::Handoff;
use crate::metrics::Metrics;
use crate::shard::LocalShard;
use crate::stats::NodeStats;

/// Checkpoint attempts for revoked partitions before giving them up uncommitted.
const REVOKE_CHECKPOINT_ATTEMPTS: u32 = 3;

pub struct NodeContext {
    pub topic: String,
    pub handoff: Arc<Handoff>,
    pub dispatcher: Mutex<Dispatcher>,
    pub checkpointer: Mutex<Checkpointer>,
    pub runtime: tokio::runtime::Handle,
    pub stats: Arc<NodeStats>,
    pub metrics: Arc<Metrics>,
    /// Set when this node can no longer write (fenced); the node then exits.
    pub fenced: AtomicBool,
    /// librdkafka's latest statistics JSON (per-partition fetch state and offsets), when
    /// `statistics.interval.ms` is enabled; served at `/cluster/kafka-stats` for diagnosis.
    pub kafka_stats: Arc<Mutex<String>>,
}

impl NodeContext {
    fn partitions_of(&self, tpl: &TopicPartitionList) -> Vec<u32> {
        let mut partitions: Vec<u32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic && e.partition() >= 0)
            .map(|e| e.partition() as u32)
            .collect();
        partitions.sort_unstable();
        partitions
    }

    /// Commits one checkpoint transaction for `partitions` (all local shards if `None`).
    pub fn checkpoint(&self, consumer: &BaseConsumer<Self>, partitions: Option<&[u32]>) -> Result<(), CheckpointError> {
        let local = self.handoff.local();
        let ids = partitions.map(<[u32]>::to_vec).unwrap_or_else(|| local.ids());
        let shards: Vec<(u32, LocalShard)> = ids.into_iter().filter_map(|p| local.get(p).map(|s| (p, s))).collect();
        if shards.is_empty() {
            return Ok(());
        }
        let result = self.checkpointer.lock().expect("checkpointer lock poisoned").run(&self.runtime, consumer, &shards);
        match &result {
            Ok(committed) => {
                if *committed {
                    NodeStats::add(&self.stats.checkpoints_committed, 1);
                }
            }
            Err(CheckpointError::Fatal(e)) => {
                tracing::error!("this node was fenced and can no longer commit ({e}); stopping it");
                self.fenced.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                NodeStats::add(&self.stats.checkpoints_aborted, 1);
                tracing::warn!("{e}; the next checkpoint retries");
            }
        }
        result.map(|_| ())
    }
}

impl ClientContext for NodeContext {
    fn stats_raw(&self, statistics: &[u8]) {
        *self.kafka_stats.lock().expect("stats lock poisoned") = String::from_utf8_lossy(statistics).into_owned();
    }
}

impl ConsumerContext for NodeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = self.partitions_of(tpl);
        if partitions.is_empty() {
            return;
        }
        let started = Instant::now();
        let lost = consumer.assignment_lost();
        tracing::info!(
            "partitions {:?} {} this node; handing off their shards",
            partitions,
            if lost { "were lost by" } else { "are being revoked from" }
        );
        // Everything read from these partitions goes to their shards before the drain. A lost
        // partition is drained too (its results are discarded), so no batch is dropped unseen
        // with its in-flight permits when the shard stops.
        self.dispatcher.lock().expect("dispatcher lock poisoned").flush(&partitions);
        self.handoff.drain(&partitions);
        self.metrics.observe_handoff_step("drain", started.elapsed());
        let checkpoint_started = Instant::now();
        if lost {
            tracing::warn!(
                "partitions {:?} were lost (session timeout?): not committing; their next owner restores the last checkpoint",
                partitions
            );
        } else {
            let mut attempt = 1;
            while let Err(e) = self.checkpoint(consumer, Some(&partitions)) {
                if matches!(e, CheckpointError::Fatal(_)) || attempt >= REVOKE_CHECKPOINT_ATTEMPTS {
                    tracing::warn!("handing off {:?} without a final checkpoint: the next owner resumes from the previous one", partitions);
                    break;
                }
                attempt += 1;
            }
            self.metrics.observe_handoff_step("checkpoint", checkpoint_started.elapsed());
        }
        self.checkpointer.lock().expect("checkpointer lock poisoned").forget(&partitions);
        self.handoff.release(&partitions);
        self.metrics.observe_rebalance(if lost { "lost" } else { "revoked" }, started.elapsed());
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // The partitions are deliberately not paused while their shards restore: pausing
                // inside the assign callback can lose the assigned start offset (librdkafka
                // issue #2190) and skip events. Events that arrive early wait in the shard.
                let started = Instant::now();
                self.handoff.take_over(&self.partitions_of(tpl));
                self.metrics.observe_rebalance("assigned", started.elapsed());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::error!("rebalance error: {e}"),
        }
    }
}
