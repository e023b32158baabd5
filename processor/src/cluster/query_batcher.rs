//! Coalescing queries for the same peer into one ractor_cluster message.
//!
//! Every message to a peer passes through ractor_cluster's node-session and TCP-session actors
//! on both sides, which cost more than answering the query (the profile of a remote query load
//! is dominated by them: docs/BENCHMARKS.md). One sender task per peer gateway takes whatever
//! queries are waiting when it is free, up to [`MAX_BATCH`], and sends them as one
//! `TotalsBatch`. A lone query goes out at once, so nothing waits for a batch to fill.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ractor::{ActorId, ActorRef, ActorStatus};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::gateway::GatewayMsg;
use crate::cluster::wire::{TotalsAnswer, TotalsBatch, TotalsBatchAnswer, TotalsQuery};
use crate::metrics::Metrics;
use crate::routing::call_outcome;

/// Queries per message at most.
pub const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<TotalsAnswer, String>>;

pub struct QueryBatcher {
    peers: DashMap<ActorId, mpsc::UnboundedSender<(TotalsQuery, Reply)>>,
    call_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl QueryBatcher {
    pub fn new(call_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self { peers: DashMap::new(), call_timeout, metrics }
    }

    /// Asks `gateway` (a peer's) for one user's totals.
    pub async fn ask(&self, gateway: &ActorRef<GatewayMsg>, query: TotalsQuery) -> Result<TotalsAnswer, String> {
        let (reply, answer) = oneshot::channel();
        let queue = self
            .peers
            .entry(gateway.get_id())
            .or_insert_with(|| {
                let (queue, waiting) = mpsc::unbounded_channel();
                tokio::spawn(send_batches(gateway.clone(), waiting, self.call_timeout, self.metrics.clone()));
                queue
            })
            .clone();
        if queue.send((query, reply)).is_err() {
            // The peer's sender ended (its gateway stopped): the next query starts a new one.
            self.peers.remove(&gateway.get_id());
            return Err("the peer's gateway is gone".into());
        }
        answer.await.unwrap_or_else(|_| Err("the query was dropped".into()))
    }
}

/// One peer's sender: a batch of whatever is waiting, one call each, until the gateway stops.
async fn send_batches(
    gateway: ActorRef<GatewayMsg>,
    mut waiting: mpsc::UnboundedReceiver<(TotalsQuery, Reply)>,
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
        let (queries, replies): (Vec<TotalsQuery>, Vec<Reply>) = batch.into_iter().unzip();
        let peer = gateway.clone();
        tokio::spawn(async move {
            let answer = peer.call(|reply| GatewayMsg::TotalsBatch(TotalsBatch { queries }, reply), Some(timeout)).await;
            match call_outcome(answer) {
                Ok(TotalsBatchAnswer { answers }) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Ok(TotalsBatchAnswer { answers }) => {
                    let error = format!("the peer answered {} of {} queries", answers.len(), replies.len());
                    replies.into_iter().for_each(|r| drop(r.send(Err(error.clone()))));
                }
                Err(error) => replies.into_iter().for_each(|r| drop(r.send(Err(error.clone())))),
            }
        });
        if gateway.get_status() == ActorStatus::Stopped {
            return;
        }
    }
}
