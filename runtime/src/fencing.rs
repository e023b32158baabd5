//! Transactional ids and fencing: whose checkpoint transactions are whose, and how one is ended
//! from outside.
//!
//! Every node has one transactional id per entity type, stable across restarts, so a restarted
//! node fences its previous run, and a new owner can end a departed owner's open transaction
//! instead of waiting for its timeout (when that is safe is decided in `restore`).
//!
//! A checkpoint may leave out a partition's offset that has not moved (`consumer::checkpoint`),
//! so a transaction may change a partition's states without an offset whose group generation
//! would fence a zombie. A producer does so only after an offset it committed named it in the
//! offset's metadata ([`committer_metadata`]); the committer named by a partition's last offset
//! is the only producer that can, and a new owner fences it before it restores (`restore`, the
//! argument in docs/ARCHITECTURE.md).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
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

/// A lock per transactional id this process fences.
static FENCING: LazyLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = LazyLock::new(Default::default);

/// What an offset that lets its committer leave the next ones out carries as its metadata.
const COMMITTER: &str = "kafka-sharding committer=";

/// The metadata of such an offset committed by `node`.
pub(crate) fn committer_metadata(node: &str) -> String {
    format!("{COMMITTER}{node}")
}

/// The node that committed an offset with `metadata`, if it named itself; `None` for an offset
/// whose committer sends every offset it commits (or an earlier version, or a tool).
pub(crate) fn committer(metadata: &str) -> Option<&str> {
    metadata
        .strip_prefix(COMMITTER)
        .filter(|node| !node.is_empty())
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
    // Two fences of one id at once (the early one and a restore's) would each be told
    // CONCURRENT_TRANSACTIONS while the other aborts, and wait out attempts (half a second in a
    // failover); one after the other, the second is a single round trip.
    let one_at_a_time = FENCING
        .lock()
        .expect("fencing lock poisoned")
        .entry(transactional_id.to_string())
        .or_default()
        .clone();
    let _turn = one_at_a_time.lock().expect("fence lock poisoned");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offsets_committer_is_read_back_from_its_metadata() {
        assert_eq!(committer(&committer_metadata("node-2")), Some("node-2"));
        assert_eq!(
            committer(""),
            None,
            "an offset committed by an earlier version"
        );
        assert_eq!(committer("someone else's note"), None);
        assert_eq!(committer(&committer_metadata("")), None);
    }
}
