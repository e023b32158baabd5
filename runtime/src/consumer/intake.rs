//! Where the poll loop reads its records: a queue of its own, in batches.
//!
//! Every partition's records are forwarded to that queue as the partition is assigned (by the
//! rebalance callback, before the assignment: `Queue::take_partition`), so the consumer queue
//! keeps only the group's events (rebalances, errors, commits) for rust-rdkafka's `poll`, and
//! the records come a batch per call without `poll`'s per-record event and `Arc`
//! (`kafka_batch`). The loop waits on the records' queue; an event arriving on the consumer
//! queue wakes that wait, so a rebalance is served as soon as it comes.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, ConsumerContext};

use crate::kafka_batch::{Batch, BatchReader, Queue};

/// Records read from librdkafka at once.
const READ_BATCH: usize = 1_024;

pub(super) struct Intake {
    records: Arc<Queue>,
    events: Queue,
    reader: BatchReader,
}

impl Intake {
    /// Drop it before `consumer`.
    pub fn new<C: ConsumerContext>(consumer: &mut BaseConsumer<C>) -> Self {
        let records = Arc::new(Queue::new_for(consumer).expect("librdkafka makes a queue"));
        let events =
            Queue::of_consumer(consumer).expect("a consumer with a group.id has a consumer queue");
        // Weak: once the loop has dropped the queue, a late event wakes nothing.
        let wake = Arc::downgrade(&records);
        consumer.set_nonempty_callback(move || {
            if let Some(records) = wake.upgrade() {
                records.wake();
            }
        });
        Self {
            reader: BatchReader::new(records.clone(), READ_BATCH),
            records,
            events,
        }
    }

    /// The queue the rebalance callback forwards assigned partitions to.
    pub fn records(&self) -> Arc<Queue> {
        self.records.clone()
    }

    /// Whether the consumer queue holds events (or records) for `poll`.
    pub fn events_waiting(&self) -> bool {
        self.events.len() > 0
    }

    /// The records there now, without waiting.
    pub fn available(&mut self) -> Batch<'_> {
        self.reader.read(Duration::ZERO)
    }

    /// Waits up to `timeout` for a record (or an event on the consumer queue), and returns the
    /// first record to come, if any.
    pub fn wait(&mut self, timeout: Duration) -> Batch<'_> {
        self.reader.read_up_to(1, timeout)
    }
}
