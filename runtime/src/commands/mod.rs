//! Commands: an input an entity answers, sent from any node, answered once its change is
//! committed.
//!
//! A command is a record of the entity type's input topic like any event: the sending node
//! produces it to the entity's partition (`sender`), with headers naming the node to answer
//! (`command.reply_to`), the sender's number for it (`command.request`) and, optionally, an
//! idempotency key. So a command gets everything an event has: partition order with the
//! entity's other inputs, an offset, the replay rule, and the checkpoint transaction that
//! commits its state change with the consumed offsets. The owner runs it with
//! [`crate::Entity::handle`], which answers through [`crate::Effects`]; the answer is *owed* until the
//! checkpoint that includes the change commits, and only then sent to the caller (a crash
//! before the commit undoes the change and loses the answer with it; the next owner reads the
//! command again, runs it again and answers). A command with an idempotency key is answered
//! from the entity's remembered answers when the key was seen (`remembered`): a caller that
//! timed out and retries, through any node, gets the first answer and nothing runs twice.
//!
//! A command whose shard is on the node the caller reached is run there without a record
//! (`direct`): the same answer after the same commit, without the write and the read back.
//!
//! - [`direct`]: a command run at its owner without a record;
//! - [`remembered`]: the answers an entity keeps by idempotency key;
//! - [`pending`]: the sending node's commands waiting for their answers;
//! - [`sender`]: producing command records and waiting for the answer.

mod direct;
mod pending;
mod remembered;
mod sender;

pub(crate) use crate::effects::failed;
pub(crate) use direct::{Direct, DirectCommand};
pub(crate) use pending::PendingCommands;
pub(crate) use remembered::Remembered;
pub(crate) use sender::{CommandMeta, CommandSender};

use crate::entity::MAX_ID_BYTES;

/// Headers on a command record.
pub mod headers {
    /// The node to answer (its node id).
    pub const REPLY_TO: &str = "command.reply_to";
    /// The sending node's number for the command (decimal).
    pub const REQUEST: &str = "command.request";
    /// The caller's idempotency key, if any.
    pub const IDEMPOTENCY_KEY: &str = "command.idempotency_key";
}

/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Why a command got no reply from its entity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The id is empty or longer than [`MAX_ID_BYTES`].
    #[error("entity id must be 1 to {MAX_ID_BYTES} bytes, got {0}")]
    InvalidId(usize),
    /// The idempotency key is longer than [`MAX_IDEMPOTENCY_KEY_BYTES`].
    #[error("idempotency key must be at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes, got {0}")]
    InvalidKey(usize),
    /// The node is not running yet.
    #[error("the node is not running yet")]
    NotRunning,
    /// The entity refused the command ([`crate::Effects::refuse`]); nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The command reached its entity but could not run: it did not decode there, or the
    /// entity panicked or gave no answer. Retrying will not help.
    #[error("the command failed: {0}")]
    Failed(String),
    /// The command could not be written to Kafka, or no answer came within the node's bound.
    /// Its outcome is unknown: retry with the same idempotency key to get it.
    #[error("no answer to the command: {0} (retry with the same idempotency key)")]
    Unavailable(String),
}

/// Checks a command's entity id and idempotency key before it goes anywhere.
pub(crate) fn check(id: &str, idempotency_key: Option<&str>) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(CommandError::InvalidId(id.len()));
    }
    match idempotency_key {
        Some(key) if key.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            Err(CommandError::InvalidKey(key.len()))
        }
        _ => Ok(()),
    }
}

impl CommandError {
    /// The gRPC status a front end answers with: `INVALID_ARGUMENT` for a bad id or key (`what`
    /// names the id: "account"), `FAILED_PRECONDITION` for a refusal, `INTERNAL` for a failed
    /// command, `UNAVAILABLE` for the rest.
    pub fn to_status(&self, what: &str) -> tonic::Status {
        match self {
            Self::InvalidId(0) => {
                tonic::Status::invalid_argument(format!("{what} must not be empty"))
            }
            Self::InvalidId(len) => tonic::Status::invalid_argument(format!(
                "{what} is {len} bytes; at most {MAX_ID_BYTES} are allowed"
            )),
            Self::InvalidKey(_) => tonic::Status::invalid_argument(self.to_string()),
            Self::Refused(reason) => tonic::Status::failed_precondition(reason.clone()),
            Self::Failed(_) => tonic::Status::internal(self.to_string()),
            Self::NotRunning | Self::Unavailable(_) => tonic::Status::unavailable(self.to_string()),
        }
    }
}

/// The caller's view of an entity's answer: its reply decoded with the entity's codec, or why
/// there is none. One home for the node's `Entities::send` and the test kit's `command`.
pub(crate) fn answer<E: crate::Entity>(
    outcome: crate::cluster::wire::CommandOutcome,
) -> Result<E::Reply, CommandError> {
    use crate::cluster::wire::command_outcome::Result as Outcome;
    use crate::entity::Codec;
    match outcome.result {
        Some(Outcome::Reply(bytes)) => <E::Codec as Codec<E::Reply>>::decode(&bytes)
            .map_err(|e| CommandError::Failed(format!("the answer does not decode: {e}"))),
        Some(Outcome::Refused(reason)) => Err(CommandError::Refused(reason)),
        Some(Outcome::Failed(reason)) => Err(CommandError::Failed(reason)),
        None => Err(CommandError::Failed("an empty answer".into())),
    }
}
