//! A shard's index of its entities' pending timers, earliest first, holding at most a bounded
//! number of them: the timers themselves live in the entities' states (`timers`), so a shard
//! with a million pending timers keeps only the earliest few thousand twice. When the held
//! ones have all fired and some were left out, the index is rebuilt from the states.
//!
//! Invariant: the index holds exactly the shard's timers whose key is below `bound` (every
//! timer when `bound` is `None`), so its first key is always the shard's earliest timer.

use std::collections::{BTreeSet, BinaryHeap};

use crate::entity::EntityId;

/// A timer's place in the index: due time, entity, name (unique per entity).
pub(crate) type TimerKey = (i64, EntityId, String);

/// How many timers a shard's index holds by default.
pub(crate) const HELD_TIMERS: usize = 8_192;

pub(crate) struct TimerIndex {
    held: BTreeSet<TimerKey>,
    capacity: usize,
    /// The smallest key not held, if any was left out.
    bound: Option<TimerKey>,
}

impl TimerIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            held: BTreeSet::new(),
            capacity: capacity.max(1),
            bound: None,
        }
    }

    /// A timer was set.
    pub fn insert(&mut self, key: TimerKey) {
        if self.bound.as_ref().is_some_and(|bound| key >= *bound) {
            return;
        }
        self.held.insert(key);
        if self.held.len() > self.capacity {
            self.bound = self.held.pop_last();
        }
    }

    /// A timer was cancelled, replaced or fired.
    pub fn remove(&mut self, key: &TimerKey) {
        self.held.remove(key);
    }

    /// The earliest timer's due time, if the shard has one: `None` with timers left out means
    /// the index must be rebuilt first ([`TimerIndex::needs_rebuild`]).
    pub fn next_at(&self) -> Option<i64> {
        self.held.first().map(|(at, _, _)| *at)
    }

    /// Whether every held timer has gone while some were left out.
    pub fn needs_rebuild(&self) -> bool {
        self.held.is_empty() && self.bound.is_some()
    }

    /// Takes up to `limit` held timers due at `now_ms`, earliest first.
    pub fn take_due(&mut self, now_ms: i64, limit: usize) -> Vec<TimerKey> {
        let mut due = Vec::new();
        while due.len() < limit && self.held.first().is_some_and(|(at, _, _)| *at <= now_ms) {
            due.extend(self.held.pop_first());
        }
        due
    }

    /// Rebuilds from every timer of the shard: keeps the earliest `capacity`.
    pub fn rebuild(&mut self, all: impl Iterator<Item = TimerKey>) {
        // A max-heap of the earliest seen so far; what it pushes out is left out.
        let mut earliest = BinaryHeap::with_capacity(self.capacity + 1);
        self.bound = None;
        for key in all {
            earliest.push(key);
            if earliest.len() > self.capacity {
                let left_out = earliest.pop();
                if left_out < self.bound || self.bound.is_none() {
                    self.bound = left_out;
                }
            }
        }
        self.held = earliest.into_iter().collect();
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(at: i64, id: &str) -> TimerKey {
        (at, id.into(), "t".into())
    }

    #[test]
    fn the_earliest_timers_are_held_and_the_rest_found_by_a_rebuild() {
        let mut index = TimerIndex::new(3);
        let mut all: Vec<TimerKey> = (0..10).rev().map(|n| key(100 + n, "e")).collect();
        for k in &all {
            index.insert(k.clone());
        }
        assert_eq!(index.held(), 3);
        assert_eq!(index.next_at(), Some(100));
        // A timer earlier than the held ones is held; one later than the bound is not.
        index.insert(key(50, "early"));
        index.insert(key(500, "late"));
        all.extend([key(50, "early"), key(500, "late")]);
        assert_eq!(index.held(), 3);
        let due = index.take_due(101, 10);
        assert_eq!(due, vec![key(50, "early"), key(100, "e"), key(101, "e")]);
        all.retain(|k| !due.contains(k));
        assert!(index.needs_rebuild());
        index.rebuild(all.iter().cloned());
        assert_eq!(index.next_at(), Some(102));
        // Fire everything: each timer exactly once, in time order.
        let mut fired = Vec::new();
        loop {
            if index.needs_rebuild() {
                index.rebuild(all.iter().cloned());
            }
            let due = index.take_due(i64::MAX, 2);
            if due.is_empty() {
                break;
            }
            all.retain(|k| !due.contains(k));
            fired.extend(due);
        }
        assert_eq!(fired.first(), Some(&key(102, "e")));
        assert_eq!(fired.last(), Some(&key(500, "late")));
        assert_eq!(fired.len(), 9);
        assert!(fired.windows(2).all(|w| w[0] < w[1]));
        assert!(all.is_empty());
    }

    #[test]
    fn a_cancelled_timer_leaves_the_index() {
        let mut index = TimerIndex::new(10);
        index.insert(key(5, "a"));
        index.insert(key(7, "b"));
        index.remove(&key(5, "a"));
        assert_eq!(index.take_due(10, 10), vec![key(7, "b")]);
        assert_eq!(index.next_at(), None);
        assert!(!index.needs_rebuild());
    }
}
