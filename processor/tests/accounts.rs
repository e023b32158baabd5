//! Commands with answers after commit, on the bank accounts (`accounts`, hosted with
//! `processor --accounts-topic`) against the real broker, every node a separate process.

mod support;

use std::time::Duration;

use kafka_sharding::partitioner::partition_for_key;
use proto::bank::accounts_client::AccountsClient;
use proto::bank::{Account, Change, TransferRequest};
use support::*;
use tonic::transport::Channel;
use tonic::Code;

/// A client of the node at `url` (connected on first use: nodes may still be starting).
fn accounts_at(url: String) -> AccountsClient<Channel> {
    AccountsClient::new(Channel::from_shared(url).unwrap().connect_lazy())
}

fn change(account: &str, amount: i64, key: &str) -> Change {
    Change {
        account: account.into(),
        amount,
        idempotency_key: key.into(),
    }
}

fn transfer(from: &str, to: &str, amount: i64, key: &str) -> TransferRequest {
    TransferRequest {
        from: from.into(),
        to: to.into(),
        amount,
        idempotency_key: key.into(),
        at_unix_ms: 0,
    }
}

/// The shards of entity type `group` node `node` hosts.
async fn shard_ids(node: &Node, group: &str) -> Vec<u32> {
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

async fn balance(client: &mut AccountsClient<Channel>, account: &str) -> i64 {
    client
        .get_balance(Account {
            account: account.into(),
        })
        .await
        .expect("a balance")
        .into_inner()
        .balance
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_are_answered_once_committed_and_once_per_idempotency_key() {
    require_broker();
    let mut spec = ClusterSpec::new("accounts", 22_500);
    spec.create_topic(4);
    let mut bank = spec.clone();
    bank.topic = unique("accounts-bank");
    bank.create_topic(8);
    let accounts_group = unique("accounts-group");
    spec.extra_args = vec![
        "--accounts-topic".into(),
        bank.topic.clone(),
        "--accounts-group".into(),
        accounts_group.clone(),
    ];
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let (mut via1, mut via2) = (accounts_at(spec.grpc_url(1)), accounts_at(spec.grpc_url(2)));
    // Both nodes own accounts shards: commands cross between them.
    eventually(
        Duration::from_secs(60),
        "both nodes to own account shards",
        || async {
            let mut owned = Vec::new();
            for node in [&node1, &node2] {
                let shards = node
                    .get_json(&format!("/cluster/shards/{accounts_group}"))
                    .await?;
                owned.push(shards["regions"].as_array()?.len());
            }
            (owned.iter().all(|n| *n > 0) && owned.iter().sum::<usize>() == 8).then_some(())
        },
    )
    .await;

    // A deposit through node 1, for accounts on both nodes: answered with the new balance,
    // and visible to a query through the other node as soon as it is answered.
    // acc-0, and three more accounts on each node.
    let on_node1: Vec<u32> = shard_ids(&node1, &accounts_group).await;
    let owned_by_1 = |a: &String| on_node1.contains(&partition_for_key(a.as_bytes(), 8));
    let candidates: Vec<String> = (1..200).map(|i| format!("acc-{i}")).collect();
    let mut accounts = vec!["acc-0".to_string()];
    accounts.extend(candidates.iter().filter(|a| owned_by_1(a)).take(3).cloned());
    accounts.extend(
        candidates
            .iter()
            .filter(|a| !owned_by_1(a))
            .take(3)
            .cloned(),
    );
    assert_eq!(accounts.len(), 7);
    for account in &accounts {
        let answer = via1
            .deposit(change(account, 500, &format!("open-{account}")))
            .await
            .expect("deposit")
            .into_inner();
        assert_eq!(
            (answer.account.as_str(), answer.balance),
            (account.as_str(), 500)
        );
        assert_eq!(
            balance(&mut via2, account).await,
            500,
            "read after the answer"
        );
    }
    // The same deposit retried with its key, through the other node: the first answer, once.
    for account in &accounts {
        let again = via2
            .deposit(change(account, 500, &format!("open-{account}")))
            .await
            .expect("retried deposit")
            .into_inner();
        assert_eq!(again.balance, 500, "a retry is answered, not applied");
    }
    // Refused from the balance at the time: nothing changes.
    let refused = via2
        .withdraw(change("acc-0", 501, "w-big"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "insufficient funds");
    // Without a key every call is a new operation.
    for expected in [300, 100] {
        let answer = via1.withdraw(change("acc-0", 200, "")).await.unwrap();
        assert_eq!(answer.into_inner().balance, expected);
    }
    let refused_again = via1.withdraw(change("acc-0", 200, "")).await.unwrap_err();
    assert_eq!(refused_again.code(), Code::FailedPrecondition);

    // Bad input: INVALID_ARGUMENT, nothing written.
    let long = "x".repeat(300);
    for bad in [
        change("", 5, ""),
        change(&accounts[1], 0, ""),
        change(&accounts[1], -5, ""),
        change(&long, 5, ""),
        change(&accounts[1], 5, &long),
    ] {
        let status = via1.deposit(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    for (from, to, amount) in [
        ("", "acc-2", 5),
        ("acc-1", "acc-1", 5),
        ("acc-1", "acc-2", 0),
    ] {
        let status = via1
            .transfer(transfer(from, to, amount, ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    assert_eq!(balance(&mut via1, &accounts[1]).await, 500);

    // Transfers from an account on node 1 to one on node 2: answered with the debited balance
    // once the debit is committed; the credit travels as a message, applied once; each
    // completed transfer is emitted to transfers-completed once.
    let from = accounts
        .iter()
        .find(|a| owned_by_1(a) && *a != "acc-0")
        .unwrap();
    let to = accounts
        .iter()
        .find(|a| !owned_by_1(a) && *a != "acc-0")
        .unwrap();
    let key = unique("transfer");
    let debited = via2.transfer(transfer(from, to, 120, &key)).await.unwrap();
    assert_eq!(debited.into_inner().balance, 380);
    let retried = via1.transfer(transfer(from, to, 120, &key)).await.unwrap();
    assert_eq!(
        retried.into_inner().balance,
        380,
        "a retried transfer is answered, not run"
    );
    let keyless = via1.transfer(transfer(to, from, 20, "")).await.unwrap();
    let refused = via1
        .transfer(transfer(from, to, 10_000, ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let mut expected: std::collections::BTreeMap<String, i64> =
        accounts.iter().map(|a| (a.clone(), 500)).collect();
    expected.insert("acc-0".into(), 100);
    expected.insert(from.clone(), 500 - 120 + 20);
    expected.insert(to.clone(), 500 + 120 - 20);
    // The credit was committed to `to`'s partition before the first transfer was answered, so
    // the keyless transfer (written after) runs after it.
    assert_eq!(keyless.into_inner().balance, 500 + 120 - 20);
    eventually(Duration::from_secs(30), "the credits to land", || async {
        let mut client = accounts_at(spec.grpc_url(2));
        (balance(&mut client, from).await == expected[from]).then_some(())
    })
    .await;
    let completed = read_topic(accounts::TRANSFERS_COMPLETED);
    let ours = completed
        .iter()
        .filter(|(_, _, k, _)| k.as_deref() == Some(key.as_bytes()))
        .count();
    assert_eq!(ours, 1, "the keyed transfer is emitted exactly once");

    // Node 2 hands its shards to node 1, which restores the accounts with their remembered
    // answers: a retry of a first deposit is still answered, not applied.
    assert!(node2.stop().success());
    eventually(
        Duration::from_secs(60),
        "node 1 to own every account shard",
        || async {
            let shards = node1
                .get_json(&format!("/cluster/shards/{accounts_group}"))
                .await?;
            (shards["regions"].as_array()?.len() == 8).then_some(())
        },
    )
    .await;
    for account in &accounts {
        let again = via1
            .deposit(change(account, 500, &format!("open-{account}")))
            .await
            .expect("retried deposit after the hand-off")
            .into_inner();
        assert_eq!(again.balance, 500, "the first answer, for {account}");
        assert_eq!(balance(&mut via1, account).await, expected[account]);
    }
    let again = via1.transfer(transfer(from, to, 120, &key)).await.unwrap();
    assert_eq!(
        again.into_inner().balance,
        380,
        "the transfer's first answer"
    );
    assert_eq!(balance(&mut via1, to).await, expected[to]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_accepted_before_its_owner_dies_is_applied_once_by_the_next_owner() {
    require_broker();
    let mut spec = ClusterSpec::new("accounts-crash", 23_500);
    spec.create_topic(4);
    let mut bank = spec.clone();
    bank.topic = unique("accounts-crash-bank");
    bank.create_topic(8);
    let accounts_group = unique("accounts-crash-group");
    spec.extra_args = vec![
        "--accounts-topic".into(),
        bank.topic.clone(),
        "--accounts-group".into(),
        accounts_group.clone(),
    ];
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let mut via1 = accounts_at(spec.grpc_url(1));
    eventually(
        Duration::from_secs(60),
        "both nodes to own account shards",
        || async {
            let (a, b) = (
                node1
                    .get_json(&format!("/cluster/shards/{accounts_group}"))
                    .await?,
                node2
                    .get_json(&format!("/cluster/shards/{accounts_group}"))
                    .await?,
            );
            let (a, b) = (
                a["regions"].as_array()?.len(),
                b["regions"].as_array()?.len(),
            );
            (a > 0 && b > 0 && a + b == 8).then_some(())
        },
    )
    .await;
    let node2_shards = shard_ids(&node2, &accounts_group).await;
    let account = (0..100)
        .map(|i| format!("crash-{i}"))
        .find(|a| node2_shards.contains(&partition_for_key(a.as_bytes(), 8)))
        .unwrap();
    let opened = via1.deposit(change(&account, 100, "open")).await.unwrap();
    assert_eq!(opened.into_inner().balance, 100);

    // The owner stops responding; a command for its account is written to Kafka and waits.
    node2.freeze();
    let waiting = {
        let mut client = accounts_at(spec.grpc_url(1));
        let account = account.clone();
        tokio::spawn(async move { client.deposit(change(&account, 50, "while-dying")).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "answered while its owner was frozen"
    );
    node2.kill();
    // Node 1 gets the partition once the group drops node 2, restores the account, reads the
    // command and runs it: the caller waiting on node 1 gets the committed answer.
    let answer = tokio::time::timeout(Duration::from_secs(40), waiting)
        .await
        .expect("an answer within the command timeout")
        .unwrap()
        .expect("the accepted command's answer");
    assert_eq!(answer.into_inner().balance, 150);
    let retried = via1
        .deposit(change(&account, 50, "while-dying"))
        .await
        .unwrap();
    assert_eq!(
        retried.into_inner().balance,
        150,
        "the retry gets the first answer"
    );
    assert_eq!(balance(&mut via1, &account).await, 150, "applied once");
}
