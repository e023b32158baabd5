//! Processor nodes as separate processes (the release binary), and what the harness reads from
//! them: `/cluster/stats`, `/cluster/shards`, `/metrics`, resident memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

/// Where the cluster under test lives.
#[derive(Clone)]
pub struct Setup {
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    pub bootstrap: String,
}

impl Setup {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Node i uses remoting 29000+i, management 29100+i, gRPC 29200+i: below Linux's ephemeral
/// range (32768 and up), where an outgoing connection's local port took a node's gRPC port
/// once (the node exited: address in use).
pub const PORT_BASE: u16 = 29_000;

/// Session timeout of every node (and of the bare group baseline). Members learn of a rebalance
/// at their next heartbeat (a quarter of it), so with the default 10 s a join costs anything
/// from 0.3 to 3 s depending on the heartbeat phase, for the nodes and the baseline alike; 3 s
/// keeps that noise under 0.75 s.
pub const SESSION_TIMEOUT_MS: u64 = 3_000;

/// A node's endpoints (valid whether or not the process still runs).
#[derive(Clone)]
pub struct NodeAddr {
    pub index: u16,
    pub group: String,
    http: reqwest::Client,
}

pub struct NodeProcess {
    pub addr: NodeAddr,
    /// `None` once stopped or killed.
    child: Mutex<Option<Child>>,
    log: PathBuf,
}

impl std::ops::Deref for NodeProcess {
    type Target = NodeAddr;
    fn deref(&self) -> &NodeAddr {
        &self.addr
    }
}

impl NodeProcess {
    pub fn start(
        setup: &Setup,
        index: u16,
        topic: &str,
        group: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log = setup.log_dir.join(format!("{group}-node{index}.log"));
        let file = std::fs::File::create(&log)?;
        let seeds = format!("127.0.0.1:{},127.0.0.1:{}", PORT_BASE + 1, PORT_BASE + 2);
        let child = Command::new(setup.bin("processor"))
            .args(
                [
                    PORT_BASE + index,
                    PORT_BASE + 100 + index,
                    PORT_BASE + 200 + index,
                ]
                .map(|p| p.to_string()),
            )
            .args([
                "--bootstrap-servers",
                &setup.bootstrap,
                "--topic",
                topic,
                "--group",
                group,
                "--seed-nodes",
                &seeds,
            ])
            .args(["--session-timeout-ms", &SESSION_TIMEOUT_MS.to_string()])
            .args(extra)
            // BENCH_NODE_LOG overrides the nodes' log filter, e.g. with KAFKA_DEBUG for librdkafka's.
            .env(
                "RUST_LOG",
                std::env::var("BENCH_NODE_LOG")
                    .unwrap_or_else(|_| "info,ractor_cluster=error,ractor=warn".into()),
            )
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting the processor binary")?;
        Ok(Self {
            addr: NodeAddr::new(index, group),
            child: Mutex::new(Some(child)),
            log,
        })
    }

    /// Polls until this node (still running) reports assigned partitions; returns when it did.
    pub async fn wait_assigned(&self, within: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            self.ensure_running()?;
            // Not answering yet counts as not assigned yet; the deadline bounds the wait.
            if self.counter("partitions_assigned").await.unwrap_or(0) > 0
                && self.shards().await.is_some_and(|s| !s.is_empty())
            {
                return Ok(Instant::now());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {} was not assigned partitions within {within:?}",
                self.index
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> anyhow::Result<u32> {
        Ok(self
            .child
            .lock()
            .expect("child lock")
            .as_ref()
            .context("node not running")?
            .id())
    }

    /// Resident memory (VmRSS) of the node process.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kib * 1024)
    }

    /// CPU time (user + system) the node process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // After the command name (in parentheses, which may hold spaces): field 3 onwards;
        // utime and stime are fields 14 and 15, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc/<pid>/stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i - 3)
                .context("short /proc/<pid>/stat")?
                .parse::<f64>()?)
        };
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((ticks(14)? + ticks(15)?) / per_second)
    }

    /// The longest "shard N restored: ... in X ms" this node logged, in seconds.
    pub fn longest_logged_restore(&self) -> f64 {
        longest_restore_in(&self.log, 0, "")
    }

    /// Bytes logged so far (to look only at what comes after).
    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// The longest shard restore (seconds) logged after byte `from` whose line contains `with`.
    pub fn longest_logged_restore_since(&self, from: usize, with: &str) -> f64 {
        longest_restore_in(&self.log, from, with)
    }

    /// SIGTERM (graceful hand-off), then wait for the exit.
    /// Fails if the process has exited (e.g. it could not bind its ports), naming its log.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        let mut child = self.child.lock().expect("child lock");
        let Some(running) = child.as_mut() else {
            anyhow::bail!("node {} was stopped", self.index)
        };
        if let Some(status) = running.try_wait()? {
            child.take();
            anyhow::bail!(
                "node {} exited ({status}); see {}",
                self.index,
                self.log.display()
            );
        }
        Ok(())
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.lock().expect("child lock").take() else {
            return Ok(());
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {} did not stop within 60 s",
                self.index
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl NodeAddr {
    pub fn new(index: u16, group: &str) -> Self {
        Self {
            index,
            group: group.into(),
            http: reqwest::Client::new(),
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", PORT_BASE + 200 + self.index)
    }

    async fn get(&self, path: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{}{path}", PORT_BASE + 100 + self.index);
        let response = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())?;
        response.text().await.ok()
    }

    pub async fn stats(&self) -> Option<Value> {
        serde_json::from_str(&self.get("/cluster/stats").await?).ok()
    }

    /// A counter of `/cluster/stats`; `None` when the node does not answer (never a zero that
    /// would pass for a measurement).
    pub async fn counter(&self, name: &str) -> Option<u64> {
        self.stats().await.and_then(|s| s[name].as_u64())
    }

    /// The shards the node hosts; `None` if it does not answer (an empty set would pass for a
    /// node that owns nothing).
    pub async fn shards(&self) -> Option<Vec<u32>> {
        self.stats().await.and_then(|s| {
            s["shards"].as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect()
            })
        })
    }

    /// The shards of a node that must be answering.
    pub async fn owned_shards(&self) -> anyhow::Result<Vec<u32>> {
        self.shards()
            .await
            .ok_or_else(|| anyhow::anyhow!("node {} did not answer /cluster/stats", self.index))
    }

    /// The shards of `group` (an entity type's group) the node owns; `None` if it does not
    /// answer.
    pub async fn shards_of(&self, group: &str) -> Option<Vec<u32>> {
        let regions: Value =
            serde_json::from_str(&self.get(&format!("/cluster/shards/{group}")).await?).ok()?;
        regions["regions"]
            .as_array()?
            .iter()
            .map(|r| r["shardId"].as_str()?.parse().ok())
            .collect()
    }

    /// Per shard: the next offset after what it applied (see `/cluster/shards`).
    pub async fn processed_offsets(&self) -> Option<BTreeMap<u32, i64>> {
        let regions: Value =
            serde_json::from_str(&self.get(&format!("/cluster/shards/{}", self.group)).await?)
                .ok()?;
        Some(
            regions["regions"]
                .as_array()?
                .iter()
                .filter_map(|r| {
                    Some((
                        r["shardId"].as_str()?.parse().ok()?,
                        r["processedOffset"].as_i64()?,
                    ))
                })
                .collect(),
        )
    }

    /// `/metrics` as `metric name -> value`, each metric summed over its series (its
    /// `entity_type` and other labels).
    pub async fn metrics(&self) -> Option<BTreeMap<String, f64>> {
        self.metric_sums(|_| true).await
    }

    /// `/metrics` summed per metric name over the series whose labels contain `label`
    /// (e.g. `path="forwarded"`); `None` if the node does not answer.
    pub async fn metrics_with(&self, label: &str) -> Option<BTreeMap<String, f64>> {
        self.metric_sums(|labels| labels.contains(label)).await
    }

    async fn metric_sums(&self, keep: impl Fn(&str) -> bool) -> Option<BTreeMap<String, f64>> {
        let text = self.get("/metrics").await?;
        let mut sums = BTreeMap::new();
        for (series, value) in text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
        {
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if keep(labels) {
                *sums.entry(name.to_string()).or_insert(0.0) += value;
            }
        }
        Some(sums)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

fn longest_restore_in(log: &Path, from: usize, with: &str) -> f64 {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
    text.lines()
        .filter(|l| l.contains("restored:") && l.contains(with))
        .filter_map(|l| {
            l.rsplit_once(" in ")?
                .1
                .strip_suffix(" ms")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .fold(0.0, f64::max)
        / 1_000.0
}

/// Polls `check` every 20 ms until it gives `Some`, or fails after `within`.
pub async fn wait_until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the producer release binary to completion.
pub fn produce(
    setup: &Setup,
    topic: &str,
    count: u64,
    users: u64,
    rate: u64,
    in_turn: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    run_producer(producer_command(
        setup, topic, count, users, rate, in_turn, None,
    ))?;
    Ok(started.elapsed())
}

/// Runs the producer to its end; fails with its error output if it failed.
fn run_producer(mut command: Command) -> anyhow::Result<()> {
    let out = command.output()?;
    anyhow::ensure!(
        out.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The producer at a steady rate in the background.
pub fn produce_in_background(
    setup: &Setup,
    topic: &str,
    count: u64,
    users: u64,
    rate: u64,
) -> anyhow::Result<Child> {
    Ok(
        producer_command(setup, topic, count, users, rate, false, None)
            .stderr(Stdio::null())
            .spawn()?,
    )
}

fn producer_command(
    setup: &Setup,
    topic: &str,
    count: u64,
    users: u64,
    rate: u64,
    in_turn: bool,
    ledger: Option<&Path>,
) -> Command {
    let mut command = Command::new(setup.bin("producer"));
    command
        .args([
            "--bootstrap-servers",
            &setup.bootstrap,
            "--topic",
            topic,
            "--partitions",
            "128",
        ])
        .args([
            "--count",
            &count.to_string(),
            "--users",
            &users.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .stdout(Stdio::null());
    if in_turn {
        command.arg("--users-in-turn");
    }
    if let Some(ledger) = ledger {
        command.arg("--ledger").arg(ledger);
    }
    command
}

/// Produces `count` events for `users` at full speed and writes their expected totals to
/// `ledger` (for `client verify`).
pub fn produce_with_ledger(
    setup: &Setup,
    topic: &str,
    count: u64,
    users: u64,
    ledger: &Path,
) -> anyhow::Result<()> {
    run_producer(producer_command(
        setup,
        topic,
        count,
        users,
        0,
        false,
        Some(ledger),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_restore_is_read_from_the_log() {
        let path = std::env::temp_dir().join(format!("bench-restore-{}.log", std::process::id()));
        std::fs::write(
            &path,
            "x INFO shard 3 restored: 10 entities from 12 changelog records in 40 ms\n\
             x INFO shard 9 restored: 99 entities from 99 changelog records in 1250 ms\nother line in 7 ms\n\
             x INFO shard 4 restored: 9 entities from 0 changelog records after its standby replica \
             (which had read 9) in 30 ms\n",
        )
        .unwrap();
        assert_eq!(longest_restore_in(&path, 0, ""), 1.25);
        assert_eq!(longest_restore_in(&path, 0, "after its standby"), 0.03);
        let text = std::fs::read_to_string(&path).unwrap();
        let from = text.find("other line").unwrap();
        assert_eq!(
            longest_restore_in(&path, from, ""),
            0.03,
            "only what follows"
        );
        std::fs::remove_file(path).unwrap();
    }
}
