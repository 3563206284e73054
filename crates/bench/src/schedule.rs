//! Open-loop send schedules, computed upfront so that a slow server cannot slow the load down, and
//! the request mix of the fan-out and soak scenarios (writes that are broadcast, and reads answered
//! to the sender only). All times are microseconds from the scenario start.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::str::FromStr;

/// Send times of user `u` (of `users`), each sending `rate` per second for `duration_secs`. Users
/// are phase-shifted evenly across one period, so the total load is smooth rather than bursty.
pub fn user_offsets(u: usize, users: usize, rate: f64, duration_secs: f64) -> Vec<u64> {
    if rate <= 0.0 || users == 0 {
        return Vec::new();
    }
    let period = 1.0 / rate;
    let phase = period * u as f64 / users as f64;
    (0..)
        .map(|k| phase + k as f64 * period)
        .take_while(|t| *t < duration_secs)
        .map(|t| (t * 1e6).round() as u64)
        .collect()
}

/// Send times of connection `i` of `n` that together offer `rate` per second for `duration_secs`:
/// the merged schedule is one send every `1/rate` seconds, dealt round-robin to the connections.
pub fn conn_offsets(i: usize, n: usize, rate: f64, duration_secs: f64) -> Vec<u64> {
    if rate <= 0.0 || n == 0 {
        return Vec::new();
    }
    (0..)
        .map(|k| (i + k * n) as f64 / rate)
        .take_while(|t| *t < duration_secs)
        .map(|t| (t * 1e6).round() as u64)
        .collect()
}

/// The kinds of request the fan-out and soak scenarios send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// `update_draft` → OTHERS `chat_draft_updated`.
    Draft,
    /// `chat_message_added` → OTHERS `chat_message_added`.
    Message,
    /// `update_title` → ALL `chat_title_updated`.
    Title,
    /// `initial_sync_request` (empty `chat_versions`) → SELF `initial_sync_response`; nothing broadcast.
    Sync,
    /// `get_chat_messages` → SELF `chat_messages_response`; nothing broadcast.
    History,
}

impl UpdateKind {
    /// Whether the server broadcasts this request to the user's other connections.
    pub fn is_write(self) -> bool {
        matches!(self, UpdateKind::Draft | UpdateKind::Message | UpdateKind::Title)
    }
}

/// Relative weights of the request kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mix {
    /// Weight of `update_draft`.
    pub draft: u32,
    /// Weight of `chat_message_added`.
    pub message: u32,
    /// Weight of `update_title`.
    pub title: u32,
    /// Weight of `initial_sync_request`.
    pub sync: u32,
    /// Weight of `get_chat_messages`.
    pub history: u32,
}

impl FromStr for Mix {
    type Err = anyhow::Error;

    /// `draft=60,message=30,title=10[,sync=N,history=N]` (missing kinds weigh 0; at least one must be positive).
    fn from_str(s: &str) -> Result<Mix> {
        let mut mix = Mix { draft: 0, message: 0, title: 0, sync: 0, history: 0 };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').context("mix entries are KIND=WEIGHT")?;
            let v: u32 = v.trim().parse().with_context(|| format!("bad weight in {part:?}"))?;
            match k.trim() {
                "draft" | "update_draft" => mix.draft = v,
                "message" | "chat_message_added" => mix.message = v,
                "title" | "update_title" => mix.title = v,
                "sync" | "initial_sync_request" => mix.sync = v,
                "history" | "get_chat_messages" => mix.history = v,
                other => bail!("unknown kind {other:?} (draft, message, title, sync, history)"),
            }
        }
        if mix.total() == 0 {
            bail!("the mix needs at least one positive weight");
        }
        Ok(mix)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Mix {
    /// Sum of the weights.
    pub fn total(&self) -> u64 {
        [self.draft, self.message, self.title, self.sync, self.history].iter().map(|&w| w as u64).sum()
    }

    /// The kind of the `k`-th send of user `u`: deterministic, and in the mix's proportions overall.
    pub fn pick(&self, u: u64, k: u64) -> UpdateKind {
        let mut x = splitmix64(u.wrapping_mul(0x1_0000_0001).wrapping_add(k)) % self.total();
        for (w, kind) in [
            (self.draft, UpdateKind::Draft),
            (self.message, UpdateKind::Message),
            (self.title, UpdateKind::Title),
            (self.sync, UpdateKind::Sync),
        ] {
            if x < w as u64 {
                return kind;
            }
            x -= w as u64;
        }
        UpdateKind::History
    }
}

/// A deterministic coin with probability `p` for the `k`-th step of user `u` (independent of [`Mix::pick`]).
pub fn chance(u: u64, k: u64, p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    let x = splitmix64(splitmix64(u ^ 0x5eed_5eed_0000_0000).wrapping_add(k));
    ((x >> 11) as f64 / (1u64 << 53) as f64) < p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_offsets_are_periodic_and_phase_shifted() {
        let a = user_offsets(0, 4, 1.0, 3.0);
        let b = user_offsets(1, 4, 1.0, 3.0);
        assert_eq!(a, vec![0, 1_000_000, 2_000_000]);
        assert_eq!(b, vec![250_000, 1_250_000, 2_250_000]);
        assert_eq!(user_offsets(3, 4, 2.0, 1.0), vec![375_000, 875_000]);
        assert!(user_offsets(0, 1, 0.0, 10.0).is_empty());
    }

    #[test]
    fn conn_offsets_merge_into_an_even_schedule() {
        let n = 3;
        let mut all: Vec<u64> = (0..n).flat_map(|i| conn_offsets(i, n, 100.0, 1.0)).collect();
        all.sort();
        assert_eq!(all.len(), 100);
        assert!(all.windows(2).all(|w| w[1] - w[0] == 10_000), "{all:?}");
        assert_eq!(conn_offsets(1, 3, 100.0, 1.0)[..2], [10_000, 40_000]);
    }

    #[test]
    fn mix_parses_and_keeps_proportions() {
        let mix: Mix = "draft=60, message=30,title=10".parse().unwrap();
        assert_eq!((mix.draft, mix.message, mix.title), (60, 30, 10));
        let mut counts = [0u32; 3];
        for u in 0..100 {
            for k in 0..100 {
                counts[mix.pick(u, k) as usize] += 1;
            }
        }
        assert!((5700..6300).contains(&counts[0]), "{counts:?}");
        assert!((2700..3300).contains(&counts[1]), "{counts:?}");
        assert!((800..1200).contains(&counts[2]), "{counts:?}");
        assert_eq!("title=1".parse::<Mix>().unwrap().pick(7, 9), UpdateKind::Title);
        assert!("draft=0".parse::<Mix>().is_err());
        assert!("bogus=1".parse::<Mix>().is_err());
    }

    #[test]
    fn mix_with_reads_keeps_proportions() {
        let mixed: Mix = "draft=60,message=30,title=10,sync=50,history=50".parse().unwrap();
        assert_eq!(mixed.total(), 200);
        let mut counts = [0u32; 5];
        for u in 0..100 {
            for k in 0..100 {
                counts[mixed.pick(u, k) as usize] += 1;
            }
        }
        assert!((2700..3300).contains(&counts[0]), "{counts:?}");
        assert!((2200..2800).contains(&counts[3]), "{counts:?}");
        assert!((2200..2800).contains(&counts[4]), "{counts:?}");
        assert!(!UpdateKind::Sync.is_write() && !UpdateKind::History.is_write() && UpdateKind::Title.is_write());
        assert_eq!("get_chat_messages=1".parse::<Mix>().unwrap().pick(1, 2), UpdateKind::History);
    }

    #[test]
    fn chance_has_the_asked_probability() {
        let hits =
            (0..100u64).flat_map(|u| (0..1000u64).map(move |k| (u, k))).filter(|&(u, k)| chance(u, k, 0.01)).count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|k| chance(3, k, 0.0)));
        assert!((0..1000).all(|k| chance(3, k, 1.0)));
    }
}
