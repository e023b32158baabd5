//! Coalescing queries for the same peer into one ractor_cluster message.
//!
//! Every message to a peer passes through ractor_cluster's node-session and TCP-session actors
//! on both sides, which cost more than answering the query (the profile of a remote query load
//! is dominated by them: docs/BENCHMARKS.md). While queries to a peer are outstanding, new ones
//! queue for that peer's sender task, which takes whatever is waiting when it is free, up to
//! [`MAX_BATCH`], and sends it as one `QueryBatch`. A query to a peer with nothing outstanding
//! is sent from the caller's own task: there is nothing to batch it with, and going through the
//! sender and a call task cost two more thread hand-offs per query (counted: docs/BENCHMARKS.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ractor::{ActorId, ActorRef, ActorStatus};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::endpoint::{call_outcome, CallError};
use crate::cluster::gateway::GatewayMsg;
use crate::cluster::wire::{EntityAnswer, EntityQuery, QueryBatch, QueryBatchAnswer};
use crate::metrics::Metrics;

/// Queries per message at most.
pub(crate) const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<EntityAnswer, CallError>>;

/// One peer's queue (served by its sender task) and its queries outstanding.
#[derive(Clone)]
struct Peer {
    queue: mpsc::UnboundedSender<(EntityQuery, Reply)>,
    outstanding: Arc<AtomicUsize>,
}

/// Counts a query as outstanding for as long as it lives (also when the caller gives up).
struct Outstanding(Arc<AtomicUsize>);

impl Outstanding {
    /// Registers a query; returns whether it is the only one outstanding.
    fn register(counter: &Arc<AtomicUsize>) -> (Self, bool) {
        let alone = counter.fetch_add(1, Ordering::SeqCst) == 0;
        (Self(counter.clone()), alone)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct QueryBatcher {
    peers: DashMap<ActorId, Peer>,
    call_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl QueryBatcher {
    pub fn new(call_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            peers: DashMap::new(),
            call_timeout,
            metrics,
        }
    }

    /// Asks `gateway` (a peer's) one query.
    pub async fn ask(
        &self,
        gateway: &ActorRef<GatewayMsg>,
        query: EntityQuery,
    ) -> Result<EntityAnswer, CallError> {
        let peer = self
            .peers
            .entry(gateway.get_id())
            .or_insert_with(|| {
                let (queue, waiting) = mpsc::unbounded_channel();
                tokio::spawn(send_batches(
                    gateway.clone(),
                    waiting,
                    self.call_timeout,
                    self.metrics.clone(),
                ));
                Peer {
                    queue,
                    outstanding: Arc::new(AtomicUsize::new(0)),
                }
            })
            .clone();
        let (_outstanding, alone) = Outstanding::register(&peer.outstanding);
        if alone {
            self.metrics.remote_query_batch.observe(1.0);
            let mut answers = ask_gateway(gateway, vec![query], self.call_timeout).await?;
            return answers
                .pop()
                .ok_or_else(|| CallError::Remote("the peer answered no query".into()));
        }
        let (reply, answer) = oneshot::channel();
        if peer.queue.send((query, reply)).is_err() {
            // The peer's sender ended (its gateway stopped): the next query starts a new one.
            self.peers.remove(&gateway.get_id());
            return Err(CallError::Unreachable("the peer's gateway is gone".into()));
        }
        answer.await.unwrap_or(Err(CallError::Dropped))
    }
}

/// One peer's sender: a batch of whatever is waiting, one call each, until the gateway stops.
async fn send_batches(
    gateway: ActorRef<GatewayMsg>,
    mut waiting: mpsc::UnboundedReceiver<(EntityQuery, Reply)>,
    timeout: Duration,
    metrics: Arc<Metrics>,
) {
    while let Some(first) = waiting.recv().await {
        // Let the other runnable tasks (gRPC requests being decoded) queue their queries first:
        // without this the sender is always ready first and sends batches of one.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        metrics.remote_query_batch.observe(batch.len() as f64);
        let (queries, replies): (Vec<EntityQuery>, Vec<Reply>) = batch.into_iter().unzip();
        let peer = gateway.clone();
        tokio::spawn(async move {
            match ask_gateway(&peer, queries, timeout).await {
                Ok(answers) => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(error) => replies
                    .into_iter()
                    .for_each(|r| drop(r.send(Err(error.clone())))),
            }
        });
        if gateway.get_status() == ActorStatus::Stopped {
            return;
        }
    }
}

/// One `QueryBatch` call: the answers in the queries' order, or why there are none.
async fn ask_gateway(
    gateway: &ActorRef<GatewayMsg>,
    queries: Vec<EntityQuery>,
    timeout: Duration,
) -> Result<Vec<EntityAnswer>, CallError> {
    let asked = queries.len();
    let answer = gateway
        .call(
            |reply| GatewayMsg::QueryBatch(QueryBatch { queries }, reply),
            Some(timeout),
        )
        .await;
    let QueryBatchAnswer { answers } = call_outcome(answer)?;
    if answers.len() != asked {
        return Err(CallError::Remote(format!(
            "the peer answered {} of {asked} queries",
            answers.len()
        )));
    }
    Ok(answers)
}
