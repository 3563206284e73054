//! The per-key request limit of the API (`--api-rate-per-sec`, `--api-rate-burst`; off by default): a
//! token bucket per API key on each node. A request beyond it is 429 `rate_limited` with `Retry-After`
//! (SERVER_API.md section 1), the seconds until the bucket holds a request again; nothing of it runs.
//! In a cluster each node counts its own requests (the limit is per node, like the WebSocket's).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Instant;

/// Token buckets, one per API key id.
pub struct ApiRateLimit {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl ApiRateLimit {
    /// A limit of `rate_per_sec` with `burst` (0: the rate); `None` when `rate_per_sec` is 0 (no limit).
    pub fn new(rate_per_sec: u32, burst: u32) -> Option<ApiRateLimit> {
        (rate_per_sec > 0).then(|| ApiRateLimit {
            rate: rate_per_sec as f64,
            burst: if burst == 0 { rate_per_sec } else { burst } as f64,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Charges one request of `key_id` arriving at `now`: `Err(seconds)` (at least 1, for `Retry-After`)
    /// when its bucket is empty. A key's first request finds a full bucket.
    pub fn charge(&self, key_id: &str, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock();
        let bucket = match buckets.get_mut(key_id) {
            Some(b) => b,
            None => buckets.entry(key_id.to_owned()).or_insert(Bucket { tokens: self.burst, last: now }),
        };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        // `now` is read before the lock: a request that read it earlier may come second. The bucket's
        // time never goes back, or the time between the two would be refilled twice.
        bucket.last = bucket.last.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - bucket.tokens) / self.rate).ceil() as u64).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_key_and_the_wait_in_whole_seconds() {
        assert!(ApiRateLimit::new(0, 10).is_none(), "0 is no limit");
        let limit = ApiRateLimit::new(2, 3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.charge("ak_a", t0), Ok(()));
        }
        assert_eq!(limit.charge("ak_a", t0), Err(1));
        assert_eq!(limit.charge("ak_b", t0), Ok(()), "each key has its own bucket");
        assert_eq!(limit.charge("ak_a", t0 + Duration::from_millis(500)), Ok(()), "one token after 1/rate");
        assert_eq!(limit.charge("ak_a", t0 + Duration::from_millis(500)), Err(1));
        assert_eq!(limit.charge("ak_a", t0 + Duration::from_secs(60)), Ok(()), "refilled, up to the burst only");
        // A request whose time was read before the last one's (it took the lock second) refills nothing,
        // and does not move the bucket's time back (the same second would be refilled again after it).
        let racing = ApiRateLimit::new(1, 1).unwrap();
        assert_eq!(racing.charge("k", t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(racing.charge("k", t0 + Duration::from_secs(9)), Err(1));
        assert_eq!(racing.charge("k", t0 + Duration::from_millis(10_500)), Err(1), "half a token since 10 s");
        let slow = ApiRateLimit::new(1, 0).unwrap();
        assert_eq!(slow.charge("k", t0), Ok(()), "burst 0 means the rate");
        assert_eq!(slow.charge("k", t0), Err(1));
        let trickle = ApiRateLimit::new(1, 1).unwrap();
        trickle.charge("k", t0).unwrap();
        assert_eq!(trickle.charge("k", t0 + Duration::from_millis(100)), Err(1), "0.9 s rounds up to 1");
    }
}
