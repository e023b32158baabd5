//! Prometheus metrics, served at `GET /metrics` on the management port.
//!
//! Counters live in [`NodeStats`] (shared with `/cluster/stats`); this module adds the
//! histograms (rebalance callbacks, hand-off steps, shard restores, entity queries) and the
//! gauges: the input topic's partitions (set once), and what is read when scraped (shards owned,
//! live / passivated entities, consumer lag per partition). All names start with the
//! application's name (`<name>_`); every series of an entity type's work carries its
//! `entity_type` label (the type's group), so one family holds every hosted type and a dashboard
//! sums or splits them. The in-flight gauge is node-wide. The repository's `monitoring/` holds
//! alerting rules written against these names (a shard without an owner is `partitions` minus
//! the nodes' `shards_owned`).

use std::time::Duration;

use crate::stats::NodeStats;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    entity_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RebalanceLabels {
    entity_type: &'static str,
    /// `assigned`, `revoked` (graceful hand-off) or `lost` (session timeout).
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoffLabels {
    entity_type: &'static str,
    /// `drain` (wait for dispatched events) or `checkpoint` (the final transaction).
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    entity_type: &'static str,
    /// `local` or `remote` (answered by the owner node), `none` when not answered.
    route: &'static str,
    /// `ok`, `invalid_argument` or `unavailable`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerQueryLabels {
    entity_type: &'static str,
    /// `link` (the query link to the owner's management port) or `remoting` (the ractor_cluster
    /// session).
    transport: &'static str,
}

/// Commands sent from this node: the way they went and how they ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    entity_type: &'static str,
    /// `direct` (run by this node's shard without a record), `forwarded` (run by the owner's
    /// shard without a record, over the query link), `record` (written to the input topic for
    /// the owner to read) or `none` (refused before it went anywhere: a bad id or key).
    path: &'static str,
    /// `ok` (the entity's reply), `refused` (the entity refused it: nothing changed), `failed`
    /// (it could not run), `invalid_argument` or `unavailable` (no answer in time: unknown).
    outcome: &'static str,
}

/// Consumer lag is labelled as Kafka's own tools name it (group, topic, partition); the group
/// is also the `entity_type` every series carries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    entity_type: &'static str,
    group: &'static str,
    topic: &'static str,
    partition: u32,
}

/// A standby replica's series: one per shard this node keeps warm.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    entity_type: &'static str,
    shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestoreLabels {
    entity_type: &'static str,
    /// `standby` (only the changelog after a standby's position was read) or `changelog`
    /// (cold: the whole partition).
    from: &'static str,
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

/// Queries per message to a peer: 1 to 256.
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

/// The node's registry and every metric family; [`MetricsRegistry::entity_type`] hands out one
/// type's handles.
pub(crate) struct MetricsRegistry {
    registry: Registry,
    counters: Vec<Family<TypeLabels, Counter>>,
    rebalance_seconds: HistogramFamily<RebalanceLabels>,
    handoff_step_seconds: HistogramFamily<HandoffLabels>,
    restore_seconds: HistogramFamily<TypeLabels>,
    failover_seconds: HistogramFamily<TypeLabels>,
    restores: Family<RestoreLabels, Counter>,
    restore_records_remaining: Family<TypeLabels, Gauge>,
    standby_lag: Family<ShardLabels, Gauge>,
    standby_shards: Family<TypeLabels, Gauge>,
    standby_entities: Family<TypeLabels, Gauge>,
    query_seconds: HistogramFamily<QueryLabels>,
    remote_query_batch: HistogramFamily<TypeLabels>,
    peer_queries: Family<PeerQueryLabels, Counter>,
    command_seconds: HistogramFamily<CommandLabels>,
    partitions: Family<TypeLabels, Gauge>,
    shards_owned: Family<TypeLabels, Gauge>,
    live_entities: Family<TypeLabels, Gauge>,
    passivated_entities: Family<TypeLabels, Gauge>,
    consumer_lag: Family<PartitionLabels, Gauge>,
    in_flight_events: Gauge,
    peers_not_answering: Gauge,
}

/// One entity type's metrics (its counters are in its [`NodeStats`]).
pub(crate) struct Metrics {
    entity_type: &'static str,
    topic: &'static str,
    rebalance_seconds: HistogramFamily<RebalanceLabels>,
    handoff_step_seconds: HistogramFamily<HandoffLabels>,
    query_seconds: HistogramFamily<QueryLabels>,
    /// Per shard: from its assignment until its state was restored and it went live.
    pub restore_seconds: Histogram,
    /// Per shard whose owner left while holding it: from the moment this node saw it leave
    /// until the shard was live here.
    pub failover_seconds: Histogram,
    restores: Family<RestoreLabels, Counter>,
    /// Changelog records the running restores have still to read.
    pub restore_records_remaining: Gauge,
    standby_lag: Family<ShardLabels, Gauge>,
    /// Shards this node keeps a standby replica of.
    pub standby_shards: Gauge,
    /// Entities in this node's standby replicas.
    pub standby_entities: Gauge,
    /// Queries per message to a peer (see `cluster::query_batcher`).
    pub remote_query_batch: Histogram,
    /// Queries sent to an owner over the query link (see `cluster::query_link`).
    pub peer_queries_link: Counter,
    /// Queries sent to an owner through the ractor_cluster session.
    pub peer_queries_remoting: Counter,
    command_seconds: HistogramFamily<CommandLabels>,
    shards_owned: Gauge,
    live_entities: Gauge,
    passivated_entities: Gauge,
    consumer_lag: Family<PartitionLabels, Gauge>,
    /// The partitions whose lag the last scrape set.
    lag_partitions: std::sync::Mutex<Vec<u32>>,
}

/// What only the scraper can see of one entity type: read when `/metrics` is requested.
pub(crate) struct ScrapeInputs<'a> {
    pub shards: &'a [u32],
    pub live_entities: usize,
    pub stored_entities: usize,
    /// Consumer lag per owned partition (see `lag`).
    pub lags: &'a [(u32, i64)],
}

impl MetricsRegistry {
    pub fn new(prefix: &str) -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix(prefix);
        let counters = NodeStats::NAMES
            .iter()
            .map(|(name, help)| {
                let family = Family::<TypeLabels, Counter>::default();
                registry.register(*name, *help, family.clone());
                family
            })
            .collect();
        let this = Self {
            registry: Registry::default(),
            counters,
            rebalance_seconds: Family::new_with_constructor(slow_histogram),
            handoff_step_seconds: Family::new_with_constructor(slow_histogram),
            restore_seconds: Family::new_with_constructor(slow_histogram),
            failover_seconds: Family::new_with_constructor(slow_histogram),
            restores: Family::default(),
            restore_records_remaining: Family::default(),
            standby_lag: Family::default(),
            standby_shards: Family::default(),
            standby_entities: Family::default(),
            query_seconds: Family::new_with_constructor(request_histogram),
            remote_query_batch: Family::new_with_constructor(batch_histogram),
            peer_queries: Family::default(),
            command_seconds: Family::new_with_constructor(request_histogram),
            partitions: Family::default(),
            shards_owned: Family::default(),
            live_entities: Family::default(),
            passivated_entities: Family::default(),
            consumer_lag: Family::default(),
            in_flight_events: Gauge::default(),
            peers_not_answering: Gauge::default(),
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
            "failover_seconds",
            "Per shard whose owner left while holding it, from seeing the owner leave until live here",
            this.failover_seconds.clone(),
        );
        registry.register(
            "restores",
            "Shards restored, from a standby replica (only the changelog after it) or the whole changelog",
            this.restores.clone(),
        );
        registry.register(
            "restore_records_remaining",
            "Changelog records the running restores have still to read",
            this.restore_records_remaining.clone(),
        );
        registry.register(
            "standby_lag_records",
            "Per standby replica kept here: changelog offsets between its position and the changelog's end",
            this.standby_lag.clone(),
        );
        registry.register(
            "standby_shards",
            "Shards this node keeps a standby replica of",
            this.standby_shards.clone(),
        );
        registry.register(
            "standby_entities",
            "Entities in this node's standby replicas",
            this.standby_entities.clone(),
        );
        registry.register(
            "grpc_request_seconds",
            "Entity queries (the applications' gRPC requests): latency by route and outcome",
            this.query_seconds.clone(),
        );
        registry.register(
            "remote_query_batch_size",
            "Queries sent to a peer in one message",
            this.remote_query_batch.clone(),
        );
        registry.register(
            "peer_queries",
            "Queries sent to the owner on another node, by transport (link: the query link to its management port; remoting: the cluster session)",
            this.peer_queries.clone(),
        );
        registry.register(
            "command_seconds",
            "Commands sent from this node, from the call to the committed answer, by path (direct: run by this node's shard without a record; forwarded: run by the owner's shard without a record, over the query link; record: written to the input topic for the owner; none: refused before it went anywhere) and outcome (ok, refused, failed, invalid_argument, unavailable)",
            this.command_seconds.clone(),
        );
        registry.register(
            "partitions",
            "Partitions of the entity type's input topic: its shards, cluster-wide (every node reports it; the nodes' shards_owned add up to it)",
            this.partitions.clone(),
        );
        registry.register(
            "shards_owned",
            "Shards (partitions) hosted by this node",
            this.shards_owned.clone(),
        );
        registry.register(
            "live_entities",
            "Live entities (active recently; the others are passivated)",
            this.live_entities.clone(),
        );
        registry.register(
            "passivated_entities",
            "Entities with state here whose actor is passivated",
            this.passivated_entities.clone(),
        );
        registry.register(
            "consumer_lag",
            "Events in the partition after this node's committed offset",
            this.consumer_lag.clone(),
        );
        registry.register(
            "in_flight_events",
            "Events dispatched to shards and not yet applied (every entity type)",
            this.in_flight_events.clone(),
        );
        registry.register(
            "peers_not_answering",
            "Peers whose last forwarded query or command went unanswered (see /cluster/members)",
            this.peers_not_answering.clone(),
        );
        Self {
            registry: root,
            ..this
        }
    }

    /// The counters and metrics of the entity type consumed by `group` from `topic`, which has
    /// `partitions`.
    pub fn entity_type(&self, group: &str, topic: &str, partitions: u32) -> (NodeStats, Metrics) {
        // Label values must be `'static` to stay cheap on every observation; a node hosts a
        // handful of types for its whole life, so their names are kept for it.
        let entity_type: &'static str = Box::leak(group.to_string().into_boxed_str());
        let topic: &'static str = Box::leak(topic.to_string().into_boxed_str());
        let labels = TypeLabels { entity_type };
        self.partitions
            .get_or_create(&labels)
            .set(i64::from(partitions));
        let stats = NodeStats::from_counters(
            self.counters
                .iter()
                .map(|family| family.get_or_create(&labels).clone()),
        );
        // One statement each: a family's guard lives to the end of the statement that got it,
        // and a second `get_or_create` of the same family in that statement would deadlock.
        let peer_queries_link = self.peer_queries(entity_type, "link");
        let peer_queries_remoting = self.peer_queries(entity_type, "remoting");
        let metrics = Metrics {
            entity_type,
            topic,
            rebalance_seconds: self.rebalance_seconds.clone(),
            handoff_step_seconds: self.handoff_step_seconds.clone(),
            query_seconds: self.query_seconds.clone(),
            restore_seconds: self.restore_seconds.get_or_create(&labels).clone(),
            failover_seconds: self.failover_seconds.get_or_create(&labels).clone(),
            restores: self.restores.clone(),
            restore_records_remaining: self
                .restore_records_remaining
                .get_or_create(&labels)
                .clone(),
            standby_lag: self.standby_lag.clone(),
            standby_shards: self.standby_shards.get_or_create(&labels).clone(),
            standby_entities: self.standby_entities.get_or_create(&labels).clone(),
            remote_query_batch: self.remote_query_batch.get_or_create(&labels).clone(),
            peer_queries_link,
            peer_queries_remoting,
            command_seconds: self.command_seconds.clone(),
            shards_owned: self.shards_owned.get_or_create(&labels).clone(),
            live_entities: self.live_entities.get_or_create(&labels).clone(),
            passivated_entities: self.passivated_entities.get_or_create(&labels).clone(),
            consumer_lag: self.consumer_lag.clone(),
            lag_partitions: std::sync::Mutex::new(Vec::new()),
        };
        (stats, metrics)
    }

    fn peer_queries(&self, entity_type: &'static str, transport: &'static str) -> Counter {
        self.peer_queries
            .get_or_create(&PeerQueryLabels {
                entity_type,
                transport,
            })
            .clone()
    }

    /// The Prometheus text exposition, after each type's scrape-time gauges were refreshed
    /// ([`Metrics::refresh`]).
    pub fn render(&self, in_flight: usize, peers_not_answering: usize) -> String {
        self.in_flight_events.set(in_flight as i64);
        self.peers_not_answering.set(peers_not_answering as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Metrics {
    pub fn observe_rebalance(&self, kind: &'static str, took: Duration) {
        self.rebalance_seconds
            .get_or_create(&RebalanceLabels {
                entity_type: self.entity_type,
                kind,
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_handoff_step(&self, step: &'static str, took: Duration) {
        self.handoff_step_seconds
            .get_or_create(&HandoffLabels {
                entity_type: self.entity_type,
                step,
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_query(&self, route: &'static str, outcome: &'static str, took: Duration) {
        self.query_seconds
            .get_or_create(&QueryLabels {
                entity_type: self.entity_type,
                route,
                outcome,
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_command(&self, path: &'static str, outcome: &'static str, took: Duration) {
        self.command_seconds
            .get_or_create(&CommandLabels {
                entity_type: self.entity_type,
                path,
                outcome,
            })
            .observe(took.as_secs_f64());
    }

    /// Counts one restored shard; `from_standby`: only the changelog after a standby was read.
    pub fn count_restore(&self, from_standby: bool) {
        self.restores
            .get_or_create(&RestoreLabels {
                entity_type: self.entity_type,
                from: if from_standby { "standby" } else { "changelog" },
            })
            .inc();
    }

    /// Sets the lag of the standby replica of `shard`; `None` when this node no longer keeps it.
    pub fn set_standby_lag(&self, shard: u32, lag: Option<i64>) {
        let labels = ShardLabels {
            entity_type: self.entity_type,
            shard,
        };
        match lag {
            Some(lag) => {
                self.standby_lag.get_or_create(&labels).set(lag);
            }
            None => {
                self.standby_lag.remove(&labels);
            }
        }
    }

    fn lag_labels(&self, partition: u32) -> PartitionLabels {
        PartitionLabels {
            entity_type: self.entity_type,
            group: self.entity_type,
            topic: self.topic,
            partition,
        }
    }

    /// Sets the gauges only a scrape can read.
    pub fn refresh(&self, inputs: &ScrapeInputs<'_>) {
        self.shards_owned.set(inputs.shards.len() as i64);
        self.live_entities.set(inputs.live_entities as i64);
        self.passivated_entities
            .set(inputs.stored_entities.saturating_sub(inputs.live_entities) as i64);
        // The lag family holds every type's series: drop only this type's partitions it no
        // longer reports (those handed off since the last scrape).
        let mut reported = self.lag_partitions.lock().expect("lag lock poisoned");
        for gone in reported
            .iter()
            .filter(|p| !inputs.lags.iter().any(|(q, _)| q == *p))
        {
            self.consumer_lag.remove(&self.lag_labels(*gone));
        }
        *reported = inputs.lags.iter().map(|(p, _)| *p).collect();
        for &(partition, lag) in inputs.lags {
            self.consumer_lag
                .get_or_create(&self.lag_labels(partition))
                .set(lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_carries_its_entity_type_and_handed_off_lags_disappear() {
        let registry = MetricsRegistry::new("processor");
        let (users, user_metrics) = registry.entity_type("users", "user-events", 16);
        let (devices, device_metrics) = registry.entity_type("devices", "readings", 4);
        NodeStats::add(&users.events_processed_local, 7);
        NodeStats::add(&devices.events_processed_local, 2);
        user_metrics.observe_query("remote", "ok", Duration::from_millis(2));
        user_metrics.observe_command("forwarded", "refused", Duration::from_millis(9));
        user_metrics.refresh(&ScrapeInputs {
            shards: &[1, 2],
            live_entities: 3,
            stored_entities: 10,
            lags: &[(1, 5), (2, 0)],
        });
        device_metrics.refresh(&ScrapeInputs {
            shards: &[1],
            live_entities: 0,
            stored_entities: 0,
            lags: &[(1, 9)],
        });
        let text = registry.render(4, 1);
        for line in [
            r#"processor_events_processed_local_total{entity_type="users"} 7"#,
            r#"processor_events_processed_local_total{entity_type="devices"} 2"#,
            r#"processor_shards_owned{entity_type="users"} 2"#,
            r#"processor_partitions{entity_type="users"} 16"#,
            r#"processor_partitions{entity_type="devices"} 4"#,
            r#"processor_consumer_lag{entity_type="users",group="users",topic="user-events",partition="1"} 5"#,
            r#"processor_consumer_lag{entity_type="devices",group="devices",topic="readings",partition="1"} 9"#,
            r#"processor_passivated_entities{entity_type="users"} 7"#,
            r#"processor_grpc_request_seconds_count{entity_type="users",route="remote",outcome="ok"} 1"#,
            r#"processor_command_seconds_count{entity_type="users",path="forwarded",outcome="refused"} 1"#,
            "processor_in_flight_events 4",
            "processor_peers_not_answering 1",
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
        assert_eq!(
            text.matches("# TYPE processor_shards_owned ").count(),
            1,
            "one family for every type"
        );
        // Partition 1 of users handed off: its series goes, the other type's stays.
        user_metrics.refresh(&ScrapeInputs {
            shards: &[2],
            live_entities: 0,
            stored_entities: 0,
            lags: &[(2, 0)],
        });
        user_metrics.count_restore(true);
        user_metrics.count_restore(false);
        user_metrics.count_restore(true);
        user_metrics.set_standby_lag(5, Some(12));
        user_metrics.set_standby_lag(6, Some(0));
        user_metrics.set_standby_lag(6, None);
        let text = registry.render(0, 0);
        assert!(!text
            .contains(r#"entity_type="users",group="users",topic="user-events",partition="1""#));
        for line in [
            r#"processor_restores_total{entity_type="users",from="standby"} 2"#,
            r#"processor_restores_total{entity_type="users",from="changelog"} 1"#,
            r#"processor_standby_lag_records{entity_type="users",shard="5"} 12"#,
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
        assert!(
            !text.contains(r#"shard="6""#),
            "a dropped standby's lag series goes"
        );
        assert!(text.contains(
            r#"processor_consumer_lag{entity_type="devices",group="devices",topic="readings",partition="1"} 9"#
        ));
    }
}
