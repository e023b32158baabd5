//! Scenario `commands`: command round trips (gRPC `Deposit` on the bank accounts, answered once
//! committed) against the physical limit of a durable exactly-once write, measured in the same
//! run: a bare rdkafka loop of produce (acks=all) → consume (read_committed) → transactional
//! produce of the answer + offset commit → the answer read back (read_committed), one record at
//! a time.

use kafka_sharding::partitioner::partition_for_key;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use proto::bank::accounts_client::AccountsClient;
use proto::bank::Change;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tonic::transport::Channel;

use crate::bare_jobs::{bare_transactions, create_changelog};
use crate::kafka::{self, PARTITION_VERIFICATION};
use crate::nodes::{wait_until, NodeProcess, Setup};
use crate::report::{rate, verdict, Table};

const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(10);

/// What one closed loop measured.
pub(super) struct Loop {
    pub latencies: Histogram<u64>,
    pub seconds: f64,
    pub errors: u64,
}

impl Loop {
    pub fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Microseconds, up to a minute.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

pub(super) fn create_topic(setup: &Setup, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let out = Command::new(setup.bin("producer"))
        .args(["--bootstrap-servers", &setup.bootstrap, "--topic", topic])
        .args(["--partitions", &partitions.to_string(), "--count", "0"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "creating {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub async fn run(setup: &Setup, stamp: u64, partitions: u32) -> anyhow::Result<Vec<Table>> {
    let (input, output) = (
        format!("bench-rt-in-{stamp}"),
        format!("bench-rt-out-{stamp}"),
    );
    create_topic(setup, &input, 1)?;
    create_topic(setup, &output, 1)?;
    eprintln!("commands: the bare exactly-once round trip");
    let bootstrap = setup.bootstrap.clone();
    let bare = tokio::task::spawn_blocking(move || bare_round_trips(&bootstrap, &input, &output))
        .await
        .context("the bare loop panicked")??;

    // What a plain rdkafka program gets from the broker for the commits that 32 callers, each
    // waiting for its change to commit, need: at most 32 state records per transaction.
    let bare_topic = format!("bench-bare-transactions-{stamp}");
    create_changelog(&setup.bootstrap, &bare_topic, partitions).await?;
    let mut bare_transaction_rates = Vec::new();
    for (lanes, offsets) in [(1usize, false), (2, false), (1, true), (2, true)] {
        let with = if offsets {
            "with offsets"
        } else {
            "no offsets"
        };
        eprintln!(
            "commands: bare transactions of {} state records on {lanes} producer(s), {with}",
            32 / lanes
        );
        let (bootstrap, topic) = (setup.bootstrap.clone(), bare_topic.clone());
        let per_second = tokio::task::spawn_blocking(move || {
            bare_transactions(
                &bootstrap,
                &topic,
                partitions,
                lanes,
                32 / lanes,
                offsets,
                WARM_UP,
                MEASURE,
            )
        })
        .await
        .context("the bare transactions panicked")??;
        eprintln!(
            "commands: bare transactions on {lanes} producer(s), {with}: {} records/s",
            rate(per_second)
        );
        bare_transaction_rates.push((lanes, offsets, per_second));
    }

    let (events, bank) = (
        format!("bench-cmd-events-{stamp}"),
        format!("bench-bank-{stamp}"),
    );
    create_topic(setup, &events, 8)?;
    create_topic(setup, &bank, partitions)?;
    let accounts_group = format!("bench-accounts-{stamp}");
    let group = format!("bench-cmd-{stamp}");
    let node_args = [
        "--accounts-topic",
        bank.as_str(),
        "--accounts-group",
        accounts_group.as_str(),
    ];
    let mut node = NodeProcess::start(setup, 1, &events, &group, &node_args)?;
    let channel = Channel::from_shared(node.grpc_url())?.connect_lazy();
    wait_until(
        Duration::from_secs(120),
        "the node to answer a deposit",
        || {
            let mut client = AccountsClient::new(channel.clone());
            async move {
                client
                    .deposit(one_cent("warm-up".into(), String::new()))
                    .await
                    .ok()
                    .map(|_| ())
            }
        },
    )
    .await?;
    let mut loops = Vec::new();
    for concurrency in [1usize, 32] {
        eprintln!("commands: deposits at concurrency {concurrency}");
        loops.push((concurrency, deposits(&channel, concurrency).await?));
    }
    // The same at 32, and the bare transactions on one producer, with the brokers' check that a
    // transactional produce's partition is in the transaction turned off: what that check costs
    // a command (an operator's choice, docs/BENCHMARKS.md).
    eprintln!(
        "commands: deposits at concurrency 32 and bare transactions, partition verification off"
    );
    kafka::set_broker_config(&setup.bootstrap, PARTITION_VERIFICATION, Some("false")).await?;
    let unverified = async {
        let deposits = deposits(&channel, 32).await?;
        let (bootstrap, topic) = (setup.bootstrap.clone(), bare_topic.clone());
        let bare = tokio::task::spawn_blocking(move || {
            bare_transactions(
                &bootstrap, &topic, partitions, 1, 32, false, WARM_UP, MEASURE,
            )
        })
        .await
        .context("the bare transactions panicked")??;
        anyhow::Ok((deposits, bare))
    }
    .await;
    kafka::set_broker_config(&setup.bootstrap, PARTITION_VERIFICATION, None).await?;
    let (unverified, unverified_bare) = unverified?;
    let (mut acting, one_node) =
        super::acting::run(setup, &channel, &bank, partitions, stamp, &bare).await?;
    eprintln!("commands: a second node joins; transfers through both");
    let mut node2 = NodeProcess::start(setup, 2, &events, &group, &node_args)?;
    let node2_shards = wait_until(
        Duration::from_secs(120),
        "both nodes to own account shards",
        || async {
            let (one, two) = (
                node.shards_of(&accounts_group).await?,
                node2.shards_of(&accounts_group).await?,
            );
            (!one.is_empty() && !two.is_empty() && one.len() + two.len() == partitions as usize)
                .then_some(two)
        },
    )
    .await?;
    // Each caller asks the owner of the account it debits, as the `client` does (its owner
    // directory); the credited accounts are on either node.
    let prefix = format!("tr2-{stamp}");
    let channel2 = Channel::from_shared(node2.grpc_url())?.connect_lazy();
    let channels: Vec<Channel> = (0..32)
        .map(|w| {
            let from = format!("{prefix}-{w}");
            if node2_shards.contains(&partition_for_key(from.as_bytes(), partitions)) {
                channel2.clone()
            } else {
                channel.clone()
            }
        })
        .collect();
    let two_nodes = super::acting::transfers(&channels, &prefix, 32).await?;
    super::acting::two_nodes_row(&mut acting, &one_node, &two_nodes, &bare);
    let through_a_peer = deposits_through_a_peer(
        [&node, &node2],
        [&channel, &channel2],
        &node2_shards,
        partitions,
        stamp,
    )
    .await?;
    node2.stop()?;
    node.stop()?;
    let timer_memory = super::acting::timer_memory(setup, stamp).await?;

    let mut table = Table::new(
        &format!(
            "Command round trips: gRPC Deposit to one node (closed loop, {} s after {} s warm-up) against a bare exactly-once round trip",
            MEASURE.as_secs(),
            WARM_UP.as_secs()
        ),
        &["run", "concurrency", "per second", "p50", "p99", "p99.9", "errors", "÷ bare", "target", ""],
    );
    let cells = |l: &Loop| {
        vec![
            rate(l.per_second()),
            format!("{:.1} ms", l.ms(0.5)),
            format!("{:.1} ms", l.ms(0.99)),
            format!("{:.1} ms", l.ms(0.999)),
            l.errors.to_string(),
        ]
    };
    let mut row = vec!["bare rdkafka round trip (baseline)".into(), "1".into()];
    row.extend(cells(&bare));
    row.extend(["1.00".into(), "baseline".into(), String::new()]);
    table.row(row);
    let bare_row = |what: String, per_second: f64| {
        let mut row = vec![what, "32".into(), rate(per_second)];
        row.resize(10, String::new());
        row
    };
    for (lanes, offsets, per_second) in &bare_transaction_rates {
        let with = if *offsets {
            "with the consumed offsets, as a checkpoint"
        } else {
            "no offsets"
        };
        table.row(bare_row(
            format!(
                "bare transactions of {} state records, {with}, back to back on {lanes} producer(s), no runtime (reference for concurrency 32)",
                32 / lanes
            ),
            *per_second,
        ));
    }
    table.row(bare_row(
        "the same, 32 records, no offsets, 1 producer, **partition verification off**".into(),
        unverified_bare,
    ));
    for (concurrency, l) in &loops {
        let mut row = vec![
            "Deposit, answered once committed".into(),
            concurrency.to_string(),
        ];
        row.extend(cells(l));
        let (ratio, target, met) = if *concurrency == 1 {
            let ratio = l.ms(0.5) / bare.ms(0.5);
            (
                format!("p50 × {ratio:.2}"),
                "p50 ≤ 2 × bare",
                verdict(ratio <= 2.0 && l.errors == 0),
            )
        } else {
            (
                String::new(),
                "≥ 5 000 per second",
                verdict(l.per_second() >= 5_000.0 && l.errors == 0),
            )
        };
        row.extend([ratio, target.into(), met]);
        table.row(row);
    }
    let verified = &loops
        .iter()
        .find(|(c, _)| *c == 32)
        .expect("a loop at 32")
        .1;
    let mut row = vec![
        "Deposit, answered once committed, **partition verification off**".into(),
        "32".into(),
    ];
    row.extend(cells(&unverified));
    row.extend([
        format!(
            "× {:.2} with it on",
            unverified.per_second() / verified.per_second()
        ),
        "(the same target, an operator's choice)".into(),
        verdict(unverified.per_second() >= 5_000.0 && unverified.errors == 0),
    ]);
    table.row(row);
    table.note(format!("One node hosting the accounts ({partitions} partitions), the client (this harness, tonic) and the broker on the same machine. Each deposit carries a fresh idempotency key (its answer is remembered in the account's state). The bare loop: one partition in, one out, one record at a time, in one thread; each step waits for the previous. The bare transactions (records committed per second): a plain rdkafka loop committing transactions of 32 records (one producer) or of 16 on each of two producers at once, each record the state of an account of its own on the account's partition of a compacted topic with as many partitions (producer k's accounts on partitions p % producers = k), back to back with nothing else to do (no gRPC, no reading): the commits 32 callers need, each waiting for its change to commit, as a program without the runtime gets them; with offsets, each transaction also commits an offset per partition of its producer to a consumer group the producers share, as every checkpoint of the node does (its offsets fence a zombie: docs/ARCHITECTURE.md). Partition verification off: the brokers' `{PARTITION_VERIFICATION}` set to false (per broker, dynamically) for that row's loop only; by default (since Kafka 3.6) a partition's leader asks the transaction coordinator, once per partition per transaction, whether the partition is in the producer's transaction before it appends, which guards against hanging transactions (README, \"Using your own Kafka\")."));
    Ok(vec![table, through_a_peer, acting, timer_memory])
}

/// Deposits on two nodes, each worker into 64 accounts of its own: through node 1 into
/// accounts node 1 owns (run by its shard), then into accounts node 2 owns (forwarded over the
/// query link, or written as records when the nodes run with `PEER_QUERIES=remoting`), at
/// concurrency 1 and 32; then at 32 with half the workers on each node's accounts, each through
/// the owner (what two nodes do together). The nodes' `command_seconds_count` by path over each loop
/// shows which path the commands took.
async fn deposits_through_a_peer(
    nodes: [&NodeProcess; 2],
    channels: [&Channel; 2],
    node2_shards: &[u32],
    partitions: u32,
    stamp: u64,
) -> anyhow::Result<Table> {
    const PER_WORKER: usize = 64;
    // Accounts by owner: [node 1's, node 2's].
    let mut owned: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for i in 0.. {
        if owned
            .iter()
            .all(|accounts| accounts.len() >= 32 * PER_WORKER)
        {
            break;
        }
        let account = format!("dep2-{stamp}-{i}");
        let owner =
            usize::from(node2_shards.contains(&partition_for_key(account.as_bytes(), partitions)));
        owned[owner].push(account);
    }
    let mut table = Table::new(
        &format!(
            "Deposit on two nodes: through node 1 into accounts node 1 owns, against accounts node 2 owns, and both nodes through the owners (closed loop, {} s after {} s warm-up)",
            MEASURE.as_secs(),
            WARM_UP.as_secs()
        ),
        &["accounts, callers", "concurrency", "per second", "p50", "p99", "p99.9", "errors", "÷ node 1's own", "paths (both nodes)"],
    );
    // Per run: a label, its concurrency, and whose accounts the workers use through node 1
    // (`None`: worker `w` uses node `w % 2`'s accounts through that node).
    let runs = [
        ("node 1's, through node 1", 1, Some(0)),
        ("node 2's, through node 1", 1, Some(1)),
        ("node 1's, through node 1", 32, Some(0)),
        ("node 2's, through node 1", 32, Some(1)),
        ("both nodes', each through its owner", 32, None),
    ];
    let mut baseline: [Option<f64>; 2] = [None, None];
    for (label, concurrency, through_node_1) in runs {
        eprintln!("commands: deposits into {label}, concurrency {concurrency}");
        // Per worker: (the owner of its accounts, the node it calls).
        let workers: Vec<(usize, usize)> = (0..concurrency)
            .map(|w| through_node_1.map_or((w % 2, w % 2), |owner| (owner, 0)))
            .collect();
        let accounts: Arc<Vec<Vec<String>>> = Arc::new(
            workers
                .iter()
                .enumerate()
                .map(|(w, &(owner, _))| owned[owner][w * PER_WORKER..(w + 1) * PER_WORKER].to_vec())
                .collect(),
        );
        let worker_channels: Vec<Channel> = workers
            .iter()
            .map(|&(_, via)| channels[via].clone())
            .collect();
        let before = command_paths(nodes).await?;
        let l = closed_loop(&worker_channels, concurrency, move |mut client, w, n| {
            let account = accounts[w][n as usize % PER_WORKER].clone();
            async move {
                let change = one_cent(account, format!("d2-{n}"));
                client.deposit(change).await.map(drop)
            }
        })
        .await?;
        let after = command_paths(nodes).await?;
        let paths = ["direct", "forwarded", "record"]
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a > b)
            .map(|(path, (b, a))| format!("{path} {}", a - b))
            .collect::<Vec<_>>()
            .join(", ");
        // At concurrency 1 the p50 against node 1's own accounts, at 32 the rate.
        let (figure, slot) = if concurrency == 1 {
            (l.ms(0.5), 0)
        } else {
            (l.per_second(), 1)
        };
        let ratio = match baseline[slot] {
            None => "1.00".to_string(),
            Some(base) if concurrency == 1 => format!("p50 × {:.2}", figure / base),
            Some(base) => format!("{:.2} per second", figure / base),
        };
        baseline[slot].get_or_insert(figure);
        table.row(vec![
            label.into(),
            concurrency.to_string(),
            rate(l.per_second()),
            format!("{:.1} ms", l.ms(0.5)),
            format!("{:.1} ms", l.ms(0.99)),
            format!("{:.1} ms", l.ms(0.999)),
            l.errors.to_string(),
            ratio,
            paths,
        ]);
    }
    table.note("Each deposit carries a fresh idempotency key. Paths are `processor_command_seconds_count` of both nodes over the loop, warm-up included: direct = run by the shard of the node called, forwarded = sent over the query link to the owner's shard, record = written to the input topic for the owner to read (the path before forwarding; the nodes take it with PEER_QUERIES=remoting).");
    Ok(table)
}

/// The nodes' commands so far by path (direct, forwarded, record), summed over the nodes.
async fn command_paths(nodes: [&NodeProcess; 2]) -> anyhow::Result<[f64; 3]> {
    let mut counts = [0.0; 3];
    for node in nodes {
        for (count, path) in counts.iter_mut().zip(["direct", "forwarded", "record"]) {
            let metrics = node
                .metrics_with(&format!(r#"path="{path}""#))
                .await
                .ok_or_else(|| anyhow::anyhow!("a node did not answer /metrics"))?;
            // No series yet: the node has sent no command that way.
            *count += metrics
                .get("processor_command_seconds_count")
                .copied()
                .unwrap_or_default();
        }
    }
    Ok(counts)
}

/// `concurrency` workers, each depositing into accounts of its own and waiting for each answer.
async fn deposits(channel: &Channel, concurrency: usize) -> anyhow::Result<Loop> {
    closed_loop(
        std::slice::from_ref(channel),
        concurrency,
        |mut client, w, n| async move {
            let change = one_cent(format!("acc-{w}-{}", n % 64), format!("d-{n}"));
            client.deposit(change).await.map(drop)
        },
    )
    .await
}

/// A deposit of one cent into `account` (an empty key: no idempotency key).
fn one_cent(account: String, idempotency_key: String) -> Change {
    Change {
        account,
        amount: 1,
        idempotency_key,
    }
}

/// `concurrency` workers, worker `w` through `channels[w % len]`, each calling
/// `call(client, worker, n)` for the next request number `n` and waiting for its answer, for
/// [`WARM_UP`] then [`MEASURE`]: the latencies of the answers in the measured time, and its
/// errors.
pub(super) async fn closed_loop<F, Fut>(
    channels: &[Channel],
    concurrency: usize,
    call: F,
) -> anyhow::Result<Loop>
where
    F: Fn(AccountsClient<Channel>, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let measure_from = Instant::now() + WARM_UP;
    let end = measure_from + MEASURE;
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let client = AccountsClient::new(channels[w % channels.len()].clone());
            let (next, call) = (next.clone(), call.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (histogram(), 0u64);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let answer = call(client.clone(), w, n).await;
                    if sent < measure_from {
                        continue;
                    }
                    match answer {
                        Ok(()) => latencies.saturating_record(sent.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (histogram(), 0);
    for worker in workers {
        let (l, e) = worker.await.context("a closed-loop worker panicked")?;
        latencies.add(&l)?;
        errors += e;
    }
    Ok(Loop {
        latencies,
        seconds: MEASURE.as_secs_f64(),
        errors,
    })
}

/// Waits for every record sent to be acknowledged, in 1 ms steps (rust-rdkafka's `flush`, also
/// inside `commit_transaction`, waits in 100 ms polls: the nodes avoid it the same way, see
/// `delivered` in the runtime's `consumer/checkpoint.rs`).
fn delivered(producer: &BaseProducer, deadline: Instant) -> anyhow::Result<()> {
    loop {
        producer.poll(Duration::ZERO);
        match producer.flush(Duration::ZERO) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The bare exactly-once round trip, one record at a time, for the warm-up and the measured
/// time.
fn bare_round_trips(bootstrap: &str, input: &str, output: &str) -> anyhow::Result<Loop> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()?;
    let transactional: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", format!("{input}-bare"))
        .set("linger.ms", "0")
        .create()?;
    transactional.init_transactions(TIMEOUT)?;
    let reader = |group: &str, topic: &str| -> anyhow::Result<BaseConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        Ok(consumer)
    };
    let (commands, answers) = (
        reader(&format!("{input}-g"), input)?,
        reader(&format!("{output}-g"), output)?,
    );
    let group = commands
        .group_metadata()
        .context("the command consumer's group metadata")?;
    let next = |consumer: &BaseConsumer| -> anyhow::Result<(i64, Vec<u8>)> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message?;
                return Ok((
                    message.offset(),
                    message.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
        anyhow::bail!("nothing arrived within {TIMEOUT:?}")
    };
    let measure_from = Instant::now() + WARM_UP;
    let end = measure_from + MEASURE;
    let mut latencies = histogram();
    let mut n = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        n += 1;
        let value = n.to_string();
        producer
            .send(BaseRecord::to(input).key("k").payload(&value))
            .map_err(|(e, _)| e)?;
        delivered(&producer, Instant::now() + TIMEOUT)?;
        let (offset, command) = next(&commands)?;
        transactional.begin_transaction()?;
        transactional
            .send(BaseRecord::to(output).key("k").payload(&command))
            .map_err(|(e, _)| e)?;
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(input, 0, Offset::Offset(offset + 1))?;
        transactional.send_offsets_to_transaction(&offsets, &group, TIMEOUT)?;
        delivered(&transactional, Instant::now() + TIMEOUT)?;
        transactional.commit_transaction(TIMEOUT)?;
        let (_, answer) = next(&answers)?;
        anyhow::ensure!(
            answer == value.as_bytes(),
            "the answer read back is another record"
        );
        if sent >= measure_from {
            latencies.saturating_record(sent.elapsed().as_micros() as u64);
        }
    }
    Ok(Loop {
        latencies,
        seconds: MEASURE.as_secs_f64(),
        errors: 0,
    })
}
