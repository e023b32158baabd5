//! Which consumed offsets of a shard are done, and how far a checkpoint may commit.
//!
//! Entities acknowledge their events in any order across entities; only the contiguous prefix
//! of acknowledged offsets is committable, or a crash would skip the unacknowledged ones.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub(crate) struct Acks {
    /// Dispatched offsets in order, with whether each is acknowledged.
    pending: VecDeque<(i64, bool)>,
    /// Next offset to commit: after the last contiguous acknowledged event.
    committable: Option<i64>,
}

impl Acks {
    /// An offset dispatched to an entity; acknowledged later.
    pub fn dispatched(&mut self, offset: i64) {
        self.pending.push_back((offset, false));
    }

    /// An offset settled at once (re-routed or dead-lettered: its checkpoint writes it).
    pub fn settled(&mut self, offset: i64) {
        self.pending.push_back((offset, true));
    }

    /// Marks `offset` acknowledged; returns 1 if it was pending and unacknowledged, else 0.
    pub fn acknowledge(&mut self, offset: i64) -> usize {
        match self.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) if !self.pending[i].1 => {
                self.pending[i].1 = true;
                1
            }
            _ => 0,
        }
    }

    /// Moves the committable offset past the acknowledged prefix.
    pub fn advance(&mut self) {
        let mut last = None;
        while let Some((offset, true)) = self.pending.front().copied() {
            last = Some(offset);
            self.pending.pop_front();
        }
        if let Some(offset) = last {
            self.committable = Some(offset + 1);
        }
    }

    /// The offset the next checkpoint commits; `None` before anything was acknowledged.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// Whether every dispatched offset is acknowledged.
    pub fn is_drained(&self) -> bool {
        self.pending.is_empty()
    }

    /// Dispatched offsets not yet acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.pending.iter().filter(|(_, done)| !done).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_contiguous_acknowledged_prefix_is_committable() {
        let mut acks = Acks::default();
        for offset in [5, 6, 7] {
            acks.dispatched(offset);
        }
        assert_eq!(acks.acknowledge(6), 1);
        acks.advance();
        assert_eq!(acks.committable(), None, "5 is still pending");
        assert_eq!(acks.acknowledge(5), 1);
        acks.advance();
        assert_eq!(acks.committable(), Some(7));
        assert!(!acks.is_drained());
        assert_eq!(acks.unacknowledged(), 1);
        acks.acknowledge(7);
        acks.advance();
        assert_eq!(acks.committable(), Some(8));
        assert!(acks.is_drained());
    }

    #[test]
    fn settled_offsets_and_repeated_acknowledgements() {
        let mut acks = Acks::default();
        acks.dispatched(1);
        acks.settled(2);
        assert_eq!(acks.acknowledge(1), 1);
        assert_eq!(acks.acknowledge(1), 0, "counted once");
        assert_eq!(acks.acknowledge(9), 0, "never dispatched");
        acks.advance();
        assert_eq!(acks.committable(), Some(3));
    }
}
