//! Scenario 1: drain a pre-filled topic. Bare consumer (baseline; and, for reference, the same
//! from start offsets asked up front) vs one node vs two nodes, each
//! until the group's committed offsets reach the end (exactly-once checkpoints on). Each run is
//! repeated (fresh group each time) and reported as the median with its range: on a 2-core
//! machine shared with the broker, single runs vary by ±15%.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::bare_jobs::{bare_pipeline, bare_writes, create_changelog};
use crate::kafka::{bare_drain, committed_to_end, end_offsets, StartFrom};
use crate::machine::{busy_during, busy_seconds};
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
    /// The machine's busy CPU seconds from the assignment to the committed end.
    cpu: f64,
}

/// One bare drain: events/s over its window, its start-up, events/s from its first record.
struct Bare {
    rate: f64,
    startup: f64,
    per_event: f64,
    /// The machine's busy CPU seconds over the drain.
    cpu: f64,
}

/// The bare writes and the bare pipeline of one round: events/s and the machine's CPU seconds.
struct Unassisted {
    writes: [(f64, f64); 2],
    pipeline: (f64, f64),
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
    let mut unassisted = Vec::new();
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
            let (drained, cpu) = tokio::task::spawn_blocking(move || {
                busy_during(|| bare_drain(&bootstrap, &t, &e, from, &[]))
            })
            .await??;
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
                cpu,
            });
        }

        unassisted.push(unassisted_round(setup, topic, &ends, events, round, repeat).await?);

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

    let bare_cpu = spread(bare.iter().map(|b| b.cpu)).median;
    let bare_startup = spread(bare.iter().map(|b| b.startup));
    let bare_per_event = spread(bare.iter().map(|b| b.per_event));
    let (bare, one_rate, two_rate) = (
        spread(bare.iter().map(|b| b.rate)),
        spread(one.iter().map(|d| d.rate)),
        spread(two.iter().map(|d| d.rate)),
    );
    let bare_known = spread(bare_known.iter().map(|b| b.rate));
    let writes = |lane: usize| spread(unassisted.iter().map(|u| u.writes[lane].0));
    let writes_cpu = |lane: usize| spread(unassisted.iter().map(|u| u.writes[lane].1)).median;
    let pipeline = spread(unassisted.iter().map(|u| u.pipeline.0));
    let pipeline_cpu = spread(unassisted.iter().map(|u| u.pipeline.1)).median;
    let per_million = |cpu: f64| format!("{:.1}", cpu * 1e6 / events as f64);
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
            "machine CPU per million events (core-s)",
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
        per_million(bare_cpu),
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
        "".into(),
    ]);
    for (lane, what) in [
        (0, "one producer"),
        (1, "two producers at once, half the keys each"),
    ] {
        let w = writes(lane);
        table.row(vec![
            format!("(d{}) bare transactional writes alone, {what}: the changelog records of {events} new keys from memory, transactions of 100 000, nothing read", if lane == 0 { "" } else { "′" }),
            show(&w),
            format!("{:.2}", w.median / bare.median),
            "".into(),
            "".into(),
            per_million(writes_cpu(lane)),
            "".into(),
            "".into(),
        ]);
    }
    table.row(vec![
        format!(
            "(e) a hand-written exactly-once pipeline (rdkafka, no runtime): (a)'s read, then a changelog record per changed key, in transactions with the offsets (one node ÷ this: {:.2})",
            one_rate.median / pipeline.median
        ),
        show(&pipeline),
        format!("{:.2}", pipeline.median / bare.median),
        "".into(),
        "".into(),
        per_million(pipeline_cpu),
        "".into(),
        "".into(),
    ]);
    // Issue 18's targets: lower when every event is a new entity, which also costs a changelog
    // record.
    let target = if users_in_turn { 0.8 } else { 0.9 };
    table.row(vec![
        "(b) one node, exactly-once, to committed end".into(),
        show(&one_rate),
        format!("{:.2}", one_rate.median / bare.median),
        split(&one),
        rate(spread(one.iter().map(|d| d.from_start)).median),
        per_million(spread(one.iter().map(|d| d.cpu)).median),
        format!("≥ {target} × bare"),
        verdict(one_rate.median >= target * bare.median),
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
        per_million(spread(two.iter().map(|d| d.cpu)).median),
        "≥ one node".into(),
        verdict(two_rate.median >= one_rate.median),
    ]);
    table.note(
        "Times run from the first partition assignment to the group's committed offsets reaching the end of \
         every partition (polled every 25 ms); \"from process start\" includes start-up (topic checks, \
         transactional producer init, the group's initial rebalance delay). The bare consumer assigns the \
         partitions itself (no group join); it runs in this harness, on the same allocator as the nodes \
         (jemalloc, the runtime's `jemalloc` feature). (a) resolves each partition's start as the node's consumer does (a \
         group without committed offsets resets to the earliest offset, one lookup per partition); (a′) asks \
         every start in one request first, which no group consumer can: the fastest possible read. (d) and (d′) \
         write what a runtime keeping a changelog record per entity must write for these events when every \
         one is a new entity, with nothing else to do, on the node's checkpoint producer settings, to a \
         changelog created as the node creates one (`CHANGELOG_TOPIC_CONFIG`); (e) is \
         (a)'s read and those writes together, in transactions with the offsets begun every 500 ms or at 100 \
         000 pending keys on a thread of their own (the node's checkpoint policy), from the assign to the \
         last commit. Machine CPU: every process's (the broker's too), from /proc/stat over the run's window; \
         the broker is fresh at the first round, and the first writes of each round also pay for its JIT \
         compiling the produce path. Per-node \
         rates: events each node processed ÷ the run's time. The window split: start-up is the time from \
         the assignment (the bare consumer: from its assign) to the first event processed (polled every 10 ms), \
         then events/s from there to the last event processed (× the bare consumer's from its first record), \
         then the time until the last offsets are committed.",
    );
    Ok((table, [n1, n2]))
}

/// The rows without a runtime (d, e) of one round, each into a changelog of its own.
async fn unassisted_round(
    setup: &Setup,
    topic: &str,
    ends: &BTreeMap<u32, i64>,
    events: u64,
    round: usize,
    repeat: usize,
) -> anyhow::Result<Unassisted> {
    let partitions = ends.len() as u32;
    let mut writes = [(0.0, 0.0); 2];
    for (lanes, slot) in [1usize, 2].into_iter().zip(writes.iter_mut()) {
        eprintln!(
            "throughput round {round}/{repeat}: bare transactional writes alone on {lanes} producer(s)"
        );
        let changelog = format!("{topic}-bare-writes-{lanes}-{round}");
        create_changelog(&setup.bootstrap, &changelog, partitions).await?;
        let bootstrap = setup.bootstrap.clone();
        let (took, cpu) = tokio::task::spawn_blocking(move || {
            busy_during(|| bare_writes(&bootstrap, &changelog, partitions, events, lanes))
        })
        .await??;
        let per_second = events as f64 / took.as_secs_f64();
        eprintln!(
            "throughput round {round}/{repeat}: bare writes on {lanes} producer(s): {} records/s, {cpu:.1} core-s",
            rate(per_second)
        );
        *slot = (per_second, cpu);
    }

    eprintln!("throughput round {round}/{repeat}: bare exactly-once pipeline");
    let changelog = format!("{topic}-bare-changelog-{round}");
    create_changelog(&setup.bootstrap, &changelog, partitions).await?;
    let (bootstrap, t, e, group) = (
        setup.bootstrap.clone(),
        topic.to_string(),
        ends.clone(),
        format!("{topic}-bare-pipeline-{round}"),
    );
    let (run, cpu) = tokio::task::spawn_blocking(move || {
        busy_during(|| bare_pipeline(&bootstrap, &t, &e, &changelog, &group))
    })
    .await??;
    anyhow::ensure!(
        run.records == events,
        "the bare pipeline read {} records, not {events}",
        run.records
    );
    let pipeline_rate = events as f64 / run.time.as_secs_f64();
    eprintln!(
        "throughput round {round}/{repeat}: bare pipeline: {} events/s ({} states in {} transactions), {cpu:.1} core-s",
        rate(pipeline_rate),
        run.states,
        run.transactions
    );
    Ok(Unassisted {
        writes,
        pipeline: (pipeline_rate, cpu),
    })
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
    let busy_at_assignment = busy_seconds()?;
    let first_event = processed_at_least(nodes, 1).await?;
    let last_event = processed_at_least(nodes, events).await?;
    let done = committed_to_end(&setup.bootstrap, &nodes[0].group, topic, ends).await?;
    let cpu = busy_seconds()? - busy_at_assignment;
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
        cpu,
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
