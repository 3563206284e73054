//! Per-connection rate limiting: a token bucket (`rate_per_sec`, `rate_burst`) and the abuse rule of
//! PROTOCOL.md section 4 (more than 10x the burst dropped within 10 s closes the connection).
//!
//! The abuse rule holds for every 10 s, not for fixed windows: the times of the drops of the last 10 s
//! are kept (at most 10x the burst of them, since one more closes; no allocation for a connection that
//! keeps to its rate). Each drop queues a `rate_limited` reply as well, which is larger.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// The verdict on one inbound frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Process it.
    Allow,
    /// Drop it and answer `rate_limited`.
    Drop,
    /// Drop it and close the connection with 1008 `Rate limit exceeded`.
    Close,
}

/// A token bucket plus a count of recent drops.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// When the drops of the last [`ABUSE_WINDOW`] happened, oldest first; `None` when there were none
    /// (a connection that keeps to its rate pays one word for them, where a `VecDeque` takes four).
    #[allow(clippy::box_collection)]
    drops: Option<Box<VecDeque<Instant>>>,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32) -> RateLimiter {
        let now = Instant::now();
        RateLimiter { rate: rate_per_sec as f64, burst: burst as f64, tokens: burst as f64, last: now, drops: None }
    }

    /// Charges one frame arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        let stale = |t: &Instant| now.saturating_duration_since(*t) > ABUSE_WINDOW;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            // The memory of a run of drops that is over is given back.
            if self.drops.as_ref().is_some_and(|d| d.back().is_none_or(stale)) {
                self.drops = None;
            }
            return Verdict::Allow;
        }
        let drops = self.drops.get_or_insert_default();
        while drops.front().is_some_and(stale) {
            drops.pop_front();
        }
        drops.push_back(now);
        if drops.len() as f64 > 10.0 * self.burst {
            Verdict::Close
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_drop_then_close() {
        let t = Instant::now();
        let mut r = RateLimiter::new(1, 2);
        assert_eq!(r.check(t), Verdict::Allow);
        assert_eq!(r.check(t), Verdict::Allow);
        for _ in 0..20 {
            assert_eq!(r.check(t), Verdict::Drop);
        }
        assert_eq!(r.check(t), Verdict::Close);
    }

    #[test]
    fn refills_at_the_rate() {
        let t = Instant::now();
        let mut r = RateLimiter::new(10, 1);
        assert_eq!(r.check(t), Verdict::Allow);
        assert_eq!(r.check(t), Verdict::Drop);
        assert_eq!(r.check(t + Duration::from_millis(100)), Verdict::Allow);
    }

    #[test]
    fn drops_are_forgiven_after_the_window() {
        let t = Instant::now();
        let mut r = RateLimiter::new(1, 1);
        assert_eq!(r.check(t), Verdict::Allow);
        for _ in 0..10 {
            assert_eq!(r.check(t), Verdict::Drop);
        }
        let later = t + Duration::from_secs(11);
        assert_eq!(r.check(later), Verdict::Allow);
        assert_eq!(r.check(later), Verdict::Drop);
    }

    /// The rule holds for any 10 s, not for windows that start anew: drops just before and just after
    /// the 10 s mark of a window count together.
    #[test]
    fn drops_on_both_sides_of_a_window_mark_count_together() {
        let t = Instant::now();
        let mut r = RateLimiter::new(1, 1);
        let before = t + Duration::from_millis(9_900);
        assert_eq!(r.check(before), Verdict::Allow);
        for _ in 0..10 {
            assert_eq!(r.check(before), Verdict::Drop);
        }
        // 0.2 s later: the 11th drop within 10 s.
        assert_eq!(r.check(t + Duration::from_millis(10_100)), Verdict::Close);
    }

    /// A run of drops that is over gives its memory back; the rule still holds after it.
    #[test]
    fn a_run_of_drops_that_is_over_is_forgotten() {
        let t = Instant::now();
        let mut r = RateLimiter::new(1, 1);
        assert_eq!(r.check(t), Verdict::Allow);
        assert_eq!(r.check(t), Verdict::Drop);
        assert!(r.drops.is_some());
        let later = t + Duration::from_secs(11);
        assert_eq!(r.check(later), Verdict::Allow);
        assert!(r.drops.is_none());
        for _ in 0..10 {
            assert_eq!(r.check(later), Verdict::Drop);
        }
        assert_eq!(r.check(later), Verdict::Close);
    }
}
