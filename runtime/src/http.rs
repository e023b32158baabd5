//! Management HTTP: shard placement and membership, in the reference's shapes.
//!
//! - `GET /cluster/shards/{type}`: this node's shards and live entity counts,
//!   `{"regions":[{"shardId":"45","numEntities":1,"numStoredEntities":3,"processedOffset":17}, ...]}`
//!   (`type` is the group name; `numStoredEntities` includes passivated entities;
//!   `processedOffset` is where the next checkpoint commits to).
//! - `GET /cluster/members`: every known node and the shards the table routes to it.
//! - `GET /cluster/stats`: this node's counters.
//! - `GET /cluster/kafka-stats`: librdkafka's consumer statistics (with `--statistics-interval-ms`).
//! - `GET /metrics`: Prometheus metrics (see `metrics`).
//! - `GET /alive`, `GET /ready`: liveness and readiness (see `readiness`), 200 or 503 with a
//!   JSON body saying why.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::allocation::AllocationTable;
use crate::backpressure::InFlightGate;
use crate::cluster::membership::Membership;
use crate::lag::LagProbe;
use crate::metrics::{Metrics, ScrapeInputs};
use crate::readiness::Readiness;
use crate::shard::HostedShards;
use crate::stats::{NodeStats, StatsSnapshot};

pub(crate) struct Management {
    /// librdkafka's latest consumer statistics (JSON; empty unless enabled).
    pub kafka_stats: Arc<std::sync::Mutex<String>>,
    pub group: String,
    pub node: String,
    pub partitions: u32,
    pub local: Arc<dyn HostedShards>,
    pub table: Arc<AllocationTable>,
    pub membership: Arc<Membership>,
    pub stats: Arc<NodeStats>,
    pub gate: Arc<InFlightGate>,
    pub metrics: Arc<Metrics>,
    pub lag: LagProbe,
    pub readiness: Arc<Readiness>,
}

#[derive(Serialize)]
struct Region {
    #[serde(rename = "shardId")]
    shard_id: String,
    /// Live entity actors (as in the reference).
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

#[derive(Serialize)]
struct Member {
    node: String,
    connected: bool,
    #[serde(rename = "shardCount")]
    shard_count: usize,
    shards: Vec<u32>,
}

#[derive(Serialize)]
struct Members {
    #[serde(rename = "self")]
    this_node: String,
    members: Vec<Member>,
}

#[derive(Serialize)]
struct Stats {
    node: String,
    partitions: u32,
    shards: Vec<u32>,
    in_flight: usize,
    /// Actors alive in this process (ractor's registry): shards, entities, cluster plumbing.
    actors: usize,
    #[serde(flatten)]
    counters: StatsSnapshot,
}

pub(crate) fn router(m: Arc<Management>) -> Router {
    Router::new()
        .route("/cluster/shards/{type_name}", get(shards))
        .route("/cluster/members", get(members))
        .route("/cluster/stats", get(stats))
        .route("/cluster/kafka-stats", get(kafka_stats))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/alive",
            get(|| async { Json(serde_json::json!({ "alive": true })) }),
        )
        .route("/ready", get(ready))
        .with_state(m)
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
    if type_name != m.group {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "no sharded type '{type_name}'; this cluster hosts '{}'",
                m.group
            ),
        )
            .into_response();
    }
    let regions = m
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
    let counts = m.local.entity_counts().await;
    let shards: Vec<u32> = counts.iter().map(|(id, _)| *id).collect();
    let lags = {
        let (m, shards) = (m.clone(), shards.clone());
        tokio::task::spawn_blocking(move || m.lag.lags(&shards)).await
    };
    let lags = match lags {
        Ok(Ok(lags)) => lags,
        Ok(Err(e)) => {
            tracing::warn!("consumer lag not available for /metrics: {e}");
            Vec::new()
        }
        Err(_) => Vec::new(),
    };
    let body = m.metrics.render(&ScrapeInputs {
        shards: &shards,
        live_entities: counts.iter().map(|(_, c)| c.live).sum(),
        stored_entities: counts.iter().map(|(_, c)| c.known).sum(),
        in_flight: m.gate.in_flight(),
        lags: &lags,
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn members(State(m): State<Arc<Management>>) -> Response {
    let peers = m.membership.peers().await;
    let mut by_node = m.table.members();
    for peer in &peers {
        by_node.entry(peer.clone()).or_default();
    }
    let members = by_node
        .into_iter()
        .map(|(node, shards)| Member {
            connected: node == m.node || peers.contains(&node),
            shard_count: shards.len(),
            shards: shards.into_iter().collect(),
            node,
        })
        .collect();
    Json(Members {
        this_node: m.node.clone(),
        members,
    })
    .into_response()
}

async fn kafka_stats(State(m): State<Arc<Management>>) -> Response {
    let body = m.kafka_stats.lock().expect("stats lock poisoned").clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn stats(State(m): State<Arc<Management>>) -> Response {
    Json(Stats {
        node: m.node.clone(),
        partitions: m.partitions,
        shards: m.local.ids(),
        in_flight: m.gate.in_flight(),
        actors: ractor::registry::pid_registry::get_all_pids().len(),
        counters: m.stats.snapshot(),
    })
    .into_response()
}
