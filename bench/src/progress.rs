//! Per-partition progress over time, and the longest time any partition made none.

use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Default)]
pub struct Progress {
    /// Per partition: the highest offset seen, and when it moved.
    partitions: BTreeMap<u32, (i64, Vec<Instant>)>,
}

impl Progress {
    /// Partition `partition` has processed up to `offset` as of `at`; only an advance counts.
    pub fn observe(&mut self, partition: u32, offset: i64, at: Instant) {
        let (highest, moves) = self.partitions.entry(partition).or_insert((i64::MIN, Vec::new()));
        if offset > *highest {
            *highest = offset;
            moves.push(at);
        }
    }

    /// Partitions seen advancing at least once.
    pub fn partitions_moving(&self) -> usize {
        self.partitions.len()
    }

    /// The longest stretch, overlapping `[from, to]`, in which a partition that was moving
    /// before `from` did not advance (a partition still stalled at `to` counts until `to`).
    /// Returns (seconds, partition).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> (f64, Option<u32>) {
        let mut longest = (0.0, None);
        for (partition, (_, moves)) in &self.partitions {
            let Some(start) = moves.iter().rev().find(|t| **t <= from) else { continue };
            let mut previous = *start;
            for t in moves.iter().filter(|t| **t > from && **t <= to).chain(std::iter::once(&to)) {
                let gap = t.duration_since(previous).as_secs_f64();
                if gap > longest.0 {
                    longest = (gap, Some(*partition));
                }
                previous = *t;
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
        assert_eq!(partition, Some(2), "partition 2 stalls from 150 ms to the end");
        assert!((gap - 0.85).abs() < 1e-9);
        let (gap, partition) = progress.longest_gap(at(150), at(300));
        assert_eq!((partition, (gap * 1000.0).round()), (Some(2), 150.0));
        let mut one = Progress::default();
        for ms in [0, 100, 200, 900, 1000] {
            one.observe(1, ms as i64, at(ms));
        }
        let (gap, partition) = one.longest_gap(at(210), at(950));
        assert_eq!(partition, Some(1));
        assert!((gap - 0.7).abs() < 1e-9, "200 -> 900 ms, the gap around the window's start");
    }
}
