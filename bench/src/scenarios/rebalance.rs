//! Scenario 3: rebalance pauses under steady input. A third node joins, then leaves gracefully
//! (SIGTERM), then node 2 is killed (SIGKILL). For each: time until the partitions are
//! assigned, until their users are answered, the longest time a readable record waited to be
//! processed on any partition (each partition's end offset and each shard's processed offset are
//! polled every 50 ms), and the longest processing gap. The baseline is a plain consumer group
//! (no processing, same session timeout and assignor) going through the same join and leave on
//! the same input, measured in the same run. The targets are judged on waits: gaps also contain
//! the input's own pauses (see `progress.rs`).
//!
//! Failover: node 2 is killed five times (restarted in between). Each time the killed node is
//! left with an open checkpoint transaction, as if it died mid-checkpoint: right after the kill a
//! producer with its transactional id writes a record to the changelog of one of its shards and
//! leaves the transaction open (60 s timeout). Measured: time until every moved user answers
//! (strong reads), and, throughout, reads allowing staleness of the same users. Those users get
//! extra input of their own (a few purchases a second each), so the killed node was committing
//! their states until it died; each standby answer is held against the committed states a
//! changelog reader saw, and its reported lag against how old it really was.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use kafka_sharding::partitioner::partition_for_key;
use proto::service::user_service_client::UserServiceClient;
use proto::service::UserStatsRequest;

use crate::kafka::{BareGroup, CommittedTimeline, EndPoller};
use crate::nodes::{
    produce_in_background, wait_until, NodeAddr, NodeProcess, Setup, PORT_BASE, SESSION_TIMEOUT_MS,
};
use crate::progress::Progress;
use crate::report::{ms, verdict, Table};

const INPUT_RATE: u64 = 4_000;
const STEADY: Duration = Duration::from_secs(8);
/// How long after an event the gap is still watched (the group settles well within it).
const SETTLE: Duration = Duration::from_secs(8);
const POLL: Duration = Duration::from_millis(50);
/// SIGKILL failovers measured.
const KILLS: usize = 5;
/// The staleness the reads during a failover allow.
const STALE_BOUND_MS: u64 = 5_000;
/// Purchases per second for each probed user, besides the steady input.
const HOT_RATE: u64 = 2;
/// A standby's reported lag of 0 means it was at the end one empty fetch ago (up to 100 ms,
/// docs/ARCHITECTURE.md): an answer older than reported by more than this is a violation.
const LAG_GRANULARITY_MS: i64 = 100;

/// One SIGKILL failover.
struct Failover {
    to_answering: f64,
    /// Strong answers lacking a committed state visible before they were asked.
    strong_lacking: usize,
    stale: StaleReads,
}

/// What reads allowing staleness got during a failover.
#[derive(Default)]
struct StaleReads {
    answered: u64,
    from_standby: u64,
    failed: u64,
    max_lag_ms: u64,
    max_lag_records: i64,
    /// Standby answers that lacked a committed state visible more than their reported lag
    /// (plus [`LAG_GRANULARITY_MS`]) before they were asked.
    older_than_reported: u64,
    /// Standby answers lacking a committed state visible before they were asked (older than
    /// the owner's committed state, by any amount).
    lacking: u64,
    /// The largest (how old it was) − (reported lag), in ms; negative: all within.
    max_excess_ms: Option<i64>,
    /// Standby answers whose user's state had been committed within the second before the kill.
    recent: u64,
}

/// A standby's answer, for checking once the failover is over.
struct StandbyAnswer {
    user: String,
    asked: Instant,
    lag_ms: u64,
    purchases: i64,
}

impl StaleReads {
    /// Holds each standby answer against the committed states: the first committed state it
    /// lacks became visible at `c`; asked at `asked`, it was at least `asked - c` old.
    fn check(&mut self, answers: &[StandbyAnswer], timeline: &CommittedTimeline, killed: Instant) {
        for answer in answers {
            if timeline
                .last_before(&answer.user, answer.asked)
                .is_some_and(|at| at + Duration::from_secs(1) >= killed)
            {
                self.recent += 1;
            }
            let old_ms = timeline
                .first_beyond(&answer.user, answer.purchases)
                .filter(|c| *c < answer.asked)
                .map_or(0, |c| (answer.asked - c).as_millis() as i64);
            if old_ms > 0 {
                self.lacking += 1;
            }
            let excess = old_ms - answer.lag_ms as i64;
            self.max_excess_ms = Some(self.max_excess_ms.map_or(excess, |m| m.max(excess)));
            if excess > LAG_GRANULARITY_MS {
                self.older_than_reported += 1;
            }
        }
    }
}

struct Event {
    name: &'static str,
    to_assignment: Option<f64>,
    to_answering: f64,
    restore: Option<f64>,
    gap: (f64, Option<u32>),
    wait: (f64, Option<u32>),
}

/// A window's longest gap and longest wait.
pub(super) struct Pause {
    pub gap: (f64, Option<u32>),
    pub wait: (f64, Option<u32>),
}

pub(super) fn pause(progress: &Mutex<Progress>, from: Instant, to: Instant) -> Pause {
    let progress = progress.lock().expect("progress");
    Pause {
        gap: progress.longest_gap(from, to),
        wait: progress.longest_wait(from, to),
    }
}

pub async fn run(
    setup: &Setup,
    topic: &str,
    mut nodes: [NodeProcess; 2],
    users: u64,
) -> anyhow::Result<Vec<Table>> {
    let group = nodes[0].group.clone();
    let mut producer = produce_in_background(setup, topic, INPUT_RATE * 600, users, INPUT_RATE)?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let _ends = EndPoller::start(&setup.bootstrap, topic, 128, progress.clone(), POLL)?;
    let poller = tokio::spawn(poll_progress(
        (1..=3).map(|i| NodeAddr::new(i, &group)).collect(),
        progress.clone(),
    ));
    let one_user_per_partition = sample_users(users);
    let result = async {
        tokio::time::sleep(STEADY).await;
        let steady_to = Instant::now();
        let steady = pause(
            &progress,
            steady_to - STEADY + Duration::from_secs(2),
            steady_to,
        );

        eprintln!("rebalance: node 3 joins");
        let t0 = Instant::now();
        let mut node3 = NodeProcess::start(setup, 3, topic, &group, &[])?;
        let assigned = node3.wait_assigned(Duration::from_secs(60)).await?;
        let moved = node3.owned_shards().await?;
        let answered =
            answering(&node3.grpc_url(), users_of(&one_user_per_partition, &moved)).await?;
        tokio::time::sleep(SETTLE).await;
        let window = pause(&progress, t0, Instant::now());
        let join = Event {
            name: "node 3 joins",
            to_assignment: Some((assigned - t0).as_secs_f64()),
            to_answering: (answered - t0).as_secs_f64(),
            restore: Some(node3.longest_logged_restore()),
            gap: window.gap,
            wait: window.wait,
        };

        eprintln!("rebalance: node 3 stops gracefully");
        let moving = node3.owned_shards().await?;
        let t0 = Instant::now();
        node3.stop()?;
        let answered = answering(
            &nodes[0].grpc_url(),
            users_of(&one_user_per_partition, &moving),
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        let window = pause(&progress, t0, Instant::now());
        let leave = Event {
            name: "node 3 stops (SIGTERM, graceful hand-off)",
            to_assignment: None,
            to_answering: (answered - t0).as_secs_f64(),
            restore: None,
            gap: window.gap,
            wait: window.wait,
        };

        let mut failovers = Vec::with_capacity(KILLS);
        let mut kill = None;
        let probed: Vec<String> = one_user_per_partition.values().cloned().collect();
        let timeline = CommittedTimeline::start(
            &setup.bootstrap,
            &format!("{group}-{topic}-state"),
            128,
            probed.iter().cloned(),
        )?;
        timeline.wait_caught_up(Duration::from_secs(60)).await?;
        let hot = HotInput::start(&setup.bootstrap, topic, probed)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        for run in 1..=KILLS {
            eprintln!("rebalance: node 2 is killed ({run} of {KILLS})");
            let moving = nodes[1].owned_shards().await?;
            let moved_users = users_of(&one_user_per_partition, &moving);
            let t0 = Instant::now();
            nodes[1].kill();
            let _open = leave_open_transaction(setup, &group, topic, &moving)?;
            let stop = Arc::new(AtomicBool::new(false));
            let stale = tokio::spawn(stale_reads(
                nodes[0].grpc_url(),
                moved_users.clone(),
                stop.clone(),
            ));
            let (answered, strong) = answers(&nodes[0].grpc_url(), moved_users).await?;
            stop.store(true, Ordering::Relaxed);
            let (mut stale, standby_answers) = stale.await??;
            stale.check(&standby_answers, &timeline, t0);
            // A strong read is the owner's state: it lacks no committed state.
            let strong_lacking = strong
                .iter()
                .filter(|(user, asked, purchases)| {
                    timeline
                        .first_beyond(user, *purchases)
                        .is_some_and(|c| c < *asked)
                })
                .count();
            failovers.push(Failover {
                to_answering: (answered - t0).as_secs_f64(),
                strong_lacking,
                stale,
            });
            if run == 1 {
                tokio::time::sleep(SETTLE).await;
                let window = pause(&progress, t0, Instant::now());
                kill = Some(Event {
                    name: "node 2 killed (SIGKILL)",
                    to_assignment: None,
                    to_answering: (answered - t0).as_secs_f64(),
                    restore: None,
                    gap: window.gap,
                    wait: window.wait,
                });
            }
            if run < KILLS {
                nodes[1] = NodeProcess::start(setup, 2, topic, &group, &[])?;
                nodes[1].wait_assigned(Duration::from_secs(60)).await?;
                let node2 = &nodes[1];
                wait_until(
                    Duration::from_secs(60),
                    "node 2 to restore its shards",
                    || async {
                        let shards = node2.shards().await?.len() as f64;
                        let restored = node2
                            .metrics()
                            .await?
                            .get("processor_restore_seconds_count")
                            .copied()?;
                        (shards > 0.0 && restored >= shards).then_some(())
                    },
                )
                .await?;
                // Standbys of the other node's shards warm up, checkpoints go on.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
        let kill = kill.expect("at least one kill");
        hot.stop()?;

        eprintln!("rebalance: the same join and leave in a bare consumer group (baseline)");
        let bare = bare_group_gaps(setup, topic, 2).await?;
        anyhow::Ok((steady, join, leave, kill, bare, failovers))
    }
    .await;
    poller.abort();
    let _ = producer.kill();
    let _ = producer.wait();
    let (steady, join, leave, kill, (bare_steady, bare_join, bare_leave), failovers) = result?;
    let with_partition = |(seconds, partition): (f64, Option<u32>)| {
        format!(
            "{} (partition {})",
            ms(seconds),
            partition.map(|p| p.to_string()).unwrap_or("-".into())
        )
    };

    let mut table = Table::new(
        &format!("Rebalance pauses under steady input ({INPUT_RATE} events/s, {users} users, 128 partitions)"),
        &[
            "event",
            "to assignment",
            "to answering its users",
            "longest shard restore",
            "longest record wait",
            "bare group's wait",
            "wait beyond bare group",
            "target",
            "",
            "longest processing gap",
            "bare group's gap",
        ],
    );
    table.row(vec![
        "steady state, no change (baseline)".into(),
        "".into(),
        "".into(),
        "".into(),
        with_partition(steady.wait),
        ms(bare_steady.wait.0),
        ms(steady.wait.0 - bare_steady.wait.0),
        "".into(),
        "".into(),
        with_partition(steady.gap),
        ms(bare_steady.gap.0),
    ]);
    for (event, bare) in [
        (&join, Some(bare_join)),
        (&leave, Some(bare_leave)),
        (&kill, None),
    ] {
        let beyond = bare.as_ref().map(|b| event.wait.0 - b.wait.0);
        let (target, met) = match beyond {
            Some(beyond) => (
                "≤ 1 s beyond the bare group".to_string(),
                verdict(beyond <= 1.0),
            ),
            None => (
                format!(
                    "reported; includes the {:.0} s session timeout",
                    SESSION_TIMEOUT_MS as f64 / 1000.0
                ),
                "".into(),
            ),
        };
        table.row(vec![
            event.name.into(),
            event.to_assignment.map(ms).unwrap_or_default(),
            ms(event.to_answering),
            event.restore.map(ms).unwrap_or_default(),
            with_partition(event.wait),
            bare.as_ref().map(|b| ms(b.wait.0)).unwrap_or_default(),
            beyond.map(ms).unwrap_or_default(),
            target,
            met,
            with_partition(event.gap),
            bare.as_ref().map(|b| ms(b.gap.0)).unwrap_or_default(),
        ]);
    }
    let answer_after_restore =
        join.to_answering - join.to_assignment.unwrap_or(0.0) - join.restore.unwrap_or(0.0);
    table.note(format!(
        "Node 3 answered its users {} after its assignment beyond its longest shard restore (target ≤ 1 s: {}). \
         Waits: the longest time a record, from when the partition's end offset showed it, waited until it was \
         processed (consumed, for the bare group); gaps: the longest time a partition that was moving did not \
         advance, which also counts pauses of the input itself. Both from the event until {} s after its users \
         answered. End offsets and processor progress are polled every {} ms (the bare group's progress is exact), \
         so processor figures carry up to that much extra.",
        ms(answer_after_restore),
        verdict(answer_after_restore <= 1.0),
        SETTLE.as_secs(),
        POLL.as_millis()
    ));
    Ok(vec![table, failover_table(&failovers)])
}

fn failover_table(failovers: &[Failover]) -> Table {
    let target = SESSION_TIMEOUT_MS as f64 / 1000.0 + 1.0;
    let mut table = Table::new(
        &format!(
            "SIGKILL failover with an open checkpoint transaction ({KILLS} runs, {:.0} s session timeout)",
            SESSION_TIMEOUT_MS as f64 / 1000.0
        ),
        &[
            "run",
            "to every moved user answering (strong)",
            "target",
            "",
            "of those answers, lacking a committed state",
            &format!("reads allowing {STALE_BOUND_MS} ms staleness meanwhile"),
            "of them from a standby",
            "failed",
            "largest lag reported",
            "standby answers older than their reported lag",
            "",
            "lacking a committed state at all",
            "largest age − reported lag",
            "of them about a state committed < 1 s before the kill",
        ],
    );
    for (i, f) in failovers.iter().enumerate() {
        table.row(vec![
            (i + 1).to_string(),
            ms(f.to_answering),
            format!("≤ {target:.0} s"),
            verdict(f.to_answering <= target),
            f.strong_lacking.to_string(),
            f.stale.answered.to_string(),
            f.stale.from_standby.to_string(),
            f.stale.failed.to_string(),
            format!(
                "{} ms, {} records",
                f.stale.max_lag_ms, f.stale.max_lag_records
            ),
            f.stale.older_than_reported.to_string(),
            verdict(f.stale.older_than_reported == 0 && f.stale.from_standby > 0),
            f.stale.lacking.to_string(),
            f.stale
                .max_excess_ms
                .map(|e| format!("{e} ms"))
                .unwrap_or_default(),
            f.stale.recent.to_string(),
        ]);
    }
    table.note(format!(
        "Strong reads: one user per moved partition, each retried until its owner answers; its answer is held \
         against the committed states like a standby's (it may lack none). Reads allowing \
         staleness: the same users asked in turn through the surviving node from the kill until the strong reads \
         all answered (2 s timeout each); a failed one is an error or a timeout. The probed users get {HOT_RATE} \
         purchases/s each besides the steady input. A changelog reader (read_committed, 10 ms fetch wait) notes \
         when each of their committed states became visible; a standby answer lacking a committed state that was \
         visible more than its reported lag + {LAG_GRANULARITY_MS} ms (the end-of-partition granularity) before it \
         was asked is older than reported. Age: from the first committed state it lacks becoming visible until it \
         was asked (0 if it lacks none)."
    ));
    table
}

/// Writes a record with the killed node 2's transactional id to the changelog of one of its
/// shards and leaves the transaction open, as a node killed mid-checkpoint does. The producer
/// is returned so that nothing ends the transaction but the new owner's fence (or its 60 s
/// timeout).
fn leave_open_transaction(
    setup: &Setup,
    group: &str,
    topic: &str,
    shards: &[u32],
) -> anyhow::Result<rdkafka::producer::BaseProducer> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let shard = *shards.first().context("node 2 owned no shard")?;
    let producer: BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &setup.bootstrap)
        .set(
            "transactional.id",
            format!("{group}-processor-{}@127.0.0.1", PORT_BASE + 2),
        )
        .set("transaction.timeout.ms", "60000")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    producer.begin_transaction()?;
    producer
        .send(
            BaseRecord::to(&format!("{group}-{topic}-state"))
                .partition(shard as i32)
                .key("left-open")
                .payload("never committed"),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(10))?;
    Ok(producer)
}

/// Asks `users` in turn through `addr`, allowing [`STALE_BOUND_MS`] of staleness, until `stop`;
/// returns the counts and the standby answers.
async fn stale_reads(
    addr: String,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(StaleReads, Vec<StandbyAnswer>)> {
    let channel = tonic::transport::Channel::from_shared(addr)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut client = UserServiceClient::new(channel);
    let mut reads = StaleReads::default();
    let mut answers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for id in &users {
            let asked = Instant::now();
            let ask = client.user_stats(UserStatsRequest {
                id: id.clone(),
                max_staleness_ms: Some(STALE_BOUND_MS),
            });
            match tokio::time::timeout(Duration::from_secs(2), ask).await {
                Ok(Ok(answer)) => {
                    let answer = answer.into_inner();
                    reads.answered += 1;
                    if answer.answered_by == "standby" {
                        reads.from_standby += 1;
                        reads.max_lag_ms = reads.max_lag_ms.max(answer.lag_ms);
                        reads.max_lag_records = reads.max_lag_records.max(answer.lag_records);
                        answers.push(StandbyAnswer {
                            user: id.clone(),
                            asked,
                            lag_ms: answer.lag_ms,
                            purchases: answer.total_purchases,
                        });
                    }
                }
                _ => reads.failed += 1,
            }
        }
    }
    Ok((reads, answers))
}

/// [`HOT_RATE`] purchases a second for each of some users, besides the steady input, until
/// stopped: their states change and are committed right up to a kill.
struct HotInput {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl HotInput {
    fn start(bootstrap: &str, topic: &str, users: Vec<String>) -> anyhow::Result<Self> {
        use prost::Message as _;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
            .create()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let topic = topic.to_string();
        let every = Duration::from_millis(1_000 / HOT_RATE);
        let thread = std::thread::spawn(move || {
            let mut sent = 0;
            while !stopping.load(Ordering::SeqCst) {
                let round = Instant::now();
                for user in &users {
                    let purchase = proto::events::UserPurchase {
                        user_id: user.clone(),
                        product: "probe".into(),
                        quantity: 1,
                        price: 1,
                    }
                    .encode_to_vec();
                    producer
                        .send(
                            BaseRecord::to(&topic)
                                .partition(partition_for_key(user.as_bytes(), 128) as i32)
                                .key(user.as_str())
                                .payload(&purchase),
                        )
                        .map_err(|(e, _)| e)?;
                    sent += 1;
                }
                producer.poll(Duration::ZERO);
                std::thread::sleep(every.saturating_sub(round.elapsed()));
            }
            producer.flush(Duration::from_secs(10))?;
            Ok(sent)
        });
        Ok(Self { stop, thread })
    }

    fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the probe input thread panicked"))?
    }
}

/// Feeds every node's per-shard processed offsets into `progress` until aborted.
pub(super) async fn poll_progress(nodes: Vec<NodeAddr>, progress: Arc<Mutex<Progress>>) {
    loop {
        let polled = futures::future::join_all(nodes.iter().map(|n| n.processed_offsets())).await;
        let now = Instant::now();
        {
            let mut progress = progress.lock().expect("progress");
            for offsets in polled.into_iter().flatten() {
                for (partition, offset) in offsets {
                    progress.observe(partition, offset, now);
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn sample_users(users: u64) -> BTreeMap<u32, String> {
    let mut sample = BTreeMap::new();
    for u in 0..users {
        let id = u.to_string();
        sample
            .entry(partition_for_key(id.as_bytes(), 128))
            .or_insert(id);
    }
    sample
}

fn users_of(sample: &BTreeMap<u32, String>, partitions: &[u32]) -> Vec<String> {
    partitions
        .iter()
        .filter_map(|p| sample.get(p).cloned())
        .collect()
}

/// When every one of `users` has been answered through `addr` (each retried until it is).
async fn answering(addr: &str, users: Vec<String>) -> anyhow::Result<Instant> {
    Ok(answers(addr, users).await?.0)
}

/// When every one of `users` has been answered through `addr` (strong reads, each retried
/// until it is), and each one's answer: (user, when asked, purchases).
async fn answers(
    addr: &str,
    users: Vec<String>,
) -> anyhow::Result<(Instant, Vec<(String, Instant, i64)>)> {
    let channel = tonic::transport::Channel::from_shared(addr.to_string())?
        .connect_timeout(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(120);
    let asks = users.into_iter().map(|id| {
        let channel = channel.clone();
        async move {
            loop {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "user {id} was not answered within 120 s"
                );
                if let Ok(ch) = channel.connect().await {
                    let mut client = UserServiceClient::new(ch);
                    let asked = Instant::now();
                    let ask = client.user_stats(UserStatsRequest {
                        id: id.clone(),
                        ..Default::default()
                    });
                    if let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(2), ask).await
                    {
                        let purchases = answer.into_inner().total_purchases;
                        return anyhow::Ok((id, asked, purchases));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let answered = futures::future::join_all(asks)
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((Instant::now(), answered))
}

/// A plain group of `members` on the same input: steady, then one more member joins, then
/// leaves.
pub(super) async fn bare_group_gaps(
    setup: &Setup,
    topic: &str,
    members: usize,
) -> anyhow::Result<(Pause, Pause, Pause)> {
    let mut group = BareGroup::new(&setup.bootstrap, topic, SESSION_TIMEOUT_MS);
    let _ends = EndPoller::start(&setup.bootstrap, topic, 128, group.progress.clone(), POLL)?;
    for _ in 0..members {
        group.add_member()?;
    }
    // Joining a new group takes the broker's initial rebalance delay and two cooperative rounds:
    // measure the steady state only once every partition is being consumed.
    let joined = Instant::now() + Duration::from_secs(60);
    while group.progress.lock().expect("progress").partitions_moving() < 128 {
        anyhow::ensure!(
            Instant::now() < joined,
            "the bare group did not consume every partition within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(STEADY).await;
    let t0 = Instant::now();
    let steady = pause(&group.progress, t0 - STEADY + Duration::from_secs(2), t0);
    group.add_member()?;
    tokio::time::sleep(SETTLE + Duration::from_secs(4)).await;
    let join = pause(&group.progress, t0, Instant::now());
    let t0 = Instant::now();
    group.remove_member();
    tokio::time::sleep(SETTLE + Duration::from_secs(4)).await;
    let leave = pause(&group.progress, t0, Instant::now());
    Ok((steady, join, leave))
}
