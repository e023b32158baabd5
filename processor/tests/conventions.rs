//! What operators expect of a node, on a real broker: ports bound to every interface while the
//! node is advertised as 127.0.0.1, seeds given as DNS names, JSON log lines,
//! `/metrics` in OpenMetrics that a Prometheus parser reads, `/cluster/members` in Akka
//! Management's shape.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn seeds_by_name_json_logs_openmetrics_and_akka_shaped_members() {
    require_broker();
    let mut spec = ClusterSpec::new("conventions", 17_000);
    spec.seed_host = "localhost".into();
    spec.extra_args = [
        "--log-format",
        "json",
        "--bind-host",
        "0.0.0.0",
        "--cookie",
        "conventions-cookie",
    ]
    .map(String::from)
    .to_vec();
    spec.create_topic(8);
    // Node 1 first and alone for a while: it is the oldest member for certain.
    let node1 = spec.start_node(1);
    wait_for_split(&[&node1], 8).await;
    let node2 = spec.start_node(2);
    wait_for_split(&[&node1, &node2], 8).await;
    let ledger = spec.produce(500, 50, "ledger.json");
    // Each node answers for every user: the remote hops work between nodes found by name.
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(60)).await;

    // The changelog the node created carries the runtime's topic settings (compacted, small
    // preallocated indexes: kafka_sharding::CHANGELOG_TOPIC_CONFIG says why).
    let changelog = format!("{}-{}-state", spec.group, spec.topic);
    let config = topic_config_at(&spec.bootstrap, &changelog).await;
    for (key, value) in kafka_sharding::CHANGELOG_TOPIC_CONFIG {
        assert_eq!(
            config.get(*key).map(String::as_str),
            Some(*value),
            "{changelog}: {key}"
        );
    }

    // Members: both up, one leader and one oldest (node 1 started first), nothing unreachable.
    let members = node2.get_json("/cluster/members").await.unwrap();
    assert_eq!(members["selfNode"], node2.id.as_str(), "{members}");
    let listed = members["members"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{members}");
    for member in listed {
        assert_eq!(member["status"], "Up", "{member}");
        assert_eq!(member["roles"], serde_json::json!([spec.group]), "{member}");
        assert!(
            member["nodeUid"].as_str().is_some_and(|u| !u.is_empty()),
            "{member}"
        );
    }
    assert_eq!(members["unreachable"], serde_json::json!([]), "{members}");
    assert_eq!(members["leader"], node1.id.as_str(), "{members}");
    assert_eq!(members["oldest"], node1.id.as_str(), "{members}");

    // /metrics: OpenMetrics, read by a Prometheus text parser.
    let response = reqwest::get(format!("http://127.0.0.1:{}/metrics", node1.management))
        .await
        .unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    let body = response.text().await.unwrap();
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let lag = parsed
        .samples
        .iter()
        .find(|s| s.metric == "processor_consumer_lag")
        .expect("consumer lag series");
    for label in ["group", "topic", "partition", "entity_type"] {
        assert!(
            lag.labels.get(label).is_some(),
            "lag without {label}: {lag:?}"
        );
    }
    assert_eq!(lag.labels.get("topic"), Some(spec.topic.as_str()));
    let processed: f64 = parsed
        .samples
        .iter()
        .filter(|s| s.metric == "processor_events_processed_local_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(processed > 0.0, "the parser read the counters");

    // Every log line is one JSON object; the start-up line is among them.
    let log = node1.log();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 3, "{log}");
    assert!(
        log.contains("up: remoting") && log.contains("assigned to this node"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_properties_from_a_file_the_environment_and_flags_reach_the_clients_and_secrets_stay_out_of_the_logs(
) {
    require_broker();
    let mut spec = ClusterSpec::new("kafka-properties", 18_000);
    spec.create_topic(4);
    let file = log_dir(&spec.name).join("client.properties");
    std::fs::write(
        &file,
        "# what an operator's file holds\nsecurity.protocol=plaintext\n\
         sasl.password=hunter2-file-secret\nconsumer.queued.min.messages=12345\n",
    )
    .unwrap();
    spec.extra_env = vec![
        // librdkafka's configuration dump, at debug level, names every property it was given.
        ("RUST_LOG".into(), "info,librdkafka=debug".into()),
        (
            "KAFKA_CLIENT_CONSUMER_FETCH_ERROR_BACKOFF_MS".into(),
            "321".into(),
        ),
    ];
    spec.extra_args = vec![
        "--kafka-config".into(),
        file.display().to_string(),
        "-X".into(),
        "consumer.sasl.password=flag-secret-9".into(),
        "-X".into(),
        "consumer.queued.min.messages=23456".into(),
        "--kafka-debug".into(),
        "conf".into(),
    ];
    let node = spec.start_node(1);
    wait_for_split(&[&node], 4).await;
    let ledger = spec.produce(300, 30, "ledger.json");
    wait_for_ledger(&spec, &[1], &ledger, Duration::from_secs(60)).await;

    let log = node.log();
    assert!(
        log.contains("queued.min.messages = 23456"),
        "the flag reached the consumer, over the file: {}",
        log.lines()
            .filter(|l| l.contains("queued.min"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log.contains("fetch.error.backoff.ms = 321"),
        "the environment reached the consumer"
    );
    for secret in ["hunter2-file-secret", "flag-secret-9"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}
