//! Recovering from a failed checkpoint producer without exiting (Kafka Streams' "task
//! migrated": close the tasks dirty, new producer, carry on from the committed state).
//!
//! A transactional producer that failed fatally (fenced by another instance with its
//! transactional id, or a transaction left in an unknown state by a broker outage) can commit
//! nothing more, and what the shards hold beyond the last committed checkpoint cannot be trusted
//! to commit either. So, on the consumer thread:
//!
//! 1. every shard is dropped without a commit, exactly as for partitions Kafka reports lost;
//!    records read but not dispatched are discarded;
//! 2. a new producer with the same transactional id is created and initialised, retrying
//!    while the broker is away; its `init_transactions` fences the failed one and aborts
//!    whatever transaction it left open;
//! 3. the partitions the consumer is still assigned are taken over again: their positions go
//!    back to the group's committed offsets (stable: the broker answers once no transaction has
//!    offsets pending) and their shards restore the changelog, as after any assignment.
//!
//! The node stays in the group instead of leaving and rejoining it: if its membership is still
//! valid, a rejoin would hand it the same partitions (sticky assignment) after disturbing every
//! other member; if it is not, librdkafka reports the partitions lost at the next poll and
//! rejoins by itself, and the group generation fences every commit in between. Exactly-once
//! holds either way because step 3 starts from what was committed, like a new owner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::checkpoint::{CheckpointError, Checkpointer, CheckpointerConfig};
use super::context::NodeContext;
use crate::entity::Entity;

const INIT_TIMEOUT: Duration = Duration::from_secs(5);
const OFFSETS_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// While recovery waits for the broker, it says so at most this often.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// Runs the recovery; returns early (unfinished) only when the node is stopping.
pub(crate) fn recover<E: Entity>(
    consumer: &BaseConsumer<NodeContext<E>>,
    config: &CheckpointerConfig,
    stopping: &AtomicBool,
) {
    let context = consumer.context();
    let started = Instant::now();
    context.readiness.set_recovering(true);
    let dropped = context.handoff.local().ids();
    tracing::warn!("recovering: dropping shards {dropped:?} without a commit; their state is restored from the last checkpoint");
    context
        .dispatcher
        .lock()
        .expect("dispatcher lock poisoned")
        .discard_all();
    context.let_go(&dropped);

    let Some(checkpointer) = new_producer(config, stopping) else {
        return;
    };
    context
        .checkpoints
        .lock()
        .expect("checkpoint lock poisoned")
        .replace(checkpointer);
    context.producer_failed.store(false, Ordering::SeqCst);

    // A lost assignment is reported at the next poll, and Kafka assigns anew.
    let assigned = match consumer.assignment_lost() {
        true => Vec::new(),
        false => consumer
            .assignment()
            .map(|a| context.partitions_of(&a))
            .unwrap_or_default(),
    };
    let mut taken = 0;
    if !assigned.is_empty() {
        let Some(rewound) = rewind_to_committed(consumer, &assigned, stopping) else {
            return;
        };
        context.handoff.take_over(&rewound);
        taken = rewound.len();
    }
    context.readiness.set_recovering(false);
    tracing::info!(
        "recovered in {:.1} s: new checkpoint producer, {taken} assigned partitions restoring from their last checkpoint",
        started.elapsed().as_secs_f64(),
    );
}

/// A new, initialised producer with the node's transactional id; `None` if stopping first.
/// `init_transactions` is retried on the same instance while it only times out (the broker is
/// away); an instance whose init failed fatally is replaced.
fn new_producer(config: &CheckpointerConfig, stopping: &AtomicBool) -> Option<Checkpointer> {
    let mut last_said = Instant::now();
    let mut attempts = 0u32;
    let mut current: Option<Checkpointer> = None;
    while !stopping.load(Ordering::SeqCst) {
        attempts += 1;
        let outcome = match current.take() {
            Some(checkpointer) => Ok(checkpointer),
            None => Checkpointer::create(config),
        }
        .and_then(|c| match c.init(INIT_TIMEOUT) {
            Ok(()) => Ok(c),
            Err(e @ CheckpointError::Fatal(_)) => Err(e),
            Err(e) => {
                current = Some(c);
                Err(e)
            }
        });
        match outcome {
            Ok(checkpointer) => return Some(checkpointer),
            Err(e) if last_said.elapsed() >= SAY_EVERY => {
                last_said = Instant::now();
                tracing::warn!(
                    "still re-creating the checkpoint producer ({attempts} attempts; last: {e})"
                );
            }
            Err(_) => {}
        }
        std::thread::sleep(RETRY_EVERY);
    }
    None
}

/// Sets the consumer's positions of `partitions` back to the group's committed offsets (the
/// start, where nothing is committed) and returns the partitions rewound; `None` if stopping
/// first. A partition that cannot be rewound gets no shard: its records are not applied, so
/// nothing past the committed offset is committed, and its next owner reads from there.
fn rewind_to_committed<E: Entity>(
    consumer: &BaseConsumer<NodeContext<E>>,
    partitions: &[u32],
    stopping: &AtomicBool,
) -> Option<Vec<u32>> {
    let topic = consumer.context().topic.clone();
    let mut asked = TopicPartitionList::new();
    for p in partitions {
        asked.add_partition(&topic, *p as i32);
    }
    let committed = loop {
        if stopping.load(Ordering::SeqCst) {
            return None;
        }
        match consumer.committed_offsets(asked.clone(), OFFSETS_TIMEOUT) {
            Ok(committed) => break committed,
            Err(e) => {
                tracing::debug!("committed offsets not available yet ({e}); retrying");
                std::thread::sleep(RETRY_EVERY);
            }
        }
    };
    let mut positions = TopicPartitionList::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(o) if o >= 0 => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        let _ = positions.add_partition_offset(&topic, element.partition(), offset);
    }
    match consumer.seek_partitions(positions, OFFSETS_TIMEOUT) {
        Ok(result) => {
            let mut rewound = Vec::new();
            for element in result.elements() {
                match element.error() {
                    Ok(()) => rewound.push(element.partition() as u32),
                    Err(e) => tracing::error!(
                        "cannot rewind partition {} to its committed offset ({e}); it gets no shard here",
                        element.partition()
                    ),
                }
            }
            Some(rewound)
        }
        Err(e) => {
            tracing::error!("cannot rewind partitions {partitions:?} to their committed offsets ({e}); they get no shard here");
            Some(Vec::new())
        }
    }
}
