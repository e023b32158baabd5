//! The per-entity actor: applies one entity's events, one batch at a time, in partition order,
//! and answers its queries. The state machine is the application's [`Entity`]; the replay rule
//! is the runtime's ([`Stored::apply`]).
//!
//! Entities are local-only actors (never remotable: every remotable actor would get a proxy on
//! every peer). A shard activates one on the entity's first event or query, from its stored
//! state if any, and passivates it when idle; the shard keeps the state meanwhile.

use std::marker::PhantomData;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::messages::ShardMsg;
use crate::entity::{Entity, EntityId, Stored};

pub(crate) enum EntityMsg<E: Entity> {
    /// Events of this entity read from the shard's partition, in offset order.
    Apply(Vec<(i64, E::Event)>),
    Query(E::Query, RpcReplyPort<E::Reply>),
}

impl<E: Entity> ractor::Message for EntityMsg<E> {}

pub(crate) struct EntityActor<E>(PhantomData<fn() -> E>);

impl<E> EntityActor<E> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

pub(crate) struct EntityArgs<E: Entity> {
    pub id: EntityId,
    pub shard: ActorRef<ShardMsg<E>>,
    pub stored: Stored<E::State>,
}

impl<E: Entity> Actor for EntityActor<E> {
    type Msg = EntityMsg<E>;
    type State = EntityArgs<E>;
    type Arguments = EntityArgs<E>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: EntityArgs<E>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
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
                for (offset, event) in &events {
                    if !entity.stored.apply::<E>(*offset, event) {
                        replays += 1;
                    }
                    offsets.push(*offset);
                }
                // The shard may be gone (handed off); then nothing waits for this acknowledgement.
                let _ = entity.shard.cast(ShardMsg::Applied {
                    id: entity.id.clone(),
                    offsets,
                    replays,
                    stored: entity.stored.clone(),
                });
            }
            EntityMsg::Query(query, reply) => {
                let _ = reply.send(E::query(&entity.stored.state, &query));
            }
        }
        Ok(())
    }
}
