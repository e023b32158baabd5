//! `GET /metrics` against a real broker: scraped while two nodes process a steady stream, the
//! counters only grow, and at the end they agree with what the producer wrote. Then a real
//! Prometheus (Debian's `prometheus` and `promtool`, installed by `.ci/run`) scrapes two nodes
//! with the shipped `monitoring/` configuration: the rules' own unit tests pass, both targets
//! are up, the figures it stores are the nodes', and a SIGKILLed node raises its alert.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kafka_sharding::partitioner::partition_for_key;
use proto::ledger::Ledger;
use proto::service::user_service_client::UserServiceClient;
use proto::service::UserStatsRequest;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use support::*;

type Samples = BTreeMap<String, f64>;

/// A metric summed over its series (every entity type's, when labelled by type).
fn sample(samples: &Samples, name: &str) -> f64 {
    sum_of(samples, name, "")
}

/// Sum of every series of a metric family whose labels contain `label` (all series if empty).
fn sum_of(samples: &Samples, name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (metric, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
            metric == name && labels.contains(label)
        })
        .map(|(_, v)| v)
        .sum()
}

const COUNTERS: [&str; 5] = [
    "processor_events_consumed_total",
    "processor_events_processed_local_total",
    "processor_events_dead_lettered_total",
    "processor_checkpoints_committed_total",
    "processor_partitions_assigned_total",
];

async fn scrape(node: &Node) -> Samples {
    eventually(Duration::from_secs(10), "a /metrics answer", || {
        node.metrics()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_what_was_produced() {
    require_broker();
    let spec = ClusterSpec::new("metrics", 30_000);
    let partitions = 16;
    spec.create_topic(partitions);
    let node1 = spec.start_node(1);
    wait_for_split(&[&node1], partitions).await;
    let node2 = spec.start_node(2);
    let split = wait_for_split(&[&node1, &node2], partitions).await;

    // Placement: the gauges and histograms of both rebalances.
    let (m1, m2) = (scrape(&node1).await, scrape(&node2).await);
    assert_eq!(
        sample(&m1, "processor_shards_owned") + sample(&m2, "processor_shards_owned"),
        partitions as f64
    );
    assert_eq!(sample(&m1, "processor_shards_owned"), split[0].len() as f64);
    assert!(
        sum_of(
            &m1,
            "processor_rebalance_callback_seconds_count",
            r#"kind="assigned""#
        ) >= 1.0
    );
    assert!(
        sum_of(
            &m1,
            "processor_rebalance_callback_seconds_count",
            r#"kind="revoked""#
        ) >= 1.0,
        "node 1 handed partitions to node 2"
    );
    assert!(
        sum_of(
            &m1,
            "processor_handoff_step_seconds_count",
            r#"step="drain""#
        ) >= 1.0
    );
    assert!(
        sum_of(
            &m1,
            "processor_handoff_step_seconds_count",
            r#"step="checkpoint""#
        ) >= 1.0
    );
    for (m, owned) in [(&m1, &split[0]), (&m2, &split[1])] {
        assert!(
            sample(m, "processor_restore_seconds_count") >= owned.len() as f64,
            "every shard assigned was restored"
        );
    }

    // A steady stream, with malformed records in the middle, scraped as it is processed.
    let mut background = spec.produce_in_background(20_000, 500, 4_000, "ledger.json");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    for value in [b"\xff\xff not a protobuf".as_slice(), b"\x0a".as_slice()] {
        let record = FutureRecord::<str, [u8]>::to(&spec.topic)
            .key("7")
            .payload(value)
            .partition(partition_for_key(b"7", partitions) as i32);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let mut previous = [scrape(&node1).await, scrape(&node2).await];
    let mut saw_partial = false;
    let mut saw_lag = false;
    let ledger_path = loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = [scrape(&node1).await, scrape(&node2).await];
        for (before, after) in previous.iter().zip(&now) {
            for counter in COUNTERS {
                assert!(
                    sample(after, counter) >= sample(before, counter),
                    "{counter} went down: {before:?} -> {after:?}"
                );
            }
        }
        let processed: f64 = now
            .iter()
            .map(|m| sample(m, "processor_events_processed_local_total"))
            .sum();
        saw_partial |= processed > 0.0 && processed < 20_000.0;
        saw_lag |= now
            .iter()
            .any(|m| sum_of(m, "processor_consumer_lag", "") > 0.0);
        previous = now;
        if background.finished() {
            break background.wait();
        }
    };
    assert!(
        saw_partial,
        "a scrape during the run saw processing under way"
    );
    assert!(
        saw_lag,
        "a scrape during the run saw events not yet committed as consumer lag"
    );

    let ledger = Ledger::load(&ledger_path).unwrap();
    wait_for_ledger(&spec, &[1, 2], &ledger_path, Duration::from_secs(120)).await;

    // At the end: every produced event processed once, where it was consumed; the two malformed
    // records dead-lettered; no lag left once the last checkpoint is committed.
    let nodes = [&node1, &node2];
    let settled = eventually(
        Duration::from_secs(30),
        "zero consumer lag on every partition",
        || async {
            let mut all = Vec::new();
            for node in nodes {
                let m = node.metrics().await?;
                let lag_series = sum_of(&m, "processor_consumer_lag", "partition");
                let partitions_with_lag = m
                    .keys()
                    .filter(|k| k.starts_with("processor_consumer_lag{"))
                    .count();
                if lag_series != 0.0
                    || partitions_with_lag as f64 != sample(&m, "processor_shards_owned")
                {
                    return None;
                }
                all.push(m);
            }
            Some(all)
        },
    )
    .await;
    let total = |name: &str| settled.iter().map(|m| sample(m, name)).sum::<f64>();
    assert_eq!(
        total("processor_events_processed_local_total"),
        ledger.acknowledged_events as f64
    );
    assert_eq!(
        total("processor_events_consumed_total"),
        ledger.acknowledged_events as f64
    );
    assert_eq!(total("processor_events_forwarded_out_total"), 0.0);
    assert_eq!(total("processor_events_skipped_replayed_total"), 0.0);
    assert_eq!(total("processor_events_dead_lettered_total"), 2.0);
    assert_eq!(total("processor_in_flight_events"), 0.0);
    let with_state = ledger.totals.len() as f64;
    assert_eq!(
        total("processor_live_entities") + total("processor_passivated_entities"),
        with_state
    );

    // Queries: `client verify` asked every user through both nodes, so each node answered
    // locally and through the other; a bad request is counted as such.
    let users = ledger.user_ids().len() as f64;
    for m in &settled {
        let local = sum_of(
            m,
            "processor_grpc_request_seconds_count",
            r#"route="local",outcome="ok""#,
        );
        let remote = sum_of(
            m,
            "processor_grpc_request_seconds_count",
            r#"route="remote",outcome="ok""#,
        );
        assert!(
            local > 0.0 && remote > 0.0,
            "local {local}, remote {remote}"
        );
        assert!(
            local + remote >= users,
            "every user was asked through each node ({local} + {remote} < {users})"
        );
        // Every remote answer came from a query sent to the owner: over the query link (the
        // default), or through the cluster session in (possibly batched) messages.
        let over_link = sum_of(m, "processor_peer_queries_total", r#"transport="link""#);
        let over_session = sum_of(m, "processor_peer_queries_total", r#"transport="remoting""#);
        let batched = sample(m, "processor_remote_query_batch_size_sum");
        let messages = sample(m, "processor_remote_query_batch_size_count");
        assert!(
            over_link > 0.0 && over_link + over_session >= remote,
            "{over_link} queries over the link and {over_session} through the session for {remote} remote answers"
        );
        assert!(
            batched <= over_session && messages <= batched,
            "batches: {messages} messages, {batched} queries, {over_session} through the session"
        );
    }
    let mut client = UserServiceClient::connect(spec.grpc_url(1)).await.unwrap();
    let status = client
        .user_stats(UserStatsRequest {
            id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let after = scrape(&node1).await;
    assert_eq!(
        sum_of(
            &after,
            "processor_grpc_request_seconds_count",
            r#"outcome="invalid_argument""#
        ),
        1.0
    );
}

/// The repository's `monitoring/` directory: the Prometheus configuration and rules operators
/// are given.
fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

/// Runs one of Prometheus's own tools; a missing one fails the test with what to install.
fn prometheus_tool(tool: &str) -> Command {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        matches!(found, Ok(status) if status.success()),
        "`{tool}` is missing: install Debian's prometheus package (.ci/run does)"
    );
    Command::new(tool)
}

#[test]
fn the_shipped_alert_rules_pass_their_unit_tests_and_the_config_is_valid() {
    // `check config` checks the rules it names too.
    for args in [
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = prometheus_tool("promtool")
            .args(args)
            .current_dir(monitoring())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server of the test's own, scraping `targets` every second with the shipped
/// rules; stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(name: &str, port: u16, targets: &[u16]) -> Self {
        let dir = log_dir(name).join("prometheus");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        // The shipped alerts.yml as it is; only the intervals are the test's (1 s, so a
        // `for: 30s` alert fires within a test's patience).
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n\
             - job_name: kafka-sharding\n  \
               scrape_timeout: 1s\n  \
               static_configs: [{{targets: [{}]}}]\n",
            monitoring().join("alerts.yml").display(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = prometheus_tool("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, port }
    }

    /// `GET /api/v1/<path>?<params>`'s `data`, when the server answers with success.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<Value> {
        let body: Value = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .query(params)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// An instant query whose answer is one number (`None` while it has no sample).
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let data = self.api("query", &[("query", promql)]).await?;
        let result = data["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// The alerts in `state` (`pending` or `firing`): (name, instance label).
    async fn alerts(&self, state: &str) -> Option<Vec<(String, String)>> {
        let data = self.api("alerts", &[]).await?;
        Some(
            data["alerts"]
                .as_array()?
                .iter()
                .filter(|a| a["state"] == state)
                .map(|a| {
                    let labels = &a["labels"];
                    (
                        labels["alertname"].as_str().unwrap_or("").to_string(),
                        labels["instance"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect(),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_every_node_and_the_shipped_alert_fires_for_a_killed_one() {
    require_broker();
    let spec = ClusterSpec::new("prometheus", 7_000);
    let partitions = 8;
    spec.create_topic(partitions);
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    wait_for_split(&[&node1, &node2], partitions).await;
    let (m1, m2) = (spec.management(1), spec.management(2));
    let prometheus = Prometheus::start(&spec.name, spec.port_base + 90, &[m1, m2]);

    // Both nodes' OpenMetrics pages are scraped without an error.
    let up = eventually(
        Duration::from_secs(30),
        "Prometheus scraping both nodes",
        || async {
            let data = prometheus.api("targets", &[]).await?;
            let targets = data["activeTargets"].as_array()?;
            let healthy: Vec<String> = targets
                .iter()
                .filter(|t| t["health"] == "up" && t["lastError"] == "")
                .map(|t| t["labels"]["instance"].as_str().unwrap_or("").to_string())
                .collect();
            (healthy.len() == 2).then_some(healthy)
        },
    )
    .await;
    assert!(up.contains(&format!("127.0.0.1:{m1}")) && up.contains(&format!("127.0.0.1:{m2}")));

    // What Prometheus stores is what the nodes did: every event produced processed once, every
    // shard owned by one node, the topic's partitions as reported.
    let ledger = spec.produce(3_000, 300, "ledger.json");
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(60)).await;
    let produced = Ledger::load(&ledger).unwrap().acknowledged_events as f64;
    eventually(
        Duration::from_secs(30),
        "Prometheus's figures equal to the nodes' work",
        || async {
            let processed = prometheus
                .scalar("sum(processor_events_processed_local_total)")
                .await?;
            let owned = prometheus.scalar("sum(processor_shards_owned)").await?;
            let topic = prometheus.scalar("max(processor_partitions)").await?;
            (processed == produced && owned == partitions as f64 && topic == partitions as f64)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        prometheus.alerts("firing").await.unwrap(),
        Vec::new(),
        "a healthy cluster raises no alert"
    );

    // A crash: node 2's alert fires once it has been down for the rule's 30 s, naming it; node 1
    // takes its shards, as Prometheus sees it.
    node2.kill();
    let firing = eventually(
        Duration::from_secs(60),
        "ShardingNodeDown firing for the killed node",
        || async {
            let firing = prometheus.alerts("firing").await?;
            firing
                .iter()
                .any(|(name, _)| name == "ShardingNodeDown")
                .then_some(firing)
        },
    )
    .await;
    assert_eq!(
        firing
            .iter()
            .filter(|(name, _)| name == "ShardingNodeDown")
            .collect::<Vec<_>>(),
        vec![&("ShardingNodeDown".to_string(), format!("127.0.0.1:{m2}"))],
        "only the killed node is down"
    );
    eventually(
        Duration::from_secs(30),
        "node 1 owning every shard, seen by Prometheus",
        || async {
            let owned = prometheus.scalar("sum(processor_shards_owned)").await?;
            let alive = prometheus.scalar("sum(up)").await?;
            (owned == partitions as f64 && alive == 1.0).then_some(())
        },
    )
    .await;
    drop(node1);
}
