//! Completeness accounting for broadcasts: every update that the server did not reject must reach
//! each other connection of its user exactly once. Counts expected, received (first copies),
//! duplicates, missing, and deliveries the ledger cannot place (unknown update or wrong receiver).
//! It also keeps, per receiver, how many expected deliveries are still outstanding, so that a
//! connection can be closed and reopened (soak) only when nothing is in flight to it.

use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Identifies one update: the sending connection and its send sequence number.
pub type UpdateKey = (u32, u32);

#[derive(Debug)]
struct Sent {
    receivers: Vec<u32>,
    rejected: bool,
}

/// The ledger of sent updates and their deliveries.
#[derive(Debug, Default)]
pub struct Ledger {
    sent: HashMap<UpdateKey, Sent>,
    seen: HashSet<(u32, UpdateKey)>,
    duplicates: u64,
    unexpected: u64,
    pending: HashMap<u32, u64>,
}

/// What [`Ledger::delivered`] made of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The first copy at this receiver: count its latency.
    First,
    /// Seen before at this receiver.
    Duplicate,
    /// Not an update this ledger sent to this receiver.
    Unexpected,
}

/// The completeness numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Completeness {
    /// Updates sent.
    pub sent: u64,
    /// Updates the server rejected with an error (no deliveries expected).
    pub rejected: u64,
    /// Deliveries expected: for every non-rejected update, one per other connection of its user.
    pub expected: u64,
    /// Expected deliveries that arrived (first copies).
    pub received: u64,
    /// Extra copies of a delivery already received.
    pub duplicates: u64,
    /// Expected deliveries that never arrived.
    pub missing: u64,
    /// Deliveries of unknown or rejected updates, or to a connection that should not get them.
    pub unexpected: u64,
}

impl Ledger {
    /// Records an update about to be sent, to be delivered to `receivers` (other connection indexes).
    pub fn sent(&mut self, key: UpdateKey, receivers: Vec<u32>) {
        for r in &receivers {
            *self.pending.entry(*r).or_default() += 1;
        }
        if let Some(old) = self.sent.insert(key, Sent { receivers, rejected: false }) {
            // A reused key: forget what the old entry still expected.
            self.release(key, &old.receivers);
        }
    }

    /// The server answered the update with an error: no deliveries are expected.
    pub fn rejected(&mut self, key: UpdateKey) {
        let Some(s) = self.sent.get_mut(&key) else { return };
        if s.rejected {
            return;
        }
        s.rejected = true;
        let receivers = s.receivers.clone();
        self.release(key, &receivers);
    }

    /// Drops the outstanding count of `key` at each receiver that has not received it yet.
    fn release(&mut self, key: UpdateKey, receivers: &[u32]) {
        for r in receivers {
            if !self.seen.contains(&(*r, key)) {
                if let Some(n) = self.pending.get_mut(r) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    /// Expected deliveries to `receiver` that have not arrived yet (rejected updates excluded).
    pub fn pending_for(&self, receiver: u32) -> u64 {
        self.pending.get(&receiver).copied().unwrap_or(0)
    }

    /// A broadcast of `key` arrived at connection `receiver`.
    pub fn delivered(&mut self, receiver: u32, key: UpdateKey) -> Delivery {
        let Some(s) = self.sent.get(&key).filter(|s| s.receivers.contains(&receiver)) else {
            self.unexpected += 1;
            return Delivery::Unexpected;
        };
        let rejected = s.rejected;
        if self.seen.insert((receiver, key)) {
            if !rejected {
                if let Some(n) = self.pending.get_mut(&receiver) {
                    *n = n.saturating_sub(1);
                }
            }
            Delivery::First
        } else {
            self.duplicates += 1;
            Delivery::Duplicate
        }
    }

    /// Whether every expected delivery has arrived.
    pub fn complete(&self) -> bool {
        let s = self.summary();
        s.missing == 0
    }

    /// The numbers so far.
    pub fn summary(&self) -> Completeness {
        let mut c = Completeness {
            sent: self.sent.len() as u64,
            duplicates: self.duplicates,
            unexpected: self.unexpected,
            ..Completeness::default()
        };
        for (key, s) in &self.sent {
            if s.rejected {
                c.rejected += 1;
                // Deliveries of a rejected update are not expected.
                let got = s.receivers.iter().filter(|r| self.seen.contains(&(**r, *key))).count();
                c.unexpected += got as u64;
                continue;
            }
            c.expected += s.receivers.len() as u64;
            c.received += s.receivers.iter().filter(|r| self.seen.contains(&(**r, *key))).count() as u64;
        }
        c.missing = c.expected - c.received;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expected_received_duplicates_missing() {
        let mut l = Ledger::default();
        l.sent((0, 1), vec![1, 2]);
        l.sent((1, 1), vec![0, 2]);
        assert_eq!(l.delivered(1, (0, 1)), Delivery::First);
        assert_eq!(l.delivered(1, (0, 1)), Delivery::Duplicate);
        assert_eq!(l.delivered(2, (0, 1)), Delivery::First);
        assert_eq!(l.delivered(0, (1, 1)), Delivery::First);
        assert_eq!(l.delivered(0, (0, 1)), Delivery::Unexpected, "the sender is not a receiver");
        assert_eq!(l.delivered(5, (9, 9)), Delivery::Unexpected);
        assert!(!l.complete());
        let s = l.summary();
        assert_eq!(
            s,
            Completeness { sent: 2, rejected: 0, expected: 4, received: 3, duplicates: 1, missing: 1, unexpected: 2 }
        );
        l.delivered(2, (1, 1));
        assert!(l.complete());
    }

    #[test]
    fn rejected_updates_expect_nothing() {
        let mut l = Ledger::default();
        l.sent((0, 0), vec![1, 2]);
        l.rejected((0, 0));
        let s = l.summary();
        assert_eq!((s.rejected, s.expected, s.missing), (1, 0, 0));
        l.delivered(1, (0, 0));
        assert_eq!(l.summary().unexpected, 1);
    }

    #[test]
    fn pending_per_receiver() {
        let mut l = Ledger::default();
        l.sent((0, 0), vec![1, 2]);
        l.sent((0, 1), vec![1, 2]);
        l.sent((1, 0), vec![0, 2]);
        assert_eq!((l.pending_for(0), l.pending_for(1), l.pending_for(2)), (1, 2, 3));
        l.delivered(1, (0, 0));
        l.delivered(1, (0, 0)); // a duplicate does not count twice
        assert_eq!(l.pending_for(1), 1);
        l.delivered(2, (0, 1));
        l.rejected((0, 1)); // still expected at 1, not at 2 (already there)
        l.rejected((0, 1)); // idempotent
        assert_eq!((l.pending_for(1), l.pending_for(2)), (0, 2));
        l.delivered(0, (1, 0));
        l.delivered(2, (1, 0));
        l.delivered(2, (0, 0));
        assert_eq!((l.pending_for(0), l.pending_for(1), l.pending_for(2)), (0, 0, 0));
        assert_eq!(l.pending_for(9), 0);
        l.rejected((7, 7)); // unknown key: nothing happens
    }
}
