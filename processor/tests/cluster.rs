//! Acceptance tests of the sample cluster against the real Kafka broker, with every node a
//! separate `processor` process. Run through `scripts/test` (starts the broker, builds the
//! binaries); each test uses its own topic, group and ports so they can run in parallel.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kafka_sharding::partitioner::partition_for_key;
use processor::purchases::Totals;
use proto::ledger::Ledger;
use proto::service::user_service_client::UserServiceClient;
use proto::service::UserStatsRequest;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::*;

const SETTLE: Duration = Duration::from_secs(60);

/// Waits until the nodes' shard sets are disjoint, cover `partitions`, every node has some, and
/// each equals the partitions the broker assigned to that node's client.id.
async fn wait_for_stable_split(
    spec: &ClusterSpec,
    nodes: &[&Node],
    partitions: u32,
) -> Vec<BTreeSet<u32>> {
    eventually(
        SETTLE,
        "shards to equal the broker's assignment and cover every partition",
        || async {
            let mut sets = Vec::new();
            for node in nodes {
                sets.push(node.try_shards().await?);
            }
            let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
            let total: usize = sets.iter().map(|s| s.len()).sum();
            if union.len() != partitions as usize
                || total != partitions as usize
                || sets.iter().any(|s| s.is_empty())
            {
                return None;
            }
            let assignment = group_assignment(&spec.group, &spec.topic);
            for (node, set) in nodes.iter().zip(&sets) {
                if assignment.get(&node.id) != Some(set) {
                    return None;
                }
            }
            // Every node's table must route every shard to its owner.
            for node in nodes {
                let members = node.get_json("/cluster/members").await?;
                for (owner, set) in nodes.iter().zip(&sets) {
                    let listed = members["members"]
                        .as_array()?
                        .iter()
                        .find(|m| m["node"] == owner.id.as_str())?;
                    let shards: BTreeSet<u32> = listed["shards"]
                        .as_array()?
                        .iter()
                        .filter_map(|v| v.as_u64())
                        .map(|v| v as u32)
                        .collect();
                    if &shards != set {
                        return None;
                    }
                }
            }
            Some(sets)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn producer_records_land_on_the_partitions_the_processor_computes() {
    require_broker();
    let spec = ClusterSpec::new("partitioning", 20_000);
    spec.create_topic(128);
    spec.produce(3_000, 1_000, "ledger.json");
    let records = read_topic(&spec.topic);
    assert_eq!(records.len(), 3_000);
    let mut partitions_seen = BTreeSet::new();
    for (partition, offset, key, _) in &records {
        let key = key.as_ref().expect("every produced record has a key");
        assert_eq!(
            *partition,
            partition_for_key(key, 128),
            "record {partition}/{offset} with key {:?} is not on the partition the processor computes",
            String::from_utf8_lossy(key)
        );
        partitions_seen.insert(*partition);
    }
    assert!(
        partitions_seen.len() > 100,
        "1000 users should spread over most of 128 partitions"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_split_the_partitions_and_count_every_event_locally() {
    require_broker();
    let spec = ClusterSpec::new("two-nodes", 21_000);
    spec.create_topic(128);
    let node1 = spec.start_node(1);
    let node2 = spec.start_node(2);
    let sets = wait_for_stable_split(&spec, &[&node1, &node2], 128).await;
    assert!(sets[0].is_disjoint(&sets[1]));

    let ledger = spec.produce(20_000, 200, "ledger.json");
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(120)).await;

    let local = node1.counter("events_processed_local").await
        + node2.counter("events_processed_local").await;
    assert_eq!(
        local, 20_000,
        "every event is processed exactly where it was consumed"
    );
    for node in [&node1, &node2] {
        assert_eq!(
            node.counter("events_forwarded_out").await,
            0,
            "node {} forwarded events",
            node.index
        );
        assert!(
            node.counter("events_processed_local").await > 0,
            "node {} processed nothing",
            node.index
        );
    }
    // The management view lists this node's shards with their entities.
    let regions = node1
        .get_json(&format!("/cluster/shards/{}", spec.group))
        .await;
    let regions = regions.unwrap()["regions"].as_array().unwrap().clone();
    assert_eq!(regions.len(), sets[0].len());
    let entities: u64 = regions
        .iter()
        .map(|r| r["numEntities"].as_u64().unwrap())
        .sum();
    assert!(entities > 0 && entities <= 200);

    // Events written to a partition other than their key's (another producer's partitioner)
    // are forwarded to the shard owner, applied there once, and counted as non-local.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let mut expected = Ledger::new(&spec.topic, 0);
    for n in 0..300 {
        let user = format!("misrouted-{}", n % 30);
        let right = partition_for_key(user.as_bytes(), 128);
        let wrong = ((right + 1 + n % 100) % 128) as i32;
        let event = proto::events::UserPurchase {
            user_id: user.clone(),
            product: "mug".into(),
            quantity: 1,
            price: 10 + n as i64,
        };
        let value = prost::Message::encode_to_vec(&event);
        producer
            .send(
                FutureRecord::to(&spec.topic)
                    .key(user.as_bytes())
                    .payload(&value)
                    .partition(wrong),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        expected.record(&user, 1, 10 + n as i64);
    }
    for n in 0..30 {
        let user = format!("misrouted-{n}");
        let want = expected.expected(&user);
        for i in [1, 2] {
            let url = spec.grpc_url(i);
            let user = user.clone();
            eventually(
                Duration::from_secs(60),
                "forwarded events to be applied",
                || {
                    let url = url.clone();
                    let user = user.clone();
                    async move {
                        (totals_via(&url, &user) == Some((want.purchases, want.amount_spent)))
                            .then_some(())
                    }
                },
            )
            .await;
        }
    }
    let forwarded_out =
        node1.counter("events_forwarded_out").await + node2.counter("events_forwarded_out").await;
    let forwarded_in =
        node1.counter("events_forwarded_in").await + node2.counter("events_forwarded_in").await;
    assert_eq!(
        forwarded_out, 300,
        "every misrouted event is counted as non-local once"
    );
    assert_eq!(
        forwarded_in, 300,
        "every misrouted event is applied by its shard's owner once"
    );

    // The generic routes answer for any user through either node, with no code of the
    // application's: curl on the management port, grpcurl (by reflection) on the gRPC port.
    // The query is `()` (empty protobuf), the reply the entity's `Totals`.
    let mut routes = BTreeSet::new();
    for n in 0..30 {
        let user = format!("misrouted-{n}");
        let want = expected.expected(&user);
        for i in [1, 2] {
            for (how, answer) in [
                (
                    "curl",
                    curl_ask(spec.management(i), &spec.group, &user, b""),
                ),
                (
                    "grpcurl",
                    grpcurl_ask(spec.grpc(i), &spec.group, &user, b""),
                ),
            ] {
                let (reply, route) = answer.unwrap_or_else(|e| panic!("{how} via node {i}: {e:?}"));
                let totals: Totals = prost::Message::decode(&reply[..]).unwrap();
                assert_eq!(
                    (totals.purchases, totals.amount_spent),
                    (want.purchases, want.amount_spent),
                    "{how} via node {i} for {user}"
                );
                routes.insert(route);
            }
        }
    }
    assert_eq!(
        routes,
        BTreeSet::from(["local".to_string(), "remote".to_string()]),
        "each user answered locally by its owner and one hop away by the other node"
    );
    // `client ask` goes the same way: the reply's protobuf bytes, printed as hex.
    let want = expected.expected("misrouted-3");
    let out = std::process::Command::new(bin("client"))
        .args([
            "--addr",
            &spec.grpc_url(2),
            "ask",
            &spec.group,
            "misrouted-3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let totals = Totals {
        purchases: want.purchases,
        amount_spent: want.amount_spent,
    };
    let hex: String = prost::Message::encode_to_vec(&totals)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hex);
    for (how, answer, status) in [
        (
            "unknown type",
            curl_ask(spec.management(1), "no-such-type", "u", b""),
            "404",
        ),
        (
            "over-long id",
            curl_ask(spec.management(1), &spec.group, &"x".repeat(300), b""),
            "400",
        ),
        (
            "undecodable query",
            curl_ask(spec.management(2), &spec.group, "u", b"\xff"),
            "400",
        ),
        (
            "unknown type",
            grpcurl_ask(spec.grpc(1), "no-such-type", "u", b""),
            "5",
        ),
        (
            "over-long id",
            grpcurl_ask(spec.grpc(2), &spec.group, &"x".repeat(300), b""),
            "3",
        ),
        (
            "undecodable query",
            grpcurl_ask(spec.grpc(1), &spec.group, "u", b"\xff"),
            "3",
        ),
    ] {
        let (code, message) = answer.expect_err(how);
        assert_eq!(code, status, "{how}: {message}");
    }
}

/// Answers to gRPC requests node `node` has counted, by route (`local`, `remote`, ...).
async fn answered(node: &Node, route: &str) -> f64 {
    let label = format!(r#"route="{route}",outcome="ok""#);
    node.metric_sum("processor_grpc_request_seconds_count", &label)
        .await
}

/// Queries node `node` sent to owners on other nodes, over `transport` (`link` or `remoting`).
async fn sent_to_peers(node: &Node, transport: &str) -> f64 {
    let label = format!(r#"transport="{transport}""#);
    node.metric_sum("processor_peer_queries_total", &label)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_queries_take_the_query_link_or_the_session_when_told() {
    require_broker();
    let spec = ClusterSpec::new("peer-queries", 5_000);
    spec.create_topic(16);
    let node1 = spec.start_node(1);
    let node2 = spec.start_node_with(2, &["--peer-queries", "remoting"]);
    wait_for_stable_split(&spec, &[&node1, &node2], 16).await;
    let ledger = spec.produce(2_000, 200, "ledger.json");
    // Every user's total through each node: about half of them forwarded to the other.
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(120)).await;
    let remote = [
        answered(&node1, "remote").await,
        answered(&node2, "remote").await,
    ];
    assert!(remote.iter().all(|r| *r > 0.0), "remote answers {remote:?}");
    assert!(
        sent_to_peers(&node1, "link").await >= remote[0],
        "node 1 asks its peer over the query link"
    );
    assert_eq!(sent_to_peers(&node1, "remoting").await, 0.0);
    assert!(
        sent_to_peers(&node2, "remoting").await >= remote[1],
        "node 2 (--peer-queries remoting) asks through the cluster session"
    );
    assert_eq!(sent_to_peers(&node2, "link").await, 0.0);
    // The link's path answers a request that is not an upgrade to it with a clear 400.
    let plain = reqwest::get(format!(
        "http://127.0.0.1:{}/cluster/query-link",
        spec.management(1)
    ))
    .await
    .unwrap();
    assert_eq!(plain.status().as_u16(), 400);
    assert!(plain.text().await.unwrap().contains("upgrade"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_learns_the_owners_asks_each_user_s_owner_and_follows_a_hand_off() {
    use kafka_sharding::owners::{OwnerDirectory, ROUTE_HEADER};
    require_broker();
    let spec = ClusterSpec::new("direct", 21_500);
    spec.create_topic(24);
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let sets = wait_for_stable_split(&spec, &[&node1, &node2], 24).await;
    let ledger_path = spec.produce(2_000, 100, "ledger.json");
    wait_for_ledger(&spec, &[1], &ledger_path, Duration::from_secs(120)).await;
    let ledger = Ledger::load(&ledger_path).unwrap();
    let owner_index = |user: &str| {
        if sets[0].contains(&partition_for_key(user.as_bytes(), 24)) {
            1
        } else {
            2
        }
    };

    // The client's default: given node 1, it asks every user's owner itself, so node 1
    // forwards nothing and node 2 answers its users locally.
    let (remote_before, node2_local_before) = (
        answered(&node1, "remote").await,
        answered(&node2, "local").await,
    );
    let out = std::process::Command::new(bin("client"))
        .args(["--addr", &spec.grpc_url(1), "verify", "--ledger"])
        .arg(&ledger_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let on_node2 = ledger
        .user_ids()
        .iter()
        .filter(|u| owner_index(u) == 2)
        .count();
    assert!(on_node2 > 0, "the split left node 2 no users");
    assert_eq!(
        answered(&node1, "remote").await,
        remote_before,
        "node 1 forwarded a query of a client that knows the owners"
    );
    assert!(
        answered(&node2, "local").await - node2_local_before >= on_node2 as f64,
        "node 2 answered its {on_node2} users itself"
    );

    // The library's directory: learnt from node 1, it points every user at its owner.
    let any_node = tonic::transport::Endpoint::from_shared(spec.grpc_url(1))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let owners = OwnerDirectory::connect(any_node, "", |url| {
        Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?)
    })
    .await
    .unwrap();
    assert_eq!(owners.entity_type(), spec.group);
    for user in ledger.user_ids() {
        assert_eq!(
            owners.owner_url(&user),
            Some(spec.grpc_url(owner_index(&user))),
            "owner of user {user}"
        );
    }
    let ask = |user: String| {
        let owners = owners.clone();
        async move {
            owners
                .call(&user.clone(), |channel| {
                    let request = UserStatsRequest {
                        id: user.clone(),
                        max_staleness_ms: None,
                    };
                    async move { UserServiceClient::new(channel).user_stats(request).await }
                })
                .await
        }
    };
    let user2 = ledger
        .user_ids()
        .into_iter()
        .find(|u| owner_index(u) == 2)
        .unwrap();
    let expected = ledger.expected(&user2);
    let answer = ask(user2.clone()).await.unwrap();
    assert_eq!(
        answer.metadata().get(ROUTE_HEADER).unwrap(),
        "local",
        "asked at its owner"
    );
    assert_eq!(answer.get_ref().amount_spent, expected.amount_spent);

    // Node 2 hands its shards to node 1: the directory's stale entry fails over (node 1
    // answers), and the directory learns the new owner.
    node2.stop();
    eventually(SETTLE, "node 1 to own every shard", || async {
        (node1.try_shards().await?.len() == 24).then_some(())
    })
    .await;
    let answer = ask(user2.clone())
        .await
        .expect("an answer after the hand-off");
    assert_eq!(answer.get_ref().total_purchases, expected.purchases);
    assert_eq!(answer.get_ref().amount_spent, expected.amount_spent);
    eventually(
        Duration::from_secs(10),
        "the directory to learn that node 1 owns node 2's users",
        || {
            let (owners, user2) = (owners.clone(), user2.clone());
            let ask = &ask;
            let node1_url = spec.grpc_url(1);
            async move {
                // Each answer that did not come from the owner asked refreshes the table.
                let _ = ask(user2.clone()).await;
                (owners.owner_url(&user2) == Some(node1_url)).then_some(())
            }
        },
    )
    .await;
    let answer = ask(user2).await.unwrap();
    assert_eq!(answer.metadata().get(ROUTE_HEADER).unwrap(), "local");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_third_node_takes_only_the_moved_partitions_and_answers_for_them() {
    require_broker();
    let spec = ClusterSpec::new("third-node", 22_000);
    spec.create_topic(128);
    let node1 = spec.start_node(1);
    let node2 = spec.start_node(2);
    let before = wait_for_stable_split(&spec, &[&node1, &node2], 128).await;
    let before_move = spec.produce(4_000, 300, "before-move.json");
    wait_for_ledger(&spec, &[1, 2], &before_move, Duration::from_secs(120)).await;
    let revoked_before = [
        node1.counter("partitions_revoked").await,
        node2.counter("partitions_revoked").await,
    ];

    let node3 = spec.start_node(3);
    let after = wait_for_stable_split(&spec, &[&node1, &node2, &node3], 128).await;
    for i in 0..2 {
        assert!(after[i].is_subset(&before[i]), "node {} gained partitions it did not have: cooperative rebalancing moves only what node 3 gets", i + 1);
    }
    let moved: BTreeSet<u32> = before[0]
        .difference(&after[0])
        .chain(before[1].difference(&after[1]))
        .copied()
        .collect();
    assert_eq!(
        moved, after[2],
        "node 3 holds exactly the partitions the others gave up"
    );
    let nodes = [&node1, &node2];
    for i in 0..2 {
        let revoked = nodes[i].counter("partitions_revoked").await - revoked_before[i];
        assert_eq!(
            revoked as usize,
            before[i].len() - after[i].len(),
            "node {} revoked more than it gave up",
            i + 1
        );
    }
    let regions = node3
        .get_json(&format!("/cluster/shards/{}", spec.group))
        .await
        .unwrap();
    let listed: BTreeSet<u32> = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["shardId"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(listed, after[2]);
    let log = node3.log();
    let any = after[2].iter().next().unwrap();
    assert!(
        log.contains(&format!("partition {any} assigned to this node")),
        "node 3 logs its assignments"
    );

    // Events after the move are processed by the new owner, on top of the state it restored,
    // and every node routes queries for moved users to it.
    let after_move = spec.produce(6_000, 300, "after-move.json");
    let mut ledger = Ledger::load(&before_move).unwrap();
    ledger.merge(&Ledger::load(&after_move).unwrap());
    let ledger_path = log_dir(&spec.name).join("expected.json");
    ledger.save(&ledger_path).unwrap();
    wait_for_ledger(&spec, &[1, 2, 3], &ledger_path, Duration::from_secs(120)).await;
    let moved_users: Vec<String> = ledger
        .user_ids()
        .into_iter()
        .filter(|u| after[2].contains(&partition_for_key(u.as_bytes(), 128)))
        .collect();
    assert!(!moved_users.is_empty());
    assert!(node3.counter("events_processed_local").await > 0);
    assert!(
        node3.counter("entities_restored").await > 0,
        "node 3 restored the moved users' state"
    );
    for node in [&node1, &node2, &node3] {
        assert_eq!(node.counter("events_forwarded_out").await, 0);
    }
    let started = Instant::now();
    for user in moved_users.iter().take(20) {
        let want = ledger.expected(user);
        assert_eq!(
            totals_via(&spec.grpc_url(1), user),
            Some((want.purchases, want.amount_spent)),
            "user {user} via node 1"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    // Node 3 dies. Until Kafka reassigns its partitions (6 s session timeout), reads allowing
    // staleness of its users are answered by their standbys, through either survivor: the
    // standbys of node 3's ~43 shards are spread over nodes 1 and 2, so each survivor answers
    // some from its own standbys and the rest through the other's gateway.
    let mut node3 = node3;
    node3.kill();
    let killed = Instant::now();
    let urls = [spec.grpc_url(1), spec.grpc_url(2)];
    let asks = urls.iter().flat_map(|url| {
        moved_users
            .iter()
            .map(|user| assert_standby_answers(url, user, 10_000, &ledger))
    });
    futures::future::join_all(asks).await;
    println!(
        "{} moved users answered by standbys through both survivors {:.1} s after the kill",
        moved_users.len(),
        killed.elapsed().as_secs_f64()
    );
}

/// Writes `records` (key, value) to one partition of `topic`, bypassing every partitioner.
async fn send_to_partition(topic: &str, partition: u32, records: &[(Option<&str>, &[u8])]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    for (key, value) in records {
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(*value)
            .partition(partition as i32);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_records_go_to_the_dead_letter_topic_and_valid_ones_are_all_counted() {
    require_broker();
    let spec = ClusterSpec::new("dead-letters", 23_000);
    spec.create_topic(8);
    let node = spec.start_node(1);
    wait_for_split(&[&node], 8).await;

    let first = spec.produce(1_000, 50, "first.json");
    let valid_value = |user: &str, quantity: i64| {
        prost::Message::encode_to_vec(&proto::events::UserPurchase {
            user_id: user.into(),
            product: "x".into(),
            quantity,
            price: 5,
        })
    };
    let bad: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (None, valid_value("3", 1), "no key"),
        (
            Some("3"),
            b"\xff\xff\xff not a protobuf".to_vec(),
            "not a UserPurchase",
        ),
        (Some("3"), valid_value("3", -4), "negative"),
    ];
    let records: Vec<(Option<&str>, &[u8])> = bad.iter().map(|(k, v, _)| (*k, &v[..])).collect();
    send_to_partition(&spec.topic, partition_for_key(b"3", 8), &records).await;
    let second = spec.produce(1_000, 50, "second.json");
    let mut expected = Ledger::load(&first).unwrap();
    expected.merge(&Ledger::load(&second).unwrap());
    let merged = log_dir(&spec.name).join("merged.json");
    expected.save(&merged).unwrap();
    wait_for_ledger(&spec, &[1], &merged, Duration::from_secs(120)).await;
    assert_eq!(node.counter("dead_lettered").await, 3);
    assert_eq!(node.counter("events_processed_local").await, 2_000);

    // The dead letters are written by the checkpoint that commits past their records, which
    // may follow the totals by a commit interval.
    let dlq = format!("{}-dlq", spec.topic);
    let dead = eventually(
        Duration::from_secs(30),
        "the dead letters to be committed",
        || async {
            let dead = read_topic(&dlq);
            (dead.len() >= 3).then_some(dead)
        },
    )
    .await;
    assert_eq!(
        dead.len(),
        3,
        "exactly the three malformed records are dead-lettered"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, _, _, headers)| {
            let h: BTreeMap<_, _> = headers.iter().cloned().collect();
            assert_eq!(h.get("dlq.source.topic"), Some(&spec.topic));
            assert_eq!(
                h.get("dlq.source.partition"),
                Some(&partition_for_key(b"3", 8).to_string())
            );
            assert!(h.get("dlq.source.offset").unwrap().parse::<i64>().is_ok());
            h.get("dlq.reason").cloned().unwrap()
        })
        .collect();
    for (_, _, expected_reason) in &bad {
        assert!(
            reasons.iter().any(|r| r.contains(expected_reason)),
            "no dead letter with reason '{expected_reason}' in {reasons:?}"
        );
    }
}

/// `dead-letters` with `args` against the test broker: (exit code, stdout, stdout and stderr).
fn dead_letters(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin("dead-letters"))
        .args(args)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap())
        .output()
        .expect("dead-letters runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        output_text(&out),
    )
}

/// `dead-letters list TOPIC --json [extra]`, one JSON object per dead letter.
fn listed(topic: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["list", topic, "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, all) = dead_letters(&args);
    assert_eq!(code, 0, "dead-letters list failed: {all}");
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_with_their_reasons_and_each_replayed_exactly_once() {
    require_broker();
    let spec = ClusterSpec::new("dead-letter-tool", 3_000);
    spec.create_topic(4);
    let node = spec.start_node(1);
    wait_for_split(&[&node], 4).await;
    let dlq = format!("{}-dlq", spec.topic);

    let negative = prost::Message::encode_to_vec(&proto::events::UserPurchase {
        user_id: "3".into(),
        product: "x".into(),
        quantity: -4,
        price: 5,
    });
    let bad: [(Option<&str>, &[u8]); 3] = [
        (None, b"no key here"),
        (Some("3"), b"\xff\xfe not a protobuf"),
        (Some("3"), &negative),
    ];
    send_to_partition(&spec.topic, partition_for_key(b"3", 4), &bad).await;
    let ledger = spec.produce(500, 20, "ledger.json");
    wait_for_ledger(&spec, &[1], &ledger, Duration::from_secs(120)).await;

    // Listed once committed, with their origin, reason, key and value (hex when not UTF-8).
    let first = eventually(Duration::from_secs(30), "three dead letters", || async {
        let listed = listed(&dlq, &[]);
        (listed.len() >= 3).then_some(listed)
    })
    .await;
    assert_eq!(first.len(), 3, "{first:?}");
    let reasons: Vec<&str> = first
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    for expected in ["no key", "UserPurchase", "negative"] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no reason with '{expected}' in {reasons:?}"
        );
    }
    for letter in &first {
        assert_eq!(letter["source_topic"], spec.topic.as_str());
        assert_eq!(
            letter["source_partition"],
            partition_for_key(b"3", 4) as u64
        );
    }
    let undecodable = first
        .iter()
        .find(|d| d["reason"].as_str().unwrap().contains("UserPurchase"))
        .unwrap();
    assert_eq!(undecodable["key"], "3");
    assert_eq!(undecodable["value"], serde_json::Value::Null);
    assert!(undecodable["value_hex"]
        .as_str()
        .unwrap()
        .starts_with("fffe206e6f74"));
    let (_, text, _) = dead_letters(&["list", &dlq]);
    assert_eq!(text.lines().count(), 3, "one line each: {text}");
    assert_eq!(
        listed(&dlq, &["--pending"]).len(),
        3,
        "nothing replayed yet"
    );

    // Replayed to where they came from: the node, unchanged, dead-letters them again.
    let (code, _, said) = dead_letters(&["replay", &dlq]);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains(&format!(
            "replayed 3 dead letters of {dlq} (3 to {})",
            spec.topic
        )),
        "{said}"
    );
    let second = eventually(
        Duration::from_secs(60),
        "the replayed three dead-lettered",
        || async {
            let listed = listed(&dlq, &[]);
            (listed.len() >= 6).then_some(listed)
        },
    )
    .await;
    assert_eq!(second.len(), 6, "{second:?}");
    let replayed: Vec<String> = read_topic(&spec.topic)
        .into_iter()
        .filter_map(|(_, _, _, headers)| {
            headers
                .into_iter()
                .find(|(k, _)| k == "dlq.replayed.from")
                .map(|(_, v)| v)
        })
        .collect();
    assert_eq!(replayed.len(), 3, "each replayed once: {replayed:?}");
    for letter in &first {
        let from = format!("{dlq}/{}/{}", letter["partition"], letter["offset"]);
        assert!(replayed.contains(&from), "{from} not in {replayed:?}");
    }
    // Each original and its replay have the same key, value and reason.
    let shape = |d: &serde_json::Value| {
        (
            d["key"].clone(),
            d["value"].clone(),
            d["value_hex"].clone(),
            d["reason"].clone(),
        )
    };
    let mut shapes: Vec<_> = second.iter().map(shape).collect();
    shapes.sort_by_key(|s| format!("{s:?}"));
    for pair in shapes.chunks(2) {
        assert_eq!(pair[0], pair[1], "an original and its replay differ");
    }

    // The replay group's offsets moved with the records: only the new three are pending, and a
    // second replay writes those three, not all six.
    let pending = listed(&dlq, &["--pending"]);
    assert_eq!(pending.len(), 3, "{pending:?}");
    let (code, _, said) = dead_letters(&["replay", &dlq]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("replayed 3 dead letters"), "{said}");
    wait_for_ledger(&spec, &[1], &ledger, Duration::from_secs(60)).await;

    // Bad arguments: a usage message and exit 2; a topic that does not exist: exit 1, said.
    let (code, _, said) = dead_letters(&["replay"]);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("Usage"), "{said}");
    let (code, _, said) = dead_letters(&["replay", &dlq, "--to", &dlq]);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("the dead-letter topic itself"), "{said}");
    let (code, _, said) = dead_letters(&["list", "no-such-topic-here"]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("no-such-topic-here does not exist"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_validate_input_and_wait_a_bounded_time_for_a_shard_without_owner() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    require_broker();
    let mut spec = ClusterSpec::new("query-bounds", 24_000);
    spec.extra_args = vec!["--query-wait-ms".into(), "1500".into()];
    spec.create_topic(8);
    // A plain consumer in the group holds some partitions: their shards have no node.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let squatter = {
        let (group, topic, stop) = (spec.group.clone(), spec.topic.clone(), stop.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", bootstrap())
                .set("group.id", &group)
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "6000")
                .create()
                .unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = consumer.poll(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node = spec.start_node(1);
    let owned = eventually(
        SETTLE,
        "the node to own some but not all partitions",
        || async {
            let s = node.try_shards().await?;
            (!s.is_empty() && s.len() < 8).then_some(s)
        },
    )
    .await;

    let mut client = eventually(Duration::from_secs(10), "gRPC port", || {
        let url = spec.grpc_url(1);
        async move { UserServiceClient::connect(url).await.ok() }
    })
    .await;
    // Standard gRPC health checking reports the user service as serving once the node is
    // ready (its shards appear before they finish restoring, and health follows readiness
    // within a poll): bounded, it must get there.
    let channel = tonic::transport::Channel::from_shared(spec.grpc_url(1))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    eventually(SETTLE, "gRPC health to report SERVING", || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "userservice.UserService".into(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                .then_some(())
        }
    })
    .await;
    for bad in [String::new(), "x".repeat(257)] {
        let status = client
            .user_stats(UserStatsRequest {
                id: bad,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let orphan = (0..1000)
        .map(|u| u.to_string())
        .find(|u| !owned.contains(&partition_for_key(u.as_bytes(), 8)))
        .unwrap();
    let shard = partition_for_key(orphan.as_bytes(), 8);
    let started = Instant::now();
    let status = client
        .user_stats(UserStatsRequest {
            id: orphan.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains(&format!("shard {shard}")),
        "message names the shard: {}",
        status.message()
    );
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );

    // Once the squatter leaves, Kafka gives its partitions to the node and the query answers.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    squatter.join().unwrap();
    wait_for_split(&[&node], 8).await;
    let answer = client
        .user_stats(UserStatsRequest {
            id: orphan.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            answer.id.as_str(),
            answer.total_purchases,
            answer.amount_spent
        ),
        (orphan.as_str(), 0, 0)
    );
    let regions = node
        .get_json(&format!("/cluster/shards/{}", spec.group))
        .await
        .unwrap();
    let entities: u64 = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["numEntities"].as_u64().unwrap())
        .sum();
    assert_eq!(
        entities, 0,
        "a query for a user without purchases creates no entity"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_with_static_membership_moves_no_partition_of_the_other_nodes() {
    require_broker();
    let mut spec = ClusterSpec::new("rolling", 15_000);
    // Room for a graceful stop and a start within the session timeout.
    spec.extra_args = vec!["--static-membership".into()];
    spec.session_timeout_ms = 20_000;
    spec.create_topic(24);
    let mut nodes = vec![spec.start_node(1), spec.start_node(2), spec.start_node(3)];
    let before = wait_for_stable_split(&spec, &nodes.iter().collect::<Vec<_>>(), 24).await;

    let producer = spec.produce_in_background(12_000, 300, 400, "rolling.json");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..nodes.len() {
        let marks: Vec<usize> = nodes.iter().map(|n| n.log().len()).collect();
        assert!(nodes[i].stop().success(), "node {} stops cleanly", i + 1);
        // A restart that takes a while (a pod rescheduled, an image pulled): a dynamic member
        // would have left the group, and the others would have taken its partitions by now.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let started_at = Instant::now();
        nodes[i] = spec.start_node(i as u16 + 1);
        let back = eventually(
            Duration::from_secs(30),
            "the restarted node to own its partitions again",
            || async {
                (nodes[i].try_shards().await? == before[i]).then_some(started_at.elapsed())
            },
        )
        .await;
        println!(
            "node {} restarted: its {} shards back {:.2} s after its start",
            i + 1,
            before[i].len(),
            back.as_secs_f64()
        );
        for (j, node) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let log = node.log();
            let since = &log[marks[j]..];
            assert!(
                !since.contains("being revoked") && !since.contains("assigned to this node"),
                "node {} was rebalanced while node {} restarted:\n{since}",
                j + 1,
                i + 1
            );
            assert_eq!(
                node.shards().await,
                before[j],
                "node {} kept its shards",
                j + 1
            );
        }
    }
    let ledger = producer.wait();
    wait_for_ledger(&spec, &[1, 2, 3], &ledger, SETTLE).await;
    for node in &mut nodes {
        assert!(node.stop().success());
    }
}
