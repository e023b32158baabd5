//! The shard actor: one per partition this node consumes (shard id == partition).
//!
//! It owns the partition's user entities, hands each batch of consumed events to them grouped
//! by user (one message per user per batch, in partition order), and tracks which offsets the
//! entities have acknowledged. Only the contiguous acknowledged prefix becomes committable, so a
//! crash never commits past an event that was not applied. On revocation it drains: the consumer
//! stops sending, and `Drain` is answered once every dispatched event is acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tokio::sync::mpsc;

use crate::backpressure::InFlightGate;
use crate::entity::{EntityArgs, EntityInput, EntityMsg, Origin, Totals, UserEntity};
use crate::event::Purchase;
use crate::routing::Router;
use crate::stats::NodeStats;

/// One record read from this shard's partition: a purchase, or `None` for a record that was
/// dead-lettered (it only has to be committed past, in order).
pub struct ConsumedRecord {
    pub offset: i64,
    pub purchase: Option<Purchase>,
}

/// An event of this partition whose key belongs to another shard.
struct Misrouted {
    offset: i64,
    purchase: Purchase,
}

#[derive(RactorMessage)]
pub enum ShardMsg {
    /// A batch read from the partition, in offset order.
    Consumed(Vec<ConsumedRecord>),
    /// An entity applied these consumed offsets.
    Applied { offsets: Vec<i64>, totals: Totals },
    /// The forwarder delivered the event at `offset` to the shard that owns its key.
    Forwarded { offset: i64 },
    /// An event read elsewhere whose key belongs to this shard.
    ApplyForwarded {
        purchase: Purchase,
        source_partition: u32,
        source_offset: i64,
        reply: RpcReplyPort<Totals>,
    },
    /// A user's totals; zeros (and no entity created) for a user never seen.
    Query { user_id: Arc<str>, reply: RpcReplyPort<Totals> },
    /// Live entity count.
    EntityCount(RpcReplyPort<usize>),
    /// Answer once every dispatched event is acknowledged.
    Drain(RpcReplyPort<()>),
}

/// What the node keeps about one local shard.
#[derive(Clone)]
pub struct LocalShard {
    pub actor: ActorRef<ShardMsg>,
    /// Next offset to commit (offset after the last contiguous acknowledged event); -1: none yet.
    pub committable: Arc<AtomicI64>,
}

/// The shards hosted on this node, by shard id.
#[derive(Default)]
pub struct LocalShards {
    shards: DashMap<u32, LocalShard>,
}

impl LocalShards {
    pub fn get(&self, shard: u32) -> Option<LocalShard> {
        self.shards.get(&shard).map(|s| s.value().clone())
    }
    pub fn insert(&self, shard: u32, handle: LocalShard) {
        self.shards.insert(shard, handle);
    }
    pub fn remove(&self, shard: u32) -> Option<LocalShard> {
        self.shards.remove(&shard).map(|(_, s)| s)
    }
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.shards.iter().map(|e| *e.key()).collect();
        ids.sort_unstable();
        ids
    }
}

/// Node-wide services a shard uses.
pub struct ShardEnv {
    pub partitions: u32,
    pub gate: Arc<InFlightGate>,
    pub stats: Arc<NodeStats>,
    pub router: Arc<Router>,
}

pub struct ShardActor;

pub struct ShardArgs {
    pub shard: u32,
    pub committable: Arc<AtomicI64>,
    pub env: Arc<ShardEnv>,
}

pub struct ShardState {
    shard: u32,
    env: Arc<ShardEnv>,
    entities: HashMap<Arc<str>, ActorRef<EntityMsg>>,
    /// Dispatched offsets in order, with whether each is acknowledged.
    pending: VecDeque<(i64, bool)>,
    committable: Arc<AtomicI64>,
    drain_waiters: Vec<RpcReplyPort<()>>,
    /// Events whose key belongs to another shard, delivered one at a time in offset order.
    forward_queue: mpsc::UnboundedSender<Misrouted>,
    forwarder: tokio::task::JoinHandle<()>,
}

impl ShardState {
    fn mark_acknowledged(&mut self, offset: i64) -> usize {
        match self.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) if !self.pending[i].1 => {
                self.pending[i].1 = true;
                1
            }
            _ => 0,
        }
    }

    /// Moves the committable offset past the acknowledged prefix; answers drains when empty.
    fn advance(&mut self, acknowledged: usize) {
        let mut last = None;
        while let Some((offset, true)) = self.pending.front().copied() {
            last = Some(offset);
            self.pending.pop_front();
        }
        if let Some(offset) = last {
            self.committable.store(offset + 1, Ordering::Release);
        }
        self.env.gate.release(acknowledged);
        if self.pending.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    async fn entity(&mut self, myself: &ActorRef<ShardMsg>, user_id: &Arc<str>) -> Result<ActorRef<EntityMsg>, ActorProcessingErr> {
        if let Some(entity) = self.entities.get(user_id) {
            return Ok(entity.clone());
        }
        let args = EntityArgs {
            user_id: user_id.clone(),
            shard: myself.clone(),
        };
        let (entity, _) = Actor::spawn_linked(None, UserEntity, args, myself.get_cell()).await?;
        self.entities.insert(user_id.clone(), entity.clone());
        Ok(entity)
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ShardArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (forward_queue, queue) = mpsc::unbounded_channel();
        let forwarder = tokio::spawn(run_forwarder(args.shard, queue, args.env.router.clone(), myself));
        Ok(ShardState {
            shard: args.shard,
            env: args.env,
            entities: HashMap::new(),
            pending: VecDeque::new(),
            committable: args.committable,
            drain_waiters: Vec::new(),
            forward_queue,
            forwarder,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.forwarder.abort();
        // Whatever is still pending will be re-read by the partition's next owner.
        let unacknowledged = state.pending.iter().filter(|(_, done)| !done).count();
        state.env.gate.release(unacknowledged);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Consumed(batch) => {
                let mut by_user: HashMap<Arc<str>, Vec<EntityInput>> = HashMap::new();
                let mut local = 0u64;
                let mut dead_lettered = 0usize;
                for record in batch {
                    let Some(purchase) = record.purchase else {
                        state.pending.push_back((record.offset, true));
                        dead_lettered += 1;
                        continue;
                    };
                    state.pending.push_back((record.offset, false));
                    let shard = proto::partitioner::partition_for_key(purchase.user_id.as_bytes(), state.env.partitions);
                    if shard == state.shard {
                        local += 1;
                        tracing::debug!("Forwarding message for entity {} to shard {shard}", purchase.user_id);
                        by_user
                            .entry(purchase.user_id.clone())
                            .or_default()
                            .push(EntityInput { purchase, origin: Origin::Consumed { offset: record.offset } });
                    } else {
                        NodeStats::add(&state.env.stats.events_forwarded_out, 1);
                        tracing::debug!(
                            "event {}/{} is for user {} of shard {shard}: forwarding to its owner",
                            state.shard, record.offset, purchase.user_id
                        );
                        let _ = state.forward_queue.send(Misrouted { offset: record.offset, purchase });
                    }
                }
                NodeStats::add(&state.env.stats.events_processed_local, local);
                if dead_lettered > 0 {
                    state.advance(dead_lettered);
                }
                for (user_id, inputs) in by_user {
                    let entity = state.entity(&myself, &user_id).await?;
                    entity.cast(EntityMsg::Apply(inputs))?;
                }
            }
            ShardMsg::Applied { offsets, totals: _ } => {
                let acknowledged: usize = offsets.iter().map(|o| state.mark_acknowledged(*o)).sum();
                state.advance(acknowledged);
            }
            ShardMsg::Forwarded { offset } => {
                let acknowledged = state.mark_acknowledged(offset);
                state.advance(acknowledged);
            }
            ShardMsg::ApplyForwarded { purchase, source_partition, source_offset, reply } => {
                NodeStats::add(&state.env.stats.events_forwarded_in, 1);
                let entity = state.entity(&myself, &purchase.user_id).await?;
                entity.cast(EntityMsg::Apply(vec![EntityInput {
                    purchase,
                    origin: Origin::Forwarded { source_partition, source_offset, reply },
                }]))?;
            }
            ShardMsg::Query { user_id, reply } => match state.entities.get(&user_id) {
                Some(entity) => entity.cast(EntityMsg::Get(reply))?,
                None => {
                    let _ = reply.send(Totals::default());
                }
            },
            ShardMsg::EntityCount(reply) => {
                let _ = reply.send(state.entities.len());
            }
            ShardMsg::Drain(reply) => {
                if state.pending.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.drain_waiters.push(reply);
                }
            }
        }
        Ok(())
    }
}

/// Delivers events of this partition whose key hashes to another shard, in order, retrying
/// until the owner applied each; then marks it acknowledged here.
async fn run_forwarder(
    source_partition: u32,
    mut queue: mpsc::UnboundedReceiver<Misrouted>,
    router: Arc<Router>,
    shard: ActorRef<ShardMsg>,
) {
    while let Some(event) = queue.recv().await {
        let mut attempt = 0u32;
        loop {
            match router.forward(&event.purchase, source_partition, event.offset).await {
                Ok(_) => break,
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt % 20 == 0 {
                        tracing::warn!(
                            "forwarding event {}/{} for user {} failed ({e}); retrying",
                            source_partition, event.offset, event.purchase.user_id
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
        if shard.cast(ShardMsg::Forwarded { offset: event.offset }).is_err() {
            return;
        }
    }
}
