//! Management HTTP: shard placement and membership, in the reference's shapes.
//!
//! - `GET /cluster/shards/{type}`: this node's shards and live entity counts,
//!   `{"regions":[{"shardId":"45","numEntities":1,"numStoredEntities":3,"processedOffset":17}, ...]}`
//!   (`type` is the group name; `numStoredEntities` includes passivated entities;
//!   `processedOffset` is where the next checkpoint commits to).
//! - `GET /cluster/members`: every known node and the shards the tables route to it (the first
//!   type's as `shards`, every type's under `entityTypes`).
//! - `GET /cluster/stats`: this node's counters, summed and per entity type (`entityTypes`).
//! - `GET /cluster/kafka-stats[/{type}]`: librdkafka's statistics of the (first) type's consumer
//!   (with `--statistics-interval-ms`).
//! - `GET /metrics`: Prometheus metrics (see `metrics`).
//! - `GET /cluster/query-link`: the query link other nodes open to this one (an HTTP/1.1
//!   upgrade; see `cluster::query_link`).
//! - `GET /alive`, `GET /ready`: liveness and readiness (see `readiness`), 200 or 503 with a
//!   JSON body saying why.
//! - `POST /entities/{type}/{id}`: asks entity `id` of `type` (its group) the query in the body,
//!   in the type's codec, from whichever node hosts it (`ask_bytes`); the reply is the body
//!   (same codec), `x-route` says where it came from. `GET` takes the query as `?query=` text
//!   (empty if absent: a protobuf query without fields). `?max_staleness_ms=N` lets a standby
//!   answer during a failover. Errors: 400 (bad id or query), 404 (type not hosted), 503 (no
//!   owner answered in time), 500 (the shard refused its stored state: the reason).
//!
//! The port answers from the moment the node binds it: while the node prepares its topics
//! (waiting, if need be, for its input topic to be created) it serves [`starting`]: `/alive`,
//! `/health`, `/ready` (503, saying what it waits for) and `/metrics` (no entity type's series
//! yet), 503 for the rest. A [`Switch`] then hands the same listener to [`router`]. So an
//! orchestrator's liveness probe does not restart a node that is only waiting, and Prometheus
//! sees it up.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tower::ServiceExt;

use crate::allocation::AllocationTable;
use crate::ask_bytes::{AskBytes, BytesAskError};
use crate::backpressure::InFlightGate;
use crate::cluster::endpoint::Endpoint;
use crate::cluster::membership::Membership;
use crate::cluster::peer_health::PeerHealth;
use crate::cluster::query_link;
use crate::lag::LagProbe;
use crate::metrics::{Metrics, MetricsRegistry, ScrapeInputs};
use crate::readiness::{Readiness, ReadyReport};
use crate::routing::{AskError, Consistency};
use crate::shard::HostedShards;
use crate::stats::{NodeStats, StatsSnapshot};

pub(crate) struct Management {
    pub node: String,
    /// The hosted entity types, in the order the application hosted them; the first answers
    /// the type-less views (`shards` at `/cluster/members`, `/cluster/kafka-stats`).
    pub types: Vec<TypeView>,
    pub membership: Arc<Membership>,
    pub gate: Arc<InFlightGate>,
    pub metrics: Arc<MetricsRegistry>,
    pub readiness: Arc<Readiness>,
    /// Every hosted type's endpoint, for the query link.
    pub endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    /// Whether the peers answer what this node forwards.
    pub peers: Arc<PeerHealth>,
}

/// What management shows of one hosted entity type.
pub(crate) struct TypeView {
    pub group: String,
    pub partitions: u32,
    pub local: Arc<dyn HostedShards>,
    pub table: Arc<AllocationTable>,
    pub stats: Arc<NodeStats>,
    pub metrics: Arc<Metrics>,
    pub lag: Arc<LagProbe>,
    /// librdkafka's latest statistics of this type's consumer (JSON; empty unless enabled).
    pub kafka_stats: Arc<std::sync::Mutex<String>>,
    /// Asks the type's entities with its codec's bytes.
    pub asker: Arc<dyn AskBytes>,
}

impl Management {
    /// The peers not answering that the tables still route to (one that left the cluster is
    /// no longer anybody's concern, whatever its last call did).
    fn peers_not_answering(&self) -> Vec<String> {
        let known: std::collections::BTreeSet<String> = self
            .types
            .iter()
            .flat_map(|view| view.table.members().into_keys())
            .collect();
        self.peers
            .not_answering()
            .iter()
            .filter(|node| known.contains(&***node))
            .map(|node| node.to_string())
            .collect()
    }

    fn view(&self, type_name: &str) -> Result<&TypeView, (StatusCode, String)> {
        self.types
            .iter()
            .find(|t| t.group == type_name)
            .ok_or_else(|| {
                let hosted: Vec<&str> = self.types.iter().map(|t| t.group.as_str()).collect();
                (
                    StatusCode::NOT_FOUND,
                    format!(
                        "no sharded type '{type_name}'; this node hosts {}",
                        hosted.join(", ")
                    ),
                )
            })
    }

    fn first(&self) -> &TypeView {
        &self.types[0]
    }
}

#[derive(Serialize)]
struct Region {
    #[serde(rename = "shardId")]
    shard_id: String,
    /// Live entities (as in the reference).
    #[serde(rename = "numEntities")]
    num_entities: usize,
    /// Entities with state in the shard, live or passivated.
    #[serde(rename = "numStoredEntities")]
    num_stored_entities: usize,
    /// Next offset after the events applied without a gap (absent before the first event).
    #[serde(rename = "processedOffset", skip_serializing_if = "Option::is_none")]
    processed_offset: Option<i64>,
}

#[derive(Serialize)]
struct Regions {
    regions: Vec<Region>,
}

/// `GET /cluster/members`, in Akka Management's shape (`selfNode`, `members` with `node`,
/// `nodeUid`, `status`, `roles`; `unreachable`, `leader`, `oldest`) with this runtime's fields
/// beside: a member's roles are the entity types it hosts, its shards are listed per type.
#[derive(Serialize)]
struct Members {
    #[serde(rename = "selfNode")]
    self_node: String,
    members: Vec<Member>,
    unreachable: Vec<Unreachable>,
    /// Peers whose last forwarded call went unanswered (timed out, no session), though they may
    /// still be members with a session open: a link cut without closing it.
    #[serde(rename = "notAnswering")]
    not_answering: Vec<String>,
    /// The first member that is up, in node order (as Akka orders addresses).
    leader: Option<String>,
    /// The member that is up and started first.
    oldest: Option<String>,
}

#[derive(Serialize)]
struct Member {
    node: String,
    /// This run of the node (its start time in ns): a restarted node has a new one.
    #[serde(rename = "nodeUid")]
    node_uid: String,
    /// `Up`, or `Leaving` while this node hands its shards off to stop.
    status: &'static str,
    roles: Vec<String>,
    connected: bool,
    /// Shards of the first hosted type (see `entityTypes` for every type's).
    #[serde(rename = "shardCount")]
    shard_count: usize,
    shards: Vec<u32>,
    #[serde(rename = "entityTypes")]
    entity_types: std::collections::BTreeMap<String, Vec<u32>>,
}

/// A node the tables still route to while no session to it is open.
#[derive(Serialize)]
struct Unreachable {
    node: String,
    #[serde(rename = "observedBy")]
    observed_by: Vec<String>,
}

/// `GET /cluster/stats`: the node's counters summed over its types, and each type's own.
#[derive(Serialize)]
struct Stats {
    node: String,
    /// Partitions and shards of the first hosted type.
    partitions: u32,
    shards: Vec<u32>,
    in_flight: usize,
    /// Actors alive in this process (ractor's registry): shards, entities, cluster plumbing.
    actors: usize,
    /// Summed over the hosted types.
    #[serde(flatten)]
    counters: StatsSnapshot,
    #[serde(rename = "entityTypes")]
    entity_types: std::collections::BTreeMap<String, TypeStats>,
}

#[derive(Serialize)]
struct TypeStats {
    partitions: u32,
    shards: Vec<u32>,
    #[serde(flatten)]
    counters: StatsSnapshot,
}

/// The management port's routes, replaced once the node is built (see the module's doc).
#[derive(Clone)]
pub(crate) struct Switch(Arc<RwLock<Router>>);

impl Switch {
    pub fn new(routes: Router) -> Self {
        Self(Arc::new(RwLock::new(routes)))
    }

    /// From now on requests go to `routes`.
    pub fn replace(&self, routes: Router) {
        *self.0.write().expect("routes lock poisoned") = routes;
    }

    /// What the listener serves: every request goes to the routes of the moment.
    pub fn router(&self) -> Router {
        let current = self.0.clone();
        Router::new().fallback(move |request: Request| {
            let routes = current.read().expect("routes lock poisoned").clone();
            async move {
                let answered: Result<Response, Infallible> = routes.oneshot(request).await;
                answered.unwrap_or_else(|never| match never {})
            }
        })
    }
}

/// A starting node's routes: alive, not ready (`status` says what it is doing), its metrics;
/// anything else 503.
pub(crate) fn starting(status: Arc<Mutex<String>>, metrics: Arc<MetricsRegistry>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/alive",
            get(|| async { Json(serde_json::json!({ "alive": true })) }),
        )
        .route(
            "/ready",
            get(move || {
                let status = status.lock().expect("status lock poisoned").clone();
                async move {
                    let report = ReadyReport {
                        ready: false,
                        reasons: vec![format!("starting: {status}")],
                    };
                    (StatusCode::SERVICE_UNAVAILABLE, Json(report))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render(0, 0);
                async move { openmetrics(body) }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the node is starting (see /ready)",
            )
        })
}

pub(crate) fn router(m: Arc<Management>) -> Router {
    Router::new()
        .route("/cluster/shards/{type_name}", get(shards))
        .route("/cluster/members", get(members))
        .route("/cluster/stats", get(stats))
        .route("/cluster/kafka-stats", get(kafka_stats))
        .route("/cluster/kafka-stats/{type_name}", get(kafka_stats_of))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/alive",
            get(|| async { Json(serde_json::json!({ "alive": true })) }),
        )
        .route("/ready", get(ready))
        .route(
            query_link::PATH,
            get(
                |State(m): State<Arc<Management>>, req: Request| async move {
                    query_link::accept(m.endpoints.clone(), req)
                },
            ),
        )
        .route(
            "/entities/{type_name}/{id}",
            get(ask_entity).post(ask_entity),
        )
        .with_state(m)
}

#[derive(serde::Deserialize)]
struct AskParams {
    /// The query as text (`GET`).
    query: Option<String>,
    max_staleness_ms: Option<u64>,
}

async fn ask_entity(
    State(m): State<Arc<Management>>,
    Path((type_name, id)): Path<(String, String)>,
    Query(params): Query<AskParams>,
    body: Bytes,
) -> Response {
    let view = match m.view(&type_name) {
        Ok(view) => view,
        Err(not_hosted) => return not_hosted.into_response(),
    };
    let query = match &params.query {
        Some(text) => text.as_bytes(),
        None => &body[..],
    };
    let consistency = match params.max_staleness_ms {
        Some(ms) => Consistency::BoundedStaleness(std::time::Duration::from_millis(ms)),
        None => Consistency::Strong,
    };
    match view.asker.ask_bytes(&id, query, consistency).await {
        Ok((reply, route)) => (
            [
                ("content-type", "application/octet-stream"),
                ("x-route", route.label()),
            ],
            reply,
        )
            .into_response(),
        Err(e) => {
            let status = match &e {
                BytesAskError::BadQuery(_) | BytesAskError::Ask(AskError::InvalidId(_)) => {
                    StatusCode::BAD_REQUEST
                }
                BytesAskError::Ask(AskError::StateRefused { .. })
                | BytesAskError::Unencodable(_) => StatusCode::INTERNAL_SERVER_ERROR,
                BytesAskError::Ask(AskError::Unavailable { .. } | AskError::NotRunning) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            (status, e.to_string()).into_response()
        }
    }
}

async fn ready(State(m): State<Arc<Management>>) -> Response {
    let report = m.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn shards(State(m): State<Arc<Management>>, Path(type_name): Path<String>) -> Response {
    let view = match m.view(&type_name) {
        Ok(view) => view,
        Err(not_hosted) => return not_hosted.into_response(),
    };
    let regions = view
        .local
        .entity_counts()
        .await
        .into_iter()
        .map(|(shard, counts)| Region {
            shard_id: shard.to_string(),
            num_entities: counts.live,
            num_stored_entities: counts.known,
            processed_offset: counts.processed_offset,
        })
        .collect();
    Json(Regions { regions }).into_response()
}

async fn metrics(State(m): State<Arc<Management>>) -> Response {
    for view in &m.types {
        let counts = view.local.entity_counts().await;
        let shards: Vec<u32> = counts.iter().map(|(id, _)| *id).collect();
        let lags = {
            let (lag, shards) = (view.lag.clone(), shards.clone());
            tokio::task::spawn_blocking(move || lag.lags(&shards)).await
        };
        let lags = match lags {
            Ok(Ok(lags)) => lags,
            Ok(Err(e)) => {
                tracing::warn!(
                    "consumer lag of {} not available for /metrics: {e}",
                    view.group
                );
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        view.metrics.refresh(&ScrapeInputs {
            shards: &shards,
            live_entities: counts.iter().map(|(_, c)| c.live).sum(),
            stored_entities: counts.iter().map(|(_, c)| c.known).sum(),
            lags: &lags,
        });
    }
    openmetrics(
        m.metrics
            .render(m.gate.in_flight(), m.peers_not_answering().len()),
    )
}

/// A `/metrics` answer: prometheus_client writes the OpenMetrics text format (`# EOF`
/// included).
fn openmetrics(body: String) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn members(State(m): State<Arc<Management>>) -> Response {
    use std::collections::BTreeMap;
    let peers = m.membership.peers().await;
    let mut by_node: BTreeMap<String, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
    let mut started: BTreeMap<String, u64> = BTreeMap::new();
    for peer in peers.iter().chain(std::iter::once(&m.node)) {
        by_node.entry(peer.clone()).or_default();
    }
    for view in &m.types {
        for (node, shards) in view.table.members() {
            by_node
                .entry(node)
                .or_default()
                .insert(view.group.clone(), shards.into_iter().collect());
        }
        for (node, incarnation) in view.table.incarnations() {
            let earliest = started.entry(node).or_insert(incarnation);
            *earliest = (*earliest).min(incarnation);
        }
    }
    let first = &m.first().group;
    let up = |node: &str| node == m.node || peers.iter().any(|p| p == node);
    let members: Vec<Member> = by_node
        .into_iter()
        .map(|(node, entity_types)| {
            let shards = entity_types.get(first).cloned().unwrap_or_default();
            let leaving = node == m.node && m.readiness.stopping();
            Member {
                node_uid: started.get(&node).map(u64::to_string).unwrap_or_default(),
                status: if leaving { "Leaving" } else { "Up" },
                roles: entity_types.keys().cloned().collect(),
                connected: up(&node),
                shard_count: shards.len(),
                shards,
                entity_types,
                node,
            }
        })
        .collect();
    let unreachable = members
        .iter()
        .filter(|member| !member.connected)
        .map(|member| Unreachable {
            node: member.node.clone(),
            observed_by: vec![m.node.clone()],
        })
        .collect();
    let up_members = || members.iter().filter(|member| member.connected);
    let leader = up_members().map(|member| member.node.clone()).min();
    let oldest = up_members()
        .filter_map(|member| Some((started.get(&member.node)?, &member.node)))
        .min()
        .map(|(_, node)| node.clone());
    Json(Members {
        self_node: m.node.clone(),
        members,
        unreachable,
        not_answering: m.peers_not_answering(),
        leader,
        oldest,
    })
    .into_response()
}

fn kafka_stats_body(view: &TypeView) -> Response {
    let body = view
        .kafka_stats
        .lock()
        .expect("stats lock poisoned")
        .clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn kafka_stats(State(m): State<Arc<Management>>) -> Response {
    kafka_stats_body(m.first())
}

async fn kafka_stats_of(
    State(m): State<Arc<Management>>,
    Path(type_name): Path<String>,
) -> Response {
    match m.view(&type_name) {
        Ok(view) => kafka_stats_body(view),
        Err(not_hosted) => not_hosted.into_response(),
    }
}

async fn stats(State(m): State<Arc<Management>>) -> Response {
    let mut counters = StatsSnapshot::default();
    let mut entity_types = std::collections::BTreeMap::new();
    for view in &m.types {
        let snapshot = view.stats.snapshot();
        counters += snapshot;
        entity_types.insert(
            view.group.clone(),
            TypeStats {
                partitions: view.partitions,
                shards: view.local.ids(),
                counters: snapshot,
            },
        );
    }
    let first = &entity_types[&m.first().group];
    Json(Stats {
        node: m.node.clone(),
        partitions: first.partitions,
        shards: first.shards.clone(),
        in_flight: m.gate.in_flight(),
        actors: ractor::registry::pid_registry::get_all_pids().len(),
        counters,
        entity_types,
    })
    .into_response()
}
