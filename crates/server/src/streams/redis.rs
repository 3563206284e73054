//! The cluster [`StreamRegistry`]: open streams in Redis, so that a stream started through one node's API
//! takes chunks through any other and shows in `active_streams` on every node.
//!
//! Keys (under the configured `redis_prefix`, `P`; `U` = 128 bits of SHA-256 of the user id, `S` = the
//! same of chat id and stream id, so key names show neither):
//! * `P stream:{U}:S`: a hash `rec` (the key and [`StreamInfo`], sealed), `seq`, `bytes` (text so far),
//!   `last` (unix ms of the start or last chunk), `on` (the nonce of the open that created it) and `an`
//!   (that of the last accepted append: see below);
//! * `P stream:{U}:S:c`: a list of sealed chunks, each `seq` (8 bytes, big endian) + delta, bound to its
//!   stream by the associated data and checked on read to be strictly increasing and to end at or before
//!   `seq`. Only chunks with text are kept: an empty delta moves `seq` and `last` and adds no entry, so the
//!   list has at most one entry per byte of the stream's capped text (an entry per empty chunk grew it
//!   without bound, and READ copies the whole list inside its script). And the list is kept compact: the
//!   hash's `merged` counts the entries at its head that are merged runs; once more than
//!   [`COMPACT_AFTER`] entries follow them, the node whose append made it so merges those into one entry
//!   once it has delivered the chunk (`tidy`: `COMPACT_READ`, then `COMPACT`, which replaces them only if
//!   they are still there; bounded to 1 s, and after a failure tried again at 256 unmerged entries and
//!   every 256 after), so a stream of token-sized chunks holds about one entry per 64 chunks (each sealed
//!   chunk costs ~36 bytes of nonce, tag and seq besides Redis's own per-entry overhead: 2,000 chunks of 4
//!   bytes, 8 KB of text, took 90.7 KB of Redis memory one entry each, and take 11.5 KB merged);
//! * `P stream:{U}:S:taken:N`: a stream just taken (`N`, 128 random bits in hex, is the take's nonce): a
//!   list `rec`, `seq`, `last`, then the chunks as above, expiring after 60 s (`TAKEN_TTL_MS`); once a
//!   take that ran its script more than once has its reply, a string (`1`, same expiry) that tells a late
//!   run of it that it is over (a take answered at its first run deletes the key);
//! * `P streams:{U}`: the set of the user's open `S` (for `active_streams`, and counted by `OPEN` against
//!   the per-user cap of open streams; a member whose hash expired is forgotten by `PRUNE`);
//! * `P streams:idle`: a sorted set `U:S` → `last` at open (only a hint: the sweep re-checks `last`),
//!   its expiry pushed forward by every open and every sweep; an open or a put-back that finds the stream
//!   open moves the entry back to that stream's `last` (`unindex`), so that only chunks keep a stream
//!   from timing out. An entry is dropped only while its score is at most the `last` of the stream that
//!   was taken (by the sweep: its cutoff), never by a plain ZREM:
//!   the same chat and stream id opened again after the take and before that drop puts its own entry
//!   there, at its opening time, and keeps it (`IDLE_DROP`).
//!
//! The user's keys share the hash tag `{U}`, so each script touches one slot (Redis Cluster works). Each
//! operation is one Lua script (atomic: the seq check, the cap and the append together); keys expire after
//! twice the idle timeout as a backstop. Everything stream-specific is sealed with a key derived from the
//! master key (`master.derive("streams")`): Redis never holds a chunk, a user id or metadata in plaintext.
//!
//! A reply may take [`REPLY_TIMEOUT`] (the bus's, not the crate's 500 ms), and a script whose reply is
//! given up on (or whose connection broke between the script and its reply) may still have run. So the
//! scripts that change a stream are idempotent under a nonce the call draws, and a call whose reply is
//! lost runs its script again with the same nonce (`eval_until_answered`: up to `ANSWER_ATTEMPTS` runs,
//! all within `ANSWER_DEADLINE` of the call's start), which answers as the first run did:
//! * an open (`OPEN`) that created the stream leaves its nonce in the hash's `on`; a run again finds it
//!   and answers "new" (not "already open": the stream would never be announced);
//! * an accepted append (`APPEND`) leaves its nonce in `an`; a run again answers "accepted" (not
//!   "duplicate": the chunk would never be delivered), and nothing is appended twice;
//! * a put-back (`RESTORE`, of a stream whose completion failed) leaves a marker `P stream:{U}:S:restored:N`
//!   (`N` its nonce, expiring after 60 s like a taken copy; removed once answered at its first run); a run
//!   again finds it and answers "put back" without looking at the stream, which a take (a device's cancel)
//!   may have ended meanwhile: not reopened;
//! * a take (`take`, and the idle sweep, which takes a stream that is idle) would otherwise lose the
//!   stream, gone from Redis with no copy at the caller: its script (`TAKE`) moves the stream to the taken
//!   key of the take's nonce instead of deleting it (well inside the copy's life), and a run again, finding
//!   the taken key, returns what the first run took.
//!
//! Any other outcome of an open or an append changes nothing, so a run again answers the same. A run of
//! an append that reaches Redis late (sent before a reply timeout, delayed on the network, while a later
//! run answered) changes nothing either: it finds its nonce, or a later `seq`, or no stream. A late run of
//! an open after the stream it opened was taken would open it again (with no idle index entry: its keys'
//! expiry ends it, silently); unlike a take's, nothing marks an open as over, since that takes a window
//! of a whole stream's life, not of one reply.
//!
//! For a take, no other take names its taken key, so of two takes racing on one
//! stream exactly one gets it as before; once the reply is in, the take deletes its taken copy (with the
//! idle index's entry dropped, in one round trip) or, if it ran more than once, replaces it with a marker,
//! so that an earlier run that reaches Redis late (sent before a reply timeout, delayed on the network)
//! finds the take over and takes nothing (it would take the same stream opened again, or put back by a
//! failed completion, into a copy nobody reads). The key's expiry removes the copy when that cleanup never
//! comes. A stream is lost only when every run fails, i.e. Redis stays unreachable or stalled for the
//! whole retry window; ARCHITECTURE.md ("A take in Redis…") describes it.

use super::{Appended, OpenStream, Opened, StreamError, StreamInfo, StreamKey, StreamRegistry};
use crate::cluster::bus::REPLY_TIMEOUT;
use crate::crypto::{Aad, SharedKey};
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::Mutex;

/// Opens a stream unless one is open: returns the existing {`rec`, `last`}, or nil after creating it, or
/// the number of the user's open streams (an integer) when that is the cap already (the user set counts
/// them; see [`PRUNE`] for members whose stream expired). The stream created keeps the open's nonce in
/// `on`: a run of the same open again (its reply was lost) finds it and answers nil, as the run that
/// created it did, not the existing stream (a retried start, which announces nothing).
/// KEYS: hash, chunks, user set. ARGV: rec, now, ttl ms, S, cap, nonce.
const OPEN: &str = r#"
local v = redis.call('HMGET', KEYS[1], 'rec', 'last', 'on')
if v[1] then
  if v[3] == ARGV[6] then return false end
  return {v[1], v[2]}
end
local open = redis.call('SCARD', KEYS[3])
if open >= tonumber(ARGV[5]) then return open end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'seq', 0, 'bytes', 0, 'last', ARGV[2], 'on', ARGV[6])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return false
"#;

/// Appends chunk `seq`: 1 accepted, 0 duplicate, -1 not open, -2 gap (then the last seq as 2nd), -3 cap.
/// Accepted, the 3rd is the number of entries after the merged head (0 when nothing was pushed). The
/// accepting run keeps the append's nonce in `an`: a run of the same append again (its reply was lost)
/// finds it and answers accepted, as the first run did, not duplicate (the chunk would never be
/// delivered). Only the last append's nonce is kept, which is enough: a backend sends the next chunk once
/// this one is answered, and any other outcome changes nothing, so that a run again answers the same.
/// KEYS: hash, chunks, user set. ARGV: seq, sealed chunk (empty for an empty delta: nothing is pushed),
/// delta bytes, cap, now, ttl ms, nonce.
const APPEND: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local h = redis.call('HMGET', KEYS[1], 'seq', 'bytes', 'an', 'merged')
local cur = tonumber(h[1])
local seq = tonumber(ARGV[1])
if h[3] == ARGV[7] then
  local unmerged = 0
  if ARGV[2] ~= '' then unmerged = redis.call('LLEN', KEYS[2]) - tonumber(h[4] or '0') end
  return {1, seq, unmerged}
end
if seq <= cur then return {0, cur} end
if seq ~= cur + 1 then return {-2, cur} end
local bytes = tonumber(h[2]) + tonumber(ARGV[3])
if bytes > tonumber(ARGV[4]) then return {-3, cur} end
redis.call('HSET', KEYS[1], 'seq', seq, 'bytes', bytes, 'last', ARGV[5], 'an', ARGV[7])
local unmerged = 0
if ARGV[2] ~= '' then
  unmerged = redis.call('RPUSH', KEYS[2], ARGV[2]) - tonumber(redis.call('HGET', KEYS[1], 'merged') or '0')
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return {1, seq, unmerged}
"#;

/// The entries after the merged head: {merged, entries...}, or nil when the stream is gone.
/// KEYS: hash, chunks.
const COMPACT_READ: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local m = tonumber(redis.call('HGET', KEYS[1], 'merged') or '0')
local out = {m}
for _, c in ipairs(redis.call('LRANGE', KEYS[2], m, -1)) do table.insert(out, c) end
return out
"#;

/// Replaces the `n` entries after the merged head (`m` of them, as read) with their merged run, if the
/// head is still `m` long and entry `m + n - 1` is still the one read (entries are sealed with random
/// nonces, so a list replaced since, by a take and a restore, or a new stream, cannot match); entries
/// appended since stay after it. 1 when replaced, 0 when left as it is.
/// KEYS: hash, chunks. ARGV: m, n, entry m + n - 1, the merged run, ttl ms.
const COMPACT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local m = tonumber(redis.call('HGET', KEYS[1], 'merged') or '0')
local n = tonumber(ARGV[2])
if m ~= tonumber(ARGV[1]) or redis.call('LINDEX', KEYS[2], m + n - 1) ~= ARGV[3] then return 0 end
local tail = redis.call('LRANGE', KEYS[2], m + n, -1)
if m == 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, m - 1) end
redis.call('RPUSH', KEYS[2], ARGV[4])
for _, c in ipairs(tail) do redis.call('RPUSH', KEYS[2], c) end
redis.call('HSET', KEYS[1], 'merged', m + 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"#;

/// Reads a stream: {rec, seq, chunks...}, or nil (and forgets S in the user set) when it is gone.
/// KEYS: hash, chunks, user set. ARGV: S.
const READ: &str = r#"
local v = redis.call('HMGET', KEYS[1], 'rec', 'seq')
if not v[1] then
  redis.call('SREM', KEYS[3], ARGV[1])
  return false
end
local out = {v[1], v[2]}
for _, c in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(out, c) end
return out
"#;

/// Takes a stream (a take, or the sweep with a cutoff): moves it to this take's own taken key `T` (named
/// with the take's nonce; a list {rec, seq, last, chunks...} expiring after ARGV[2] ms) and returns it, the
/// whole list or only `rec` (ARGV[4] '1' or '0'). `T` is looked at first: a retry of the same take (same
/// nonce) whose first run took the stream returns what that run took, whatever the stream's keys hold
/// since; a `T` that is not a list marks the take as over (a late run of it): nil, and nothing is taken.
/// With a cutoff (ARGV[3], '' for none), a stream whose `last` is after it stays, and its `last` (a number)
/// is returned. Nil when there is neither a stream nor `T` (S is then forgotten in the user set).
/// KEYS: hash, chunks, user set, T. ARGV: S, T's ttl ms, cutoff, whole.
const TAKE: &str = r#"
local function taken()
  if ARGV[4] == '1' then return redis.call('LRANGE', KEYS[4], 0, -1) end
  return redis.call('LINDEX', KEYS[4], 0)
end
local t = redis.call('TYPE', KEYS[4])['ok']
if t == 'list' then return taken() end
if t ~= 'none' then return false end
local v = redis.call('HMGET', KEYS[1], 'rec', 'seq', 'last')
if not v[1] then
  redis.call('SREM', KEYS[3], ARGV[1])
  return false
end
if ARGV[3] ~= '' and tonumber(v[3]) > tonumber(ARGV[3]) then return tonumber(v[3]) end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[4]) end
redis.call('LPUSH', KEYS[4], v[3], v[2], v[1])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return taken()
"#;

/// Puts back a taken stream unless one is open: 1 when put back, else the open stream's `last`. A put-back
/// leaves a marker `R` (named with the restore's nonce, expiring after ARGV[8] ms): a run of the same
/// restore again (its reply was lost) or late finds it and answers 1 without looking at the stream, which
/// may have been taken since (a device's cancel: put back again, a cancelled stream would be open).
/// KEYS: hash, chunks, user set, R.
/// ARGV: rec, seq, bytes, now, ttl ms, S, sealed chunk (all the text as one chunk; empty when there is
/// none), R's ttl ms.
const RESTORE: &str = r#"
if redis.call('EXISTS', KEYS[4]) == 1 then return 1 end
local last = redis.call('HGET', KEYS[1], 'last')
if last then return last end
redis.call('DEL', KEYS[2])
local merged = 0
if ARGV[7] ~= '' then merged = 1 end
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'seq', ARGV[2], 'bytes', ARGV[3], 'last', ARGV[4], 'merged', merged)
if ARGV[7] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[7]) end
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('SET', KEYS[4], 1, 'PX', ARGV[8])
return 1
"#;

/// Drops member ARGV[1] of the idle index KEYS[1] if its score is at most ARGV[2] (one key: it runs on the
/// index's slot, sent with EVAL in the take's cleanup pipeline). An entry with a later score belongs to
/// a stream opened again, with the same chat and stream id, after the take: it stays.
const IDLE_DROP: &str = r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"#;

/// Lowers member ARGV[1] of the idle index KEYS[1] to ARGV[2] if it is there with a higher score (one
/// key, sent with EVAL like [`IDLE_DROP`]; `ZADD XX LT` needs Redis 6.2).
/// Only while the entry is still the one this node put there (its score is ARGV[3], the time of that
/// `ZADD`): if the name was taken and opened again meanwhile, the entry is the new stream's, and lowering
/// it would let the pending drop of the taken stream's entry ([`IDLE_DROP`]) remove it.
const IDLE_LOWER: &str = r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[3]) and tonumber(s) > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return 0
"#;

/// Forgets the members of a user set whose stream is gone (its hash expired: the backstop when no node
/// swept it), so that they no longer count towards the user's cap; returns how many members are left.
/// Run by an open that found the user at the cap, before it tries once more. Only members whose hash is
/// absent go, in one script: a stream is open exactly while its hash exists (OPEN and RESTORE create the
/// hash and add the member together; TAKE deletes both together).
/// KEYS: user set, then the hash of each member. ARGV: the members (S), in the same order.
const PRUNE: &str = r#"
for i, s in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], s) end
end
return redis.call('SCARD', KEYS[1])
"#;

const SCRIPTS: [&str; 8] = [OPEN, APPEND, READ, TAKE, RESTORE, COMPACT_READ, COMPACT, PRUNE];

/// Entries after the merged head of a stream's chunk list past which they are merged into one.
const COMPACT_AFTER: i64 = 64;

/// How long a merge may take by default (after the chunk was delivered; it only delays the chunk call's
/// answer); [`RedisStreams::with_merge_timeout`].
const COMPACT_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether an append that leaves `unmerged` entries after the merged head asks for a merge: when it
/// passes [`COMPACT_AFTER`], and again at every further multiple of 4 × [`COMPACT_AFTER`] should that
/// merge have failed (a retry at every append would read the growing tail again each time).
fn merge_due(unmerged: i64) -> bool {
    unmerged == COMPACT_AFTER + 1 || (unmerged > COMPACT_AFTER && unmerged % (4 * COMPACT_AFTER) == 0)
}

/// How long a taken stream's copy (the taken key of [`TAKE`]) waits for a retry of its take that lost the
/// reply, and a put-back's marker ([`RESTORE`]) for its own. Longer than the retries may take
/// ([`ANSWER_DEADLINE`]).
const TAKEN_TTL_MS: u64 = 60_000;

/// Runs of one operation's script (a take, an open, an append, a put-back), the first included, when the
/// reply is lost (a connection error or no reply within [`REPLY_TIMEOUT`]); the pause before each retry
/// starts at [`ANSWER_BACKOFF`] and doubles (50, 100, 200 ms).
const ANSWER_ATTEMPTS: u32 = 4;
const ANSWER_BACKOFF: Duration = Duration::from_millis(50);

/// Every run of an operation has its reply within this of the operation's start, or the operation fails:
/// what a first run left for its retries (a take's copy or a put-back's marker, expiring [`TAKEN_TTL_MS`]
/// after that run; the nonce of an open or an append, in the stream's hash, which lives at least 60 s
/// from then) is still
/// there for a later run answering within this. One run may take several reply timeouts (a reconnect,
/// the scripts loaded again), so four of them could otherwise outlast a take's copy, and a retry finding
/// neither copy nor stream would report the stream as not open (a `complete` answered 409, not 503).
const ANSWER_DEADLINE: Duration = Duration::from_secs(45);

/// A take's taken key, and whether the take ran its script more than once (a run of it may then still
/// reach Redis late: its cleanup leaves a marker rather than nothing).
struct Taken {
    key: String,
    retried: bool,
}

/// The sealed `rec` field.
#[derive(Serialize, Deserialize)]
struct Record {
    key: StreamKey,
    info: StreamInfo,
}

/// [`StreamRegistry`] in Redis.
pub struct RedisStreams {
    /// Streams (`U:S`) whose chunk list an append found due for merging, for [`StreamRegistry::tidy`].
    to_merge: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// [`COMPACT_TIMEOUT`] unless set.
    merge_timeout: Duration,
    client: redis::Client,
    conn: Mutex<Option<(MultiplexedConnection, std::sync::Arc<Vec<String>>)>>,
    prefix: String,
    key: SharedKey,
    max_bytes: usize,
    /// Most streams one user may have open at once (`usize::MAX`: no cap).
    max_open: usize,
    ttl_ms: u64,
}

fn hash128(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The names of one stream's keys.
struct Names {
    hash: String,
    chunks: String,
    user_set: String,
    /// `S`.
    sid: String,
    /// `U:S`, the member of the idle set and the associated data of its sealed parts.
    member: String,
}

impl RedisStreams {
    /// A registry on `url`; connects lazily (and again after a connection failure).
    pub fn new(
        url: &str,
        prefix: &str,
        key: SharedKey,
        max_bytes: usize,
        idle_timeout: Duration,
    ) -> anyhow::Result<RedisStreams> {
        Ok(RedisStreams {
            to_merge: parking_lot::Mutex::default(),
            merge_timeout: COMPACT_TIMEOUT,
            client: redis::Client::open(url)?,
            conn: Mutex::new(None),
            prefix: prefix.to_owned(),
            key,
            max_bytes,
            max_open: usize::MAX,
            ttl_ms: (idle_timeout.as_millis() as u64).saturating_mul(2).max(60_000),
        })
    }

    /// Caps the streams one user may have open at once at `max_open` (no cap unless set); a start beyond
    /// it is [`StreamError::TooMany`]. Counted in the user set by the opening script itself, so starts
    /// racing on several nodes never take a user past it.
    pub fn with_max_open(mut self, max_open: usize) -> RedisStreams {
        self.max_open = max_open;
        self
    }

    /// Sets how long a merge of a stream's chunks may take ([`COMPACT_TIMEOUT`] unless set).
    pub fn with_merge_timeout(mut self, timeout: Duration) -> RedisStreams {
        self.merge_timeout = timeout;
        self
    }

    fn user_hash(user_id: &str) -> String {
        hash128(&[user_id])
    }

    fn names(&self, key: &StreamKey) -> Names {
        self.names_of(&Self::user_hash(&key.user_id), &hash128(&[key.chat_id.as_str(), key.stream_id.as_str()]))
    }

    fn names_of(&self, u: &str, s: &str) -> Names {
        let p = &self.prefix;
        Names {
            hash: format!("{p}stream:{{{u}}}:{s}"),
            chunks: format!("{p}stream:{{{u}}}:{s}:c"),
            user_set: format!("{p}streams:{{{u}}}"),
            sid: s.to_owned(),
            member: format!("{u}:{s}"),
        }
    }

    fn idle_set(&self) -> String {
        format!("{}streams:idle", self.prefix)
    }

    fn seal_rec(&self, n: &Names, key: &StreamKey, info: &StreamInfo) -> Vec<u8> {
        let json = serde_json::to_vec(&Record { key: key.clone(), info: info.clone() }).expect("records serialize");
        self.key.encrypt(&json, &Aad::stream(&n.member, "rec"))
    }

    fn open_rec(&self, n: &Names, sealed: &[u8]) -> Result<Record, StreamError> {
        let plain = self.key.decrypt(sealed, &Aad::stream(&n.member, "rec")).map_err(|_| corrupt(n))?;
        serde_json::from_slice(&plain).map_err(|_| corrupt(n))
    }

    fn seal_chunk(&self, n: &Names, seq: u64, delta: &str) -> Vec<u8> {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(8 + delta.len()));
        plain.extend_from_slice(&seq.to_be_bytes());
        plain.extend_from_slice(delta.as_bytes());
        self.key.encrypt(&plain, &Aad::stream(&n.member, "chunk"))
    }

    /// Merges the entries after the stream's merged head into one ([`COMPACT_READ`], then [`COMPACT`]).
    /// Best effort: the append that asked for it has succeeded already, and a failure or a race (another
    /// node compacting, the stream taken) leaves the list as it is, still whole.
    async fn compact(&self, n: &Names) {
        let entries = match self.eval(5, &[&n.hash, &n.chunks], Vec::new()).await {
            Ok(Value::Array(items)) => items,
            Ok(_) => return, // gone
            Err(e) => {
                tracing::debug!(stream = %n.member, error = ?e, "stream chunks not compacted");
                return;
            }
        };
        let mut it = entries.into_iter();
        let Some(head) = it.next().as_ref().and_then(int) else { return };
        let sealed: Vec<Vec<u8>> = it.filter_map(|v| bytes(Some(v))).collect();
        if sealed.len() < 2 {
            return;
        }
        // Entries that do not open are left as they are (READ reports them).
        let Ok((text, last_seq)) = self.open_chunks(n, &sealed) else { return };
        let merged = self.seal_chunk(n, last_seq, &zeroize::Zeroizing::new(text));
        let args = vec![
            head.to_string().into(),
            sealed.len().to_string().into(),
            sealed.last().expect("two or more").clone(),
            merged,
            self.ttl_ms.to_string().into(),
        ];
        if let Err(e) = self.eval(6, &[&n.hash, &n.chunks], args).await {
            tracing::debug!(stream = %n.member, error = ?e, "stream chunks not compacted");
        }
    }

    /// Decodes the whole reply of [`TAKE`] ({rec, seq, last, chunks...}) into the stream and its `last`.
    fn decode_taken(&self, n: &Names, v: Value) -> Result<Option<(OpenStream, i64)>, StreamError> {
        let mut items = match v {
            Value::Nil => return Ok(None),
            Value::Array(items) if items.len() >= 3 => items,
            _ => return Err(corrupt(n)),
        };
        let last = bytes(Some(items.remove(2)))
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(n))?;
        Ok(self.decode_read(n, Value::Array(items))?.map(|s| (s, last)))
    }

    /// Opens sealed chunk entries (single chunks or merged runs) in order: their text joined, and the last
    /// entry's seq (0 for none). Corrupt if one does not open, is not text, or does not follow the one
    /// before it.
    fn open_chunks(&self, n: &Names, sealed: &[Vec<u8>]) -> Result<(String, u64), StreamError> {
        let mut content = String::new();
        let mut last = 0u64;
        for entry in sealed {
            let plain = self.key.decrypt(entry, &Aad::stream(&n.member, "chunk")).map_err(|_| corrupt(n))?;
            if plain.len() < 8 {
                return Err(corrupt(n));
            }
            let chunk_seq = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
            if chunk_seq <= last {
                return Err(corrupt(n));
            }
            last = chunk_seq;
            content.push_str(std::str::from_utf8(&plain[8..]).map_err(|_| corrupt(n))?);
        }
        Ok((content, last))
    }

    /// Decodes the reply of [`READ`] into a stream.
    fn decode_read(&self, n: &Names, v: Value) -> Result<Option<OpenStream>, StreamError> {
        let items = match v {
            Value::Nil => return Ok(None),
            Value::Array(items) => items,
            _ => return Err(corrupt(n)),
        };
        let mut it = items.into_iter();
        let rec = self.open_rec(n, &bytes(it.next()).ok_or_else(|| corrupt(n))?)?;
        let seq: u64 = bytes(it.next())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(n))?;
        let sealed: Vec<Vec<u8>> =
            it.map(|item| bytes(Some(item)).ok_or_else(|| corrupt(n))).collect::<Result<_, _>>()?;
        let (content, last) = self.open_chunks(n, &sealed)?;
        // Trailing empty chunks have no entry: the last entry may be before `seq`, never after.
        if last > seq {
            return Err(corrupt(n));
        }
        Ok(Some(OpenStream { key: rec.key, info: rec.info, seq, content }))
    }

    /// The shared connection and the script hashes, connecting (and loading the scripts) when there is
    /// none. The lock is held only for that, never during a command.
    async fn connection(&self) -> Result<(MultiplexedConnection, std::sync::Arc<Vec<String>>), StreamError> {
        let mut guard = self.conn.lock().await;
        if let Some((conn, shas)) = guard.as_ref() {
            return Ok((conn.clone(), shas.clone()));
        }
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(REPLY_TIMEOUT));
        let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(unavailable)?;
        let mut shas = Vec::new();
        for s in SCRIPTS {
            shas.push(redis::cmd("SCRIPT").arg("LOAD").arg(s).query_async(&mut conn).await.map_err(unavailable)?);
        }
        let shas = std::sync::Arc::new(shas);
        *guard = Some((conn.clone(), shas.clone()));
        Ok((conn, shas))
    }

    /// [`PRUNE`] of the user set of `n`: forgets the members whose stream expired; returns how many are left.
    async fn prune(&self, n: &Names) -> Result<usize, StreamError> {
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(&n.user_set);
        let u = n.member.split_once(':').map_or("", |(u, _)| u);
        let members: Vec<String> = match self.command(smembers).await? {
            Value::Array(items) | Value::Set(items) => {
                items.into_iter().filter_map(|v| bytes(Some(v)).and_then(|b| String::from_utf8(b).ok())).collect()
            }
            _ => Vec::new(),
        };
        let hashes: Vec<String> = members.iter().map(|s| self.names_of(u, s).hash).collect();
        let mut keys = vec![n.user_set.as_str()];
        keys.extend(hashes.iter().map(String::as_str));
        let args = members.into_iter().map(String::into_bytes).collect();
        match self.eval(7, &keys, args).await? {
            Value::Int(left) => Ok(usize::try_from(left).unwrap_or(0)),
            _ => Err(corrupt(n)),
        }
    }

    /// Forgets the shared connection (the next call reconnects and reloads the scripts).
    async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs script `index` (of [`SCRIPTS`]) with EVALSHA, loading the scripts on a new connection and
    /// again after a NOSCRIPT (a Redis restart or flush); reconnects after a connection error.
    async fn eval(&self, index: usize, keys: &[&str], args: Vec<Vec<u8>>) -> Result<Value, EvalError> {
        for _attempt in 0..2 {
            let (mut conn, shas) = self.connection().await.map_err(|e| EvalError::Connection(e.to_string()))?;
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&shas[index]).arg(keys.len()).arg(keys);
            for a in &args {
                cmd.arg(a.as_slice());
            }
            match cmd.query_async::<Value>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => self.reset().await,
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() => {
                    self.reset().await;
                    return Err(EvalError::Connection(e.to_string()));
                }
                Err(e) => {
                    return Err(EvalError::Refused {
                        wrong_type: e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE"),
                        detail: e.to_string(),
                    })
                }
            }
        }
        Err(EvalError::Refused { wrong_type: false, detail: "Redis keeps forgetting the stream scripts".into() })
    }

    /// Runs script `index` as [`RedisStreams::eval`] does, and again with the same arguments when the reply
    /// is lost (a connection error, or no reply within [`REPLY_TIMEOUT`]), up to [`ANSWER_ATTEMPTS`] runs,
    /// all within [`ANSWER_DEADLINE`]. Only for a script that a run again answers as its first run did
    /// (its arguments carry a nonce, which the first run leaves in Redis for the others to find: [`TAKE`],
    /// [`OPEN`], [`APPEND`], [`RESTORE`]): the first run may have run before its reply was lost. A refusal
    /// (Redis answered with an error) is not retried. Returns the reply and the number of runs.
    async fn eval_until_answered(
        &self,
        n: &Names,
        index: usize,
        keys: &[&str],
        args: Vec<Vec<u8>>,
    ) -> Result<(Value, u32), EvalError> {
        let mut backoff = ANSWER_BACKOFF;
        let deadline = tokio::time::Instant::now() + ANSWER_DEADLINE;
        for attempt in 1.. {
            let run = self.eval(index, keys, args.clone());
            let Ok(result) = tokio::time::timeout_at(deadline, run).await else {
                return Err(EvalError::Connection("no reply within the operation's deadline".into()));
            };
            match result {
                Err(EvalError::Connection(detail))
                    if attempt < ANSWER_ATTEMPTS && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(stream = %n.member, attempt, error = %detail, "a stream script's reply was lost; running it again");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                result => return result.map(|v| (v, attempt)),
            }
        }
        unreachable!("the loop returns by its last attempt")
    }

    /// Runs [`TAKE`] on one stream under a nonce of its own, until answered
    /// ([`RedisStreams::eval_until_answered`]): the first run may have taken the stream before its reply
    /// was lost, and a retry finds it in the taken key that only this nonce names. Returns the reply and
    /// the taken key, which the caller deletes once it has the reply ([`RedisStreams::taken`]).
    async fn take_script(&self, n: &Names, cutoff: Option<i64>, whole: bool) -> Result<(Value, Taken), EvalError> {
        let nonce: [u8; 16] = rand::random();
        let taken = format!("{}:taken:{}", n.hash, hex::encode(nonce));
        let args: Vec<Vec<u8>> = vec![
            n.sid.clone().into(),
            TAKEN_TTL_MS.to_string().into(),
            cutoff.map(|c| c.to_string()).unwrap_or_default().into(),
            if whole { b"1".to_vec() } else { b"0".to_vec() },
        ];
        let keys = [n.hash.as_str(), &n.chunks, &n.user_set, &taken];
        let (v, runs) = self.eval_until_answered(n, 3, &keys, args).await?;
        Ok((v, Taken { key: taken, retried: runs > 1 }))
    }

    /// Ends a take once it has its reply: drops the taken stream's entry in the idle index (with
    /// `until`), and removes its taken copy (see below). The entry goes only if its score is at most
    /// `until` (the taken stream's `last`, or the sweep's cutoff): a stream opened again under the same
    /// name since the take has put its own entry there, which a plain ZREM would drop (that stream would
    /// never be swept: no `stream_cancelled` when it goes idle).
    ///
    /// The copy is removed rather than left to expire: once the reply is in, nothing can use it (only this
    /// take knows its nonce, and it has the stream: a failed completion puts the stream back from that copy,
    /// not from Redis), while waiting for [`TAKEN_TTL_MS`] would hold up to the stream cap per take in Redis
    /// memory for a minute and keep a deleted chat's text (sealed) there after the deletion. A take that ran
    /// its script more than once replaces it with a marker (a key of ~150 bytes, same expiry), which makes
    /// a run of it that reaches Redis only now take nothing; one answered at its first run just deletes it.
    /// It costs no round trip: it goes with the idle index's drop. Best effort: a failure (or a node that
    /// stops before it) leaves the copy to its expiry, and nothing reads it meanwhile.
    async fn taken(&self, n: &Names, taken: &Taken, until: Option<i64>) {
        let mut pipe = redis::pipe();
        if let Some(until) = until {
            pipe.add_command(self.idle_drop(&n.member, until)).ignore();
        }
        if taken.retried {
            pipe.cmd("SET").arg(&taken.key).arg(1).arg("PX").arg(TAKEN_TTL_MS).ignore();
        } else {
            // Answered at its first run: no other run of this take can be in flight.
            pipe.cmd("DEL").arg(&taken.key).ignore();
        }
        if let Err(e) = self.pipeline(pipe).await {
            tracing::debug!(stream = %n.member, error = %e, "taken stream's cleanup failed (its index entry is dropped by the sweep, its taken copy expires)");
        }
    }

    /// [`IDLE_DROP`] of `member` while its score is at most `until`.
    fn idle_drop(&self, member: &str, until: i64) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(IDLE_DROP).arg(1).arg(self.idle_set()).arg(member).arg(until);
        cmd
    }

    /// Puts a stream's entry in the idle index at `now_ms`, *before* the stream is opened or put back: a
    /// stream is never open without its entry (a failure here leaves nothing open). An entry without a
    /// stream (the script after it failed, or found another stream) is harmless: the sweep looks at the
    /// stream itself and drops the entry. The time is `now_ms` even over an older entry, so that a sweep
    /// running between this and the script cannot take the entry as idle and drop it.
    async fn index(&self, n: &Names, now_ms: i64) -> Result<(), StreamError> {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(self.idle_set()).arg(now_ms).arg(&n.member);
        self.command(zadd).await.map(|_| ())
    }

    /// After [`RedisStreams::index`] put the entry at `now_ms` for an open or a put-back that found the
    /// stream already open (and so changed nothing of it): moves the entry back to that stream's `last`
    /// (only ever lower, and only while the entry is still the one put at `indexed_at`, not a stream's
    /// opened under the same name meanwhile: [`IDLE_LOWER`]). Left at `now_ms`, the entry would hide the stream from the sweep
    /// until `now_ms` plus the timeout, and a start retried more often than that would keep it from ever
    /// being swept (its keys would expire silently, no `stream_cancelled`). An entry lower than the
    /// stream's `last` is harmless (the sweep looks at `last` and moves the entry forward). Best effort
    /// (two nodes indexing the same name in the same millisecond defeat the check; the stream is then
    /// swept by its keys' expiry at worst, as before).
    async fn unindex(&self, n: &Names, indexed_at: i64, last: Option<Value>) {
        let Some(last) = bytes(last).and_then(|b| String::from_utf8(b).ok()).and_then(|s| s.parse::<i64>().ok()) else {
            return;
        };
        let mut lower = redis::cmd("EVAL");
        lower.arg(IDLE_LOWER).arg(1).arg(self.idle_set()).arg(&n.member).arg(last).arg(indexed_at);
        if let Err(e) = self.command(lower).await {
            tracing::debug!(stream = %n.member, error = %e, "idle index entry not moved back (swept late)");
        }
    }

    /// Keeps the idle index alive while a node opens or sweeps streams (every node sweeps at least every
    /// 15 s); once no node runs, it expires with the streams it indexes.
    async fn refresh_idle_set(&self) {
        let mut pexpire = redis::cmd("PEXPIRE");
        pexpire.arg(self.idle_set()).arg(self.ttl_ms);
        if let Err(e) = self.command(pexpire).await {
            tracing::debug!(error = %e, "idle index expiry not refreshed");
        }
    }

    async fn command(&self, cmd: redis::Cmd) -> Result<Value, StreamError> {
        let (mut conn, _) = self.connection().await?;
        match cmd.query_async::<Value>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.reset().await;
                }
                Err(unavailable(e))
            }
        }
    }

    /// Sends `pipe` in one round trip (as [`RedisStreams::command`] one command).
    async fn pipeline(&self, pipe: redis::Pipeline) -> Result<(), StreamError> {
        let (mut conn, _) = self.connection().await?;
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.reset().await;
                }
                Err(unavailable(e))
            }
        }
    }
}

fn bytes(v: Option<Value>) -> Option<Vec<u8>> {
    match v? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// Why a script gave no reply.
#[derive(Debug)]
enum EvalError {
    /// No connection, or it failed (and was reset): the next command is likely to fail too.
    Connection(String),
    /// Redis answered with an error; `wrong_type` when a key is not of the type the script expects (a key
    /// that is not this registry's, or damaged: every later run on it fails the same way).
    Refused {
        /// The reply was WRONGTYPE.
        wrong_type: bool,
        /// Redis's message.
        detail: String,
    },
}

impl From<EvalError> for StreamError {
    fn from(e: EvalError) -> StreamError {
        match e {
            EvalError::Connection(detail) | EvalError::Refused { detail, .. } => StreamError::Unavailable(detail),
        }
    }
}

fn corrupt(n: &Names) -> StreamError {
    StreamError::Unavailable(format!("stream state {} in Redis does not open or is inconsistent", n.member))
}

fn unavailable(e: redis::RedisError) -> StreamError {
    StreamError::Unavailable(e.to_string())
}

#[async_trait]
impl StreamRegistry for RedisStreams {
    async fn open(&self, key: &StreamKey, info: &StreamInfo, now_ms: i64) -> Result<Opened, StreamError> {
        let n = self.names(key);
        self.index(&n, now_ms).await?;
        let rec = self.seal_rec(&n, key, info);
        let args = vec![
            rec,
            now_ms.to_string().into(),
            self.ttl_ms.to_string().into(),
            n.sid.clone().into(),
            self.max_open.to_string().into(),
            rand::random::<[u8; 16]>().to_vec(),
        ];
        let keys = [n.hash.as_str(), &n.chunks, &n.user_set];
        let (mut v, _) = self.eval_until_answered(&n, 0, &keys, args.clone()).await?;
        if let Value::Int(_) = v {
            // At the cap: members whose stream expired may fill it. Forget those and try once more (with
            // the same nonce: the first try created nothing).
            if self.prune(&n).await? < self.max_open {
                v = self.eval_until_answered(&n, 0, &keys, args).await?.0;
            }
        }
        match v {
            // The idle index entry put there above stays: the sweep finds no stream under it and drops it.
            Value::Int(_) => Err(StreamError::TooMany { max: self.max_open }),
            Value::Nil => {
                self.refresh_idle_set().await;
                Ok(Opened::New)
            }
            Value::Array(found) => {
                let mut found = found.into_iter();
                let rec = bytes(found.next()).ok_or_else(|| corrupt(&n))?;
                self.unindex(&n, now_ms, found.next()).await;
                let existing = self.open_rec(&n, &rec)?;
                let same = existing.info.message_id == info.message_id && existing.info.sender_name == info.sender_name;
                if same {
                    Ok(Opened::AlreadyOpen)
                } else {
                    Err(StreamError::Conflict)
                }
            }
            _ => Err(corrupt(&n)),
        }
    }

    async fn append(&self, key: &StreamKey, seq: u64, delta: &str, now_ms: i64) -> Result<Appended, StreamError> {
        if delta.len() > self.max_bytes {
            // Never ship a chunk that cannot fit (the script would refuse it too).
            let n = self.names(key);
            let v = self.eval(2, &[&n.hash, &n.chunks, &n.user_set], vec![n.sid.clone().into()]).await?;
            return match self.decode_read(&n, v)? {
                None => Err(StreamError::NotOpen),
                Some(s) if seq <= s.seq => Ok(Appended::Duplicate),
                Some(s) if seq != s.seq + 1 => Err(StreamError::Gap { last: s.seq, got: seq }),
                Some(_) => Err(StreamError::TooLarge { max: self.max_bytes }),
            };
        }
        let n = self.names(key);
        let args = vec![
            seq.to_string().into(),
            if delta.is_empty() { Vec::new() } else { self.seal_chunk(&n, seq, delta) },
            delta.len().to_string().into(),
            self.max_bytes.to_string().into(),
            now_ms.to_string().into(),
            self.ttl_ms.to_string().into(),
            rand::random::<[u8; 16]>().to_vec(),
        ];
        let (v, _) = self.eval_until_answered(&n, 1, &[&n.hash, &n.chunks, &n.user_set], args).await?;
        let (code, last, unmerged) = match &v {
            Value::Array(items) if items.len() >= 2 => {
                (int(&items[0]), int(&items[1]), items.get(2).and_then(int).unwrap_or(0))
            }
            _ => (None, None, 0),
        };
        match (code, last) {
            (Some(1), _) => {
                if merge_due(unmerged) {
                    let mut due = self.to_merge.lock();
                    if due.len() >= 10_000 {
                        due.clear(); // entries of appends whose tidy never came; a later append asks again
                    }
                    due.insert(n.member.clone());
                }
                Ok(Appended::Accepted)
            }
            (Some(0), _) => Ok(Appended::Duplicate),
            (Some(-1), _) => Err(StreamError::NotOpen),
            (Some(-2), Some(last)) => Err(StreamError::Gap { last: last as u64, got: seq }),
            (Some(-3), _) => Err(StreamError::TooLarge { max: self.max_bytes }),
            _ => Err(corrupt(&n)),
        }
    }

    async fn tidy(&self, key: &StreamKey) {
        if self.to_merge.lock().is_empty() {
            return; // the common case: no merge due on this node, no names to hash
        }
        let n = self.names(key);
        if self.to_merge.lock().remove(&n.member)
            && tokio::time::timeout(self.merge_timeout, self.compact(&n)).await.is_err()
        {
            tracing::debug!(stream = %n.member, "stream chunks not merged in time (left as they are)");
        }
    }

    async fn take(&self, key: &StreamKey) -> Result<Option<OpenStream>, StreamError> {
        let n = self.names(key);
        let (v, taken) = self.take_script(&n, None, true).await?;
        let decoded = self.decode_taken(&n, v);
        // Nothing taken, or a copy that does not open: the take is over all the same (marked so if it ran
        // more than once); an index entry is left to the sweep.
        let until = decoded.as_ref().ok().and_then(|d| d.as_ref()).map(|(_, last)| *last);
        if until.is_some() || decoded.is_err() || taken.retried {
            self.taken(&n, &taken, until).await;
        }
        decoded.map(|d| d.map(|(stream, _)| stream))
    }

    async fn restore(&self, stream: OpenStream, now_ms: i64) -> Result<(), StreamError> {
        let n = self.names(&stream.key);
        self.index(&n, now_ms).await?;
        let chunk =
            if stream.content.is_empty() { Vec::new() } else { self.seal_chunk(&n, stream.seq, &stream.content) };
        let args = vec![
            self.seal_rec(&n, &stream.key, &stream.info),
            stream.seq.to_string().into(),
            stream.content.len().to_string().into(),
            now_ms.to_string().into(),
            self.ttl_ms.to_string().into(),
            n.sid.clone().into(),
            chunk,
            TAKEN_TTL_MS.to_string().into(),
        ];
        let marker = format!("{}:restored:{}", n.hash, hex::encode(rand::random::<[u8; 16]>()));
        let keys = [n.hash.as_str(), &n.chunks, &n.user_set, &marker];
        match self.eval_until_answered(&n, 4, &keys, args).await? {
            // Put back at the first run: no other run of it can reach Redis, its marker can go. (After more
            // runs the marker stays until it expires, for a run that reaches Redis late.)
            (Value::Int(1), 1) => {
                let mut del = redis::cmd("DEL");
                del.arg(&marker);
                if let Err(e) = self.command(del).await {
                    tracing::debug!(stream = %n.member, error = %e, "a put-back's marker not removed (it expires)");
                }
            }
            (Value::Int(1), _) => {}
            // Another stream of that name is open: it stays as it was, its index entry too.
            (last, _) => self.unindex(&n, now_ms, Some(last)).await,
        }
        Ok(())
    }

    async fn is_open(&self, key: &StreamKey) -> Result<bool, StreamError> {
        // Open exactly while its hash exists (OPEN and RESTORE create it; TAKE deletes it).
        let mut exists = redis::cmd("EXISTS");
        exists.arg(&self.names(key).hash);
        Ok(matches!(self.command(exists).await?, Value::Int(1)))
    }

    async fn list(&self, user_id: &str) -> Result<Vec<OpenStream>, StreamError> {
        let u = Self::user_hash(user_id);
        let user_set = self.names_of(&u, "").user_set;
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(&user_set);
        let sids: Vec<String> = match self.command(smembers).await? {
            Value::Array(items) | Value::Set(items) => {
                items.into_iter().filter_map(|v| bytes(Some(v)).and_then(|b| String::from_utf8(b).ok())).collect()
            }
            _ => Vec::new(),
        };
        // A stream whose state does not decode (damaged, or written by another version) is left out, named
        // by its hashed id only, and the others are listed: failing the list for it left every initial sync
        // of its user without `active_streams`, until it expired. Redis failing fails the list.
        let mut out = Vec::new();
        for s in sids {
            let n = self.names_of(&u, &s);
            let v = match self.eval(2, &[&n.hash, &n.chunks, &n.user_set], vec![n.sid.clone().into()]).await {
                Ok(v) => v,
                Err(EvalError::Refused { wrong_type: true, .. }) => {
                    tracing::warn!(stream = %n.member, "an open stream's key in Redis is not a stream's; left out of the list");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match self.decode_read(&n, v) {
                Ok(Some(stream)) if stream.key.user_id == user_id => out.push(stream),
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(stream = %n.member, "an open stream's state in Redis does not decode; left out of the list")
                }
            }
        }
        Ok(out)
    }

    async fn sweep_idle(&self, cutoff_ms: i64) -> Result<Vec<StreamKey>, StreamError> {
        self.refresh_idle_set().await;
        let mut range = redis::cmd("ZRANGEBYSCORE");
        range.arg(self.idle_set()).arg("-inf").arg(cutoff_ms).arg("LIMIT").arg(0).arg(1000);
        let members: Vec<String> = match self.command(range).await? {
            Value::Array(items) => {
                items.into_iter().filter_map(|v| bytes(Some(v)).and_then(|b| String::from_utf8(b).ok())).collect()
            }
            _ => Vec::new(),
        };
        // Streams removed here are returned whatever fails later: they are gone from Redis, and only this
        // sweep can announce their end. A failure on one stream is logged and the sweep goes on with the
        // next (it is retried at the next sweep), except a lost connection (after the retries of its take),
        // which ends this sweep.
        let mut idle = Vec::new();
        for member in members {
            let Some((u, s)) = member.split_once(':') else { continue };
            let n = self.names_of(u, s);
            // Dropped only while it is still as old as the cutoff: a stream opened again under this name
            // since the script ran has put its own entry there (see `taken`).
            let mut fix = self.idle_drop(&member, cutoff_ms);
            match self.take_script(&n, Some(cutoff_ms), false).await {
                // Active since: move its hint forward.
                Ok((Value::Int(last), _)) => {
                    fix = redis::cmd("ZADD");
                    fix.arg(self.idle_set()).arg("XX").arg(last).arg(&member);
                }
                // Gone (taken, or expired): drop its entry.
                Ok((Value::Nil, _)) => {}
                // Taken here: its entry and its taken key go together.
                Ok((other, taken)) => {
                    self.taken(&n, &taken, Some(cutoff_ms)).await;
                    match bytes(Some(other)).map(|b| self.open_rec(&n, &b)) {
                        Some(Ok(rec)) => idle.push(rec.key),
                        _ => tracing::warn!(stream = %member, "an idle stream's record does not open; dropped"),
                    }
                    continue;
                }
                // Not a stream's hash (no stream can be open under it: every script fails on it), so
                // nothing to time out; dropped from the index so that it does not fail every sweep.
                Err(EvalError::Refused { wrong_type: true, detail }) => {
                    tracing::warn!(stream = %member, error = %detail, "an idle stream's key is not a stream; dropped from the idle index");
                }
                Err(EvalError::Refused { detail, .. }) => {
                    tracing::warn!(stream = %member, error = %detail, "idle stream not swept (retried at the next sweep)");
                    continue;
                }
                Err(EvalError::Connection(detail)) => {
                    tracing::warn!(error = %detail, "idle stream sweep interrupted (retried at the next sweep)");
                    break;
                }
            }
            if let Err(e) = self.command(fix).await {
                tracing::debug!(stream = %member, error = %e, "idle index not updated (the next sweep looks again)");
            }
        }
        Ok(idle)
    }
}
