//! A command run at its owner without a record of the input topic.
//!
//! When the entity's shard is on the node the caller reached, the command goes to the shard as
//! a message instead of being written to the input topic and read back (about half of a
//! command's round trip and of the broker's work for it: docs/BENCHMARKS.md, "Where a
//! command's time goes"). Its answer is owed exactly as a record command's: sent once a
//! checkpoint that includes the change commits. Why that is still exactly once (the argument
//! in docs/ARCHITECTURE.md, "Commands run at their owner"):
//!
//! - a change nobody was told about yet is only in memory: a crash (or a hand-off) before its
//!   checkpoint commits undoes it, and its caller, who got no success, retries (with the same
//!   idempotency key: applied once);
//! - the checkpoint that commits it also commits the shard's input offset with the consumer's
//!   group metadata, so a node that lost the partition (a zombie) cannot commit it: the shard
//!   only takes direct commands once it has an offset to commit (`processed`), and not while
//!   restoring, refused or handing off (it *declines*, and the caller writes the command as a
//!   record, which the partition's next owner reads);
//! - the idempotency key's answer is remembered in the state that commits with the change, so a
//!   retry through any node, by either path, is answered from it.
//!
//! A command is never run again from here: a shard that stops before committing drops the
//! owed answer, its caller learns at once that the outcome is unknown
//! ([`super::CommandError::Unavailable`]).

use tokio::sync::oneshot;

use crate::cluster::wire::CommandOutcome;
use crate::entity::EntityId;

/// A command for one of this node's shards.
pub(crate) struct DirectCommand {
    pub id: EntityId,
    /// The command as its entity type's codec wrote it (decoded by the shard, with the same
    /// checks as a record's).
    pub value: Vec<u8>,
    pub idempotency_key: Option<String>,
    pub answer: oneshot::Sender<Direct>,
}

/// What the shard did with a [`DirectCommand`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Direct {
    /// Run (or answered from its remembered answer), and the change committed.
    Answered(CommandOutcome),
    /// Not taken: the shard is restoring, refused, handing off or has consumed nothing yet.
    /// The caller writes the command as a record instead.
    Declined,
}
