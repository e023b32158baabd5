//! Prometheus metrics, served at `GET /metrics` on the management port.
//!
//! Counters live in [`NodeStats`] (shared with `/cluster/stats`); this module adds the
//! histograms (rebalance callbacks, hand-off steps, shard restores, gRPC requests) and the gauges
//! that are read when scraped (shards owned, live / passivated entities, consumer lag per
//! partition). All names start with the application's name (`<name>_`).

use std::time::Duration;

use crate::stats::NodeStats;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RebalanceLabels {
    /// `assigned`, `revoked` (graceful hand-off) or `lost` (session timeout).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandoffLabels {
    /// `drain` (wait for dispatched events) or `checkpoint` (the final transaction).
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GrpcLabels {
    /// `local` or `remote` (answered by the owner node), `none` when not answered.
    pub route: &'static str,
    /// `ok`, `invalid_argument` or `unavailable`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    partition: u32,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Slow operations: 5 ms to ~80 s.
fn slow_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Requests: 50 µs to ~6.5 s.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

pub(crate) struct Metrics {
    registry: Registry,
    /// Time a rebalance callback held the group (revoke: the whole hand-off).
    pub rebalance_seconds: HistogramFamily<RebalanceLabels>,
    pub handoff_step_seconds: HistogramFamily<HandoffLabels>,
    /// Per shard: from its assignment until its state was restored and it went live.
    pub restore_seconds: Histogram,
    pub grpc_seconds: HistogramFamily<GrpcLabels>,
    /// Queries per message to a peer (see `cluster::query_batcher`).
    pub remote_query_batch: Histogram,
    shards_owned: Gauge,
    live_entities: Gauge,
    passivated_entities: Gauge,
    in_flight_events: Gauge,
    consumer_lag: Family<PartitionLabels, Gauge>,
}

/// What only the scraper can see: read when `/metrics` is requested.
pub(crate) struct ScrapeInputs<'a> {
    pub shards: &'a [u32],
    pub live_entities: usize,
    pub stored_entities: usize,
    pub in_flight: usize,
    /// Consumer lag per owned partition (see `lag`).
    pub lags: &'a [(u32, i64)],
}

impl Metrics {
    pub fn new(prefix: &str, stats: &NodeStats) -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix(prefix);
        stats.register(registry);
        let this = Self {
            registry: Registry::default(),
            rebalance_seconds: Family::new_with_constructor(slow_histogram),
            handoff_step_seconds: Family::new_with_constructor(slow_histogram),
            restore_seconds: slow_histogram(),
            grpc_seconds: Family::new_with_constructor(request_histogram),
            remote_query_batch: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            shards_owned: Gauge::default(),
            live_entities: Gauge::default(),
            passivated_entities: Gauge::default(),
            in_flight_events: Gauge::default(),
            consumer_lag: Family::default(),
        };
        registry.register(
            "rebalance_callback_seconds",
            "Time a rebalance callback held the group, by kind",
            this.rebalance_seconds.clone(),
        );
        registry.register(
            "handoff_step_seconds",
            "Steps of handing a shard off, by step",
            this.handoff_step_seconds.clone(),
        );
        registry.register(
            "restore_seconds",
            "Per shard, from assignment until restored from the changelog and live",
            this.restore_seconds.clone(),
        );
        registry.register(
            "grpc_request_seconds",
            "Entity queries (the applications' gRPC requests): latency by route and outcome",
            this.grpc_seconds.clone(),
        );
        registry.register(
            "remote_query_batch_size",
            "Queries sent to a peer in one message",
            this.remote_query_batch.clone(),
        );
        registry.register(
            "shards_owned",
            "Shards (partitions) hosted by this node",
            this.shards_owned.clone(),
        );
        registry.register(
            "live_entities",
            "Live entity actors",
            this.live_entities.clone(),
        );
        registry.register(
            "passivated_entities",
            "Entities with state here whose actor is passivated",
            this.passivated_entities.clone(),
        );
        registry.register(
            "in_flight_events",
            "Events dispatched to shards and not yet applied",
            this.in_flight_events.clone(),
        );
        registry.register(
            "consumer_lag",
            "Events in the partition after this node's committed offset",
            this.consumer_lag.clone(),
        );
        Self {
            registry: root,
            ..this
        }
    }

    pub fn observe_rebalance(&self, kind: &'static str, took: Duration) {
        self.rebalance_seconds
            .get_or_create(&RebalanceLabels { kind })
            .observe(took.as_secs_f64());
    }

    pub fn observe_handoff_step(&self, step: &'static str, took: Duration) {
        self.handoff_step_seconds
            .get_or_create(&HandoffLabels { step })
            .observe(took.as_secs_f64());
    }

    pub fn observe_query(&self, route: &'static str, outcome: &'static str, took: Duration) {
        self.grpc_seconds
            .get_or_create(&GrpcLabels { route, outcome })
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition, with the scrape-time gauges refreshed.
    pub fn render(&self, inputs: &ScrapeInputs<'_>) -> String {
        self.shards_owned.set(inputs.shards.len() as i64);
        self.live_entities.set(inputs.live_entities as i64);
        self.passivated_entities
            .set(inputs.stored_entities.saturating_sub(inputs.live_entities) as i64);
        self.in_flight_events.set(inputs.in_flight as i64);
        self.consumer_lag.clear();
        for &(partition, lag) in inputs.lags {
            self.consumer_lag
                .get_or_create(&PartitionLabels { partition })
                .set(lag);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_exposes_counters_histograms_and_gauges() {
        let stats = NodeStats::default();
        let metrics = Metrics::new("processor", &stats);
        NodeStats::add(&stats.events_processed_local, 7);
        metrics.observe_query("remote", "ok", Duration::from_millis(2));
        let text = metrics.render(&ScrapeInputs {
            shards: &[1, 2],
            live_entities: 3,
            stored_entities: 10,
            in_flight: 0,
            lags: &[(1, 5), (2, 0)],
        });
        assert!(
            text.contains("processor_events_processed_local_total 7"),
            "{text}"
        );
        assert!(text.contains("processor_shards_owned 2"), "{text}");
        assert!(
            text.contains(r#"processor_consumer_lag{partition="1"} 5"#),
            "{text}"
        );
        assert!(text.contains("processor_passivated_entities 7"), "{text}");
        assert!(
            text.contains(r#"processor_grpc_request_seconds_count{route="remote",outcome="ok"} 1"#),
            "{text}"
        );
    }
}
