//! Reaching an entity wherever its shard lives: locally through the shard actor, remotely with
//! one hop to the owner (over the query link to its management port, or through ractor_cluster
//! to its gateway: `cluster::query_link`; the query and reply as bytes of the entity type's
//! codec). (Records whose key belongs elsewhere travel through Kafka instead: see
//! `shard::Reroute`.)
//!
//! A command goes to its shard the same way: through the shard actor when the shard is here,
//! over the query link to the owner otherwise, and is written to the input topic when neither
//! takes it (`commands`).
//!
//! Every call has a timeout. While a shard has no known owner, or the node asked says it is not
//! (or no longer) the owner, the caller waits for the allocation table to change, up to a bound.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ractor::rpc::CallResult;
use ractor::MessagingErr;

use crate::allocation::{AllocationTable, Owner};
use crate::cluster::endpoint::{CallError, Endpoint};
use crate::cluster::gateway;
use crate::cluster::peer_health::PeerHealth;
use crate::cluster::query_batcher::QueryBatcher;
use crate::cluster::query_link::QueryLinks;
use crate::cluster::wire::{
    command_answer, command_outcome, entity_answer, CommandAnswer, CommandOutcome, EntityAnswer,
    EntityCommand, EntityQuery, NotOwner, StandbyReply,
};
use crate::commands::{CommandError, Direct, DirectCommand};
use crate::entity::{Codec, EncodeError, Entity, EntityId, MAX_ID_BYTES};
use crate::metrics::Metrics;
use crate::partitioner::partition_for_key;
use crate::shard::{LocalShards, ShardMsg};
use crate::standby::{standby_nodes, Staleness, Standbys};

/// Why a query was not answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AskError {
    /// The id is empty or longer than [`MAX_ID_BYTES`].
    #[error("entity id must be 1 to {MAX_ID_BYTES} bytes, got {0}")]
    InvalidId(usize),
    /// The node is not running yet ([`crate::Node::run`] starts the routing).
    #[error("the node is not running yet")]
    NotRunning,
    /// No node answered for the entity's shard within the bound (a rebalance may be in
    /// progress, or its owner is unreachable).
    #[error("shard {shard} has no reachable owner after waiting {waited_ms} ms (a rebalance may be in progress){}", last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    Unavailable {
        /// The entity's shard.
        shard: u32,
        /// How long the query waited.
        waited_ms: u64,
        /// The last failed attempt, if any.
        last_error: Option<CallError>,
    },
    /// The entity's shard refused its changelog state (a state this build of the application
    /// cannot read): it answers nothing until a build that reads it runs, rather than answer
    /// from an older or default state.
    #[error("shard {shard} cannot answer: {reason}")]
    StateRefused {
        /// The entity's shard.
        shard: u32,
        /// Where the unreadable state is and why it does not read.
        reason: String,
    },
}

impl AskError {
    /// The gRPC status a front end answers with: `INVALID_ARGUMENT` for a bad id (`what` names
    /// it: "user id"), `FAILED_PRECONDITION` for a refused shard, `UNAVAILABLE` for the rest.
    pub fn to_status(&self, what: &str) -> tonic::Status {
        match self {
            Self::InvalidId(0) => {
                tonic::Status::invalid_argument(format!("{what} must not be empty"))
            }
            Self::InvalidId(len) => tonic::Status::invalid_argument(format!(
                "{what} is {len} bytes; at most {MAX_ID_BYTES} are allowed"
            )),
            Self::Unavailable { .. } | Self::NotRunning => {
                tonic::Status::unavailable(self.to_string())
            }
            Self::StateRefused { .. } => tonic::Status::failed_precondition(self.to_string()),
        }
    }
}

/// How fresh an answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// From the entity's owner only: every event applied so far is in the answer. While the
    /// shard has no reachable owner (a failover) the query waits, up to the node's bound.
    #[default]
    Strong,
    /// From the owner, or else (no owner answers: a failover) from a standby replica whose
    /// state is at most this far behind the owner's committed state ([`Route::Standby`] says
    /// how far it is).
    BoundedStaleness(Duration),
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// From a shard on the node asked.
    Local,
    /// From the shard's owner, one hop away.
    Remote,
    /// From a standby replica ([`Consistency::BoundedStaleness`] only), on this node or
    /// another.
    Standby(Staleness),
}

impl Route {
    /// `local`, `remote` or `standby`, as in metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Remote => "remote",
            Route::Standby(_) => "standby",
        }
    }
}

/// How much longer than its own command bound a node waits for a command it forwarded: the
/// owner answers by its bound (`--command-timeout-ms`, the same on every node), and that
/// definite answer should not be cut off by the link's wait.
const FORWARD_GRACE: Duration = Duration::from_millis(500);

/// What one attempt at the presumed owner gave.
pub(crate) enum Attempt<T> {
    Done(T),
    /// The node does not hold the shard (yet, or any more): wait for the table to move.
    NotOwner,
    /// The call failed (timeout, peer gone, error answer): try again until the deadline.
    Failed(CallError),
    /// The owner refused the shard's state (why): a definite answer.
    Refused(String),
}

/// Routes the queries of one entity type.
pub(crate) struct Router<E: Entity> {
    /// The type's name between nodes.
    pub entity_type: Arc<str>,
    pub partitions: u32,
    pub table: Arc<AllocationTable>,
    pub local: Arc<LocalShards<E>>,
    /// How long a query waits for its shard to have a reachable owner.
    pub owner_wait: Duration,
    /// Timeout of one call to a shard or a peer.
    pub call_timeout: Duration,
    pub batcher: Arc<QueryBatcher>,
    /// The query links to peers (tried before the session).
    pub links: Arc<QueryLinks>,
    /// Whether the peers answer (said once when one stops, once when it answers again).
    pub peers: Arc<PeerHealth>,
    pub metrics: Arc<Metrics>,
    /// This node's standby replicas, for reads that allow staleness.
    pub standbys: Arc<Standbys<E>>,
    /// Writes the type's commands and waits for their answers.
    pub commands: crate::commands::CommandSender,
}

impl<E: Entity> Router<E> {
    /// Answers `query` for entity `id` from whichever node hosts its shard (or, as
    /// `consistency` allows, a standby replica); timed by route and outcome.
    pub async fn ask(
        &self,
        id: &str,
        query: E::Query,
        consistency: Consistency,
    ) -> Result<(E::Reply, Route), AskError> {
        let started = Instant::now();
        let standby_within = match consistency {
            Consistency::Strong => None,
            Consistency::BoundedStaleness(bound) => Some(bound),
        };
        let answer = self.ask_owner(id, query, standby_within).await;
        let (route, outcome) = match &answer {
            Ok((_, route)) => (route.label(), "ok"),
            Err(AskError::InvalidId(_)) => ("none", "invalid_argument"),
            Err(AskError::Unavailable { .. } | AskError::NotRunning) => ("none", "unavailable"),
            Err(AskError::StateRefused { .. }) => ("none", "refused"),
        };
        self.metrics
            .observe_query(route, outcome, started.elapsed());
        answer
    }

    /// Sends the command `value` for entity `id` and waits for its committed answer. Run
    /// without a record wherever it can be (`commands::direct`): by this node's shard when the
    /// entity's shard is here, else forwarded over the query link to the owner the table names;
    /// else (no link, nobody owns it now, or the shard declines) written as a record of the
    /// input topic for its owner to read.
    /// Timed by path and outcome.
    pub async fn command(
        &self,
        id: &str,
        value: Vec<u8>,
        idempotency_key: Option<&str>,
    ) -> Result<CommandOutcome, CommandError> {
        let started = Instant::now();
        let (path, ran) = self.route_command(id, value, idempotency_key).await;
        let outcome = match &ran {
            Ok(CommandOutcome {
                result: Some(command_outcome::Result::Reply(_)),
            }) => "ok",
            Ok(CommandOutcome {
                result: Some(command_outcome::Result::Refused(_)),
            }) => "refused",
            Ok(_) | Err(CommandError::Refused(_) | CommandError::Failed(_)) => "failed",
            Err(CommandError::InvalidId(_) | CommandError::InvalidKey(_)) => "invalid_argument",
            Err(CommandError::Unavailable(_) | CommandError::NotRunning) => "unavailable",
        };
        self.metrics
            .observe_command(path, outcome, started.elapsed());
        ran
    }

    /// [`Self::command`] without the timing: the path it took (`none` when refused before it
    /// went anywhere) and what came of it.
    async fn route_command(
        &self,
        id: &str,
        value: Vec<u8>,
        idempotency_key: Option<&str>,
    ) -> (&'static str, Result<CommandOutcome, CommandError>) {
        if let Err(invalid) = crate::commands::check(id, idempotency_key) {
            return ("none", Err(invalid));
        }
        let shard = partition_for_key(id.as_bytes(), self.partitions);
        if let Some(ran) = self.command_here(shard, id, &value, idempotency_key).await {
            return ("direct", ran);
        }
        if let Some(ran) = self
            .command_at_owner(shard, id, &value, idempotency_key)
            .await
        {
            return ("forwarded", ran);
        }
        (
            "record",
            self.commands.send(id, value, idempotency_key).await,
        )
    }

    /// Runs a command at `shard` if it is here and takes it; `None` if not (not here, or
    /// declined: restoring, refused, handing off, nothing consumed yet).
    async fn command_here(
        &self,
        shard: u32,
        id: &str,
        value: &[u8],
        idempotency_key: Option<&str>,
    ) -> Option<Result<CommandOutcome, CommandError>> {
        let local = self.local.get(shard)?;
        let timeout = self.commands.timeout();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let command = DirectCommand {
            id: id.into(),
            value: value.to_vec(),
            idempotency_key: idempotency_key.map(str::to_owned),
            answer,
        };
        local
            .actor
            .cast(ShardMsg::Command(Box::new(command)))
            .ok()?;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(Direct::Answered(outcome))) => Some(Ok(outcome)),
            Ok(Ok(Direct::Declined)) => None,
            Ok(Err(_)) => Some(Err(CommandError::Unavailable(format!(
                "shard {shard} stopped before the command's change committed"
            )))),
            Err(_) => Some(Err(CommandError::Unavailable(format!(
                "no answer within {} ms",
                timeout.as_millis()
            )))),
        }
    }

    /// Has the owner the table names for `shard`, on another node, run the command over the
    /// query link; `None` if there is no link to it, or it declined, or the link broke under a
    /// command with an idempotency key (then the record is safe: a command the owner did run
    /// is answered from the key's first answer, and one it did not is run once by whoever
    /// reads the record; without a key a second run could apply it twice, so the caller is
    /// told the outcome is unknown).
    async fn command_at_owner(
        &self,
        shard: u32,
        id: &str,
        value: &[u8],
        idempotency_key: Option<&str>,
    ) -> Option<Result<CommandOutcome, CommandError>> {
        use command_answer::Result as R;
        let Some(Owner::Remote(node)) = self.table.owner(shard) else {
            return None;
        };
        let url = self.table.management_url(&node)?;
        let command = EntityCommand {
            entity_type: self.entity_type.to_string(),
            id: id.to_owned(),
            shard,
            command: value.to_vec(),
            idempotency_key: idempotency_key.map(str::to_owned),
        };
        // The owner's own bound comes first, so its definite answer is not cut off here.
        let timeout = self.commands.timeout() + FORWARD_GRACE;
        let unavailable = |why: String| Some(Err(CommandError::Unavailable(why)));
        let answer = self.links.command(&url, command, timeout).await;
        match &answer {
            Ok(Ok(_)) => self.peers.answered(&node),
            Ok(Err(e)) => self.peers.failed(&node, e),
            Err(_not_linked) => {}
        }
        match answer {
            Err(_not_linked) => None,
            Ok(Ok(CommandAnswer { result })) => match result {
                Some(R::Outcome(outcome)) => Some(Ok(outcome)),
                Some(R::Declined(_)) => None,
                Some(R::Unavailable(why)) => unavailable(format!("at node {node}: {why}")),
                None => unavailable(format!("node {node} gave an empty answer")),
            },
            Ok(Err(CallError::Timeout)) => unavailable(format!(
                "node {node} gave no answer within {} ms",
                timeout.as_millis()
            )),
            Ok(Err(_broken)) if idempotency_key.is_some() => None,
            Ok(Err(e)) => unavailable(format!("forwarded to node {node}: {e}")),
        }
    }

    /// Asks the owner until it answers; with `standby_within`, after each failed attempt at the
    /// owner also the shard's standby replicas.
    async fn ask_owner(
        &self,
        id: &str,
        query: E::Query,
        standby_within: Option<Duration>,
    ) -> Result<(E::Reply, Route), AskError> {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(AskError::InvalidId(id.len()));
        }
        let shard = partition_for_key(id.as_bytes(), self.partitions);
        // Encoded once, only if a remote attempt needs it.
        let encoded = std::sync::OnceLock::new();
        let encode = || {
            encoded
                .get_or_init(|| <E::Codec as Codec<E::Query>>::encode(&query))
                .clone()
        };
        self.with_owner(
            shard,
            || self.local_ask(shard, id, query.clone()),
            |node| {
                let bytes = encode();
                async move {
                    let bytes = match bytes {
                        Ok(bytes) => bytes,
                        Err(e) => return Attempt::Failed(CallError::Unencodable(e)),
                    };
                    let asked = self.entity_query(shard, id, bytes, None);
                    match self.ask_peer(&node, asked).await.map(|a| a.result) {
                        Ok(Some(entity_answer::Result::Reply(bytes))) => {
                            match <E::Codec as Codec<E::Reply>>::decode(&bytes) {
                                Ok(reply) => Attempt::Done(reply),
                                Err(e) => Attempt::Failed(e.into()),
                            }
                        }
                        Ok(Some(
                            entity_answer::Result::NotOwner(_) | entity_answer::Result::Standby(_),
                        )) => Attempt::NotOwner,
                        Ok(Some(entity_answer::Result::Error(e))) => {
                            Attempt::Failed(CallError::Remote(e))
                        }
                        Ok(Some(entity_answer::Result::Refused(why))) => Attempt::Refused(why),
                        Ok(None) => Attempt::Failed(CallError::Remote("empty answer".into())),
                        Err(e) => Attempt::Failed(e),
                    }
                }
            },
            |owner| {
                let (query, encode) = (&query, &encode);
                async move {
                    match standby_within {
                        Some(bound) => {
                            self.standby_ask(shard, id, query, owner, bound, encode)
                                .await
                        }
                        None => None,
                    }
                }
            },
        )
        .await
    }

    fn entity_query(
        &self,
        shard: u32,
        id: &str,
        query: Vec<u8>,
        standby_within: Option<Duration>,
    ) -> EntityQuery {
        EntityQuery {
            entity_type: self.entity_type.to_string(),
            id: id.to_owned(),
            shard,
            query,
            standby_within_ms: standby_within.map(|d| d.as_millis() as u64),
        }
    }

    /// Asks the standby replicas of `shard` (where the placement puts them: see `standby`) in
    /// turn, for an answer at most `bound` behind; `owner` is the shard's owner in the table,
    /// if any (a departed owner is no longer a member, which leaves the placement of the
    /// others as it was).
    async fn standby_ask(
        &self,
        shard: u32,
        id: &str,
        query: &E::Query,
        owner: Option<Arc<str>>,
        bound: Duration,
        encode: &impl Fn() -> Result<Vec<u8>, EncodeError>,
    ) -> Option<(E::Reply, Route)> {
        let members = self.table.members();
        let owner = owner.unwrap_or_else(|| Arc::from(""));
        let local = self.table.local_node().clone();
        for node in standby_nodes(
            shard,
            &owner,
            members.keys().map(String::as_str),
            self.standbys.replicas(),
        ) {
            if *node == *local {
                if let Some((reply, staleness)) = self.standby_local(shard, id, query, bound) {
                    return Some((reply, Route::Standby(staleness)));
                }
                continue;
            }
            let Ok(query) = encode() else {
                return None;
            };
            let asked = self.entity_query(shard, id, query, Some(bound));
            if let Ok(Some(entity_answer::Result::Standby(answer))) =
                self.ask_peer(node, asked).await.map(|a| a.result)
            {
                if let Ok(reply) = <E::Codec as Codec<E::Reply>>::decode(&answer.reply) {
                    return Some((
                        reply,
                        Route::Standby(Staleness {
                            records: answer.lag_records,
                            behind: Duration::from_millis(answer.behind_ms),
                        }),
                    ));
                }
            }
        }
        None
    }

    /// The answer of this node's standby of `shard`, if it keeps one at most `bound` behind.
    fn standby_local(
        &self,
        shard: u32,
        id: &str,
        query: &E::Query,
        bound: Duration,
    ) -> Option<(E::Reply, Staleness)> {
        let (state, staleness) = self.standbys.read(shard, id)?;
        (staleness.behind <= bound).then(|| (E::query(&state, query), staleness))
    }

    /// One query to `node`: over the query link when it can be asked that way, else (or
    /// when its port did not take the link) through its gateway.
    async fn ask_peer(&self, node: &str, query: EntityQuery) -> Result<EntityAnswer, CallError> {
        let answer = self.ask_peer_once(node, query).await;
        match &answer {
            Ok(_) => self.peers.answered(node),
            Err(e) => self.peers.failed(node, e),
        }
        answer
    }

    async fn ask_peer_once(
        &self,
        node: &str,
        query: EntityQuery,
    ) -> Result<EntityAnswer, CallError> {
        let query = match self.table.management_url(node) {
            Some(url) => match self.links.ask(&url, query).await {
                Ok(answered) => {
                    self.metrics.peer_queries_link.inc();
                    return answered;
                }
                Err(query) => query,
            },
            None => query,
        };
        let gw = gateway::of_node(node).ok_or_else(|| CallError::NoGateway(node.to_string()))?;
        self.metrics.peer_queries_remoting.inc();
        self.batcher.ask(&gw, query).await
    }

    /// A query to a shard hosted here; `NotOwner` if this node does not host it.
    async fn local_ask(&self, shard: u32, id: &str, query: E::Query) -> Attempt<E::Reply> {
        let Some(local) = self.local.get(shard) else {
            return Attempt::NotOwner;
        };
        let id = EntityId::from(id);
        let answer = local
            .actor
            .call(
                |reply| ShardMsg::Query { id, query, reply },
                Some(self.call_timeout),
            )
            .await;
        local_outcome(answer)
    }

    /// Runs `local` or `remote` against the shard's current owner until one answers, waiting
    /// for the table to change while there is no owner, up to `owner_wait`. After each attempt
    /// the owner did not answer, `fallback` (given the owner in the table, if any) may answer
    /// instead.
    async fn with_owner<T, L, LF, R, RF, F, FF>(
        &self,
        shard: u32,
        local: L,
        remote: R,
        fallback: F,
    ) -> Result<(T, Route), AskError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Attempt<T>>,
        R: Fn(Arc<str>) -> RF,
        RF: Future<Output = Attempt<T>>,
        F: Fn(Option<Arc<str>>) -> FF,
        FF: Future<Output = Option<(T, Route)>>,
    {
        let started = Instant::now();
        let deadline = started + self.owner_wait;
        let mut changes = self.table.subscribe();
        let mut last_error = None;
        loop {
            changes.mark_unchanged();
            let owner = self.table.owner(shard);
            let owner_node = match &owner {
                Some(Owner::Remote(node)) => Some(node.clone()),
                Some(Owner::Local) => Some(self.table.local_node().clone()),
                None => None,
            };
            let (attempt, route) = match owner {
                Some(Owner::Local) => (local().await, Route::Local),
                Some(Owner::Remote(node)) => (remote(node).await, Route::Remote),
                None => (Attempt::NotOwner, Route::Local),
            };
            match attempt {
                Attempt::Done(value) => return Ok((value, route)),
                Attempt::Refused(reason) => return Err(AskError::StateRefused { shard, reason }),
                Attempt::NotOwner => {}
                Attempt::Failed(e) => last_error = Some(e),
            }
            if let Some(answered) = fallback(owner_node).await {
                return Ok(answered);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(AskError::Unavailable {
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

impl<E: Entity> Endpoint for Router<E> {
    fn table(&self) -> &Arc<AllocationTable> {
        &self.table
    }

    fn answer(&self, query: EntityQuery) -> BoxFuture<'_, EntityAnswer> {
        use entity_answer::Result as R;
        Box::pin(async move {
            let result = if query.id.is_empty() || query.id.len() > MAX_ID_BYTES {
                R::Error(AskError::InvalidId(query.id.len()).to_string())
            } else {
                match (
                    <E::Codec as Codec<E::Query>>::decode(&query.query),
                    query.standby_within_ms,
                ) {
                    (Err(e), _) => R::Error(format!("undecodable query: {e}")),
                    (Ok(q), Some(within_ms)) => {
                        let bound = Duration::from_millis(within_ms);
                        match self.standby_local(query.shard, &query.id, &q, bound) {
                            Some((reply, staleness)) => {
                                match <E::Codec as Codec<E::Reply>>::encode(&reply) {
                                    Ok(reply) => R::Standby(StandbyReply {
                                        reply,
                                        lag_records: staleness.records,
                                        behind_ms: staleness.behind.as_millis() as u64,
                                    }),
                                    Err(e) => R::Error(format!("the reply does not encode: {e}")),
                                }
                            }
                            None => R::NotOwner(NotOwner {}),
                        }
                    }
                    (Ok(q), None) => match self.local_ask(query.shard, &query.id, q).await {
                        Attempt::Done(reply) => match <E::Codec as Codec<E::Reply>>::encode(&reply)
                        {
                            Ok(bytes) => R::Reply(bytes),
                            Err(e) => R::Error(format!("the reply does not encode: {e}")),
                        },
                        Attempt::NotOwner => R::NotOwner(NotOwner {}),
                        Attempt::Failed(e) => R::Error(e.to_string()),
                        Attempt::Refused(why) => R::Refused(why),
                    },
                }
            };
            EntityAnswer {
                result: Some(result),
            }
        })
    }

    fn command(&self, command: EntityCommand) -> BoxFuture<'_, CommandAnswer> {
        use command_answer::Result as R;
        Box::pin(async move {
            let key = command.idempotency_key.as_deref();
            // The shard by this node's own count, not the sender's word for it.
            let shard = partition_for_key(command.id.as_bytes(), self.partitions);
            let result = match crate::commands::check(&command.id, key) {
                Err(e) => R::Outcome(crate::commands::failed(e.to_string())),
                Ok(()) => match self
                    .command_here(shard, &command.id, &command.command, key)
                    .await
                {
                    Some(Ok(outcome)) => R::Outcome(outcome),
                    Some(Err(e)) => R::Unavailable(e.to_string()),
                    None => R::Declined(NotOwner {}),
                },
            };
            CommandAnswer {
                result: Some(result),
            }
        })
    }
}

fn local_outcome<T, M>(
    result: Result<CallResult<Result<T, Arc<str>>>, MessagingErr<M>>,
) -> Attempt<T> {
    match result {
        Ok(CallResult::Success(Ok(value))) => Attempt::Done(value),
        Ok(CallResult::Success(Err(why))) => Attempt::Refused(why.to_string()),
        Ok(CallResult::Timeout) => Attempt::Failed(CallError::LocalTimeout),
        // The shard stopped (handed off) while the call was in flight.
        Ok(CallResult::SenderError) | Err(_) => Attempt::NotOwner,
    }
}
