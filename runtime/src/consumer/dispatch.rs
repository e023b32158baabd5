//! Batching consumed records per partition and handing each batch to its shard.
//!
//! librdkafka returns one record per poll; sending one actor message per record would cost more
//! than the processing. Records are collected per partition and flushed as one message per
//! partition when the batch is full, when the poll runs dry, or before a revocation.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backpressure::InFlightGate;
use crate::entity::Entity;
use crate::shard::{ConsumedRecord, LocalShards, ShardMsg};

pub const MAX_BATCH: usize = 2_000;
pub const MAX_BATCH_AGE: Duration = Duration::from_millis(5);
/// A new batch's initial capacity: growing every batch from empty showed in the profile.
const BATCH_CAPACITY: usize = 64;

pub(crate) struct Dispatcher<E: Entity> {
    batches: HashMap<u32, Vec<ConsumedRecord<E::Event>>>,
    buffered: usize,
    oldest: Option<Instant>,
    local: Arc<LocalShards<E>>,
    gate: Arc<InFlightGate>,
    stopping: Arc<AtomicBool>,
}

impl<E: Entity> Dispatcher<E> {
    pub fn new(
        local: Arc<LocalShards<E>>,
        gate: Arc<InFlightGate>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            batches: HashMap::new(),
            buffered: 0,
            oldest: None,
            local,
            gate,
            stopping,
        }
    }

    pub fn push(&mut self, partition: u32, record: ConsumedRecord<E::Event>) {
        self.batches
            .entry(partition)
            .or_insert_with(|| Vec::with_capacity(BATCH_CAPACITY))
            .push(record);
        self.buffered += 1;
        self.oldest.get_or_insert_with(Instant::now);
    }

    pub fn should_flush(&self) -> bool {
        self.buffered >= MAX_BATCH || self.oldest.is_some_and(|t| t.elapsed() >= MAX_BATCH_AGE)
    }

    /// Sends every buffered batch to its shard, waiting for room in the in-flight window.
    pub fn flush_all(&mut self) {
        let partitions: Vec<u32> = self.batches.keys().copied().collect();
        self.flush(&partitions);
    }

    /// Sends the buffered batches of `partitions` (e.g. the ones about to be revoked).
    pub fn flush(&mut self, partitions: &[u32]) {
        for partition in partitions {
            let Some(batch) = self.batches.remove(partition) else {
                continue;
            };
            self.buffered -= batch.len();
            if batch.is_empty() {
                continue;
            }
            self.admit(batch.len());
            match self.local.get(*partition) {
                Some(shard) => {
                    if shard.actor.cast(ShardMsg::Consumed(batch)).is_err() {
                        tracing::warn!("shard {partition} stopped before its batch arrived; the records will be re-read");
                    }
                }
                None => {
                    // Not committed, so whoever owns the partition next reads these again.
                    self.gate.release(batch.len());
                    tracing::warn!(
                        "no shard for partition {partition}; {} records will be re-read",
                        batch.len()
                    );
                }
            }
        }
        if self.buffered == 0 {
            self.oldest = None;
        }
    }

    /// Drops every buffered batch undispatched (their shards are being dropped; the consumer's
    /// positions are set back to the committed offsets, so they are read again).
    pub fn discard_all(&mut self) {
        self.batches.clear();
        self.buffered = 0;
        self.oldest = None;
    }

    /// Whether every event dispatched so far has been run by its shard.
    pub fn all_run(&self) -> bool {
        self.buffered == 0 && self.gate.in_flight() == 0
    }

    /// Backpressure: wait until the batch fits in the in-flight window. Waits in slices so a
    /// shutdown is not held up; on shutdown the batch is admitted and the drain bounds the wait.
    fn admit(&self, n: usize) {
        while !self.gate.acquire(n, Duration::from_millis(500)) {
            if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                self.gate.acquire(n, Duration::ZERO);
                return;
            }
        }
    }
}
