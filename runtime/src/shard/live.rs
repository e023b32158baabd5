//! Which entities of a shard are *live*: those active recently, in order of their last activity.
//!
//! An entity is a cell of its shard (its state in the shard's map), not a task: the shard runs
//! its events itself. Being live costs one entry here (the id and when it was last active, about
//! 100 bytes); passivating it drops the entry and keeps the state. The order makes both
//! passivations O(1) per entity: the least recently active entity is always at the front, for
//! the idle timeout and for the node's live cap alike.

use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;

use crate::entity::EntityId;

#[derive(Default)]
pub(crate) struct LiveSet {
    /// Least recently active first.
    by_recency: LinkedHashMap<EntityId, Instant, foldhash::fast::RandomState>,
}

impl LiveSet {
    /// The entity was active at `now`; returns whether it became live (it was passivated or new).
    pub fn touch(&mut self, id: &EntityId, now: Instant) -> bool {
        match self.by_recency.to_back(id) {
            Some(last_active) => {
                *last_active = now;
                false
            }
            None => {
                self.by_recency.insert(id.clone(), now);
                true
            }
        }
    }

    /// Passivates up to `limit` entities, least recently active first; returns how many.
    pub fn passivate_oldest(&mut self, limit: usize) -> usize {
        let mut passivated = 0;
        while passivated < limit && self.by_recency.pop_front().is_some() {
            passivated += 1;
        }
        passivated
    }

    /// Passivates every entity idle for `idle_for` or longer at `now`; returns how many.
    pub fn passivate_idle(&mut self, idle_for: Duration, now: Instant) -> usize {
        let mut passivated = 0;
        while self
            .by_recency
            .front()
            .is_some_and(|(_, last_active)| now.saturating_duration_since(*last_active) >= idle_for)
        {
            self.by_recency.pop_front();
            passivated += 1;
        }
        passivated
    }

    pub fn len(&self) -> usize {
        self.by_recency.len()
    }

    #[cfg(test)]
    fn ids(&self) -> Vec<&str> {
        self.by_recency.keys().map(|id| id.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_active_entities_are_passivated_first() {
        let t0 = Instant::now();
        let mut live = LiveSet::default();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            assert!(live.touch(&id.into(), t0 + Duration::from_secs(i as u64)));
        }
        // "a" is active again: it moves behind the others.
        assert!(!live.touch(&"a".into(), t0 + Duration::from_secs(10)));
        assert_eq!(live.ids(), ["b", "c", "d", "a"]);
        assert_eq!(live.passivate_oldest(2), 2);
        assert_eq!(live.ids(), ["d", "a"]);
        assert_eq!(live.passivate_oldest(10), 2);
        assert_eq!(live.len(), 0);
    }

    #[test]
    fn idle_entities_are_passivated_after_the_timeout_and_active_ones_stay() {
        let t0 = Instant::now();
        let mut live = LiveSet::default();
        live.touch(&"old".into(), t0);
        live.touch(&"recent".into(), t0 + Duration::from_secs(5));
        live.touch(&"revived".into(), t0);
        live.touch(&"revived".into(), t0 + Duration::from_secs(6));
        let now = t0 + Duration::from_secs(7);
        assert_eq!(live.passivate_idle(Duration::from_secs(3), now), 1);
        assert_eq!(live.ids(), ["recent", "revived"]);
        // Passivated entities become live again on their next activity.
        assert!(live.touch(&"old".into(), now));
        assert_eq!(live.len(), 3);
    }
}
