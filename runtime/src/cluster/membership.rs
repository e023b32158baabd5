//! Joining the cluster and staying joined, and admission: whether this node may take work.
//!
//! ractor_cluster connects and authenticates nodes but neither notices a node that went away
//! in every case nor reconnects. So: a loop dials every seed node that has no session (startup
//! order does not matter, and a returning seed is reconnected), asks every peer's *roster* whom
//! it has sessions with and dials those it lacks (so nodes that only know the seeds find each
//! other), and session events update the allocation table. ractor_cluster's own transitive mode
//! does the same exchange but dials in plain TCP, which a TLS listener refuses; the roster dials
//! as every other session is dialled, with TLS when the node has it (`tls`).
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{pg, Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{
    ClientConnectErr, IncomingEncryptionMode, NodeEventSubscription, NodeServer, NodeServerMessage,
    RactorClusterMessage,
};
use tokio::sync::Notify;

use crate::cluster::announce::Announcer;
use crate::cluster::tls::{server_name, NodeTls};
use crate::cluster::wire::{PeerAddresses, PeersRequest};
use crate::readiness::Readiness;

const SEED_RETRY_EVERY: Duration = Duration::from_secs(2);
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// The pg group every node's roster joins.
const ROSTERS: &str = "kafka-sharding/rosters";
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
    /// TLS for every session, in both directions; `None` is plain TCP.
    pub tls: Option<NodeTls>,
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
            tls,
        } = config;
        // Seeds may be DNS names (`localhost:2551`, a Kubernetes headless service): compared
        // as the addresses they resolve to, since sessions report peers by address, and dialled
        // by that address with the name as given (what a TLS certificate names).
        let own = [
            format!("{host}:{port}"),
            resolved(&format!("{host}:{port}")),
        ];
        let seeds: Vec<Peer> = seeds
            .iter()
            .map(|s| Peer {
                addr: resolved(s),
                name: s.clone(),
            })
            .collect();
        let is_seed = seeds.iter().any(|s| own.contains(&s.addr));
        let seeds: Vec<Peer> = seeds
            .into_iter()
            .filter(|s| !own.contains(&s.addr))
            .collect();
        let seed_addrs: Vec<String> = seeds.iter().map(|s| s.addr.clone()).collect();
        let admission = Arc::new(Admission {
            readiness,
            sessions: Mutex::default(),
            refused_by: Mutex::default(),
            tls: tls.is_some(),
        });
        let server = NodeServer::new(
            port,
            cookie,
            node_name,
            host.clone(),
            tls.as_ref()
                .map(|tls| IncomingEncryptionMode::Tls(tls.acceptor())),
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(bind_host);
        let (server, _) =
            Actor::spawn(None, server, ())
                .await
                .map_err(|e| MembershipError::Start {
                    port,
                    reason: e.to_string(),
                })?;
        let start_error = |e: &dyn std::fmt::Display| MembershipError::Start {
            port,
            reason: e.to_string(),
        };
        Actor::spawn(None, Roster, server.clone())
            .await
            .map_err(|e| start_error(&e))?;
        let wake = Arc::new(Notify::new());
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "membership".into(),
                subscription: Box::new(SessionEvents {
                    server: server.clone(),
                    announcers,
                    admission: admission.clone(),
                    seeds: seed_addrs,
                    last_incoming_refusal: Mutex::new(None),
                    wake: wake.clone(),
                }),
            })
            .map_err(|e| start_error(&e))?;
        if seeds.is_empty() {
            admission.readiness.admit("it is the only seed node");
        }
        tokio::spawn(
            Dialler {
                server: server.clone(),
                seeds,
                own,
                is_seed,
                tls,
                admission,
                wake,
            }
            .run(),
        );
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
    /// Seeds that answered but refused this node's handshake, with what to check.
    refused_by: Mutex<BTreeMap<String, String>>,
    /// Whether this node speaks TLS to its peers (what a refusal hints at).
    tls: bool,
}

impl Admission {
    /// Records an open session and whether its handshake completed.
    fn session(&self, ses: &NodeServerSessionInformation, authenticated: bool) {
        self.sessions
            .lock()
            .expect("admission lock poisoned")
            .insert(ses.actor.get_id(), authenticated);
    }

    /// Records that `seed` refused this node; says so once per seed.
    fn refused(&self, seed: &str, why: String) {
        let mut refused = self.refused_by.lock().expect("admission lock poisoned");
        if refused.insert(seed.to_string(), why.clone()).is_none() {
            tracing::error!(
                "{seed} refused this node: {why} Not joining the consumer group until a seed \
                 node admits this node; retrying"
            );
        }
    }

    /// What to check when a peer closed the session before the handshake completed.
    fn handshake_hint(&self) -> String {
        if self.tls {
            "is --cookie the same on every node? Does the CA in its --tls-ca sign this node's \
             certificate?"
                .into()
        } else {
            "is --cookie the same on every node? Is TLS between nodes (--tls-cert) off on every \
             node?"
                .into()
        }
    }
}

/// A node to dial: the address sessions report it by, and the name it was given as (what its
/// TLS certificate must name).
#[derive(Debug, Clone)]
struct Peer {
    addr: String,
    name: String,
}

/// Why dialling a peer did not open a session.
enum DialError {
    /// Nothing answered: not started yet, or gone.
    Unreachable(String),
    /// It answered but the TLS handshake failed: a certificate one side does not trust.
    Refused(String),
}

/// The roster: one remotable actor per node answering whom the node has sessions with.
#[derive(RactorClusterMessage)]
enum RosterMsg {
    #[rpc]
    Peers(PeersRequest, RpcReplyPort<PeerAddresses>),
}

struct Roster;

impl Actor for Roster {
    type Msg = RosterMsg;
    type State = ActorRef<NodeServerMessage>;
    type Arguments = ActorRef<NodeServerMessage>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        server: ActorRef<NodeServerMessage>,
    ) -> Result<Self::State, ActorProcessingErr> {
        pg::join(ROSTERS.to_string(), vec![myself.get_cell()]);
        Ok(server)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        server: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RosterMsg::Peers(_, reply) = msg;
        let server = server.clone();
        tokio::spawn(async move {
            let addresses = connected(&server)
                .await
                .into_iter()
                .filter_map(|s| s.peer_name.map(|n| n.connection_string))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let _ = reply.send(PeerAddresses { addresses });
        });
        Ok(())
    }
}

/// The peers every connected node's roster names (duplicates removed).
async fn peers_of_peers() -> HashSet<String> {
    let rosters: Vec<ActorRef<RosterMsg>> = pg::get_members(&ROSTERS.to_string())
        .into_iter()
        .filter(|cell| !cell.get_id().is_local())
        .map(ActorRef::from)
        .collect();
    let answers = futures::future::join_all(rosters.iter().map(|roster| async move {
        ractor::call_t!(roster, RosterMsg::Peers, 1_000, PeersRequest {})
    }))
    .await;
    answers
        .into_iter()
        .flatten()
        .flat_map(|a| a.addresses)
        .collect()
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

/// Dials the seeds and the peers the rosters name, forever; decides admission.
struct Dialler {
    server: ActorRef<NodeServerMessage>,
    seeds: Vec<Peer>,
    /// This node's own address, as advertised and as resolved.
    own: [String; 2],
    is_seed: bool,
    tls: Option<NodeTls>,
    admission: Arc<Admission>,
    /// Woken when a session becomes ready: its roster may name new peers.
    wake: Arc<Notify>,
}

impl Dialler {
    async fn run(self) {
        let mut reported_down: HashSet<String> = HashSet::new();
        loop {
            // Whether any other seed answered this round (TCP accepted), authenticated or not.
            let mut answered = false;
            let sessions = connected(&self.server).await;
            let reachable: HashSet<String> = sessions
                .iter()
                .filter_map(|s| s.peer_name.as_ref().map(|n| n.connection_string.clone()))
                .chain(sessions.iter().map(|s| s.peer_addr.clone()))
                .collect();
            for seed in &self.seeds {
                if reachable.contains(&seed.addr) {
                    reported_down.remove(&seed.addr);
                    answered = true;
                    continue;
                }
                match self.dial(seed).await {
                    // Only a transport: "connected" is said once the handshake succeeds.
                    Ok(()) => {
                        reported_down.remove(&seed.addr);
                        answered = true;
                    }
                    Err(DialError::Refused(why)) => {
                        answered = true;
                        self.admission.refused(&seed.addr, why);
                    }
                    Err(DialError::Unreachable(why)) => {
                        if reported_down.insert(seed.addr.clone()) {
                            tracing::info!("seed node {} {why}; will keep trying", seed.addr);
                        }
                    }
                }
            }
            self.dial_peers_of_peers(&reachable).await;
            if !self.admission.readiness.admitted() {
                self.judge_admission(answered);
            }
            tokio::select! {
                () = tokio::time::sleep(SEED_RETRY_EVERY) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Opens a session with `peer` (the handshake goes on in ractor_cluster), over TLS when
    /// this node has it.
    async fn dial(&self, peer: &Peer) -> Result<(), DialError> {
        let connecting = async {
            match &self.tls {
                None => ractor_cluster::client_connect(&self.server, peer.addr.as_str()).await,
                Some(tls) => {
                    let name = server_name(&peer.name).map_err(|e| {
                        ClientConnectErr::Socket(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            e,
                        ))
                    })?;
                    ractor_cluster::client_connect_enc(
                        &self.server,
                        peer.addr.as_str(),
                        tls.connector(),
                        name,
                    )
                    .await
                }
            }
        };
        match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ClientConnectErr::Encryption(e))) => Err(DialError::Refused(format!(
                "the TLS handshake failed ({e}): is every node's certificate signed by the CA in \
                 --tls-ca, and does the certificate of {} name its host?",
                peer.name
            ))),
            Ok(Err(e)) => Err(DialError::Unreachable(format!("not reachable yet ({e})"))),
            Err(_) => Err(DialError::Unreachable("did not answer".into())),
        }
    }

    /// Dials the peers other nodes have sessions with and this one does not.
    async fn dial_peers_of_peers(&self, reachable: &HashSet<String>) {
        for addr in peers_of_peers().await {
            if reachable.contains(&addr)
                || self.own.contains(&addr)
                || self.seeds.iter().any(|s| s.addr == addr || s.name == addr)
            {
                continue;
            }
            let peer = Peer {
                addr: addr.clone(),
                name: addr,
            };
            match self.dial(&peer).await {
                Ok(()) => tracing::debug!("dialled {}, named by a peer", peer.addr),
                Err(DialError::Refused(why)) => {
                    tracing::warn!("{} refused this node: {why}", peer.addr)
                }
                // Gone since the peer answered; the peer forgets it too.
                Err(DialError::Unreachable(why)) => {
                    tracing::debug!("{} named by a peer: {why}", peer.addr)
                }
            }
        }
    }

    fn judge_admission(&self, answered: bool) {
        let refused = self
            .admission
            .refused_by
            .lock()
            .expect("admission lock poisoned")
            .clone();
        let readiness = &self.admission.readiness;
        if self.is_seed && !answered && refused.is_empty() {
            readiness.admit("no other seed node answers: this node starts the cluster");
        } else if !refused.is_empty() {
            let refused: Vec<String> = refused
                .iter()
                .map(|(seed, why)| format!("{seed} ({why})"))
                .collect();
            readiness.not_admitted_because(&format!("refused by {}", refused.join("; ")));
        } else if !answered {
            let seeds: Vec<&str> = self.seeds.iter().map(|s| s.addr.as_str()).collect();
            readiness.not_admitted_because(&format!("no seed node answers ({})", seeds.join(", ")));
        } else {
            readiness.not_admitted_because("handshake with a seed node in progress");
        }
    }
}

struct SessionEvents {
    server: ActorRef<NodeServerMessage>,
    /// One per entity type: its allocation table and its announcements.
    announcers: Vec<Arc<Announcer>>,
    admission: Arc<Admission>,
    seeds: Vec<String>,
    last_incoming_refusal: Mutex<Option<Instant>>,
    wake: Arc<Notify>,
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
            admission.refused(&seed, admission.handshake_hint());
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
        self.wake.notify_one();
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
