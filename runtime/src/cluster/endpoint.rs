//! How the cluster layer meets the entity types without knowing them: a node's gateway answers
//! peers through each type's [`Endpoint`] (queries and replies as codec bytes), and a call to a
//! peer fails with a [`CallError`]. Routing implements the one and reports the other.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use ractor::rpc::CallResult;
use ractor::MessagingErr;

use crate::allocation::AllocationTable;
use crate::cluster::wire::{
    command_answer, entity_answer, CommandAnswer, EntityAnswer, EntityCommand, EntityQuery,
    NotOwner,
};
use crate::entity::DecodeError;

/// Why one attempt at the presumed owner failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The owner did not answer within the call timeout.
    #[error("remote call timed out")]
    Timeout,
    /// The owner dropped the call (it is stopping).
    #[error("remote node dropped the call")]
    Dropped,
    /// No session to the owner.
    #[error("remote node unreachable: {0}")]
    Unreachable(String),
    /// The table names an owner whose gateway is not known here (yet).
    #[error("no gateway known for node {0}")]
    NoGateway(String),
    /// The local shard did not answer within the call timeout.
    #[error("local shard timed out")]
    LocalTimeout,
    /// The owner answered with an error.
    #[error("the owner answered: {0}")]
    Remote(String),
    /// The owner's answer did not decode (different versions of the entity's codec?).
    #[error("undecodable answer: {0}")]
    Undecodable(#[from] DecodeError),
    /// The query does not encode with the type's codec (so it cannot be sent).
    #[error("the query does not encode: {0}")]
    Unencodable(crate::entity::EncodeError),
}

/// How a node's gateway answers peers' queries for one entity type, whatever the type.
pub(crate) trait Endpoint: Send + Sync {
    fn table(&self) -> &Arc<AllocationTable>;
    /// Answers a peer's query from a shard hosted here.
    fn answer(&self, query: EntityQuery) -> BoxFuture<'_, EntityAnswer>;
    /// Runs a command a peer forwarded, at a shard hosted here, without a record; declines
    /// when the shard is not here or does not take it (the peer then writes the record).
    fn command(&self, command: EntityCommand) -> BoxFuture<'_, CommandAnswer>;
}

/// A peer's query answered by the endpoint of its type, whichever transport brought it.
pub(crate) async fn answer(
    endpoints: &HashMap<String, Arc<dyn Endpoint>>,
    query: EntityQuery,
) -> EntityAnswer {
    match endpoints.get(&query.entity_type) {
        Some(endpoint) => endpoint.answer(query).await,
        None => EntityAnswer {
            result: Some(entity_answer::Result::Error(format!(
                "this node hosts no entity type '{}'",
                query.entity_type
            ))),
        },
    }
}

/// A peer's command run by the endpoint of its type; declined if this node hosts no such type.
pub(crate) async fn command(
    endpoints: &HashMap<String, Arc<dyn Endpoint>>,
    command: EntityCommand,
) -> CommandAnswer {
    match endpoints.get(&command.entity_type) {
        Some(endpoint) => endpoint.command(command).await,
        None => CommandAnswer {
            result: Some(command_answer::Result::Declined(NotOwner {})),
        },
    }
}

/// The outcome of a call to a peer's actor.
pub(crate) fn call_outcome<T, M>(
    result: Result<CallResult<T>, MessagingErr<M>>,
) -> Result<T, CallError> {
    match result {
        Ok(CallResult::Success(value)) => Ok(value),
        Ok(CallResult::Timeout) => Err(CallError::Timeout),
        Ok(CallResult::SenderError) => Err(CallError::Dropped),
        Err(e) => Err(CallError::Unreachable(e.to_string())),
    }
}
