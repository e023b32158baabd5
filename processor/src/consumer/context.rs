//! The consumer's rebalance callbacks, which drive the hand-off protocol.
//!
//! librdkafka calls them inside `poll` on the consumer thread, so they may block: Kafka does not
//! give a revoked partition to another member until the revoke callback returns.

use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::ClientContext;
use rdkafka::TopicPartitionList;

use super::commit::OffsetCommitter;
use super::dispatch::Dispatcher;
use crate::handoff::Handoff;

pub struct NodeContext {
    pub topic: String,
    pub handoff: Arc<Handoff>,
    pub dispatcher: Mutex<Dispatcher>,
    pub committer: Mutex<OffsetCommitter>,
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
}

impl ClientContext for NodeContext {}

impl ConsumerContext for NodeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = self.partitions_of(tpl);
        if partitions.is_empty() {
            return;
        }
        let lost = consumer.assignment_lost();
        tracing::info!(
            "partitions {:?} {} this node; handing off their shards",
            partitions,
            if lost { "were lost by" } else { "are being revoked from" }
        );
        // Everything read from these partitions goes to their shards before the drain.
        self.dispatcher.lock().expect("dispatcher lock poisoned").flush(&partitions);
        let drained = self.handoff.drain(&partitions);
        if lost {
            tracing::warn!("partitions {:?} were lost (session timeout?): not committing, their next owner re-reads uncommitted events", partitions);
        } else {
            self.committer.lock().expect("committer lock poisoned").commit_drained(consumer, &drained);
        }
        self.handoff.release(&partitions);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions_of(tpl);
                self.handoff.take_over(&partitions);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::error!("rebalance error: {e}"),
        }
    }
}
