//! The hand-off protocol: what happens to shards when Kafka moves partitions. Its one home.
//!
//! Kafka's assignment is the authority. The consumer's rebalance callbacks call in here (see
//! `consumer::context` for the exact order around the checkpoint transaction):
//!
//! - **take over** (after an assignment): start a shard actor per partition in the *restoring*
//!   state, register it, claim and announce the shards, and start reading their changelog. Each
//!   shard goes live when its own changelog partition is read; events consumed before that wait
//!   in the shard. (The partitions are not paused: see `consumer::context`.)
//! - **hand off** (before a revocation returns): the consumer has dispatched everything it read
//!   from those partitions; [`Handoff::drain`] waits until every shard has run what was
//!   dispatched to it (bounded by the drain timeout: a shard still restoring); the consumer commits a checkpoint transaction for them
//!   (states + offsets); [`Handoff::release`] stops the shard actors and announces the smaller
//!   claim. Only then does the callback return and may Kafka give the partitions to another
//!   node, which restores exactly the committed states and reads on from the committed offsets.
//!   A partition that was *lost* (session timeout) is not checkpointed: another member may
//!   already own it (and fence this node: `restore`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::Actor;

use crate::cluster::announce::Announcer;
use crate::entity::Entity;
use crate::restore::Restorer;
use crate::shard::{LocalShard, LocalShards, ShardActor, ShardArgs, ShardEnv, ShardMsg};
use crate::stats::NodeStats;

pub(crate) struct Handoff<E: Entity> {
    runtime: tokio::runtime::Handle,
    local: Arc<LocalShards<E>>,
    announcer: Arc<Announcer>,
    env: Arc<ShardEnv>,
    restorer: Arc<Restorer<E>>,
    drain_timeout: Duration,
}

impl<E: Entity> Handoff<E> {
    pub fn new(
        runtime: tokio::runtime::Handle,
        local: Arc<LocalShards<E>>,
        announcer: Arc<Announcer>,
        env: Arc<ShardEnv>,
        restorer: Arc<Restorer<E>>,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            runtime,
            local,
            announcer,
            env,
            restorer,
            drain_timeout,
        }
    }

    pub fn local(&self) -> &LocalShards<E> {
        &self.local
    }

    /// Kafka assigned `partitions` to this node.
    pub fn take_over(&self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        let mut restoring = Vec::new();
        for &partition in partitions {
            if self.local.get(partition).is_some() {
                continue;
            }
            let args = ShardArgs {
                shard: partition,
                env: self.env.clone(),
            };
            match self
                .runtime
                .block_on(Actor::spawn(None, ShardActor::<E>::new(), args))
            {
                Ok((actor, _)) => {
                    self.local.insert(
                        partition,
                        LocalShard {
                            actor: actor.clone(),
                        },
                    );
                    restoring.push((partition, actor));
                    tracing::info!("partition {partition} assigned to this node");
                }
                Err(e) => tracing::error!("cannot start shard {partition}: {e}"),
            }
        }
        NodeStats::add(&self.env.stats.partitions_assigned, partitions.len() as u64);
        // Asked before this node's claim replaces them in the table.
        let previous_owners = self.announcer.table().previous_owners(partitions);
        let orphaned = self.announcer.table().orphaned_since(partitions);
        self.announcer.table().forget_fenced();
        self.claim();
        tracing::info!(
            "shards {:?} now hosted here ({} in total); restoring their state",
            partitions,
            self.local.ids().len()
        );
        self.restorer.restore(restoring, orphaned);
        self.restorer
            .fence_departed(previous_owners, self.announcer.table().clone());
    }

    /// Waits until the shards of `partitions` have applied everything dispatched to them.
    pub fn drain(&self, partitions: &[u32]) {
        let started = Instant::now();
        let shards: Vec<(u32, LocalShard<E>)> = partitions
            .iter()
            .filter_map(|p| self.local.get(*p).map(|s| (*p, s)))
            .collect();
        let timeout = self.drain_timeout;
        let outcomes = self
            .runtime
            .block_on(futures::future::join_all(shards.iter().map(
                |(p, shard)| async move {
                    (
                        *p,
                        matches!(
                            shard.actor.call(ShardMsg::Drain, Some(timeout)).await,
                            Ok(CallResult::Success(()))
                        ),
                    )
                },
            )));
        let incomplete: Vec<u32> = outcomes
            .into_iter()
            .filter(|(_, done)| !done)
            .map(|(p, _)| p)
            .collect();
        if !incomplete.is_empty() {
            tracing::warn!(
                "shards {incomplete:?} did not finish their in-flight events within {timeout:?}; \
                 only what they ran is committed, the next owner re-reads the rest"
            );
        }
        tracing::info!(
            "drained shards {:?} in {} ms",
            partitions,
            started.elapsed().as_millis()
        );
    }

    /// Stops the shards of `partitions` and withdraws the claim. Call after their checkpoint
    /// is committed (or when the partitions were lost).
    pub fn release(&self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        for &partition in partitions {
            if let Some(shard) = self.local.remove(partition) {
                // Stops after the messages already sent, the commit's `Checkpointed` among
                // them: the answers that checkpoint made durable still go to their callers.
                if shard.actor.drain().is_err() {
                    shard.actor.stop(Some("partition revoked".into()));
                }
            }
        }
        NodeStats::add(&self.env.stats.partitions_revoked, partitions.len() as u64);
        self.claim();
        tracing::info!(
            "shards {:?} handed off ({} remain here)",
            partitions,
            self.local.ids().len()
        );
    }

    fn claim(&self) {
        let owned: BTreeSet<u32> = self.local.ids().into_iter().collect();
        self.announcer.claim_local(owned);
    }
}
