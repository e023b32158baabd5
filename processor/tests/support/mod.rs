//! Shared test support: a real Kafka broker (started by `scripts/kafka`), processor nodes as
//! separate OS processes, the producer and client binaries, and broker-side views (group
//! assignment, topic contents) to check the nodes against.
#![allow(dead_code)]

pub mod bank;
pub mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A client for metadata and group descriptions (it never joins a group).
fn metadata_client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap()
}

/// Fails loudly when no broker is reachable: these tests need the real one.
pub fn require_broker() {
    let consumer = metadata_client(&bootstrap());
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "no Kafka broker at {} ({e}). Start the real broker with `scripts/kafka start` \
             (or run `scripts/test`, which does).",
            bootstrap()
        );
    }
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!("{prefix}-{t}-{}-{n}", std::process::id())
}

/// A sibling binary of the workspace (built by `cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let processor = PathBuf::from(env!("CARGO_BIN_EXE_processor"));
    let path = processor.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace`, which `scripts/test` does)",
        path.display()
    );
    path
}

pub fn log_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("logs")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Where a cluster under test lives: topic, group and the nodes' port block.
#[derive(Clone)]
pub struct ClusterSpec {
    pub name: String,
    pub topic: String,
    pub group: String,
    /// Node i (1-based) uses remoting base+i, management base+100+i, gRPC base+200+i; give
    /// each test its own block of 1000 ports.
    pub port_base: u16,
    pub seeds: Vec<u16>,
    /// The host the seeds are given with (`127.0.0.1`; `localhost` tests DNS names).
    pub seed_host: String,
    pub extra_args: Vec<String>,
    /// Every node's Kafka session timeout.
    pub session_timeout_ms: u32,
    /// Environment of every node, after the default `RUST_LOG` (a later one wins).
    pub extra_env: Vec<(String, String)>,
    /// Options of every producer run after the cluster's own (`-X` for a secured broker).
    pub producer_args: Vec<String>,
    /// The brokers this cluster uses (the shared test broker unless a test starts its own).
    pub bootstrap: String,
    /// The node binary (a sibling of `processor`), taking the processor's node options,
    /// `--topic` and `--group`.
    pub program: String,
    /// Hosts of their own for the nodes (node i in network namespace i, at its own address),
    /// instead of all on 127.0.0.1: links between them can then be cut.
    pub network: Option<Arc<netns::Network>>,
}

impl ClusterSpec {
    pub fn new(name: &str, port_base: u16) -> Self {
        // Linux hands out 32768-60999 to outgoing connections: a node port there can be taken
        // by any client socket of the moment (a node failed to bind 34102 that way in CI).
        assert!(
            port_base + 300 < 32_768,
            "port base {port_base} reaches into the ephemeral port range"
        );
        Self {
            name: name.into(),
            topic: unique(&format!("{name}-events")),
            group: unique(&format!("{name}-group")),
            port_base,
            seeds: vec![port_base + 1, port_base + 2],
            seed_host: "127.0.0.1".into(),
            extra_args: Vec::new(),
            session_timeout_ms: 6_000,
            extra_env: Vec::new(),
            producer_args: Vec::new(),
            bootstrap: bootstrap(),
            program: "processor".into(),
            network: None,
        }
    }

    /// The same cluster on the brokers of `broker`.
    pub fn on(mut self, broker: &Broker) -> Self {
        self.bootstrap = broker.bootstrap();
        self
    }

    pub fn remoting(&self, i: u16) -> u16 {
        self.port_base + i
    }
    pub fn management(&self, i: u16) -> u16 {
        self.port_base + 100 + i
    }
    pub fn grpc(&self, i: u16) -> u16 {
        self.port_base + 200 + i
    }
    /// The address node `i` is reached at.
    pub fn host(&self, i: u16) -> String {
        match &self.network {
            Some(network) => network.address(i),
            None => "127.0.0.1".into(),
        }
    }
    pub fn grpc_url(&self, i: u16) -> String {
        format!("http://{}:{}", self.host(i), self.grpc(i))
    }
    pub fn node_id(&self, i: u16) -> String {
        format!("processor-{}@{}", self.remoting(i), self.host(i))
    }

    pub fn start_node(&self, i: u16) -> Node {
        self.start_node_with(i, &[])
    }

    /// Starts node `i` with `args` after the cluster's own (an option may be given once).
    pub fn start_node_with(&self, i: u16, args: &[&str]) -> Node {
        let log_path = log_dir(&self.name).join(format!("node{i}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        // The file keeps every run's output (a restart of node `i` appends); this process's
        // part starts here, so an earlier run's lines never satisfy this one's assertions.
        let log_from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|p| match &self.network {
                Some(_) => format!("{}:{p}", self.host(p - self.port_base)),
                None => format!("{}:{p}", self.seed_host),
            })
            .collect();
        let mut command = match &self.network {
            Some(network) => {
                let mut command = network.command(i, &bin(&self.program));
                // Off loopback a node needs a cookie of its own (the default is refused).
                command.args(["--host", &self.host(i), "--cookie", "netns-test-cookie"]);
                command
            }
            None => Command::new(bin(&self.program)),
        };
        let child = command
            .args([self.remoting(i), self.management(i), self.grpc(i)].map(|p| p.to_string()))
            .args([
                "--bootstrap-servers",
                &self.bootstrap,
                "--topic",
                &self.topic,
                "--group",
                &self.group,
            ])
            .args([
                "--seed-nodes",
                &seeds.join(","),
                "--session-timeout-ms",
                &self.session_timeout_ms.to_string(),
            ])
            .args(&self.extra_args)
            .args(args)
            .env("RUST_LOG", "info,ractor_cluster=error,ractor=warn")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        Node {
            index: i,
            child: Some(child),
            management: self.management(i),
            host: self.host(i),
            log_path,
            log_from,
            id: self.node_id(i),
        }
    }

    /// Creates the topic through the producer (its normal path) without producing.
    pub fn create_topic(&self, partitions: u32) {
        let out = Command::new(bin("producer"))
            .args([
                "--bootstrap-servers",
                &self.bootstrap,
                "--topic",
                &self.topic,
            ])
            .args(["--partitions", &partitions.to_string(), "--count", "0"])
            .args(&self.producer_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "producer could not create the topic: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs the producer to completion at full speed and returns the ledger path.
    pub fn produce(&self, count: u64, users: u64, ledger_name: &str) -> PathBuf {
        let ledger = log_dir(&self.name).join(ledger_name);
        let out = self
            .producer(count, users, 0, &ledger)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "producer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ledger
    }

    /// The producer binary for this cluster's topic: `count` events for `users` users at `rate`
    /// per second (0: full speed), their totals written to `ledger`.
    fn producer(&self, count: u64, users: u64, rate: u32, ledger: &Path) -> Command {
        let mut command = Command::new(bin("producer"));
        command
            .args([
                "--bootstrap-servers",
                &self.bootstrap,
                "--topic",
                &self.topic,
            ])
            .args(["--count", &count.to_string(), "--users", &users.to_string()])
            .args([
                "--rate",
                &rate.to_string(),
                "--ledger",
                ledger.to_str().unwrap(),
            ])
            .args(&self.producer_args);
        command
    }
}

/// A producer running in the background at a steady rate.
pub struct BackgroundProducer {
    child: Child,
    pub ledger: PathBuf,
}

impl BackgroundProducer {
    pub fn finished(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    pub fn wait(mut self) -> PathBuf {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "producer failed: {status}");
        self.ledger
    }
}

impl ClusterSpec {
    pub fn produce_in_background(
        &self,
        count: u64,
        users: u64,
        rate: u32,
        ledger_name: &str,
    ) -> BackgroundProducer {
        let ledger = log_dir(&self.name).join(ledger_name);
        let log =
            std::fs::File::create(log_dir(&self.name).join(format!("{ledger_name}.producer.log")))
                .unwrap();
        let child = self
            .producer(count, users, rate, &ledger)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        BackgroundProducer { child, ledger }
    }
}

pub struct Node {
    pub index: u16,
    child: Option<Child>,
    pub management: u16,
    /// The address its ports listen on.
    pub host: String,
    pub log_path: PathBuf,
    /// Where this process's output starts in the log file.
    log_from: u64,
    pub id: String,
}

impl Node {
    pub async fn get_json(&self, path: &str) -> Option<Value> {
        get_status_at(&self.host, self.management, path)
            .await
            .map(|(_, body)| body)
    }

    pub async fn stats(&self) -> Option<Value> {
        self.get_json("/cluster/stats").await
    }

    /// The shards the node hosts. An unreachable node fails the test: an empty set would let
    /// `assert!(node.shards().await.is_empty())` pass against a dead node.
    pub async fn shards(&self) -> BTreeSet<u32> {
        self.try_shards()
            .await
            .unwrap_or_else(|| panic!("node {} did not answer /cluster/stats", self.id))
    }

    /// The shards the node hosts, or `None` while it does not answer (for waits on a node that
    /// is starting).
    pub async fn try_shards(&self) -> Option<BTreeSet<u32>> {
        self.stats().await.and_then(|s| {
            s["shards"].as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect()
            })
        })
    }

    /// The sum of the series of metric `name` whose labels contain `label` (e.g.
    /// `transport="link"`); panics when `/metrics` does not answer (never a passing zero).
    pub async fn metric_sum(&self, name: &str, label: &str) -> f64 {
        let prefix = format!("{name}{{");
        self.metrics()
            .await
            .unwrap_or_else(|| panic!("/metrics of node {} does not answer", self.index))
            .iter()
            .filter(|(series, _)| series.starts_with(&prefix) && series.contains(label))
            .map(|(_, v)| v)
            .sum()
    }

    /// `GET /metrics`, parsed: `name{labels}` -> value (labels as the node printed them).
    pub async fn metrics(&self) -> Option<BTreeMap<String, f64>> {
        let url = format!("http://{}:{}/metrics", self.host, self.management);
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let text = response.text().await.ok()?;
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ')?;
            samples.insert(series.to_string(), value.parse().ok()?);
        }
        Some(samples)
    }

    /// A counter of `/cluster/stats`. An unreachable node or a missing counter fails the test
    /// (a zero would let an assertion about a dead node pass).
    pub async fn counter(&self, name: &str) -> u64 {
        let stats = self
            .stats()
            .await
            .unwrap_or_else(|| panic!("node {} did not answer /cluster/stats", self.id));
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("node {} has no counter {name}: {stats}", self.id))
    }

    /// What this node process has written so far (not earlier runs in the same file).
    pub fn log(&self) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        let from = (self.log_from as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("node already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGSTOP / SIGCONT: a node that stops responding, then resumes (a zombie).
    pub fn freeze(&self) {
        unsafe_kill(self.child.as_ref().expect("node stopped").id(), "STOP");
    }
    pub fn thaw(&self) {
        unsafe_kill(self.child.as_ref().expect("node stopped").id(), "CONT");
    }

    /// Every thread's stack of the running node (via gdb, when installed), for diagnosing a stall.
    pub fn thread_dump(&self) -> String {
        let Some(child) = self.child.as_ref() else {
            return "node not running".into();
        };
        match Command::new("gdb")
            .args([
                "-p",
                &child.id().to_string(),
                "-batch",
                "-ex",
                "thread apply all bt 12",
            ])
            .output()
        {
            Ok(out) => String::from_utf8_lossy(&out.stdout).to_string(),
            Err(e) => format!("no gdb: {e}"),
        }
    }

    /// Waits (up to `within`) for the node to exit by itself; its exit code.
    pub fn exit_code_within(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("node already stopped");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("node {} did not exit within {within:?}", self.index);
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node already stopped");
        unsafe_kill(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not stop within 60 s",
                self.index
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `client verify` through one node (`--via-addr`: the node itself answers for every user,
/// forwarding to owners, as with a client that does not route by owner); returns (success,
/// output).
pub fn verify(grpc_url: &str, ledger: &Path) -> (bool, String) {
    verify_with(grpc_url, ledger, &[])
}

/// [`verify`] with more `client` options (e.g. `--tls-ca`).
pub fn verify_with(grpc_url: &str, ledger: &Path, options: &[&str]) -> (bool, String) {
    let out = Command::new(bin("client"))
        .args(["--addr", grpc_url, "--via-addr"])
        .args(options)
        .args(["verify", "--ledger", ledger.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.success(), output_text(&out))
}

/// What a finished command printed, stdout then stderr.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `client get ID --json` through one node (`--via-addr`, as [`verify`]): (purchases,
/// amount_spent).
pub fn totals_via(grpc_url: &str, user: &str) -> Option<(i64, i64)> {
    let out = Command::new(bin("client"))
        .args(["--addr", grpc_url, "--via-addr", "get", user, "--json"])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["purchases"].as_i64()?, v["amount_spent"].as_i64()?))
}

/// The broker's view of a consumer group: client.id -> assigned partitions of `topic`.
pub fn group_assignment(group: &str, topic: &str) -> BTreeMap<String, BTreeSet<u32>> {
    group_assignment_at(&bootstrap(), group, topic)
}

pub fn group_assignment_at(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> BTreeMap<String, BTreeSet<u32>> {
    let consumer = metadata_client(bootstrap);
    let list = consumer
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .unwrap();
    let mut by_client = BTreeMap::new();
    for g in list.groups() {
        for member in g.members() {
            let partitions = member
                .assignment()
                .map(|a| decode_assignment(a, topic))
                .unwrap_or_default();
            by_client.insert(member.client_id().to_string(), partitions);
        }
    }
    by_client
}

/// Decodes Kafka's ConsumerProtocolAssignment: version, [topic, [partition]], user data.
fn decode_assignment(bytes: &[u8], topic: &str) -> BTreeSet<u32> {
    let mut pos = 0usize;
    let mut take = |n: usize| {
        let s = &bytes[pos..pos + n];
        pos += n;
        s
    };
    let mut out = BTreeSet::new();
    if bytes.len() < 6 {
        return out;
    }
    let _version = i16::from_be_bytes(take(2).try_into().unwrap());
    let topics = i32::from_be_bytes(take(4).try_into().unwrap());
    for _ in 0..topics {
        let len = i16::from_be_bytes(take(2).try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(take(len)).to_string();
        let count = i32::from_be_bytes(take(4).try_into().unwrap());
        for _ in 0..count {
            let p = i32::from_be_bytes(take(4).try_into().unwrap());
            if name == topic {
                out.insert(p as u32);
            }
        }
    }
    out
}

pub fn partition_count(topic: &str) -> u32 {
    partition_count_at(&bootstrap(), topic)
}

pub fn partition_count_at(bootstrap: &str, topic: &str) -> u32 {
    topic_partitions(bootstrap, topic).len() as u32
}

/// The replica count of `topic`'s first partition.
pub fn replication_factor_at(bootstrap: &str, topic: &str) -> usize {
    topic_partitions(bootstrap, topic)[0].1
}

/// `topic`'s configuration as the broker describes it (every key, defaults included).
pub async fn topic_config_at(bootstrap: &str, topic: &str) -> BTreeMap<String, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    let resource = described
        .into_iter()
        .next()
        .unwrap()
        .unwrap_or_else(|e| panic!("describing topic {topic}: {e}"));
    resource
        .entries
        .into_iter()
        .filter_map(|entry| Some((entry.name, entry.value?)))
        .collect()
}

/// `topic`'s partitions, each with its replica count.
fn topic_partitions(bootstrap: &str, topic: &str) -> Vec<(i32, usize)> {
    let consumer = metadata_client(bootstrap);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), p.replicas().len()))
        .collect()
}

/// One record read back: (partition, offset, key, headers).
pub type ReadRecord = (u32, i64, Option<Vec<u8>>, Vec<(String, String)>);

/// Every committed record of a topic (read_committed, to each partition's high watermark: a
/// topic written in transactions holds control markers and aborted records besides records).
pub fn read_topic(topic: &str) -> Vec<ReadRecord> {
    read_topic_at(&bootstrap(), topic)
}

pub fn read_topic_at(bootstrap: &str, topic: &str) -> Vec<ReadRecord> {
    read_committed(bootstrap, topic, |m| {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        (
            m.partition() as u32,
            m.offset(),
            m.key().map(|k| k.to_vec()),
            headers,
        )
    })
}

/// A record's key and value.
pub type KeyValue = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Every committed record's key and value, on the brokers at `bootstrap`.
pub fn read_topic_values_at(bootstrap: &str, topic: &str) -> Vec<KeyValue> {
    read_committed(bootstrap, topic, |m| {
        (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec))
    })
}

/// Every committed record's key and timestamp (ms since the epoch).
pub fn read_topic_timed(topic: &str) -> Vec<(Option<Vec<u8>>, i64)> {
    read_committed(&bootstrap(), topic, |m| {
        (
            m.key().map(|k| k.to_vec()),
            m.timestamp().to_millis().unwrap_or(-1),
        )
    })
}

/// Every committed record of a topic, as `read` makes of it (see [`read_topic`]).
fn read_committed<T>(
    bootstrap: &str,
    topic: &str,
    read: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
) -> Vec<T> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return records;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            records.push(read(&m));
            continue;
        }
        let positions = consumer.position().unwrap();
        let done = ends.iter().all(|(p, end)| {
            positions
                .find_partition(topic, *p)
                .and_then(|e| e.offset().to_raw())
                .is_some_and(|pos| pos >= *end)
        });
        if done {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "could not read all of topic {topic}"
        );
    }
}

/// Waits until every node owns some partitions and together they own each of `partitions` once.
pub async fn wait_for_split(nodes: &[&Node], partitions: u32) -> Vec<BTreeSet<u32>> {
    eventually(
        Duration::from_secs(60),
        &format!("{} nodes to split {partitions} partitions", nodes.len()),
        || async {
            let mut sets = Vec::new();
            for node in nodes {
                sets.push(node.try_shards().await?);
            }
            let total: usize = sets.iter().map(BTreeSet::len).sum();
            let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
            let split = total == partitions as usize
                && union.len() == total
                && sets.iter().all(|s| !s.is_empty());
            split.then_some(sets)
        },
    )
    .await
}

/// Waits until every user's totals through each of `nodes` equal `ledger`; on timeout, fails
/// with the report's summary and the wrong users grouped by partition (a stalled partition
/// looks different from lost events).
pub async fn wait_for_ledger(spec: &ClusterSpec, nodes: &[u16], ledger: &Path, within: Duration) {
    for &i in nodes {
        let url = spec.grpc_url(i);
        let deadline = Instant::now() + within;
        loop {
            let (ok, report) = verify(&url, ledger);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "totals through node {i} never equalled the ledger within {within:?}; {}",
                describe_mismatches(spec, &report)
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn describe_mismatches(spec: &ClusterSpec, report: &str) -> String {
    let partitions = partition_count_at(&spec.bootstrap, &spec.topic);
    let mut by_partition: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for line in report
        .lines()
        .filter(|l| l.starts_with("MISMATCH") || l.starts_with("ERROR"))
    {
        let user = line
            .split_whitespace()
            .nth(2)
            .unwrap_or("")
            .trim_end_matches(':');
        let p = kafka_sharding::partitioner::partition_for_key(user.as_bytes(), partitions);
        by_partition.entry(p).or_default().push(line);
    }
    let mut out = format!(
        "{}\nwrong users by partition:",
        report.lines().last().unwrap_or("")
    );
    for (p, lines) in by_partition {
        out.push_str(&format!(
            "\n  partition {p}: {} users, e.g. {}",
            lines.len(),
            lines[0]
        ));
    }
    out
}

/// The ledgers of several producer runs as one, saved as `name` in the test's log dir.
pub fn merge_ledgers(spec: &ClusterSpec, ledgers: &[&Path], name: &str) -> PathBuf {
    let mut merged = proto::ledger::Ledger::load(ledgers[0]).unwrap();
    for l in &ledgers[1..] {
        merged.merge(&proto::ledger::Ledger::load(l).unwrap());
    }
    let path = log_dir(&spec.name).join(name);
    merged.save(&path).unwrap();
    path
}

/// Brokers of a test's own (fault tests stop and kill them), started by `scripts/kafka` on
/// `port` (broker N on port + 10*(N-1)) with a fresh data dir, wiped when dropped.
pub struct Broker {
    /// The address its client listener binds and advertises (`KAFKA_HOST`).
    host: String,
    port: u16,
    brokers: u8,
    data_dir: PathBuf,
    /// The SASL_SSL (SCRAM-SHA-512) client listener of broker 1, when asked for.
    sasl_ssl_port: Option<u16>,
}

impl Broker {
    pub fn start(port: u16, brokers: u8) -> Self {
        Self::start_with(port, brokers, None)
    }

    /// One broker that also listens with SASL_SSL (SCRAM-SHA-512, user `app` / `app-secret`,
    /// a self-signed certificate: [`Broker::ca_file`]) on `sasl_ssl_port`.
    pub fn start_secured(port: u16, sasl_ssl_port: u16) -> Self {
        Self::start_with(port, 1, Some(sasl_ssl_port))
    }

    /// One broker listening for clients on `host` (e.g. a bridge's address, for nodes in
    /// network namespaces).
    pub fn start_on(host: &str, port: u16) -> Self {
        Self::start_at(host, port, 1, None)
    }

    fn start_with(port: u16, brokers: u8, sasl_ssl_port: Option<u16>) -> Self {
        Self::start_at("127.0.0.1", port, brokers, sasl_ssl_port)
    }

    fn start_at(host: &str, port: u16, brokers: u8, sasl_ssl_port: Option<u16>) -> Self {
        let data_dir = PathBuf::from(format!("/tmp/kafka-sharding-fault-tests-{port}"));
        let broker = Self {
            host: host.into(),
            port,
            brokers,
            data_dir,
            sasl_ssl_port,
        };
        broker.script(&["wipe"]);
        broker.script(&["start"]);
        broker
    }

    /// The SASL_SSL listener's address.
    pub fn secured_bootstrap(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.sasl_ssl_port.expect("not a secured broker")
        )
    }

    /// The PEM certificate clients trust (`ssl.ca.location`).
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    pub fn bootstrap(&self) -> String {
        (0..self.brokers)
            .map(|i| format!("{}:{}", self.host, self.port + 10 * i as u16))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGTERM to every broker, waiting until they are gone.
    pub fn stop(&self) {
        self.script(&["stop"]);
    }

    /// Starts every broker again on the same data.
    pub fn restart(&self) {
        self.script(&["start"]);
    }

    /// SIGKILL to broker `n` (1-based, its node.id).
    pub fn kill_broker(&self, n: u8) {
        self.script(&["kill-broker", &n.to_string()]);
    }

    pub fn start_broker(&self, n: u8) {
        self.script(&["start-broker", &n.to_string()]);
    }

    fn script(&self, args: &[&str]) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka");
        let out = Command::new(script)
            .args(args)
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_HOST", &self.host)
            .env("KAFKA_BROKERS", self.brokers.to_string())
            .env("KAFKA_DATA_DIR", &self.data_dir)
            .env(
                "KAFKA_SASL_SSL_PORT",
                self.sasl_ssl_port
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            )
            .output()
            .expect("cannot run scripts/kafka");
        assert!(
            out.status.success() || args == ["wipe"],
            "scripts/kafka {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.script(&["wipe"]);
    }
}

/// The broker (node.id) that coordinates `group`: the leader of its `__consumer_offsets`
/// partition, `abs(javaHashCode(group)) % partitions` as Kafka's GroupCoordinator computes it.
pub fn group_coordinator(bootstrap: &str, group: &str) -> i32 {
    let consumer = metadata_client(bootstrap);
    let metadata = consumer
        .fetch_metadata(Some("__consumer_offsets"), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions();
    assert!(
        !partitions.is_empty(),
        "__consumer_offsets has no partitions yet"
    );
    let hash = group
        .encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    let abs = if hash == i32::MIN { 0 } else { hash.abs() };
    let index = abs % partitions.len() as i32;
    partitions
        .iter()
        .find(|p| p.id() == index)
        .unwrap()
        .leader()
}

/// The lines librdkafka printed itself (`%3|1796489189.876|FAIL|rdkafka#consumer-16| ...`)
/// since byte `from` of a node's log: a client whose log lines bypass the node's logger and its
/// rate limits (an outage then floods the log).
pub fn librdkafka_prints_since(log: &str, from: usize) -> Vec<String> {
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() > 3 && b[0] == b'%' && b[1].is_ascii_digit() && b[2] == b'|'
        })
        .map(str::to_string)
        .collect()
}

/// WARN and ERROR lines of a node's log from byte `from` on.
pub fn warnings_since(log: &str, from: usize) -> Vec<String> {
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

/// `GET path` on a node's management port: (status, JSON body).
pub async fn get_status(management: u16, path: &str) -> Option<(u16, Value)> {
    get_status_at("127.0.0.1", management, path).await
}

/// [`get_status`] of a node listening on `host`.
pub async fn get_status_at(host: &str, management: u16, path: &str) -> Option<(u16, Value)> {
    let url = format!("http://{host}:{management}{path}");
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// The gRPC health status of the whole server ("") through `grpc_url`.
/// grpc.health.v1 ServingStatus values.
pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;

/// Asserts that `node`, refused by the cluster, stays out of it: still running (it retries),
/// `/ready` 503 saying it is not admitted, gRPC health NOT_SERVING, no session authenticated,
/// no shards, and absent from the group's assignment.
pub async fn assert_refused(spec: &ClusterSpec, node: &mut Node) {
    assert!(
        node.is_running(),
        "refused node {} keeps retrying",
        node.index
    );
    let (status, body) = get_status(node.management, "/ready")
        .await
        .expect("the refused node serves /ready");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reasons"].to_string().contains("not admitted"),
        "{body}"
    );
    assert_eq!(
        grpc_health(&spec.grpc_url(node.index)).await,
        Some(NOT_SERVING)
    );
    assert!(
        !node.log().contains("connected to seed node"),
        "no session of refused node {} was authenticated",
        node.index
    );
    assert!(node.shards().await.is_empty());
    let assignment = group_assignment(&spec.group, &spec.topic);
    assert!(
        !assignment.contains_key(&node.id),
        "refused node {} is not in the group: {assignment:?}",
        node.index
    );
}

/// Asks for `user`'s totals through `grpc_url` allowing `max_staleness_ms`, and asserts that a
/// standby replica answered them exactly as `ledger` has them; returns the answer (for its lag).
pub async fn assert_standby_answers(
    grpc_url: &str,
    user: &str,
    max_staleness_ms: u64,
    ledger: &proto::ledger::Ledger,
) -> proto::service::UserStatsResponse {
    let mut client =
        proto::service::user_service_client::UserServiceClient::connect(grpc_url.to_string())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {grpc_url}: {e}"));
    let answer = client
        .user_stats(proto::service::UserStatsRequest {
            id: user.to_string(),
            max_staleness_ms: Some(max_staleness_ms),
        })
        .await
        .unwrap_or_else(|s| panic!("user {user} via {grpc_url}: {s}"))
        .into_inner();
    let want = ledger.expected(user);
    assert_eq!(
        (
            answer.answered_by.as_str(),
            answer.total_purchases,
            answer.amount_spent
        ),
        ("standby", want.purchases, want.amount_spent),
        "user {user} via {grpc_url}"
    );
    answer
}

pub async fn grpc_health(grpc_url: &str) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(grpc_url.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

/// A certificate authority made at test time, and node certificates it signs (PEM files for
/// `--tls-cert`, `--tls-key`, `--tls-ca`).
pub struct NodeCa {
    dir: PathBuf,
    name: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl NodeCa {
    /// A CA called `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let issuer = rcgen::CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap())
            .expect("a self-signed CA");
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).unwrap();
        Self {
            dir: dir.to_path_buf(),
            name: name.into(),
            issuer,
        }
    }

    /// The CA's certificate (what clients of a node serving TLS trust).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// The node options for a certificate this CA signs for 127.0.0.1 and localhost.
    pub fn node_args(&self, node: &str) -> Vec<String> {
        use rcgen::{CertificateParams, KeyPair};
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (cert_path, key_path, ca_path) = (
            self.dir.join(format!("{}-{node}.pem", self.name)),
            self.dir.join(format!("{}-{node}.key", self.name)),
            self.ca_file(),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        [
            ("--tls-cert", cert_path),
            ("--tls-key", key_path),
            ("--tls-ca", ca_path),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
    }
}

/// The answer of a node's generic routes (`POST /entities/..` and `Entities/Ask`): the reply
/// bytes and the route, or the error (HTTP status or gRPC code name, and the message).
pub type GenericAnswer = Result<(Vec<u8>, String), (String, String)>;

/// Asks entity `id` of `entity_type` through node `management`'s `POST /entities/<type>/<id>`
/// with the real curl, the query bytes as the body.
pub fn curl_ask(management: u16, entity_type: &str, id: &str, query: &[u8]) -> GenericAnswer {
    let dir = std::env::temp_dir();
    let body = dir.join(unique("curl-body"));
    let query_file = dir.join(unique("curl-query"));
    std::fs::write(&query_file, query).unwrap();
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o"])
        .arg(&body)
        .arg("--data-binary")
        .arg(format!("@{}", query_file.display()))
        .arg(format!(
            "http://127.0.0.1:{management}/entities/{entity_type}/{id}"
        ))
        .output()
        .expect("curl runs (scripts/test needs it)");
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let bytes = std::fs::read(&body).unwrap_or_default();
    let _ = (
        std::fs::remove_file(&body),
        std::fs::remove_file(&query_file),
    );
    let status = headers
        .split_whitespace()
        .nth(1)
        .unwrap_or("no status")
        .to_string();
    if status != "200" {
        return Err((status, String::from_utf8_lossy(&bytes).into_owned()));
    }
    let route = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-route: "))
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((bytes, route))
}

/// The grpcurl binary: on PATH or where `go install` puts it (`.ci/run` installs it).
pub fn grpcurl() -> PathBuf {
    let on_path = Command::new("sh")
        .args([
            "-c",
            "command -v grpcurl || echo \"$(go env GOPATH)/bin/grpcurl\"",
        ])
        .output()
        .expect("sh runs");
    let path = PathBuf::from(String::from_utf8_lossy(&on_path.stdout).trim());
    assert!(
        path.exists(),
        "grpcurl is missing: install it with `go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4` (.ci/run does)"
    );
    path
}

/// Asks entity `id` of `entity_type` through node `grpc_port`'s `Entities/Ask` with the real
/// grpcurl, which learns the service by reflection.
pub fn grpcurl_ask(grpc_port: u16, entity_type: &str, id: &str, query: &[u8]) -> GenericAnswer {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let request = serde_json::json!({
        "entity_type": entity_type,
        "id": id,
        "query": engine.encode(query),
    });
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-format-error", "-d"])
        .arg(request.to_string())
        .arg(format!("127.0.0.1:{grpc_port}"))
        .arg("kafka_sharding.entities.v1.Entities/Ask")
        .output()
        .expect("grpcurl runs");
    if !out.status.success() {
        // With -format-error, the status as JSON on stderr: the code is a number (3
        // INVALID_ARGUMENT, 5 NOT_FOUND).
        let status: Value = serde_json::from_slice(&out.stderr).unwrap_or(Value::Null);
        return Err((
            status["code"].to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let reply = engine
        .decode(answer["reply"].as_str().unwrap_or_default())
        .expect("base64 reply");
    Ok((reply, answer["route"].as_str().unwrap_or("").to_string()))
}
