//! Part of scenario `commands`: messages between entities and durable timers, on the accounts
//! of the node the deposits ran on, beside the same run's bare exactly-once round trip.
//!
//! - transfers: a closed loop of gRPC `Transfer` at concurrency 32 (the debit is a command, the
//!   credit a message to the other account written with the debit's commit), on the one node
//!   and then with a second node in the group (the accounts' shards split between the two, each
//!   caller asking the owner of the account it debits, so about half the credits cross to the
//!   other node), and, one at a time, how long after
//!   `Transfer`'s answer a query sees the credit;
//! - timers: 10 000 scheduled transfers due at 1 000 per second; how late each fired (the
//!   timestamp of the record its firing wrote) and completed (of its `transfers-completed`
//!   record).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use proto::bank::accounts_client::AccountsClient;
use proto::bank::{Account, Change, TransferRequest};
use rdkafka::message::Headers;
use rdkafka::Message;
use tonic::transport::Channel;

use super::commands::{closed_loop, histogram, Loop};
use crate::kafka::read_committed;
use crate::nodes::Setup;
use crate::report::{rate, Table};

const VISIBILITY_SAMPLES: usize = 200;
const TIMERS: i64 = 10_000;
const TIMERS_PER_SECOND: i64 = 1_000;
/// Partitions of the topics of the pending timers' memory runs.
const PARTITIONS: u32 = 8;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn transfer(from: String, to: String, key: String, at_unix_ms: i64) -> TransferRequest {
    TransferRequest {
        from,
        to,
        amount: 1,
        idempotency_key: key,
        at_unix_ms,
    }
}

async fn deposit(client: &mut AccountsClient<Channel>, account: String) -> anyhow::Result<()> {
    client
        .deposit(Change {
            account,
            amount: 1_000_000_000,
            idempotency_key: String::new(),
        })
        .await
        .context("a deposit")?;
    Ok(())
}

pub(super) async fn run(
    setup: &Setup,
    channel: &Channel,
    bank: &str,
    partitions: u32,
    stamp: u64,
    bare: &Loop,
) -> anyhow::Result<(Table, Loop)> {
    eprintln!("commands: transfers at concurrency 32");
    let transfers = transfers(std::slice::from_ref(channel), &format!("tr-{stamp}"), 32).await?;
    eprintln!("commands: how soon a query sees a transfer's credit");
    let (visible, invisible) = credit_visibility(channel, stamp).await?;
    eprintln!("commands: {TIMERS} scheduled transfers due at {TIMERS_PER_SECOND} per second");
    let timers = timers(setup, channel, bank, stamp).await?;

    let mut table = Table::new(
        "Messages and timers: transfers between accounts and scheduled transfers on the same node, against the same bare round trip",
        &["what", "count", "per second", "p50", "p99", "max", "p50 ÷ bare p50", "errors"],
    );
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let cells = |h: &Histogram<u64>| {
        vec![
            format!("{:.1} ms", ms(h, 0.5)),
            format!("{:.1} ms", ms(h, 0.99)),
            format!("{:.1} ms", h.max() as f64 / 1000.0),
            format!("{:.2}", ms(h, 0.5) / bare.ms(0.5)),
        ]
    };
    let mut row = |what: &str, h: &Histogram<u64>, per_second: String, errors: u64| {
        let mut cells_row = vec![what.to_string(), h.len().to_string(), per_second];
        cells_row.extend(cells(h));
        cells_row.push(errors.to_string());
        table.row(cells_row);
    };
    row(
        "bare exactly-once round trip (baseline)",
        &bare.latencies,
        rate(bare.per_second()),
        0,
    );
    row(
        "Transfer answered (debit committed, credit sent as a message), concurrency 32",
        &transfers.latencies,
        rate(transfers.per_second()),
        transfers.errors,
    );
    row(
        "the credit visible to a query, after Transfer's answer (one at a time)",
        &visible,
        String::new(),
        invisible,
    );
    row(
        &format!("timer fired (its record written) − due, {TIMERS_PER_SECOND} due per second"),
        &timers.fired,
        String::new(),
        timers.early + timers.missing_fired,
    );
    row(
        "scheduled transfer completed (emitted) − due",
        &timers.completed,
        String::new(),
        timers.missing_completed,
    );
    table.note(format!(
        "Accounts on one node ({partitions} partitions); the last row adds a second node to its group once the rest is measured. Timers: {TIMERS} transfers scheduled through gRPC in {:.1} s (concurrency 32), due one per {} ms from {} s after the first was scheduled; a firing is the record the shard writes to the account's own partition in a checkpoint transaction, a completion the credited account's transfers-completed record (one message hop and one more commit later). Errors: timers early or missing, credits not visible within 10 s.",
        timers.scheduling_seconds,
        1_000 / TIMERS_PER_SECOND,
        TIMER_LEAD_MS / 1_000
    ));
    Ok((table, transfers))
}

/// `concurrency` workers, each transferring from an account of its own (named after `prefix`)
/// to 64 others, worker `w` through `channels[w % len]`.
pub(super) async fn transfers(
    channels: &[Channel],
    prefix: &str,
    concurrency: usize,
) -> anyhow::Result<Loop> {
    let mut client = AccountsClient::new(channels[0].clone());
    for w in 0..concurrency {
        deposit(&mut client, format!("{prefix}-{w}")).await?;
    }
    let prefix = prefix.to_string();
    closed_loop(channels, concurrency, move |mut client, w, n| {
        let prefix = prefix.clone();
        async move {
            let request = transfer(
                format!("{prefix}-{w}"),
                format!("{prefix}-to-{}", n % 64),
                format!("{prefix}-{n}"),
                0,
            );
            client.transfer(request).await.map(drop)
        }
    })
    .await
}

/// Adds to `acting`'s table the transfers `two` measured with a second node, beside the one
/// node's (`one`) of the same run.
pub(super) fn two_nodes_row(table: &mut Table, one: &Loop, two: &Loop, bare: &Loop) {
    table.row(vec![
        format!(
            "Transfer answered, two nodes (concurrency 32, each caller through the owner of the account it debits; × one node: {:.2})",
            two.per_second() / one.per_second()
        ),
        two.latencies.len().to_string(),
        rate(two.per_second()),
        format!("{:.1} ms", two.ms(0.5)),
        format!("{:.1} ms", two.ms(0.99)),
        format!("{:.1} ms", two.latencies.max() as f64 / 1000.0),
        format!("{:.2}", two.ms(0.5) / bare.ms(0.5)),
        two.errors.to_string(),
    ]);
}

/// One transfer at a time; after each answer, queries the credited account until the credit
/// shows. Returns the delays and how many never showed within 10 s.
async fn credit_visibility(channel: &Channel, stamp: u64) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut client = AccountsClient::new(channel.clone());
    let from = format!("vis-{stamp}");
    deposit(&mut client, from.clone()).await?;
    let mut expected: HashMap<String, i64> = HashMap::new();
    let (mut delays, mut invisible) = (histogram(), 0);
    for i in 0..VISIBILITY_SAMPLES {
        let to = format!("vis-{stamp}-to-{}", i % 16);
        client
            .transfer(transfer(
                from.clone(),
                to.clone(),
                format!("vis-{stamp}-{i}"),
                0,
            ))
            .await
            .context("a transfer")?;
        let answered = Instant::now();
        let want = *expected
            .entry(to.clone())
            .and_modify(|e| *e += 1)
            .or_insert(1);
        loop {
            let balance = client
                .get_balance(Account {
                    account: to.clone(),
                })
                .await
                .map(|b| b.into_inner().balance);
            if balance.is_ok_and(|b| b >= want) {
                delays.saturating_record(answered.elapsed().as_micros() as u64);
                break;
            }
            if answered.elapsed() > Duration::from_secs(10) {
                invisible += 1;
                break;
            }
        }
    }
    Ok((delays, invisible))
}

/// How far ahead of its first due time the timers are scheduled.
const TIMER_LEAD_MS: i64 = 20_000;

struct Timers {
    fired: Histogram<u64>,
    completed: Histogram<u64>,
    early: u64,
    missing_fired: u64,
    missing_completed: u64,
    scheduling_seconds: f64,
}

async fn timers(
    setup: &Setup,
    channel: &Channel,
    bank: &str,
    stamp: u64,
) -> anyhow::Result<Timers> {
    let mut client = AccountsClient::new(channel.clone());
    let payer = |i: i64| format!("tm-{stamp}-from-{}", i % 64);
    for i in 0..64 {
        deposit(&mut client, payer(i)).await?;
    }
    let first_due = now_ms() + TIMER_LEAD_MS;
    let due = |i: i64| first_due + i * 1_000 / TIMERS_PER_SECOND;
    let prefix = format!("tm-{stamp}-");
    let started = Instant::now();
    let scheduled: Vec<Result<_, tonic::Status>> = futures::stream::iter(0..TIMERS)
        .map(|i| {
            let mut client = AccountsClient::new(channel.clone());
            let request = transfer(
                payer(i),
                format!("tm-{stamp}-to-{}", i % 16),
                format!("{prefix}{i}"),
                due(i),
            );
            async move { client.schedule_transfer(request).await }
        })
        .buffered(32)
        .collect()
        .await;
    let scheduling_seconds = started.elapsed().as_secs_f64();
    if let Some(Err(status)) = scheduled.iter().find(|s| s.is_err()) {
        anyhow::bail!("scheduling a transfer: {status}");
    }
    anyhow::ensure!(
        now_ms() < first_due,
        "scheduling took {scheduling_seconds:.1} s, past the first due time"
    );
    // Until every completion is there (a minute past the last due time at most).
    let last_due = due(TIMERS - 1);
    tokio::time::sleep(Duration::from_millis((last_due - now_ms()).max(0) as u64)).await;
    let index = |key: Option<&[u8]>| -> Option<i64> {
        std::str::from_utf8(key?)
            .ok()?
            .strip_prefix(&prefix)?
            .parse()
            .ok()
    };
    let bootstrap = setup.bootstrap.clone();
    let mut completed = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (completed.len() as i64) < TIMERS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let bootstrap = bootstrap.clone();
        let read = tokio::task::spawn_blocking(move || {
            read_committed(&bootstrap, "transfers-completed", |m| {
                (m.key().map(<[u8]>::to_vec), m.timestamp().to_millis())
            })
        })
        .await??;
        completed = read
            .into_iter()
            .filter_map(|(k, ts)| Some((index(k.as_deref())?, ts?)))
            .collect();
    }
    let bank = bank.to_owned();
    let fired: HashMap<i64, i64> = tokio::task::spawn_blocking(move || {
        read_committed(&bootstrap, &bank, |m| {
            let timer = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == kafka_sharding::headers::TIMER)
                    .and_then(|h| h.value.map(<[u8]>::to_vec))
            });
            (timer, m.timestamp().to_millis())
        })
    })
    .await??
    .into_iter()
    .filter_map(|(timer, ts)| Some((index(timer.as_deref())?, ts?)))
    .collect();
    let mut result = Timers {
        fired: histogram(),
        completed: histogram(),
        early: 0,
        missing_fired: (TIMERS - fired.len() as i64).max(0) as u64,
        missing_completed: (TIMERS - completed.len() as i64).max(0) as u64,
        scheduling_seconds,
    };
    for (times, histogram) in [
        (&fired, &mut result.fired),
        (&completed, &mut result.completed),
    ] {
        for (i, ts) in times {
            let late_ms = ts - due(*i);
            if late_ms < 0 {
                result.early += 1;
            }
            histogram.saturating_record(late_ms.max(0) as u64 * 1_000);
        }
    }
    Ok(result)
}

/// Accounts in the pending-timers memory measurement.
const MEMORY_ACCOUNTS: u64 = 1_000_000;

/// One node's memory after 1 000 000 accounts' records: a deposit each (the baseline), or a
/// transfer scheduled a day ahead each (a pending timer per account, plus a remembered nothing:
/// records are not commands). The difference is what the pending timers cost.
pub(super) async fn timer_memory(setup: &Setup, stamp: u64) -> anyhow::Result<Table> {
    let events = format!("bench-tmem-events-{stamp}");
    super::commands::create_topic(setup, &events, PARTITIONS)?;
    let day_ahead = now_ms() + 86_400_000;
    let mut rss = Vec::new();
    for (variant, value) in [
        (
            "deposits",
            Box::new(|_: u64| r#"{"Deposit":{"amount":100}}"#.to_owned())
                as Box<dyn Fn(u64) -> String + Send>,
        ),
        (
            "timers",
            Box::new(move |i: u64| {
                format!(
                    r#"{{"ScheduleTransfer":{{"to":"payee","amount":1,"at_ms":{day_ahead},"transfer_id":"t-{i}"}}}}"#
                )
            }),
        ),
    ] {
        let topic = format!("bench-tmem-{variant}-{stamp}");
        let group = format!("bench-tmem-{variant}-group-{stamp}");
        super::commands::create_topic(setup, &topic, PARTITIONS)?;
        eprintln!("commands: {MEMORY_ACCOUNTS} accounts' {variant}");
        let bootstrap = setup.bootstrap.clone();
        let produced = topic.clone();
        tokio::task::spawn_blocking(move || produce_accounts(&bootstrap, &produced, value))
            .await??;
        let mut node = crate::nodes::NodeProcess::start(
            setup,
            1,
            &events,
            &format!("bench-tmem-{variant}-{stamp}"),
            &["--accounts-topic", &topic, "--accounts-group", &group],
        )?;
        let (bootstrap, waited) = (setup.bootstrap.clone(), topic.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let ends = crate::kafka::end_offsets(&bootstrap, &waited, PARTITIONS)?;
            crate::kafka::wait_committed(
                &bootstrap,
                &group,
                &waited,
                &ends,
                Duration::from_secs(600),
            )?;
            Ok(())
        })
        .await??;
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss.push(node.rss_bytes()?);
        node.stop()?;
    }
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0));
    let mut table = Table::new(
        "Pending timers' memory: one node after 1 000 000 accounts, without and with a timer each",
        &[
            "run",
            "RSS",
            "per account",
            "per pending timer (difference)",
        ],
    );
    table.row(vec![
        "a deposit per account (baseline)".into(),
        mib(rss[0]),
        format!("{} B", rss[0] / MEMORY_ACCOUNTS),
        String::new(),
    ]);
    table.row(vec![
        "a transfer scheduled a day ahead per account".into(),
        mib(rss[1]),
        format!("{} B", rss[1] / MEMORY_ACCOUNTS),
        format!("{} B", rss[1].saturating_sub(rss[0]) / MEMORY_ACCOUNTS),
    ]);
    table.note(format!("Each run a fresh node hosting the accounts ({PARTITIONS} partitions) of a topic of 1 000 000 records, one per account (JSON, written with the Java-compatible partitioner), RSS 2 s after the group's committed offsets reached the end. A timer lives in its account's stored state (name, time, message); the shard's index holds at most 8 192 per shard."));
    Ok(table)
}

/// Writes one record per account, keyed by account id, partitioned as the runtime does.
fn produce_accounts(
    bootstrap: &str,
    topic: &str,
    value: Box<dyn Fn(u64) -> String + Send>,
) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    for i in 0..MEMORY_ACCOUNTS {
        let (key, payload) = (format!("acct-{i}"), value(i));
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}
