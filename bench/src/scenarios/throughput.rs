//! Scenario 1: drain a pre-filled topic. Bare consumer (baseline; and, for reference, the same
//! from start offsets asked up front) vs one node vs two nodes, each
//! until the group's committed offsets reach the end (exactly-once checkpoints on). Each run is
//! repeated (fresh group each time) and reported as the median with its range: on a 2-core
//! machine shared with the broker, single runs vary by ±15%.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::kafka::{bare_drain, committed_to_end, end_offsets, StartFrom};
use crate::nodes::{produce, NodeProcess, Setup};
use crate::report::{rate, verdict, Table};

/// One drain: events/s from the first assignment, events/s from process start, per-node rates,
/// and the window split: start-up (assignment to the first event processed), events/s from the
/// first event processed to the last, and the tail until the offsets are committed.
struct Drain {
    rate: f64,
    from_start: f64,
    per_node: Vec<f64>,
    startup: f64,
    per_event: f64,
    commit_tail: f64,
}

/// One bare drain: events/s over its window, its start-up, events/s from its first record.
struct Bare {
    rate: f64,
    startup: f64,
    per_event: f64,
}

/// Median and range of a set of runs.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn show(s: &Spread) -> String {
    format!("{} ({}–{})", rate(s.median), rate(s.min), rate(s.max))
}

/// Runs the scenario; returns its table and the two nodes of the last run, still running.
pub async fn run(
    setup: &Setup,
    topic: &str,
    events: u64,
    users: u64,
    users_in_turn: bool,
    repeat: usize,
) -> anyhow::Result<(Table, [NodeProcess; 2])> {
    eprintln!("throughput: producing {events} events for {users} users into {topic}");
    let produced_in = produce(setup, topic, events, users, 0, users_in_turn)?;
    let ends = end_offsets(&setup.bootstrap, topic, 128)?;
    let total: i64 = ends.values().sum();
    anyhow::ensure!(
        total as u64 == events,
        "the topic holds {total} records, not {events}"
    );

    let mut bare = Vec::new();
    let mut bare_known = Vec::new();
    let mut one = Vec::new();
    let mut two = Vec::new();
    let mut last_nodes: Option<Vec<NodeProcess>> = None;
    for round in 1..=repeat {
        // The previous round's two nodes hold the ports.
        if let Some(mut nodes) = last_nodes.take() {
            for node in nodes.iter_mut() {
                node.stop()?;
            }
        }
        for (from, rates) in [
            (StartFrom::Beginning, &mut bare),
            (StartFrom::KnownOffsets, &mut bare_known),
        ] {
            eprintln!(
                "throughput round {round}/{repeat}: bare consumer drain from {from:?} (baseline)"
            );
            let (bootstrap, t, e) = (setup.bootstrap.clone(), topic.to_string(), ends.clone());
            let drained =
                tokio::task::spawn_blocking(move || bare_drain(&bootstrap, &t, &e, from)).await??;
            anyhow::ensure!(
                drained.records == events,
                "the bare consumer read {} records, not {events}",
                drained.records
            );
            let bare_rate = events as f64 / drained.time.as_secs_f64();
            eprintln!(
                "throughput round {round}/{repeat}: bare consumer from {from:?}: {} events/s",
                rate(bare_rate)
            );
            rates.push(Bare {
                rate: bare_rate,
                startup: (drained.time - drained.from_first_record).as_secs_f64(),
                per_event: events as f64 / drained.from_first_record.as_secs_f64(),
            });
        }

        eprintln!("throughput round {round}/{repeat}: one processor node");
        let mut nodes = start_nodes(setup, topic, &format!("{topic}-one-{round}"), 1)?;
        let drained = drain(setup, topic, &nodes, &ends, events).await?;
        nodes[0].stop()?;
        eprintln!(
            "throughput round {round}/{repeat}: one node: {} events/s",
            rate(drained.rate)
        );
        one.push(drained);

        eprintln!("throughput round {round}/{repeat}: two processor nodes");
        let nodes = start_nodes(setup, topic, &format!("{topic}-two-{round}"), 2)?;
        let drained = drain(setup, topic, &nodes, &ends, events).await?;
        eprintln!(
            "throughput round {round}/{repeat}: two nodes: {} events/s",
            rate(drained.rate)
        );
        two.push(drained);
        last_nodes = Some(nodes);
    }
    let nodes = last_nodes.ok_or_else(|| anyhow::anyhow!("--repeat must be at least 1"))?;
    let [n1, n2] = <[NodeProcess; 2]>::try_from(nodes)
        .map_err(|_| anyhow::anyhow!("the two-node run started two nodes"))?;

    let bare_startup = spread(bare.iter().map(|b| b.startup));
    let bare_per_event = spread(bare.iter().map(|b| b.per_event));
    let (bare, one_rate, two_rate) = (
        spread(bare.iter().map(|b| b.rate)),
        spread(one.iter().map(|d| d.rate)),
        spread(two.iter().map(|d| d.rate)),
    );
    let bare_known = spread(bare_known.iter().map(|b| b.rate));
    // The window split, as medians: start-up, events/s from the first event, commit tail.
    let split = |drains: &[Drain]| {
        let per_event = spread(drains.iter().map(|d| d.per_event)).median;
        format!(
            "{:.2} s; {} events/s ({:.2} × bare); {:.2} s",
            spread(drains.iter().map(|d| d.startup)).median,
            rate(per_event),
            per_event / bare_per_event.median,
            spread(drains.iter().map(|d| d.commit_tail)).median
        )
    };
    let mut table = Table::new(
        &format!(
            "Processing throughput: {events} events, {users} users{}, 128 partitions (median of {repeat} runs, range)",
            if users_in_turn { " in turn (each user's first event is new to the node)" } else { "" }
        ),
        &[
            "run",
            "events/s",
            "× bare consumer (median)",
            "window: start-up; from first event to last; commit tail",
            "from process start (events/s)",
            "target",
            "",
        ],
    );
    table.row(vec![
        "producer (pre-fill, acks=all, informational)".into(),
        rate(events as f64 / produced_in.as_secs_f64()),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    table.row(vec![
        "(a) bare rdkafka consumer, no processing, from `Offset::Beginning`".into(),
        show(&bare),
        "1.00".into(),
        format!(
            "{:.2} s; {} records/s; —",
            bare_startup.median,
            rate(bare_per_event.median)
        ),
        "".into(),
        "baseline".into(),
        "".into(),
    ]);
    table.row(vec![
        format!("(a′) the same from start offsets asked up front (informational; one node ÷ this: {:.2})", one_rate.median / bare_known.median),
        show(&bare_known),
        format!("{:.2}", bare_known.median / bare.median),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    table.row(vec![
        "(b) one node, exactly-once, to committed end".into(),
        show(&one_rate),
        format!("{:.2}", one_rate.median / bare.median),
        split(&one),
        rate(spread(one.iter().map(|d| d.from_start)).median),
        "≥ 0.5 × bare (aim 0.8)".into(),
        verdict(one_rate.median >= 0.5 * bare.median),
    ]);
    let per_node = |i: usize| rate(spread(two.iter().map(|d| d.per_node[i])).median);
    table.row(vec![
        format!(
            "(c) two nodes (per node: {} and {} events/s)",
            per_node(0),
            per_node(1)
        ),
        show(&two_rate),
        format!("{:.2}", two_rate.median / bare.median),
        split(&two),
        rate(spread(two.iter().map(|d| d.from_start)).median),
        "≥ one node".into(),
        verdict(two_rate.median >= one_rate.median),
    ]);
    table.note(
        "Times run from the first partition assignment to the group's committed offsets reaching the end of \
         every partition (polled every 25 ms); \"from process start\" includes start-up (topic checks, \
         transactional producer init, the group's initial rebalance delay). The bare consumer assigns the \
         partitions itself (no group join). (a) resolves each partition's start as the node's consumer does (a \
         group without committed offsets resets to the earliest offset, one lookup per partition); (a′) asks \
         every start in one request first, which no group consumer can: the fastest possible read. Per-node \
         rates: events each node processed ÷ the run's time. The window split: start-up is the time from \
         the assignment (the bare consumer: from its assign) to the first event processed (polled every 10 ms), \
         then events/s from there to the last event processed (× the bare consumer's from its first record), \
         then the time until the last offsets are committed.",
    );
    Ok((table, [n1, n2]))
}

fn start_nodes(
    setup: &Setup,
    topic: &str,
    group: &str,
    count: u16,
) -> anyhow::Result<Vec<NodeProcess>> {
    (1..=count)
        .map(|i| NodeProcess::start(setup, i, topic, group, &[]))
        .collect()
}

/// Times `nodes` (just started) draining the topic to the committed end.
async fn drain(
    setup: &Setup,
    topic: &str,
    nodes: &[NodeProcess],
    ends: &BTreeMap<u32, i64>,
    events: u64,
) -> anyhow::Result<Drain> {
    let spawned = Instant::now();
    let assigned = first_assigned(nodes).await?;
    let first_event = processed_at_least(nodes, 1).await?;
    let last_event = processed_at_least(nodes, events).await?;
    let done = committed_to_end(&setup.bootstrap, &nodes[0].group, topic, ends).await?;
    let seconds = (done - assigned).as_secs_f64();
    let mut per_node = Vec::new();
    for node in nodes {
        let processed = node
            .counter("events_processed_local")
            .await
            .ok_or_else(|| anyhow::anyhow!("node {} did not report its counters", node.index))?;
        per_node.push(processed as f64 / seconds);
    }
    Ok(Drain {
        rate: events as f64 / seconds,
        from_start: events as f64 / (done - spawned).as_secs_f64(),
        per_node,
        startup: (first_event - assigned).as_secs_f64(),
        per_event: events as f64 / (last_event - first_event).as_secs_f64().max(1e-3),
        commit_tail: done.saturating_duration_since(last_event).as_secs_f64(),
    })
}

/// When the nodes together had processed at least `events` (polled every 10 ms).
async fn processed_at_least(nodes: &[NodeProcess], events: u64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut processed = 0;
        for node in nodes {
            node.ensure_running()?;
            processed += node.counter("events_processed_local").await.unwrap_or(0);
        }
        if processed >= events {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the nodes processed {processed} of {events} events within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When the first of `nodes` (just started) reported an assignment.
pub(super) async fn first_assigned(nodes: &[NodeProcess]) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for node in nodes {
            node.ensure_running()?;
            if node.counter("partitions_assigned").await.unwrap_or(0) > 0 {
                return Ok(Instant::now());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no node was assigned partitions within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
