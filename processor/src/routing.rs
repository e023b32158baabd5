//! Reaching a shard wherever it lives: locally through the shard actor, remotely with one
//! ractor_cluster hop to the owner's gateway. Used by the gRPC front end. (Events whose key
//! belongs elsewhere travel through Kafka instead: see `shard::Reroute`.)
//!
//! Every call has a timeout. While a shard has no known owner, or the node asked says it is not
//! (or no longer) the owner, the caller waits for the allocation table to change, up to a bound.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{ActorRef, MessagingErr};

use crate::allocation::{AllocationTable, Owner};
use crate::cluster::gateway::{self, GatewayMsg};
use crate::cluster::query_batcher::QueryBatcher;
use crate::cluster::wire::{totals_answer, TotalsAnswer, TotalsQuery};
use crate::entity::{Totals, UserId};
use crate::metrics::Metrics;
use crate::shard::{LocalShards, ShardMsg};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("shard {shard} has no reachable owner after waiting {waited_ms} ms (a rebalance may be in progress){}", last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    Unavailable {
        shard: u32,
        waited_ms: u64,
        last_error: Option<String>,
    },
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Remote,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Remote => "remote",
        }
    }
}

/// What one attempt at the presumed owner gave.
pub enum Attempt<T> {
    Done(T),
    /// The node does not hold the shard (yet, or any more): wait for the table to move.
    NotOwner,
    /// The call failed (timeout, peer gone, error answer): try again until the deadline.
    Failed(String),
}

pub struct Router {
    partitions: u32,
    table: Arc<AllocationTable>,
    local: Arc<LocalShards>,
    owner_wait: Duration,
    call_timeout: Duration,
    batcher: QueryBatcher,
}

impl Router {
    pub fn new(
        partitions: u32,
        table: Arc<AllocationTable>,
        local: Arc<LocalShards>,
        owner_wait: Duration,
        call_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            partitions,
            table,
            local,
            owner_wait,
            call_timeout,
            batcher: QueryBatcher::new(call_timeout, metrics),
        }
    }

    pub fn shard_of(&self, user_id: &str) -> u32 {
        proto::partitioner::partition_for_key(user_id.as_bytes(), self.partitions)
    }

    /// A user's totals, from whichever node hosts the user's shard, and where they came from.
    pub async fn totals(&self, user_id: &str) -> Result<(Totals, Route), RouteError> {
        let shard = self.shard_of(user_id);
        self.with_owner(
            shard,
            || self.local_totals(shard, user_id),
            |gw| async move {
                let query = TotalsQuery {
                    user_id: user_id.to_owned(),
                    shard,
                };
                match self.batcher.ask(&gw, query).await {
                    Ok(TotalsAnswer {
                        result: Some(totals_answer::Result::Totals(t)),
                    }) => Attempt::Done(Totals {
                        purchases: t.purchases,
                        amount_spent: t.amount_spent,
                    }),
                    Ok(TotalsAnswer {
                        result: Some(totals_answer::Result::NotOwner(_)),
                    }) => Attempt::NotOwner,
                    Ok(TotalsAnswer {
                        result: Some(totals_answer::Result::Error(e)),
                    }) => Attempt::Failed(e),
                    Ok(TotalsAnswer { result: None }) => Attempt::Failed("empty answer".into()),
                    Err(e) => Attempt::Failed(e),
                }
            },
        )
        .await
    }

    /// Totals from a shard hosted here; `NotOwner` if this node does not host it.
    pub async fn local_totals(&self, shard: u32, user_id: &str) -> Attempt<Totals> {
        let Some(local) = self.local.get(shard) else {
            return Attempt::NotOwner;
        };
        let user_id = UserId::from(user_id);
        let answer = local
            .actor
            .call(
                |reply| ShardMsg::Query { user_id, reply },
                Some(self.call_timeout),
            )
            .await;
        local_outcome(answer)
    }

    /// Runs `local` or `remote` against the shard's current owner until one answers, waiting
    /// for the table to change while there is no owner, up to `owner_wait`.
    async fn with_owner<T, L, LF, R, RF>(
        &self,
        shard: u32,
        local: L,
        remote: R,
    ) -> Result<(T, Route), RouteError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Attempt<T>>,
        R: Fn(ActorRef<GatewayMsg>) -> RF,
        RF: Future<Output = Attempt<T>>,
    {
        let started = Instant::now();
        let deadline = started + self.owner_wait;
        let mut changes = self.table.subscribe();
        let mut last_error = None;
        loop {
            changes.mark_unchanged();
            let (attempt, route) = match self.table.owner(shard) {
                Some(Owner::Local) => (local().await, Route::Local),
                Some(Owner::Remote(node)) => match gateway::of_node(&node) {
                    Some(gw) => (remote(gw).await, Route::Remote),
                    None => (
                        Attempt::Failed(format!("no gateway known for node {node}")),
                        Route::Remote,
                    ),
                },
                None => (Attempt::NotOwner, Route::Local),
            };
            match attempt {
                Attempt::Done(value) => return Ok((value, route)),
                Attempt::NotOwner => {}
                Attempt::Failed(e) => last_error = Some(e),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RouteError::Unavailable {
                    shard,
                    waited_ms: started.elapsed().as_millis() as u64,
                    last_error,
                });
            }
            // Retry on a table change, or after a short pause (a failed call may recover).
            let pause = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(pause, changes.changed()).await;
        }
    }
}

pub(crate) fn call_outcome<T>(
    result: Result<CallResult<T>, MessagingErr<GatewayMsg>>,
) -> Result<T, String> {
    match result {
        Ok(CallResult::Success(value)) => Ok(value),
        Ok(CallResult::Timeout) => Err("remote call timed out".into()),
        Ok(CallResult::SenderError) => Err("remote node dropped the call".into()),
        Err(e) => Err(format!("remote node unreachable: {e}")),
    }
}

fn local_outcome<T>(result: Result<CallResult<T>, MessagingErr<ShardMsg>>) -> Attempt<T> {
    match result {
        Ok(CallResult::Success(value)) => Attempt::Done(value),
        Ok(CallResult::Timeout) => Attempt::Failed("local shard timed out".into()),
        // The shard stopped (handed off) while the call was in flight.
        Ok(CallResult::SenderError) | Err(_) => Attempt::NotOwner,
    }
}
