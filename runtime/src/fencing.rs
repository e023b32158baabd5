//! Transactional ids and fencing: whose checkpoint transactions are whose, and how one is ended
//! from outside.
//!
//! Every node has one transactional id per entity type, stable across restarts, so a restarted
//! node fences its previous run, and a new owner can end a departed owner's open transaction
//! instead of waiting for its timeout (when that is safe is decided in `restore`).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, ThreadedProducer};

use crate::kafka_config::{ClientKind, KafkaConnection};
use crate::kafka_health::QuietContext;

const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional id of `node`'s checkpoints of `group`.
pub(crate) fn transactional_id(group: &str, node: &str) -> String {
    format!("{group}-{node}")
}

/// Ends whatever transaction `transactional_id` left open, now: initialising a producer with
/// that id makes the coordinator abort it (or complete it, if its commit was already decided)
/// and fences every older producer with the id.
pub(crate) fn fence(
    kafka: &KafkaConnection,
    transactional_id: &str,
    context: QuietContext,
) -> Result<(), KafkaError> {
    let producer: ThreadedProducer<QuietContext> = kafka
        .client(ClientKind::Producer)
        .set("transactional.id", transactional_id)
        // While the coordinator aborts the open transaction it answers CONCURRENT_TRANSACTIONS;
        // retry soon (the default 100 ms backoff, doubling, held a failover's restore longer).
        .set("retry.backoff.ms", "10")
        .set("retry.backoff.max.ms", "100")
        .create_with_context(context)?;
    producer.init_transactions(INIT_TIMEOUT)
}
