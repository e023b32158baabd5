//! Commands with answers after commit, on the bank accounts (`accounts`, hosted with
//! `processor --accounts-topic`) against the real broker, every node a separate process.

mod support;

use std::time::Duration;

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
    let accounts: Vec<String> = (0..8).map(|i| format!("acc-{i}")).collect();
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
        change("acc-1", 0, ""),
        change("acc-1", -5, ""),
        change(&long, 5, ""),
        change("acc-1", 5, &long),
    ] {
        let status = via1.deposit(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    let transfer = via1
        .transfer(TransferRequest {
            from: "acc-1".into(),
            to: "acc-2".into(),
            amount: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(transfer.code(), Code::Unimplemented);
    assert_eq!(balance(&mut via1, "acc-1").await, 500);

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
        let expected = if account == "acc-0" { 100 } else { 500 };
        assert_eq!(again.balance, 500, "the first answer, for {account}");
        assert_eq!(balance(&mut via1, account).await, expected);
    }
}
