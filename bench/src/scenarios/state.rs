//! Scenarios 4 and 5: restore and memory, with one node holding 1 000 000 users' state.
//!
//! Node A starts on an empty topic (its idle memory is the baseline), processes one event for
//! each of N users (the live-actor cap keeps at most 100 000 actors), and stops gracefully.
//! Node B (same group) then restores all N states from the changelog: its restore rate is
//! compared with a bare read of that changelog, and its memory with N states and no live actor
//! gives the bytes per user. Events for 40 000 of the users (under the cap) then make that many actors live:
//! the memory difference is the cost of a live entity actor.
//!
//! Standby replicas: node C then joins (half the shards move to it) and keeps a standby of every
//! shard node B still owns; once they are at the changelog's end node B stops gracefully and node
//! C restores B's shards from its standbys. Their restore is compared with node B's cold one (a
//! node cannot keep standbys of all of the users and own none: every node is in the group, so the
//! standby set is half of them; the comparison is per user). Node C's memory, with half the users
//! owned and half as standbys, shows what a standby costs.

use std::time::{Duration, Instant};

use crate::kafka::{bare_drain, committed_to_end, end_offsets, StartFrom};
use crate::nodes::{produce, wait_until, NodeProcess, Setup};
use crate::report::{mib, rate, verdict, Table};

const LIVE_ACTORS: u64 = 40_000;
/// How long a node's resident set is given to settle after a burst.
const SETTLE_RSS: Duration = Duration::from_secs(8);
const GIB: u64 = 1 << 30;

pub async fn run(setup: &Setup, topic: &str, users: u64) -> anyhow::Result<(Table, Table)> {
    let group = format!("{topic}-state");
    // Named here (and passed to both nodes) because the baseline reads it directly.
    let changelog = format!("{group}-changelog");
    let changelog_args = ["--changelog-topic", changelog.as_str()];
    // Create the empty topic, then start node A on it.
    produce(setup, topic, 0, 1, 0, false)?;
    let mut node_a = NodeProcess::start(setup, 1, topic, &group, &changelog_args)?;
    node_a.wait_assigned(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = node_a.rss_bytes()?;

    eprintln!("state: one event for each of {users} users");
    produce(setup, topic, users, users, 0, true)?;
    let ends = end_offsets(&setup.bootstrap, topic, 128)?;
    committed_to_end(&setup.bootstrap, &group, topic, &ends).await?;
    let (rss_a_early, rss_a) = settling_rss(&node_a).await?;
    let metrics_a = node_a.metrics().await.unwrap_or_default();
    let live_a = metrics_a
        .get("processor_live_entities")
        .copied()
        .unwrap_or(0.0);
    let stored_a = live_a
        + metrics_a
            .get("processor_passivated_entities")
            .copied()
            .unwrap_or(0.0);
    anyhow::ensure!(
        stored_a as u64 == users,
        "node A holds {stored_a} users' state, not {users}"
    );
    node_a.stop()?;

    eprintln!("state: node B restores {users} users from {changelog}");
    let mut node_b = NodeProcess::start(setup, 2, topic, &group, &changelog_args)?;
    let assigned = node_b.wait_assigned(Duration::from_secs(60)).await?;
    let restored_at = wait_until(
        Duration::from_secs(600),
        "node B to restore every user",
        || async {
            let restored = node_b.counter("entities_restored").await?;
            let metrics = node_b.metrics().await?;
            let shards_done = metrics
                .get("processor_restore_seconds_count")
                .copied()
                .unwrap_or(0.0)
                >= 128.0;
            (restored >= users && shards_done).then(Instant::now)
        },
    )
    .await?;
    let restore_time = (restored_at - assigned).as_secs_f64();
    let restore_rate = users as f64 / restore_time;
    let longest_shard = node_b.longest_logged_restore();

    eprintln!("state: bare read of the changelog (baseline)");
    let changelog_ends = end_offsets(&setup.bootstrap, &changelog, 128)?;
    let (bootstrap, cl, e) = (
        setup.bootstrap.clone(),
        changelog.clone(),
        changelog_ends.clone(),
    );
    let bare = tokio::task::spawn_blocking(move || {
        bare_drain(
            &bootstrap,
            &cl,
            &e,
            StartFrom::KnownOffsets,
            kafka_sharding::CHANGELOG_READER_DEFAULTS,
        )
    })
    .await??;
    let (records, bare_time) = (bare.records, bare.time);
    let bare_rate = records as f64 / bare_time.as_secs_f64();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_b = node_b.rss_bytes()?;
    let live_b = node_b
        .metrics()
        .await
        .unwrap_or_default()
        .get("processor_live_entities")
        .copied()
        .unwrap_or(0.0);

    eprintln!("state: {LIVE_ACTORS} users' actors made live");
    produce(setup, topic, LIVE_ACTORS, LIVE_ACTORS, 0, true)?;
    let ends = end_offsets(&setup.bootstrap, topic, 128)?;
    committed_to_end(&setup.bootstrap, &group, topic, &ends).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_live = node_b.rss_bytes()?;
    let live_after = node_b
        .metrics()
        .await
        .unwrap_or_default()
        .get("processor_live_entities")
        .copied()
        .unwrap_or(0.0);

    eprintln!("state: node C joins and keeps standbys of node B's shards");
    let mut node_c = NodeProcess::start(setup, 3, topic, &group, &changelog_args)?;
    node_c.wait_assigned(Duration::from_secs(60)).await?;
    let standby_users = wait_until(
        Duration::from_secs(600),
        "node C's standbys of node B's shards to reach the changelog's end",
        || async {
            let b_shards = node_b.shards().await?.len() as f64;
            let c_shards = node_c.shards().await?.len() as f64;
            let m = node_c.metrics().await?;
            let standbys = m.get("processor_standby_shards").copied()?;
            let lag = m.get("processor_standby_lag_records").copied()?;
            let restored = m.get("processor_restore_seconds_count").copied()?;
            (b_shards > 0.0
                && standbys == b_shards
                && lag == 0.0
                && restored >= c_shards
                && b_shards + c_shards == 128.0)
                .then(|| m.get("processor_standby_entities").copied())
                .flatten()
        },
    )
    .await?;
    // The standbys' memory settles like any burst's.
    tokio::time::sleep(SETTLE_RSS).await;
    let rss_c = node_c.rss_bytes()?;
    eprintln!("state: node B stops; node C restores its shards from the standbys");
    let from = node_c.log_len();
    node_b.stop()?;
    wait_until(
        Duration::from_secs(300),
        "node C to restore node B's shards",
        || async {
            let m = node_c.metrics().await?;
            (node_c.shards().await?.len() == 128
                && m.get("processor_restore_seconds_count").copied()? >= 128.0)
                .then_some(())
        },
    )
    .await?;
    let standby_restore = node_c.longest_logged_restore_since(from, "after its standby replica");
    let cold_restore = node_c.longest_logged_restore_since(from, "changelog records in");
    anyhow::ensure!(
        cold_restore == 0.0,
        "node C restored some of node B's shards without a standby ({cold_restore} s)"
    );
    node_c.stop()?;

    let mut restore = Table::new(
        &format!("Restore: {users} users' state from the changelog ({records} records in 128 partitions)"),
        &["read", "time", "per second", "× bare read", "target", ""],
    );
    restore.row(vec![
        "bare read_committed read of the changelog (baseline)".into(),
        format!("{:.2} s", bare_time.as_secs_f64()),
        format!("{} records", rate(bare_rate)),
        "1.00".into(),
        "baseline".into(),
        "".into(),
    ]);
    restore.row(vec![
        format!("node B: assignment to every shard live (longest shard {longest_shard:.2} s)"),
        format!("{restore_time:.2} s"),
        format!("{} entities", rate(restore_rate)),
        format!("{:.2}", restore_rate / bare_rate),
        "≥ 0.9 × bare".into(),
        verdict(restore_rate >= 0.9 * bare_rate),
    ]);
    // Per user: node B's longest shard restored all users cold, node C's longest shard the
    // standby set's.
    let cold_per_user = longest_shard / users as f64;
    let standby_per_user = standby_restore / standby_users.max(1.0);
    restore.row(vec![
        format!(
            "node C: {standby_users:.0} users' shards from its standbys (longest shard), against node B's \
             longest shard per user"
        ),
        format!("{standby_restore:.2} s"),
        format!("{:.2} µs per user", standby_per_user * 1e6),
        format!(
            "{:.3} × cold",
            standby_per_user / cold_per_user.max(f64::MIN_POSITIVE)
        ),
        "≤ 0.1 × cold".into(),
        verdict(standby_per_user <= 0.1 * cold_per_user),
    ]);
    restore.note(
        "The bare read assigns the partitions at the offsets it asked first, as the restore \
         does, with the restore's fetch sizes and the changelog readers' librdkafka defaults \
         (`CHANGELOG_READER_DEFAULTS`); it reads after node B's restore.",
    );

    let per_user = rss_b.saturating_sub(idle_rss) as f64 / users as f64;
    let per_actor = rss_live.saturating_sub(rss_b) as f64 / (live_after - live_b).max(1.0);
    let mut memory = Table::new(
        &format!("Memory (resident set, VmRSS) with {users} users"),
        &[
            "node",
            "live actors",
            "RSS",
            "per user / actor",
            "target",
            "",
        ],
    );
    memory.row(vec![
        "node A idle, before any event (baseline)".into(),
        "0".into(),
        mib(idle_rss),
        "".into(),
        "".into(),
        "".into(),
    ]);
    let memory_target = memory_target(users);
    memory.row(vec![
        format!(
            "node A after processing {users} users (default live-actor cap; {} 2 s after the end)",
            mib(rss_a_early)
        ),
        format!("{live_a:.0}"),
        mib(rss_a),
        format!(
            "{:.0} B/user (incl. actors)",
            rss_a.saturating_sub(idle_rss) as f64 / users as f64
        ),
        memory_target.1.into(),
        verdict(rss_a <= memory_target.0),
    ]);
    memory.row(vec![
        format!("node B with {users} users restored"),
        format!("{live_b:.0}"),
        mib(rss_b),
        format!("{per_user:.0} B/user"),
        memory_target.1.into(),
        verdict(rss_b <= memory_target.0),
    ]);
    memory.row(vec![
        format!("node B after events for {LIVE_ACTORS} users"),
        format!("{live_after:.0}"),
        mib(rss_live),
        format!("{per_actor:.0} B per live actor"),
        "".into(),
        "".into(),
    ]);
    memory.row(vec![
        format!("node C: the other users owned, {standby_users:.0} as standby replicas"),
        "".into(),
        mib(rss_c),
        format!(
            "{:.0} B/user held, owned or standby",
            rss_c.saturating_sub(idle_rss) as f64 / users as f64
        ),
        "".into(),
        "".into(),
    ]);
    memory.note(format!(
        "Per user = (RSS − idle RSS) ÷ users; per live actor = RSS growth ÷ actors made live, in the same process. \
         Node A's RSS is taken once it has settled ({} s after its offsets reached the end): right after a burst of \
         passivations the allocator still holds the passivated entities' memory until the node's periodic release of it.",
        SETTLE_RSS.as_secs()
    ));
    Ok((restore, memory))
}

/// The node's RSS 2 s after now, and after [`SETTLE_RSS`].
async fn settling_rss(node: &NodeProcess) -> anyhow::Result<(u64, u64)> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let early = node.rss_bytes()?;
    tokio::time::sleep(SETTLE_RSS - Duration::from_secs(2)).await;
    Ok((early, node.rss_bytes()?))
}

/// A node's memory target with `users` users' state: 1 GiB up to a million users, 1.5 GiB
/// (about 150 B/user) for ten million (issue 18).
fn memory_target(users: u64) -> (u64, &'static str) {
    if users > 1_000_000 {
        (3 * GIB / 2, "≤ 1.5 GiB")
    } else {
        (GIB, "≤ 1 GiB")
    }
}
