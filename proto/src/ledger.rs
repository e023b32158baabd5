//! The ledger: expected totals per user over every event the broker acknowledged.
//!
//! The producer writes it at the end of a run (`--ledger FILE`); `client verify` and the
//! tests compare every user's queried totals against it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Totals one user should have: number of purchases and Σ quantity × price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedTotals {
    pub purchases: i64,
    pub amount_spent: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Topic the events were written to.
    pub topic: String,
    /// Events acknowledged by the broker (and so counted below).
    pub acknowledged_events: u64,
    /// Events the broker did not acknowledge (not counted).
    pub failed_events: u64,
    /// Users the producer drew from (`0..users`), including those that got no event.
    pub users: u64,
    pub totals: BTreeMap<String, ExpectedTotals>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read ledger {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write ledger {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("ledger {path} is not valid JSON: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

impl Ledger {
    pub fn new(topic: impl Into<String>, users: u64) -> Self {
        Self {
            topic: topic.into(),
            users,
            ..Self::default()
        }
    }

    /// Counts one acknowledged purchase.
    pub fn record(&mut self, user_id: &str, quantity: i64, price: i64) {
        let totals = self.totals.entry(user_id.to_owned()).or_default();
        totals.purchases += 1;
        totals.amount_spent += quantity * price;
        self.acknowledged_events += 1;
    }

    /// Adds another ledger's counts (several producer runs into one expectation).
    pub fn merge(&mut self, other: &Ledger) {
        for (user, t) in &other.totals {
            let mine = self.totals.entry(user.clone()).or_default();
            mine.purchases += t.purchases;
            mine.amount_spent += t.amount_spent;
        }
        self.acknowledged_events += other.acknowledged_events;
        self.failed_events += other.failed_events;
        self.users = self.users.max(other.users);
    }

    /// Totals for a user, zeros for one that got no event.
    pub fn expected(&self, user_id: &str) -> ExpectedTotals {
        self.totals.get(user_id).copied().unwrap_or_default()
    }

    /// Every user id the run drew from, with or without events.
    pub fn user_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = (0..self.users).map(|u| u.to_string()).collect();
        for id in self.totals.keys() {
            if id.parse::<u64>().map_or(true, |n| n >= self.users) {
                ids.push(id.clone());
            }
        }
        ids
    }

    pub fn load(path: &Path) -> Result<Self, LedgerError> {
        let text = std::fs::read_to_string(path).map_err(|source| LedgerError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| LedgerError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), LedgerError> {
        let text = serde_json::to_string_pretty(self).expect("a ledger always serializes");
        std::fs::write(path, text).map_err(|source| LedgerError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_merge_sum_purchases_and_amounts() {
        let mut a = Ledger::new("t", 3);
        a.record("1", 2, 100);
        a.record("1", 1, 5);
        let mut b = Ledger::new("t", 3);
        b.record("1", 1, 1);
        b.record("2", 3, 10);
        a.merge(&b);
        assert_eq!(
            a.expected("1"),
            ExpectedTotals {
                purchases: 3,
                amount_spent: 206
            }
        );
        assert_eq!(
            a.expected("2"),
            ExpectedTotals {
                purchases: 1,
                amount_spent: 30
            }
        );
        assert_eq!(a.expected("0"), ExpectedTotals::default());
        assert_eq!(a.acknowledged_events, 4);
        assert_eq!(a.user_ids(), vec!["0", "1", "2"]);
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = std::env::temp_dir().join(format!("ledger-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ledger.json");
        let mut l = Ledger::new("user-events", 10);
        l.record("7", 2, 1548);
        l.save(&path).unwrap();
        assert_eq!(Ledger::load(&path).unwrap(), l);
    }
}
