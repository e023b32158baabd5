//! What [`crate::Entity::handle`] answers a command with.

use crate::cluster::wire::{command_outcome, CommandOutcome};
use crate::entity::{Codec, Entity};

/// The effects of one input, given to [`Entity::handle`]: for a command, its answer.
pub struct Effects<E: Entity> {
    command: bool,
    answer: Option<Result<E::Reply, String>>,
}

impl<E: Entity> Effects<E> {
    /// For an event of the input topic (nothing to answer).
    pub(crate) fn for_event() -> Self {
        Self {
            command: false,
            answer: None,
        }
    }

    /// For a command.
    pub(crate) fn for_command() -> Self {
        Self {
            command: true,
            answer: None,
        }
    }

    /// Whether the input is a command (a caller waits for [`Effects::reply`] or
    /// [`Effects::refuse`]); for an event both are ignored.
    pub fn is_command(&self) -> bool {
        self.command
    }

    /// Answers the command with `reply` (the last answer given counts).
    pub fn reply(&mut self, reply: E::Reply) {
        self.answer = Some(Ok(reply));
    }

    /// Refuses the command (the caller gets [`crate::CommandError::Refused`] with `reason`).
    /// Refuse before changing the state: a refused command should change nothing.
    pub fn refuse(&mut self, reason: impl Into<String>) {
        self.answer = Some(Err(reason.into()));
    }

    /// The answer as it crosses nodes and the changelog; a command answered with nothing
    /// fails (the caller must not wait for ever).
    pub(crate) fn into_outcome(self) -> CommandOutcome {
        let result = match self.answer {
            Some(Ok(reply)) => {
                command_outcome::Result::Reply(<E::Codec as Codec<E::Reply>>::encode(&reply))
            }
            Some(Err(reason)) => command_outcome::Result::Refused(reason),
            None => command_outcome::Result::Failed("the entity gave the command no answer".into()),
        };
        CommandOutcome {
            result: Some(result),
        }
    }
}

/// A failed command's outcome.
pub(crate) fn failed(reason: String) -> CommandOutcome {
    CommandOutcome {
        result: Some(command_outcome::Result::Failed(reason)),
    }
}
