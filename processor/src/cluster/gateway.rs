//! The gateway: one remotable actor per node, the only way nodes talk to each other.
//!
//! Peers find it through `ractor::pg`: every gateway joins [`ALL_GATEWAYS`] (for broadcasts)
//! and a group named after its node (to reach one node). It answers queries for shards hosted
//! here and feeds ownership announcements into the table.
//! Calls are served on their own tasks so one slow shard cannot stall the gateway.

use std::collections::BTreeSet;
use std::sync::Arc;

use ractor::{pg, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::allocation::AllocationTable;
use crate::cluster::wire::{
    totals_answer, NotOwner, OwnershipAnnouncement, Totals as WireTotals, TotalsAnswer,
    TotalsBatch, TotalsBatchAnswer, TotalsQuery,
};
use crate::entity::Totals;
use crate::event::MAX_USER_ID_BYTES;
use crate::routing::{Attempt, Router};

/// The pg group every node's gateway joins.
pub const ALL_GATEWAYS: &str = "user-processing/gateways";

fn node_group(node: &str) -> String {
    format!("user-processing/gateway/{node}")
}

#[derive(RactorClusterMessage)]
pub enum GatewayMsg {
    /// A node's complete set of owned shards.
    Announce(OwnershipAnnouncement),
    /// Users' totals from shards hosted here, answered in order (see `query_batcher`).
    #[rpc]
    TotalsBatch(TotalsBatch, RpcReplyPort<TotalsBatchAnswer>),
}

/// The gateway of another node, if connected.
pub fn of_node(node: &str) -> Option<ActorRef<GatewayMsg>> {
    pg::get_members(&node_group(node))
        .into_iter()
        .find(|cell| !cell.get_id().is_local())
        .map(ActorRef::from)
}

/// Gateways of every connected peer.
pub fn remote_gateways() -> Vec<ActorRef<GatewayMsg>> {
    pg::get_members(&ALL_GATEWAYS.to_string())
        .into_iter()
        .filter(|cell| !cell.get_id().is_local())
        .map(ActorRef::from)
        .collect()
}

pub struct Gateway;

pub struct GatewayArgs {
    pub node: Arc<str>,
    pub table: Arc<AllocationTable>,
    pub router: Arc<Router>,
}

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayArgs;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        pg::join(ALL_GATEWAYS.to_string(), vec![myself.get_cell()]);
        pg::join(node_group(&args.node), vec![myself.get_cell()]);
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Announce(a) => {
                if a.node.is_empty() || *a.node == *state.node {
                    return Ok(());
                }
                let shards: BTreeSet<u32> = a.shards.iter().copied().collect();
                if state
                    .table
                    .apply_claim(&a.node, (a.incarnation, a.seq), shards)
                {
                    tracing::info!("node {} now owns {} shards", a.node, a.shards.len());
                }
            }
            GatewayMsg::TotalsBatch(batch, reply) => {
                let router = state.router.clone();
                tokio::spawn(async move {
                    let answers = futures::future::join_all(
                        batch.queries.into_iter().map(|q| answer_query(&router, q)),
                    )
                    .await;
                    let _ = reply.send(TotalsBatchAnswer { answers });
                });
            }
        }
        Ok(())
    }
}

fn wire(t: Totals) -> WireTotals {
    WireTotals {
        purchases: t.purchases,
        amount_spent: t.amount_spent,
    }
}

async fn answer_query(router: &Router, query: TotalsQuery) -> TotalsAnswer {
    use totals_answer::Result as R;
    if query.user_id.is_empty() || query.user_id.len() > MAX_USER_ID_BYTES {
        return TotalsAnswer {
            result: Some(R::Error("invalid user id".into())),
        };
    }
    let result = match router.local_totals(query.shard, &query.user_id).await {
        Attempt::Done(t) => R::Totals(wire(t)),
        Attempt::NotOwner => R::NotOwner(NotOwner {}),
        Attempt::Failed(e) => R::Error(e),
    };
    TotalsAnswer {
        result: Some(result),
    }
}
