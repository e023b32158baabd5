//! Many entities: a million distinct users, each with one event, on two nodes whose live cap
//! holds a fraction of them, so nearly all are passivated; then both nodes stop and two fresh
//! ones restore every state from the changelog. A sample of the users' totals is checked after
//! processing, every user's after the restore.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::ledger::Ledger;

use support::*;

const USERS: u64 = 1_000_000;
const LIVE_CAP: u64 = 20_000;
/// Users checked right after processing ("0" .. "9999"); all of them after the restore.
const SAMPLE: u64 = 10_000;

/// A counter of `/cluster/stats` summed over `nodes` (each must answer).
async fn sum_counter(nodes: &[Node], name: &str) -> u64 {
    let mut sum = 0;
    for node in nodes {
        sum += node.counter(name).await;
    }
    sum
}

/// A ledger of the users "0" .. `users - 1` of `ledger`.
fn sample_of(ledger: &Path, users: u64) -> PathBuf {
    let mut sample = Ledger::load(ledger).unwrap();
    sample.users = users;
    sample
        .totals
        .retain(|id, _| id.parse::<u64>().is_ok_and(|n| n < users));
    let path = ledger.with_file_name("sample.json");
    sample.save(&path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_distinct_entities_are_processed_passivated_and_restored_exactly_on_two_nodes() {
    require_broker();
    let mut spec = ClusterSpec::new("million", 9_000);
    spec.extra_args = vec![
        "--max-live-entities".into(),
        LIVE_CAP.to_string(),
        // Only the owners' own work is measured here; standbys have tests of their own.
        "--standby-replicas".into(),
        "0".into(),
    ];
    // "0", "1", ... "999999": every event a new entity.
    spec.producer_args = vec!["--users-in-turn".into()];
    spec.create_topic(16);
    let mut nodes = [spec.start_node(1), spec.start_node(2)];
    wait_for_split(&[&nodes[0], &nodes[1]], 16).await;
    let ledger = spec.produce(USERS, USERS, "ledger.json");
    // Asking a million users takes a while: once everything is processed, not before.
    eventually(
        Duration::from_secs(600),
        "the two nodes to process every event",
        || async { (sum_counter(&nodes, "events_processed_local").await >= USERS).then_some(()) },
    )
    .await;

    // A sample through node 1 (about half of it answered by node 2); every user is checked
    // after the restore below, whose states are the ones these nodes wrote.
    let sample = sample_of(&ledger, SAMPLE);
    wait_for_ledger(&spec, &[1], &sample, Duration::from_secs(120)).await;
    for node in &nodes {
        let regions = node
            .get_json(&format!("/cluster/shards/{}", spec.group))
            .await
            .unwrap_or_else(|| panic!("node {} did not list its shards", node.id));
        let sum = |field: &str| -> u64 {
            regions["regions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r[field].as_u64().unwrap())
                .sum()
        };
        let (live, stored) = (sum("numEntities"), sum("numStoredEntities"));
        assert!(
            live <= LIVE_CAP,
            "node {} keeps {live} entities live over its cap of {LIVE_CAP}",
            node.id
        );
        assert!(
            node.counter("entities_passivated").await >= stored - LIVE_CAP,
            "node {} passivated too few of its {stored} entities",
            node.id
        );
    }
    let processed = sum_counter(&nodes, "events_processed_local").await;
    assert_eq!(processed, USERS, "every event applied once, on its owner");

    for node in nodes.iter_mut() {
        assert!(node.stop().success(), "node {} stopped gracefully", node.id);
    }
    // Fresh processes: nothing in memory, everything from the changelog.
    let nodes = [spec.start_node(1), spec.start_node(2)];
    wait_for_split(&[&nodes[0], &nodes[1]], 16).await;
    eventually(
        Duration::from_secs(600),
        "the two fresh nodes to restore every state",
        || async { (sum_counter(&nodes, "entities_restored").await >= USERS).then_some(()) },
    )
    .await;
    wait_for_ledger(&spec, &[2], &ledger, Duration::from_secs(600)).await;
    for node in &nodes {
        assert_eq!(
            node.counter("events_processed_local").await,
            0,
            "node {} re-applied events the changelog already held",
            node.id
        );
    }
    let restored = sum_counter(&nodes, "entities_restored").await;
    // A shard that moved between the two while they joined was restored twice.
    assert!(
        restored >= USERS,
        "{restored} states restored, not every one"
    );
}
