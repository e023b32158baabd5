//! What a shard still owes the changelog and other topics, until a checkpoint commits it.
//!
//! Checkpoints are numbered. A changed state, a re-routed event or a dead letter is tagged with
//! the first checkpoint that may include it, and forgotten only once a checkpoint at or after
//! that one is confirmed committed: an aborted checkpoint leaves everything for the next one.

use crate::entity::{EntityId, EntityMap};

#[derive(Debug)]
pub(crate) struct Outbox<R> {
    /// Checkpoints handed out so far.
    seq: u64,
    dirty: EntityMap<u64>,
    records: Vec<(u64, R)>,
    /// States that became pending for the next checkpoint since [`Outbox::take_newly_changed`].
    newly_changed: usize,
}

impl<R> Default for Outbox<R> {
    fn default() -> Self {
        Self {
            seq: 0,
            dirty: EntityMap::default(),
            records: Vec::new(),
            newly_changed: 0,
        }
    }
}

impl<R: Clone> Outbox<R> {
    /// The entity's state changed: the next checkpoint writes it.
    pub fn changed(&mut self, id: &EntityId) {
        let next = self.seq + 1;
        if self.dirty.insert(id.clone(), next) != Some(next) {
            self.newly_changed += 1;
        }
    }

    /// How many states became pending for the next checkpoint since the last call (an entity
    /// changed again before that checkpoint counts once).
    pub fn take_newly_changed(&mut self) -> usize {
        std::mem::take(&mut self.newly_changed)
    }

    /// A record the next checkpoint writes besides states.
    pub fn push(&mut self, record: R) {
        self.records.push((self.seq + 1, record));
    }

    /// The first checkpoint that writes the entity's latest change, if it is not committed yet
    /// (`None`: its stored state is committed).
    pub fn pending(&self, id: &EntityId) -> Option<u64> {
        self.dirty.get(id).copied()
    }

    /// The number of the next checkpoint, the first that may include what happens now.
    pub fn next(&self) -> u64 {
        self.seq + 1
    }

    /// Starts a checkpoint: its number, the entities whose state it writes and its records.
    pub fn checkpoint(&mut self) -> (u64, Vec<EntityId>, Vec<R>) {
        self.seq += 1;
        (
            self.seq,
            self.dirty.keys().cloned().collect(),
            self.records.iter().map(|(_, r)| r.clone()).collect(),
        )
    }

    /// Checkpoint `seq` committed: forget what it (or an earlier one) wrote.
    pub fn committed(&mut self, seq: u64) {
        self.dirty.retain(|_, first| *first > seq);
        self.records.retain(|(first, _)| *first > seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_until_a_checkpoint_that_includes_them_commits() {
        let mut outbox = Outbox::<&str>::default();
        outbox.changed(&"a".into());
        outbox.push("letter");
        let (first, ids, records) = outbox.checkpoint();
        assert_eq!((ids.len(), records), (1, vec!["letter"]));
        // Changed again while checkpoint 1 is in flight: checkpoint 2 must write it too.
        outbox.changed(&"a".into());
        outbox.changed(&"b".into());
        let (second, ids, _) = outbox.checkpoint();
        assert_eq!(ids.len(), 2);
        outbox.committed(first);
        assert_eq!(outbox.pending(&"a".into()), Some(second), "changed again");
        let (_, ids, records) = outbox.checkpoint();
        assert_eq!(ids.len(), 2, "the newer changes stay");
        assert!(records.is_empty(), "the letter was committed");
        outbox.committed(second);
        let (_, ids, records) = outbox.checkpoint();
        assert!(ids.is_empty() && records.is_empty());
        assert_eq!(outbox.pending(&"a".into()), None, "committed");
    }

    #[test]
    fn an_aborted_checkpoint_leaves_everything_for_the_next() {
        let mut outbox = Outbox::<u8>::default();
        outbox.changed(&"a".into());
        outbox.push(1);
        let _aborted = outbox.checkpoint();
        let (seq, ids, records) = outbox.checkpoint();
        assert_eq!((ids.len(), records.len()), (1, 1));
        outbox.committed(seq);
        let (_, ids, records) = outbox.checkpoint();
        assert!(ids.is_empty() && records.is_empty());
    }

    #[test]
    fn a_state_counts_as_newly_changed_once_per_checkpoint_it_waits_for() {
        let mut outbox = Outbox::<u8>::default();
        outbox.changed(&"a".into());
        outbox.changed(&"a".into());
        outbox.changed(&"b".into());
        assert_eq!(
            outbox.take_newly_changed(),
            2,
            "a twice before checkpoint 1 is one state"
        );
        assert_eq!(outbox.take_newly_changed(), 0, "taken");
        let _first = outbox.checkpoint();
        // Pending for checkpoint 1 already, but checkpoint 2 must write it again.
        outbox.changed(&"a".into());
        outbox.changed(&"c".into());
        assert_eq!(outbox.take_newly_changed(), 2);
    }
}
