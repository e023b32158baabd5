//! Committing acknowledged offsets: each shard publishes the offset after its contiguous
//! acknowledged prefix; the consumer commits those that moved.

use std::collections::HashMap;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::handoff::Drained;
use crate::shard::LocalShards;

pub struct OffsetCommitter {
    topic: String,
    committed: HashMap<u32, i64>,
}

impl OffsetCommitter {
    pub fn new(topic: impl Into<String>) -> Self {
        Self { topic: topic.into(), committed: HashMap::new() }
    }

    /// Commits (asynchronously) every local shard's acknowledged offset that moved.
    pub fn commit_progress<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, local: &LocalShards) {
        let offsets: Vec<(u32, i64)> = local
            .ids()
            .into_iter()
            .filter_map(|p| local.get(p).map(|s| (p, s.committable.load(std::sync::atomic::Ordering::Acquire))))
            .collect();
        self.commit(consumer, &offsets, CommitMode::Async);
    }

    /// Commits the offsets of drained shards synchronously (inside the revoke callback).
    pub fn commit_drained<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, drained: &[Drained]) -> bool {
        let offsets: Vec<(u32, i64)> =
            drained.iter().filter_map(|d| d.commit_offset.map(|o| (d.partition, o))).collect();
        let ok = self.commit(consumer, &offsets, CommitMode::Sync);
        for d in drained {
            self.committed.remove(&d.partition);
        }
        ok
    }

    fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, offsets: &[(u32, i64)], mode: CommitMode) -> bool {
        let mut tpl = TopicPartitionList::new();
        let mut moved = Vec::new();
        for &(partition, offset) in offsets {
            if offset < 0 || self.committed.get(&partition) == Some(&offset) {
                continue;
            }
            if tpl.add_partition_offset(&self.topic, partition as i32, Offset::Offset(offset)).is_ok() {
                moved.push((partition, offset));
            }
        }
        if moved.is_empty() {
            return true;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                self.committed.extend(moved);
                true
            }
            Err(e) => {
                tracing::warn!("offset commit failed ({e}); will retry");
                false
            }
        }
    }
}
