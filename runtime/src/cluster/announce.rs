//! Ownership announcements: this node tells every peer the complete set of shards it owns
//! (one announcer per entity type),
//! at once on every change and again every second (so a peer that joined late or missed a
//! message catches up without any request/response protocol).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::allocation::AllocationTable;
use crate::cluster::gateway::{remote_gateways, GatewayMsg};
use crate::cluster::wire::OwnershipAnnouncement;

const REANNOUNCE_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Announcer {
    entity_type: String,
    table: Arc<AllocationTable>,
    /// Distinguishes this run of the node from earlier ones with the same name.
    incarnation: u64,
    seq: AtomicU64,
    kick: Notify,
    /// Where this node serves gRPC, sent with every announcement.
    grpc_url: String,
    /// Where this node serves its management port (the query link), sent with every one.
    management_url: String,
}

impl Announcer {
    /// The type whose shards this announcer claims (its consumer group).
    pub fn entity_type(&self) -> &str {
        &self.entity_type
    }

    /// `grpc_url`: where this node serves gRPC, as clients reach it; `management_url`: its
    /// management port, as other nodes reach it.
    pub fn new(
        entity_type: &str,
        table: Arc<AllocationTable>,
        grpc_url: String,
        management_url: String,
    ) -> Self {
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        table.set_grpc_url(table.local_node(), &grpc_url);
        Self {
            entity_type: entity_type.to_string(),
            table,
            incarnation,
            seq: AtomicU64::new(0),
            kick: Notify::new(),
            grpc_url,
            management_url,
        }
    }

    /// Records the shards this node now owns and announces them.
    pub fn claim_local(&self, shards: BTreeSet<u32>) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let node = self.table.local_node().clone();
        self.table
            .apply_claim(&node, (self.incarnation, seq), shards);
        self.kick.notify_one();
    }

    /// The entity type's allocation table.
    pub fn table(&self) -> &Arc<AllocationTable> {
        &self.table
    }

    /// Announce now (e.g. a peer just connected).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    fn broadcast(&self) {
        let announcement = OwnershipAnnouncement {
            node: self.table.local_node().to_string(),
            incarnation: self.incarnation,
            seq: self.seq.load(Ordering::SeqCst),
            shards: self.table.local_shards().into_iter().collect(),
            entity_type: self.entity_type.clone(),
            grpc_url: self.grpc_url.clone(),
            management_url: self.management_url.clone(),
        };
        for gateway in remote_gateways() {
            let _ = gateway.cast(GatewayMsg::Announce(announcement.clone()));
        }
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(REANNOUNCE_EVERY, self.kick.notified()).await;
            self.broadcast();
        }
    }
}
