//! Liveness and readiness, with Kubernetes' meaning (as Akka Management's `/alive` and `/ready`).
//!
//! Alive: the process serves; it never depends on Kafka or peers (restarting a node because
//! its broker is away would only add a rebalance). Ready: this node should get traffic now:
//! admitted to the actor cluster, a member of the consumer group, every shard it owns
//! restored, Kafka reachable, not recovering its producer and not shutting down. gRPC health
//! (`grpc.health.v1`) follows readiness.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::kafka_health::KafkaHealth;

pub struct Readiness {
    kafka: Arc<KafkaHealth>,
    group: String,
    admitted: AtomicBool,
    /// Why the node is not admitted yet (shown at `/ready`).
    admission: Mutex<String>,
    in_group: AtomicBool,
    recovering: AtomicBool,
    stopping: AtomicBool,
    restoring_shards: AtomicUsize,
}

/// The body of `GET /ready`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadyReport {
    pub ready: bool,
    /// What keeps the node from being ready (empty when ready).
    pub reasons: Vec<String>,
}

impl Readiness {
    pub fn new(kafka: Arc<KafkaHealth>, group: &str) -> Arc<Self> {
        Arc::new(Self {
            kafka,
            group: group.into(),
            admitted: AtomicBool::new(false),
            admission: Mutex::new("no seed node answered yet".into()),
            in_group: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            restoring_shards: AtomicUsize::new(0),
        })
    }

    pub fn admitted(&self) -> bool {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Admission is for the node's lifetime: a peer leaving later does not un-admit it.
    pub fn admit(&self, how: &str) {
        if !self.admitted.swap(true, Ordering::SeqCst) {
            tracing::info!(
                "admitted to the cluster ({how}); joining consumer group {}",
                self.group
            );
        }
    }

    pub fn not_admitted_because(&self, why: &str) {
        *self.admission.lock().expect("readiness lock poisoned") = why.to_string();
    }

    pub fn set_in_group(&self, member: bool) {
        self.in_group.store(member, Ordering::SeqCst);
    }

    pub fn set_recovering(&self, recovering: bool) {
        self.recovering.store(recovering, Ordering::SeqCst);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn shard_restoring(&self) {
        self.restoring_shards.fetch_add(1, Ordering::SeqCst);
    }

    pub fn shard_restored(&self) {
        self.restoring_shards.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn report(&self) -> ReadyReport {
        let mut reasons = Vec::new();
        if self.stopping.load(Ordering::SeqCst) {
            reasons.push("shutting down: handing off its shards".to_string());
        }
        if !self.admitted() {
            reasons.push(format!(
                "not admitted to the actor cluster: {}",
                self.admission.lock().expect("readiness lock poisoned")
            ));
        }
        if let Some(outage) = self.kafka.outage() {
            reasons.push(format!("Kafka unreachable for {} s", outage.as_secs()));
        }
        if self.recovering.load(Ordering::SeqCst) {
            reasons.push(
                "recovering: re-creating its checkpoint producer and restoring its shards"
                    .to_string(),
            );
        } else if self.admitted() && !self.in_group.load(Ordering::SeqCst) {
            reasons.push(format!(
                "not a member of consumer group {} (yet)",
                self.group
            ));
        }
        let restoring = self.restoring_shards.load(Ordering::SeqCst);
        if restoring > 0 {
            reasons.push(format!("restoring {restoring} shards from the changelog"));
        }
        ReadyReport {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    pub fn ready(&self) -> bool {
        self.report().ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_admitted_in_the_group_restored_and_kafka_reachable() {
        let kafka = KafkaHealth::new("127.0.0.1:1");
        let r = Readiness::new(kafka.clone(), "g");
        assert!(!r.ready());
        assert!(r.report().reasons[0].contains("not admitted"));
        r.admit("test");
        assert_eq!(
            r.report().reasons,
            ["not a member of consumer group g (yet)"]
        );
        r.set_in_group(true);
        r.shard_restoring();
        assert!(!r.ready());
        r.shard_restored();
        assert!(r.ready());
        kafka.report_unreachable("down");
        assert!(r.report().reasons[0].starts_with("Kafka unreachable"));
        kafka.report_reachable();
        assert!(r.ready());
        r.set_stopping();
        assert!(!r.ready());
    }
}
