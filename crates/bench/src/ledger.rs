//! Completeness accounting for broadcasts: every update that the server did not reject must reach
//! each other connection of its user exactly once. Counts expected, received (first copies),
//! duplicates, missing, and deliveries the ledger cannot place (unknown update or wrong receiver).

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
        self.sent.insert(key, Sent { receivers, rejected: false });
    }

    /// The server answered the update with an error: no deliveries are expected.
    pub fn rejected(&mut self, key: UpdateKey) {
        if let Some(s) = self.sent.get_mut(&key) {
            s.rejected = true;
        }
    }

    /// A broadcast of `key` arrived at connection `receiver`.
    pub fn delivered(&mut self, receiver: u32, key: UpdateKey) -> Delivery {
        let expected = self.sent.get(&key).is_some_and(|s| s.receivers.contains(&receiver));
        if !expected {
            self.unexpected += 1;
            return Delivery::Unexpected;
        }
        if self.seen.insert((receiver, key)) {
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
}
