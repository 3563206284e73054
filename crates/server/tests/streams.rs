//! Streams over the WebSocket (SERVER_API.md section 4, PROTOCOL.md "streams"): what a user's devices see
//! of a stream started, fed, cancelled or timed out through the domain operations (`streams::ops`, what
//! the HTTP API calls): `stream_started` / `stream_chunk` / `stream_cancelled` on ALL devices, `cancel_stream`
//! (success, `not_found`, another user's stream), `active_streams` for a device that joins mid-stream, the
//! idle timeout, and a slow device that gets every chunk's text exactly once, in order, possibly merged,
//! without being closed. Nothing of a chunk reaches the data directory.

#[macro_use]
mod sync_util;
mod common;

use chatsync::store::chats::{WriteOp, WriteResult};
use chatsync::streams::ops::{self, OpError};
use chatsync::streams::{Appended, Opened, StreamError, StreamInfo, StreamKey};
use chatsync_client::Client;
use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use std::time::Duration;
use sync_util::*;

fn skey(user: &str, chat: &str, stream: &str) -> StreamKey {
    StreamKey { user_id: user.into(), chat_id: ChatId::new(chat).unwrap(), stream_id: StreamId::new(stream).unwrap() }
}

fn info(message_id: &str) -> StreamInfo {
    StreamInfo {
        message_id: MessageId::new(message_id).unwrap(),
        sender_name: "assistant".into(),
        meta: json!({"model": "m-1"}).as_object().unwrap().clone(),
    }
}

/// The next broadcast on `c` (no `request_id`).
async fn next_event(c: &mut Client) -> Incoming {
    let m = tokio::time::timeout(Duration::from_secs(10), c.recv()).await.expect("an event").unwrap();
    assert_eq!(m.request_id, None, "{m:?}");
    m
}

fn cancel(chat: &str, stream: &str) -> ClientMessage {
    msg("cancel_stream", json!({"chat_id": chat, "stream_id": stream}))
}

#[tokio::test]
async fn all_devices_see_a_stream_and_a_device_cancels_it() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let mut tab = another_device(&server, "alice", "tab").await;
    let k = skey("alice", "c1", "s1");

    assert_eq!(ops::start(&server.ctx, &k, &info("m1")).await.unwrap(), Opened::New);
    assert_eq!(ops::start(&server.ctx, &k, &info("m1")).await.unwrap(), Opened::AlreadyOpen, "a retried start");
    assert!(ops::chunk(&server.ctx, &k, 1, "Hel").await.is_ok());
    for c in [&mut phone, &mut laptop, &mut tab] {
        let started = expect_msg!(next_event(c).await, StreamStarted);
        assert_eq!((started.message_id.as_str(), started.sender_name.as_str()), ("m1", "assistant"));
        assert_eq!(started.meta, info("m1").meta);
        let chunk = expect_msg!(next_event(c).await, StreamChunk);
        assert_eq!(
            (chunk.chat_id.as_str(), chunk.stream_id.as_str(), chunk.seq, chunk.delta.as_str()),
            ("c1", "s1", 1, "Hel")
        );
    }

    // The laptop cancels: ALL get stream_cancelled (SELF's copy carries the request id).
    let reply = laptop.request(&cancel("c1", "s1")).await.unwrap();
    assert!(reply.request_id.is_some());
    let cancelled = expect_msg!(reply, StreamCancelled);
    assert_eq!(cancelled.reason, StreamCancelReason::CancelledByUser);
    for c in [&mut phone, &mut tab] {
        let event = expect_msg!(next_event(c).await, StreamCancelled);
        assert_eq!((event.stream_id.as_str(), event.reason), ("s1", StreamCancelReason::CancelledByUser));
    }
    // Closed: later chunks (and a completion) are refused; a second cancel is not_found.
    assert!(matches!(ops::chunk(&server.ctx, &k, 2, "lo").await, Err(OpError::Stream(StreamError::NotOpen))));
    assert!(ops::take_for_completion(&server.ctx, &k).await.unwrap().is_none());
    let again = laptop.request(&cancel("c1", "s1")).await.unwrap();
    assert_eq!(error_of(&again).chat_id.as_deref(), Some("c1"));
    assert_not_found(&again);
    for c in [&mut phone, &mut laptop, &mut tab] {
        assert_quiet(c).await;
    }
}

#[tokio::test]
async fn another_users_stream_cannot_be_cancelled_or_started_in_their_chat() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "phone").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut alice, "c1", "mine").await;
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    expect_msg!(next_event(&mut alice).await, StreamStarted);

    // bob cannot see or cancel it: not_found, exactly as for a stream that does not exist.
    assert_not_found(&bob.request(&cancel("c1", "s1")).await.unwrap());
    assert_not_found(&bob.request(&cancel("c1", "nope")).await.unwrap());
    assert!(sync_all(&mut bob).await.active_streams.is_empty());
    assert_quiet(&mut bob).await;
    // Still open for alice.
    assert_eq!(ops::chunk(&server.ctx, &k, 1, "x").await.unwrap(), Appended::Accepted);
    expect_msg!(next_event(&mut alice).await, StreamChunk);
    // A stream for bob in alice's chat is refused like a write to it.
    let bobs = skey("bob", "c1", "s2");
    assert!(matches!(ops::start(&server.ctx, &bobs, &info("m2")).await, Err(OpError::ChatNotFound)));
    // Invalid ids are invalid_payload naming the field.
    let bad = request_raw(&mut alice, "cancel_stream", json!({"chat_id": "c1", "stream_id": "a b"})).await;
    assert_error(&bad, ErrorCode::InvalidPayload, Some("stream_id"));
    assert_quiet(&mut alice).await;
}

/// alice with a phone and her chat c1, and the key of stream s1 in it.
async fn alice_with_chat(server: &TestServer) -> (Client, StreamKey) {
    let mut phone = new_user(server, "alice", "phone").await;
    set_title(&mut phone, "c1", "t").await;
    (phone, skey("alice", "c1", "s1"))
}

/// Deletes alice's c1 in the store only, as a deletion committing at the worst moment would have: no
/// handler runs, so nothing ends the chat's streams and the keyring still vouches for the chat.
async fn delete_behind_the_handlers(server: &TestServer) {
    let del = WriteOp::DeleteChat { owner: "alice".into(), chat_id: "c1".into(), now: 1, event: None };
    assert!(matches!(server.ctx.chats.write(del).await.unwrap(), WriteResult::Deleted));
}

#[tokio::test]
async fn a_stream_opened_while_its_chat_is_being_deleted_is_closed_again() {
    // The worst interleaving of `start` and `delete_chat`: the chat passes start's ownership check, then the
    // deletion commits and lists the chat's streams (none yet), then start opens the stream. Reproduced by
    // deleting through the store alone (no handler: the keyring still vouches for the chat, and nothing
    // lists the streams), so start's second look at the store is all that can catch it.
    let server = TestServer::start().await;
    let (mut phone, k) = alice_with_chat(&server).await;
    ops::start(&server.ctx, &k, &info("m0")).await.unwrap();
    ops::abort(&server.ctx, &k).await.unwrap(); // the keyring now holds c1's key: the first check passes
    delete_behind_the_handlers(&server).await;

    assert!(matches!(ops::start(&server.ctx, &k, &info("m1")).await, Err(OpError::ChatNotFound)));
    assert!(matches!(ops::chunk(&server.ctx, &k, 1, "x").await, Err(OpError::Stream(StreamError::NotOpen))));
    assert!(server.ctx.streams.list("alice").await.unwrap().is_empty());
    // Devices see the stream end after its start: nothing is left open on them.
    for message_id in ["m0", "m1"] {
        assert_eq!(expect_msg!(next_event(&mut phone).await, StreamStarted).message_id.as_str(), message_id);
        let ended = expect_msg!(next_event(&mut phone).await, StreamCancelled);
        assert_eq!((ended.stream_id.as_str(), ended.reason), ("s1", StreamCancelReason::Aborted));
    }
    assert_quiet(&mut phone).await;
}

#[tokio::test]
async fn a_failed_completion_does_not_reopen_a_stream_whose_chat_was_deleted_meanwhile() {
    // `complete` took the stream; the chat was deleted (the deletion found no open stream to end); then
    // storing the message failed and the stream is put back: it must end instead of living on.
    let server = TestServer::start().await;
    let (mut phone, k) = alice_with_chat(&server).await;
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    let taken = ops::take_for_completion(&server.ctx, &k).await.unwrap().expect("open");
    delete_behind_the_handlers(&server).await;
    ops::completion_failed(&server.ctx, taken).await;
    assert!(server.ctx.streams.list("alice").await.unwrap().is_empty(), "not reopened");
    expect_msg!(next_event(&mut phone).await, StreamStarted);
    assert_eq!(expect_msg!(next_event(&mut phone).await, StreamCancelled).reason, StreamCancelReason::Aborted);
    assert_quiet(&mut phone).await;
}

#[tokio::test]
async fn a_device_joining_mid_stream_gets_the_text_so_far_then_the_next_chunks() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    for (seq, delta) in [(1, "Once "), (2, "upon "), (3, "a time")] {
        ops::chunk(&server.ctx, &k, seq, delta).await.unwrap();
    }
    ops::start(&server.ctx, &skey("alice", "c2", "s2"), &info("m2")).await.unwrap();

    let mut laptop = another_device(&server, "alice", "laptop").await;
    let mut active = sync_all(&mut laptop).await.active_streams;
    active.sort_by(|a, b| a.chat_id.cmp(&b.chat_id));
    assert_eq!(active.len(), 2, "{active:?}");
    assert_eq!(
        (active[0].stream_id.as_str(), active[0].message_id.as_str(), active[0].seq, active[0].content_so_far.as_str()),
        ("s1", "m1", 3, "Once upon a time")
    );
    assert_eq!((active[0].sender_name.as_str(), &active[0].meta), ("assistant", &info("m1").meta));
    assert_eq!((active[1].seq, active[1].content_so_far.as_str()), (0, ""));

    ops::chunk(&server.ctx, &k, 4, ".").await.unwrap();
    let next = expect_msg!(next_event(&mut laptop).await, StreamChunk);
    assert_eq!((next.seq, next.delta.as_str()), (4, "."), "continues with the next chunk");
    // The phone saw everything live (chunks possibly merged, as it did not read meanwhile).
    expect_msg!(next_event(&mut phone).await, StreamStarted);
    let mut text = String::new();
    let mut others_started = 0;
    while !text.ends_with('.') {
        match next_event(&mut phone).await.message {
            ServerMessage::StreamChunk(c) => text.push_str(&c.delta),
            ServerMessage::StreamStarted(s) if s.stream_id.as_str() == "s2" => others_started += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((text.as_str(), others_started), ("Once upon a time.", 1));
}

/// A small outbox and room for streams far larger than the socket buffers: a device that does not read
/// falls behind and has its chunks merged.
async fn behind_server() -> TestServer {
    TestServer::start_with(|c| {
        c.outbox_max_messages = 4;
        c.outbox_max_bytes = 16 * 1024;
        c.max_stream_bytes = 64 << 20;
        c.max_reply_bytes = (64 << 20) + 65_536;
    })
    .await
}

#[tokio::test]
async fn a_device_behind_that_syncs_never_gets_a_chunk_merged_across_the_snapshot() {
    // A device that does not read while a stream runs has its chunks merged in its queue; when it asks
    // for an initial sync, a chunk that arrives after the snapshot (`active_streams[].seq`) but before the
    // reply is queued must not be merged with chunks the snapshot holds: the client replays what came
    // before the reply over `content_so_far` by `seq`, and a merged chunk carries only its last `seq`.
    let server = behind_server().await;
    let mut slow = new_user(&server, "alice", "slow").await;
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    // Far more than the socket buffers take from a device that does not read (~12 MB), then a short
    // chunk: the last queued (merged) chunk has room for the next one.
    let mut expected = String::new();
    let mut seq = 0;
    let mut send = |delta: String| {
        seq += 1;
        expected.push_str(&delta);
        let (ctx, k) = (server.ctx.clone(), k.clone());
        async move { assert_eq!(ops::chunk(&ctx, &k, seq, &delta).await.unwrap(), Appended::Accepted) }
    };
    for i in 0..1500 {
        send(format!("<{i}:{}>", "x".repeat(8 * 1024))).await;
    }
    send("<tail>".into()).await;

    let mut held = server.ctx.pauses.arm(chatsync::pause::SYNC_STREAMS_LISTED);
    slow.send(&sync_request(json!({}), None), Some("sync")).await.unwrap();
    held.reached().await;
    send("<after the snapshot>".into()).await;
    held.release();
    send("<after the reply>".into()).await;
    let last = seq;

    // Read as a client that follows PROTOCOL.md: chunks before the reply are kept by `seq` and replayed
    // over `content_so_far`; later ones are appended when their `seq` is greater than the last applied.
    expect_msg!(next_event(&mut slow).await, StreamStarted);
    let mut early = std::collections::BTreeMap::new();
    let active = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), slow.recv()).await.unwrap().unwrap();
        match m.message {
            ServerMessage::StreamChunk(c) => {
                early.entry(c.seq).or_insert(c.delta);
            }
            ServerMessage::InitialSyncResponse(r) if !r.more => break r.active_streams,
            ServerMessage::InitialSyncResponse(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(active.len(), 1);
    let (mut text, mut applied) = (active[0].content_so_far.clone(), active[0].seq);
    assert!(applied < last, "the snapshot came before the last two chunks");
    for (&seq, delta) in early.range(applied + 1..) {
        text.push_str(delta);
        applied = seq;
    }
    while applied < last {
        let c = expect_msg!(next_event(&mut slow).await, StreamChunk);
        if c.seq > applied {
            text.push_str(&c.delta);
            applied = c.seq;
        }
    }
    assert!(text == expected, "the text once, in order: {} bytes against {}", text.len(), expected.len());
}

#[tokio::test]
async fn an_idle_stream_times_out_on_every_device() {
    let server = TestServer::start_with(|c| c.stream_idle_timeout_secs = 1).await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    ops::chunk(&server.ctx, &k, 1, "thinking").await.unwrap();
    for c in [&mut phone, &mut laptop] {
        expect_msg!(next_event(c).await, StreamStarted);
        expect_msg!(next_event(c).await, StreamChunk);
        let event = expect_msg!(next_event(c).await, StreamCancelled);
        assert_eq!((event.stream_id.as_str(), event.reason), ("s1", StreamCancelReason::Timeout));
    }
    assert!(matches!(ops::chunk(&server.ctx, &k, 2, "x").await, Err(OpError::Stream(StreamError::NotOpen))));
    assert!(sync_all(&mut phone).await.active_streams.is_empty());
}

#[tokio::test]
async fn a_slow_device_gets_every_chunk_once_in_order_possibly_merged_and_is_not_closed() {
    // A small outbox, chunks much larger than socket buffers can absorb, and a device that does not read
    // while they are sent: its queue fills with chunks, which merge instead of closing it.
    let server = behind_server().await;
    let mut reader = new_user(&server, "alice", "reader").await;
    let mut slow = another_device(&server, "alice", "slow").await;
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    let chunks = 3000u64;
    let mut expected = String::new();
    let reading = tokio::spawn(async move {
        // A device that keeps up, reading as the chunks come.
        let mut text = String::new();
        expect_msg!(next_event(&mut reader).await, StreamStarted);
        let mut last = 0;
        while last < chunks {
            let c = expect_msg!(next_event(&mut reader).await, StreamChunk);
            assert!(c.seq > last);
            last = c.seq;
            text.push_str(&c.delta);
        }
        text
    });
    for seq in 1..=chunks {
        let delta = format!("<{seq}:{}>", "x".repeat(8 * 1024));
        expected.push_str(&delta);
        assert_eq!(ops::chunk(&server.ctx, &k, seq, &delta).await.unwrap(), Appended::Accepted);
    }
    // Now the slow device reads.
    expect_msg!(next_event(&mut slow).await, StreamStarted);
    let (mut text, mut last, mut frames) = (String::new(), 0, 0);
    while last < chunks {
        let c = expect_msg!(next_event(&mut slow).await, StreamChunk);
        assert!(c.seq > last, "in order: {} after {last}", c.seq);
        last = c.seq;
        text.push_str(&c.delta);
        frames += 1;
    }
    assert!(text == expected, "every chunk's text exactly once, in order ({} vs {} bytes)", text.len(), expected.len());
    assert!(frames < chunks, "the slow device got merged chunks ({frames} frames for {chunks} chunks)");
    assert_quiet(&mut slow).await;
    assert!(reading.await.unwrap() == expected, "the device that kept up got the same text");
}

#[tokio::test]
async fn open_streams_are_lost_on_restart_and_nothing_of_a_chunk_is_at_rest() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    set_title(&mut phone, "c1", "t").await;
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    ops::chunk(&server.ctx, &k, 1, "CHUNK-SECRET-TEXT").await.unwrap();
    for (path, bytes) in server.data_files() {
        assert!(!String::from_utf8_lossy(&bytes).contains("CHUNK-SECRET"), "chunk text in {}", path.display());
    }
    drop(phone);
    let server = server.restart().await;
    let mut phone = another_device(&server, "alice", "phone2").await;
    assert!(sync_all(&mut phone).await.active_streams.is_empty());
    assert!(matches!(ops::chunk(&server.ctx, &k, 2, "x").await, Err(OpError::Stream(StreamError::NotOpen))));
}

/// An initial sync lists the open streams, then another device deletes their chat (every device gets
/// `stream_cancelled`, then `chat_deleted`), then the reply is made: its `active_streams` must not hold
/// the ended stream (it did: the syncing device, told the stream had ended, was shown it open again, in a
/// chat it had deleted).
#[tokio::test]
async fn an_initial_sync_whose_stream_list_raced_a_chat_deletion_leaves_the_streams_out() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    set_title(&mut phone, "c1", "doomed").await;
    expect_msg!(next_event(&mut laptop).await, ChatTitleUpdated);
    ops::start(&server.ctx, &skey("alice", "c1", "s1"), &info("m1")).await.unwrap();
    for c in [&mut phone, &mut laptop] {
        expect_msg!(next_event(c).await, StreamStarted);
    }

    let mut held = server.ctx.pauses.arm(chatsync::pause::SYNC_STREAMS_LISTED);
    laptop.send(&sync_request(json!({}), None), Some("sync")).await.unwrap();
    held.reached().await;
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    held.release();
    let cancelled = expect_msg!(next_event(&mut laptop).await, StreamCancelled);
    assert_eq!(cancelled.reason, StreamCancelReason::Aborted);
    expect_msg!(next_event(&mut laptop).await, ChatDeleted);
    let sync = expect_msg!(laptop.recv_reply("sync").await.unwrap(), InitialSyncResponse);
    assert!(sync.active_streams.is_empty(), "an ended stream of a deleted chat: {sync:?}");
    assert!(entry(&sync, "c1").is_none() && sync.server_chat_order.is_empty(), "{sync:?}");
}

/// A device's own copy of a change it makes that goes to ALL (a title, a read marker, a deletion, a
/// cancel) is a reply: it waits for room in the device's queue. The user's other devices must not wait
/// with it: the copy for OTHERS was handed to the hub only once the device's own copy had found room, so
/// a device that had fallen behind held up every other device's copy until it read its backlog (or, not
/// reading at all, until its writer gave up on it, a minute later).
#[tokio::test]
async fn a_device_behind_does_not_hold_up_the_other_devices_copy_of_its_change() {
    let server = behind_server().await;
    let mut slow = new_user(&server, "alice", "slow").await;
    // The slow device's socket is filled with chunks (which never close it), far beyond the socket
    // buffers, so its writer is stuck and its queue keeps what comes next.
    let k = skey("alice", "c1", "s1");
    ops::start(&server.ctx, &k, &info("m1")).await.unwrap();
    for seq in 1..=3000 {
        let delta = format!("<{seq}:{}>", "x".repeat(8 * 1024));
        assert_eq!(ops::chunk(&server.ctx, &k, seq, &delta).await.unwrap(), Appended::Accepted);
    }
    let mut phone = another_device(&server, "alice", "phone").await;
    // Four broadcasts fill the slow device's queue to its bound of four frames (not beyond it).
    for i in 0..4 {
        set_draft(&mut phone, "c2", doc(&format!("draft {i}"))).await;
    }
    // The slow device renames a chat: its own copy waits for room, the phone's must not.
    slow.send(&title("c2", "renamed"), Some("t1")).await.unwrap();
    let m = next_event(&mut phone).await;
    let renamed = expect_msg!(m, ChatTitleUpdated);
    assert_eq!((renamed.chat_id.as_str(), renamed.data.title.as_str()), ("c2", "renamed"));
    // The slow device gets everything once it reads: its backlog, the drafts, then its own copy.
    let mut drafts = 0;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), slow.recv()).await.expect("a frame").unwrap();
        match m.message {
            ServerMessage::StreamStarted(_) | ServerMessage::StreamChunk(_) => {}
            ServerMessage::ChatDraftUpdated(_) => drafts += 1,
            ServerMessage::ChatTitleUpdated(t) => {
                assert_eq!((m.request_id.as_deref(), t.data.title.as_str()), (Some("t1"), "renamed"));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(drafts, 4);
    assert_quiet(&mut slow).await;
}
