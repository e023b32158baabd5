//! Clients of the bank accounts (`accounts`, hosted with `processor --accounts-topic`).

use kafka_sharding::partitioner::partition_for_key;
use proto::bank::accounts_client::AccountsClient;
use proto::bank::{Account, Change, TransferRequest};
use tonic::transport::Channel;

use std::time::Duration;

use super::{eventually, unique, ClusterSpec, Node};

/// Partitions of the bank topic the accounts tests create.
pub const BANK_PARTITIONS: usize = 8;

/// `spec`'s cluster with the accounts hosted beside the purchases: its input topic (4
/// partitions) and a bank topic of [`BANK_PARTITIONS`] created, every node started with
/// `--accounts-topic` and `--accounts-group`. Returns the spec and the accounts' group.
pub fn bank_cluster(mut spec: ClusterSpec) -> (ClusterSpec, String) {
    spec.create_topic(4);
    let mut bank = spec.clone();
    bank.topic = unique(&format!("{}-bank", spec.name));
    bank.create_topic(BANK_PARTITIONS as u32);
    let group = unique(&format!("{}-accounts-group", spec.name));
    spec.extra_args = vec![
        "--accounts-topic".into(),
        bank.topic,
        "--accounts-group".into(),
        group.clone(),
    ];
    (spec, group)
}

/// Waits until each of `nodes` owns account shards of `group` and together they own all.
pub async fn wait_for_account_split(nodes: &[&Node], group: &str) {
    eventually(
        Duration::from_secs(90),
        &format!("{} nodes to split the account shards", nodes.len()),
        || async {
            let mut owned = Vec::new();
            for node in nodes {
                let shards = node.get_json(&format!("/cluster/shards/{group}")).await?;
                owned.push(shards["regions"].as_array()?.len());
            }
            (owned.iter().all(|n| *n > 0) && owned.iter().sum::<usize>() == BANK_PARTITIONS)
                .then_some(())
        },
    )
    .await;
}

/// A client of the node at `url` (connected on first use: nodes may still be starting).
pub fn accounts_at(url: String) -> AccountsClient<Channel> {
    AccountsClient::new(Channel::from_shared(url).unwrap().connect_lazy())
}

pub fn change(account: &str, amount: i64, key: &str) -> Change {
    Change {
        account: account.into(),
        amount,
        idempotency_key: key.into(),
    }
}

pub fn transfer(from: &str, to: &str, amount: i64, key: &str) -> TransferRequest {
    TransferRequest {
        from: from.into(),
        to: to.into(),
        amount,
        idempotency_key: key.into(),
        at_unix_ms: 0,
    }
}

/// The shards of entity type `group` node `node` hosts.
pub async fn shard_ids(node: &Node, group: &str) -> Vec<u32> {
    let shards = node
        .get_json(&format!("/cluster/shards/{group}"))
        .await
        .expect("/cluster/shards");
    shards["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| {
            r["shardId"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("a shard id")
        })
        .collect()
}

/// An account named `<prefix>-<n>` whose shard `node` hosts, opened with a deposit of 100 (key
/// "open") through `via`, which must answer 100.
pub async fn open_account_on(
    node: &Node,
    group: &str,
    prefix: &str,
    via: &mut AccountsClient<Channel>,
) -> String {
    let shards = shard_ids(node, group).await;
    let account = (0..100)
        .map(|i| format!("{prefix}-{i}"))
        .find(|a| shards.contains(&partition_for_key(a.as_bytes(), BANK_PARTITIONS as u32)))
        .expect("one of 100 accounts on the node");
    let opened = via.deposit(change(&account, 100, "open")).await.unwrap();
    assert_eq!(opened.into_inner().balance, 100);
    account
}

pub async fn balance(client: &mut AccountsClient<Channel>, account: &str) -> i64 {
    try_balance(client, account).await.expect("a balance")
}

/// The balance, or `None` while the account's owner cannot answer (a rebalance, a restart).
pub async fn try_balance(client: &mut AccountsClient<Channel>, account: &str) -> Option<i64> {
    let answer = client.get_balance(Account {
        account: account.into(),
    });
    Some(answer.await.ok()?.into_inner().balance)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn scheduled(from: &str, to: &str, amount: i64, key: &str, at_unix_ms: i64) -> TransferRequest {
    TransferRequest {
        at_unix_ms,
        ..transfer(from, to, amount, key)
    }
}
