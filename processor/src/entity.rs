//! The per-user entity actor: applies one user's purchases, one at a time, in partition order.
//!
//! Entities are local-only actors (never remotable: every remotable actor would get a proxy on
//! every peer). A shard activates one on the user's first event or query, from the user's stored
//! state if any, and passivates it when idle; the shard keeps the compact state meanwhile.

use std::collections::HashMap;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use serde::Serialize;

use crate::event::Purchase;
use crate::shard::ShardMsg;

/// A user id (the partition key). Ids up to 24 bytes are stored inline: no allocation per
/// event or per restored user, which showed in the consumer's and the restorer's profiles.
pub type UserId = compact_str::CompactString;

/// A map keyed by user id, with foldhash (seeded per map) instead of SipHash: hashing user ids
/// was a visible part of restoring and dispatching.
pub type UserMap<V> = HashMap<UserId, V, foldhash::fast::RandomState>;

/// A user's running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub purchases: i64,
    pub amount_spent: i64,
}

/// Everything durable about an entity: its totals and the input offset they reflect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityState {
    pub totals: Totals,
    /// Offset of the last applied event of the user's partition; -1 before the first.
    pub last_offset: i64,
}

impl Default for EntityState {
    fn default() -> Self {
        Self {
            totals: Totals::default(),
            last_offset: -1,
        }
    }
}

impl EntityState {
    /// Applies the event at `offset` unless the state already includes it (a replay after a
    /// crash or hand-off: the state may be ahead of the committed offset). Returns whether
    /// it was applied.
    pub fn apply(&mut self, offset: i64, purchase: &Purchase) -> bool {
        if offset <= self.last_offset {
            return false;
        }
        self.totals.purchases += 1;
        self.totals.amount_spent = self.totals.amount_spent.saturating_add(purchase.amount());
        self.last_offset = offset;
        true
    }
}

#[derive(RactorMessage)]
pub enum EntityMsg {
    /// Events of this user read from the shard's partition, in offset order.
    Apply(Vec<(i64, Purchase)>),
    Get(RpcReplyPort<Totals>),
}

pub struct UserEntity;

pub struct EntityArgs {
    pub user_id: UserId,
    pub shard: ActorRef<ShardMsg>,
    pub state: EntityState,
}

pub struct Entity {
    user_id: UserId,
    shard: ActorRef<ShardMsg>,
    state: EntityState,
}

impl Actor for UserEntity {
    type Msg = EntityMsg;
    type State = Entity;
    type Arguments = EntityArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: EntityArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Entity {
            user_id: args.user_id,
            shard: args.shard,
            state: args.state,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        entity: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EntityMsg::Apply(events) => {
                let mut offsets = Vec::with_capacity(events.len());
                let mut replays = 0u64;
                for (offset, purchase) in &events {
                    if entity.state.apply(*offset, purchase) {
                        tracing::debug!(
                            "user {} purchase, quantity {}, price {}",
                            entity.user_id,
                            purchase.quantity,
                            purchase.price
                        );
                    } else {
                        replays += 1;
                    }
                    offsets.push(*offset);
                }
                // The shard may be gone (handed off); then nothing waits for this acknowledgement.
                let _ = entity.shard.cast(ShardMsg::Applied {
                    user_id: entity.user_id.clone(),
                    offsets,
                    replays,
                    state: entity.state,
                });
            }
            EntityMsg::Get(reply) => {
                let _ = reply.send(entity.state.totals);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purchase(q: i64, p: i64) -> Purchase {
        Purchase {
            user_id: UserId::from("7"),
            product: "mug".into(),
            quantity: q,
            price: p,
        }
    }

    #[test]
    fn replayed_offsets_are_not_counted_again() {
        let mut s = EntityState::default();
        assert!(s.apply(10, &purchase(2, 100)));
        assert!(s.apply(12, &purchase(1, 5)));
        assert!(!s.apply(12, &purchase(1, 5)), "same offset again");
        assert!(!s.apply(10, &purchase(2, 100)), "older offset");
        assert_eq!(
            s.totals,
            Totals {
                purchases: 2,
                amount_spent: 205
            }
        );
        assert_eq!(s.last_offset, 12);
    }
}
