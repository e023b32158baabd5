//! The gateway: one remotable actor per node, the way nodes talk to each other over
//! ractor_cluster (a forwarded query takes the query link when it can: `query_link`).
//!
//! Peers find it through `ractor::pg`: every gateway joins [`ALL_GATEWAYS`] (for broadcasts)
//! and a group named after its node (to reach one node). It answers queries for shards hosted
//! here, feeds ownership announcements into each entity type's table and hands the answers to
//! commands this node sent to their callers. It knows entity types
//! only by name ([`Endpoint`]): queries and replies cross it as bytes.
//! Calls are served on their own tasks so one slow shard cannot stall the gateway.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ractor::{pg, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::cluster::endpoint::{answer, Endpoint};
use crate::cluster::wire::{CommandReply, OwnershipAnnouncement, QueryBatch, QueryBatchAnswer};
use crate::commands::PendingCommands;

/// The pg group every node's gateway joins.
pub(crate) const ALL_GATEWAYS: &str = "kafka-sharding/gateways";

fn node_group(node: &str) -> String {
    format!("kafka-sharding/gateway/{node}")
}

#[derive(RactorClusterMessage)]
pub(crate) enum GatewayMsg {
    /// A node's complete set of owned shards of one entity type.
    Announce(OwnershipAnnouncement),
    /// Queries for shards hosted here, answered in order (see `query_batcher`).
    #[rpc]
    QueryBatch(QueryBatch, RpcReplyPort<QueryBatchAnswer>),
    /// The committed answer to a command this node sent.
    CommandReply(CommandReply),
}

/// The gateway of another node, if connected.
pub(crate) fn of_node(node: &str) -> Option<ActorRef<GatewayMsg>> {
    pg::get_members(&node_group(node))
        .into_iter()
        .find(|cell| !cell.get_id().is_local())
        .map(ActorRef::from)
}

/// Gateways of every connected peer.
pub(crate) fn remote_gateways() -> Vec<ActorRef<GatewayMsg>> {
    pg::get_members(&ALL_GATEWAYS.to_string())
        .into_iter()
        .filter(|cell| !cell.get_id().is_local())
        .map(ActorRef::from)
        .collect()
}

pub(crate) struct Gateway;

pub(crate) struct GatewayArgs {
    pub node: Arc<str>,
    /// Every entity type hosted by this node, by name.
    pub endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    /// Commands this node sent, waiting for their answers.
    pub commands: Arc<PendingCommands>,
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
                let Some(endpoint) = state.endpoints.get(&a.entity_type) else {
                    return Ok(());
                };
                let shards: BTreeSet<u32> = a.shards.iter().copied().collect();
                endpoint.table().set_grpc_url(&a.node, &a.grpc_url);
                endpoint
                    .table()
                    .set_management_url(&a.node, &a.management_url);
                if endpoint
                    .table()
                    .apply_claim(&a.node, (a.incarnation, a.seq), shards)
                {
                    tracing::info!(
                        "node {} now owns {} shards of {}",
                        a.node,
                        a.shards.len(),
                        a.entity_type
                    );
                }
            }
            GatewayMsg::CommandReply(answer) => {
                if let Some(outcome) = answer.outcome {
                    state.commands.complete(answer.request, outcome);
                }
            }
            GatewayMsg::QueryBatch(batch, reply) => {
                let endpoints = state.endpoints.clone();
                tokio::spawn(async move {
                    let answers = futures::future::join_all(
                        batch
                            .queries
                            .into_iter()
                            .map(|q| answer(endpoints.as_ref(), q)),
                    )
                    .await;
                    let _ = reply.send(QueryBatchAnswer { answers });
                });
            }
        }
        Ok(())
    }
}
