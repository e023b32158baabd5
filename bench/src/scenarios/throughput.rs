//! Scenario 1: drain a pre-filled topic. Bare consumer (baseline) vs one node vs two nodes, each
//! until the group's committed offsets reach the end (exactly-once checkpoints on).

use std::time::{Duration, Instant};

use crate::kafka::{bare_drain, committed_to_end, end_offsets};
use crate::nodes::{produce, NodeProcess, Setup};
use crate::report::{rate, verdict, Table};


/// Runs the scenario; returns its table and the two nodes of the last run, still running.
pub async fn run(setup: &Setup, topic: &str, events: u64, users: u64) -> anyhow::Result<(Table, [NodeProcess; 2])> {
    eprintln!("throughput: producing {events} events for {users} users into {topic}");
    let produced_in = produce(setup, topic, events, users, 0, false)?;
    let ends = end_offsets(&setup.bootstrap, topic, 128)?;
    let total: i64 = ends.values().sum();
    anyhow::ensure!(total as u64 == events, "the topic holds {total} records, not {events}");

    eprintln!("throughput: bare consumer drain (baseline)");
    let (bootstrap, t, e) = (setup.bootstrap.clone(), topic.to_string(), ends.clone());
    let (records, bare_time) = tokio::task::spawn_blocking(move || bare_drain(&bootstrap, &t, &e)).await??;
    anyhow::ensure!(records == events, "the bare consumer read {records} records, not {events}");
    let bare = events as f64 / bare_time.as_secs_f64();

    eprintln!("throughput: one processor node");
    let group = format!("{topic}-one");
    let mut one = NodeProcess::start(setup, 1, topic, &group, &[])?;
    let spawned = Instant::now();
    let assigned = one.wait_assigned(Duration::from_secs(60)).await?;
    let done = committed_to_end(&setup.bootstrap, &group, topic, &ends).await?;
    let one_time = (done - assigned).as_secs_f64();
    let one_rate = events as f64 / one_time;
    let one_from_start = events as f64 / (done - spawned).as_secs_f64();
    one.stop()?;

    eprintln!("throughput: two processor nodes");
    let group = format!("{topic}-two");
    let nodes = [NodeProcess::start(setup, 1, topic, &group, &[])?, NodeProcess::start(setup, 2, topic, &group, &[])?];
    let spawned = Instant::now();
    let assigned = first_assigned(&nodes).await?;
    let done = committed_to_end(&setup.bootstrap, &group, topic, &ends).await?;
    let two_time = (done - assigned).as_secs_f64();
    let two_rate = events as f64 / two_time;
    let two_from_start = events as f64 / (done - spawned).as_secs_f64();
    let mut per_node = Vec::new();
    for node in &nodes {
        per_node.push(node.counter("events_processed_local").await as f64 / two_time);
    }

    let mut table = Table::new(
        &format!("Processing throughput: {events} events, {users} users, 128 partitions"),
        &["run", "time", "events/s", "× bare consumer", "from process start (events/s)", "target", ""],
    );
    table.row(vec![
        "producer (pre-fill, acks=all, informational)".into(),
        format!("{:.2} s", produced_in.as_secs_f64()),
        rate(events as f64 / produced_in.as_secs_f64()),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    table.row(vec!["(a) bare rdkafka consumer, no processing".into(), format!("{:.2} s", bare_time.as_secs_f64()), rate(bare), "1.00".into(), "".into(), "baseline".into(), "".into()]);
    table.row(vec![
        "(b) one node, exactly-once, to committed end".into(),
        format!("{one_time:.2} s"),
        rate(one_rate),
        format!("{:.2}", one_rate / bare),
        rate(one_from_start),
        "≥ 0.5 × bare".into(),
        verdict(one_rate >= 0.5 * bare),
    ]);
    table.row(vec![
        format!(
            "(c) two nodes (node 1: {} events/s, node 2: {} events/s)",
            rate(per_node[0]),
            rate(per_node[1])
        ),
        format!("{two_time:.2} s"),
        rate(two_rate),
        format!("{:.2}", two_rate / bare),
        rate(two_from_start),
        "≥ one node".into(),
        verdict(two_rate >= one_rate),
    ]);
    table.note(
        "Times run from the first partition assignment to the group's committed offsets reaching the end of \
         every partition (polled every 25 ms); \"from process start\" includes start-up (topic checks, \
         transactional producer init, group join). The bare consumer assigns the partitions itself (no group join).",
    );
    Ok((table, nodes))
}


async fn first_assigned(nodes: &[NodeProcess]) -> anyhow::Result<Instant> {
    crate::nodes::wait_until(Duration::from_secs(60), "a node to be assigned partitions", || async {
        for node in nodes {
            if node.counter("partitions_assigned").await > 0 {
                return Some(Instant::now());
            }
        }
        None
    })
    .await
}
