//! Runs checkpoint transactions on a thread of their own, so the poll loop keeps reading and
//! dispatching while a transaction commits (a commit waits for the broker to write markers to
//! every changelog partition in it, and for the group coordinator: tens to hundreds of ms that
//! would otherwise stall every partition; see docs/BENCHMARKS.md).
//!
//! At most one checkpoint is in flight. The periodic one is started and not waited for; the
//! hand-off's final checkpoint first waits for the one in flight, then runs and is waited for,
//! so a revoked partition's last transaction is committed before the callback returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use rdkafka::consumer::ConsumerGroupMetadata;

use super::checkpoint::{CheckpointError, Checkpointer};
use crate::entity::Entity;
use crate::shard::LocalShard;
use crate::stats::NodeStats;

type Outcome = Result<bool, CheckpointError>;

enum Request<E: Entity> {
    Checkpoint {
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
        done: Sender<Outcome>,
    },
    /// The partitions were handed off: their committed offsets no longer matter here.
    Forget(Vec<u32>),
    /// A new producer replaces one that failed fatally.
    Replace(Box<Checkpointer>),
}

pub(crate) struct CheckpointWorker<E: Entity> {
    requests: Sender<Request<E>>,
    in_flight: Option<Receiver<Outcome>>,
}

impl<E: Entity> CheckpointWorker<E> {
    /// Starts the thread. It counts outcomes in `stats` and sets `producer_failed` when the
    /// producer can no longer commit (the consumer then recovers and [`Self::replace`]s it).
    pub fn start(
        mut checkpointer: Checkpointer,
        runtime: tokio::runtime::Handle,
        stats: Arc<NodeStats>,
        producer_failed: Arc<AtomicBool>,
    ) -> Self {
        let (requests, inbox) = mpsc::channel::<Request<E>>();
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                for request in inbox {
                    match request {
                        Request::Checkpoint {
                            shards,
                            group,
                            done,
                        } => {
                            let outcome = checkpointer.run(&runtime, &group, &shards);
                            record(&outcome, &stats, &producer_failed);
                            let _ = done.send(outcome);
                        }
                        Request::Forget(partitions) => checkpointer.forget(&partitions),
                        Request::Replace(fresh) => checkpointer = *fresh,
                    }
                }
            })
            .expect("cannot spawn the checkpoint thread");
        Self {
            requests,
            in_flight: None,
        }
    }

    /// Starts a checkpoint of `shards` unless one is still running (then this round is skipped:
    /// the running one's successor will include everything).
    pub fn start_periodic(
        &mut self,
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
    ) {
        if let Some(running) = &self.in_flight {
            match running.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(_) | Err(TryRecvError::Disconnected) => self.in_flight = None,
            }
        }
        self.in_flight = self.send(shards, group);
    }

    /// Waits for the checkpoint in flight, if any.
    pub fn wait_in_flight(&mut self) {
        if let Some(running) = self.in_flight.take() {
            let _ = running.recv();
        }
    }

    /// Runs a checkpoint of `shards` after the one in flight, and waits for it.
    pub fn run_now(
        &mut self,
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
    ) -> Outcome {
        self.wait_in_flight();
        let Some(done) = self.send(shards, group) else {
            return Err(CheckpointError::WorkerGone);
        };
        done.recv().unwrap_or(Err(CheckpointError::WorkerGone))
    }

    /// Forgets what was committed for partitions no longer owned (queued after any checkpoint).
    pub fn forget(&mut self, partitions: &[u32]) {
        let _ = self.requests.send(Request::Forget(partitions.to_vec()));
    }

    /// Hands the thread a new producer (queued after any checkpoint).
    pub fn replace(&mut self, checkpointer: Checkpointer) {
        let _ = self.requests.send(Request::Replace(Box::new(checkpointer)));
    }

    fn send(
        &self,
        shards: Vec<(u32, LocalShard<E>)>,
        group: ConsumerGroupMetadata,
    ) -> Option<Receiver<Outcome>> {
        let (done, outcome) = mpsc::channel();
        self.requests
            .send(Request::Checkpoint {
                shards,
                group,
                done,
            })
            .ok()
            .map(|_| outcome)
    }
}

fn record(outcome: &Outcome, stats: &NodeStats, producer_failed: &AtomicBool) {
    match outcome {
        Ok(true) => NodeStats::add(&stats.checkpoints_committed, 1),
        Ok(false) => {}
        Err(CheckpointError::Fatal(e)) => {
            NodeStats::add(&stats.checkpoints_aborted, 1);
            if !producer_failed.swap(true, Ordering::SeqCst) {
                tracing::error!("the checkpoint producer failed ({e}); this node recovers: drops its shards uncommitted, re-creates the producer, restores");
            }
        }
        Err(e) => {
            NodeStats::add(&stats.checkpoints_aborted, 1);
            tracing::warn!("{e}; the next checkpoint retries");
        }
    }
}
