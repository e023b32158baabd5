//! Self-healing under real faults, every node a separate process: a broker outage past the
//! session timeout, a killed group coordinator in a 3-broker cluster, a fenced transactional
//! producer, and a node with the wrong cookie. Every node stays alive and every total ends
//! equal to the producers' ledger. And a node started before its input topic exists: alive
//! and scrapeable while it waits, ready once the topic is there.
//!
//! The outage and coordinator tests stop and kill brokers, so they start brokers of their own
//! (`support::Broker`); the others use the shared test broker.

mod support;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use support::*;

/// The partitions whose consumer lag a node's /metrics reports.
fn lag_partitions(
    metrics: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeSet<u32> {
    metrics
        .keys()
        .filter(|series| series.starts_with("processor_consumer_lag{"))
        .filter_map(|series| {
            let label = series.split("partition=\"").nth(1)?;
            label.split('"').next()?.parse().ok()
        })
        .collect()
}

/// Readiness through both front ends: (HTTP status of /ready, gRPC health) of each node.
async fn readiness(spec: &ClusterSpec, nodes: &[&Node]) -> Vec<(u16, Option<i32>)> {
    let mut out = Vec::new();
    for node in nodes {
        let status = get_status(node.management, "/ready")
            .await
            .map(|(s, _)| s)
            .unwrap_or(0);
        out.push((status, grpc_health(&spec.grpc_url(node.index)).await));
    }
    out
}

/// Waits until every node of `nodes` is ready through both front ends.
async fn until_ready(spec: &ClusterSpec, nodes: &[&Node], within: Duration) {
    eventually(
        within,
        "every node ready (/ready 200, gRPC SERVING)",
        || async {
            let states = readiness(spec, nodes).await;
            states
                .iter()
                .all(|s| *s == (200, Some(SERVING)))
                .then_some(())
        },
    )
    .await;
}

/// Creates the topic with `partitions` and starts nodes 1 and 2 until they split it.
async fn two_nodes(spec: &ClusterSpec, partitions: u32) -> (Node, Node) {
    spec.create_topic(partitions);
    let node1 = spec.start_node(1);
    let node2 = spec.start_node(2);
    wait_for_split(&[&node1, &node2], partitions).await;
    (node1, node2)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_beyond_the_session_timeout_is_survived_with_exact_totals() {
    let broker = Broker::start(19_500, 1);
    let spec = ClusterSpec::new("broker-outage", 31_000).on(&broker);
    let (mut node1, mut node2) = two_nodes(&spec, 32).await;
    until_ready(&spec, &[&node1, &node2], Duration::from_secs(30)).await;

    // About 50 s of input at a steady rate; the broker is away for 30 s of it.
    let producer = spec.produce_in_background(10_000, 300, 200, "outage.json");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log_marks = [node1.log().len(), node2.log().len()];
    broker.stop();
    let stopped_at = Instant::now();

    // Beyond the 6 s session timeout: both nodes are alive and say they are not ready.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        node1.is_running() && node2.is_running(),
        "a node exited during the outage"
    );
    let during = readiness(&spec, &[&node1, &node2]).await;
    assert_eq!(
        during,
        vec![(503, Some(NOT_SERVING)); 2],
        "not ready while Kafka is away"
    );
    let (_, body) = get_status(node1.management, "/ready").await.unwrap();
    assert!(
        body["reasons"].to_string().contains("Kafka unreachable"),
        "/ready says why: {body}"
    );
    let alive = get_status(node1.management, "/alive").await.unwrap();
    assert_eq!(alive.0, 200, "alive while Kafka is away");

    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped_at.elapsed())).await;
    broker.restart();
    let ledger = producer.wait();
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(120)).await;
    assert!(
        node1.is_running() && node2.is_running(),
        "a node exited after the outage"
    );
    until_ready(&spec, &[&node1, &node2], Duration::from_secs(60)).await;

    for (node, mark) in [(&node1, log_marks[0]), (&node2, log_marks[1])] {
        let log = node.log();
        let printed = librdkafka_prints_since(&log, mark);
        assert!(
            printed.is_empty(),
            "node {} let librdkafka print {} lines of its own past the node's logger:\n{}",
            node.index,
            printed.len(),
            printed[..printed.len().min(10)].join("\n")
        );
        let lines = warnings_since(&log, mark);
        assert!(
            lines.len() <= 30,
            "node {} logged {} warnings and errors about the outage:\n{}",
            node.index,
            lines.len(),
            lines.join("\n")
        );
        assert!(
            log[mark..].contains("is unreachable"),
            "node {} said the outage started",
            node.index
        );
        assert!(
            log[mark..].contains("is reachable again"),
            "node {} said the outage ended",
            node.index
        );
    }
    assert!(node1.stop().success() && node2.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_group_coordinator_of_three_brokers_keeps_every_node_alive_and_totals_exact() {
    let brokers = Broker::start(19_600, 3);
    let spec = ClusterSpec::new("coordinator-kill", 32_000).on(&brokers);
    let (mut node1, mut node2) = two_nodes(&spec, 32).await;
    // The node's own topics follow the input's replication factor (3 by the brokers' default).
    let changelog = format!("{}-{}-state", spec.group, spec.topic);
    assert_eq!(
        replication_factor_at(&spec.bootstrap, &changelog),
        3,
        "changelog replication factor"
    );

    let producer = spec.produce_in_background(8_000, 300, 250, "coordinator.json");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let coordinator = group_coordinator(&spec.bootstrap, &spec.group);
    brokers.kill_broker(coordinator as u8);
    let ledger = producer.wait();
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(120)).await;
    assert!(
        node1.is_running() && node2.is_running(),
        "a node exited after the coordinator was killed"
    );
    let now = group_coordinator(&spec.bootstrap, &spec.group);
    assert_ne!(now, coordinator, "another broker coordinates the group");
    // /metrics reports the consumer lag of every partition each node owns, those the killed
    // broker led included (their offsets are asked of the new leaders).
    for node in [&node1, &node2] {
        eventually(
            Duration::from_secs(20),
            "the lag of every owned partition at /metrics",
            || async {
                let owned = node.try_shards().await?;
                let lagged = lag_partitions(&node.metrics().await?);
                (lagged == owned).then_some(())
            },
        )
        .await;
    }
    // Each hand-off checkpoint of the stops ends by its deadline, whatever the coordinators
    // do (librdkafka can wait on a lost one for good).
    assert!(node1.stop().success() && node2.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_producer_is_fenced_recovers_without_exiting_and_counts_exactly_once() {
    require_broker();
    let spec = ClusterSpec::new("fenced", 12_000);
    let (mut node1, mut node2) = two_nodes(&spec, 32).await;

    let producer = spec.produce_in_background(6_000, 300, 300, "fenced.json");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A twin with node 1's transactional id (a misconfigured copy) fences node 1's producer.
    let transactional_id = format!("{}-{}", spec.group, spec.node_id(1));
    for _ in 0..2 {
        let recoveries = node1.log().matches("recovered in").count();
        let twin: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &spec.bootstrap)
            .set("transactional.id", &transactional_id)
            .create()
            .unwrap();
        twin.init_transactions(Duration::from_secs(30)).unwrap();
        drop(twin);
        eventually(
            Duration::from_secs(60),
            "node 1 to recover from the fence",
            || async { (node1.log().matches("recovered in").count() > recoveries).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let ledger = producer.wait();
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(90)).await;
    assert!(node1.is_running(), "the fenced node exited");
    let log = node1.log();
    assert!(
        log.contains("the checkpoint producer failed"),
        "node 1 said why it recovers"
    );
    assert!(
        log.matches("recovered in").count() >= 2,
        "node 1 recovered from both fences"
    );
    assert!(node1.stop().success() && node2.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_the_wrong_cookie_is_refused_and_takes_no_partitions() {
    require_broker();
    let spec = ClusterSpec::new("wrong-cookie", 13_000);
    let (mut node1, mut node2) = two_nodes(&spec, 128).await;
    let mut intruder = spec.start_node_with(3, &["--cookie", "not-the-cluster-cookie"]);

    eventually(
        Duration::from_secs(30),
        "the refused node to name the cookie",
        || async {
            intruder
                .log()
                .contains("refused this node: is --cookie the same on every node?")
                .then_some(())
        },
    )
    .await;
    // Long enough for a node that joined the group to have been given partitions.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_refused(&spec, &mut intruder).await;
    let assignment = group_assignment(&spec.group, &spec.topic);
    let owned: usize = assignment.values().map(|p| p.len()).sum();
    assert_eq!(
        owned, 128,
        "the admitted nodes own every partition: {assignment:?}"
    );

    let ledger = spec.produce(2_000, 500, "cookie.json");
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(60)).await;
    intruder.stop();
    assert!(node1.stop().success() && node2.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_partition_count_and_a_deleted_topic_end_the_node_with_their_exit_codes() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    require_broker();
    let spec = ClusterSpec::new("topic-faults", 14_000);
    spec.create_topic(8);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &spec.bootstrap)
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));

    let mut node = spec.start_node(1);
    wait_for_split(&[&node], 8).await;
    let grown = admin
        .create_partitions(&[NewPartitions::new(&spec.topic, 12)], &options)
        .await
        .unwrap();
    assert!(grown[0].is_ok(), "{grown:?}");
    assert_eq!(
        node.exit_code_within(Duration::from_secs(30)),
        Some(5),
        "partition count changed: exit 5"
    );
    assert!(node
        .log()
        .contains("now has 12 partitions, but this node started with 8"));

    // Another topic: the first one's changelog keeps 8 partitions, which a restart refuses.
    let spec = ClusterSpec::new("topic-deleted", 14_500);
    spec.create_topic(8);
    let mut node = spec.start_node(1);
    wait_for_split(&[&node], 8).await;
    let deleted = admin.delete_topics(&[&spec.topic], &options).await.unwrap();
    assert!(deleted[0].is_ok(), "{deleted:?}");
    assert_eq!(
        node.exit_code_within(Duration::from_secs(30)),
        Some(4),
        "topic deleted: exit 4"
    );
    assert!(node
        .log()
        .contains(&format!("input topic {} was deleted", spec.topic)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_waiting_for_its_topic_is_alive_and_scrapeable_and_says_what_it_waits_for() {
    require_broker();
    let spec = ClusterSpec::new("no-topic-yet", 6_000);
    let mut node = spec.start_node(1);

    // Waiting: the management port answers, and /ready names the missing topic.
    let (status, body) = eventually(Duration::from_secs(30), "the waiting node's /ready", || {
        get_status(node.management, "/ready")
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains(&spec.topic) && reasons.contains("starting"),
        "/ready says what it waits for: {body}"
    );
    let (alive, _) = get_status(node.management, "/alive").await.unwrap();
    assert_eq!(alive, 200);
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", node.management))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("# TYPE processor_in_flight_events gauge") && text.ends_with("# EOF\n"),
        "the node's metrics, without any entity type's series yet: {text}"
    );
    let stats = reqwest::get(format!(
        "http://127.0.0.1:{}/cluster/stats",
        node.management
    ))
    .await
    .unwrap();
    assert_eq!(
        stats.status(),
        503,
        "nothing else is served while it starts"
    );
    assert!(
        node.log()
            .contains(&format!("waiting for topic {}", spec.topic)),
        "its log says so too"
    );

    // The topic appears: the same node goes on, becomes ready and serves its users.
    spec.create_topic(4);
    until_ready(&spec, &[&node], Duration::from_secs(60)).await;
    let ledger = spec.produce(500, 50, "late-topic.json");
    wait_for_ledger(&spec, &[1], &ledger, Duration::from_secs(60)).await;
    assert!(node.stop().success());
}
