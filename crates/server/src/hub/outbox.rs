//! The bounded outbound queue of one connection, drained by its writer task.
//!
//! Producers (the connection's own replies, broadcasts from any handler) never wait: [`Outbox::push`]
//! either queues or, past the bound, marks the connection for closing with 1013 `Slow consumer`. The
//! parts of the connection's own replies are the exception: [`Outbox::push_reply`] waits for room, and
//! the parts queued do not count towards the bound a broadcast is checked against (a big initial sync
//! read slowly is not a slow consumer of the broadcasts behind it), so the queue holds at most about
//! twice the bound.
//!
//! Stream chunks (SERVER_API.md section 4, "Slow devices") are the exception: a `stream_chunk` frame never
//! counts towards the bound, and when the connection is behind (a chunk of the same stream is still
//! queued, with only chunks after it) the new chunk is merged into the queued one: one `stream_chunk`
//! whose `seq` is the last merged and whose `delta` is the concatenation, in order. So a connection that
//! reads slowly gets fewer, larger chunks and is never closed because of them; what an open stream can
//! add to a queue is bounded by the stream's text cap. The chunks of streams that ended are held to the
//! byte bound: a `stream_completed` or `stream_cancelled` queued while the chunks queued exceed it drops
//! its stream's chunks (the device gets the end and fetches a completed stream's message), so a device
//! that stays connected while falling ever further behind holds at most the byte bound of ended streams'
//! text plus the open streams' (not one text cap per stream that ended meanwhile). A chunk is never
//! merged across another frame (such as `stream_completed`, or a `stream_started` that reuses the stream
//! id), so order is kept. Chunks are recognised by the fixed start of the frame
//! ([`chatsync_protocol::chunk_frame_key`]), so a chunk that came over the cluster bus merges like a local
//! one.

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;

/// A WebSocket close code and reason (PROTOCOL.md sections 1, 2 and 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Reason text, as the protocol spells it.
    pub reason: &'static str,
}

impl CloseReason {
    /// 1001 `Server shutting down`.
    pub const SHUTDOWN: CloseReason = CloseReason { code: 1001, reason: "Server shutting down" };
    /// 1001 `Heartbeat timeout`.
    pub const HEARTBEAT: CloseReason = CloseReason { code: 1001, reason: "Heartbeat timeout" };
    /// 1003 `Binary frames are not supported`.
    pub const BINARY: CloseReason = CloseReason { code: 1003, reason: "Binary frames are not supported" };
    /// 1002 `Protocol error` (broken WebSocket framing).
    pub const PROTOCOL_ERROR: CloseReason = CloseReason { code: 1002, reason: "Protocol error" };
    /// 1007 `Invalid UTF-8` (a text message that is not UTF-8).
    pub const INVALID_UTF8: CloseReason = CloseReason { code: 1007, reason: "Invalid UTF-8" };
    /// 1008 `Authentication required`.
    pub const AUTH_REQUIRED: CloseReason = CloseReason { code: 1008, reason: "Authentication required" };
    /// 1008 `Invalid session`.
    pub const INVALID_SESSION: CloseReason = CloseReason { code: 1008, reason: "Invalid session" };
    /// 1008 `Invalid device id` (chatsync addition, see docs/PROTOCOL.md).
    pub const INVALID_DEVICE: CloseReason = CloseReason { code: 1008, reason: "Invalid device id" };
    /// 1008 `Device mismatch, 2FA required`.
    pub const DEVICE_MISMATCH_TFA: CloseReason = CloseReason { code: 1008, reason: "Device mismatch, 2FA required" };
    /// 1008 `Device mismatch`.
    pub const DEVICE_MISMATCH: CloseReason = CloseReason { code: 1008, reason: "Device mismatch" };
    /// 1008 `Session revoked`.
    pub const SESSION_REVOKED: CloseReason = CloseReason { code: 1008, reason: "Session revoked" };
    /// 1008 `Token expired`: the JWT a connection authenticated with expired while connected
    /// (SERVER_API.md section 6); the client reconnects with a fresh token.
    pub const TOKEN_EXPIRED: CloseReason = CloseReason { code: 1008, reason: "Token expired" };
    /// 1008 `Rate limit exceeded`.
    pub const RATE_LIMIT: CloseReason = CloseReason { code: 1008, reason: "Rate limit exceeded" };
    /// 1009 `Message too big`.
    pub const TOO_BIG: CloseReason = CloseReason { code: 1009, reason: "Message too big" };
    /// 1011 `Authentication error`.
    pub const AUTH_ERROR: CloseReason = CloseReason { code: 1011, reason: "Authentication error" };
    /// 1011 `Internal error` (a broken socket or a bug; never expected).
    pub const INTERNAL: CloseReason = CloseReason { code: 1011, reason: "Internal error" };
    /// 1013 `Server overloaded`.
    pub const OVERLOADED: CloseReason = CloseReason { code: 1013, reason: "Server overloaded" };
    /// 1013 `Slow consumer`.
    pub const SLOW_CONSUMER: CloseReason = CloseReason { code: 1013, reason: "Slow consumer" };
    /// 1013 `Too many connections` (the user's per-node connection cap).
    pub const TOO_MANY_CONNECTIONS: CloseReason = CloseReason { code: 1013, reason: "Too many connections" };
    /// The client closed first. The WebSocket layer has already queued the answer, which echoes the
    /// client's own code (RFC 6455 §5.5.1); the writer only flushes it, so this code and reason are
    /// never sent.
    pub const PEER_CLOSED: CloseReason = CloseReason { code: 1000, reason: "" };
}

/// What the writer task should do next.
#[derive(Debug)]
pub enum Next {
    /// Send this text frame.
    Frame(Utf8Bytes),
    /// Send a close frame and stop.
    Close(CloseReason),
}

/// A merged chunk stops growing at about this many bytes of JSON (its first frame, and the delta of each
/// chunk merged into it as JSON writes it; the `seq` may grow by a few digits), so that it stays far below
/// any `max_reply_bytes` (at least 64 KiB); the next chunk starts a new one.
const MAX_MERGED_CHUNK_BYTES: usize = 32 * 1024;

/// One queued item: a frame, a part of the connection's own reply, or a stream chunk that later chunks of
/// its stream may merge into.
enum Item {
    Frame(Utf8Bytes),
    Reply(Utf8Bytes),
    Chunk(Box<Chunk>),
}

enum ChunkBody {
    Frame(Utf8Bytes),
    Merged(chatsync_protocol::StreamChunk),
}

struct Chunk {
    /// Names the stream (see [`chatsync_protocol::chunk_frame_key`]).
    key: Box<str>,
    /// The frame as delivered, or the merged chunk once a second one arrived (encoded when it leaves).
    body: ChunkBody,
    /// Bytes accounted for it: about the length of the frame it is sent as.
    bytes: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    /// Bytes of the queued frames, reply parts included (chunks not included).
    bytes: usize,
    /// Queued frames, reply parts included (chunks not included).
    frames: usize,
    /// Of those, the bytes of reply parts: they wait for room instead of overflowing, so a broadcast is
    /// checked against the other frames only (a big reply taking the room is not a slow consumer).
    reply_bytes: usize,
    /// Of those, the reply parts.
    reply_frames: usize,
    /// Bytes of the queued chunks, as the frames they are sent as: not checked against `max_bytes` on a
    /// chunk; those of ended streams are held to it ([`Outbox::end_of_stream`]), the open streams' are
    /// bounded by their text caps.
    chunk_bytes: usize,
    close: Option<CloseReason>,
    /// A reply is waiting for room ([`Outbox::push_reply`]).
    reply_waiting: bool,
    /// Where chunks stop merging, around an initial sync ([`Outbox::hold_chunk_merges`]); `None` (the
    /// rule everywhere else) costs an idle connection one word.
    splits: Option<Box<Splits>>,
}

/// Chunk merging around the snapshot of an initial sync: none while the open streams are being listed,
/// then none across the `seq` each stream had in the snapshot (`active_streams[].seq`).
#[derive(Default)]
struct Splits {
    holding: bool,
    /// (stream key, its `seq` in the snapshot): a chunk up to it never merges with one after it.
    at: Vec<(String, u64)>,
}

impl State {
    /// Empties the queue and its counts (an overflow, or the client's close).
    fn drop_queue(&mut self) {
        *self = State { close: self.close, reply_waiting: self.reply_waiting, ..State::default() };
    }
}

/// A bounded, non-blocking outbound queue. An idle outbox allocates nothing.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    /// Wakes a waiting [`Outbox::push_reply`] when frames leave or the outbox closes.
    space: Notify,
    max_bytes: usize,
    max_messages: usize,
}

impl Outbox {
    /// An empty outbox with the given bounds.
    pub fn new(max_bytes: usize, max_messages: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            space: Notify::new(),
            max_bytes,
            max_messages,
        }
    }

    /// Queues a frame. Returns `false` if the connection is closing, or if the frame would exceed the
    /// bound, in which case the queue is dropped and the connection is closed with 1013 `Slow consumer`.
    /// One frame larger than the byte bound is accepted when no other frame is queued. A `stream_chunk`
    /// frame is always accepted (merged into a queued chunk of its stream when there is one, see the
    /// module doc).
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        if let Some(key) = chatsync_protocol::chunk_frame_key(frame.as_str()) {
            return self.push_chunk(key, frame.clone());
        }
        let mut s = self.state.lock();
        if s.close.is_some() {
            return false;
        }
        // A single frame larger than the byte bound (a big initial sync) is accepted when no other frame
        // is queued: only a queue that keeps growing marks a slow consumer. Reply parts queued (which
        // wait for room themselves) do not count: the broadcasts have a bound of their own.
        let (frames, bytes) = (s.frames - s.reply_frames, s.bytes - s.reply_bytes);
        let over_bytes = frames > 0 && bytes + frame.len() > self.max_bytes;
        if frames >= self.max_messages || over_bytes {
            s.drop_queue();
            s.close = Some(CloseReason::SLOW_CONSUMER);
            drop(s);
            metrics::counter!(crate::metrics::OUTBOX_OVERFLOWS).increment(1);
            self.notify.notify_one();
            self.space.notify_waiters();
            return false;
        }
        s.bytes += frame.len();
        s.frames += 1;
        self.end_of_stream(&mut s, &frame);
        s.queue.push_back(Item::Frame(frame));
        drop(s);
        self.notify.notify_one();
        true
    }

    /// When `frame` ends a stream (`stream_completed`, `stream_cancelled`) while the queued chunks exceed
    /// the byte bound, drops the queued chunks of that stream: they would reach the device only to be
    /// followed by the stream's end (a completed stream's message is fetched like any other). So the
    /// chunks of ended streams never hold more than the byte bound, and the chunks a connection can hold
    /// are bounded by the open streams' text caps (see the module doc).
    fn end_of_stream(&self, s: &mut State, frame: &Utf8Bytes) {
        if s.chunk_bytes <= self.max_bytes {
            return;
        }
        let Some(key) = chatsync_protocol::stream_end_frame_key(frame.as_str()) else { return };
        let (mut freed, mut dropped) = (0, 0);
        s.queue.retain(|item| match item {
            Item::Chunk(chunk) if &*chunk.key == key => {
                freed += chunk.bytes;
                dropped += 1;
                false
            }
            _ => true,
        });
        s.chunk_bytes -= freed;
        if dropped > 0 {
            metrics::counter!(crate::metrics::STREAM_CHUNKS_DROPPED).increment(dropped);
        }
    }

    /// Stops merging chunks until [`split_chunks_at`](Self::split_chunks_at): an initial sync calls it
    /// before it lists the open streams, whose `seq`s it does not know yet.
    pub fn hold_chunk_merges(&self) {
        self.state.lock().splits.get_or_insert_default().holding = true;
    }

    /// Resumes merging after [`hold_chunk_merges`](Self::hold_chunk_merges), except across the given
    /// `seq` of each stream (`(chatsync_protocol::chunk_key, seq)`, as the sync's `active_streams` has
    /// them, replacing any earlier sync's). A client replays the chunks it received around the reply over
    /// `content_so_far` by `seq`, and a merged chunk carries only its last `seq`: one holding text from
    /// both sides of the snapshot would repeat what `content_so_far` holds.
    pub fn split_chunks_at(&self, at: Vec<(String, u64)>) {
        self.state.lock().splits = (!at.is_empty()).then(|| Box::new(Splits { holding: false, at }));
    }

    /// Queues a `stream_chunk` frame of the stream `key`, merging it into the chunk of that stream still
    /// queued behind nothing but chunks, if any (see [`Splits`] for when not). Never closes the connection.
    fn push_chunk(&self, key: &str, frame: Utf8Bytes) -> bool {
        let mut s = self.state.lock();
        if s.close.is_some() {
            return false;
        }
        let len = frame.len();
        let (holding, split) = match &s.splits {
            Some(splits) => (splits.holding, splits.at.iter().find(|(k, _)| k == key).map(|&(_, seq)| seq)),
            None => (false, None),
        };
        let side = |seq: Option<u64>| split.zip(seq).map(|(at, seq)| seq <= at);
        let incoming = split.and_then(|_| side(chatsync_protocol::chunk_frame_seq(frame.as_str())));
        // Nothing merges while held.
        for item in s.queue.iter_mut().rev().take_while(|_| !holding) {
            let Item::Chunk(queued) = item else { break };
            if &*queued.key != key {
                continue;
            }
            // What the chunk adds to the merged frame: its delta (the rest of its frame is not repeated).
            let added = chatsync_protocol::chunk_frame_delta_len(frame.as_str());
            if queued.bytes + added > MAX_MERGED_CHUNK_BYTES {
                break;
            }
            if split.is_some() {
                let queued_seq = match &queued.body {
                    ChunkBody::Frame(f) => chatsync_protocol::chunk_frame_seq(f.as_str()),
                    ChunkBody::Merged(merged) => Some(merged.seq),
                };
                if incoming.is_none() || side(queued_seq) != incoming {
                    break;
                }
            }
            if let ChunkBody::Frame(f) = &queued.body {
                let Some(first) = chatsync_protocol::parse_chunk_frame(f.as_str()) else { break };
                queued.body = ChunkBody::Merged(first);
            }
            let ChunkBody::Merged(merged) = &mut queued.body else { break };
            if !chatsync_protocol::merge_chunk_frames(merged, frame.as_str()) {
                break;
            }
            queued.bytes += added;
            s.chunk_bytes += added;
            metrics::counter!(crate::metrics::STREAM_CHUNKS_MERGED).increment(1);
            return true;
        }
        s.chunk_bytes += len;
        s.queue.push_back(Item::Chunk(Box::new(Chunk { key: key.into(), body: ChunkBody::Frame(frame), bytes: len })));
        drop(s);
        self.notify.notify_one();
        true
    }

    /// Queues one frame of the connection's own reply, waiting (instead of closing the connection) while
    /// the queue has no room: the parts of a big reply reach the client at the pace it reads them, and
    /// this connection's next request waits meanwhile. Returns `false` if the connection is closing.
    pub async fn push_reply(&self, frame: Utf8Bytes) -> bool {
        loop {
            let space = self.space.notified();
            {
                let mut s = self.state.lock();
                if s.close.is_some() {
                    return false;
                }
                let fits = s.frames == 0 || (s.bytes + frame.len() <= self.max_bytes && s.frames < self.max_messages);
                if fits {
                    s.bytes += frame.len();
                    s.frames += 1;
                    s.reply_bytes += frame.len();
                    s.reply_frames += 1;
                    self.end_of_stream(&mut s, &frame);
                    s.queue.push_back(Item::Reply(frame));
                    drop(s);
                    self.notify.notify_one();
                    return true;
                }
                s.reply_waiting = true;
            }
            space.await;
        }
    }

    /// Asks the writer to close after the frames already queued. The first close reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut s = self.state.lock();
        if s.close.is_none() {
            s.close = Some(reason);
        }
        drop(s);
        self.notify.notify_one();
        self.space.notify_waiters();
    }

    /// Drops whatever is queued and asks the writer to close at once (nothing may be sent after the
    /// client's close frame). The first close reason wins.
    pub fn close_now(&self, reason: CloseReason) {
        let mut s = self.state.lock();
        s.drop_queue();
        if s.close.is_none() {
            s.close = Some(reason);
        }
        drop(s);
        self.notify.notify_one();
        self.space.notify_waiters();
    }

    /// Whether a close has been requested.
    pub fn is_closing(&self) -> bool {
        self.state.lock().close.is_some()
    }

    /// Waits for the next frame, or for the close once the queue is empty.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut s = self.state.lock();
                if let Some(item) = s.queue.pop_front() {
                    let frame = match item {
                        Item::Frame(frame) => {
                            s.bytes -= frame.len();
                            s.frames -= 1;
                            Ok(frame)
                        }
                        Item::Reply(frame) => {
                            s.bytes -= frame.len();
                            s.frames -= 1;
                            s.reply_bytes -= frame.len();
                            s.reply_frames -= 1;
                            Ok(frame)
                        }
                        Item::Chunk(chunk) => {
                            s.chunk_bytes -= chunk.bytes;
                            Err(chunk)
                        }
                    };
                    if std::mem::take(&mut s.reply_waiting) {
                        self.space.notify_waiters();
                    }
                    if s.queue.is_empty() && s.queue.capacity() > 16 {
                        s.queue = VecDeque::new();
                    }
                    drop(s);
                    return Next::Frame(match frame {
                        Ok(frame) => frame,
                        Err(chunk) => match chunk.body {
                            ChunkBody::Frame(frame) => frame,
                            ChunkBody::Merged(merged) => {
                                chatsync_protocol::encode(&chatsync_protocol::ServerMessage::StreamChunk(merged), None)
                                    .into()
                            }
                        },
                    });
                }
                if let Some(reason) = s.close {
                    return Next::Close(reason);
                }
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_owned())
    }

    #[tokio::test]
    async fn drains_in_order_then_closes() {
        let o = Outbox::new(1024, 8);
        assert!(o.push(frame("a")));
        assert!(o.push(frame("b")));
        o.close(CloseReason::SHUTDOWN);
        assert!(!o.push(frame("c")), "nothing is queued after a close");
        assert!(matches!(o.next().await, Next::Frame(f) if f.as_str() == "a"));
        assert!(matches!(o.next().await, Next::Frame(f) if f.as_str() == "b"));
        assert!(matches!(o.next().await, Next::Close(CloseReason::SHUTDOWN)));
    }

    #[tokio::test]
    async fn overflow_by_count_or_bytes_closes_as_slow_consumer() {
        let o = Outbox::new(1024, 2);
        assert!(o.push(frame("a")));
        assert!(o.push(frame("b")));
        assert!(!o.push(frame("c")));
        assert!(matches!(o.next().await, Next::Close(CloseReason::SLOW_CONSUMER)), "queue dropped");

        let o = Outbox::new(4, 100);
        assert!(o.push(frame("abcd")));
        assert!(!o.push(frame("e")));
        assert!(matches!(o.next().await, Next::Close(CloseReason::SLOW_CONSUMER)));
    }

    #[tokio::test]
    async fn one_frame_larger_than_the_byte_bound_passes_an_empty_queue() {
        let o = Outbox::new(4, 100);
        assert!(o.push(frame("a large reply")));
        assert!(!o.push(frame("x")), "but nothing may queue behind it");
        let o = Outbox::new(4, 100);
        assert!(o.push(frame("a large reply")));
        assert!(matches!(o.next().await, Next::Frame(_)));
        assert!(o.push(frame("abc")), "drained: the queue accepts again");
    }

    #[tokio::test]
    async fn a_reply_waits_for_room_instead_of_closing_the_connection() {
        let o = std::sync::Arc::new(Outbox::new(8, 100));
        assert!(o.push_reply(frame("12345678")).await, "an empty queue takes any frame");
        let o2 = o.clone();
        let second = tokio::spawn(async move { o2.push_reply(frame("abcdefgh")).await });
        tokio::task::yield_now().await;
        assert!(!o.is_closing(), "no slow-consumer close for the connection's own reply");
        assert!(matches!(o.next().await, Next::Frame(f) if f.as_str() == "12345678"));
        assert!(second.await.unwrap(), "queued once the first part left");
        assert!(matches!(o.next().await, Next::Frame(f) if f.as_str() == "abcdefgh"));

        let o = std::sync::Arc::new(Outbox::new(8, 100));
        assert!(o.push_reply(frame("12345678")).await);
        let o2 = o.clone();
        let waiting = tokio::spawn(async move { o2.push_reply(frame("x")).await });
        tokio::task::yield_now().await;
        o.close(CloseReason::SHUTDOWN);
        assert!(!waiting.await.unwrap(), "a close wakes a waiting reply");
    }

    #[tokio::test]
    async fn reply_parts_filling_the_queue_leave_the_broadcasts_their_own_room() {
        let o = Outbox::new(8, 3);
        assert!(o.push_reply(frame("12345678")).await, "a reply part takes the whole byte bound");
        assert!(o.push(frame("abcd")), "a broadcast behind it is not a slow consumer");
        assert!(o.push(frame("efgh")));
        assert!(!o.is_closing());
        assert!(!o.push(frame("i")), "the broadcasts' own bound still holds");
        assert!(o.is_closing());

        let o = Outbox::new(1024, 2);
        assert!(o.push_reply(frame("r")).await);
        assert!(o.push(frame("a")) && o.push(frame("b")), "reply parts do not count towards the broadcasts' frames");
        assert!(!o.push(frame("c")));
        assert!(matches!(o.next().await, Next::Close(CloseReason::SLOW_CONSUMER)), "the overflow dropped the queue");
    }

    #[tokio::test]
    async fn close_now_drops_the_queue() {
        let o = Outbox::new(1024, 8);
        assert!(o.push(frame("a")));
        o.close_now(CloseReason::PEER_CLOSED);
        assert!(matches!(o.next().await, Next::Close(CloseReason::PEER_CLOSED)));
    }

    fn chunk(stream: &str, seq: u64, delta: &str) -> Utf8Bytes {
        let c = chatsync_protocol::StreamChunk {
            chat_id: chatsync_protocol::ChatId::new("c1").unwrap(),
            stream_id: chatsync_protocol::StreamId::new(stream).unwrap(),
            seq,
            delta: delta.into(),
        };
        chatsync_protocol::encode(&chatsync_protocol::ServerMessage::StreamChunk(c), None).into()
    }

    async fn next_text(o: &Outbox) -> String {
        match o.next().await {
            Next::Frame(f) => f.as_str().to_owned(),
            Next::Close(r) => panic!("closed: {r:?}"),
        }
    }

    #[tokio::test]
    async fn chunks_of_one_stream_merge_while_queued_and_never_overflow() {
        let o = Outbox::new(64, 2);
        for seq in 1..=200 {
            assert!(o.push(chunk("s1", seq, "ab")), "a chunk never closes the connection");
        }
        assert!(201 * chunk("s1", 1, "ab").len() < MAX_MERGED_CHUNK_BYTES);
        assert!(o.push(chunk("s2", 1, "x")));
        assert!(o.push(chunk("s1", 201, "Z")), "merged across a chunk of another stream");
        assert!(!o.is_closing());
        let merged = chatsync_protocol::parse_chunk_frame(&next_text(&o).await).unwrap();
        assert_eq!((merged.seq, merged.delta.len()), (201, 200 * 2 + 1), "one chunk: the last seq, every delta");
        assert!(merged.delta.ends_with("abZ"));
        assert_eq!(next_text(&o).await, chunk("s2", 1, "x").as_str());
    }

    #[tokio::test]
    async fn around_an_initial_sync_chunks_merge_on_neither_side_of_the_snapshot() {
        let o = Outbox::new(1024, 8);
        let key = |stream| chatsync_protocol::chunk_key("c1", stream);
        assert!(o.push(chunk("s1", 1, "a")));
        o.hold_chunk_merges();
        assert!(o.push(chunk("s1", 2, "b")), "while the streams are listed, nothing merges");
        o.split_chunks_at(vec![(key("s1"), 3)]);
        assert!(o.push(chunk("s1", 3, "c")), "up to the snapshot's seq: merged");
        assert!(o.push(chunk("s1", 4, "d")), "after it: not merged with what is before");
        assert!(o.push(chunk("s1", 5, "e")), "after it: merged");
        assert!(o.push(chunk("s2", 1, "x")) && o.push(chunk("s2", 2, "y")), "a stream not in the snapshot merges");
        let texts: Vec<String> =
            [next_text(&o).await, next_text(&o).await, next_text(&o).await, next_text(&o).await].into_iter().collect();
        let parts: Vec<(u64, String)> =
            texts.iter().map(|t| chatsync_protocol::parse_chunk_frame(t).map(|c| (c.seq, c.delta)).unwrap()).collect();
        assert_eq!(parts, [(1, "a".into()), (3, "bc".into()), (5, "de".into()), (2, "xy".into())]);
        o.split_chunks_at(Vec::new());
        assert!(o.push(chunk("s1", 6, "f")) && o.push(chunk("s1", 7, "g")));
        let merged = chatsync_protocol::parse_chunk_frame(&next_text(&o).await).unwrap();
        assert_eq!((merged.seq, merged.delta.as_str()), (7, "fg"), "without a snapshot, merging as before");
    }

    #[tokio::test]
    async fn chunks_never_merge_across_another_frame_and_do_not_count_towards_the_bound() {
        let o = Outbox::new(1024, 2);
        assert!(o.push(chunk("s1", 1, "a")));
        assert!(o.push(frame("completed")));
        assert!(o.push(chunk("s1", 1, "b")), "a new stream reusing the id");
        assert!(o.push(chunk("s1", 2, "c")));
        assert!(o.push(frame("other")), "two frames fit the bound of 2: chunks are not counted");
        assert!(!o.push(frame("third")), "the third frame overflows");
        let o = Outbox::new(1024, 8);
        assert!(o.push(chunk("s1", 1, "a")));
        assert!(o.push(frame("completed")));
        assert!(o.push(chunk("s1", 1, "b")));
        assert!(o.push(chunk("s1", 2, "c")));
        assert_eq!(next_text(&o).await, chunk("s1", 1, "a").as_str());
        assert_eq!(next_text(&o).await, "completed");
        assert_eq!(next_text(&o).await, chunk("s1", 2, "bc").as_str(), "merged after the frame only");
    }

    #[tokio::test]
    async fn a_merged_chunk_stops_growing_below_the_frame_limit() {
        let o = Outbox::new(1024, 8);
        let big = "y".repeat(MAX_MERGED_CHUNK_BYTES / 3);
        for seq in 1..=7 {
            assert!(o.push(chunk("s1", seq, &big)));
        }
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let text = next_text(&o).await;
            assert!(text.len() <= MAX_MERGED_CHUNK_BYTES, "{}", text.len());
            seqs.push(chatsync_protocol::parse_chunk_frame(&text).unwrap().seq);
        }
        assert_eq!(seqs, [2, 4, 6]);
        assert_eq!(chatsync_protocol::parse_chunk_frame(&next_text(&o).await).unwrap().seq, 7);
    }

    fn stream_end(stream: &str, completed: bool, request_id: Option<&str>) -> Utf8Bytes {
        use chatsync_protocol::{ChatId, MessageId, ServerMessage, StreamCancelReason, StreamId};
        let (chat_id, stream_id) = (ChatId::new("c1").unwrap(), StreamId::new(stream).unwrap());
        let message = if completed {
            ServerMessage::StreamCompleted(chatsync_protocol::StreamCompleted {
                chat_id,
                stream_id,
                message_id: MessageId::new(format!("m-{stream}")).unwrap(),
                seq: 7,
                messages_v: 7,
            })
        } else {
            ServerMessage::StreamCancelled(chatsync_protocol::StreamCancelled {
                chat_id,
                stream_id,
                reason: StreamCancelReason::Aborted,
            })
        };
        chatsync_protocol::encode(&message, request_id).into()
    }

    /// A device that stays connected (it takes a frame now and then) but falls ever further behind while
    /// stream after stream runs and ends: the chunks never count towards the bound, so without a bound of
    /// their own the queue held every ended stream's text (up to `outbox_max_messages` / 2 streams of 256
    /// KiB each). The chunks of a stream whose end is queued are dropped once the queued chunks exceed the
    /// byte bound: its `stream_completed` (or `stream_cancelled`) still comes, in order.
    #[tokio::test]
    async fn the_chunks_of_ended_streams_are_held_to_the_byte_bound() {
        let max = 64 * 1024;
        let o = Outbox::new(max, 1024);
        let delta = "y".repeat(2 * 1024);
        for n in 0..100 {
            let stream = format!("s{n}");
            assert!(o.push(frame("started")));
            for seq in 1..=8 {
                assert!(o.push(chunk(&stream, seq, &delta)));
            }
            // The device's own cancel comes as a reply part (with its request id), the others as broadcasts.
            let end = stream_end(&stream, n % 3 != 0, (n % 5 == 0).then_some("r1"));
            if n % 5 == 0 {
                assert!(o.push_reply(end).await);
            } else {
                assert!(o.push(end));
            }
        }
        assert!(!o.is_closing(), "chunks never close a connection");
        let queued = o.state.lock().chunk_bytes;
        assert!(queued <= max, "{queued} bytes of ended streams' chunks queued, over the bound of {max}");
        // Every stream's end still comes, in order; the chunks that remain are whole runs of their stream.
        let mut ends = 0;
        let mut deltas = std::collections::BTreeMap::<String, usize>::new();
        while ends < 100 {
            let text = next_text(&o).await;
            if let Some(c) = chatsync_protocol::parse_chunk_frame(&text) {
                *deltas.entry(c.stream_id.as_str().to_owned()).or_default() += c.delta.len();
            } else if text != "started" {
                let end = chatsync_protocol::decode_server(&text).unwrap().message;
                let stream = match end {
                    chatsync_protocol::ServerMessage::StreamCompleted(e) => e.stream_id,
                    chatsync_protocol::ServerMessage::StreamCancelled(e) => e.stream_id,
                    other => panic!("{other:?}"),
                };
                assert_eq!(stream.as_str(), format!("s{ends}"));
                assert!(deltas.get(stream.as_str()).is_none_or(|&n| n == 8 * delta.len()), "all of a stream or none");
                ends += 1;
            }
        }
        // Each stream's chunks take about 17 KB: the first three fit in the bound and are kept.
        assert_eq!(
            deltas.into_keys().collect::<Vec<_>>(),
            ["s0", "s1", "s2"],
            "the streams that fit keep their chunks"
        );
    }

    /// A merged chunk is measured by the frame it becomes, not by the frames merged into it: each chunk's
    /// envelope (about 80 bytes) counted again made token-sized chunks stop merging at about 400 of them
    /// (a device far behind got a frame per 400 tokens, and empty chunks, which cost a stream no room,
    /// added a queued chunk per 400), and made the queued chunks look 20 times their size to the bound
    /// on ended streams' chunks.
    #[tokio::test]
    async fn a_merged_chunk_is_measured_by_the_frame_it_becomes() {
        let o = Outbox::new(1024, 8);
        for seq in 1..=4000 {
            assert!(o.push(chunk("s1", seq, if seq % 2 == 0 { "" } else { "ab" })));
        }
        let text = next_text(&o).await;
        assert!(text.len() <= MAX_MERGED_CHUNK_BYTES);
        let merged = chatsync_protocol::parse_chunk_frame(&text).unwrap();
        assert_eq!((merged.seq, merged.delta.len()), (4000, 4000), "one frame: about 4 KB of text");
        assert_eq!(o.state.lock().chunk_bytes, 0);
        // Escaped text is measured as escaped: 10,000 control characters are 60,000 bytes of JSON.
        for seq in 1..=1000 {
            assert!(o.push(chunk("s2", seq, &"\u{1}".repeat(10))));
        }
        let mut frames = 0;
        while o.state.lock().queue.front().is_some() {
            let text = next_text(&o).await;
            assert!(text.len() <= MAX_MERGED_CHUNK_BYTES, "{}", text.len());
            frames += 1;
        }
        assert_eq!(frames, 2);
    }

    #[tokio::test]
    async fn first_close_reason_wins() {
        let o = Outbox::new(1024, 8);
        o.close(CloseReason::SESSION_REVOKED);
        o.close(CloseReason::SHUTDOWN);
        assert!(matches!(o.next().await, Next::Close(CloseReason::SESSION_REVOKED)));
    }
}
