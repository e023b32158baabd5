//! No silent state loss: a node of the `visits` application (one binary standing in for each
//! build of an application, `--build`) restores the states an earlier build wrote when they
//! still decode, refuses the shards whose states do not (not ready, saying where and why;
//! queries for their entities get that error, never a value; their input waits), and restores
//! them once a build that migrates them runs. A corrupt changelog record stops its shard only.
//! Real broker, nodes as processes, queries through the generic route on the management port.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::*;

const PARTITIONS: u32 = 4;
const USERS: u64 = 20;

/// The answer of every build of `visits` (its `VisitsReply`).
#[derive(Clone, PartialEq, prost::Message)]
struct VisitsReply {
    #[prost(uint64, tag = "1")]
    count: u64,
    #[prost(string, tag = "2")]
    last_page: String,
}

fn user(k: u64) -> String {
    format!("u{k}")
}

fn visits_spec(name: &str, port_base: u16) -> ClusterSpec {
    let mut spec = ClusterSpec::new(name, port_base);
    spec.program = "visits".into();
    spec.create_topic(PARTITIONS);
    spec
}

fn start(spec: &ClusterSpec, build: &str) -> Node {
    spec.start_node_with(1, &["--build", build])
}

fn producer(spec: &ClusterSpec) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &spec.bootstrap)
        .create()
        .unwrap()
}

/// Writes one visit of `user` to `page`, to the user's partition.
async fn visit(producer: &FutureProducer, spec: &ClusterSpec, user: &str, page: &str) {
    let partition = kafka_sharding::partitioner::partition_for_key(user.as_bytes(), PARTITIONS);
    producer
        .send(
            FutureRecord::to(&spec.topic)
                .key(user)
                .payload(page)
                .partition(partition as i32),
            Duration::from_secs(10),
        )
        .await
        .expect("visit written");
}

/// Asks `user`'s visits through the generic route of node `node`: the reply, or the HTTP
/// status and body of an error.
async fn ask(spec: &ClusterSpec, node: u16, user: &str) -> Result<VisitsReply, (u16, String)> {
    let url = format!(
        "http://127.0.0.1:{}/entities/{}/{user}",
        spec.management(node),
        spec.group
    );
    let response = reqwest::Client::new()
        .post(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| (0, e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| (status, e.to_string()))?;
    if status != 200 {
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    Ok(VisitsReply::decode(&body[..]).expect("a reply in the entity's codec"))
}

/// Waits until every user's count through node 1 is as `expected` (and its last page).
async fn wait_for_counts(spec: &ClusterSpec, expected: &BTreeMap<String, (u64, &str)>) {
    wait_for_counts_via(spec, 1, expected).await
}

async fn wait_for_counts_via(
    spec: &ClusterSpec,
    node: u16,
    expected: &BTreeMap<String, (u64, &str)>,
) {
    eventually(
        Duration::from_secs(90),
        "every user's visits answered",
        || async {
            for (user, (count, page)) in expected {
                let reply = ask(spec, node, user).await.ok()?;
                if reply.count != *count || reply.last_page != *page {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
}

/// Node 1's readiness: HTTP status and reasons.
async fn readiness(spec: &ClusterSpec) -> Option<(u16, Vec<String>)> {
    readiness_of(spec, 1).await
}

async fn readiness_of(spec: &ClusterSpec, node: u16) -> Option<(u16, Vec<String>)> {
    let (status, body) = get_status(spec.management(node), "/ready").await?;
    let reasons = body["reasons"]
        .as_array()?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    Some((status, reasons))
}

/// Waits until node 1 reports `shards` refused shards, and returns those reasons.
async fn wait_for_refusals(spec: &ClusterSpec, shards: usize) -> Vec<String> {
    wait_for_refusals_on(spec, 1, shards).await
}

async fn wait_for_refusals_on(spec: &ClusterSpec, node: u16, shards: usize) -> Vec<String> {
    eventually(
        Duration::from_secs(90),
        "the node to report its refused shards",
        || async {
            let (status, reasons) = readiness_of(spec, node).await?;
            let refused: Vec<String> = reasons
                .into_iter()
                .filter(|r| r.contains("refused its changelog state"))
                .collect();
            (status == 503 && refused.len() == shards).then_some(refused)
        },
    )
    .await
}

#[tokio::test]
async fn a_state_changed_between_builds_is_restored_refused_or_migrated_never_reset() {
    require_broker();
    let spec = visits_spec("versions", 7_000);
    let changelog = format!("{}-{}-state", spec.group, spec.topic);
    let producer = producer(&spec);

    // Build 1 counts visits.
    let mut node = start(&spec, "1");
    let mut expected = BTreeMap::new();
    for k in 0..USERS {
        for i in 0..=(k % 4) {
            visit(&producer, &spec, &user(k), &format!("/p{i}")).await;
        }
        expected.insert(user(k), (k % 4 + 1, ""));
    }
    wait_for_counts(&spec, &expected).await;
    assert!(node.stop().success());

    // Build 2 adds a field: build 1's states restore as they were, and gain it on change.
    let mut node = start(&spec, "2-field-added");
    wait_for_counts(&spec, &expected).await;
    for k in 0..USERS {
        visit(&producer, &spec, &user(k), "/two").await;
        expected.insert(user(k), (k % 4 + 2, "/two"));
    }
    wait_for_counts(&spec, &expected).await;
    assert!(node.stop().success());

    // Build 3 changes a field's type without a new version: every shard refuses, saying where
    // and why; queries get that error, never a count; visits written meanwhile wait.
    let mut node = start(&spec, "3-incompatible");
    let refused = wait_for_refusals(&spec, PARTITIONS as usize).await;
    for reason in &refused {
        assert!(
            reason.contains(&format!("changelog {changelog} partition"))
                && reason.contains(" offset ")
                && reason.contains("(entity u")
                && reason.contains("does not decode"),
            "a refusal names the record and why: {reason}"
        );
    }
    let (status, error) = ask(&spec, 1, &user(1))
        .await
        .expect_err("no answer from a refused shard");
    assert_eq!(status, 500, "{error}");
    assert!(
        error.contains("cannot answer") && error.contains(&changelog),
        "{error}"
    );
    for k in 0..USERS {
        visit(&producer, &spec, &user(k), "/three").await;
        expected.insert(user(k), (k % 4 + 3, "/three"));
    }
    eventually(
        Duration::from_secs(30),
        "the refused partitions paused",
        || async {
            node.log()
                .contains("paused: their shards refused")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node.log().matches(" not restored: changelog ").count(),
        PARTITIONS as usize,
        "one error line per refused shard"
    );
    assert!(node.stop().success());

    // The same change done right (version 2 and a migration): every state comes back, with
    // the visits written while the shards were refused applied once.
    let mut node = start(&spec, "3-migrating");
    wait_for_counts(&spec, &expected).await;
    eventually(Duration::from_secs(30), "the node ready", || async {
        (readiness(&spec).await?.0 == 200).then_some(())
    })
    .await;
    assert!(node.stop().success());

    // Rolling back to build 1 finds states of a later version: refused, not misread.
    let mut node = start(&spec, "1");
    let refused = wait_for_refusals(&spec, PARTITIONS as usize).await;
    assert!(
        refused.iter().all(|r| r.contains("by a later build")),
        "{refused:?}"
    );
    assert!(ask(&spec, 1, &user(2)).await.is_err());
    assert!(node.stop().success());
}

#[tokio::test]
async fn a_corrupt_changelog_record_stops_its_shard_and_the_others_serve() {
    require_broker();
    let spec = visits_spec("corrupt-state", 7_500);
    let changelog = format!("{}-{}-state", spec.group, spec.topic);
    let producer = producer(&spec);
    let mut node = start(&spec, "1");
    let mut expected = BTreeMap::new();
    for k in 0..USERS {
        visit(&producer, &spec, &user(k), "/").await;
        expected.insert(user(k), (1, ""));
    }
    wait_for_counts(&spec, &expected).await;
    assert!(node.stop().success());

    // A record with the runtime's headers and an envelope whose state is garbage.
    let victim = user(3);
    let shard = kafka_sharding::partitioner::partition_for_key(victim.as_bytes(), PARTITIONS);
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "input.topic",
            value: Some(&spec.topic),
        })
        .insert(Header {
            key: "changelog.format",
            value: Some("kafka-sharding/2"),
        });
    let value = [&5i64.to_be_bytes()[..], &[0x0a, 0x05][..]].concat();
    let offset = producer
        .send(
            FutureRecord::to(&changelog)
                .key(&victim)
                .payload(&value)
                .partition(shard as i32)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("corrupt record written")
        .offset;

    // Two nodes: one owns the corrupt record's shard, the other keeps its standby replica.
    let mut nodes = [
        start(&spec, "1"),
        spec.start_node_with(2, &["--build", "1"]),
    ];
    let split = wait_for_split(&[&nodes[0], &nodes[1]], PARTITIONS).await;
    let (owner, other) = if split[0].contains(&shard) {
        (1, 2)
    } else {
        (2, 1)
    };
    let refused = wait_for_refusals_on(&spec, owner, 1).await;
    assert!(
        refused[0].contains(&format!(
            "shard {shard} of {} refused its changelog state: changelog {changelog} partition {shard} offset {offset} (entity {victim})",
            spec.group
        )),
        "{refused:?}"
    );
    let standby = &nodes[usize::from(other) - 1];
    eventually(
        Duration::from_secs(60),
        "the standby replica dropped",
        || async {
            standby
                .log()
                .contains(&format!(
                    "standby replica of shard {shard} dropped: changelog {changelog}"
                ))
                .then_some(())
        },
    )
    .await;
    let in_shard = |k: &u64| {
        kafka_sharding::partitioner::partition_for_key(user(*k).as_bytes(), PARTITIONS) == shard
    };
    // Through either node (the owner answers the other one's forwarded query the same way).
    for node in [1, 2] {
        for k in (0..USERS).filter(in_shard) {
            let (status, error) = ask(&spec, node, &user(k))
                .await
                .expect_err("no answer from the refused shard");
            assert_eq!(status, 500, "via node {node}: {error}");
            assert!(error.contains(&format!("offset {offset}")), "{error}");
        }
    }
    // The other shards restored and keep processing.
    let mut others: BTreeMap<String, (u64, &str)> = (0..USERS)
        .filter(|k| !in_shard(k))
        .map(|k| (user(k), (2, "")))
        .collect();
    assert!(!others.is_empty());
    for user in others.keys() {
        visit(&producer, &spec, user, "/again").await;
    }
    wait_for_counts_via(&spec, other, &others).await;

    // The owner dies: the other node takes the shard over, restores it from the changelog
    // (its standby dropped the replica) and refuses it too; the rest keeps being served.
    nodes[usize::from(owner) - 1].kill();
    let refused = wait_for_refusals_on(&spec, other, 1).await;
    assert!(
        refused[0].contains(&format!("offset {offset} (entity {victim})")),
        "{refused:?}"
    );
    for user in others.keys() {
        visit(&producer, &spec, user, "/third").await;
    }
    for count in others.values_mut() {
        count.0 = 3;
    }
    wait_for_counts_via(&spec, other, &others).await;
}
