//! Many entities: a million distinct users, each with one event, on two nodes whose live cap
//! holds a fraction of them, so nearly all are passivated; then both nodes stop and two fresh
//! ones restore every state from the changelog. Every user's totals are checked, each time.

mod support;

use std::time::Duration;

use support::*;

const USERS: u64 = 1_000_000;
const LIVE_CAP: u64 = 20_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_million_distinct_entities_are_processed_passivated_and_restored_exactly_on_two_nodes() {
    require_broker();
    let mut spec = ClusterSpec::new("million", 33_000);
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

    // Through node 1, so about half the answers come from node 2.
    wait_for_ledger(&spec, &[1], &ledger, Duration::from_secs(600)).await;
    let mut processed = 0;
    for node in &nodes {
        processed += node.counter("events_processed_local").await;
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
    assert_eq!(processed, USERS, "every event applied once, on its owner");

    for node in nodes.iter_mut() {
        assert!(node.stop().success(), "node {} stopped gracefully", node.id);
    }
    // Fresh processes: nothing in memory, everything from the changelog.
    let nodes = [spec.start_node(1), spec.start_node(2)];
    wait_for_split(&[&nodes[0], &nodes[1]], 16).await;
    wait_for_ledger(&spec, &[2], &ledger, Duration::from_secs(600)).await;
    let mut restored = 0;
    for node in &nodes {
        restored += node.counter("entities_restored").await;
        assert_eq!(
            node.counter("events_processed_local").await,
            0,
            "node {} re-applied events the changelog already held",
            node.id
        );
    }
    assert_eq!(restored, USERS, "every state restored once");
}
