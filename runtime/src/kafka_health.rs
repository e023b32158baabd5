//! Whether Kafka can be reached, said once per outage instead of once per client per broker per
//! retry, and what a node cannot recover from by itself.
//!
//! Every Kafka client the node creates (consumer, checkpoint producer, restorer, offset and
//! admin clients) uses a [`QuietContext`] sharing one [`KafkaHealth`]. librdkafka reports a lost
//! broker from every client and every retry (about 200 identical `AllBrokersDown` lines within a
//! millisecond were measured on a node), and also when a client is closed, so a client's
//! connection errors are only debug lines: [`KafkaHealth::monitor`] is the one judge. It probes
//! the cluster once a second and logs an outage three ways only:
//! when it starts, as a reminder every [`REMINDER_EVERY`] while it lasts, and when it ends. Other
//! librdkafka warnings are rate-limited per kind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::kafka_config::{ClientKind, KafkaConnection};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::ProducerContext;
use rdkafka::types::RDKafkaErrorCode;

/// How often an ongoing outage is mentioned again.
pub const REMINDER_EVERY: Duration = Duration::from_secs(10);
/// How often the monitor asks the cluster for metadata.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The same librdkafka warning is logged at most once in this window.
const SAME_WARNING_EVERY: Duration = Duration::from_secs(30);
/// How often [`serve_idle_clients`] hands their waiting log lines and errors on.
const SERVE_IDLE_EVERY: Duration = Duration::from_secs(1);

/// Problems a restart cannot fix: the node exits with a distinct code and says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrecoverable {
    #[error("Kafka refused this node's credentials or permissions ({0}): fix the client's credentials or the ACLs")]
    NotAuthorized(String),
    #[error("input topic {0} was deleted: recreate it (with the same partition count) and restart the nodes")]
    TopicDeleted(String),
    #[error(
        "input topic {topic} now has {now} partitions, but this node started with {was}: keys now hash to other \
         partitions than the shards their state is in; restart every node to realign"
    )]
    PartitionsChanged { topic: String, was: u32, now: u32 },
}

impl Unrecoverable {
    /// The process exit code for this cause (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotAuthorized(_) => 3,
            Self::TopicDeleted(_) => 4,
            Self::PartitionsChanged { .. } => 5,
        }
    }
}

/// Whether a librdkafka error means the broker cannot be reached (as opposed to refused us).
pub fn is_connectivity(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        AllBrokersDown
            | BrokerTransportFailure
            | Resolve
            | OperationTimedOut
            | RequestTimedOut
            | NetworkException
            | CoordinatorNotAvailable
            | NotCoordinator
            | CoordinatorLoadInProgress
            | LeaderNotAvailable
            | NotLeaderForPartition
            | BrokerNotAvailable
            | MessageTimedOut
            | TimedOutQueue
    )
}

/// Whether a librdkafka error means this node's credentials or permissions are refused.
pub fn is_authorization(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        Authentication
            | SaslAuthenticationFailed
            | TopicAuthorizationFailed
            | GroupAuthorizationFailed
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
    )
}

/// The node's view of the Kafka cluster's reachability, shared by every client.
pub struct KafkaHealth {
    kafka: KafkaConnection,
    state: Mutex<OutageState>,
    /// Set when a client reported an error a restart cannot fix. Read by the poll loop on every
    /// record, hence a once-cell (a lock-free read) rather than a mutex.
    unrecoverable: OnceLock<Unrecoverable>,
    warnings: Mutex<HashMap<String, Instant>>,
}

#[derive(Default)]
struct OutageState {
    since: Option<Instant>,
    last_reminder: Option<Instant>,
    reason: String,
}

impl KafkaHealth {
    pub fn new(kafka: &KafkaConnection) -> Arc<Self> {
        Arc::new(Self {
            kafka: kafka.clone(),
            state: Mutex::new(OutageState::default()),
            unrecoverable: OnceLock::new(),
            warnings: Mutex::new(HashMap::new()),
        })
    }

    pub fn reachable(&self) -> bool {
        self.outage().is_none()
    }

    /// How long the current outage has lasted, if there is one.
    pub fn outage(&self) -> Option<Duration> {
        self.state
            .lock()
            .expect("health lock poisoned")
            .since
            .map(|s| s.elapsed())
    }

    pub fn unrecoverable(&self) -> Option<Unrecoverable> {
        self.unrecoverable.get().cloned()
    }

    /// Records a cause the node must exit for (the first one wins).
    pub fn set_unrecoverable(&self, cause: Unrecoverable) {
        let message = cause.to_string();
        if self.unrecoverable.set(cause).is_ok() {
            tracing::error!("{message}");
        }
    }

    /// The cluster did not answer: starts an outage (logged once) if none is ongoing.
    pub fn report_unreachable(&self, reason: &str) {
        let mut state = self.state.lock().expect("health lock poisoned");
        if state.since.is_none() {
            state.since = Some(Instant::now());
            state.last_reminder = Some(Instant::now());
            state.reason = reason.to_string();
            tracing::error!(
                "Kafka at {} is unreachable ({reason}); this node keeps running, answers for the shards it holds \
                 and retries (next reminder in {} s)",
                self.kafka.bootstrap,
                REMINDER_EVERY.as_secs()
            );
        }
    }

    /// The cluster answered.
    pub fn report_reachable(&self) {
        let mut state = self.state.lock().expect("health lock poisoned");
        if let Some(since) = state.since.take() {
            tracing::info!(
                "Kafka at {} is reachable again after {:.1} s",
                self.kafka.bootstrap,
                since.elapsed().as_secs_f64()
            );
        }
    }

    fn remind(&self) {
        let mut state = self.state.lock().expect("health lock poisoned");
        let (Some(since), Some(last)) = (state.since, state.last_reminder) else {
            return;
        };
        if last.elapsed() >= REMINDER_EVERY {
            state.last_reminder = Some(Instant::now());
            tracing::warn!(
                "Kafka still unreachable after {} s ({})",
                since.elapsed().as_secs(),
                state.reason
            );
        }
    }

    /// Logs `message` unless the same `kind` was logged within [`SAME_WARNING_EVERY`].
    fn warn_limited(&self, kind: &str, message: &str) {
        let mut seen = self.warnings.lock().expect("health lock poisoned");
        let now = Instant::now();
        if seen
            .get(kind)
            .is_some_and(|t| now.duration_since(*t) < SAME_WARNING_EVERY)
        {
            tracing::debug!("librdkafka: {message}");
            return;
        }
        seen.insert(kind.to_string(), now);
        tracing::warn!(
            "librdkafka: {message} (the same kind of message is shown at most every {} s)",
            SAME_WARNING_EVERY.as_secs()
        );
    }

    /// Handles one client error: connectivity is the monitor's to judge (a closing client
    /// reports all brokers down too), authorization is fatal, the rest is logged (rate-limited).
    pub fn client_error(&self, error: &KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(code) if is_connectivity(code) => tracing::debug!("librdkafka: {error}: {reason}"),
            // The end of a partition is news only to the reader that asked for it (standbys).
            Some(RDKafkaErrorCode::PartitionEOF) => {}
            // A SASL handshake cut by a broken connection (a broker still starting, a
            // restart) is reported as an authentication error, but nothing was refused:
            // librdkafka reconnects and authenticates again.
            Some(RDKafkaErrorCode::Authentication)
                if reason.contains("handshake failed: Local: Broker transport failure") =>
            {
                self.warn_limited("sasl-handshake-cut", &format!("{error}: {reason}"))
            }
            Some(code) if is_authorization(code) => {
                self.set_unrecoverable(Unrecoverable::NotAuthorized(format!("{error}: {reason}")));
            }
            Some(code) => self.warn_limited(&format!("{code:?}"), &format!("{error}: {reason}")),
            None => self.warn_limited(reason, &format!("{error}: {reason}")),
        }
    }

    /// Handles one librdkafka log line (warnings and errors rate-limited per facility; while
    /// the cluster is unreachable the connection failures are the outage's, already said).
    pub fn client_log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if !self.reachable()
                    || message.contains("Connection refused")
                    || message.contains("Disconnected")
                    // CONCURRENT_TRANSACTIONS: librdkafka retries it; fencing a departed
                    // node's open transaction meets it every time, while the abort completes.
                    || message.contains("another concurrent operation on the same transaction")
                {
                    tracing::debug!("librdkafka: {facility} {message}");
                } else {
                    self.warn_limited(facility, &format!("{facility} {message}"));
                }
            }
            _ => tracing::debug!(target: "librdkafka", "{facility} {message}"),
        }
    }

    /// Probes the cluster every second with a metadata request per input topic (`(topic,
    /// partitions)`, one per hosted entity type), which answers two questions at once: is Kafka
    /// reachable (keeping the outage state current), and does each topic still have the
    /// partitions the node started with (else [`Unrecoverable`]). Asking for the node's topics
    /// only keeps the probe small on a broker with thousands of partitions, and running it here
    /// keeps it off the consumers' poll loops.
    pub async fn monitor(self: Arc<Self>, topics: Vec<(String, u32)>) {
        let probe: BaseConsumer<QuietContext> = match self
            .kafka
            .client(ClientKind::Consumer)
            .create_with_context(QuietContext::new(self.clone()))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot create the Kafka reachability probe: {e}");
                return;
            }
        };
        let probe = Arc::new(probe);
        let mut missing_before = vec![false; topics.len()];
        loop {
            for ((topic, partitions), missing_before) in topics.iter().zip(&mut missing_before) {
                let (client, asked) = (probe.clone(), topic.clone());
                let answer = tokio::task::spawn_blocking(move || {
                    client
                        .fetch_metadata(Some(&asked), PROBE_TIMEOUT)
                        .map(|m| topic_partitions(&m, &asked))
                })
                .await;
                match answer {
                    Ok(Ok(found)) => {
                        self.report_reachable();
                        if let Some(cause) = judge_topic(topic, *partitions, found, missing_before)
                        {
                            self.set_unrecoverable(cause);
                        }
                    }
                    Ok(Err(e)) => {
                        self.report_unreachable(&e.to_string());
                        self.remind();
                        // One unanswered probe says it all; the next round asks again.
                        break;
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

/// The topic's partition count in `metadata`, 0 when the broker says it does not exist.
fn topic_partitions(metadata: &rdkafka::metadata::Metadata, topic: &str) -> u32 {
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as u32)
}

/// What one probe's answer means for the input topic: deleted only when seen missing twice in a
/// row (metadata may briefly lag a broker restart), changed when its count differs.
fn judge_topic(
    topic: &str,
    started_with: u32,
    found: u32,
    missing_before: &mut bool,
) -> Option<Unrecoverable> {
    let missing = found == 0;
    let confirmed = missing && *missing_before;
    *missing_before = missing;
    if confirmed {
        Some(Unrecoverable::TopicDeleted(topic.to_string()))
    } else if !missing && found != started_with {
        Some(Unrecoverable::PartitionsChanged {
            topic: topic.to_string(),
            was: started_with,
            now: found,
        })
    } else {
        None
    }
}

/// The client context of every Kafka client of the node: errors and logs go to [`KafkaHealth`].
#[derive(Clone)]
pub struct QuietContext {
    pub health: Arc<KafkaHealth>,
}

impl QuietContext {
    pub fn new(health: Arc<KafkaHealth>) -> Self {
        Self { health }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.health.client_error(&error, reason);
    }
}

impl ConsumerContext for QuietContext {}

/// A client that nothing reads: its log lines and errors wait in its queue until served.
pub(crate) trait IdleClient: Send + Sync {
    /// Hands the log lines and errors waiting to the client's context (never waits).
    fn serve_events(&self);
}

impl IdleClient for BaseConsumer<QuietContext> {
    fn serve_events(&self) {
        // Assigned nothing, so no record is taken: this only serves events.
        let _ = self.poll(Duration::ZERO);
    }
}

/// Serves the events of clients that nothing reads (the offset and watermark clients a node
/// keeps for its lifetime) once a second, on a thread that ends when every client is gone.
/// Unserved, those events would wait in the client's queue (which librdkafka does not bound)
/// for as long as it lives, and tell nobody. A thread, not a tokio task: this loop can hold the
/// last reference to a client (retired by [`crate::changelog::ChangelogEnds`], or the node
/// stopping), and dropping a librdkafka client waits for its broker threads, seconds when the
/// broker is down, which would stall a tokio worker.
pub(crate) fn serve_idle_clients(
    clients: Vec<Weak<dyn IdleClient>>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("kafka-idle-clients".into())
        .spawn(move || loop {
            std::thread::sleep(SERVE_IDLE_EVERY);
            let mut alive = 0;
            for client in clients.iter().filter_map(Weak::upgrade) {
                alive += 1;
                client.serve_events();
            }
            if alive == 0 {
                return;
            }
        })
        .expect("cannot spawn the thread serving idle Kafka clients")
}

impl ProducerContext for QuietContext {
    type DeliveryOpaque = ();
    // Delivery failures of checkpoint records surface as the transaction's error.
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counted(std::sync::atomic::AtomicUsize);

    impl IdleClient for Counted {
        fn serve_events(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn idle_clients_are_served_every_second_until_the_last_is_gone() {
        let counted = Arc::new(Counted(Default::default()));
        let served = || counted.0.load(std::sync::atomic::Ordering::SeqCst);
        let thread = serve_idle_clients(vec![Arc::downgrade(&counted) as Weak<dyn IdleClient>]);
        std::thread::sleep(SERVE_IDLE_EVERY * 2 + SERVE_IDLE_EVERY / 2);
        assert!(served() >= 2, "served {} times in 2.5 s", served());
        assert!(
            !thread.is_finished(),
            "the thread stopped while a client was alive"
        );
        drop(counted);
        let gone = Instant::now();
        while !thread.is_finished() {
            assert!(
                gone.elapsed() < SERVE_IDLE_EVERY * 3,
                "the thread outlived its clients"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn connectivity_and_authorization_errors_are_told_apart() {
        assert!(is_connectivity(RDKafkaErrorCode::AllBrokersDown));
        assert!(is_connectivity(RDKafkaErrorCode::BrokerTransportFailure));
        assert!(!is_connectivity(RDKafkaErrorCode::SaslAuthenticationFailed));
        assert!(is_authorization(RDKafkaErrorCode::SaslAuthenticationFailed));
        assert!(is_authorization(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(!is_authorization(RDKafkaErrorCode::AllBrokersDown));
    }

    #[test]
    fn a_sasl_handshake_cut_by_the_connection_is_not_a_refusal_and_a_wrong_password_is() {
        let health = KafkaHealth::new(&crate::kafka_config::KafkaConnection::new("127.0.0.1:1"));
        let error = KafkaError::Global(RDKafkaErrorCode::Authentication);
        health.client_error(
            &error,
            "GroupCoordinator: SASL SCRAM-SHA-512 mechanism handshake failed: Local: Broker transport failure: broker's supported mechanisms: ",
        );
        assert!(health.unrecoverable().is_none());
        health.client_error(
            &error,
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
        );
        assert!(health.unrecoverable().is_some());
    }

    #[test]
    fn an_outage_starts_once_and_ends_once() {
        let health = KafkaHealth::new(&crate::kafka_config::KafkaConnection::new("127.0.0.1:1"));
        health.client_error(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "a client closed",
        );
        assert!(
            health.reachable(),
            "a client's connection error is no outage by itself"
        );
        health.report_unreachable("probe failed");
        let started = health.outage().expect("an outage started");
        health.report_unreachable("probe failed again");
        assert!(!health.reachable());
        assert!(
            health.outage().unwrap() >= started,
            "the second report does not restart the outage"
        );
        health.report_reachable();
        assert!(health.reachable());
        assert!(health.outage().is_none());
    }

    #[test]
    fn a_topic_is_deleted_when_missing_twice_and_changed_when_its_count_differs() {
        let mut missing_before = false;
        assert_eq!(judge_topic("t", 8, 8, &mut missing_before), None);
        assert_eq!(
            judge_topic("t", 8, 0, &mut missing_before),
            None,
            "once is not enough"
        );
        assert_eq!(
            judge_topic("t", 8, 8, &mut missing_before),
            None,
            "it came back"
        );
        assert_eq!(judge_topic("t", 8, 0, &mut missing_before), None);
        assert_eq!(
            judge_topic("t", 8, 0, &mut missing_before),
            Some(Unrecoverable::TopicDeleted("t".into()))
        );
        assert_eq!(
            judge_topic("t", 8, 12, &mut false),
            Some(Unrecoverable::PartitionsChanged {
                topic: "t".into(),
                was: 8,
                now: 12
            })
        );
    }

    #[test]
    fn an_authorization_error_is_unrecoverable_with_its_own_exit_code() {
        let health = KafkaHealth::new(&crate::kafka_config::KafkaConnection::new("127.0.0.1:1"));
        health.client_error(
            &KafkaError::Global(RDKafkaErrorCode::SaslAuthenticationFailed),
            "bad password",
        );
        let cause = health.unrecoverable().expect("recorded");
        assert_eq!(cause.exit_code(), 3);
        assert!(health.reachable(), "refused is not unreachable");
        let codes = [
            cause.exit_code(),
            Unrecoverable::TopicDeleted("t".into()).exit_code(),
            Unrecoverable::PartitionsChanged {
                topic: "t".into(),
                was: 1,
                now: 2,
            }
            .exit_code(),
        ];
        assert_eq!(
            codes
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3,
            "one code per cause"
        );
    }
}
