//! Whether the peers this node forwards to answer, said once per outage.
//!
//! Kafka, not the links between nodes, decides who owns a shard: a peer this node cannot reach
//! (a cut link, a frozen process) keeps its shards for as long as it reaches the broker, and a
//! TCP session through a cut link can stay open for many minutes without a byte getting
//! through. What this node sees is calls to the peer timing out. Each forwarded call's
//! UNAVAILABLE names its shard and last error; this says what is behind them, once: a line when
//! a peer stops answering, and one when it answers again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cluster::endpoint::CallError;

/// The peers that did not answer their last call, and since when (node-wide, every type).
#[derive(Default)]
pub struct PeerHealth {
    unanswered: Mutex<HashMap<Arc<str>, Unanswered>>,
    /// How many entries `unanswered` has, read without its lock: every forwarded answer calls
    /// `answered`, and while every peer answers there is nothing to look up.
    unanswered_count: AtomicUsize,
}

struct Unanswered {
    since: Instant,
    calls: u64,
}

impl PeerHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A call to `node` ended with `error`. Only what says the peer is not answering counts
    /// (an answer that is an error is still an answer).
    pub fn failed(&self, node: &str, error: &CallError) {
        if !matches!(
            error,
            CallError::Timeout | CallError::Unreachable(_) | CallError::Dropped
        ) {
            return;
        }
        let mut unanswered = self.unanswered.lock().expect("peer health lock");
        match unanswered.get_mut(node) {
            Some(entry) => entry.calls += 1,
            None => {
                tracing::warn!(
                    "node {node} does not answer ({error}): queries and commands for its shards \
                     get UNAVAILABLE until it does (it keeps them while Kafka counts it a member)"
                );
                unanswered.insert(
                    Arc::from(node),
                    Unanswered {
                        since: Instant::now(),
                        calls: 1,
                    },
                );
                self.unanswered_count
                    .store(unanswered.len(), Ordering::Release);
            }
        }
    }

    /// A call to `node` was answered.
    pub fn answered(&self, node: &str) {
        // A peer marked by a call failing at this very moment is unmarked by its next answer.
        if self.unanswered_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut unanswered = self.unanswered.lock().expect("peer health lock");
        if let Some(entry) = unanswered.remove(node) {
            self.unanswered_count
                .store(unanswered.len(), Ordering::Release);
            tracing::info!(
                "node {node} answers again, after {:.1} s ({} calls unanswered)",
                entry.since.elapsed().as_secs_f64(),
                entry.calls
            );
        }
    }

    /// The peers not answering now.
    pub fn not_answering(&self) -> Vec<Arc<str>> {
        let unanswered = self.unanswered.lock().expect("peer health lock");
        let mut nodes: Vec<Arc<str>> = unanswered.keys().cloned().collect();
        nodes.sort();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_not_answering_from_its_first_timeout_until_its_next_answer() {
        let peers = PeerHealth::new();
        peers.failed("b", &CallError::Remote("shard refused".into()));
        assert!(
            peers.not_answering().is_empty(),
            "an error answer is an answer"
        );
        peers.failed("b", &CallError::Timeout);
        peers.failed("b", &CallError::Timeout);
        peers.failed("c", &CallError::Unreachable("no session".into()));
        assert_eq!(
            peers.not_answering(),
            vec![Arc::<str>::from("b"), Arc::from("c")]
        );
        assert_eq!(peers.unanswered.lock().unwrap()["b"].calls, 2);
        peers.answered("b");
        assert_eq!(peers.not_answering(), vec![Arc::<str>::from("c")]);
        peers.answered("c");
        assert!(peers.not_answering().is_empty());
        // Marked again by its next timeout, after the count went back to none.
        peers.failed("c", &CallError::Dropped);
        assert_eq!(peers.not_answering(), vec![Arc::<str>::from("c")]);
        peers.answered("c");
        assert!(peers.not_answering().is_empty());
    }
}
