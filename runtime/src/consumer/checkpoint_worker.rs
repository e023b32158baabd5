//! Runs checkpoint transactions on a thread of their own, so the poll loop keeps reading and
//! dispatching while a transaction commits (a commit waits for the broker to write markers to
//! every changelog partition in it, and for the group coordinator: tens to hundreds of ms that
//! would otherwise stall every partition; see docs/BENCHMARKS.md).
//!
//! At most one checkpoint is in flight. The periodic one is started and not waited for; the
//! hand-off's final checkpoint first waits for the one in flight, then runs and is waited for,
//! so a revoked partition's last transaction is committed before the callback returns.
//!
//! Every checkpoint has a deadline: the periodic one the transaction timeout (past it the
//! broker aborts the transaction anyway), the hand-off's the one its caller sets. No wait here
//! lasts past the deadline plus the abort's time: a transaction librdkafka has not returned
//! from by then is *stuck* (it can wait on a lost coordinator for good,
//! confluentinc/librdkafka#5456). The producer is then given up as if it had failed fatally:
//! the consumer recovers with a new one, whose `init_transactions` aborts that transaction,
//! and [`CheckpointWorker::replace`] starts a new thread for it, leaving the stuck one to end
//! on its own with nothing it reports counted as a failure of the new producer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;

use super::checkpoint::{CheckpointError, Checkpointer, ABORT_TIMEOUT};
use crate::entity::Entity;
use crate::shard::LocalShard;
use crate::stats::NodeStats;

type Outcome = Result<bool, CheckpointError>;

/// Beyond the deadline and the abort's time, before a transaction is declared stuck.
const GRACE: Duration = Duration::from_secs(1);

enum Request<E: Entity> {
    Checkpoint {
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
        deadline: Instant,
        /// Whether a non-fatal failure is only logged by the caller (a hand-off retries it).
        caller_logs: bool,
        done: Sender<Outcome>,
    },
    /// The partitions were handed off: their committed offsets no longer matter here.
    Forget(Vec<u32>),
}

/// The checkpoint running on the thread, and when waiting for it stops.
struct InFlight {
    done: Receiver<Outcome>,
    overdue_at: Instant,
}

/// What the checkpoint thread reports to, shared by the node's consumer.
#[derive(Clone)]
struct Reporting {
    runtime: tokio::runtime::Handle,
    stats: Arc<NodeStats>,
    producer_failed: Arc<AtomicBool>,
}

pub(crate) struct CheckpointWorker<E: Entity> {
    requests: Sender<Request<E>>,
    /// Set when this thread was replaced: what it still reports is not the current producer's.
    retired: Arc<AtomicBool>,
    in_flight: Option<InFlight>,
    /// Whether the checkpoint in flight was declared stuck (said once).
    stuck: bool,
    transaction_timeout: Duration,
    reporting: Reporting,
}

impl<E: Entity> CheckpointWorker<E> {
    /// Starts the thread. It counts outcomes in `stats` and sets `producer_failed` when the
    /// producer can no longer commit (the consumer then recovers and [`Self::replace`]s it).
    pub fn start(
        checkpointer: Checkpointer,
        runtime: tokio::runtime::Handle,
        stats: Arc<NodeStats>,
        producer_failed: Arc<AtomicBool>,
    ) -> Self {
        let reporting = Reporting {
            runtime,
            stats,
            producer_failed,
        };
        let transaction_timeout = checkpointer.transaction_timeout();
        let (requests, retired) = spawn(checkpointer, reporting.clone());
        Self {
            requests,
            retired,
            in_flight: None,
            stuck: false,
            transaction_timeout,
            reporting,
        }
    }

    /// Starts a checkpoint of `shards` unless one is still running (then this round is skipped:
    /// the running one's successor will include everything); returns whether it started.
    pub fn start_periodic(
        &mut self,
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
    ) -> bool {
        if self.busy() {
            return false;
        }
        let deadline = Instant::now() + self.transaction_timeout;
        self.in_flight = self.send(shards, group, deadline, false);
        self.in_flight.is_some()
    }

    /// Whether a checkpoint is still in flight (one that ended is forgotten; one past its
    /// deadline is declared stuck).
    pub fn busy(&mut self) -> bool {
        if let Some(running) = &self.in_flight {
            match running.done.try_recv() {
                Ok(_) | Err(mpsc::TryRecvError::Disconnected) => self.in_flight = None,
                Err(mpsc::TryRecvError::Empty) => {
                    if Instant::now() >= running.overdue_at {
                        self.declare_stuck();
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Waits for the checkpoint in flight, if any, until it is overdue. Returns its outcome
    /// (`Ok(false)` if none was in flight), or `None` if it is stuck.
    pub fn wait_in_flight(&mut self) -> Option<Outcome> {
        let Some(running) = &self.in_flight else {
            return Some(Ok(false));
        };
        let outcome = match running
            .done
            .recv_timeout(running.overdue_at.saturating_duration_since(Instant::now()))
        {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Disconnected) => Err(CheckpointError::WorkerGone),
            Err(RecvTimeoutError::Timeout) => {
                self.declare_stuck();
                return None;
            }
        };
        self.in_flight = None;
        Some(outcome)
    }

    /// Runs a checkpoint of `shards` after the one in flight, and waits for it; it should end
    /// by `deadline` (the wait for the one in flight counts). A non-fatal failure is the
    /// caller's to log.
    pub fn run_now(
        &mut self,
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
        deadline: Instant,
    ) -> Outcome {
        if self.wait_in_flight().is_none() {
            return Err(CheckpointError::Stuck);
        }
        self.in_flight = self.send(shards, group, deadline, true);
        if self.in_flight.is_none() {
            return Err(CheckpointError::WorkerGone);
        }
        self.wait_in_flight().unwrap_or(Err(CheckpointError::Stuck))
    }

    /// Forgets what was committed for partitions no longer owned (queued after any checkpoint).
    pub fn forget(&mut self, partitions: &[u32]) {
        let _ = self.requests.send(Request::Forget(partitions.to_vec()));
    }

    /// Hands a new producer (after one failed or was given up) to a new thread. The old thread
    /// ends once its queue is done; a stuck transaction there ends when librdkafka returns,
    /// failed (the new producer's `init_transactions` fenced it).
    pub fn replace(&mut self, checkpointer: Checkpointer) {
        self.retired.store(true, Ordering::SeqCst);
        let (requests, retired) = spawn(checkpointer, self.reporting.clone());
        self.requests = requests;
        self.retired = retired;
        self.in_flight = None;
        self.stuck = false;
    }

    fn declare_stuck(&mut self) {
        if std::mem::replace(&mut self.stuck, true) {
            return;
        }
        NodeStats::add(&self.reporting.stats.checkpoints_aborted, 1);
        if !self.reporting.producer_failed.swap(true, Ordering::SeqCst) {
            tracing::error!("a checkpoint transaction did not end by its deadline (librdkafka can wait on a lost coordinator for good); this node gives up its producer and recovers: drops its shards uncommitted, re-creates the producer (which aborts that transaction), restores");
        }
    }

    fn send(
        &self,
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
        deadline: Instant,
        caller_logs: bool,
    ) -> Option<InFlight> {
        let (done, outcome) = mpsc::channel();
        self.requests
            .send(Request::Checkpoint {
                shards,
                group,
                deadline,
                caller_logs,
                done,
            })
            .ok()
            .map(|_| InFlight {
                done: outcome,
                overdue_at: deadline + ABORT_TIMEOUT + GRACE,
            })
    }
}

/// Starts a checkpoint thread for `checkpointer`; returns its queue and its retired flag.
fn spawn<E: Entity>(
    mut checkpointer: Checkpointer,
    reporting: Reporting,
) -> (Sender<Request<E>>, Arc<AtomicBool>) {
    let (requests, inbox) = mpsc::channel::<Request<E>>();
    let retired = Arc::new(AtomicBool::new(false));
    let thread_retired = retired.clone();
    std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || {
            for request in inbox {
                match request {
                    Request::Checkpoint {
                        shards,
                        group,
                        deadline,
                        caller_logs,
                        done,
                    } => {
                        let outcome =
                            checkpointer.run(&reporting.runtime, &group, &shards, deadline);
                        if !thread_retired.load(Ordering::SeqCst) {
                            record(&outcome, &reporting, caller_logs);
                        }
                        let _ = done.send(outcome);
                    }
                    Request::Forget(partitions) => checkpointer.forget(&partitions),
                }
            }
        })
        .expect("cannot spawn the checkpoint thread");
    (requests, retired)
}

fn record(outcome: &Outcome, reporting: &Reporting, caller_logs: bool) {
    let stats = &reporting.stats;
    match outcome {
        Ok(true) => NodeStats::add(&stats.checkpoints_committed, 1),
        Ok(false) => {}
        Err(CheckpointError::Fatal(e)) => {
            NodeStats::add(&stats.checkpoints_aborted, 1);
            if !reporting.producer_failed.swap(true, Ordering::SeqCst) {
                tracing::error!("the checkpoint producer failed ({e}); this node recovers: drops its shards uncommitted, re-creates the producer, restores");
            }
        }
        Err(e) => {
            NodeStats::add(&stats.checkpoints_aborted, 1);
            if !caller_logs {
                tracing::warn!("{e}; the next checkpoint retries");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ractor::{Actor, ActorProcessingErr, ActorRef};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::ClientConfig;

    use super::*;
    use crate::consumer::checkpoint::CheckpointerConfig;
    use crate::entity::tests::{Sum, SumState};
    use crate::entity::Stored;
    use crate::kafka_config::KafkaConnection;
    use crate::kafka_health::{KafkaHealth, QuietContext};
    use crate::shard::{Checkpoint, ShardMsg};

    /// A shard with one changed state at every checkpoint.
    struct DirtyShard;

    impl Actor for DirtyShard {
        type Msg = ShardMsg<Sum>;
        type State = u64;
        type Arguments = ();

        async fn pre_start(
            &self,
            _: ActorRef<Self::Msg>,
            _: (),
        ) -> Result<u64, ActorProcessingErr> {
            Ok(0)
        }

        async fn handle(
            &self,
            _: ActorRef<Self::Msg>,
            msg: Self::Msg,
            seq: &mut u64,
        ) -> Result<(), ActorProcessingErr> {
            if let ShardMsg::Checkpoint(reply) = msg {
                *seq += 1;
                let state = Stored::new(SumState { count: 1, sum: 5 }, *seq as i64);
                let _ = reply.send(Checkpoint {
                    partition: 0,
                    seq: *seq,
                    commit_offset: Some(*seq as i64 + 1),
                    states: vec![("user".into(), state)],
                    outgoing: Vec::new(),
                });
            }
            Ok(())
        }
    }

    fn checkpointer(bootstrap: &str) -> Checkpointer {
        let kafka = KafkaConnection::new(bootstrap);
        Checkpointer::new(&CheckpointerConfig {
            context: QuietContext::new(KafkaHealth::new(&kafka)),
            kafka,
            transactional_id: "node-1".into(),
            node: "node-1".into(),
            transaction_timeout: Duration::from_secs(10),
            changelog_topic: "changelog".into(),
            input_topic: "input".into(),
            dlq_topic: "dlq".into(),
            kafka_debug: None,
        })
        .unwrap()
    }

    // librdkafka's mock cluster stands in for a coordinator that stops answering (every answer
    // takes two minutes); the real broker's case is `faults.rs`.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_checkpoint_librdkafka_does_not_return_from_is_given_up_by_its_deadline_and_a_new_producer_commits(
    ) {
        let (shard, _) = Actor::spawn(None, DirtyShard, ()).await.unwrap();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let cluster = MockCluster::new(1).unwrap();
            cluster.create_topic("changelog", 1, 1).unwrap();
            cluster.create_topic("input", 1, 1).unwrap();
            let bootstrap = cluster.bootstrap_servers();
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "group")
                .create()
                .unwrap();
            let group = || consumer.group_metadata().unwrap();
            let shards = || {
                vec![(
                    0,
                    LocalShard {
                        actor: shard.clone(),
                    },
                )]
            };
            let stats = Arc::new(NodeStats::default());
            let producer_failed = Arc::new(AtomicBool::new(false));
            let mut worker = CheckpointWorker::<Sum>::start(
                checkpointer(&bootstrap),
                runtime,
                stats.clone(),
                producer_failed.clone(),
            );
            let in_time = Instant::now() + Duration::from_secs(10);
            assert!(matches!(
                worker.run_now(shards(), group(), in_time),
                Ok(true)
            ));

            cluster
                .broker_round_trip_time(1, Duration::from_secs(120))
                .unwrap();
            let started = Instant::now();
            let outcome = worker.run_now(shards(), group(), started + Duration::from_secs(1));
            let given_up = started.elapsed();
            assert!(
                matches!(outcome, Err(CheckpointError::Stuck)),
                "{outcome:?} after {given_up:?}"
            );
            assert!(
                given_up
                    < Duration::from_secs(1) + ABORT_TIMEOUT + GRACE + Duration::from_millis(500),
                "given up after {given_up:?}"
            );
            assert!(
                producer_failed.load(Ordering::SeqCst),
                "the node is told to recover"
            );
            // Until the node recovers, nothing else starts behind the stuck transaction.
            assert!(matches!(
                worker.run_now(shards(), group(), Instant::now() + Duration::from_secs(5)),
                Err(CheckpointError::Stuck)
            ));

            // The recovery: a new producer fences the stuck one and gets a thread of its own.
            cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
            producer_failed.store(false, Ordering::SeqCst);
            worker.replace(checkpointer(&bootstrap));
            let committed = stats.checkpoints_committed.get();
            let in_time = Instant::now() + Duration::from_secs(10);
            assert!(matches!(
                worker.run_now(shards(), group(), in_time),
                Ok(true)
            ));
            assert_eq!(stats.checkpoints_committed.get(), committed + 1);
            // The stuck transaction ends failed (fenced or timed out) on the old thread; that
            // is not a failure of the new producer.
            std::thread::sleep(Duration::from_secs(12));
            assert!(
                !producer_failed.load(Ordering::SeqCst),
                "the old producer's end made the node recover again"
            );
            worker.start_periodic(shards(), group());
            assert!(matches!(worker.wait_in_flight(), Some(Ok(true))));
        })
        .await
        .unwrap();
    }
}
