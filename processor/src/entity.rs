//! The per-user entity actor: applies one user's purchases, one at a time, in partition order.
//!
//! Entities are local-only actors (never remotable: every remotable actor would get a proxy on
//! every peer). They are created by their shard on the user's first event and stopped with it.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use serde::Serialize;

use crate::event::Purchase;
use crate::shard::ShardMsg;

/// A user's running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub purchases: i64,
    pub amount_spent: i64,
}

/// Where an event applied by an entity came from, which decides who is told it was applied.
pub enum Origin {
    /// Read by this node's consumer from the entity's own partition at `offset`.
    Consumed { offset: i64 },
    /// Read by another shard (maybe another node) from `source_partition`; the reply completes
    /// the forwarder's call. Forwards from one partition arrive in offset order, so a repeat
    /// (a retried forward whose first attempt was applied) is recognised and not counted again.
    Forwarded {
        source_partition: u32,
        source_offset: i64,
        reply: RpcReplyPort<Totals>,
    },
}

pub struct EntityInput {
    pub purchase: Purchase,
    pub origin: Origin,
}

#[derive(RactorMessage)]
pub enum EntityMsg {
    /// Events for this user, in partition order.
    Apply(Vec<EntityInput>),
    Get(RpcReplyPort<Totals>),
}

pub struct UserEntity;

pub struct EntityArgs {
    pub user_id: Arc<str>,
    pub shard: ActorRef<ShardMsg>,
}

pub struct EntityState {
    user_id: Arc<str>,
    shard: ActorRef<ShardMsg>,
    totals: Totals,
    /// Highest forwarded offset applied, per source partition.
    forwarded_high_water: HashMap<u32, i64>,
}

impl EntityState {
    fn apply(&mut self, purchase: &Purchase) {
        self.totals.purchases += 1;
        self.totals.amount_spent = self.totals.amount_spent.saturating_add(purchase.amount());
        tracing::debug!(
            user = %self.user_id,
            quantity = purchase.quantity,
            price = purchase.price,
            "user {} purchase, quantity {}, price {}",
            self.user_id,
            purchase.quantity,
            purchase.price
        );
    }
}

impl Actor for UserEntity {
    type Msg = EntityMsg;
    type State = EntityState;
    type Arguments = EntityArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: EntityArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(EntityState {
            user_id: args.user_id,
            shard: args.shard,
            totals: Totals::default(),
            forwarded_high_water: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EntityMsg::Apply(inputs) => {
                let mut consumed_offsets = Vec::with_capacity(inputs.len());
                for input in inputs {
                    match input.origin {
                        Origin::Consumed { offset } => {
                            state.apply(&input.purchase);
                            consumed_offsets.push(offset);
                        }
                        Origin::Forwarded { source_partition, source_offset, reply } => {
                            let seen = state.forwarded_high_water.get(&source_partition);
                            if seen.is_none_or(|hw| source_offset > *hw) {
                                state.apply(&input.purchase);
                                state.forwarded_high_water.insert(source_partition, source_offset);
                            }
                            let _ = reply.send(state.totals);
                        }
                    }
                }
                if !consumed_offsets.is_empty() {
                    // The shard may be gone (hand-off finished); then nothing waits for this ack.
                    let _ = state.shard.cast(ShardMsg::Applied {
                        offsets: consumed_offsets,
                        totals: state.totals,
                    });
                }
            }
            EntityMsg::Get(reply) => {
                let _ = reply.send(state.totals);
            }
        }
        Ok(())
    }
}
