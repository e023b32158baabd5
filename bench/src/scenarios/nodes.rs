//! Scenario 6: scale in nodes. The same input (pre-filled, with a ledger) drained by 1, 2, 4 and
//! 6 nodes, each time a fresh group: the CPU time of all node processes per million events,
//! from `/proc/<pid>/stat`, summed (from the first assignment to the committed end, so start-up
//! is left out), against one node's. Two shared cores cannot show throughput growing with
//! nodes; CPU per event shows whether anything grows with them. After each drain every user is
//! asked through every node and must equal the ledger.
//!
//! Then, under steady input, five nodes run and a sixth joins and leaves gracefully; the
//! longest record wait of each is compared with a plain consumer group of five members going
//! through the same join and leave (as the rebalance scenario does for three nodes).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kafka::{committed_to_end, end_offsets, EndPoller};
use crate::nodes::{produce_in_background, produce_with_ledger, NodeAddr, NodeProcess, Setup};
use crate::progress::Progress;
use crate::report::{ms, verdict, Table};
use crate::scenarios::rebalance::{bare_group_gaps, pause, poll_progress};
use crate::scenarios::throughput::first_assigned;

const NODE_COUNTS: [u16; 4] = [1, 2, 4, 6];
const INPUT_RATE: u64 = 4_000;
const STEADY: Duration = Duration::from_secs(8);
const SETTLE: Duration = Duration::from_secs(8);
const POLL: Duration = Duration::from_millis(50);
struct Drain {
    nodes: u16,
    seconds: f64,
    cpu: f64,
    verified: bool,
}

pub async fn run(
    setup: &Setup,
    topic: &str,
    events: u64,
    users: u64,
) -> anyhow::Result<Vec<Table>> {
    let ledger = setup.log_dir.join(format!("{topic}-ledger.json"));
    eprintln!("nodes: producing {events} events for {users} users into {topic}");
    produce_with_ledger(setup, topic, events, users, &ledger)?;
    let ends = end_offsets(&setup.bootstrap, topic, 128)?;

    let mut drains = Vec::new();
    for count in NODE_COUNTS {
        eprintln!("nodes: {count} node(s) drain the topic");
        let group = format!("{topic}-n{count}");
        let mut nodes: Vec<NodeProcess> = (1..=count)
            .map(|i| NodeProcess::start(setup, i, topic, &group, &[]))
            .collect::<anyhow::Result<_>>()?;
        let assigned = first_assigned(&nodes).await?;
        let cpu_before = cpu_of(&nodes)?;
        committed_to_end(&setup.bootstrap, &group, topic, &ends).await?;
        let done = Instant::now();
        let cpu = cpu_of(&nodes)? - cpu_before;
        let mut verified = true;
        for node in &nodes {
            verified &= verify(setup, &node.grpc_url(), &ledger)?;
        }
        drains.push(Drain {
            nodes: count,
            seconds: (done - assigned).as_secs_f64(),
            cpu,
            verified,
        });
        for node in nodes.iter_mut() {
            node.stop()?;
        }
    }

    let one = drains[0].cpu;
    let mut scale = Table::new(
        &format!("Scale in nodes: {events} events, {users} users, 128 partitions, one run each"),
        &[
            "nodes",
            "drain (s)",
            "CPU of all nodes (s)",
            "CPU per million events (s)",
            "× one node",
            "every user exact through every node",
            "target",
            "",
        ],
    );
    for d in &drains {
        let per_million = d.cpu / (events as f64 / 1e6);
        scale.row(vec![
            d.nodes.to_string(),
            format!("{:.2}", d.seconds),
            format!("{:.2}", d.cpu),
            format!("{per_million:.2}"),
            format!("{:.2}", d.cpu / one),
            if d.verified { "yes" } else { "**no**" }.into(),
            if d.nodes == 1 {
                "baseline".into()
            } else {
                "≤ 1.2 × one node, exact".into()
            },
            if d.nodes == 1 {
                String::new()
            } else {
                verdict(d.cpu <= 1.2 * one && d.verified)
            },
        ]);
    }
    scale.note(
        "CPU: utime + stime of every node process (/proc/<pid>/stat), from the first assignment to the \
         group's committed offsets reaching the end of every partition. Exact: `client verify` against the \
         producer's ledger through each node in turn.",
    );

    let pauses = join_and_leave_at_six(setup, topic, users).await?;
    Ok(vec![scale, pauses])
}

/// CPU time of all `nodes` so far, in seconds.
fn cpu_of(nodes: &[NodeProcess]) -> anyhow::Result<f64> {
    nodes.iter().map(|node| node.cpu_seconds()).sum()
}

/// Whether every user of `ledger` answered exactly through `grpc_url` (the node answering
/// for every user itself: `--via-addr`).
fn verify(setup: &Setup, grpc_url: &str, ledger: &Path) -> anyhow::Result<bool> {
    let out = Command::new(setup.bin("client"))
        .args([
            "--addr",
            grpc_url,
            "--via-addr",
            "verify",
            "--concurrency",
            "32",
            "--ledger",
        ])
        .arg(ledger)
        .output()?;
    if !out.status.success() {
        eprintln!(
            "nodes: verification through {grpc_url} failed: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    Ok(out.status.success())
}

/// Five nodes under steady input; a sixth joins, then leaves gracefully. Longest record waits
/// against a bare group of five going through the same.
async fn join_and_leave_at_six(setup: &Setup, topic: &str, users: u64) -> anyhow::Result<Table> {
    let group = format!("{topic}-six");
    let mut producer = produce_in_background(setup, topic, INPUT_RATE * 600, users, INPUT_RATE)?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let _ends = EndPoller::start(&setup.bootstrap, topic, 128, progress.clone(), POLL)?;
    let poller = tokio::spawn(poll_progress(
        (1..=6).map(|i| NodeAddr::new(i, &group)).collect(),
        progress.clone(),
    ));
    let result = async {
        eprintln!("nodes: five nodes under steady input");
        let mut nodes: Vec<NodeProcess> = (1..=5)
            .map(|i| NodeProcess::start(setup, i, topic, &group, &[]))
            .collect::<anyhow::Result<_>>()?;
        // Every partition owned before the join (then the steady state lets them catch up).
        crate::nodes::wait_until(
            Duration::from_secs(120),
            "five nodes to own every partition",
            || async {
                let mut owned = 0;
                for node in &nodes {
                    owned += node.shards().await?.len();
                }
                (owned == 128).then_some(())
            },
        )
        .await?;
        tokio::time::sleep(STEADY).await;
        eprintln!("nodes: a sixth node joins");
        let t0 = Instant::now();
        nodes.push(NodeProcess::start(setup, 6, topic, &group, &[])?);
        nodes[5].wait_assigned(Duration::from_secs(60)).await?;
        tokio::time::sleep(SETTLE).await;
        let join = pause(&progress, t0, Instant::now());
        eprintln!("nodes: the sixth node stops gracefully");
        let t0 = Instant::now();
        nodes[5].stop()?;
        tokio::time::sleep(SETTLE).await;
        let leave = pause(&progress, t0, Instant::now());
        for node in nodes.iter_mut() {
            node.stop()?;
        }
        eprintln!("nodes: a bare group of five goes through the same");
        let (_, bare_join, bare_leave) = bare_group_gaps(setup, topic, 5).await?;
        anyhow::Ok((join, leave, bare_join, bare_leave))
    }
    .await;
    poller.abort();
    let _ = producer.kill();
    let _ = producer.wait();
    let (join, leave, bare_join, bare_leave) = result?;
    let mut table = Table::new(
        &format!("Join and leave at six nodes under steady input ({INPUT_RATE} events/s, 128 partitions)"),
        &[
            "event",
            "longest record wait",
            "bare group's wait",
            "wait beyond bare group",
            "target",
            "",
        ],
    );
    for (name, nodes, bare) in [
        ("a sixth node joins five", join, bare_join),
        (
            "the sixth node stops (SIGTERM, graceful hand-off)",
            leave,
            bare_leave,
        ),
    ] {
        let beyond = nodes.wait.0 - bare.wait.0;
        table.row(vec![
            name.into(),
            ms(nodes.wait.0),
            ms(bare.wait.0),
            ms(beyond),
            "≤ 1 s beyond the bare group".into(),
            verdict(beyond <= 1.0),
        ]);
    }
    table.note(
        "Waits: the longest time a record, from when its partition's end offset showed it, waited until it was \
         processed (consumed, for the bare group), from the event until 8 s after it. The bare group is five plain \
         consumers (same assignor and session timeout) and a sixth joining and leaving on the same input.",
    );
    Ok(table)
}
