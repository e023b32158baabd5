//! The commands a node sent and waits to be answered, and how an owner answers one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::cluster::gateway::{self, GatewayMsg};
use crate::cluster::wire::{CommandOutcome, CommandReply};

/// One node's commands in flight (all entity types), by the node's number for each.
pub(crate) struct PendingCommands {
    local_node: Arc<str>,
    /// Numbers start at the node's start time in nanoseconds, so an answer meant for a
    /// previous run of the node (same node id) matches no command of this one.
    next: AtomicU64,
    waiting: DashMap<u64, oneshot::Sender<CommandOutcome>>,
}

/// A command waiting for its answer; forgotten when dropped (answered or given up on).
pub(crate) struct Waiting {
    pub request: u64,
    answer: oneshot::Receiver<CommandOutcome>,
    pending: Arc<PendingCommands>,
}

impl Waiting {
    /// The answer, when it comes; `None` if the node stops first.
    pub async fn outcome(&mut self) -> Option<CommandOutcome> {
        (&mut self.answer).await.ok()
    }

    /// The answer if it has come.
    #[cfg(test)]
    pub fn arrived(&mut self) -> Option<CommandOutcome> {
        self.answer.try_recv().ok()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.pending.waiting.remove(&self.request);
    }
}

impl PendingCommands {
    pub fn new(local_node: Arc<str>) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            local_node,
            next: AtomicU64::new(start),
            waiting: DashMap::new(),
        }
    }

    /// This node's id, which command records name as the node to answer.
    pub fn local_node(&self) -> &Arc<str> {
        &self.local_node
    }

    /// A new command's number and where its answer arrives.
    pub fn register(self: &Arc<Self>) -> Waiting {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(request, tx);
        Waiting {
            request,
            answer: rx,
            pending: self.clone(),
        }
    }

    /// The answer to this node's command `request` arrived (a late or repeated one is ignored).
    pub fn complete(&self, request: u64, outcome: CommandOutcome) {
        if let Some((_, waiting)) = self.waiting.remove(&request) {
            let _ = waiting.send(outcome);
        }
    }

    /// Sends a committed command's answer to the node that sent it. A node that is gone or not
    /// connected loses it: its caller's retry (same idempotency key) is answered from the
    /// entity's remembered answers.
    pub fn answer(&self, reply_to: &str, request: u64, outcome: CommandOutcome) {
        if *reply_to == *self.local_node {
            self.complete(request, outcome);
            return;
        }
        match gateway::of_node(reply_to) {
            Some(gw) => {
                let _ = gw.cast(GatewayMsg::CommandReply(CommandReply {
                    request,
                    outcome: Some(outcome),
                }));
            }
            None => tracing::debug!(
                "the answer to command {request} is lost: node {reply_to} is not connected"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::failed;

    #[tokio::test]
    async fn an_answer_reaches_its_waiting_command_once() {
        let pending = Arc::new(PendingCommands::new("me".into()));
        let first = pending.register();
        let second = pending.register();
        assert_ne!(first.request, second.request);
        pending.answer("me", first.request, failed("one".into()));
        pending.complete(first.request, failed("again".into()));
        let mut first = first;
        assert_eq!(first.outcome().await, Some(failed("one".into())));
        let request = second.request;
        drop(second);
        assert!(
            pending.waiting.get(&request).is_none(),
            "given up on: forgotten"
        );
    }
}
