//! Money is conserved: the bank accounts (`accounts`) under random transfers, deposits and
//! withdrawals through random nodes while nodes crash, leave and join and the broker is away,
//! every node a separate process on a broker of the test's own.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::bank::{Change, TransferRequest};
use support::bank::*;
use support::*;
use tonic::Code;

const ACCOUNTS: u64 = 1_000;
const OPENING: i64 = 1_000;
const OPS: u64 = 20_000;
const CONCURRENCY: usize = 32;

/// A deterministic pseudo-random sequence (xorshift64*), one per operation.
fn random(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move |below| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % below
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deposit(Change),
    Withdraw(Change),
    Transfer(TransferRequest),
}

fn op(i: u64, run: &str) -> Op {
    let mut r = random(i + 1);
    let account = |n: u64| format!("{run}-{n}");
    let key = format!("{run}-op-{i}");
    match r(10) {
        0 => Op::Deposit(change(&account(r(ACCOUNTS)), 1 + r(100) as i64, &key)),
        1 => Op::Withdraw(change(&account(r(ACCOUNTS)), 1 + r(300) as i64, &key)),
        _ => {
            let from = r(ACCOUNTS);
            let to = (from + 1 + r(ACCOUNTS - 1)) % ACCOUNTS;
            Op::Transfer(transfer(
                &account(from),
                &account(to),
                1 + r(200) as i64,
                &key,
            ))
        }
    }
}

/// Sends `op` through the nodes (starting at one picked by `i`), retrying every answer that is
/// not definite with the same idempotency key, until one is: `Ok` (applied) or
/// FAILED_PRECONDITION (refused, nothing changed).
async fn definitely(op: &Op, i: u64, nodes: &[String]) -> bool {
    let started = Instant::now();
    for attempt in 0.. {
        let mut client = accounts_at(nodes[(i as usize + attempt) % nodes.len()].clone());
        let answer = match op.clone() {
            Op::Deposit(c) => client.deposit(c).await.map(drop),
            Op::Withdraw(c) => client.withdraw(c).await.map(drop),
            Op::Transfer(t) => client.transfer(t).await.map(drop),
        };
        match answer {
            Ok(()) => return true,
            Err(status) if status.code() == Code::FailedPrecondition => return false,
            Err(status) if status.code() == Code::InvalidArgument => {
                panic!("{op:?} refused as invalid: {status}")
            }
            Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(300),
                    "no definite answer for {op:?} in 5 minutes"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread")]
async fn money_is_conserved_through_crashes_a_leave_a_join_and_a_broker_outage() {
    let broker = Broker::start(19_800, 1);
    let (spec, accounts_group) = bank_cluster(ClusterSpec::new("money", 26_500).on(&broker));
    let mut node1 = spec.start_node(1);
    let mut node2 = spec.start_node(2);
    let mut node3 = spec.start_node(3);
    wait_for_account_split(&[&node1, &node2, &node3], &accounts_group).await;
    let run = unique("m");
    let nodes: Vec<String> = (1..=4).map(|i| spec.grpc_url(i)).collect();
    // Every account opens with a deposit.
    let opened: Vec<bool> = futures::stream::iter(0..ACCOUNTS)
        .map(|n| {
            let op = Op::Deposit(change(&format!("{run}-{n}"), OPENING, &format!("open-{n}")));
            let nodes = nodes[..3].to_vec();
            async move { definitely(&op, n, &nodes).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert!(opened.iter().all(|ok| *ok));

    // The operations, through random live-or-not nodes, while the cluster is disturbed.
    let done = Arc::new(Mutex::new(0u64));
    let work = {
        let (run, done, nodes) = (run.clone(), done.clone(), nodes.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..OPS)
                .map(|i| {
                    let (op, nodes, done) = (op(i, &run), nodes.clone(), done.clone());
                    async move {
                        let applied = definitely(&op, i, &nodes).await;
                        *done.lock().unwrap() += 1;
                        (op, applied)
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        })
    };
    let progress = || *done.lock().unwrap();
    let until = |ops: u64| {
        let done = done.clone();
        async move {
            while *done.lock().unwrap() < ops {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until(2_000).await;
    node3.kill();
    println!("node 3 killed at {} operations", progress());
    until(5_000).await;
    node3 = spec.start_node(3);
    println!("node 3 restarted at {} operations", progress());
    until(8_000).await;
    assert!(node2.stop().success(), "node 2 leaves gracefully");
    println!("node 2 left at {} operations", progress());
    until(10_000).await;
    let node4 = spec.start_node(4);
    println!("node 4 joined at {} operations", progress());
    until(12_000).await;
    broker.stop();
    println!("broker stopped at {} operations", progress());
    tokio::time::sleep(Duration::from_secs(15)).await;
    broker.restart();
    println!("broker back at {} operations", progress());
    let outcomes = tokio::time::timeout(Duration::from_secs(900), work)
        .await
        .expect("every operation answered within 15 minutes")
        .unwrap();

    // The ledger the definite answers imply.
    let mut expected: BTreeMap<String, i64> = (0..ACCOUNTS)
        .map(|n| (format!("{run}-{n}"), OPENING))
        .collect();
    let (mut deposited, mut withdrawn) = (OPENING * ACCOUNTS as i64, 0);
    let mut transfers = BTreeMap::new();
    for (op, applied) in &outcomes {
        match (op, applied) {
            (_, false) => {}
            (Op::Deposit(c), true) => {
                *expected.get_mut(&c.account).unwrap() += c.amount;
                deposited += c.amount;
            }
            (Op::Withdraw(c), true) => {
                *expected.get_mut(&c.account).unwrap() -= c.amount;
                withdrawn += c.amount;
            }
            (Op::Transfer(t), true) => {
                *expected.get_mut(&t.from).unwrap() -= t.amount;
                *expected.get_mut(&t.to).unwrap() += t.amount;
                transfers.insert(t.idempotency_key.clone(), t.clone());
            }
        }
    }
    let refused = outcomes.iter().filter(|(_, applied)| !applied).count();
    println!(
        "{} operations: {} transfers made, {refused} refused (insufficient funds)",
        outcomes.len(),
        transfers.len()
    );
    assert_eq!(outcomes.len() as u64, OPS);
    assert!(expected.values().all(|b| *b >= 0), "the ledger overdraws");

    // Every completed transfer exactly once, and one for every transfer made.
    let completed = eventually(
        Duration::from_secs(120),
        "a completion for every transfer made",
        || async {
            let ours: Vec<_> = read_topic_values_at(&broker.bootstrap(), "transfers-completed")
                .into_iter()
                .filter(|(k, _)| {
                    k.as_deref()
                        .is_some_and(|k| k.starts_with(format!("{run}-op-").as_bytes()))
                })
                .collect();
            (ours.len() >= transfers.len()).then_some(ours)
        },
    )
    .await;
    let mut seen = BTreeSet::new();
    for (key, value) in &completed {
        let key = String::from_utf8(key.clone().unwrap()).unwrap();
        assert!(seen.insert(key.clone()), "transfer {key} completed twice");
        let made = transfers
            .get(&key)
            .unwrap_or_else(|| panic!("transfer {key} completed but was not made"));
        let value: serde_json::Value = serde_json::from_slice(value.as_deref().unwrap()).unwrap();
        assert_eq!(
            (
                value["from"].as_str(),
                value["to"].as_str(),
                value["amount"].as_i64()
            ),
            (
                Some(made.from.as_str()),
                Some(made.to.as_str()),
                Some(made.amount)
            ),
            "{key}"
        );
    }
    assert_eq!(seen.len(), transfers.len());

    // Every balance as the ledger says, through the nodes still up; the sum is what came in
    // minus what went out.
    let live = [spec.grpc_url(1), spec.grpc_url(3), spec.grpc_url(4)];
    let mut sum = 0;
    for (n, (account, balance)) in expected.iter().enumerate() {
        let url = live[n % live.len()].clone();
        let found = eventually(Duration::from_secs(60), "a balance", || {
            let (url, account) = (url.clone(), account.clone());
            async move { try_balance(&mut accounts_at(url), &account).await }
        })
        .await;
        assert_eq!(found, *balance, "{account}");
        sum += found;
    }
    assert_eq!(sum, deposited - withdrawn);
    assert!(node1.stop().success() && node3.stop().success());
    drop(node4);
}
