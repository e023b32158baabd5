//! Joining the cluster and staying joined.
//!
//! ractor_cluster connects and authenticates nodes but neither notices a node that went away
//! in every case nor reconnects. So: a loop dials every seed node that has no session (startup
//! order does not matter, and a returning seed is reconnected), transitive mode makes nodes learn
//! of each other through the seeds, and session events update the allocation table.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};

use crate::allocation::AllocationTable;
use crate::cluster::announce::Announcer;

const SEED_RETRY_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot start the cluster node server on port {port}: {reason}")]
    Start { port: u16, reason: String },
}

pub struct Membership {
    pub server: ActorRef<NodeServerMessage>,
}

impl Membership {
    /// Starts the node server, subscribes to session events and starts dialling the seeds.
    pub async fn start(
        node_name: String,
        host: String,
        port: u16,
        cookie: String,
        seeds: Vec<String>,
        table: Arc<AllocationTable>,
        announcer: Arc<Announcer>,
    ) -> Result<Self, MembershipError> {
        let own_addr = format!("{host}:{port}");
        let mut server = NodeServer::new(
            port,
            cookie,
            node_name,
            host.clone(),
            None,
            Some(NodeConnectionMode::Transitive),
        );
        if let Ok(ip) = host.parse() {
            server = server.with_listen_addr(ip);
        }
        let (server, _) =
            Actor::spawn(None, server, ())
                .await
                .map_err(|e| MembershipError::Start {
                    port,
                    reason: e.to_string(),
                })?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "membership".into(),
                subscription: Box::new(SessionEvents {
                    server: server.clone(),
                    table,
                    announcer,
                }),
            })
            .map_err(|e| MembershipError::Start {
                port,
                reason: e.to_string(),
            })?;
        let seeds: Vec<String> = seeds.into_iter().filter(|s| *s != own_addr).collect();
        tokio::spawn(dial_seeds(server.clone(), seeds));
        Ok(Self { server })
    }

    /// Full names of the nodes this one has a session with.
    pub async fn peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = connected(&self.server)
            .await
            .into_iter()
            .filter_map(|s| s.peer_name.map(|n| n.name))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        peers.sort();
        peers
    }
}

async fn connected(server: &ActorRef<NodeServerMessage>) -> Vec<NodeServerSessionInformation> {
    match ractor::call_t!(server, NodeServerMessage::GetSessions, 1_000) {
        Ok(sessions) => sessions.into_values().collect(),
        Err(_) => Vec::new(),
    }
}

async fn dial_seeds(server: ActorRef<NodeServerMessage>, seeds: Vec<String>) {
    let mut reported_down: HashSet<String> = HashSet::new();
    loop {
        let sessions = connected(&server).await;
        let reachable: HashSet<String> = sessions
            .iter()
            .filter_map(|s| s.peer_name.as_ref().map(|n| n.connection_string.clone()))
            .chain(sessions.iter().map(|s| s.peer_addr.clone()))
            .collect();
        for seed in &seeds {
            if reachable.contains(seed) {
                reported_down.remove(seed);
                continue;
            }
            match tokio::time::timeout(
                Duration::from_secs(2),
                ractor_cluster::client_connect(&server, seed.as_str()),
            )
            .await
            {
                Ok(Ok(())) => {
                    tracing::info!("connected to seed node {seed}");
                    reported_down.remove(seed);
                }
                Ok(Err(e)) => {
                    if reported_down.insert(seed.clone()) {
                        tracing::info!(
                            "seed node {seed} not reachable yet ({e}); will keep trying"
                        );
                    }
                }
                Err(_) => {
                    if reported_down.insert(seed.clone()) {
                        tracing::info!("seed node {seed} did not answer; will keep trying");
                    }
                }
            }
        }
        tokio::time::sleep(SEED_RETRY_EVERY).await;
    }
}

struct SessionEvents {
    server: ActorRef<NodeServerMessage>,
    table: Arc<AllocationTable>,
    announcer: Arc<Announcer>,
}

impl NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        if let Some(name) = ses.peer_name {
            tracing::info!(
                "node {} joined the cluster (at {})",
                name.name,
                name.connection_string
            );
        }
        self.announcer.kick();
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let Some(name) = ses.peer_name.map(|n| n.name) else {
            return;
        };
        // Two nodes that dial each other at once keep one session and close the other; only
        // forget the peer if no session to it remains.
        let server = self.server.clone();
        let table = self.table.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let still_connected = connected(&server)
                .await
                .iter()
                .any(|s| s.peer_name.as_ref().is_some_and(|n| n.name == name));
            if still_connected {
                return;
            }
            let shards = table.remove_node(&name);
            tracing::warn!(
                "node {name} left the cluster; its {} shards have no owner until Kafka reassigns them",
                shards.len()
            );
        });
    }
}
