//! Commands with answers after commit, on the bank accounts (`accounts`, hosted with
//! `processor --accounts-topic`) against the real broker, every node a separate process.

mod support;

use std::time::Duration;

use kafka_sharding::partitioner::partition_for_key;
use proto::bank::TransferRequest;
use support::bank::*;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn commands_are_answered_once_committed_and_once_per_idempotency_key() {
    require_broker();
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("accounts", 22_500));
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let (mut via1, mut via2) = (accounts_at(spec.grpc_url(1)), accounts_at(spec.grpc_url(2)));
    // Both nodes own accounts shards: commands cross between them.
    wait_for_account_split(&[&node1, &node2], &accounts_group).await;

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
    // Node 2 forwards the retries for node 1's accounts to node 1 over the query link, where
    // they run without a record (`command_seconds{path="forwarded"}`, counted where the caller
    // came in); its own accounts' run at its shards.
    let commands = |path: &'static str| {
        let node2 = &node2;
        async move {
            node2
                .metric_sum(
                    "processor_command_seconds_count",
                    &format!(r#"path="{path}""#),
                )
                .await
        }
    };
    let (forwarded, as_records) = (commands("forwarded").await, commands("record").await);
    for account in &accounts {
        let again = via2
            .deposit(change(account, 500, &format!("open-{account}")))
            .await
            .expect("retried deposit")
            .into_inner();
        assert_eq!(again.balance, 500, "a retry is answered, not applied");
    }
    let for_node1 = accounts.iter().filter(|a| owned_by_1(a)).count() as f64;
    assert_eq!(
        commands("forwarded").await - forwarded,
        for_node1,
        "node 2 forwards each retry for an account of node 1"
    );
    assert_eq!(
        commands("record").await,
        as_records,
        "no retry is written as a record"
    );
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
    let refused_label = r#"outcome="refused""#;
    let refusals = node1
        .metric_sum("processor_command_seconds_count", refused_label)
        .await;
    let refused_again = via1.withdraw(change("acc-0", 200, "")).await.unwrap_err();
    assert_eq!(refused_again.code(), Code::FailedPrecondition);
    assert_eq!(
        node1
            .metric_sum("processor_command_seconds_count", refused_label)
            .await,
        refusals + 1.0,
        "the refusal is timed as such where the caller came in"
    );

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
    // The answer says the debit is committed and the credit on its way (a record of `to`'s
    // partition, committed with the debit). A command from another sender is ordered after the
    // credit only once `to`'s shard has read it (a command runs at the owner without a record,
    // `commands::direct`): a caller that needs the credit first waits until a query sees it.
    eventually(Duration::from_secs(30), "the credit to land", || async {
        let mut client = accounts_at(spec.grpc_url(1));
        (balance(&mut client, to).await == 620).then_some(())
    })
    .await;
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
    // The keyless transfer ran after the credit it waited for.
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
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("accounts-crash", 23_500));
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let mut via1 = accounts_at(spec.grpc_url(1));
    wait_for_account_split(&[&node1, &node2], &accounts_group).await;
    let account = open_account_on(&node2, &accounts_group, "crash", &mut via1).await;

    // The owner stops responding; a command for its account, forwarded to it over the query
    // link, waits. Killed, the owner breaks the link, and the command (it has an idempotency
    // key) is written to Kafka for the next owner.
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

/// The owner is stopped exactly between writing a command's checkpoint and committing it (the
/// command applied, its account's new state, its offsets and its owed answer all in the open
/// transaction: the runtime's `KAFKA_SHARDING_HOLD_COMMIT_WHEN` hold, `consumer/commit_hold.rs`),
/// then SIGKILLed there. The caller gets no answer for that attempt; its retry with the same
/// key, through the node that takes the account over, is applied once.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_applied_but_not_committed_when_its_owner_dies_is_not_answered_and_its_retry_applies_once(
) {
    require_broker();
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("accounts-uncommitted", 4_000));
    let hold = log_dir(&spec.name).join("hold-commit");
    let _ = std::fs::remove_file(&hold);
    let node1 = spec.start_node(1);
    let mut held_spec = spec.clone();
    held_spec.extra_env.push((
        "KAFKA_SHARDING_HOLD_COMMIT_WHEN".into(),
        hold.display().to_string(),
    ));
    let mut node2 = held_spec.start_node(2);
    let mut via1 = accounts_at(spec.grpc_url(1));
    wait_for_account_split(&[&node1, &node2], &accounts_group).await;
    let account = open_account_on(&node2, &accounts_group, "uncommitted", &mut via1).await;
    // Another account of node 2's, whose deposit goes to node 2 itself: its shard runs the
    // command without a record (`commands::direct`).
    let mut via2 = accounts_at(spec.grpc_url(2));
    let direct = open_account_on(&node2, &accounts_group, "direct", &mut via2).await;
    // (Counted before the hold: while a transaction holds offsets open, `/metrics` waits for
    // its lag probe's stable offsets.)
    let direct_path = r#"path="direct""#;
    let run_directly = node2
        .metric_sum("processor_command_seconds_count", direct_path)
        .await;
    let opened = via2.deposit(change(&direct, 10, "more")).await.unwrap();
    assert_eq!(opened.into_inner().balance, 110);
    assert!(
        node2
            .metric_sum("processor_command_seconds_count", direct_path)
            .await
            > run_directly,
        "node 2 runs a deposit to its own account without a record"
    );

    // Armed now: node 2's next checkpoint that writes a state is one of the deposits', and it
    // stops after writing, before its commit (the other deposit's state waits for a later one).
    std::fs::write(&hold, b"").unwrap();
    let attempt = |node: u16, account: &str| {
        let mut client = accounts_at(spec.grpc_url(node));
        let mut request = tonic::Request::new(change(account, 50, "lost"));
        request.set_timeout(Duration::from_secs(10));
        tokio::spawn(async move { client.deposit(request).await })
    };
    let (forwarded, at_owner) = (attempt(1, &account), attempt(2, &direct));
    eventually(
        Duration::from_secs(20),
        "node 2 to apply a deposit and stop before committing it",
        || async {
            node2
                .log()
                .contains("written states stopped before its commit")
                .then_some(())
        },
    )
    .await;
    for (how, attempt) in [
        ("forwarded to its owner", forwarded),
        ("at its owner", at_owner),
    ] {
        let lost = attempt.await.unwrap();
        assert!(
            lost.is_err(),
            "an answer for a change that was never committed ({how}): {lost:?}"
        );
    }
    node2.kill();
    std::fs::remove_file(&hold).unwrap();

    // The caller retries with the same key until it gets a definite answer: node 1 takes the
    // accounts over once the group drops node 2, aborts node 2's open transaction, restores the
    // committed balances (100 and 110) and runs each deposit once.
    for (account, committed) in [(&account, 100), (&direct, 110)] {
        let retried = eventually(
            Duration::from_secs(90),
            "a definite answer to the retried deposit",
            || async {
                let mut client = accounts_at(spec.grpc_url(1));
                let mut request = tonic::Request::new(change(account, 50, "lost"));
                request.set_timeout(Duration::from_secs(10));
                client
                    .deposit(request)
                    .await
                    .ok()
                    .map(|answer| answer.into_inner().balance)
            },
        )
        .await;
        assert_eq!(
            retried,
            committed + 50,
            "{account}: the deposit applied once, on the committed balance"
        );
        let again = via1.deposit(change(account, 50, "lost")).await.unwrap();
        assert_eq!(
            again.into_inner().balance,
            committed + 50,
            "{account}: the retry's answer again"
        );
        assert_eq!(
            balance(&mut via1, account).await,
            committed + 50,
            "{account}: applied once"
        );
    }
}

/// A zombie that runs a command at its owner, unseen by the node that took its shards over.
/// Node 2 alone owns every account; a deposit runs at its owner (no record, so its checkpoint
/// sends no offset: the offset did not move) and the checkpoint is held after collecting the
/// change, before writing anything (`KAFKA_SHARDING_HOLD_WRITE_WHEN`). Node 2 is then frozen,
/// and node 1, started only now (it never saw node 2 claim anything), takes every shard once
/// the group drops node 2. Thawed, node 2 writes the change after node 1 read the changelog:
/// only the fence of the committer named by the partition's last offset
/// (`Restorer::fence_committers`) stops that transaction. The caller gets no success, node 1's
/// balance is the committed one, and the retry with the same key applies once.
#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_owner_cannot_commit_a_command_after_its_shard_was_taken_over() {
    require_broker();
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("accounts-zombie", 27_500));
    let hold = log_dir(&spec.name).join("hold-write");
    let _ = std::fs::remove_file(&hold);
    let mut held_spec = spec.clone();
    held_spec.extra_env.push((
        "KAFKA_SHARDING_HOLD_WRITE_WHEN".into(),
        hold.display().to_string(),
    ));
    let node2 = held_spec.start_node(2);
    wait_for_account_split(&[&node2], &accounts_group).await;
    let mut via2 = accounts_at(spec.grpc_url(2));
    // Opened through a record (the shard had read none yet), then a deposit run at its owner:
    // its checkpoint commits no offset, the last one committed names node 2.
    let account = open_account_on(&node2, &accounts_group, "zombie", &mut via2).await;
    let more = via2.deposit(change(&account, 10, "more")).await.unwrap();
    assert_eq!(more.into_inner().balance, 110);

    std::fs::write(&hold, b"").unwrap();
    let mut client = accounts_at(spec.grpc_url(2));
    let mut request = tonic::Request::new(change(&account, 50, "zombie"));
    // Long enough to outlast the freeze below: the answer is decided after the thaw.
    request.set_timeout(Duration::from_secs(120));
    let attempt = tokio::spawn(async move { client.deposit(request).await });
    eventually(
        Duration::from_secs(20),
        "node 2 to apply the deposit and hold its checkpoint before writing it",
        || async {
            node2
                .log()
                .contains("collected states stopped before writing them")
                .then_some(())
        },
    )
    .await;
    node2.freeze();

    // Its own seed: a frozen seed would hold its admission in a handshake that never ends.
    let mut alone = spec.clone();
    alone.seeds = vec![27_501];
    let node1 = alone.start_node(1);
    eventually(
        Duration::from_secs(90),
        "node 1 to take every account shard from the frozen node 2",
        || async {
            let shards = node1
                .get_json(&format!("/cluster/shards/{accounts_group}"))
                .await?;
            (shards["regions"].as_array()?.len() == BANK_PARTITIONS).then_some(())
        },
    )
    .await;
    let mut via1 = accounts_at(spec.grpc_url(1));
    let committed = eventually(Duration::from_secs(60), "node 1 to answer", || {
        let mut via1 = via1.clone();
        let account = account.clone();
        async move { try_balance(&mut via1, &account).await }
    })
    .await;
    assert_eq!(committed, 110, "node 1 restored the committed balance");
    assert!(
        node1
            .log()
            .contains("and is not in the group: its transactional id"),
        "node 1 fenced node 2 as the committer of the account's partition:\n{}",
        node1.log()
    );

    std::fs::remove_file(&hold).unwrap();
    node2.thaw();
    let zombie = attempt.await.unwrap();
    assert!(
        zombie.is_err(),
        "the zombie answered a change node 1 never saw: {zombie:?}"
    );
    assert_eq!(
        balance(&mut via1, &account).await,
        110,
        "nothing of the zombie's"
    );
    let retried = eventually(
        Duration::from_secs(60),
        "a definite answer to the retried deposit",
        || {
            let mut via1 = via1.clone();
            let account = account.clone();
            async move {
                via1.deposit(change(&account, 50, "zombie"))
                    .await
                    .ok()
                    .map(|answer| answer.into_inner().balance)
            }
        },
    )
    .await;
    assert_eq!(
        retried, 160,
        "the deposit applied once, on the committed balance"
    );
    assert_eq!(balance(&mut via1, &account).await, 160, "applied once");
    eventually(
        Duration::from_secs(30),
        "node 2 to find its producer fenced",
        || async { node2.log().contains("recovering").then_some(()) },
    )
    .await;
}

/// The records of `topic` keyed `key`.
fn keyed(topic: &str, key: &str) -> usize {
    read_topic(topic)
        .iter()
        .filter(|(_, _, k, _)| k.as_deref() == Some(key.as_bytes()))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_transfers_fire_once_when_due_through_a_crash_and_a_full_restart() {
    require_broker();
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("accounts-timers", 24_500));
    let node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let mut via1 = accounts_at(spec.grpc_url(1));
    wait_for_account_split(&[&node1, &node2], &accounts_group).await;
    let on_node2 = shard_ids(&node2, &accounts_group).await;
    let owned_by_2 = |a: &String| on_node2.contains(&partition_for_key(a.as_bytes(), 8));
    let names: Vec<String> = (0..200).map(|i| format!("t-{i}")).collect();
    let mut on2 = names.iter().filter(|a| owned_by_2(a)).cloned();
    let (rich, poor) = (on2.next().unwrap(), on2.next().unwrap());
    let payee = names.iter().find(|a| !owned_by_2(a)).unwrap().clone();
    via1.deposit(change(&rich, 1_000, "open")).await.unwrap();
    via1.deposit(change(&poor, 10, "open")).await.unwrap();

    // Bad times and accounts: INVALID_ARGUMENT, nothing scheduled.
    let now = now_ms();
    for bad in [
        scheduled(&rich, &payee, 5, "", now - 60_000),
        scheduled(&rich, &payee, 5, "", now + 400 * 86_400_000),
        scheduled(&rich, &rich, 5, "", now + 1_000),
        scheduled(&rich, &payee, 0, "", now + 1_000),
        // Keyed, so the account judges the time (it might be a retry): never taken, refused.
        scheduled(&rich, &payee, 5, &unique("late"), now - 60_000),
    ] {
        let status = via1.schedule_transfer(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }

    // Three transfers due in 5 s from accounts node 2 owns: one keyed (retried: the same
    // transfer), one without a key, one the account cannot pay for then.
    let due = now_ms() + 5_000;
    let keyed_id = unique("sched");
    let first = via1
        .schedule_transfer(scheduled(&rich, &payee, 100, &keyed_id, due))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.transfer_id, keyed_id,
        "a keyed transfer is named by its key"
    );
    let retried = via1
        .schedule_transfer(scheduled(&rich, &payee, 100, &keyed_id, due))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.transfer_id, keyed_id);
    let unkeyed = via1
        .schedule_transfer(scheduled(&rich, &payee, 50, "", due))
        .await
        .unwrap()
        .into_inner()
        .transfer_id;
    assert!(!unkeyed.is_empty() && unkeyed != keyed_id);
    let short_id = unique("sched-poor");
    via1.schedule_transfer(scheduled(&poor, &payee, 500, &short_id, due))
        .await
        .unwrap();
    assert_eq!(
        balance(&mut via1, &rich).await,
        1_000,
        "nothing moves early"
    );

    // Their owner dies before they are due: node 1 takes the accounts over from the
    // changelog, timers included, and fires each once when due (or at once, if overdue).
    node2.kill();
    eventually(
        Duration::from_secs(60),
        "the scheduled transfers",
        || async {
            let mut client = accounts_at(spec.grpc_url(1));
            let rich_now = try_balance(&mut client, &rich).await?;
            (rich_now == 850 && try_balance(&mut client, &payee).await? == 150).then_some(())
        },
    )
    .await;
    assert!(now_ms() >= due, "fired before its time");
    assert_eq!(
        balance(&mut via1, &poor).await,
        10,
        "nothing moved from poor"
    );
    let emitted = || {
        (
            keyed(accounts::TRANSFERS_COMPLETED, &keyed_id),
            keyed(accounts::TRANSFERS_COMPLETED, &unkeyed),
            keyed(accounts::TRANSFERS_REFUSED, &short_id),
        )
    };
    eventually(
        Duration::from_secs(30),
        "the completions and the refusal",
        || async { (emitted() == (1, 1, 1)).then_some(()) },
    )
    .await;
    // A caller that never saw its answer retries after the time: the first answer, nothing more.
    let late_retry = via1
        .schedule_transfer(scheduled(&rich, &payee, 100, &keyed_id, due))
        .await
        .expect("a keyed schedule retried after its time")
        .into_inner();
    assert_eq!(late_retry.transfer_id, keyed_id);

    // The whole cluster is down when a transfer is due: it fires once when it is back.
    let back_id = unique("sched-back");
    let back_at = now_ms() + 3_000;
    via1.schedule_transfer(scheduled(&payee, &rich, 30, &back_id, back_at))
        .await
        .unwrap();
    let mut node1 = node1;
    assert!(node1.stop().success());
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(back_at - now_ms()).unwrap_or(0) + 2_000,
    ))
    .await;
    let _node1 = spec.start_node(1);
    let _node2 = spec.start_node(2);
    eventually(
        Duration::from_secs(60),
        "the overdue transfer after the restart",
        || async {
            let mut client = accounts_at(spec.grpc_url(1));
            (try_balance(&mut client, &rich).await? == 880).then_some(())
        },
    )
    .await;
    let answered = |account: String| {
        let url = spec.grpc_url(2);
        async move {
            eventually(Duration::from_secs(60), "an answer through node 2", || {
                let (url, account) = (url.clone(), account.clone());
                async move { try_balance(&mut accounts_at(url), &account).await }
            })
            .await
        }
    };
    assert_eq!(answered(payee.clone()).await, 120);
    eventually(Duration::from_secs(30), "its completion", || async {
        (keyed(accounts::TRANSFERS_COMPLETED, &back_id) == 1).then_some(())
    })
    .await;
    // Nothing fires twice: every count stays at one once everything settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(emitted(), (1, 1, 1));
    assert_eq!(keyed(accounts::TRANSFERS_COMPLETED, &back_id), 1);
    assert_eq!(answered(rich.clone()).await, 880);
}

/// Sends `request` until it gets a definite answer (retrying a timeout or an unavailable owner
/// with the same idempotency key): the transfer's id.
async fn schedule_definitely(url: String, request: TransferRequest) -> String {
    let mut client = accounts_at(url);
    for _ in 0..10 {
        match client.schedule_transfer(request.clone()).await {
            Ok(answer) => return answer.into_inner().transfer_id,
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => panic!("scheduling {request:?}: {status}"),
        }
    }
    panic!("no definite answer for {request:?}")
}

/// The value at quantile `q` of sorted `values`.
fn quantile(values: &[i64], q: f64) -> i64 {
    values[((values.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_scheduled_transfers_fire_once_and_never_early_through_kills_hand_offs_and_a_full_restart(
) {
    use futures::StreamExt;
    require_broker();
    const TRANSFERS: i64 = 10_000;
    const PAYERS: i64 = 100;
    const PAYEES: i64 = 20;
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("timers", 25_500));
    let mut node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    wait_for_account_split(&[&node1, &node2], &accounts_group).await;
    let run = unique("tm");
    let payer = |i: i64| format!("{run}-payer-{}", i % PAYERS);
    let payee = |i: i64| format!("{run}-payee-{}", i % PAYEES);
    let mut via1 = accounts_at(spec.grpc_url(1));
    for i in 0..PAYERS {
        via1.deposit(change(&payer(i), 1_000_000, "open"))
            .await
            .unwrap();
    }

    // Due over 30 s from 45 s on (scheduling them takes ~20 s), one every 3 ms; scheduled
    // through both nodes.
    let first_due = now_ms() + 45_000;
    let due = |i: i64| first_due + i * 3;
    let key = |i: i64| format!("{run}-{i}");
    let started = std::time::Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..TRANSFERS)
        .map(|i| {
            let url = spec.grpc_url(1 + (i % 2) as u16);
            schedule_definitely(url, scheduled(&payer(i), &payee(i), 1, &key(i), due(i)))
        })
        .buffered(32)
        .collect()
        .await;
    assert!((0..TRANSFERS).all(|i| ids[i as usize] == key(i)));
    println!(
        "scheduled {TRANSFERS} transfers in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        now_ms() < first_due - 3_000,
        "scheduling took too long for the test's timeline"
    );
    let at = |offset_ms: i64| async move {
        let wait = first_due + offset_ms - now_ms();
        tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
    };
    // Owners die just before the first are due (node 1 fires theirs once it has taken over),
    // a node joins (hand-off), one leaves gracefully, then the whole cluster is down while the
    // last third is due, and comes back.
    at(-2_000).await;
    node2.kill();
    at(8_000).await;
    let mut node3 = spec.start_node(3);
    at(12_000).await;
    let mut node2 = spec.start_node(2);
    at(16_000).await;
    assert!(node1.stop().success());
    at(21_000).await;
    node3.kill();
    assert!(node2.stop().success());
    at(27_000).await;
    let _node1 = spec.start_node(1);
    let _node2 = spec.start_node(2);

    let ours = |records: Vec<(Option<Vec<u8>>, i64)>| -> Vec<(i64, i64)> {
        let prefix = format!("{run}-");
        records
            .into_iter()
            .filter_map(|(k, ts)| {
                let k = String::from_utf8(k?).ok()?;
                Some((k.strip_prefix(&prefix)?.parse().ok()?, ts))
            })
            .collect()
    };
    let completed = eventually(
        Duration::from_secs(120),
        "every scheduled transfer to complete",
        || async {
            let completed = ours(read_topic_timed(accounts::TRANSFERS_COMPLETED));
            (completed.len() as i64 >= TRANSFERS).then_some(completed)
        },
    )
    .await;
    // Each exactly once, none before its time.
    let mut seen = std::collections::BTreeMap::new();
    for (i, ts) in &completed {
        assert!(
            seen.insert(*i, *ts).is_none(),
            "transfer {i} completed twice"
        );
        assert!(
            *ts >= due(*i),
            "transfer {i} completed {} ms early",
            due(*i) - ts
        );
    }
    assert_eq!(seen.len() as i64, TRANSFERS);
    let mut lateness: Vec<i64> = seen.iter().map(|(i, ts)| ts - due(*i)).collect();
    lateness.sort_unstable();
    println!(
        "lateness of {TRANSFERS} scheduled transfers (completion emitted - due), through a kill, \
         a join, a graceful leave and 6 s of the whole cluster down: p50 {} ms, p99 {} ms, max {} ms",
        quantile(&lateness, 0.5),
        quantile(&lateness, 0.99),
        lateness.last().unwrap()
    );
    assert!(ours(read_topic_timed(accounts::TRANSFERS_REFUSED)).is_empty());
    // The money: every payer paid each of its transfers once, every payee got them.
    for (account, expected) in (0..PAYERS)
        .map(|i| (payer(i), 1_000_000 - TRANSFERS / PAYERS))
        .chain((0..PAYEES).map(|i| (payee(i), TRANSFERS / PAYEES)))
    {
        let balance = eventually(Duration::from_secs(60), "a balance", || {
            let (url, account) = (spec.grpc_url(1), account.clone());
            async move { try_balance(&mut accounts_at(url), &account).await }
        })
        .await;
        assert_eq!(balance, expected, "{account}");
    }
}
