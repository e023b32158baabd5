//! The hand-off protocol: what happens to shards when Kafka moves partitions. Its one home.
//!
//! Kafka's assignment is the authority. The consumer's rebalance callbacks call in here:
//!
//! - **take over** (after an assignment): start a shard actor per new partition, register it
//!   locally, then claim the shards in the allocation table and announce them to every node.
//! - **hand off** (before a revocation returns): the consumer has already dispatched everything
//!   it read from those partitions; wait until every dispatched event is acknowledged by its
//!   entity (bounded by the drain timeout), commit the acknowledged offsets synchronously, stop
//!   the shard actors (and their entities), then announce the smaller claim. Only then does the
//!   callback return and Kafka may give the partition to another node, which starts from the
//!   committed offset. A partition that was *lost* (session timeout) is not committed: another
//!   member may already own it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::Actor;

use crate::cluster::announce::Announcer;
use crate::shard::{LocalShard, LocalShards, ShardActor, ShardArgs, ShardEnv, ShardMsg};
use crate::stats::NodeStats;

pub struct Handoff {
    runtime: tokio::runtime::Handle,
    local: Arc<LocalShards>,
    announcer: Arc<Announcer>,
    env: Arc<ShardEnv>,
    drain_timeout: Duration,
}

/// How a hand-off of one partition ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub partition: u32,
    /// Next offset to commit, if anything was acknowledged since the shard started.
    pub commit_offset: Option<i64>,
    /// Whether every dispatched event was acknowledged before the timeout.
    pub complete: bool,
}

impl Handoff {
    pub fn new(
        runtime: tokio::runtime::Handle,
        local: Arc<LocalShards>,
        announcer: Arc<Announcer>,
        env: Arc<ShardEnv>,
        drain_timeout: Duration,
    ) -> Self {
        Self { runtime, local, announcer, env, drain_timeout }
    }

    /// Kafka assigned `partitions` to this node.
    pub fn take_over(&self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        for &partition in partitions {
            if self.local.get(partition).is_some() {
                continue;
            }
            let committable = Arc::new(AtomicI64::new(-1));
            let args = ShardArgs { shard: partition, committable: committable.clone(), env: self.env.clone() };
            match self.runtime.block_on(Actor::spawn(None, ShardActor, args)) {
                Ok((actor, _)) => {
                    self.local.insert(partition, LocalShard { actor, committable });
                    tracing::info!("partition {partition} assigned to this node");
                }
                Err(e) => tracing::error!("cannot start shard {partition}: {e}"),
            }
        }
        NodeStats::add(&self.env.stats.partitions_assigned, partitions.len() as u64);
        self.claim();
        tracing::info!("shards {:?} now hosted here ({} in total)", partitions, self.local.ids().len());
    }

    /// Waits until the shards of `partitions` have applied everything dispatched to them.
    pub fn drain(&self, partitions: &[u32]) -> Vec<Drained> {
        let started = Instant::now();
        let shards: Vec<(u32, LocalShard)> =
            partitions.iter().filter_map(|p| self.local.get(*p).map(|s| (*p, s))).collect();
        let timeout = self.drain_timeout;
        let outcomes = self.runtime.block_on(futures::future::join_all(shards.iter().map(|(p, shard)| async move {
            let done = shard.actor.call(ShardMsg::Drain, Some(timeout)).await;
            (*p, matches!(done, Ok(CallResult::Success(()))))
        })));
        let drained: Vec<Drained> = outcomes
            .into_iter()
            .zip(shards.iter())
            .map(|((partition, complete), (_, shard))| {
                let offset = shard.committable.load(Ordering::Acquire);
                if !complete {
                    tracing::warn!(
                        "shard {partition} did not finish its in-flight events within {:?}; the next owner re-reads them",
                        timeout
                    );
                }
                Drained { partition, commit_offset: (offset >= 0).then_some(offset), complete }
            })
            .collect();
        tracing::info!("drained shards {:?} in {} ms", partitions, started.elapsed().as_millis());
        drained
    }

    /// Stops the shards of `partitions` and withdraws the claim. Call after their offsets are
    /// committed (or when the partitions were lost).
    pub fn release(&self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        for &partition in partitions {
            if let Some(shard) = self.local.remove(partition) {
                shard.actor.stop(Some("partition revoked".into()));
            }
        }
        NodeStats::add(&self.env.stats.partitions_revoked, partitions.len() as u64);
        self.claim();
        tracing::info!("shards {:?} handed off ({} remain here)", partitions, self.local.ids().len());
    }

    fn claim(&self) {
        let owned: BTreeSet<u32> = self.local.ids().into_iter().collect();
        self.announcer.claim_local(owned);
    }
}
