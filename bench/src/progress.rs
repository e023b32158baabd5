//! Per-partition progress over time, against what was available to consume.
//!
//! Two measures of a pause: the *gap* (the longest stretch in which a partition did not advance)
//! and the *wait* (the longest time a record that was already readable waited to be consumed).
//! Gaps include the input's own pauses: the producer's acknowledgements and the broker's appends
//! stall now and then on shared cores, and then no consumer can advance. Waits do not: they
//! start when the record is seen at the partition's end (its last stable offset, polled).

use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Default)]
pub struct Progress {
    /// Per partition: when the consumed offset (next offset to consume) advanced, and to what.
    consumed: BTreeMap<u32, Vec<(Instant, i64)>>,
    /// Per partition: when its end offset (records readable below it) advanced, and to what.
    available: BTreeMap<u32, Vec<(Instant, i64)>>,
}

/// Appends `(at, offset)` if `offset` is higher than the last one recorded.
fn record_advance(series: &mut Vec<(Instant, i64)>, offset: i64, at: Instant) {
    if series.last().is_none_or(|(_, last)| offset > *last) {
        series.push((at, offset));
    }
}

impl Progress {
    /// Partition `partition` has consumed everything below `offset` as of `at`.
    pub fn observe(&mut self, partition: u32, offset: i64, at: Instant) {
        record_advance(self.consumed.entry(partition).or_default(), offset, at);
    }

    /// Partition `partition` had records readable below `end` as of `at`.
    pub fn observe_end(&mut self, partition: u32, end: i64, at: Instant) {
        record_advance(self.available.entry(partition).or_default(), end, at);
    }

    /// Partitions seen advancing at least once.
    pub fn partitions_moving(&self) -> usize {
        self.consumed.len()
    }

    /// The longest stretch, overlapping `[from, to]`, in which a partition that was moving
    /// before `from` did not advance (a partition still stalled at `to` counts until `to`).
    /// Returns (seconds, partition).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> (f64, Option<u32>) {
        let mut longest = (0.0, None);
        for (partition, moves) in &self.consumed {
            let Some((start, _)) = moves.iter().rev().find(|(t, _)| *t <= from) else {
                continue;
            };
            let mut previous = *start;
            let inside = moves
                .iter()
                .map(|(t, _)| t)
                .filter(|t| **t > from && **t <= to);
            for t in inside.chain(std::iter::once(&to)) {
                let gap = t.duration_since(previous).as_secs_f64();
                if gap > longest.0 {
                    longest = (gap, Some(*partition));
                }
                previous = *t;
            }
        }
        longest
    }

    /// The longest time a record seen readable in `[from, to]` waited until it was consumed (a
    /// record still waiting at `to` counts until `to`), over partitions consumed at least once.
    /// Returns (seconds, partition).
    pub fn longest_wait(&self, from: Instant, to: Instant) -> (f64, Option<u32>) {
        let mut longest = (0.0, None);
        for (partition, ends) in &self.available {
            let Some(moves) = self.consumed.get(partition) else {
                continue;
            };
            for (seen, end) in ends.iter().filter(|(t, _)| *t >= from && *t <= to) {
                // Offsets only grow, so the first move reaching `end` is found by bisection.
                let reached = moves.partition_point(|(_, offset)| offset < end);
                let consumed_at = moves.get(reached).map_or(to, |(t, _)| (*t).min(to));
                let wait = consumed_at.saturating_duration_since(*seen).as_secs_f64();
                if wait > longest.0 {
                    longest = (wait, Some(*partition));
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_longest_gap_spans_the_window_and_counts_a_stall_to_its_end() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut progress = Progress::default();
        for ms in [0, 100, 200, 900, 1000] {
            progress.observe(1, ms as i64, at(ms));
        }
        progress.observe(1, 5, at(1100)); // not an advance
        for ms in [0, 100, 150] {
            progress.observe(2, ms as i64 + 1, at(ms));
        }
        progress.observe(3, 7, at(500)); // first seen inside the window: not "moving before"
        let (gap, partition) = progress.longest_gap(at(150), at(1000));
        assert_eq!(
            partition,
            Some(2),
            "partition 2 stalls from 150 ms to the end"
        );
        assert!((gap - 0.85).abs() < 1e-9);
        let (gap, partition) = progress.longest_gap(at(150), at(300));
        assert_eq!((partition, (gap * 1000.0).round()), (Some(2), 150.0));
        let mut one = Progress::default();
        for ms in [0, 100, 200, 900, 1000] {
            one.observe(1, ms as i64, at(ms));
        }
        let (gap, partition) = one.longest_gap(at(210), at(950));
        assert_eq!(partition, Some(1));
        assert!(
            (gap - 0.7).abs() < 1e-9,
            "200 -> 900 ms, the gap around the window's start"
        );
    }

    #[test]
    fn a_pause_in_the_input_is_a_gap_but_not_a_wait() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut progress = Progress::default();
        // Records arrive at 0, 100 and (after an input pause) 900 ms; each is consumed 20 ms later.
        for (ms, end) in [(0, 10), (100, 20), (900, 30)] {
            progress.observe_end(1, end, at(ms));
            progress.observe(1, end, at(ms + 20));
        }
        let (gap, _) = progress.longest_gap(at(50), at(1000));
        assert!((gap - 0.8).abs() < 1e-9, "120 -> 920 ms without progress");
        let (wait, partition) = progress.longest_wait(at(0), at(1000));
        assert_eq!(partition, Some(1));
        assert!(
            (wait - 0.02).abs() < 1e-9,
            "no record waited more than 20 ms: {wait}"
        );
    }

    #[test]
    fn a_stalled_consumer_makes_records_wait_until_consumed_or_the_window_ends() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut progress = Progress::default();
        progress.observe(2, 5, at(0));
        progress.observe_end(2, 8, at(100));
        progress.observe_end(2, 12, at(200));
        progress.observe(2, 8, at(700)); // the records below 8 waited 600 ms
        let (wait, partition) = progress.longest_wait(at(0), at(1000));
        assert_eq!(partition, Some(2));
        assert!(
            (wait - 0.8).abs() < 1e-9,
            "the records below 12 still wait at 1000 ms: {wait}"
        );
        let (wait, _) = progress.longest_wait(at(0), at(650));
        assert!(
            (wait - 0.55).abs() < 1e-9,
            "counted until the window's end: {wait}"
        );
        progress.observe_end(3, 4, at(100)); // never consumed at all: not a partition of this group
        assert_eq!(progress.longest_wait(at(0), at(1000)).1, Some(2));
    }
}
