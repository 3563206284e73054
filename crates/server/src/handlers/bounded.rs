//! Bounded replies (PROTOCOL.md "Bounded replies"): no server frame is larger than `max_reply_bytes`.
//! Replies that could be larger are measured item by item (the JSON each item adds to the frame) and
//! packed into parts; a lone item is always small enough, because the configuration requires
//! `max_reply_bytes` to hold the largest single item (see `Config::validate`).
//!
//! Decrypting and measuring a big reply runs on the blocking pool ([`off_workers`]), so that one user's
//! 10,000-chat sync never stalls the async workers that serve everyone else.

use crate::error::Error;
use serde::Serialize;

/// Room kept in every frame for the envelope (`type`, a `request_id` of up to 64 characters), the
/// payload's fixed members and `more`.
pub const ENVELOPE_BYTES: usize = 512;

/// The length of `value` serialized as compact JSON, without building the text.
pub fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Unserializable values never reach here (every payload type serializes); count them as huge.
        Err(_) => usize::MAX / 2,
    }
}

/// Packs items into parts of at most `budget` bytes each (an item costs its size plus a separator).
pub struct Packer {
    budget: usize,
    used: usize,
}

impl Packer {
    /// A packer for frames of at most `budget` bytes.
    pub fn new(budget: usize) -> Packer {
        Packer { budget, used: ENVELOPE_BYTES }
    }

    /// Whether an item of `size` bytes still fits in the current part.
    pub fn fits(&self, size: usize) -> bool {
        self.used.saturating_add(size).saturating_add(1) <= self.budget
    }

    /// Counts an item of `size` bytes into the current part.
    pub fn add(&mut self, size: usize) {
        self.used = self.used.saturating_add(size).saturating_add(1);
    }

    /// Starts a new part.
    pub fn next_part(&mut self) {
        self.used = ENVELOPE_BYTES;
    }

    /// Whether the current part holds no item yet.
    pub fn is_empty(&self) -> bool {
        self.used == ENVELOPE_BYTES
    }
}

/// Runs CPU-heavy reply building (decryption, measuring) on the blocking pool.
pub async fn off_workers<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::internal(format!("reply builder failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_the_serialized_length() {
        let v = serde_json::json!({"a": [1, "two", null], "b": "é\"\n"});
        assert_eq!(json_len(&v), serde_json::to_string(&v).unwrap().len());
    }

    #[test]
    fn packer_splits_at_the_budget() {
        let mut p = Packer::new(ENVELOPE_BYTES + 10);
        assert!(p.fits(9));
        p.add(4);
        assert!(p.fits(4));
        assert!(!p.fits(5));
        p.next_part();
        assert!(p.is_empty());
    }
}
