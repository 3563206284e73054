//! Per-connection rate limiting: a token bucket (`rate_per_sec`, `rate_burst`) and the abuse rule of
//! PROTOCOL.md section 4 (more than 10x the burst dropped within 10 s closes the connection).

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
    window_start: Instant,
    dropped: u32,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            rate: rate_per_sec as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
            window_start: now,
            dropped: 0,
        }
    }

    /// Charges one frame arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        if now.saturating_duration_since(self.window_start) > ABUSE_WINDOW {
            self.window_start = now;
            self.dropped = 0;
        }
        self.dropped += 1;
        if self.dropped as f64 > 10.0 * self.burst {
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
}
