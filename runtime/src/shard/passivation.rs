//! Which live entity actors to stop: the least recently active of those with nothing in flight.
//! Their state stays in the shard; the next event or query re-activates them.

use std::time::Instant;

use crate::entity::EntityId;

/// Up to `limit` ids among `live` (id, last active, events in flight) that are idle and
/// `eligible`, least recently active first.
pub(crate) fn oldest_idle<'a>(
    live: impl Iterator<Item = (&'a EntityId, Instant, usize)>,
    eligible: impl Fn(&EntityId, Instant) -> bool,
    limit: usize,
) -> Vec<EntityId> {
    let mut idle: Vec<(Instant, &EntityId)> = live
        .filter(|(id, last_active, in_flight)| *in_flight == 0 && eligible(id, *last_active))
        .map(|(id, last_active, _)| (last_active, id))
        .collect();
    idle.sort_unstable();
    idle.into_iter()
        .take(limit)
        .map(|(_, id)| id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_least_recently_active_idle_entities_go_first() {
        let t0 = Instant::now();
        let ids: Vec<EntityId> = ["a", "b", "c", "d"].map(EntityId::from).into();
        let live = vec![
            (&ids[0], t0 + Duration::from_secs(3), 0),
            (&ids[1], t0 + Duration::from_secs(1), 0),
            (&ids[2], t0, 2), // busy: never passivated
            (&ids[3], t0 + Duration::from_secs(2), 0),
        ];
        let chosen = oldest_idle(live.clone().into_iter(), |_, _| true, 2);
        assert_eq!(chosen, vec![ids[1].clone(), ids[3].clone()]);
        let not_b = oldest_idle(live.into_iter(), |id, _| id != "b", 10);
        assert_eq!(not_b, vec![ids[3].clone(), ids[0].clone()]);
    }
}
