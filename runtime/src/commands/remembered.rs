//! The answers an entity keeps by idempotency key, written with its state.
//!
//! Kept per entity, not per node: the entity's changelog record carries them, so the next
//! owner (after a hand-off, a crash, a restore) answers a retry as this one would have. Both
//! bounds depend only on the commands themselves (their record timestamps and their number), so
//! a replay keeps exactly what the first run kept.

use std::collections::VecDeque;

use crate::cluster::wire::{CommandOutcome, RememberedAnswer};

/// How long an answer is kept, by the command records' timestamps: a retry later than this
/// after the first attempt runs as a new command.
pub const KEEP_ANSWERS_MS: i64 = 15 * 60 * 1000;
/// The most answers one entity keeps (the oldest go first).
pub const MAX_ANSWERS: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Remembered {
    /// Oldest first.
    answers: VecDeque<RememberedAnswer>,
}

impl Remembered {
    /// The answer given to the command with `key`, if still kept.
    pub fn get(&self, key: &str) -> Option<&CommandOutcome> {
        self.answers
            .iter()
            .rev()
            .find(|a| a.key == key)
            .and_then(|a| a.outcome.as_ref())
    }

    /// Keeps the answer to the command with `key`, stamped `at_ms`; forgets answers older than
    /// [`KEEP_ANSWERS_MS`] before it and any beyond [`MAX_ANSWERS`].
    pub fn remember(&mut self, key: String, outcome: CommandOutcome, at_ms: i64) {
        while self
            .answers
            .front()
            .is_some_and(|a| a.at_ms < at_ms.saturating_sub(KEEP_ANSWERS_MS))
            || self.answers.len() >= MAX_ANSWERS
        {
            self.answers.pop_front();
        }
        self.answers.push_back(RememberedAnswer {
            key,
            outcome: Some(outcome),
            at_ms,
        });
    }

    /// The answers as written in the changelog (oldest first).
    pub fn to_wire(&self) -> Vec<RememberedAnswer> {
        self.answers.iter().cloned().collect()
    }

    pub fn from_wire(answers: Vec<RememberedAnswer>) -> Self {
        Self {
            answers: answers.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::failed;

    #[test]
    fn answers_are_found_by_key_and_expire_by_age_and_number() {
        let mut r = Remembered::default();
        r.remember("a".into(), failed("first".into()), 1_000);
        r.remember("b".into(), failed("second".into()), 2_000);
        assert_eq!(r.get("a"), Some(&failed("first".into())));
        assert_eq!(r.get("c"), None);
        // Much later: "a" and "b" are older than the window.
        r.remember("c".into(), failed("third".into()), 3_000 + KEEP_ANSWERS_MS);
        assert_eq!((r.get("a"), r.get("b")), (None, None));
        for n in 0..MAX_ANSWERS {
            r.remember(
                format!("k{n}"),
                failed(String::new()),
                4_000 + KEEP_ANSWERS_MS,
            );
        }
        assert_eq!(r.get("c"), None, "the oldest goes beyond the count");
        assert!(r.get("k0").is_some());
        assert_eq!(Remembered::from_wire(r.to_wire()), r);
    }
}
