//! The shard allocation table: which node owns which shard (= Kafka partition).
//!
//! Every node keeps one. It is fed by ownership announcements: each node periodically and on
//! every change sends its *complete* set of owned shards, so lost or reordered messages heal on
//! the next announcement. The gRPC path reads it lock-free (a `DashMap` lookup); writers are
//! rare (rebalances, announcements) and serialise on a mutex.
//!
//! The table is a routing hint, not the authority: the node a query is sent to checks that it
//! really holds the shard and otherwise answers "not owner", and the caller waits for the next
//! change. Kafka's assignment is the authority; a node only claims what it was assigned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::watch;

/// Who owns a shard, from this node's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    Remote(Arc<str>),
}

/// One node's latest complete claim.
#[derive(Debug, Clone)]
struct Claim {
    /// (incarnation, seq): orders one node's announcements; a restart gets a new incarnation.
    version: (u64, u64),
    shards: BTreeSet<u32>,
}

/// A node that left while holding shards.
#[derive(Debug, Clone)]
struct Departure {
    at: Instant,
    shards: BTreeSet<u32>,
    /// Its transactional id was fenced as soon as the group dropped it (before its shards were
    /// assigned here): not a previous owner to fence again, still orphaning its shards.
    fenced: bool,
}

pub struct AllocationTable {
    local_node: Arc<str>,
    owners: DashMap<u32, Arc<str>>,
    claims: Mutex<HashMap<Arc<str>, Claim>>,
    /// Nodes whose session ended and that have not claimed anything since: a shard assigned
    /// here may have been theirs (their checkpoint transaction may still be open). With when
    /// this node saw them leave and the shards they held (for failover durations).
    departed: Mutex<BTreeMap<Arc<str>, Departure>>,
    /// Bumped on every change; queries waiting for an owner watch it.
    changes: watch::Sender<u64>,
    /// Where each node serves gRPC, as it announces it (for clients that ask owners directly).
    grpc_urls: DashMap<Arc<str>, Arc<str>>,
    /// Where each node serves its management port, as it announces it (for the query link).
    management_urls: DashMap<Arc<str>, Arc<str>>,
}

impl AllocationTable {
    pub fn new(local_node: impl Into<Arc<str>>) -> Self {
        Self {
            local_node: local_node.into(),
            owners: DashMap::new(),
            claims: Mutex::new(HashMap::new()),
            departed: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            grpc_urls: DashMap::new(),
            management_urls: DashMap::new(),
        }
    }

    /// Records where `node` serves gRPC (from its announcements; this node's own at start).
    pub fn set_grpc_url(&self, node: &str, url: &str) {
        set_url(&self.grpc_urls, node, url);
    }

    /// Records where `node` serves its management port (from its announcements).
    pub fn set_management_url(&self, node: &str, url: &str) {
        set_url(&self.management_urls, node, url);
    }

    /// Where `node` serves its management port, if it has said.
    pub fn management_url(&self, node: &str) -> Option<Arc<str>> {
        self.management_urls
            .get(node)
            .map(|url| url.value().clone())
    }

    /// For each of `partitions` shards, the gRPC URL of its owner, or "" when the shard has no
    /// owner or its owner has not said where it serves gRPC.
    pub fn owner_urls(&self, partitions: u32) -> Vec<String> {
        (0..partitions)
            .map(|shard| {
                self.owners
                    .get(&shard)
                    .and_then(|node| self.grpc_urls.get(node.value()).map(|u| u.to_string()))
                    .unwrap_or_default()
            })
            .collect()
    }

    pub fn local_node(&self) -> &Arc<str> {
        &self.local_node
    }

    /// Lock-free lookup for the query path.
    pub fn owner(&self, shard: u32) -> Option<Owner> {
        self.owners.get(&shard).map(|node| {
            if *node.value() == self.local_node {
                Owner::Local
            } else {
                Owner::Remote(node.value().clone())
            }
        })
    }

    /// A receiver that sees every later change, for waiting on a shard without an owner.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies `node`'s complete claim if it is newer than the last one seen from it.
    /// Returns whether it changed anything.
    pub fn apply_claim(&self, node: &str, version: (u64, u64), shards: BTreeSet<u32>) -> bool {
        let node: Arc<str> = Arc::from(node);
        self.departed
            .lock()
            .expect("allocation table lock poisoned")
            .remove(&node);
        let mut claims = self.claims.lock().expect("allocation table lock poisoned");
        let previous = match claims.get(&node) {
            Some(c) if c.version >= version => return false,
            Some(c) => c.shards.clone(),
            None => BTreeSet::new(),
        };
        if previous == shards {
            claims.insert(node, Claim { version, shards });
            return false;
        }
        // A newly claimed shard moves to the claimant at once: its previous owner released it
        // before Kafka could assign it here (cooperative rebalancing revokes before assigning).
        for shard in shards.difference(&previous) {
            self.owners.insert(*shard, node.clone());
        }
        for shard in previous.difference(&shards) {
            self.release_if_owned_by(&claims, *shard, &node);
        }
        claims.insert(node, Claim { version, shards });
        drop(claims);
        self.changes.send_modify(|v| *v += 1);
        true
    }

    /// Forgets every claim of a node that left the cluster; one that still held shards is
    /// remembered as departed (one that handed everything off committed as it did).
    pub fn remove_node(&self, node: &str) -> Vec<u32> {
        let node: Arc<str> = Arc::from(node);
        let mut claims = self.claims.lock().expect("allocation table lock poisoned");
        let Some(claim) = claims.remove(&node) else {
            return Vec::new();
        };
        if !claim.shards.is_empty() {
            self.departed
                .lock()
                .expect("allocation table lock poisoned")
                .insert(
                    node.clone(),
                    Departure {
                        at: Instant::now(),
                        shards: claim.shards.clone(),
                        fenced: false,
                    },
                );
        }
        for shard in &claim.shards {
            self.release_if_owned_by(&claims, *shard, &node);
        }
        drop(claims);
        self.changes.send_modify(|v| *v += 1);
        claim.shards.into_iter().collect()
    }

    /// Clears `shard` if `node` holds it, handing it to another node still claiming it (a
    /// delayed release can arrive after the new owner's claim).
    fn release_if_owned_by(&self, claims: &HashMap<Arc<str>, Claim>, shard: u32, node: &Arc<str>) {
        let owned_by_node = self.owners.get(&shard).is_some_and(|o| o.value() == node);
        if !owned_by_node {
            return;
        }
        self.owners.remove(&shard);
        if let Some((other, _)) = claims
            .iter()
            .find(|(other, c)| *other != node && c.shards.contains(&shard))
        {
            self.owners.insert(shard, other.clone());
        }
    }

    /// The nodes that may have owned `shards` before they were assigned here: their owners in
    /// the table (asked before this node claims them) and every node that left the cluster
    /// since it last claimed anything.
    pub fn previous_owners(&self, shards: &[u32]) -> BTreeSet<String> {
        let mut nodes: BTreeSet<String> = shards
            .iter()
            .filter_map(|s| match self.owner(*s) {
                Some(Owner::Remote(node)) => Some(node.to_string()),
                _ => None,
            })
            .collect();
        let departed = self
            .departed
            .lock()
            .expect("allocation table lock poisoned");
        nodes.extend(
            departed
                .iter()
                .filter(|(_, d)| !d.fenced)
                .map(|(n, _)| n.to_string()),
        );
        nodes
    }

    /// Nodes that departed within `within` and whose transactional ids have not been fenced.
    pub fn departed_unfenced(&self, within: Duration) -> Vec<String> {
        self.departed
            .lock()
            .expect("allocation table lock poisoned")
            .iter()
            .filter(|(_, d)| !d.fenced && d.at.elapsed() <= within)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// `node` was fenced before its shards were assigned anywhere: its departure still dates
    /// their failover, but it is no previous owner to fence any more.
    pub fn mark_fenced(&self, node: &str) {
        if let Some(d) = self
            .departed
            .lock()
            .expect("allocation table lock poisoned")
            .get_mut(node)
        {
            d.fenced = true;
        }
    }

    /// Of `shards`, those a departed node held when it left, with when this node saw it leave.
    pub fn orphaned_since(&self, shards: &[u32]) -> BTreeMap<u32, Instant> {
        let departed = self
            .departed
            .lock()
            .expect("allocation table lock poisoned");
        shards
            .iter()
            .filter_map(|shard| {
                departed
                    .values()
                    .filter(|d| d.shards.contains(shard))
                    .map(|d| d.at)
                    .min()
                    .map(|at| (*shard, at))
            })
            .collect()
    }

    /// Forgets the departures fenced early: their shards' failover was just dated (call after
    /// [`Self::orphaned_since`]).
    pub fn forget_fenced(&self) {
        self.departed
            .lock()
            .expect("allocation table lock poisoned")
            .retain(|_, d| !d.fenced);
    }

    /// `node`'s transactions were ended (fenced): it is no longer a previous owner to fence.
    pub fn forget_departed(&self, node: &str) {
        self.departed
            .lock()
            .expect("allocation table lock poisoned")
            .remove(node);
    }

    /// Shards this node claims.
    pub fn local_shards(&self) -> BTreeSet<u32> {
        self.claims_of(&self.local_node.clone())
    }

    pub fn claims_of(&self, node: &str) -> BTreeSet<u32> {
        let claims = self.claims.lock().expect("allocation table lock poisoned");
        claims
            .get(node)
            .map(|c| c.shards.clone())
            .unwrap_or_default()
    }

    /// When each node that claimed shards started (the incarnation of its latest claim).
    pub fn incarnations(&self) -> BTreeMap<String, u64> {
        let claims = self.claims.lock().expect("allocation table lock poisoned");
        claims
            .iter()
            .map(|(node, claim)| (node.to_string(), claim.version.0))
            .collect()
    }

    /// Every known node and the shards the table routes to it.
    pub fn members(&self) -> BTreeMap<String, BTreeSet<u32>> {
        let mut members: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        {
            let claims = self.claims.lock().expect("allocation table lock poisoned");
            for node in claims.keys() {
                members.entry(node.to_string()).or_default();
            }
        }
        members.entry(self.local_node.to_string()).or_default();
        for entry in self.owners.iter() {
            members
                .entry(entry.value().to_string())
                .or_default()
                .insert(*entry.key());
        }
        members
    }
}

/// Records `url` for `node` unless empty (a node of an older build says nothing) or unchanged.
fn set_url(urls: &DashMap<Arc<str>, Arc<str>>, node: &str, url: &str) {
    if url.is_empty() || urls.get(node).is_some_and(|u| **u == *url) {
        return;
    }
    urls.insert(Arc::from(node), Arc::from(url));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_urls_follow_claims_and_stay_empty_without_an_owner_or_url() {
        let t = AllocationTable::new("a");
        t.set_grpc_url("a", "http://a:1");
        t.apply_claim("a", (1, 1), set(&[0]));
        t.apply_claim("b", (1, 1), set(&[1]));
        t.apply_claim("c", (1, 1), set(&[2]));
        t.set_grpc_url("b", "http://b:1");
        assert_eq!(t.owner_urls(4), ["http://a:1", "http://b:1", "", ""]);
        // b hands shard 1 to a.
        t.apply_claim("b", (1, 2), set(&[]));
        t.apply_claim("a", (1, 2), set(&[0, 1]));
        assert_eq!(t.owner_urls(2), ["http://a:1", "http://a:1"]);
    }

    fn set(shards: &[u32]) -> BTreeSet<u32> {
        shards.iter().copied().collect()
    }

    #[test]
    fn claims_route_to_local_and_remote_nodes() {
        let t = AllocationTable::new("a");
        t.apply_claim("a", (1, 1), set(&[0, 1]));
        t.apply_claim("b", (1, 1), set(&[2]));
        assert_eq!(t.owner(0), Some(Owner::Local));
        assert_eq!(t.owner(2), Some(Owner::Remote("b".into())));
        assert_eq!(t.owner(3), None);
    }

    #[test]
    fn previous_owners_are_the_table_owners_and_the_departed_until_they_claim_again() {
        let t = AllocationTable::new("a");
        t.apply_claim("b", (1, 1), set(&[1]));
        t.apply_claim("c", (1, 1), set(&[2]));
        t.apply_claim("d", (1, 1), set(&[3]));
        assert_eq!(t.remove_node("c"), vec![2]);
        let previous = t.previous_owners(&[1, 2]);
        assert_eq!(
            previous,
            ["b", "c"].map(String::from).into(),
            "b owned 1; c left the cluster (it may have owned 2); d owned neither"
        );
        assert_eq!(
            t.orphaned_since(&[1, 2]).into_keys().collect::<Vec<_>>(),
            vec![2],
            "only c left holding a shard, and it held 2"
        );
        // Back with a new incarnation: its transactions are its own again.
        t.apply_claim("c", (2, 0), BTreeSet::new());
        assert_eq!(t.previous_owners(&[2]), BTreeSet::new());
        // Fenced early (as soon as the group dropped it): its shard is still orphaned.
        t.apply_claim("c", (3, 0), set(&[2]));
        t.remove_node("c");
        let recently = Duration::from_secs(60);
        assert_eq!(t.departed_unfenced(recently), vec!["c".to_string()]);
        assert_eq!(t.departed_unfenced(Duration::ZERO), Vec::<String>::new());
        t.mark_fenced("c");
        assert_eq!(t.previous_owners(&[2]), BTreeSet::new());
        assert_eq!(t.departed_unfenced(recently), Vec::<String>::new());
        assert_eq!(
            t.orphaned_since(&[2]).len(),
            1,
            "its failover is still timed"
        );
        t.forget_departed("c");
        // Fenced once, not again.
        t.remove_node("d");
        assert_eq!(t.previous_owners(&[]), ["d"].map(String::from).into());
        t.forget_departed("d");
        assert_eq!(t.previous_owners(&[]), BTreeSet::new());
        // A node that handed everything off before it left has nothing open to end.
        t.apply_claim("e", (1, 1), set(&[4]));
        t.apply_claim("e", (1, 2), BTreeSet::new());
        t.remove_node("e");
        assert_eq!(t.previous_owners(&[4]), BTreeSet::new());
    }

    #[test]
    fn stale_announcements_are_ignored() {
        let t = AllocationTable::new("a");
        assert!(t.apply_claim("b", (1, 5), set(&[2])));
        assert!(!t.apply_claim("b", (1, 4), set(&[3])));
        assert_eq!(t.owner(3), None);
        // A restarted node has a newer incarnation even with a lower sequence number.
        assert!(t.apply_claim("b", (2, 0), set(&[3])));
        assert_eq!(t.owner(3), Some(Owner::Remote("b".into())));
        assert_eq!(t.owner(2), None);
    }

    #[test]
    fn a_delayed_release_does_not_clear_the_new_owner() {
        let t = AllocationTable::new("c");
        t.apply_claim("a", (1, 1), set(&[5, 6]));
        // b's claim of 5 arrives before a's release of it.
        t.apply_claim("b", (1, 1), set(&[5]));
        assert_eq!(t.owner(5), Some(Owner::Remote("b".into())));
        t.apply_claim("a", (1, 2), set(&[6]));
        assert_eq!(t.owner(5), Some(Owner::Remote("b".into())));
        assert_eq!(t.owner(6), Some(Owner::Remote("a".into())));
    }

    #[test]
    fn a_release_hands_the_shard_to_another_claimant() {
        let t = AllocationTable::new("c");
        t.apply_claim("b", (1, 1), set(&[5]));
        t.apply_claim("a", (1, 1), set(&[5])); // stale claim arrives late and wins for now
        assert_eq!(t.owner(5), Some(Owner::Remote("a".into())));
        t.apply_claim("a", (1, 2), set(&[])); // a's release
        assert_eq!(t.owner(5), Some(Owner::Remote("b".into())));
    }

    #[test]
    fn removing_a_node_clears_its_shards_and_notifies() {
        let t = AllocationTable::new("a");
        let mut rx = t.subscribe();
        t.apply_claim("b", (1, 1), set(&[1, 2]));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(t.remove_node("b"), vec![1, 2]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(t.owner(1), None);
        assert_eq!(t.members().len(), 1);
    }

    #[test]
    fn members_list_every_node_with_its_shards() {
        let t = AllocationTable::new("a");
        t.apply_claim("a", (1, 1), set(&[0]));
        t.apply_claim("b", (1, 1), set(&[1, 2]));
        let m = t.members();
        assert_eq!(m["a"], set(&[0]));
        assert_eq!(m["b"], set(&[1, 2]));
    }
}
