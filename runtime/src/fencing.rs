//! Transactional ids and fencing: whose checkpoint transactions are whose, and how one is ended
//! from outside.
//!
//! Every node has one transactional id per entity type, stable across restarts, so a restarted
//! node fences its previous run, and a new owner can end a departed owner's open transaction
//! instead of waiting for its timeout (when that is safe is decided in `restore`).

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};

use crate::kafka_config::{ClientKind, KafkaConnection};
use crate::kafka_health::QuietContext;

/// How long a fence keeps trying.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first attempt's wait; each next one waits twice as long, up to [`LONGEST_ATTEMPT`].
const FIRST_ATTEMPT: Duration = Duration::from_millis(150);
const LONGEST_ATTEMPT: Duration = Duration::from_secs(2);

/// The transactional id of `node`'s checkpoints of `group`.
pub(crate) fn transactional_id(group: &str, node: &str) -> String {
    format!("{group}-{node}")
}

/// Ends whatever transaction `transactional_id` left open, now: initialising a producer with
/// that id makes the coordinator abort it (or complete it, if its commit was already decided)
/// and fences every older producer with the id.
///
/// While the coordinator aborts the open transaction it answers CONCURRENT_TRANSACTIONS, and
/// librdkafka asks again only after a fixed 500 ms (`rd_kafka_idemp_pid_timer_restart`, not
/// `retry.backoff.ms`): one or two such waits were most of a failover's restore. So an attempt
/// that is not done soon is dropped and a fresh producer asks again (the abort it started goes
/// on at the coordinator).
pub(crate) fn fence(
    kafka: &KafkaConnection,
    transactional_id: &str,
    context: QuietContext,
) -> Result<(), KafkaError> {
    let deadline = Instant::now() + FENCE_TIMEOUT;
    let mut wait = FIRST_ATTEMPT;
    loop {
        let producer: BaseProducer<QuietContext> = kafka
            .client(ClientKind::Producer)
            .set("transactional.id", transactional_id)
            .create_with_context(context.clone())?;
        let left = deadline.saturating_duration_since(Instant::now());
        match producer.init_transactions(wait.min(left)) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !left.is_zero() => {}
            Err(e) => return Err(e),
        }
        wait = (wait * 2).min(LONGEST_ATTEMPT);
    }
}
