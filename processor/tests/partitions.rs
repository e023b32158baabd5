//! Network partitions, cut for real: every node in a network namespace of its own (as root,
//! with iproute2), the broker on the bridge between them (`support::netns`).
//!
//! - The link between two nodes cut while both reach Kafka: Kafka's group, not the nodes'
//!   links, decides ownership, so nothing moves; every user is answered exactly by its owner;
//!   a node asked for a user of the other answers UNAVAILABLE in bounded time, never a wrong
//!   total; once the link heals, every user is answered exactly through either node again.
//! - A node cut off from everything: once its session is lost it stops answering for the
//!   shards it held (a client beside it gets UNAVAILABLE, never a total missing what the other
//!   node has applied since), the other node takes every shard and applies what was produced;
//!   reconnected, the node rejoins, and every total is exact through both (nothing applied
//!   twice, nothing lost).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_sharding::partitioner::partition_for_key;
use support::netns::Network;
use support::*;

const PARTITIONS: u32 = 16;
const USERS: u64 = 200;

/// `client get USER --json` through `grpc_url` only (`--via-addr`), run in node `from`'s
/// namespace: the totals, or what the client said when it got none.
fn ask_from(
    network: &Network,
    from: u16,
    grpc_url: &str,
    user: &str,
) -> Result<(i64, i64), String> {
    let out = network
        .command(from, &bin("client"))
        .args(["--addr", grpc_url, "--via-addr", "get", user, "--json"])
        .output()
        .unwrap();
    let text = output_text(&out);
    if !out.status.success() {
        return Err(text);
    }
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("{e}: {text}"))?;
    match (v["purchases"].as_i64(), v["amount_spent"].as_i64()) {
        (Some(p), Some(a)) => Ok((p, a)),
        _ => Err(text),
    }
}

/// `client verify` with the client's default routing: it learns the shard owners from
/// `grpc_url` and asks each user's owner directly.
fn verify_at_owners(grpc_url: &str, ledger: &Path) -> (bool, String) {
    let out = std::process::Command::new(bin("client"))
        .args([
            "--addr",
            grpc_url,
            "verify",
            "--ledger",
            ledger.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = output_text(&out);
    (out.status.success(), text)
}

/// The peers `node` lists as not answering at `/cluster/members`.
async fn not_answering(node: &Node) -> Vec<String> {
    let members = node
        .get_json("/cluster/members")
        .await
        .unwrap_or_else(|| panic!("node {} did not answer /cluster/members", node.id));
    members["notAnswering"]
        .as_array()
        .unwrap_or_else(|| panic!("no notAnswering in {members}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// `processor_peers_not_answering` of `node`, the gauge the shipped alert watches.
async fn peers_not_answering_gauge(node: &Node) -> f64 {
    node.metrics()
        .await
        .unwrap_or_else(|| panic!("/metrics of node {} does not answer", node.id))
        .get("processor_peers_not_answering")
        .copied()
        .unwrap_or_else(|| panic!("node {} has no processor_peers_not_answering", node.id))
}

/// A user whose partition is in `shards`.
fn user_in(shards: &std::collections::BTreeSet<u32>) -> String {
    (0..USERS)
        .map(|u| u.to_string())
        .find(|u| shards.contains(&partition_for_key(u.as_bytes(), PARTITIONS)))
        .expect("some user in every half of the partitions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_between_nodes_and_a_node_cut_off_from_everything_heal_with_every_total_exact() {
    let network = Arc::new(Network::new(2));
    let broker = Broker::start_on(&network.gateway(), 19_900);
    let mut spec = ClusterSpec::new("netsplit", 4_000).on(&broker);
    spec.network = Some(network.clone());
    spec.create_topic(PARTITIONS);
    let mut node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let split = wait_for_split(&[&node1, &node2], PARTITIONS).await;
    let first = spec.produce(4_000, USERS, "first.json");
    wait_for_ledger(&spec, &[1, 2], &first, Duration::from_secs(90)).await;

    // The link between the nodes cut; both still reach Kafka.
    network.cut(1, 2);
    let during_cut = spec.produce(4_000, USERS, "during-cut.json");
    let after_cut = merge_ledgers(&spec, &[&first, &during_cut], "after-cut.json");
    eventually(
        Duration::from_secs(60),
        "every user exact at its owner while the nodes cannot reach each other",
        || async {
            verify_at_owners(&spec.grpc_url(1), &after_cut)
                .0
                .then_some(())
        },
    )
    .await;
    // Past a session timeout and more: Kafka still sees both members, so nothing moved.
    tokio::time::sleep(Duration::from_millis(
        spec.session_timeout_ms as u64 + 2_000,
    ))
    .await;
    assert_eq!(
        [node1.shards().await, node2.shards().await],
        [split[0].clone(), split[1].clone()],
        "a cut between the nodes moved shards"
    );
    let (ok, report) = verify_at_owners(&spec.grpc_url(2), &after_cut);
    assert!(ok, "owners not exact during the cut: {report}");
    // Node 1 cannot forward to node 2: a bounded UNAVAILABLE, never a total of its own.
    let theirs = user_in(&split[1]);
    let asked = Instant::now();
    let answer = ask_from(&network, 1, &spec.grpc_url(1), &theirs);
    let waited = asked.elapsed();
    let said = answer.expect_err("node 1 answered for a user of node 2 it cannot reach");
    assert!(said.contains("Unavailable"), "not UNAVAILABLE: {said}");
    assert!(
        waited < Duration::from_secs(15),
        "UNAVAILABLE after {waited:?}: {said}"
    );
    // Its own users it answers itself.
    let ours = user_in(&split[0]);
    assert!(
        ask_from(&network, 1, &spec.grpc_url(1), &ours).is_ok(),
        "node 1 did not answer for its own user {ours} during the cut"
    );
    // It says so once, however many calls go unanswered, and shows it.
    let _ = ask_from(&network, 1, &spec.grpc_url(1), &theirs);
    let silent = format!("node {} does not answer", node2.id);
    assert_eq!(
        node1.log().matches(&silent).count(),
        1,
        "node 1 did not say once that node 2 does not answer"
    );
    assert_eq!(
        not_answering(&node1).await,
        vec![node2.id.clone()],
        "node 1's /cluster/members during the cut"
    );
    assert_eq!(peers_not_answering_gauge(&node1).await, 1.0);
    assert_eq!(
        peers_not_answering_gauge(&node2).await,
        0.0,
        "node 2 forwarded nothing"
    );

    // Healed: every user exact through either node (forwarding works again).
    network.heal(1, 2);
    wait_for_ledger(&spec, &[1, 2], &after_cut, Duration::from_secs(90)).await;
    assert!(
        node1
            .log()
            .contains(&format!("node {} answers again", node2.id)),
        "node 1 did not say node 2 answers again"
    );
    assert!(
        not_answering(&node1).await.is_empty(),
        "node 1 still lists node 2 as not answering"
    );
    assert_eq!(peers_not_answering_gauge(&node1).await, 0.0);

    // Node 2 cut off from everything. A client beside it may get the totals it held (nothing
    // newer is applied anywhere before its partitions move) and, once its session is lost,
    // UNAVAILABLE: never a total that misses what node 1 applies after taking over.
    let (before, _) = ask_from(&network, 2, &spec.grpc_url(2), &theirs)
        .unwrap_or_else(|e| panic!("node 2 did not answer for its own user {theirs}: {e}"));
    let log_mark = node2.log().len();
    network.isolate(2);
    let isolated = Instant::now();
    let lost_by = Duration::from_millis(spec.session_timeout_ms as u64) + Duration::from_secs(10);
    loop {
        match ask_from(&network, 2, &spec.grpc_url(2), &theirs) {
            Ok((purchases, _)) => assert_eq!(
                purchases, before,
                "isolated node 2 answered {theirs} with {purchases} purchases, not the {before} it held"
            ),
            Err(said) if said.contains("Unavailable") => break,
            Err(said) => panic!("isolated node 2 failed otherwise: {said}"),
        }
        assert!(
            isolated.elapsed() < lost_by,
            "isolated node 2 still answered for {theirs} after {:?}",
            isolated.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let all: std::collections::BTreeSet<u32> = (0..PARTITIONS).collect();
    eventually(
        Duration::from_secs(60),
        "node 1 owning every shard while node 2 is cut off",
        || async { (node1.try_shards().await? == all).then_some(()) },
    )
    .await;
    let while_isolated = spec.produce(4_000, USERS, "while-isolated.json");
    let after_isolation = merge_ledgers(
        &spec,
        &[&first, &during_cut, &while_isolated],
        "after-isolation.json",
    );
    wait_for_ledger(&spec, &[1], &after_isolation, Duration::from_secs(90)).await;
    // The node is still there, still answering UNAVAILABLE beside itself.
    assert!(node2.is_running(), "isolated node 2 exited");
    let said = ask_from(&network, 2, &spec.grpc_url(2), &theirs)
        .expect_err("isolated node 2 answered after losing its partitions");
    assert!(said.contains("Unavailable"), "not UNAVAILABLE: {said}");

    // Reconnected: it rejoins, takes shards back, and every total is exact through both.
    network.reconnect(2);
    wait_for_split(&[&node1, &node2], PARTITIONS).await;
    wait_for_ledger(&spec, &[1, 2], &after_isolation, Duration::from_secs(120)).await;
    let log = node2.log();
    assert!(
        log[log_mark..].contains("were lost by this node"),
        "node 2 did not say it lost its partitions"
    );
    let printed = librdkafka_prints_since(&log, log_mark);
    assert!(
        printed.is_empty(),
        "node 2 let librdkafka print past its logger while cut off:\n{}",
        printed.join("\n")
    );
    assert!(node1.stop().success(), "node 1 did not stop cleanly");
    assert!(node2.stop().success(), "node 2 did not stop cleanly");
}
