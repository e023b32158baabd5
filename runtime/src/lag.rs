//! Consumer lag per partition, measured when `/metrics` is scraped.
//!
//! A client of its own (it never joins the group) asks the broker for each owned partition's end
//! (the last stable offset, as a read_committed consumer sees it) and the group's committed
//! offset, which includes the offsets committed by checkpoint transactions. Asking only when
//! scraped costs nothing in between: librdkafka's periodic statistics would give the end offsets
//! too, but producing them every second delayed fetches (gaps of up to 1 s on a busy node).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaResult;
use rdkafka::Offset;

use crate::kafka_admin::{committed_offsets, list_offsets};
use crate::kafka_health::QuietContext;

const TIMEOUT: Duration = Duration::from_secs(5);

pub struct LagProbe {
    /// The node's [`crate::kafka_admin::group_offsets_client`] (shared with the restorer).
    client: Arc<BaseConsumer<QuietContext>>,
    topic: String,
}

impl LagProbe {
    pub fn new(client: Arc<BaseConsumer<QuietContext>>, topic: &str) -> Self {
        Self {
            client,
            topic: topic.into(),
        }
    }

    /// Lag of each of `partitions` (blocking: a few broker round trips).
    pub fn lags(&self, partitions: &[u32]) -> KafkaResult<Vec<(u32, i64)>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let ends = list_offsets(
            &self.client,
            &self.topic,
            partitions.iter().copied(),
            Offset::End,
            TIMEOUT,
        )?;
        let starts = list_offsets(
            &self.client,
            &self.topic,
            partitions.iter().copied(),
            Offset::Beginning,
            TIMEOUT,
        )?;
        let committed = committed_offsets(
            &self.client,
            &self.topic,
            partitions.iter().copied(),
            TIMEOUT,
        )?;
        Ok(partitions
            .iter()
            .filter_map(|p| {
                Some((
                    *p,
                    lag(*ends.get(p)?, committed.get(p).copied(), *starts.get(p)?),
                ))
            })
            .collect())
    }
}

/// Events after the group's committed offset (from the partition's start when nothing is committed).
fn lag(end: i64, committed: Option<i64>, start: i64) -> i64 {
    (end - committed.unwrap_or(start)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_commit_or_else_the_start() {
        assert_eq!(lag(100, Some(40), 0), 60);
        assert_eq!(lag(100, None, 30), 70);
        assert_eq!(lag(100, Some(100), 0), 0);
        assert_eq!(lag(90, Some(100), 0), 0, "never negative");
    }
}
