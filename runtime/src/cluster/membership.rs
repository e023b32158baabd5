//! Joining the cluster and staying joined, and admission: whether this node may take work.
//!
//! ractor_cluster connects and authenticates nodes but neither notices a node that went away
//! in every case nor reconnects. So: a loop dials every seed node that has no session (startup
//! order does not matter, and a returning seed is reconnected), transitive mode makes nodes learn
//! of each other through the seeds, and session events update the allocation table.
//!
//! A node is *admitted* (and only then joins the consumer group: see `node`) once a session
//! with another node is authenticated and ready, or, when it is itself a seed, once a round of
//! dialling found no other seed answering at all (it starts the cluster). A seed that answers
//! but refuses the handshake (a different cookie) keeps the node out: its shards would be
//! unreachable from every other node's front end.
//!
//! ractor_cluster's own session warnings are filtered out by default (`ractor_cluster=error`):
//! a refused node retries every few seconds and each attempt ended in two warnings per node;
//! the lines below say once what happened.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};

use crate::cluster::announce::Announcer;
use crate::readiness::Readiness;

const SEED_RETRY_EVERY: Duration = Duration::from_secs(2);
/// A peer failing the handshake with this node is mentioned at most this often.
const INCOMING_REFUSAL_SAY_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot start the cluster node server on port {port}: {reason}")]
    Start { port: u16, reason: String },
}

pub struct Membership {
    pub server: ActorRef<NodeServerMessage>,
}

/// Who this node is in the actor cluster and whom it dials.
pub struct MembershipConfig {
    pub node_name: String,
    pub host: String,
    /// The address the remoting port binds to.
    pub bind_host: std::net::IpAddr,
    pub port: u16,
    pub cookie: String,
    /// host:port of the seed nodes' remoting ports (this node's own address may be among them).
    pub seeds: Vec<String>,
}

impl Membership {
    /// Starts the node server, subscribes to session events and starts dialling the seeds.
    pub async fn start(
        config: MembershipConfig,
        announcers: Vec<Arc<Announcer>>,
        readiness: Arc<Readiness>,
    ) -> Result<Self, MembershipError> {
        let MembershipConfig {
            node_name,
            host,
            bind_host,
            port,
            cookie,
            seeds,
        } = config;
        // Seeds may be DNS names (`localhost:2551`, a Kubernetes headless service): compared
        // as the addresses they resolve to, since sessions report peers by address.
        let own_addr = resolved(&format!("{host}:{port}"));
        let seeds: Vec<String> = seeds.iter().map(|s| resolved(s)).collect();
        let is_seed = seeds.contains(&own_addr);
        let seeds: Vec<String> = seeds.into_iter().filter(|s| *s != own_addr).collect();
        let admission = Arc::new(Admission {
            readiness,
            sessions: Mutex::default(),
            refused_by: Mutex::default(),
        });
        let server = NodeServer::new(
            port,
            cookie,
            node_name,
            host.clone(),
            None,
            Some(NodeConnectionMode::Transitive),
        )
        .with_listen_addr(bind_host);
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
                    announcers,
                    admission: admission.clone(),
                    seeds: seeds.clone(),
                    last_incoming_refusal: Mutex::new(None),
                }),
            })
            .map_err(|e| MembershipError::Start {
                port,
                reason: e.to_string(),
            })?;
        if seeds.is_empty() {
            admission.readiness.admit("it is the only seed node");
        }
        tokio::spawn(dial_seeds(server.clone(), seeds, is_seed, admission));
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

/// What admission needs to know about sessions.
struct Admission {
    readiness: Arc<Readiness>,
    /// Open sessions: whether each has authenticated.
    sessions: Mutex<HashMap<ActorId, bool>>,
    /// Seeds that answered but refused this node's handshake.
    refused_by: Mutex<HashSet<String>>,
}

impl Admission {
    /// Records an open session and whether its handshake completed.
    fn session(&self, ses: &NodeServerSessionInformation, authenticated: bool) {
        self.sessions
            .lock()
            .expect("admission lock poisoned")
            .insert(ses.actor.get_id(), authenticated);
    }
}

/// `host:port` as the first address it resolves to (IPv4 first, as nodes bind), or as given
/// when it does not resolve now (dialling resolves it again).
fn resolved(addr: &str) -> String {
    use std::net::ToSocketAddrs;
    match addr.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .map_or_else(|| addr.to_string(), ToString::to_string)
        }
        Err(_) => addr.to_string(),
    }
}

async fn dial_seeds(
    server: ActorRef<NodeServerMessage>,
    seeds: Vec<String>,
    is_seed: bool,
    admission: Arc<Admission>,
) {
    let mut reported_down: HashSet<String> = HashSet::new();
    loop {
        // Whether any other seed answered this round (TCP accepted), authenticated or not.
        let mut answered = false;
        let sessions = connected(&server).await;
        let reachable: HashSet<String> = sessions
            .iter()
            .filter_map(|s| s.peer_name.as_ref().map(|n| n.connection_string.clone()))
            .chain(sessions.iter().map(|s| s.peer_addr.clone()))
            .collect();
        for seed in &seeds {
            if reachable.contains(seed) {
                reported_down.remove(seed);
                answered = true;
                continue;
            }
            match tokio::time::timeout(
                Duration::from_secs(2),
                ractor_cluster::client_connect(&server, seed.as_str()),
            )
            .await
            {
                // Only a transport: "connected" is said once the handshake succeeds.
                Ok(Ok(())) => {
                    reported_down.remove(seed);
                    answered = true;
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
        if !admission.readiness.admitted() {
            let refused = admission
                .refused_by
                .lock()
                .expect("admission lock poisoned")
                .clone();
            if is_seed && !answered && refused.is_empty() {
                admission
                    .readiness
                    .admit("no other seed node answers: this node starts the cluster");
            } else if !refused.is_empty() {
                let mut refused: Vec<String> = refused.into_iter().collect();
                refused.sort();
                admission.readiness.not_admitted_because(&format!(
                    "refused by {} (is --cookie the same on every node?)",
                    refused.join(", ")
                ));
            } else if !answered {
                admission
                    .readiness
                    .not_admitted_because(&format!("no seed node answers ({})", seeds.join(", ")));
            } else {
                admission
                    .readiness
                    .not_admitted_because("handshake with a seed node in progress");
            }
        }
        tokio::time::sleep(SEED_RETRY_EVERY).await;
    }
}

struct SessionEvents {
    server: ActorRef<NodeServerMessage>,
    /// One per entity type: its allocation table and its announcements.
    announcers: Vec<Arc<Announcer>>,
    admission: Arc<Admission>,
    seeds: Vec<String>,
    last_incoming_refusal: Mutex<Option<Instant>>,
}

impl SessionEvents {
    /// A session ended before its handshake completed: a refused cookie, unless another session
    /// to the same peer won (two nodes dialling each other keep one session).
    fn handshake_failed(&self, ses: NodeServerSessionInformation) {
        if ses.is_server {
            let mut last = self
                .last_incoming_refusal
                .lock()
                .expect("membership lock poisoned");
            if last.is_none_or(|t| t.elapsed() >= INCOMING_REFUSAL_SAY_EVERY) {
                *last = Some(Instant::now());
                tracing::warn!(
                    "a node at {} failed the handshake with this node (a different --cookie?); it is not admitted",
                    ses.peer_addr
                );
            }
            return;
        }
        let (server, admission, seed) = (
            self.server.clone(),
            self.admission.clone(),
            ses.peer_addr.clone(),
        );
        if !self.seeds.contains(&seed) {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let other_session = connected(&server).await.iter().any(|s| {
                s.peer_name
                    .as_ref()
                    .is_some_and(|n| n.connection_string == seed)
            });
            if other_session {
                return;
            }
            if admission
                .refused_by
                .lock()
                .expect("admission lock poisoned")
                .insert(seed.clone())
            {
                tracing::error!(
                    "{seed} refused this node: is --cookie the same on every node? Not joining the consumer group \
                     until a seed node admits this node; retrying"
                );
            }
        });
    }
}

impl NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        self.admission.session(&ses, false);
    }

    // A session is only ever ready after it authenticated.
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.admission.session(&ses, true);
    }

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        if let Some(name) = &ses.peer_name {
            if !ses.is_server && self.seeds.contains(&ses.peer_addr) {
                tracing::info!("connected to seed node {}", ses.peer_addr);
                self.admission
                    .refused_by
                    .lock()
                    .expect("admission lock poisoned")
                    .remove(&ses.peer_addr);
            }
            tracing::info!(
                "node {} joined the cluster (at {})",
                name.name,
                name.connection_string
            );
            self.admission
                .readiness
                .admit(&format!("session with {}", name.connection_string));
        }
        for announcer in &self.announcers {
            announcer.kick();
        }
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let authenticated = self
            .admission
            .sessions
            .lock()
            .expect("admission lock poisoned")
            .remove(&ses.actor.get_id())
            .unwrap_or(false);
        if !authenticated {
            self.handshake_failed(ses);
            return;
        }
        let Some(name) = ses.peer_name.map(|n| n.name) else {
            return;
        };
        // Two nodes that dial each other at once keep one session and close the other; only
        // forget the peer if no session to it remains.
        let server = self.server.clone();
        let announcers = self.announcers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let still_connected = connected(&server)
                .await
                .iter()
                .any(|s| s.peer_name.as_ref().is_some_and(|n| n.name == name));
            if still_connected {
                return;
            }
            let shards: Vec<String> = announcers
                .iter()
                .map(|a| {
                    let gone = a.table().remove_node(&name).len();
                    format!("{gone} of {}", a.entity_type())
                })
                .collect();
            tracing::warn!(
                "node {name} left the cluster; its shards ({}) have no owner until Kafka reassigns them",
                shards.join(", ")
            );
        });
    }
}
