//! Durable timers: an entity schedules a message to itself or to another entity, at a time,
//! and may cancel it by name ([`crate::Effects::set_timer`]).
//!
//! A timer is part of the entity's stored state (`acting`), so it is in the changelog record
//! that commits the input which set it, and moves wherever the state moves: a hand-off, a
//! crash's restore, a standby's promotion, a full restart. The shard that owns the entity keeps
//! an index of its earliest timers (`shard::timer_index`) and, when one is due, removes it from
//! the entity's state and writes its message as a record of the target's input topic, both in
//! the same checkpoint transaction. So a timer fires exactly once: if that transaction aborts
//! or the node dies first, the committed state still holds the timer and the next owner fires
//! it; once it commits, the timer is gone and its message is a record like any other input.
//! After downtime every overdue timer fires once (a timer is one pending record, not a series
//! of ticks; a periodic timer is one that sets itself again when it fires).

use std::time::Duration;

use smallvec::SmallVec;

use crate::cluster::wire::Timer;

/// Header on a fired timer's record: the timer's name.
pub const HEADER_TIMER: &str = "timer.name";

/// Longest timer name, in bytes.
pub const MAX_TIMER_NAME_BYTES: usize = 256;
/// The most timers one entity may have pending; a timer set beyond it is dead-lettered.
pub const MAX_TIMERS_PER_ENTITY: usize = 1_000;
/// How far after its input's time a timer may be set.
pub const MAX_TIMER_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why [`crate::Effects::set_timer`] refused a timer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    /// The name is empty or longer than [`MAX_TIMER_NAME_BYTES`] (its length).
    #[error("a timer name must be 1 to {MAX_TIMER_NAME_BYTES} bytes, got {0}")]
    Name(usize),
    /// The time is more than [`MAX_TIMER_DELAY`] after the input's.
    #[error(
        "a timer at {at_ms} ms is more than {} days after its input's time ({now_ms} ms)",
        MAX_TIMER_DELAY.as_secs() / 86_400
    )]
    TooFar {
        /// The timer's time (ms since the epoch).
        at_ms: i64,
        /// The input's time.
        now_ms: i64,
    },
}

/// Checks a timer's name and time against the limits, for an input at `now_ms`.
pub(crate) fn check(name: &str, at_ms: i64, now_ms: i64) -> Result<(), TimerError> {
    if name.is_empty() || name.len() > MAX_TIMER_NAME_BYTES {
        return Err(TimerError::Name(name.len()));
    }
    if at_ms > now_ms.saturating_add(MAX_TIMER_DELAY.as_millis() as i64) {
        return Err(TimerError::TooFar { at_ms, now_ms });
    }
    Ok(())
}

/// A pending timer as an entity's state holds it: the wire form (`cluster.proto`'s `Timer`)
/// without its empty fields, the name and the message in one allocation (a node may hold
/// millions: `name` and `message` as boxes of their own cost a heap chunk more per timer).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PendingTimer {
    /// When it fires (ms since the epoch).
    pub at_ms: i64,
    /// The name's length (4 bytes, little-endian), the name (unique per entity), then the
    /// message: the record value, the target type's event codec bytes. Built only by
    /// [`PendingTimer::new`], so the name is UTF-8.
    packed: Box<[u8]>,
    /// Another entity; `None`: the entity that set it.
    pub to: Option<Box<Target>>,
}

/// Bytes of the name's length at the start of [`PendingTimer`]'s `packed`.
const NAME_LEN_BYTES: usize = 4;

/// Another entity a timer's message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub topic: String,
    pub partition: u32,
    pub id: String,
}

impl PendingTimer {
    pub fn new(name: &str, at_ms: i64, message: &[u8], to: Option<Box<Target>>) -> Self {
        // A name comes from a record (or a state in one), which cannot hold 4 GiB.
        let len = u32::try_from(name.len()).expect("a timer name shorter than 4 GiB");
        let mut packed = Vec::with_capacity(NAME_LEN_BYTES + name.len() + message.len());
        packed.extend_from_slice(&len.to_le_bytes());
        packed.extend_from_slice(name.as_bytes());
        packed.extend_from_slice(message);
        Self {
            at_ms,
            packed: packed.into_boxed_slice(),
            to,
        }
    }

    fn name_len(&self) -> usize {
        let mut len = [0; NAME_LEN_BYTES];
        len.copy_from_slice(&self.packed[..NAME_LEN_BYTES]);
        u32::from_le_bytes(len) as usize
    }

    /// The name's bytes: what lookups by name compare, without checking UTF-8 each time.
    fn name_bytes(&self) -> &[u8] {
        &self.packed[NAME_LEN_BYTES..NAME_LEN_BYTES + self.name_len()]
    }

    /// Unique per entity.
    pub fn name(&self) -> &str {
        // Only `new` writes `packed`, from a whole `&str`.
        std::str::from_utf8(self.name_bytes())
            .expect("a timer's name is UTF-8 (written from a &str)")
    }

    /// The record value: the target type's event codec bytes.
    pub fn message(&self) -> &[u8] {
        &self.packed[NAME_LEN_BYTES + self.name_len()..]
    }

    fn from_wire(t: Timer) -> Self {
        let to = (!t.topic.is_empty()).then(|| {
            Box::new(Target {
                topic: t.topic,
                partition: t.partition,
                id: t.to,
            })
        });
        Self::new(&t.name, t.at_ms, &t.message, to)
    }

    fn to_wire(&self) -> Timer {
        let (topic, partition, to) = match self.to.as_deref() {
            Some(t) => (t.topic.clone(), t.partition, t.id.clone()),
            None => (String::new(), 0, String::new()),
        };
        Timer {
            name: self.name().to_string(),
            at_ms: self.at_ms,
            message: self.message().to_vec(),
            topic,
            partition,
            to,
        }
    }
}

impl std::fmt::Debug for PendingTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTimer")
            .field("name", &self.name())
            .field("at_ms", &self.at_ms)
            .field("message", &self.message())
            .field("to", &self.to)
            .finish()
    }
}

/// One entity's pending timers, by name (few per entity: a list, grown one at a time). The
/// first is held inline: most entities with timers have one, and a list of its own would be
/// one more heap chunk per timer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Timers(SmallVec<[PendingTimer; 1]>);

impl Timers {
    pub fn from_wire(timers: Vec<Timer>) -> Self {
        Self(timers.into_iter().map(PendingTimer::from_wire).collect())
    }

    pub fn to_wire(&self) -> Vec<Timer> {
        self.0.iter().map(PendingTimer::to_wire).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PendingTimer> {
        self.0.iter()
    }

    /// Whether a timer called `name` may be set: it replaces a pending one, or there is room
    /// below [`MAX_TIMERS_PER_ENTITY`]; otherwise the reason, for a dead letter.
    pub fn room_for(&self, name: &str) -> Result<(), String> {
        if self.0.len() < MAX_TIMERS_PER_ENTITY || self.position(name).is_some() {
            return Ok(());
        }
        Err(format!(
            "timer {name} would be the entity's {}th pending timer ({MAX_TIMERS_PER_ENTITY} allowed)",
            MAX_TIMERS_PER_ENTITY + 1
        ))
    }

    /// Sets `timer`, replacing the one of the same name (returned).
    pub fn set(&mut self, timer: PendingTimer) -> Option<PendingTimer> {
        match self.position(timer.name_bytes()) {
            Some(at) => Some(std::mem::replace(&mut self.0[at], timer)),
            None => {
                // Exactly one more: a push onto a full list would double its room.
                self.0.reserve_exact(1);
                self.0.push(timer);
                None
            }
        }
    }

    fn position(&self, name: impl AsRef<[u8]>) -> Option<usize> {
        self.0.iter().position(|t| t.name_bytes() == name.as_ref())
    }

    /// Removes the timer called `name`, if pending.
    pub fn remove(&mut self, name: &str) -> Option<PendingTimer> {
        let at = self.position(name)?;
        let removed = self.0.swap_remove(at);
        self.0.shrink_to_fit();
        Some(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(name: &str, at_ms: i64) -> PendingTimer {
        PendingTimer::new(name, at_ms, &[1, 2], None)
    }

    #[test]
    fn a_timer_of_the_same_name_replaces_the_pending_one() {
        let mut timers = Timers::default();
        assert_eq!(timers.set(timer("a", 10)), None);
        assert_eq!(timers.set(timer("b", 20)), None);
        timers.set(PendingTimer::new(
            "c",
            25,
            &[1, 2],
            Some(Box::new(Target {
                topic: "other".into(),
                partition: 3,
                id: "x".into(),
            })),
        ));
        assert_eq!(timers.set(timer("a", 30)), Some(timer("a", 10)));
        assert_eq!(timers.len(), 3);
        assert_eq!(timers.remove("a"), Some(timer("a", 30)));
        assert_eq!(timers.remove("a"), None);
        assert_eq!(Timers::from_wire(timers.to_wire()), timers);
    }

    #[test]
    fn a_timer_gives_back_its_name_and_message_as_set() {
        for (name, message) in [
            ("t", &b"{}"[..]),
            ("größe-✓", &[][..]),
            ("7", &[0, 255, 4][..]),
        ] {
            let timer = PendingTimer::new(name, -3, message, None);
            assert_eq!((timer.name(), timer.message()), (name, message));
            assert_eq!(PendingTimer::from_wire(timer.to_wire()), timer);
        }
        // The longest name allowed, and a message that starts like a length.
        let long = "n".repeat(MAX_TIMER_NAME_BYTES);
        let timer = PendingTimer::new(&long, 1, &[4, 0, 0, 0], None);
        assert_eq!((timer.name(), timer.message()), (&*long, &[4, 0, 0, 0][..]));
    }

    #[test]
    fn the_first_timer_is_held_inline_and_the_list_shrinks_back_to_it() {
        let mut timers = Timers::default();
        timers.set(timer("a", 1));
        assert!(!timers.0.spilled(), "one timer needs no list of its own");
        timers.set(timer("b", 2));
        assert!(timers.0.spilled());
        assert_eq!(timers.remove("a"), Some(timer("a", 1)));
        assert!(!timers.0.spilled(), "back inline once one is left");
        assert_eq!(
            timers.iter().map(PendingTimer::name).collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn names_and_times_beyond_the_limits_are_refused() {
        let now = 1_000_000;
        assert_eq!(
            check("t", now - 5, now),
            Ok(()),
            "a past time fires at once"
        );
        assert_eq!(check("", now, now), Err(TimerError::Name(0)));
        let long = "n".repeat(MAX_TIMER_NAME_BYTES + 1);
        assert_eq!(
            check(&long, now, now),
            Err(TimerError::Name(MAX_TIMER_NAME_BYTES + 1))
        );
        let limit = now + MAX_TIMER_DELAY.as_millis() as i64;
        assert_eq!(check("t", limit, now), Ok(()));
        assert_eq!(
            check("t", limit + 1, now),
            Err(TimerError::TooFar {
                at_ms: limit + 1,
                now_ms: now
            })
        );
    }

    #[test]
    fn an_entity_at_the_limit_may_replace_a_timer_but_not_add_one() {
        let mut timers = Timers::default();
        for i in 0..MAX_TIMERS_PER_ENTITY {
            assert_eq!(timers.room_for(&format!("t{i}")), Ok(()));
            timers.set(timer(&format!("t{i}"), i as i64));
        }
        assert_eq!(timers.room_for("t7"), Ok(()), "a replacement adds nothing");
        let refused = timers.room_for("one-more").unwrap_err();
        assert!(
            refused.contains("one-more") && refused.contains("1001th"),
            "{refused}"
        );
    }
}
