//! Durable timers in a shard: each is stored in its entity's state (what a restore brings
//! back), the earliest are indexed (`timer_index`), and a due one fires by leaving the state
//! and writing its message, both with the next checkpoint: exactly once (see `timers`).

use std::time::Duration;

use super::ShardState;
use crate::effects::HEADER_MESSAGE_FROM;
use crate::entity::{Entity, EntityId};
use crate::shard::messages::{OutRecord, Outgoing, ShardMsg};
use crate::stats::NodeStats;
use crate::timers::{PendingTimer, HEADER_TIMER};

/// The most timers one round fires before the shard serves its other messages.
pub(super) const FIRE_PER_ROUND: usize = 2_000;

/// Wall-clock time in ms since the epoch: timers are due by it.
pub(super) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<E: Entity> ShardState<E> {
    /// Stores `timer` with entity `id`'s state (replacing one of the same name) and indexes it.
    pub(super) fn set_timer(&mut self, id: &EntityId, timer: PendingTimer) -> Result<(), String> {
        let stored = self.states.get_mut(id).expect("the entity just ran");
        let acting = stored.acting.get_or_insert_default();
        acting.timers.room_for(timer.name())?;
        let key = (timer.at_ms, id.clone(), timer.name().to_string());
        if let Some(old) = acting.timers.set(timer) {
            self.timers
                .remove(&(old.at_ms, id.clone(), old.name().to_string()));
        }
        self.timers.insert(key);
        NodeStats::add(&self.env.stats.timers_set, 1);
        Ok(())
    }

    pub(super) fn cancel_timer(&mut self, id: &EntityId, name: &str) {
        let Some(stored) = self.states.get_mut(id) else {
            return;
        };
        let Some(acting) = stored.acting.as_mut() else {
            return;
        };
        if let Some(old) = acting.timers.remove(name) {
            self.timers
                .remove(&(old.at_ms, id.clone(), old.name().to_string()));
        }
        if acting.is_empty() {
            stored.acting = None;
        }
    }

    /// Fires the timers due now (up to [`FIRE_PER_ROUND`]): each leaves its entity's state and
    /// its message is written to the target, both with the next checkpoint, so a timer fires
    /// exactly once (see `timers`).
    pub(super) fn fire_due_timers(&mut self) {
        if self.restoring.is_some() {
            return;
        }
        if self.timers.needs_rebuild() {
            self.rebuild_timer_index();
        }
        let now = unix_ms();
        let due = self.timers.take_due(now, FIRE_PER_ROUND);
        let mut fired = 0;
        for (_, id, name) in due {
            let Some(stored) = self.states.get_mut(&id) else {
                continue;
            };
            let Some(acting) = stored.acting.as_mut() else {
                continue;
            };
            let Some(timer) = acting.timers.remove(&name) else {
                continue;
            };
            if acting.is_empty() {
                stored.acting = None;
            }
            let value = timer.message().to_vec();
            let (topic, partition, key) = match timer.to {
                None => (self.env.input_topic.clone(), self.shard, id.to_string()),
                Some(to) => (to.topic, to.partition, to.id),
            };
            tracing::debug!("timer {name} of entity {id} (shard {}) fired", self.shard);
            self.outbox.push(Outgoing::Record(Box::new(OutRecord {
                topic,
                partition: Some(partition),
                key: Some(key.into_bytes()),
                value: Some(value),
                headers: vec![
                    (HEADER_MESSAGE_FROM, self.sender(&id)),
                    (HEADER_TIMER, name),
                ],
            })));
            self.outbox.changed(&id);
            fired += 1;
        }
        if fired > 0 {
            NodeStats::add(&self.env.stats.timers_fired, fired);
            self.env.commit_soon.request();
        }
        self.wake_at = None;
        self.arm_timers();
    }

    /// Schedules a [`ShardMsg::Timers`] for the earliest pending timer, unless one is due by then.
    pub(super) fn arm_timers(&mut self) {
        if self.timers.needs_rebuild() {
            self.rebuild_timer_index();
        }
        let Some(next) = self.timers.next_at() else {
            return;
        };
        if self.wake_at.is_some_and(|at| at <= next) {
            return;
        }
        self.wake_at = Some(next);
        let delay = Duration::from_millis(u64::try_from(next - unix_ms()).unwrap_or(0));
        self.myself.send_after(delay, || ShardMsg::Timers);
    }

    /// Indexes the earliest of every entity's timers (after a restore, or once the held ones
    /// have fired).
    pub(super) fn rebuild_timer_index(&mut self) {
        let all = self.states.iter().flat_map(|(id, stored)| {
            stored.acting.iter().flat_map(move |acting| {
                acting
                    .timers
                    .iter()
                    .map(move |t| (t.at_ms, id.clone(), t.name().to_string()))
            })
        });
        self.timers.rebuild(all);
    }
}
