//! Two entity types on one node, on a real broker: the purchase sample and device telemetry,
//! each consuming its own topic in its own consumer group, hosted side by side by two processor
//! nodes. Each type's shards follow its own group's assignment, nothing is forwarded, the
//! telemetry answers equal what the test computes from the readings it produced, and a SIGKILL
//! of a node in mid-stream and its restart keep both types exact.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kafka_sharding::partitioner::partition_for_key;
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::*;
use telemetry::pb::device_telemetry_client::DeviceTelemetryClient;
use telemetry::pb::{DeviceStatsRequest, Reading};

const PURCHASE_PARTITIONS: u32 = 8;
/// Another count than the purchases': the types' shards are independent.
const READING_PARTITIONS: u32 = 6;
const DEVICES: u32 = 40;
/// The entity keeps the last 32 readings; the test asks for the last 5.
const ASK_LAST: u32 = 5;
const ABOVE_MILLI: i64 = 20_000;

struct Telemetry {
    topic: String,
    group: String,
}

/// A type's shards on `node`, from `/cluster/stats` and `/cluster/shards/<type>` (which must agree).
async fn type_shards(node: &Node, group: &str) -> Option<BTreeSet<u32>> {
    let stats = node.stats().await?;
    let from_stats: BTreeSet<u32> = stats["entityTypes"][group]["shards"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_u64())
        .map(|v| v as u32)
        .collect();
    let regions = node.get_json(&format!("/cluster/shards/{group}")).await?;
    let from_regions: BTreeSet<u32> = regions["regions"]
        .as_array()?
        .iter()
        .filter_map(|r| r["shardId"].as_str()?.parse().ok())
        .collect();
    (from_stats == from_regions).then_some(from_stats)
}

/// Waits until, for each (group, topic, partitions), the two nodes split the partitions and each
/// node's shards equal what the broker says the group assigned it.
async fn wait_for_assignments(nodes: &[&Node], types: &[(&str, &str, u32)]) {
    eventually(
        Duration::from_secs(90),
        "each type's shards to equal its group's assignment on every node",
        || async {
            for &(group, topic, partitions) in types {
                let assignment = group_assignment(group, topic);
                let mut union = BTreeSet::new();
                for node in nodes {
                    let shards = type_shards(node, group).await?;
                    if shards.is_empty() || assignment.get(&node.id) != Some(&shards) {
                        return None;
                    }
                    union.extend(shards);
                }
                if union.len() != partitions as usize {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// A type's counter on `node` (an unreachable node or missing counter fails the test).
async fn type_counter(node: &Node, group: &str, name: &str) -> u64 {
    let stats = node
        .stats()
        .await
        .unwrap_or_else(|| panic!("node {} did not answer /cluster/stats", node.id));
    stats["entityTypes"][group][name]
        .as_u64()
        .unwrap_or_else(|| panic!("node {} has no {group} counter {name}: {stats}", node.id))
}

/// The reading a device sends in a round: spread over negatives and positives.
fn value_milli(device: u32, round: u32) -> i64 {
    ((device as i64 * 7_919 + round as i64 * 104_729) % 200_001) - 100_000
}

/// Produces `rounds` readings per device (each round acknowledged before the next, so a
/// device's readings are in order) and returns what was produced per device.
async fn produce_readings(
    topic: String,
    rounds: std::ops::Range<u32>,
    pause: Duration,
) -> BTreeMap<String, Vec<i64>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut produced: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for round in rounds {
        let sends = (0..DEVICES).map(|d| {
            let device = format!("device-{d}");
            let value = value_milli(d, round);
            let payload = Reading {
                device_id: device.clone(),
                at_ms: 1_700_000_000_000 + round as i64,
                value_milli: value,
            }
            .encode_to_vec();
            let producer = producer.clone();
            let topic = topic.clone();
            async move {
                let partition = partition_for_key(device.as_bytes(), READING_PARTITIONS) as i32;
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(device.as_str())
                            .payload(&payload)
                            .partition(partition),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap_or_else(|(e, _)| panic!("reading of {device} not acknowledged: {e}"));
                (device, value)
            }
        });
        for (device, value) in futures::future::join_all(sends).await {
            produced.entry(device).or_default().push(value);
        }
        tokio::time::sleep(pause).await;
    }
    produced
}

/// What a device's answer must be, computed from the produced readings alone.
fn expected_reply(device: &str, values: &[i64]) -> telemetry::pb::DeviceStatsReply {
    let recent = &values[values.len().saturating_sub(ASK_LAST as usize)..];
    telemetry::pb::DeviceStatsReply {
        device_id: device.into(),
        readings: values.len() as u64,
        min_milli: *values.iter().min().unwrap(),
        max_milli: *values.iter().max().unwrap(),
        sum_milli: values.iter().sum(),
        last_at_ms: 1_700_000_000_000 + values.len() as i64 - 1,
        recent_milli: recent.to_vec(),
        recent_sum_milli: recent.iter().sum(),
        recent_above: recent.iter().filter(|v| **v > ABOVE_MILLI).count() as u32,
    }
}

/// Waits until every device's answer through each node equals the expectation.
async fn wait_for_devices(
    spec: &ClusterSpec,
    nodes: &[u16],
    produced: &BTreeMap<String, Vec<i64>>,
) {
    for &i in nodes {
        let url = spec.grpc_url(i);
        eventually(
            Duration::from_secs(120),
            &format!("every device's statistics through node {i} to equal the readings produced"),
            || {
                let url = url.clone();
                async move {
                    let mut client = DeviceTelemetryClient::connect(url).await.ok()?;
                    for (device, values) in produced {
                        let reply = client
                            .device_stats(DeviceStatsRequest {
                                device_id: device.clone(),
                                last: ASK_LAST,
                                above_milli: ABOVE_MILLI,
                            })
                            .await
                            .ok()?
                            .into_inner();
                        if reply != expected_reply(device, values) {
                            return None;
                        }
                    }
                    Some(())
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_host_purchases_and_device_telemetry_each_exact_through_a_kill_and_restart() {
    require_broker();
    let mut spec = ClusterSpec::new("two-types", 16_000);
    let telemetry = Telemetry {
        topic: unique("two-types-readings"),
        group: unique("two-types-devices"),
    };
    spec.extra_args = vec![
        "--telemetry-topic".into(),
        telemetry.topic.clone(),
        "--telemetry-group".into(),
        telemetry.group.clone(),
    ];
    spec.create_topic(PURCHASE_PARTITIONS);
    kafka_sharding::admin::ensure_topic(
        &kafka_sharding::KafkaConnection::new(bootstrap()),
        &telemetry.topic,
        READING_PARTITIONS,
        1,
        &[],
    )
    .await
    .unwrap();
    let types = [
        (
            spec.group.as_str(),
            spec.topic.as_str(),
            PURCHASE_PARTITIONS,
        ),
        (
            telemetry.group.as_str(),
            telemetry.topic.as_str(),
            READING_PARTITIONS,
        ),
    ];

    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    wait_for_assignments(&[&node1, &node2], &types).await;

    // Both types' input in mid-stream when node 2 is killed.
    let purchases = spec.produce_in_background(6_000, 200, 1_500, "purchases.json");
    let readings = tokio::spawn(produce_readings(
        telemetry.topic.clone(),
        0..60,
        Duration::from_millis(50),
    ));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    node2.kill();
    let produced = readings.await.unwrap();
    let ledger = purchases.wait();
    // A bad reading goes to the type's own dead-letter topic.
    let bad: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    bad.send(
        FutureRecord::to(&telemetry.topic)
            .key("device-0")
            .payload(b"\xff\xff not a reading".as_slice())
            .partition(partition_for_key(b"device-0", READING_PARTITIONS) as i32),
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // Node 1 alone took every shard of both types and is exact.
    wait_for_ledger(&spec, &[1], &ledger, Duration::from_secs(120)).await;
    wait_for_devices(&spec, &[1], &produced).await;

    let node2 = spec.start_node(2);
    wait_for_assignments(&[&node1, &node2], &types).await;
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(120)).await;
    wait_for_devices(&spec, &[1, 2], &produced).await;

    for node in [&node1, &node2] {
        for (group, _, _) in types {
            assert_eq!(
                type_counter(node, group, "events_forwarded_out").await,
                0,
                "{group} on {}",
                node.id
            );
        }
    }
    let letters = eventually(
        Duration::from_secs(30),
        "the bad reading in the telemetry dead-letter topic",
        || async {
            let letters = read_topic(&format!("{}-dlq", telemetry.topic));
            (!letters.is_empty()).then_some(letters)
        },
    )
    .await;
    assert_eq!(letters.len(), 1, "exactly one dead letter: {letters:?}");
    let headers = &letters[0].3;
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "dlq.reason" && v.contains("not a telemetry.Reading")),
        "{headers:?}"
    );
    assert!(
        read_topic(&format!("{}-dlq", spec.topic)).is_empty(),
        "the purchases' dead-letter topic got nothing of the readings"
    );
}
