//! Liveness and readiness, with Kubernetes' meaning (as Akka Management's `/alive` and `/ready`).
//!
//! Alive: the process serves; it never depends on Kafka or peers (restarting a node because
//! its broker is away would only add a rebalance). Ready: this node should get traffic now:
//! admitted to the actor cluster, Kafka reachable, not shutting down, and for every entity type
//! it hosts: a member of that type's consumer group, every shard it owns restored, none of them
//! refused (a changelog state this build cannot read: `changelog::UnreadableState`), not
//! recovering its producer. gRPC health (`grpc.health.v1`) follows readiness.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::kafka_health::KafkaHealth;

/// The node's readiness: what is node-wide here, each hosted type's part in a [`GroupReadiness`].
pub struct Readiness {
    kafka: Arc<KafkaHealth>,
    admitted: AtomicBool,
    /// Why the node is not admitted yet (shown at `/ready`).
    admission: Mutex<String>,
    stopping: AtomicBool,
    groups: Vec<Arc<GroupReadiness>>,
}

/// One entity type's part of readiness, set by its consumer and shards.
pub struct GroupReadiness {
    group: String,
    in_group: AtomicBool,
    recovering: AtomicBool,
    restoring_shards: AtomicUsize,
    /// Shards whose changelog holds a state this build cannot read, with why: they process
    /// nothing and answer no query until a build that reads them runs.
    refused: Mutex<BTreeMap<u32, String>>,
    /// Bumped on every change of `refused` (the consumer pauses refused partitions).
    refusals: AtomicU64,
}

impl GroupReadiness {
    /// Not in the group yet, nothing restoring.
    pub(crate) fn new(group: &str) -> Self {
        Self {
            group: group.into(),
            in_group: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            restoring_shards: AtomicUsize::new(0),
            refused: Mutex::new(BTreeMap::new()),
            refusals: AtomicU64::new(0),
        }
    }
}

/// The body of `GET /ready`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadyReport {
    pub ready: bool,
    /// What keeps the node from being ready (empty when ready).
    pub reasons: Vec<String>,
}

impl Readiness {
    /// Readiness of a node hosting the entity types consumed by `groups`.
    pub fn new<'a>(
        kafka: Arc<KafkaHealth>,
        groups: impl IntoIterator<Item = &'a str>,
    ) -> Arc<Self> {
        Arc::new(Self {
            kafka,
            admitted: AtomicBool::new(false),
            admission: Mutex::new("no seed node answered yet".into()),
            stopping: AtomicBool::new(false),
            groups: groups
                .into_iter()
                .map(|group| Arc::new(GroupReadiness::new(group)))
                .collect(),
        })
    }

    /// The part of the type consumed by `group` (one of those given to [`Readiness::new`]).
    pub fn group(&self, group: &str) -> Arc<GroupReadiness> {
        self.groups
            .iter()
            .find(|g| g.group == group)
            .cloned()
            .expect("readiness is created with every hosted group")
    }

    pub fn admitted(&self) -> bool {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Admission is for the node's lifetime: a peer leaving later does not un-admit it.
    pub fn admit(&self, how: &str) {
        if !self.admitted.swap(true, Ordering::SeqCst) {
            let groups: Vec<&str> = self.groups.iter().map(|g| g.group.as_str()).collect();
            tracing::info!(
                "admitted to the cluster ({how}); joining consumer group {}",
                groups.join(", ")
            );
        }
    }

    pub fn not_admitted_because(&self, why: &str) {
        *self.admission.lock().expect("readiness lock poisoned") = why.to_string();
    }

    /// Whether the node is handing off its shards to stop.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
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
        for group in &self.groups {
            group.reasons(self.admitted(), &mut reasons);
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

impl GroupReadiness {
    pub fn set_in_group(&self, member: bool) {
        self.in_group.store(member, Ordering::SeqCst);
    }

    pub fn set_recovering(&self, recovering: bool) {
        self.recovering.store(recovering, Ordering::SeqCst);
    }

    /// In the group, not recovering, and every shard restored: a time to take on background
    /// work such as warming up standby replicas (doing it while the node's own shards restore
    /// slowed a join on two cores).
    pub fn settled(&self) -> bool {
        self.in_group.load(Ordering::SeqCst)
            && !self.recovering.load(Ordering::SeqCst)
            && self.restoring_shards.load(Ordering::SeqCst) == 0
    }

    pub fn shard_restoring(&self) {
        self.restoring_shards.fetch_add(1, Ordering::SeqCst);
    }

    pub fn shard_restored(&self) {
        self.restoring_shards.fetch_sub(1, Ordering::SeqCst);
    }

    /// Shard `shard` refused its changelog state (and is no longer restoring).
    pub fn refuse(&self, shard: u32, why: &str) {
        self.refused
            .lock()
            .expect("readiness lock poisoned")
            .insert(shard, why.to_string());
        self.refusals.fetch_add(1, Ordering::SeqCst);
    }

    /// A refused shard left this node (revoked; its next owner tries again).
    pub fn forget_refusal(&self, shard: u32) {
        let removed = self
            .refused
            .lock()
            .expect("readiness lock poisoned")
            .remove(&shard);
        if removed.is_some() {
            self.refusals.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A number that changes whenever the refused shards do: an atomic read, so the poll loop
    /// can look every round and take the lock only after a change.
    pub fn refusal_generation(&self) -> u64 {
        self.refusals.load(Ordering::SeqCst)
    }

    /// The refused shards, and a number that changes whenever they do.
    pub fn refused(&self) -> (u64, Vec<u32>) {
        let refused = self.refused.lock().expect("readiness lock poisoned");
        (
            self.refusals.load(Ordering::SeqCst),
            refused.keys().copied().collect(),
        )
    }

    fn reasons(&self, admitted: bool, reasons: &mut Vec<String>) {
        if self.recovering.load(Ordering::SeqCst) {
            reasons.push(format!(
                "recovering: re-creating the checkpoint producer of {} and restoring its shards",
                self.group
            ));
        } else if admitted && !self.in_group.load(Ordering::SeqCst) {
            reasons.push(format!(
                "not a member of consumer group {} (yet)",
                self.group
            ));
        }
        let restoring = self.restoring_shards.load(Ordering::SeqCst);
        if restoring > 0 {
            reasons.push(format!(
                "restoring {restoring} shards of {} from the changelog",
                self.group
            ));
        }
        for (shard, why) in self.refused.lock().expect("readiness lock poisoned").iter() {
            reasons.push(format!(
                "shard {shard} of {} refused its changelog state: {why}",
                self.group
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_admitted_in_every_group_restored_and_kafka_reachable() {
        let kafka = KafkaHealth::new(&crate::kafka_config::KafkaConnection::new("127.0.0.1:1"));
        let r = Readiness::new(kafka.clone(), ["g", "h"]);
        let (g, h) = (r.group("g"), r.group("h"));
        assert!(!r.ready());
        assert!(r.report().reasons[0].contains("not admitted"));
        r.admit("test");
        assert_eq!(
            r.report().reasons,
            [
                "not a member of consumer group g (yet)",
                "not a member of consumer group h (yet)"
            ]
        );
        g.set_in_group(true);
        assert_eq!(
            r.report().reasons,
            ["not a member of consumer group h (yet)"]
        );
        h.set_in_group(true);
        h.shard_restoring();
        assert_eq!(
            r.report().reasons,
            ["restoring 1 shards of h from the changelog"]
        );
        h.shard_restored();
        assert!(r.ready());
        h.refuse(3, "does not decode");
        assert_eq!(
            r.report().reasons,
            ["shard 3 of h refused its changelog state: does not decode"]
        );
        assert_eq!(h.refused().1, [3]);
        h.forget_refusal(3);
        assert!(r.ready());
        g.set_recovering(true);
        assert!(!r.ready());
        g.set_recovering(false);
        kafka.report_unreachable("down");
        assert!(r.report().reasons[0].starts_with("Kafka unreachable"));
        kafka.report_reachable();
        assert!(r.ready());
        r.set_stopping();
        assert!(!r.ready());
    }
}
