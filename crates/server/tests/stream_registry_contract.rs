//! The `StreamRegistry` contract (SERVER_API.md section 4), run against every implementation: the memory
//! registry always, the Redis registry when `CHATSYNC_TEST_REDIS_URL` is set (each case with a key prefix
//! of its own). Also: two Redis registries (two nodes) share the streams, an idle stream is swept by
//! exactly one of them, Redis holds no plaintext of a chunk, a user id or the metadata, a take (or a
//! sweep) whose script ran but whose reply was lost still returns its stream, once, and an open or an
//! append whose reply was lost still gets the first run's answer.

mod common;

use chatsync::crypto::MasterKey;
use chatsync::streams::memory::MemoryStreams;
use chatsync::streams::redis::RedisStreams;
use chatsync::streams::{Appended, Opened, StreamError, StreamInfo, StreamKey, StreamRegistry};
use chatsync_protocol::{ChatId, MessageId, StreamId};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const MAX: usize = 64;
/// The cap of the tests that write many chunks.
const BIG: usize = 64 * 1024;

fn key(user: &str, chat: &str, stream: &str) -> StreamKey {
    StreamKey { user_id: user.into(), chat_id: ChatId::new(chat).unwrap(), stream_id: StreamId::new(stream).unwrap() }
}

fn info(message_id: &str) -> StreamInfo {
    StreamInfo {
        message_id: MessageId::new(message_id).unwrap(),
        sender_name: "assistant".into(),
        meta: json!({"model": "secret-model-name"}).as_object().unwrap().clone(),
    }
}

/// A fresh registry of each kind available: memory, and Redis (two handles on one prefix: two nodes).
async fn registries() -> Vec<(&'static str, Arc<dyn StreamRegistry>, Arc<dyn StreamRegistry>)> {
    let memory: Arc<dyn StreamRegistry> = Arc::new(MemoryStreams::new(MAX));
    let mut out = vec![("memory", memory.clone(), memory)];
    if let Some(url) = common::cluster::redis_url() {
        let prefix = common::cluster::unique_prefix();
        let master = MasterKey::generate();
        let node = |m: &MasterKey| -> Arc<dyn StreamRegistry> {
            Arc::new(RedisStreams::new(&url, &prefix, m.derive("streams"), MAX, Duration::from_secs(60)).unwrap())
        };
        out.push(("redis", node(&master), node(&master)));
    }
    out
}

/// As [`registries`], with at most `cap` open streams per user.
async fn capped_registries(cap: usize) -> Vec<(&'static str, Arc<dyn StreamRegistry>, Arc<dyn StreamRegistry>)> {
    let memory: Arc<dyn StreamRegistry> = Arc::new(MemoryStreams::new(MAX).with_max_open(cap));
    let mut out = vec![("memory", memory.clone(), memory)];
    if let Some(url) = common::cluster::redis_url() {
        let prefix = common::cluster::unique_prefix();
        let master = MasterKey::generate();
        let node = |m: &MasterKey| -> Arc<dyn StreamRegistry> {
            let r = RedisStreams::new(&url, &prefix, m.derive("streams"), MAX, Duration::from_secs(60)).unwrap();
            Arc::new(r.with_max_open(cap))
        };
        out.push(("redis", node(&master), node(&master)));
    }
    out
}

#[tokio::test]
async fn open_is_idempotent_for_the_same_stream_and_refuses_another() {
    for (name, r, _) in registries().await {
        let k = key("alice", "c1", "s1");
        assert_eq!(r.open(&k, &info("m1"), 1).await, Ok(Opened::New), "{name}");
        assert_eq!(r.open(&k, &info("m1"), 2).await, Ok(Opened::AlreadyOpen), "{name}: a retried start");
        assert_eq!(r.open(&k, &info("m2"), 3).await, Err(StreamError::Conflict), "{name}");
        // The same stream id in another chat, or of another user, is another stream.
        assert_eq!(r.open(&key("alice", "c2", "s1"), &info("m2"), 4).await, Ok(Opened::New), "{name}");
        assert_eq!(r.open(&key("bob", "c1", "s1"), &info("m2"), 5).await, Ok(Opened::New), "{name}");
    }
}

#[tokio::test]
async fn chunks_follow_the_seq_rules_and_the_cap() {
    for (name, r, _) in registries().await {
        let k = key("alice", "c1", "s1");
        assert_eq!(r.append(&k, 1, "x", 1).await, Err(StreamError::NotOpen), "{name}: never opened");
        r.open(&k, &info("m1"), 1).await.unwrap();
        assert_eq!(r.append(&k, 2, "x", 2).await, Err(StreamError::Gap { last: 0, got: 2 }), "{name}");
        assert_eq!(r.append(&k, 1, "Hel", 2).await, Ok(Appended::Accepted), "{name}");
        assert_eq!(r.append(&k, 1, "XXX", 2).await, Ok(Appended::Duplicate), "{name}: the first one counts");
        assert_eq!(r.append(&k, 2, "lo é", 3).await, Ok(Appended::Accepted), "{name}");
        assert_eq!(r.append(&k, 4, "x", 3).await, Err(StreamError::Gap { last: 2, got: 4 }), "{name}");
        // The cap is on bytes: "Hello é" is 8 bytes; up to MAX is accepted, one byte more is not.
        let fill = "a".repeat(MAX - 8);
        assert_eq!(r.append(&k, 3, &format!("{fill}b"), 4).await, Err(StreamError::TooLarge { max: MAX }), "{name}");
        assert_eq!(r.append(&k, 3, &"c".repeat(MAX + 1), 4).await, Err(StreamError::TooLarge { max: MAX }), "{name}");
        assert_eq!(r.append(&k, 3, &fill, 4).await, Ok(Appended::Accepted), "{name}: exactly at the cap");
        let s = r.take(&k).await.unwrap().expect("open");
        assert_eq!((s.seq, s.content), (3, format!("Hello é{fill}")), "{name}");
        assert_eq!(s.info, info("m1"), "{name}");
    }
}

/// Empty chunks are chunks like any other (they move `seq` and the idle clock, and survive a take and a
/// put-back) and take no room: in Redis they add no entry to the stream's chunk list, so a backend sending
/// them without end does not grow Redis (each used to add a sealed entry that the text cap did not count).
#[tokio::test]
async fn empty_chunks_move_the_seq_and_take_no_room() {
    for (name, r, other_node) in registries().await {
        let k = key("alice", "c1", "s1");
        r.open(&k, &info("m1"), 1_000).await.unwrap();
        assert_eq!(r.append(&k, 1, "", 1_000).await, Ok(Appended::Accepted), "{name}: an empty first chunk");
        assert_eq!(r.append(&k, 2, "a", 1_000).await, Ok(Appended::Accepted), "{name}");
        for seq in 3..=202 {
            assert_eq!(r.append(&k, seq, "", 3_000).await, Ok(Appended::Accepted), "{name}: chunk {seq}");
        }
        assert_eq!(r.append(&k, 202, "zzz", 3_000).await, Ok(Appended::Duplicate), "{name}");
        assert_eq!(r.append(&k, 204, "", 3_000).await, Err(StreamError::Gap { last: 202, got: 204 }), "{name}");
        assert_eq!(r.sweep_idle(2_999).await.unwrap(), vec![], "{name}: empty chunks keep the stream active");
        let listed = other_node.list("alice").await.unwrap();
        assert_eq!(listed.iter().map(|s| (s.seq, s.content.as_str())).collect::<Vec<_>>(), [(202, "a")], "{name}");
        // Taken and put back with trailing empty chunks, and with nothing but empty chunks.
        let taken = r.take(&k).await.unwrap().expect("open");
        assert_eq!((taken.seq, taken.content.as_str()), (202, "a"), "{name}");
        r.restore(taken, 4_000).await.unwrap();
        assert_eq!(r.append(&k, 203, "b", 4_000).await, Ok(Appended::Accepted), "{name}: restored with its seq");
        assert_eq!(r.append(&k, 204, "", 4_000).await, Ok(Appended::Accepted), "{name}");
        let again = other_node.take(&k).await.unwrap().expect("restored");
        assert_eq!((again.seq, again.content.as_str()), (204, "ab"), "{name}");
        let k2 = key("alice", "c1", "s2");
        r.open(&k2, &info("m2"), 4_000).await.unwrap();
        r.append(&k2, 1, "", 4_000).await.unwrap();
        let empty = r.take(&k2).await.unwrap().expect("open");
        assert_eq!((empty.seq, empty.content.as_str()), (1, ""), "{name}");
        r.restore(empty, 5_000).await.unwrap();
        assert_eq!(r.append(&k2, 2, "x", 5_000).await, Ok(Appended::Accepted), "{name}");
        assert_eq!(r.take(&k2).await.unwrap().map(|s| (s.seq, s.content)), Some((2, "x".into())), "{name}");
    }

    // Redis holds one entry per chunk with text, however many empty chunks came between.
    let Some(url) = common::cluster::redis_url() else { return };
    let prefix = common::cluster::unique_prefix();
    let r = RedisStreams::new(&url, &prefix, MasterKey::generate().derive("streams"), MAX, Duration::from_secs(60))
        .unwrap();
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1).await.unwrap();
    r.append(&k, 1, "a", 2).await.unwrap();
    for seq in 2..=1_001 {
        r.append(&k, seq, "", 2).await.unwrap();
    }
    r.append(&k, 1_002, "b", 2).await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let lists: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}stream:*:c")).query_async(&mut conn).await.unwrap();
    assert_eq!(lists.len(), 1, "{lists:?}");
    let entries: i64 = redis::cmd("LLEN").arg(&lists[0]).query_async(&mut conn).await.unwrap();
    assert_eq!(entries, 2, "1,002 chunks, two of them with text");
    assert_eq!(r.take(&k).await.unwrap().map(|s| (s.seq, s.content)), Some((1_002, "ab".into())));
    let _: () = redis::cmd("DEL").arg(format!("{prefix}streams:idle")).query_async(&mut conn).await.unwrap();
}

#[tokio::test]
async fn take_closes_the_stream_once_and_restore_puts_it_back() {
    for (name, r, other_node) in registries().await {
        let k = key("alice", "c1", "s1");
        assert!(!r.is_open(&k).await.unwrap(), "{name}: never opened");
        r.open(&k, &info("m1"), 1).await.unwrap();
        r.append(&k, 1, "partial", 2).await.unwrap();
        assert!(other_node.is_open(&k).await.unwrap(), "{name}: open, on every node");
        for elsewhere in [key("bob", "c1", "s1"), key("alice", "c2", "s1"), key("alice", "c1", "s2")] {
            assert!(!r.is_open(&elsewhere).await.unwrap(), "{name}: {elsewhere:?} is another stream");
        }
        let taken = other_node.take(&k).await.unwrap().expect("open");
        assert_eq!(taken.content, "partial", "{name}");
        assert!(!r.is_open(&k).await.unwrap(), "{name}: taken");
        assert_eq!(r.take(&k).await.unwrap(), None, "{name}: taken once");
        assert_eq!(r.append(&k, 2, "x", 3).await, Err(StreamError::NotOpen), "{name}: closed for chunks");
        assert!(r.list("alice").await.unwrap().is_empty(), "{name}");

        r.restore(taken.clone(), 4).await.unwrap();
        assert!(r.is_open(&k).await.unwrap(), "{name}: restored");
        assert_eq!(r.append(&k, 2, " more", 5).await, Ok(Appended::Accepted), "{name}: restored with its seq");
        let again = r.take(&k).await.unwrap().expect("restored");
        assert_eq!((again.seq, again.content.as_str()), (2, "partial more"), "{name}");

        // A stream opened meanwhile under the same key wins over a late restore.
        r.open(&k, &info("m9"), 6).await.unwrap();
        r.restore(taken, 7).await.unwrap();
        assert_eq!(r.take(&k).await.unwrap().unwrap().info, info("m9"), "{name}");
    }
}

#[tokio::test]
async fn list_shows_only_the_users_open_streams_with_their_text() {
    for (name, r, other_node) in registries().await {
        r.open(&key("alice", "c1", "s1"), &info("m1"), 1).await.unwrap();
        r.open(&key("alice", "c2", "s2"), &info("m2"), 1).await.unwrap();
        r.open(&key("bob", "c1", "s1"), &info("m3"), 1).await.unwrap();
        r.append(&key("alice", "c1", "s1"), 1, "one", 2).await.unwrap();
        r.append(&key("alice", "c1", "s1"), 2, " two", 2).await.unwrap();
        r.take(&key("alice", "c2", "s2")).await.unwrap();
        let listed = other_node.list("alice").await.unwrap();
        assert_eq!(listed.len(), 1, "{name}: {listed:?}");
        let a = listed[0].active();
        assert_eq!((a.chat_id.as_str(), a.stream_id.as_str(), a.seq), ("c1", "s1", 2), "{name}");
        assert_eq!((a.content_so_far.as_str(), a.message_id.as_str()), ("one two", "m1"), "{name}");
        assert_eq!(a.meta, info("m1").meta, "{name}");
        assert!(r.list("carol").await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn idle_streams_are_swept_once_and_active_ones_stay() {
    for (name, r, other_node) in registries().await {
        let (idle, active) = (key("alice", "c1", "idle"), key("alice", "c1", "active"));
        r.open(&idle, &info("m1"), 1_000).await.unwrap();
        r.open(&active, &info("m2"), 1_000).await.unwrap();
        r.append(&active, 1, "x", 5_000).await.unwrap();
        let (a, b) = tokio::join!(r.sweep_idle(4_000), other_node.sweep_idle(4_000));
        let mut swept = a.unwrap();
        swept.extend(b.unwrap());
        assert_eq!(swept, vec![idle.clone()], "{name}: the idle stream, returned to exactly one sweeper");
        assert_eq!(r.append(&idle, 1, "x", 6_000).await, Err(StreamError::NotOpen), "{name}");
        assert_eq!(r.sweep_idle(4_000).await.unwrap(), vec![], "{name}: the active one stays");
        assert_eq!(r.append(&active, 2, "y", 6_000).await, Ok(Appended::Accepted), "{name}");
        assert_eq!(r.sweep_idle(6_000).await.unwrap(), vec![active], "{name}: idle at a later cutoff");
        assert!(r.list("alice").await.unwrap().is_empty(), "{name}");
    }
}

/// A start that finds its stream open (a retried start, or one refused as another stream under the id)
/// and a put-back that finds a stream open are no activity: the open stream still times out from its last
/// chunk (or start). In Redis each of them used to move the stream's idle index entry to its own time, so
/// a backend retrying a start more often than the idle timeout kept the stream from ever being swept
/// (its keys then expired silently: no `stream_cancelled` for the devices).
#[tokio::test]
async fn a_start_or_put_back_that_finds_the_stream_open_does_not_keep_it_from_timing_out() {
    for (name, r, other_node) in registries().await {
        let k = key("alice", "c1", "s1");
        r.open(&k, &info("m1"), 1_000).await.unwrap();
        r.append(&k, 1, "x", 2_000).await.unwrap();
        assert_eq!(other_node.open(&k, &info("m1"), 9_000).await, Ok(Opened::AlreadyOpen), "{name}");
        assert_eq!(r.sweep_idle(5_000).await.unwrap(), vec![k.clone()], "{name}: a retried start is no chunk");

        r.open(&k, &info("m1"), 10_000).await.unwrap();
        assert_eq!(other_node.open(&k, &info("m2"), 19_000).await, Err(StreamError::Conflict), "{name}");
        assert_eq!(r.sweep_idle(15_000).await.unwrap(), vec![k.clone()], "{name}: nor is a refused start");

        r.open(&k, &info("m1"), 20_000).await.unwrap();
        let taken = r.take(&k).await.unwrap().expect("open");
        r.open(&k, &info("m2"), 21_000).await.unwrap();
        other_node.restore(taken, 29_000).await.unwrap();
        assert_eq!(r.sweep_idle(25_000).await.unwrap(), vec![k.clone()], "{name}: nor a put-back that lost");
    }
}

#[tokio::test]
async fn redis_holds_no_plaintext_of_chunks_user_ids_or_metadata() {
    let Some(url) = common::cluster::redis_url() else { return };
    let prefix = common::cluster::unique_prefix();
    let r = RedisStreams::new(&url, &prefix, MasterKey::generate().derive("streams"), 4096, Duration::from_secs(60))
        .unwrap();
    let k = key("user-plaintext-id", "chat-plaintext-id", "stream-plaintext-id");
    r.open(&k, &info("message-plaintext-id"), 1).await.unwrap();
    r.append(&k, 1, "CHUNK-PLAINTEXT-ONE", 2).await.unwrap();
    r.append(&k, 2, "CHUNK-PLAINTEXT-TWO", 3).await.unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    assert!(keys.len() >= 3, "{keys:?}");
    let mut everything = keys.join("\n").into_bytes();
    for k in &keys {
        let kind: String = redis::cmd("TYPE").arg(k).query_async(&mut conn).await.unwrap();
        let dump: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(k).query_async(&mut conn).await.unwrap(),
            "list" => redis::cmd("LRANGE").arg(k).arg(0).arg(-1).query_async(&mut conn).await.unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(k).query_async(&mut conn).await.unwrap(),
            "zset" => redis::cmd("ZRANGE").arg(k).arg(0).arg(-1).query_async(&mut conn).await.unwrap(),
            other => panic!("unexpected key type {other}"),
        };
        let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut conn).await.unwrap();
        assert!(ttl > 0, "{k} expires as a backstop (pttl {ttl})");
        for d in dump {
            everything.extend_from_slice(&d);
        }
    }
    let hay = String::from_utf8_lossy(&everything);
    for secret in ["PLAINTEXT", "plaintext", "secret-model"] {
        assert!(!hay.contains(secret), "`{secret}` is in Redis");
    }
    // Still readable through the registry.
    assert_eq!(r.take(&k).await.unwrap().unwrap().content, "CHUNK-PLAINTEXT-ONECHUNK-PLAINTEXT-TWO");
    let _: () = redis::cmd("DEL").arg(format!("{prefix}streams:idle")).query_async(&mut conn).await.unwrap();
}

/// A start (or a put-back) whose stream cannot be put in the idle index (Redis refuses the command) opens
/// nothing: the caller's error means "not open", and no stream is left that no sweep would ever time out. Redis
/// refuses through an ACL user of the test's own that may run everything but ZADD.
#[tokio::test]
async fn a_start_that_cannot_be_indexed_for_the_idle_sweep_opens_nothing() {
    let Some(url) = common::cluster::redis_url() else { return };
    let prefix = common::cluster::unique_prefix();
    let user = format!("{}nozadd", prefix.replace(':', "-"));
    let admin = redis::Client::open(url.as_str()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", &user, "reset", "on", ">pw", "~*", "&*", "+@all", "-zadd"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let limited = url.replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let master = MasterKey::generate();
    let node =
        |url: &str| RedisStreams::new(url, &prefix, master.derive("streams"), MAX, Duration::from_secs(60)).unwrap();
    let (refused, full) = (node(&limited), node(&url));
    let k = key("alice", "c1", "s1");
    let opened = refused.open(&k, &info("m1"), 1).await;
    // The same for putting back a stream taken for a completion that failed.
    let k2 = key("alice", "c1", "s2");
    full.open(&k2, &info("m2"), 1).await.unwrap();
    let taken = full.take(&k2).await.unwrap().unwrap();
    let restored = refused.restore(taken, 2).await;
    let _: () = redis::cmd("ACL").arg(&["DELUSER", &user]).query_async(&mut conn).await.unwrap();
    assert!(matches!(opened, Err(StreamError::Unavailable(_))), "{opened:?}");
    assert!(matches!(restored, Err(StreamError::Unavailable(_))), "{restored:?}");
    assert!(full.list("alice").await.unwrap().is_empty(), "nothing was opened or put back");
    assert_eq!(full.open(&k, &info("m1"), 2).await, Ok(Opened::New), "the retry opens it afresh");
    assert_eq!(full.take(&k).await.unwrap().map(|s| s.seq), Some(0));
    let _: () = redis::cmd("DEL").arg(format!("{prefix}streams:idle")).query_async(&mut conn).await.unwrap();
}

/// A Redis registry under `prefix`, and a connection of the test's own to look at its keys.
async fn redis_registry(url: &str, prefix: &str) -> (RedisStreams, redis::aio::MultiplexedConnection) {
    let r =
        RedisStreams::new(url, prefix, MasterKey::generate().derive("streams"), MAX, Duration::from_secs(60)).unwrap();
    let conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    (r, conn)
}

/// A sweep that fails on one stream still returns the streams it already removed (their `stream_cancelled`
/// is announced from that list alone) and goes on with the next ones. The failing one here is a key that
/// is not a stream's hash (a string where the hash should be): it is dropped from the idle index, so it does
/// not fail every later sweep.
#[tokio::test]
async fn a_sweep_that_fails_on_one_stream_returns_those_it_removed() {
    let Some(url) = common::cluster::redis_url() else { return };
    let prefix = common::cluster::unique_prefix();
    let (r, mut conn) = redis_registry(&url, &prefix).await;
    // The broken stream first, alone, to find its hash key; then one idle before it and one after it.
    let (first, broken, last) = (key("alice", "c1", "first"), key("alice", "c1", "broken"), key("bob", "c1", "last"));
    r.open(&broken, &info("m2"), 2_000).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}stream:*")).query_async(&mut conn).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("SET").arg(&keys[0]).arg("not a hash").query_async(&mut conn).await.unwrap();
    r.open(&first, &info("m1"), 1_000).await.unwrap();
    r.open(&last, &info("m3"), 3_000).await.unwrap();

    let swept = r.sweep_idle(4_000).await.expect("what was removed is returned");
    assert_eq!(swept, vec![first.clone(), last.clone()], "before and after the broken one");
    assert!(!r.is_open(&first).await.unwrap() && !r.is_open(&last).await.unwrap());
    assert_eq!(r.sweep_idle(4_000).await, Ok(vec![]), "the broken key left the idle index");
    let idle: Vec<String> =
        redis::cmd("ZRANGE").arg(format!("{prefix}streams:idle")).arg(0).arg(-1).query_async(&mut conn).await.unwrap();
    assert!(idle.is_empty(), "{idle:?}");
    let _: () =
        redis::cmd("DEL").arg(&keys[0]).arg(format!("{prefix}streams:idle")).query_async(&mut conn).await.unwrap();
}

/// A take whose reply is slow (Redis stalls for a second and a half with the take queued) still returns the
/// stream: the script runs when Redis goes on, so giving up on its reply would lose the stream's text (gone
/// from Redis, no copy with the caller, and a retried `complete` finds nothing). The registry waits as long
/// as the bus (3 s), not the crate's default 500 ms. On a Redis server of the test's own, since it stalls.
#[tokio::test]
async fn a_take_whose_reply_is_slow_still_returns_the_stream() {
    if common::cluster::redis_url().is_none() {
        return;
    }
    let own = common::cluster::OwnRedis::start();
    let r = Arc::new(
        RedisStreams::new(&own.url(), "slow:", MasterKey::generate().derive("streams"), MAX, Duration::from_secs(60))
            .unwrap(),
    );
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1).await.unwrap();
    r.append(&k, 1, "partial", 2).await.unwrap();
    own.pause();
    let take = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move { r.take(&k).await }
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    own.resume();
    let taken = take.await.unwrap();
    assert_eq!(taken.map(|s| s.map(|s| (s.seq, s.content))), Ok(Some((1, "partial".into()))));
}

/// A TCP proxy to a Redis server that, when armed, forwards the next EVALSHA, waits for Redis's reply (so
/// the script has run), tells the test, waits until the test lets it go on, and then closes the connection
/// without passing the reply on: a script that ran and whose reply was lost. Armed with
/// [`ReplyLoser::hold_after`], it passes the reply on instead and holds what the client sends next until
/// the test lets it go on: the test acts between a script and the command that follows it. Armed with
/// [`ReplyLoser::delay`], it holds the script itself until the test lets it go on, then sends it to Redis
/// and tells the test once it ran: a script that reaches Redis late (its client gave up on it).
struct ReplyLoser {
    port: u16,
    armed: Arc<parking_lot::Mutex<Option<Armed>>>,
    stop: tokio_util::sync::CancellationToken,
}

struct Armed {
    ran: tokio::sync::oneshot::Sender<()>,
    go_on: tokio::sync::oneshot::Receiver<()>,
    mode: Mode,
    /// Scripts to let through before this one.
    skip: usize,
}

enum Mode {
    Lose,
    HoldAfter,
    /// Holds the script; the sender says when it has run, late.
    Delay(tokio::sync::oneshot::Sender<()>),
}

impl ReplyLoser {
    async fn start(target: String) -> ReplyLoser {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Arc<parking_lot::Mutex<Option<Armed>>> = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        // While a lost reply is held, scripts on the proxy's other connections wait too: a client that gave
        // up on the reply (its 3 s timeout, on a loaded machine) retries on a new connection, which must
        // not overtake the held script's test.
        let (losing, _) = tokio::sync::watch::channel(false);
        let (armed2, stop2) = (armed.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                let (target, armed, stop, losing) = (target.clone(), armed2.clone(), stop2.clone(), losing.clone());
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(&target).await.unwrap();
                    let ((mut cr, mut cw), (mut sr, mut sw)) = (client.into_split(), server.into_split());
                    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            n = cr.read(&mut up) => {
                                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                                let script = up[..n].windows(7).any(|w| w == b"EVALSHA");
                                let armed = script.then(|| {
                                    let mut armed = armed.lock();
                                    match armed.as_mut() {
                                        Some(a) if a.skip > 0 => {
                                            a.skip -= 1;
                                            None
                                        }
                                        _ => armed.take(),
                                    }
                                });
                                let Some(armed) = armed.flatten() else {
                                    if script {
                                        let _ = losing.subscribe().wait_for(|held| !held).await;
                                    }
                                    if sw.write_all(&up[..n]).await.is_err() { return }
                                    continue;
                                };
                                if let Mode::Delay(ran_late) = armed.mode {
                                    // Held here; sent once the test lets it go, then the connection ends.
                                    let _ = armed.ran.send(());
                                    let _ = armed.go_on.await;
                                    if sw.write_all(&up[..n]).await.is_err() { return }
                                    let _ = sr.read(&mut down).await;
                                    let _ = ran_late.send(());
                                    return;
                                }
                                if sw.write_all(&up[..n]).await.is_err() { return }
                                // The reply comes once the script has run: read it and drop it, or
                                // pass it on and hold what follows.
                                let n = match sr.read(&mut down).await { Ok(0) | Err(_) => return, Ok(n) => n };
                                let lose = matches!(armed.mode, Mode::Lose);
                                if !lose && cw.write_all(&down[..n]).await.is_err() { return }
                                if lose {
                                    losing.send_replace(true);
                                }
                                let _ = armed.ran.send(());
                                let _ = armed.go_on.await;
                                if lose {
                                    losing.send_replace(false);
                                    return; // closes both sides
                                }
                            }
                            n = sr.read(&mut down) => {
                                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                                if cw.write_all(&down[..n]).await.is_err() { return }
                            }
                        }
                    }
                });
            }
        });
        ReplyLoser { port, armed, stop }
    }

    /// Loses the reply of the next script: returns (script ran, let it go on).
    fn arm(&self) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        self.armed_to(Mode::Lose)
    }

    /// Passes on the reply of the next script and holds what the client sends after it: returns (script
    /// ran and its reply is passed on, let the rest through).
    fn hold_after(&self) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        self.armed_to(Mode::HoldAfter)
    }

    /// As [`ReplyLoser::hold_after`], for the script after the next `skip` ones.
    fn hold_after_skipping(
        &self,
        skip: usize,
    ) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        let armed = self.armed_to(Mode::HoldAfter);
        self.armed.lock().as_mut().expect("just armed").skip = skip;
        armed
    }

    /// Holds the next script: returns (script held, send it now, it ran).
    fn delay(
        &self,
    ) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::Receiver<()>)
    {
        let (ran_late, ran_late_rx) = tokio::sync::oneshot::channel();
        let (held, go_on) = self.armed_to(Mode::Delay(ran_late));
        (held, go_on, ran_late_rx)
    }

    fn armed_to(&self, mode: Mode) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        let (ran, ran_rx) = tokio::sync::oneshot::channel();
        let (go_on_tx, go_on) = tokio::sync::oneshot::channel();
        *self.armed.lock() = Some(Armed { ran, go_on, mode, skip: 0 });
        (ran_rx, go_on_tx)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for ReplyLoser {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A Redis server of the test's own, the proxy in front of it, and two nodes' registries on it: `r`
/// through the proxy, `other_node` directly.
struct TwoNodes {
    own: common::cluster::OwnRedis,
    proxy: ReplyLoser,
    r: Arc<RedisStreams>,
    other_node: Arc<RedisStreams>,
}

/// [`TwoNodes`], or `None` where the tests run without Redis.
async fn two_nodes() -> Option<TwoNodes> {
    common::cluster::redis_url()?;
    let own = common::cluster::OwnRedis::start();
    let proxy = ReplyLoser::start(own.addr()).await;
    let master = MasterKey::generate();
    // A merge may wait for the test as long as it needs (a proxy holds it): the default 1 s could pass
    // on a loaded machine, and the merge would then run after the test looked.
    let node = |url: &str| {
        let streams = RedisStreams::new(url, "two:", master.derive("streams"), BIG, Duration::from_secs(60));
        Arc::new(streams.unwrap().with_merge_timeout(Duration::from_secs(120)))
    };
    let (r, other_node) = (node(&proxy.url()), node(&own.url()));
    Some(TwoNodes { own, proxy, r, other_node })
}

/// The keys in `redis` (a server of the test's own) once the streams there are taken: none but the
/// markers of finished takes and put-backs (`…:taken:<nonce>` or `…:restored:<nonce>` = `1`, expiring
/// within 60 s), which are left out.
async fn left_in_redis(url: &str) -> Vec<(String, i64)> {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut left = Vec::new();
    for (k, ttl) in keys_with_ttl(url).await {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut conn).await.unwrap();
        if (k.contains(":taken:") || k.contains(":restored:")) && kind == "string" {
            let v: String = redis::cmd("GET").arg(&k).query_async(&mut conn).await.unwrap();
            assert!(v == "1" && ttl > 0 && ttl <= 60_000, "a take's marker: {k} = {v}, ttl {ttl}");
        } else {
            left.push((k, ttl));
        }
    }
    left
}

/// The copies of streams taken (lists under `…:taken:<nonce>`), with their time to live.
async fn taken_copies(url: &str) -> Vec<(String, i64)> {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut copies = Vec::new();
    for (k, ttl) in keys_with_ttl(url).await {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut conn).await.unwrap();
        if k.contains(":taken:") && kind == "list" {
            copies.push((k, ttl));
        }
    }
    copies
}

/// Every key in `redis` (a server of the test's own) with its remaining time to live (ms; -1: none).
async fn keys_with_ttl(url: &str) -> Vec<(String, i64)> {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    let mut out = Vec::new();
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut conn).await.unwrap();
        out.push((k, ttl));
    }
    out
}

/// A take whose script ran in Redis but whose reply never reached the node (the connection broke right
/// after the script) still returns the stream with its whole text: the take runs its script again with the
/// same nonce, which finds what the first run took. Meanwhile the stream is not open for any other take
/// (another node's take finds nothing, so exactly one wins), and afterwards Redis holds nothing of it.
/// Before, the take failed and the stream was gone: its text lost, a retried `complete` got 409.
#[tokio::test]
async fn a_take_whose_reply_is_lost_still_returns_the_stream_once() {
    let Some(TwoNodes { own, proxy: loser, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1).await.unwrap();
    r.append(&k, 1, "partial ", 2).await.unwrap();
    r.append(&k, 2, "text", 3).await.unwrap();
    r.append(&k, 3, "", 4).await.unwrap();

    let (ran, go_on) = loser.arm();
    let take = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move { r.take(&k).await }
    });
    ran.await.expect("the take's script reached Redis");
    // The script ran; its reply is held back. The stream is taken for everyone else.
    assert!(!other_node.is_open(&k).await.unwrap());
    assert_eq!(other_node.take(&k).await, Ok(None), "another take races and finds nothing");
    assert!(other_node.list("alice").await.unwrap().is_empty());
    let held = taken_copies(&own.url()).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].1 > 0 && held[0].1 <= 60_000, "the taken copy expires: {held:?}");
    drop(go_on);

    let taken = tokio::time::timeout(Duration::from_secs(20), take).await.expect("the take ends").unwrap();
    let taken = taken.expect("the take gets its reply at a retry").expect("the stream it took");
    assert_eq!((taken.seq, taken.content.as_str(), &taken.info), (3, "partial text", &info("m1")));
    assert_eq!(r.take(&k).await, Ok(None), "taken once");
    assert_eq!(r.append(&k, 4, "x", 5).await, Err(StreamError::NotOpen));
    assert_eq!(left_in_redis(&own.url()).await, vec![], "nothing left in Redis: no taken copy, no index entry");

    // It can be put back (a completion that failed) and completes normally afterwards.
    r.restore(taken, 6).await.unwrap();
    assert_eq!(r.append(&k, 4, "!", 7).await, Ok(Appended::Accepted));
    assert_eq!(other_node.take(&k).await.unwrap().map(|s| (s.seq, s.content)), Some((4, "partial text!".into())));
    assert_eq!(left_in_redis(&own.url()).await, vec![]);
}

/// An open whose script ran in Redis but whose reply never reached the node runs it again with the same
/// nonce and gets the first run's answer: a new stream (to be announced), opened once. Before, the call
/// failed (503), and the backend's retried start found the stream open: 200, and `stream_started` was never
/// sent; a run again without the nonce answered "already open" likewise.
#[tokio::test]
async fn an_open_whose_reply_is_lost_still_answers_new_once() {
    let Some(TwoNodes { own: _own, proxy: loser, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    let (ran, go_on) = loser.arm();
    let open = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move { r.open(&k, &info("m1"), 1_000).await }
    });
    ran.await.expect("the open's script reached Redis");
    assert!(other_node.is_open(&k).await.unwrap(), "the first run opened it");
    drop(go_on);
    let opened = tokio::time::timeout(Duration::from_secs(20), open).await.expect("the open ends").unwrap();
    assert_eq!(opened, Ok(Opened::New), "the first run's answer");
    let open: Vec<_> = other_node.list("alice").await.unwrap().into_iter().map(|s| (s.key, s.seq)).collect();
    assert_eq!(open, vec![(k.clone(), 0)], "one stream");
    assert_eq!(r.open(&k, &info("m1"), 2_000).await, Ok(Opened::AlreadyOpen), "another start is a retry");
    assert_eq!(r.open(&k, &info("m2"), 2_000).await, Err(StreamError::Conflict));
}

/// An append whose script ran in Redis but whose reply never reached the node runs it again with the same
/// nonce and gets the first run's answer, accepted (so the chunk is delivered), and the text holds the
/// chunk once. Before, the call failed (503) and the backend's retry was a duplicate (200): accepted and
/// never delivered to the devices; a run again without the nonce answered "duplicate" likewise.
#[tokio::test]
async fn an_append_whose_reply_is_lost_still_answers_accepted_once() {
    let Some(TwoNodes { own: _own, proxy: loser, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1_000).await.unwrap();
    r.append(&k, 1, "partial ", 1_001).await.unwrap();
    let (ran, go_on) = loser.arm();
    let append = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move { r.append(&k, 2, "text", 1_002).await }
    });
    ran.await.expect("the append's script reached Redis");
    drop(go_on);
    let appended = tokio::time::timeout(Duration::from_secs(20), append).await.expect("the append ends").unwrap();
    assert_eq!(appended, Ok(Appended::Accepted), "the first run's answer");
    assert_eq!(r.append(&k, 2, "text", 1_003).await, Ok(Appended::Duplicate), "a later call is a repeat");
    assert_eq!(r.append(&k, 3, "!", 1_004).await, Ok(Appended::Accepted));
    let taken = other_node.take(&k).await.unwrap().expect("open");
    assert_eq!((taken.seq, taken.content.as_str()), (3, "partial text!"), "each chunk once");
}

/// A put-back (a completion that failed) whose script ran in Redis but whose reply never reached the node
/// runs it again with the same nonce and succeeds: the stream is open with its text. And if the stream
/// was taken between the run and the run again (a device cancelled it), the run again does not reopen it.
/// Before, the put-back failed (logged only) although it had happened; a run again without its marker
/// would have reopened the cancelled stream.
#[tokio::test]
async fn a_put_back_whose_reply_is_lost_succeeds_once() {
    let Some(TwoNodes { own, proxy: loser, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1_000).await.unwrap();
    r.append(&k, 1, "text", 1_001).await.unwrap();
    let taken = r.take(&k).await.unwrap().expect("open");

    let (ran, go_on) = loser.arm();
    let restore = tokio::spawn({
        let (r, taken) = (r.clone(), taken.clone());
        async move { r.restore(taken, 2_000).await }
    });
    ran.await.expect("the put-back's script reached Redis");
    drop(go_on);
    let restored = tokio::time::timeout(Duration::from_secs(20), restore).await.expect("the put-back ends").unwrap();
    assert_eq!(restored, Ok(()));
    assert_eq!(r.append(&k, 2, "!", 2_001).await, Ok(Appended::Accepted));
    let again = other_node.take(&k).await.unwrap().expect("put back");
    assert_eq!((again.seq, again.content.as_str()), (2, "text!"));

    // The stream is cancelled between the put-back's run and its run again: it stays cancelled.
    let (ran, go_on) = loser.arm();
    let restore = tokio::spawn({
        let r = r.clone();
        async move { r.restore(again, 3_000).await }
    });
    ran.await.expect("the put-back's script reached Redis");
    assert!(other_node.take(&k).await.unwrap().is_some(), "a device cancels the stream put back");
    drop(go_on);
    let restored = tokio::time::timeout(Duration::from_secs(20), restore).await.expect("the put-back ends").unwrap();
    assert_eq!(restored, Ok(()));
    assert!(!other_node.is_open(&k).await.unwrap(), "not reopened by the run again");
    assert_eq!(left_in_redis(&own.url()).await, vec![], "nothing left in Redis but expiring markers");
}

/// The idle sweep takes too: a sweep whose script ran but whose reply was lost still returns the idle
/// stream (its `stream_cancelled` is announced), exactly once across the nodes, and leaves nothing behind.
#[tokio::test]
async fn a_sweep_whose_reply_is_lost_still_returns_the_idle_stream_once() {
    let Some(TwoNodes { own, proxy: loser, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "idle");
    r.open(&k, &info("m1"), 1_000).await.unwrap();
    r.append(&k, 1, "some text", 1_000).await.unwrap();

    let (ran, go_on) = loser.arm();
    let sweep = tokio::spawn({
        let r = r.clone();
        async move { r.sweep_idle(4_000).await }
    });
    ran.await.expect("the sweep's script reached Redis");
    assert_eq!(other_node.sweep_idle(4_000).await, Ok(vec![]), "the other node's sweep finds it taken");
    drop(go_on);
    let swept = tokio::time::timeout(Duration::from_secs(20), sweep).await.expect("the sweep ends").unwrap();
    assert_eq!(swept, Ok(vec![k.clone()]));
    assert_eq!(r.sweep_idle(4_000).await, Ok(vec![]));
    assert!(!r.is_open(&k).await.unwrap());
    assert_eq!(left_in_redis(&own.url()).await, vec![], "nothing left in Redis");
}

/// A stream opened again, under the same chat and stream id, between a take's script and the cleanup
/// that follows it keeps its idle index entry: it is swept (and its end announced) when it goes idle.
/// Before, the take's cleanup removed the entry by name, and the stream opened again was never swept.
#[tokio::test]
async fn a_stream_opened_again_between_a_take_and_its_cleanup_is_still_swept() {
    let Some(TwoNodes { own, proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1_000).await.unwrap();
    r.append(&k, 1, "first", 2_000).await.unwrap();

    let (ran, go_on) = proxy.hold_after();
    let take = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move { r.take(&k).await }
    });
    ran.await.expect("the take's script ran");
    assert_eq!(other_node.open(&k, &info("m2"), 3_000).await, Ok(Opened::New));
    drop(go_on);
    let taken = take.await.unwrap().unwrap().expect("the first stream");
    assert_eq!((taken.content.as_str(), &taken.info), ("first", &info("m1")));

    assert_eq!(other_node.sweep_idle(10_000).await, Ok(vec![k.clone()]), "the second stream is swept");
    assert_eq!(left_in_redis(&own.url()).await, vec![], "nothing left in Redis");
}

/// Likewise for the sweep: an index entry whose stream is gone (taken elsewhere, or expired) is dropped,
/// but not once the same chat and stream id has been opened again after the sweep's script looked.
#[tokio::test]
async fn a_stream_opened_again_while_the_sweep_drops_its_old_entry_is_still_swept() {
    let Some(TwoNodes { own, proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    other_node.open(&k, &info("m1"), 1_000).await.unwrap();
    // The stream's keys expire (the backstop), its index entry stays.
    let mut conn = redis::Client::open(own.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for (name, _) in keys_with_ttl(&own.url()).await {
        if !name.ends_with("streams:idle") {
            let _: () = redis::cmd("DEL").arg(&name).query_async(&mut conn).await.unwrap();
        }
    }

    let (ran, go_on) = proxy.hold_after();
    let sweep = tokio::spawn({
        let r = r.clone();
        async move { r.sweep_idle(4_000).await }
    });
    ran.await.expect("the sweep's script ran");
    assert_eq!(other_node.open(&k, &info("m2"), 5_000).await, Ok(Opened::New));
    drop(go_on);
    assert_eq!(sweep.await.unwrap(), Ok(vec![]), "nothing was idle");

    assert_eq!(other_node.sweep_idle(10_000).await, Ok(vec![k.clone()]), "the second stream is swept");
    assert_eq!(left_in_redis(&own.url()).await, vec![], "nothing left in Redis");
}

/// A run of a take that reaches Redis late (given up on at the reply timeout while delayed on the way, and
/// run again, which took the stream) finds the take over and takes nothing, not even the stream that a
/// failed completion has put back meanwhile. Before, it took that stream into a copy nobody reads: the
/// stream vanished, and the backend's retried `complete` got 409.
#[tokio::test]
async fn a_late_run_of_a_finished_take_takes_nothing() {
    let Some(TwoNodes { own, proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1_000).await.unwrap();
    r.append(&k, 1, "text", 2_000).await.unwrap();

    let (held, send_it, ran_late) = proxy.delay();
    let take = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move { r.take(&k).await }
    });
    held.await.expect("the take's first run is held on the way");
    // Its reply times out; the take runs again on a new connection and takes the stream.
    let taken = tokio::time::timeout(Duration::from_secs(30), take).await.expect("the take ends").unwrap();
    let taken = taken.unwrap().expect("taken by the second run");
    assert_eq!((taken.seq, taken.content.as_str()), (1, "text"));
    // The completion failed: the stream is put back. Then the first run reaches Redis.
    r.restore(taken, 5_000).await.unwrap();
    drop(send_it);
    ran_late.await.expect("the late run ran");

    assert!(other_node.is_open(&k).await.unwrap(), "the stream put back is still open");
    let again = other_node.take(&k).await.unwrap().expect("and can be taken");
    assert_eq!((again.seq, again.content.as_str()), (1, "text"));
    assert_eq!(left_in_redis(&own.url()).await, vec![], "nothing left in Redis");
}

/// The length of the one stream's chunk list in `redis` (a server of the test's own).
async fn chunk_entries(url: &str) -> i64 {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let lists: Vec<String> = redis::cmd("KEYS").arg("*:c").query_async(&mut conn).await.unwrap();
    assert_eq!(lists.len(), 1, "{lists:?}");
    redis::cmd("LLEN").arg(&lists[0]).query_async(&mut conn).await.unwrap()
}

/// Token-sized chunks are merged in Redis as they come (about one entry per 64 chunks instead of one
/// each: each entry costs a nonce, a tag and a seq besides Redis's own overhead), and the stream reads
/// and is taken whole, in order.
#[tokio::test]
async fn small_chunks_are_kept_merged_in_redis_and_read_whole() {
    let Some(TwoNodes { own, proxy: _proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    r.open(&k, &info("m1"), 1).await.unwrap();
    let mut expected = String::new();
    for seq in 1..=1000u64 {
        let delta = format!("{seq},");
        expected.push_str(&delta);
        // Through both nodes: either may be the one that merges.
        let node = if seq % 3 == 0 { &other_node } else { &r };
        assert_eq!(node.append(&k, seq, &delta, 2).await, Ok(Appended::Accepted));
        node.tidy(&k).await; // as the chunk call does once the chunk is delivered
        if seq % 10 == 0 {
            assert_eq!(node.append(&k, seq, "dup", 2).await, Ok(Appended::Duplicate));
        }
    }
    let entries = chunk_entries(&own.url()).await;
    assert!(entries <= 1000 / 64 + 65, "{entries} entries for 1,000 chunks");
    let listed = other_node.list("alice").await.unwrap();
    assert_eq!(listed.iter().map(|s| (s.seq, s.content.as_str())).collect::<Vec<_>>(), [(1000, expected.as_str())]);
    let taken = r.take(&k).await.unwrap().expect("open");
    assert_eq!((taken.seq, taken.content.as_str()), (1000, expected.as_str()));
    let kept: Vec<_> = keys_with_ttl(&own.url()).await.into_iter().filter(|(k, _)| k.contains(":taken:")).collect();
    assert!(kept.is_empty(), "a take answered at its first run leaves no marker: {kept:?}");
}

/// A chunk appended between a merge's read and its write stays after the merged run.
#[tokio::test]
async fn a_chunk_appended_while_chunks_are_merged_is_kept_after_them() {
    let Some(TwoNodes { own, proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    // The 65th chunk asks for a merge: held after the merge has read the entries, while another node
    // appends the 66th.
    let (append, go_on) = a_merge_held_after_its_read(&proxy, &r, &k).await;
    assert_eq!(other_node.append(&k, 66, "YZ", 4).await, Ok(Appended::Accepted));
    drop(go_on);
    assert_eq!(append.await.unwrap(), Ok(Appended::Accepted));
    assert_eq!(chunk_entries(&own.url()).await, 2, "the merged run, then the 66th");
    let taken = other_node.take(&k).await.unwrap().expect("open");
    assert_eq!((taken.seq, taken.content), (66, format!("{}YZ", "ab".repeat(65))));
}

/// Opens `k` through `r` with 64 chunks of "ab", then appends a 65th (which asks for a merge) and tidies,
/// held by `proxy` once the merge has read the entries (the append's script, then the read): returns
/// that append (with its merge) and what lets it go on.
async fn a_merge_held_after_its_read(
    proxy: &ReplyLoser,
    r: &Arc<RedisStreams>,
    k: &StreamKey,
) -> (tokio::task::JoinHandle<Result<Appended, StreamError>>, tokio::sync::oneshot::Sender<()>) {
    r.open(k, &info("m1"), 1).await.unwrap();
    for seq in 1..=64u64 {
        r.append(k, seq, "ab", 2).await.unwrap();
    }
    let (read, go_on) = proxy.hold_after_skipping(1);
    let append = tokio::spawn({
        let (r, k) = (r.clone(), k.clone());
        async move {
            let appended = r.append(&k, 65, "ab", 3).await;
            r.tidy(&k).await;
            appended
        }
    });
    read.await.expect("the merge read the entries");
    (append, go_on)
}

/// A merge held while the stream is taken and a new one opened under the same name, with more entries
/// after its (empty) merged head than the merge read, writes nothing: the entry it read is not there.
#[tokio::test]
async fn a_merge_raced_by_a_new_stream_of_the_same_name_writes_nothing() {
    let Some(TwoNodes { own, proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    let (append, go_on) = a_merge_held_after_its_read(&proxy, &r, &k).await;
    assert!(other_node.take(&k).await.unwrap().is_some());
    assert_eq!(other_node.open(&k, &info("m2"), 5).await, Ok(Opened::New));
    // As many entries as the held merge read, and more (no tidy: this node merges nothing), so that only
    // the comparison of the entry it read tells the lists apart.
    for seq in 1..=70u64 {
        other_node.append(&k, seq, "n", 6).await.unwrap();
    }
    drop(go_on);
    assert_eq!(append.await.unwrap(), Ok(Appended::Accepted));
    assert_eq!(chunk_entries(&own.url()).await, 70, "the new stream's entries, untouched");
    let taken = other_node.take(&k).await.unwrap().expect("open");
    assert_eq!((taken.seq, taken.content, taken.info), (70, "n".repeat(70), info("m2")));
}

/// A merge whose entries were replaced meanwhile (the stream taken and put back) writes nothing.
#[tokio::test]
async fn a_merge_raced_by_a_take_and_a_restore_leaves_the_restored_stream() {
    let Some(TwoNodes { own, proxy, r, other_node }) = two_nodes().await else { return };
    let k = key("alice", "c1", "s1");
    let (append, go_on) = a_merge_held_after_its_read(&proxy, &r, &k).await;
    let taken = other_node.take(&k).await.unwrap().expect("open");
    assert_eq!(taken.seq, 65);
    other_node.restore(taken, 5).await.unwrap();
    assert_eq!(other_node.append(&k, 66, "!", 6).await, Ok(Appended::Accepted));
    drop(go_on);
    assert_eq!(append.await.unwrap(), Ok(Appended::Accepted));
    assert_eq!(chunk_entries(&own.url()).await, 2, "the restored text, then the 66th");
    let again = other_node.take(&k).await.unwrap().expect("open");
    assert_eq!((again.seq, again.content), (66, format!("{}!", "ab".repeat(65))));
}

/// A user has at most the cap of streams open (`max_open_streams_per_user`), counted across chats and, in
/// Redis, across nodes; a retried start of an open stream is not a new one, another user has a cap of
/// their own, and every way a stream ends frees its slot: a take (`complete`, abort, `cancel_stream`, a
/// deleted chat) and the idle sweep. A failed completion puts its stream back even at the cap (it held a
/// slot until its take); starts then wait until the count is under the cap again.
#[tokio::test]
async fn a_user_has_at_most_the_cap_of_streams_open_and_an_ended_one_frees_its_slot() {
    const CAP: usize = 3;
    let too_many = Err(StreamError::TooMany { max: CAP });
    for (name, r, other_node) in capped_registries(CAP).await {
        let s = |i: usize| key("alice", "c1", &format!("s{i}"));
        let m = |i: usize| info(&format!("m{i}"));
        for i in 0..CAP {
            assert_eq!(r.open(&s(i), &m(i), 1).await, Ok(Opened::New), "{name}: stream {i}");
        }
        let elsewhere = key("alice", "c2", "x");
        assert_eq!(other_node.open(&elsewhere, &m(9), 2).await, too_many, "{name}: in another chat, on another node");
        assert!(!r.is_open(&elsewhere).await.unwrap(), "{name}: a refused start opens nothing");
        assert_eq!(r.open(&s(0), &m(0), 2).await, Ok(Opened::AlreadyOpen), "{name}: a retried start");
        assert_eq!(r.open(&s(0), &m(7), 2).await, Err(StreamError::Conflict), "{name}");
        assert_eq!(r.open(&key("bob", "c1", "s0"), &m(0), 5).await, Ok(Opened::New), "{name}: bob's own cap");

        let taken = r.take(&s(0)).await.unwrap().expect("open");
        assert_eq!(other_node.open(&s(10), &m(10), 3).await, Ok(Opened::New), "{name}: the taken stream's slot");
        assert_eq!(r.open(&s(11), &m(11), 3).await, too_many, "{name}");
        r.restore(taken, 3).await.unwrap();
        assert!(r.is_open(&s(0)).await.unwrap(), "{name}: put back over the cap");
        assert_eq!(other_node.list("alice").await.unwrap().len(), CAP + 1, "{name}");
        r.take(&s(1)).await.unwrap().expect("open");
        assert_eq!(r.open(&s(11), &m(11), 4).await, too_many, "{name}: at the cap again, not under it");
        assert_eq!(r.sweep_idle(2).await.unwrap(), vec![s(2)], "{name}: s2 went idle");
        assert_eq!(r.open(&s(11), &m(11), 4).await, Ok(Opened::New), "{name}: the idle stream's slot");
        assert_eq!(other_node.open(&s(12), &m(12), 4).await, too_many, "{name}");
        let mut open: Vec<_> =
            r.list("alice").await.unwrap().into_iter().map(|s| s.key.stream_id.to_string()).collect();
        open.sort();
        assert_eq!(open, ["s0", "s10", "s11"], "{name}");
    }
}

/// Redis: a member of a user's set whose stream is gone without a take (its keys expired: the backstop
/// when no node swept it) does not hold a slot for ever: an open that finds the user at the cap forgets
/// such members and tries again.
#[tokio::test]
async fn redis_a_stream_that_expired_does_not_hold_a_slot() {
    let Some(url) = common::cluster::redis_url() else { return };
    let prefix = common::cluster::unique_prefix();
    let r = RedisStreams::new(&url, &prefix, MasterKey::generate().derive("streams"), MAX, Duration::from_secs(60))
        .unwrap()
        .with_max_open(1);
    r.open(&key("alice", "c1", "s1"), &info("m1"), 1).await.unwrap();
    assert_eq!(r.open(&key("alice", "c1", "s2"), &info("m2"), 2).await, Err(StreamError::TooMany { max: 1 }));
    // s1's hash expires (it has no chunk list): the user set still names it.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}stream:*")).query_async(&mut conn).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    assert_eq!(r.open(&key("alice", "c1", "s2"), &info("m2"), 3).await, Ok(Opened::New));
    let open: Vec<_> = r.list("alice").await.unwrap().into_iter().map(|s| s.key.stream_id.to_string()).collect();
    assert_eq!(open, ["s2"]);
    assert_eq!(r.open(&key("alice", "c1", "s3"), &info("m3"), 4).await, Err(StreamError::TooMany { max: 1 }));
    let _: () = redis::cmd("DEL").arg(format!("{prefix}streams:idle")).query_async(&mut conn).await.unwrap();
}

/// Redis: a stream whose stored state does not decode (damaged, or written by another version; here a
/// `rec` that does not open, and a string where a stream's hash should be) is left out of the user's list,
/// and the others are listed. Before, the whole list failed until the damaged stream expired: every initial
/// sync of the user came without `active_streams`, and a chat deletion ended none of the user's streams.
#[tokio::test]
async fn redis_a_stream_that_does_not_decode_is_left_out_of_the_list() {
    let Some(url) = common::cluster::redis_url() else { return };
    let prefix = common::cluster::unique_prefix();
    let (r, mut conn) = redis_registry(&url, &prefix).await;
    let hashes = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let pattern = format!("{prefix}stream:*");
        async move {
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap();
            keys.into_iter().filter(|k| !k.ends_with(":c")).collect::<std::collections::BTreeSet<_>>()
        }
    };
    // Each damaged stream opened alone first, to find its hash.
    r.open(&key("alice", "c1", "damaged"), &info("m1"), 1).await.unwrap();
    let damaged = hashes(&mut conn).await;
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    let damaged = damaged.into_iter().next().unwrap();
    let _: () = redis::cmd("HSET").arg(&damaged).arg("rec").arg("not sealed").query_async(&mut conn).await.unwrap();
    r.open(&key("alice", "c1", "not-a-hash"), &info("m2"), 2).await.unwrap();
    let string = hashes(&mut conn).await.into_iter().find(|k| *k != damaged).unwrap();
    let _: () = redis::cmd("DEL").arg(&string).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("SET").arg(&string).arg("not a hash").query_async(&mut conn).await.unwrap();
    let good = key("alice", "c2", "good");
    r.open(&good, &info("m3"), 3).await.unwrap();
    r.append(&good, 1, "text", 4).await.unwrap();

    let open = r.list("alice").await.expect("the streams that decode");
    let open: Vec<_> = open.into_iter().map(|s| (s.key, s.seq, s.content)).collect();
    assert_eq!(open, vec![(good.clone(), 1, "text".to_owned())]);

    let mut all: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    all.sort();
    let _: () = redis::cmd("DEL").arg(&all).query_async(&mut conn).await.unwrap();
}
