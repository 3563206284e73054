//! Streams over the server API (SERVER_API.md section 4), end to end: real HTTP with an API key against the
//! real server, real WebSocket devices. Every status of start / chunks / complete / abort; three devices
//! (one live, one joining mid-stream, one slow); a device cancelling (then a chunk is 409); a restart
//! losing the open streams; and a cluster where a stream started on node A's API reaches a device on node B.

#[macro_use]
mod sync_util;
mod common;

use chatsync_client::Client;
use chatsync_protocol::*;
use common::cluster::{redis_url, TestCluster};
use common::{Api, TestServer};
use serde_json::{json, Value};
use std::time::Duration;
use sync_util::*;

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

fn field(body: &Value) -> &str {
    body["error"]["field"].as_str().unwrap_or("")
}

const STREAMS: &str = "/users/alice/chats/c1/streams";

fn start_body(stream: &str, message: &str) -> Value {
    json!({"stream_id": stream, "message_id": message, "sender_name": "assistant", "meta": {"model": "m-1"}})
}

async fn send_chunk(api: &Api, stream: &str, seq: u64, delta: &str) -> (u16, Value) {
    api.post(&format!("{STREAMS}/{stream}/chunks"), json!({"seq": seq, "delta": delta})).await
}

/// The next broadcast on `c` (no `request_id`).
async fn next_event(c: &mut Client) -> Incoming {
    let m = tokio::time::timeout(Duration::from_secs(10), c.recv()).await.expect("an event").unwrap();
    assert_eq!(m.request_id, None, "{m:?}");
    m
}

/// Reads `c` until `stream`'s chunk `last` arrived; returns the text (chunks possibly merged, in order).
async fn text_until(c: &mut Client, stream: &str, last: u64) -> String {
    let mut text = String::new();
    let mut seq = 0;
    while seq < last {
        let chunk = expect_msg!(next_event(c).await, StreamChunk);
        assert_eq!(chunk.stream_id.as_str(), stream);
        assert!(chunk.seq > seq, "in order");
        seq = chunk.seq;
        text.push_str(&chunk.delta);
    }
    text
}

/// `meta` nested past the limit of message content (within its 4 KiB) was passed through to every device
/// in `stream_started` and in each initial sync while the stream was open, where it broke a reader whose
/// parser stops at 128 levels (frame included). 32 levels (`meta` itself the first) are taken and reach the
/// devices; one level more is 422 `limit_exceeded` naming `meta`, and opens no stream.
#[tokio::test]
async fn meta_nested_at_the_depth_limit_is_taken_and_one_level_more_is_limit_exceeded() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let max = Limits::MAX_MESSAGE_CONTENT_DEPTH;
    let meta = |levels: usize| (1..levels).fold(json!({}), |inner, _| json!({"a": inner}));
    let start = |stream: &str, levels: usize| json!({"stream_id": stream, "message_id": stream, "sender_name": "assistant", "meta": meta(levels)});
    let in_arrays = (2..=max).fold(json!([]), |inner, _| json!([inner])); // 32 levels, 33 in meta
    for over in [
        start("s1", max + 1),
        start("s1", 100),
        json!({"stream_id": "s1", "message_id": "s1",
        "sender_name": "assistant", "meta": {"model": "m", "a": in_arrays}}),
    ] {
        let (status, body) = api.post(STREAMS, over.clone()).await;
        assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "meta"), "{body}");
    }
    assert_eq!(api.post(STREAMS, start("s2", max)).await, (201, json!({"stream_id": "s2"})));
    let started = expect_msg!(next_event(&mut phone).await, StreamStarted);
    assert_eq!((started.stream_id.as_str(), Value::Object(started.meta)), ("s2", meta(max)));
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let active = sync_all(&mut laptop).await.active_streams;
    let ids: Vec<_> = active.iter().map(|s| s.stream_id.as_str()).collect();
    assert_eq!(ids, ["s2"], "no stream opened for refused meta");
    assert_eq!(Value::Object(active[0].meta.clone()), meta(max));
}

#[tokio::test]
async fn three_devices_one_joining_mid_stream_and_one_slow() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut slow = another_device(&server, "alice", "slow").await;

    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await, (201, json!({"stream_id": "s1"})));
    let started = expect_msg!(next_event(&mut phone).await, StreamStarted);
    assert_eq!(
        (started.chat_id.as_str(), started.message_id.as_str(), started.sender_name.as_str()),
        ("c1", "m1", "assistant")
    );
    assert_eq!(started.meta, json!({"model": "m-1"}).as_object().unwrap().clone());

    let words: Vec<String> = (1..=200).map(|i| format!("word{i} ")).collect();
    let mut expected = String::new();
    for (i, w) in words.iter().enumerate().take(100) {
        assert_eq!(send_chunk(&api, "s1", i as u64 + 1, w).await, (202, json!({})));
        expected.push_str(w);
    }
    // The laptop joins mid-stream: the text so far, then the next chunks.
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let active = sync_all(&mut laptop).await.active_streams;
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!((active[0].stream_id.as_str(), active[0].seq), ("s1", 100));
    assert_eq!(active[0].content_so_far, expected);
    let mut laptop_text = active[0].content_so_far.clone();
    for (i, w) in words.iter().enumerate().skip(100) {
        assert_eq!(send_chunk(&api, "s1", i as u64 + 1, w).await.0, 202);
        expected.push_str(w);
    }
    assert_eq!(text_until(&mut phone, "s1", 200).await, expected, "the live device");
    laptop_text.push_str(&text_until(&mut laptop, "s1", 200).await);
    assert_eq!(laptop_text, expected, "the device that joined mid-stream");
    // The slow device read nothing so far: it gets the same text, possibly merged, and is still open.
    expect_msg!(next_event(&mut slow).await, StreamStarted);
    assert_eq!(text_until(&mut slow, "s1", 200).await, expected, "the slow device");
    for c in [&mut phone, &mut laptop, &mut slow] {
        assert_quiet(c).await;
    }

    // The backend aborts: ALL stream_cancelled `aborted`; the stream is gone.
    assert_eq!(api.delete(&format!("{STREAMS}/s1")).await.0, 204);
    for c in [&mut phone, &mut laptop, &mut slow] {
        let event = expect_msg!(next_event(c).await, StreamCancelled);
        assert_eq!((event.stream_id.as_str(), event.reason), ("s1", StreamCancelReason::Aborted));
    }
    assert!(sync_all(&mut laptop).await.active_streams.is_empty());
}

#[tokio::test]
async fn every_status_of_start_chunks_and_abort() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut alice = new_user(&server, "alice", "phone").await;
    server.user("bob", false).await;
    set_title(&mut alice, "c1", "t").await;

    // start
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await, (200, json!({"stream_id": "s1"})), "a retried start");
    let (status, body) = api.post(STREAMS, start_body("s1", "m2")).await;
    assert_eq!((status, code(&body)), (409, "conflict"), "the id is open with another message");
    for (bad, f) in [
        (json!({"stream_id": "a b", "message_id": "m", "sender_name": "x"}), "stream_id"),
        (json!({"stream_id": "s", "message_id": "a/b", "sender_name": "x"}), "message_id"),
        (json!({"stream_id": "s", "message_id": "m", "sender_name": "user"}), "sender_name"),
        (json!({"stream_id": "s", "message_id": "m", "sender_name": ""}), "sender_name"),
        (json!({"stream_id": "s", "message_id": "m"}), "sender_name"),
        (json!({"message_id": "m", "sender_name": "x"}), "stream_id"),
        (json!({"stream_id": "s", "message_id": "m", "sender_name": "x", "meta": []}), "meta"),
        (json!({"stream_id": "s", "message_id": "m", "sender_name": "x", "extra": 1}), "extra"),
    ] {
        let (status, body) = api.post(STREAMS, bad.clone()).await;
        assert_eq!((status, code(&body)), (400, "invalid_payload"), "{bad}: {body}");
        assert_eq!(field(&body), f, "{bad}: {body}");
    }
    let (status, body) = api.post("/users/alice/chats/c%20d/streams", start_body("s", "m")).await;
    assert_eq!((status, code(&body), field(&body)), (400, "invalid_payload", "chat_id"));
    let big_meta = json!({"stream_id": "s9", "message_id": "m9", "sender_name": "x", "meta": {"k": "v".repeat(4096)}});
    let (status, body) = api.post(STREAMS, big_meta).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "meta"));
    let (status, body) = api.post("/users/nobody/chats/c1/streams", start_body("s", "m")).await;
    assert_eq!((status, code(&body)), (404, "not_found"), "unknown user");
    let (status, body) = api.post("/users/bob/chats/c1/streams", start_body("s", "m")).await;
    assert_eq!((status, code(&body)), (404, "not_found"), "alice's chat is not bob's");
    expect_msg!(next_event(&mut alice).await, StreamStarted);

    // chunks
    let (status, body) = send_chunk(&api, "s1", 2, "x").await;
    assert_eq!((status, code(&body)), (409, "conflict"), "a gap");
    assert_eq!(send_chunk(&api, "s1", 1, "first").await, (202, json!({})));
    assert_eq!(send_chunk(&api, "s1", 1, "other").await, (200, json!({})), "a repeated seq is ignored");
    let long = "d".repeat(16 * 1024 + 1);
    assert_eq!(send_chunk(&api, "s1", 1, &long).await, (200, json!({})), "whatever its delta");
    let (status, body) = send_chunk(&api, "s1", 0, "x").await;
    assert_eq!((status, code(&body), field(&body)), (400, "invalid_payload", "seq"));
    let (status, body) = send_chunk(&api, "s1", 2, &long).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "delta"));
    let (status, body) = api.post(&format!("{STREAMS}/s1/chunks"), json!({"seq": 2})).await;
    assert_eq!((status, code(&body)), (400, "invalid_payload"));
    let (status, body) = send_chunk(&api, "nope", 1, "x").await;
    assert_eq!((status, code(&body)), (409, "conflict"), "a stream that is not open");
    let (status, body) = api.post("/users/bob/chats/c1/streams/s1/chunks", json!({"seq": 2, "delta": "x"})).await;
    assert_eq!((status, code(&body)), (409, "conflict"), "another user's stream is not open for them");
    let (status, body) = api.post(&format!("{STREAMS}/a%20b/chunks"), json!({"seq": 2, "delta": "x"})).await;
    assert_eq!((status, code(&body), field(&body)), (400, "invalid_payload", "stream_id"));
    let c = expect_msg!(next_event(&mut alice).await, StreamChunk);
    assert_eq!((c.seq, c.delta.as_str()), (1, "first"));
    assert_quiet(&mut alice).await;

    // abort
    let (status, body) = api.delete("/users/bob/chats/c1/streams/s1").await;
    assert_eq!((status, code(&body)), (409, "conflict"));
    assert_eq!(api.delete(&format!("{STREAMS}/s1")).await.0, 204);
    let (status, body) = api.delete(&format!("{STREAMS}/s1")).await;
    assert_eq!((status, code(&body)), (409, "conflict"), "aborted once");
    let (status, body) = send_chunk(&api, "s1", 2, "x").await;
    assert_eq!((status, code(&body)), (409, "conflict"), "closed");
    expect_msg!(next_event(&mut alice).await, StreamCancelled);
}

#[tokio::test]
async fn the_accumulated_text_is_capped() {
    let server = TestServer::start_with(|c| c.max_stream_bytes = 20_000).await;
    let api = server.api().await;
    server.user("alice", false).await;
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(send_chunk(&api, "s1", 1, &"a".repeat(16_000)).await.0, 202);
    let (status, body) = send_chunk(&api, "s1", 2, &"b".repeat(4_001)).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "delta"));
    assert_eq!(send_chunk(&api, "s1", 2, &"b".repeat(4_000)).await.0, 202, "up to the cap");
}

#[tokio::test]
async fn a_device_cancels_and_later_chunks_are_conflicts() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(send_chunk(&api, "s1", 1, "Hel").await.0, 202);
    let reply = phone.request(&msg("cancel_stream", json!({"chat_id": "c1", "stream_id": "s1"}))).await.unwrap();
    assert_eq!(expect_msg!(reply, StreamCancelled).reason, StreamCancelReason::CancelledByUser);
    expect_msg!(next_event(&mut laptop).await, StreamStarted);
    expect_msg!(next_event(&mut laptop).await, StreamChunk);
    let event = expect_msg!(next_event(&mut laptop).await, StreamCancelled);
    assert_eq!(event.reason, StreamCancelReason::CancelledByUser);
    let (status, body) = send_chunk(&api, "s1", 2, "lo").await;
    assert_eq!((status, code(&body)), (409, "conflict"));
    let (status, body) = api.delete(&format!("{STREAMS}/s1")).await;
    assert_eq!((status, code(&body)), (409, "conflict"));
}

#[tokio::test]
async fn a_restart_loses_open_streams() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(send_chunk(&api, "s1", 1, "Hel").await.0, 202);
    let server = server.restart().await;
    let api = Api { base: server.api_base(), ..api };
    let (status, body) = send_chunk(&api, "s1", 2, "lo").await;
    assert_eq!((status, code(&body)), (409, "conflict"));
    let mut phone = another_device(&server, "alice", "phone").await;
    assert!(sync_all(&mut phone).await.active_streams.is_empty());
}

/// Two nodes; alice's phone on node B; stream `s1` started through node A's API and announced on B.
/// Returns the cluster, an API client of each node, and the phone.
async fn two_nodes_streaming_to_b(url: &str) -> (TestCluster, Api, Api, Client) {
    let cluster = TestCluster::start(2, url, |_| {}).await;
    let api_a = cluster.nodes[0].api().await;
    let api_b = Api { base: cluster.nodes[1].api_base(), ..api_a.clone() };
    let mut on_b = new_user(&cluster.nodes[1], "alice", "phone").await;
    assert_eq!(api_a.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    expect_msg!(next_event(&mut on_b).await, StreamStarted);
    (cluster, api_a, api_b, on_b)
}

#[tokio::test]
async fn cluster_a_stream_started_on_one_node_reaches_devices_on_another() {
    let Some(url) = redis_url() else { return };
    let (cluster, api_a, api_b, mut on_b) = two_nodes_streaming_to_b(&url).await;
    let a = &cluster.nodes[0];
    assert_eq!(send_chunk(&api_a, "s1", 1, "Hel").await.0, 202);
    // The next chunk through the other node's API: the state is shared.
    assert_eq!(send_chunk(&api_b, "s1", 2, "lo").await.0, 202);
    assert_eq!(send_chunk(&api_a, "s1", 2, "XX").await.0, 200, "a repeat, whichever node");
    assert_eq!(text_until(&mut on_b, "s1", 2).await, "Hello");
    // A device joining on node A sees the stream.
    let mut on_a = another_device(a, "alice", "laptop").await;
    let active = sync_all(&mut on_a).await.active_streams;
    assert_eq!((active.len(), active[0].content_so_far.as_str()), (1, "Hello"));
    // Cancelled on node B's device: node A's API refuses the next chunk.
    let reply = on_b.request(&msg("cancel_stream", json!({"chat_id": "c1", "stream_id": "s1"}))).await.unwrap();
    expect_msg!(reply, StreamCancelled);
    let event = expect_msg!(next_event(&mut on_a).await, StreamCancelled);
    assert_eq!(event.reason, StreamCancelReason::CancelledByUser);
    let (status, body) = send_chunk(&api_a, "s1", 3, "!").await;
    assert_eq!((status, code(&body)), (409, "conflict"));

    // A second stream, completed through node B's API: node A's device gets the end, and the message is stored.
    assert_eq!(api_a.post(STREAMS, start_body("s2", "m2")).await.0, 201);
    assert_eq!(send_chunk(&api_a, "s2", 1, "Bye").await.0, 202);
    let (status, body) = api_b.post(&format!("{STREAMS}/s2/complete"), json!({})).await;
    assert_eq!((status, body["seq"].clone()), (201, json!(1)), "{body}");
    expect_msg!(next_event(&mut on_a).await, StreamStarted);
    assert_eq!(text_until(&mut on_a, "s2", 1).await, "Bye");
    let done = expect_msg!(next_event(&mut on_a).await, StreamCompleted);
    assert_eq!((done.stream_id.as_str(), done.seq), ("s2", 1));
    assert_eq!(all_messages(&mut on_a, "c1").await.messages[0].content, text("Bye"));
}

#[tokio::test]
async fn cluster_a_chunk_through_another_node_never_overtakes_the_previous_one_on_a_lagging_node() {
    let Some(url) = redis_url() else { return };
    let (cluster, api_a, api_b, mut on_b) = two_nodes_streaming_to_b(&url).await;
    let b = &cluster.nodes[1];

    // Node B's bus lags: chunk 1 (through node A) is held on its way to B's connections.
    let mut held = b.ctx.pauses.arm(chatsync::pause::BUS_FRAME);
    assert_eq!(send_chunk(&api_a, "s1", 1, "Hel").await.0, 202);
    held.reached().await;
    // Chunk 2 through node B, answered after chunk 1: watch Redis until B has published it.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut watch = client.get_async_pubsub().await.unwrap();
    watch.subscribe(chatsync::cluster::bus::user_channel(&b.ctx.config.redis_prefix, "alice")).await.unwrap();
    let second = tokio::spawn(async move { send_chunk(&api_b, "s1", 2, "lo").await.0 });
    futures_util::StreamExt::next(&mut watch.on_message()).await.unwrap();
    // The call waits for its place, behind chunk 1 (held).
    assert!(!second.is_finished());
    // Only now does B's bus catch up: chunk 1 must still come first on B's device.
    held.release();
    assert_eq!(second.await.unwrap(), 202);
    assert_eq!(text_until(&mut on_b, "s1", 2).await, "Hello");
}

/// A device's own `stream_cancelled` keeps its place among the stream's events too: a chunk accepted
/// through another node before the cancel, still on its way to the device's node, comes first. The device's
/// copy (a reply) was queued before the copy for the others took its turn in the bus order, so the device
/// got the stream's end and then a chunk of it.
#[tokio::test]
async fn cluster_a_devices_own_cancel_never_overtakes_a_chunk_accepted_before_it() {
    let Some(url) = redis_url() else { return };
    let (cluster, api_a, _api_b, mut on_b) = two_nodes_streaming_to_b(&url).await;
    let b = &cluster.nodes[1];
    // Node B's bus lags: chunk 1 (through node A) is held on its way to B's connections.
    let mut held = b.ctx.pauses.arm(chatsync::pause::BUS_FRAME);
    assert_eq!(send_chunk(&api_a, "s1", 1, "Hel").await.0, 202);
    held.reached().await;
    // The device on B cancels; once the stream is closed, B's bus catches up.
    on_b.send(&msg("cancel_stream", json!({"chat_id": "c1", "stream_id": "s1"})), Some("cancel")).await.unwrap();
    let key = chatsync::streams::StreamKey {
        user_id: "alice".into(),
        chat_id: ChatId::new("c1").unwrap(),
        stream_id: StreamId::new("s1").unwrap(),
    };
    while b.ctx.streams.is_open(&key).await.unwrap() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    held.release();
    let first = tokio::time::timeout(Duration::from_secs(10), on_b.recv()).await.unwrap().unwrap();
    let chunk = expect_msg!(first, StreamChunk);
    assert_eq!((chunk.seq, chunk.delta.as_str()), (1, "Hel"));
    let end = tokio::time::timeout(Duration::from_secs(10), on_b.recv()).await.unwrap().unwrap();
    assert_eq!(end.request_id.as_deref(), Some("cancel"));
    let end = expect_msg!(end, StreamCancelled);
    assert_eq!(end.reason, StreamCancelReason::CancelledByUser);
}

#[tokio::test]
async fn complete_stores_the_message_then_announces_only_the_end_and_closes_the_stream() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    add_message(&mut phone, "c1", "u1", json!("question")).await;
    expect_msg!(next_event(&mut laptop).await, ChatMessageAdded);
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    for (seq, delta) in [(1, "STREAMED-"), (2, "SECRET-"), (3, "ANSWER")] {
        assert_eq!(send_chunk(&api, "s1", seq, delta).await.0, 202);
    }
    // An invalid content is refused before the stream is touched.
    let (status, body) = api.post(&format!("{STREAMS}/s1/complete"), json!({"content": 5})).await;
    assert_eq!((status, code(&body), field(&body)), (400, "invalid_payload", "content"));
    let (status, body) = api.post(&format!("{STREAMS}/s1/complete"), json!({"extra": 1})).await;
    assert_eq!((status, code(&body)), (400, "invalid_payload"));

    let (status, body) = api.post(&format!("{STREAMS}/s1/complete"), json!({})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body, json!({"chat_id": "c1", "message_id": "m1", "seq": 2, "messages_v": 2, "duplicate": false}));
    for c in [&mut phone, &mut laptop] {
        expect_msg!(next_event(c).await, StreamStarted);
        assert_eq!(text_until(c, "s1", 3).await, "STREAMED-SECRET-ANSWER");
        // `stream_completed` and nothing else (SERVER_API.md section 4): devices fetch the stored message.
        let done = expect_msg!(next_event(c).await, StreamCompleted);
        assert_eq!((done.stream_id.as_str(), done.message_id.as_str(), done.seq, done.messages_v), ("s1", "m1", 2, 2));
        assert_quiet(c).await;
    }
    let history = all_messages(&mut laptop, "c1").await;
    assert_eq!(history.messages.len(), 2);
    let stored = &history.messages[1];
    assert_eq!((stored.message_id.as_str(), stored.sender_name.as_str()), ("m1", "assistant"));
    assert_eq!(stored.content, text("STREAMED-SECRET-ANSWER"));
    // Closed: chunks and a second completion are conflicts; nothing is open any more.
    assert_eq!(code(&send_chunk(&api, "s1", 4, "x").await.1), "conflict");
    let (status, body) = api.post(&format!("{STREAMS}/s1/complete"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "conflict"));
    assert!(sync_all(&mut phone).await.active_streams.is_empty());
    // The stored text is encrypted at rest.
    for (path, bytes) in server.data_files() {
        assert!(!String::from_utf8_lossy(&bytes).contains("SECRET-ANSWER"), "plaintext in {}", path.display());
    }

    // An explicit content replaces the streamed text.
    assert_eq!(api.post(STREAMS, start_body("s2", "m2")).await.0, 201);
    assert_eq!(send_chunk(&api, "s2", 1, "draft").await.0, 202);
    let content = json!({"type": "doc", "content": []});
    let (status, body) = api.post(&format!("{STREAMS}/s2/complete"), json!({"content": content})).await;
    assert_eq!((status, body["seq"].clone()), (201, json!(3)));
    let history = all_messages(&mut laptop, "c1").await;
    assert_eq!(history.messages[2].content, MessageContent::Json(content.as_object().unwrap().clone()));
    while laptop.buffered() > 0 {
        laptop.recv().await.unwrap();
    }

    // A stream whose message id already names a message of the chat (the user's own "u1") can never be
    // stored: 409, the stream ends as aborted, and the stored message stays as it was.
    assert_eq!(api.post(STREAMS, start_body("s3", "u1")).await.0, 201);
    expect_msg!(next_event(&mut laptop).await, StreamStarted);
    assert_eq!(send_chunk(&api, "s3", 1, "other text").await.0, 202);
    expect_msg!(next_event(&mut laptop).await, StreamChunk);
    let (status, body) = api.post(&format!("{STREAMS}/s3/complete"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "conflict"), "{body}");
    let ended = expect_msg!(next_event(&mut laptop).await, StreamCancelled);
    assert_eq!((ended.stream_id.as_str(), ended.reason), ("s3", StreamCancelReason::Aborted));
    assert_quiet(&mut laptop).await;
    let history = all_messages(&mut laptop, "c1").await;
    assert_eq!((history.messages.len(), history.messages[0].content.clone()), (3, text("question")));
}

/// A `complete` whose write committed but whose answer was lost is 503, and the stream is open again
/// (SERVER_API.md section 7); the retry finds the stream's own message stored (same id, chat, sender and
/// content) and completes the stream: devices get `stream_completed` exactly as on a first success, the backend the duplicate answer of section 3 (200, the original `seq`). It used to
/// take the branch of a backend reusing ids: 409 for the backend and `stream_cancelled` (`aborted`) on
/// every device, though the reply was stored (and never announced). Another message under the stream's
/// id (same sender, other content) is still that case.
#[tokio::test]
async fn a_complete_retried_after_its_write_committed_but_lost_the_answer_completes_the_stream() {
    let server = TestServer::start().await;
    let faults = server.ctx.chats.writer_faults().expect("the SQLite store has a writer");
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let complete = |stream: &str| format!("{STREAMS}/{stream}/complete");

    // The streamed text, into a chat that the completion creates.
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(send_chunk(&api, "s1", 1, "Hello ").await.0, 202);
    assert_eq!(send_chunk(&api, "s1", 2, "world").await.0, 202);
    faults.lose_answer_next(1);
    let (status, body) = api.post(&complete("s1"), json!({})).await;
    assert_eq!((status, code(&body)), (503, "unavailable"), "{body}");
    let (status, body) = api.post(&complete("s1"), json!({})).await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"chat_id": "c1", "message_id": "m1", "seq": 1, "messages_v": 1, "duplicate": true})),
        "{body}"
    );
    for c in [&mut phone, &mut laptop] {
        expect_msg!(next_event(c).await, StreamStarted);
        assert_eq!(text_until(c, "s1", 2).await, "Hello world");
        let done = expect_msg!(next_event(c).await, StreamCompleted);
        assert_eq!((done.stream_id.as_str(), done.message_id.as_str(), done.seq, done.messages_v), ("s1", "m1", 1, 1));
        assert_quiet(c).await;
    }
    // Completed: closed, stored once.
    let (status, body) = api.post(&complete("s1"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "conflict"));
    assert!(sync_all(&mut phone).await.active_streams.is_empty());
    let history = all_messages(&mut laptop, "c1").await;
    assert_eq!(history.messages.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["m1"]);
    assert_eq!(
        (history.messages[0].seq, history.messages[0].sender_name.as_str(), history.messages[0].content.clone()),
        (1, "assistant", text("Hello world"))
    );

    // With an explicit content, retried with the same body.
    let content = json!({"type": "doc", "text": "final"});
    assert_eq!(api.post(STREAMS, start_body("s2", "m2")).await.0, 201);
    assert_eq!(send_chunk(&api, "s2", 1, "draft").await.0, 202);
    faults.lose_answer_next(1);
    assert_eq!(api.post(&complete("s2"), json!({"content": content})).await.0, 503);
    let (status, body) = api.post(&complete("s2"), json!({"content": content})).await;
    assert_eq!((status, body["seq"].clone(), body["duplicate"].clone()), (200, json!(2), json!(true)), "{body}");
    expect_msg!(next_event(&mut laptop).await, StreamStarted);
    expect_msg!(next_event(&mut laptop).await, StreamChunk);
    expect_msg!(next_event(&mut laptop).await, StreamCompleted);
    assert_quiet(&mut laptop).await;
    let history = all_messages(&mut laptop, "c1").await;
    assert_eq!(history.messages[1].content, MessageContent::Json(content.as_object().unwrap().clone()));

    // Another message of the same sender under the stream's id: the stream's text can never be stored
    // there, so the stream ends (409, `aborted`), as for a backend reusing ids.
    let other = json!({"message_id": "m3", "sender_name": "assistant", "content": "another reply"});
    assert_eq!(api.post("/users/alice/chats/c1/messages", other).await.0, 201);
    expect_msg!(next_event(&mut laptop).await, ChatMessageAdded);
    assert_eq!(api.post(STREAMS, start_body("s3", "m3")).await.0, 201);
    expect_msg!(next_event(&mut laptop).await, StreamStarted);
    assert_eq!(send_chunk(&api, "s3", 1, "my reply").await.0, 202);
    expect_msg!(next_event(&mut laptop).await, StreamChunk);
    let (status, body) = api.post(&complete("s3"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "conflict"), "{body}");
    let ended = expect_msg!(next_event(&mut laptop).await, StreamCancelled);
    assert_eq!((ended.stream_id.as_str(), ended.reason), ("s3", StreamCancelReason::Aborted));
    assert_quiet(&mut laptop).await;
    let history = all_messages(&mut laptop, "c1").await;
    assert_eq!(history.messages.len(), 3);
    assert_eq!(history.messages[2].content, text("another reply"));
}

/// A user has at most `max_open_streams_per_user` streams open (each holds up to `max_stream_bytes` until
/// its idle timeout, and every initial sync copies them all): one more start is 422 `limit_exceeded`
/// naming `stream_id` and announces nothing, until a stream ends (completed, aborted, cancelled by a
/// device; the idle sweep in `stream_registry_contract.rs`). A retried start is not a new stream, and
/// the cap is per user.
#[tokio::test]
async fn a_start_past_the_users_cap_of_open_streams_is_limit_exceeded_until_one_ends() {
    let server = TestServer::start_with(|c| c.max_open_streams_per_user = 2).await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    server.user("bob", false).await;
    let start = |stream: &str| start_body(stream, &format!("m-{stream}"));
    let over_cap = |(status, body): (u16, Value)| {
        assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "stream_id"), "{body}");
    };
    assert_eq!(api.post(STREAMS, start("s1")).await.0, 201);
    assert_eq!(api.post("/users/alice/chats/c2/streams", start("s2")).await.0, 201);
    over_cap(api.post(STREAMS, start("s3")).await);
    over_cap(api.post("/users/alice/chats/c3/streams", start("s3")).await);
    assert_eq!(api.post(STREAMS, start("s1")).await.0, 200, "a retried start");
    assert_eq!(api.post("/users/bob/chats/c1/streams", start("s3")).await.0, 201, "bob's own cap");
    for expected in ["s1", "s2"] {
        assert_eq!(expect_msg!(next_event(&mut phone).await, StreamStarted).stream_id.as_str(), expected);
    }
    assert_quiet(&mut phone).await;
    let open: Vec<_> = sync_all(&mut phone).await.active_streams.into_iter().map(|s| s.stream_id.to_string()).collect();
    assert_eq!(open.len(), 2, "{open:?}");

    // A completed stream frees its slot...
    assert_eq!(api.post(&format!("{STREAMS}/s1/complete"), json!({"content": "done"})).await.0, 201);
    assert_eq!(api.post(STREAMS, start("s3")).await.0, 201);
    over_cap(api.post(STREAMS, start("s4")).await);
    // ...and so does an aborted one...
    assert_eq!(api.delete(&format!("{STREAMS}/s3")).await.0, 204);
    assert_eq!(api.post(STREAMS, start("s4")).await.0, 201);
    over_cap(api.post(STREAMS, start("s5")).await);
    // ...and one a device cancelled.
    let reply = phone.request(&msg("cancel_stream", json!({"chat_id": "c1", "stream_id": "s4"}))).await.unwrap();
    assert_eq!(expect_msg!(reply, StreamCancelled).reason, StreamCancelReason::CancelledByUser);
    assert_eq!(api.post(STREAMS, start("s5")).await.0, 201);
    over_cap(api.post(STREAMS, start("s6")).await);
}

#[tokio::test]
async fn deleting_a_chat_ends_its_open_streams_before_the_chat_goes() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    set_title(&mut phone, "c1", "t").await;
    expect_msg!(next_event(&mut laptop).await, ChatTitleUpdated);
    set_title(&mut phone, "c2", "other").await;
    expect_msg!(next_event(&mut laptop).await, ChatTitleUpdated);
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(api.post(STREAMS, start_body("s2", "m2")).await.0, 201);
    let other = "/users/alice/chats/c2/streams";
    assert_eq!(api.post(other, start_body("s3", "m3")).await.0, 201);
    assert_eq!(send_chunk(&api, "s1", 1, "x").await.0, 202);
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);

    // The laptop sees both streams of c1 end (aborted), then the chat go; c2's stream is untouched.
    for _ in 0..3 {
        expect_msg!(next_event(&mut laptop).await, StreamStarted);
    }
    expect_msg!(next_event(&mut laptop).await, StreamChunk);
    let mut ended = Vec::new();
    for _ in 0..2 {
        let event = expect_msg!(next_event(&mut laptop).await, StreamCancelled);
        assert_eq!((event.chat_id.as_str(), event.reason), ("c1", StreamCancelReason::Aborted));
        ended.push(event.stream_id.to_string());
    }
    ended.sort();
    assert_eq!(ended, ["s1", "s2"]);
    assert_eq!(expect_msg!(next_event(&mut laptop).await, ChatDeleted).chat_id.as_str(), "c1");

    // Closed: chunks, completion and abort are conflicts; a new stream in the deleted chat is not_found.
    assert_eq!(code(&send_chunk(&api, "s1", 2, "x").await.1), "conflict");
    let (status, body) = api.post(&format!("{STREAMS}/s2/complete"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "conflict"));
    assert_eq!(api.delete(&format!("{STREAMS}/s1")).await.0, 409);
    let (status, body) = api.post(STREAMS, start_body("s4", "m4")).await;
    assert_eq!((status, code(&body)), (404, "not_found"));
    let sync = sync_all(&mut laptop).await;
    let open: Vec<_> = sync.active_streams.iter().map(|s| s.stream_id.as_str()).collect();
    assert_eq!(open, ["s3"]);
    let (status, _) = api.post(&format!("{other}/s3/chunks"), json!({"seq": 1, "delta": "still here"})).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn a_completion_too_large_for_one_reply_frame_is_refused_and_the_stream_stays_open() {
    let server = TestServer::start_with(|c| {
        c.max_reply_bytes = 81_920;
        c.max_chats_per_user = 100;
        c.max_offline_changes = 50;
    })
    .await;
    let api = server.api().await;
    server.user("alice", false).await;
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    for seq in 1..=5 {
        assert_eq!(send_chunk(&api, "s1", seq, &"z".repeat(16_000)).await.0, 202);
    }
    let (status, body) = api.post(&format!("{STREAMS}/s1/complete"), json!({})).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "content"));
    // Still open: the backend completes it with a shorter content.
    assert_eq!(send_chunk(&api, "s1", 6, "z").await.0, 202);
    let (status, body) = api.post(&format!("{STREAMS}/s1/complete"), json!({"content": "summary"})).await;
    assert_eq!((status, body["seq"].clone()), (201, json!(1)), "{body}");
}

/// A stream in a chat id that is new, for a user who owns `max_chats_per_user` chats already, could never
/// be stored (its chat is created at completion, and that creation is refused): it was started (201, ALL
/// `stream_started`), took the whole reply, and then `complete` was 422 and left it open until the idle
/// timeout. The start is refused instead, as `POST …/messages` is for that chat: 422 naming `chat_id`,
/// nothing announced. A stream in one of the user's own chats is not affected.
#[tokio::test]
async fn a_start_that_would_create_a_chat_past_the_users_limit_is_refused() {
    let server = TestServer::start_with(|c| c.max_chats_per_user = 1).await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let first = json!({"message_id": "m0", "sender_name": "assistant", "content": "hi"});
    assert_eq!(api.post("/users/alice/chats/c1/messages", first).await.0, 201);
    expect_msg!(next_event(&mut phone).await, ChatMessageAdded);
    let over = json!({"message_id": "m0", "sender_name": "assistant", "content": "hi"});
    let (status, body) = api.post("/users/alice/chats/c2/messages", over).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "chat_id"), "{body}");

    let (status, body) = api.post("/users/alice/chats/c2/streams", start_body("s1", "m1")).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "chat_id"), "{body}");
    assert!(server.ctx.streams.list("alice").await.unwrap().is_empty(), "no stream was opened");
    assert_quiet(&mut phone).await;
    // In the user's own chat a stream starts and completes as ever.
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(api.post(&format!("{STREAMS}/s1/complete"), json!({"content": "done"})).await.0, 201);
}

/// A retried start of a stream that is open (announced) in a new chat id, after the user reached
/// `max_chats_per_user` since, is a retry (200), not refused: the backend would never end a stream its
/// devices show.
#[tokio::test]
async fn a_retried_start_in_a_new_chat_is_a_retry_after_the_user_reached_the_limit() {
    let server = TestServer::start_with(|c| c.max_chats_per_user = 1).await;
    let api = server.api().await;
    server.user("alice", false).await;
    assert_eq!(api.post("/users/alice/chats/c2/streams", start_body("s1", "m1")).await.0, 201);
    let first = json!({"message_id": "m0", "sender_name": "assistant", "content": "hi"});
    assert_eq!(api.post("/users/alice/chats/c1/messages", first).await.0, 201, "the user's one chat");
    let (status, body) = api.post("/users/alice/chats/c2/streams", start_body("s1", "m1")).await;
    assert_eq!(status, 200, "{body}");
}

/// A chunk whose `stream_chunk` frame would be larger than `max_reply_bytes` (PROTOCOL.md "Bounded
/// replies") is refused up front: 422 `limit_exceeded` naming `delta`, nothing applied or delivered, the
/// stream still open at the same `seq`. Within the 16 KiB of a delta only text that grows in JSON gets
/// there (a control character is escaped as six bytes). A chunk whose frame is exactly the bound is
/// accepted and delivered whole. Before, the larger one was accepted (202, its text part of the stream)
/// and then could not be delivered.
#[tokio::test]
async fn a_chunk_whose_frame_would_exceed_the_reply_bound_is_refused() {
    const REPLY: u32 = 81_920;
    let server = TestServer::start_with(|c| {
        c.max_reply_bytes = REPLY;
        c.max_chats_per_user = 100;
        c.max_offline_changes = 50;
    })
    .await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    expect_msg!(next_event(&mut phone).await, StreamStarted);

    // A delta of `escaped` control characters and `plain` letters whose frame is exactly `REPLY` bytes.
    let frame_len = |seq: u64, delta: &str| {
        let chunk = StreamChunk {
            chat_id: ChatId::new("c1").unwrap(),
            stream_id: StreamId::new("s1").unwrap(),
            seq,
            delta: delta.to_owned(),
        };
        encode(&ServerMessage::StreamChunk(chunk), None).len()
    };
    let escaped = "\u{1}".repeat(13_400);
    let plain = REPLY as usize - frame_len(1, &escaped);
    let fits = format!("{escaped}{}", "a".repeat(plain));
    let over = format!("{fits}a");
    assert_eq!(frame_len(1, &fits), REPLY as usize);
    assert!(over.len() <= 16 * 1024, "within the delta limit: only the frame is too large");

    let (status, body) = send_chunk(&api, "s1", 1, &over).await;
    assert_eq!((status, code(&body), field(&body)), (422, "limit_exceeded", "delta"), "{body}");
    assert_quiet(&mut phone).await;
    assert_eq!(server.ctx.streams.list("alice").await.unwrap()[0].seq, 0, "nothing applied");

    assert_eq!(send_chunk(&api, "s1", 1, &fits).await, (202, json!({})));
    let text = tokio::time::timeout(Duration::from_secs(10), phone.recv_text()).await.expect("the chunk").unwrap();
    assert_eq!(text.len(), REPLY as usize);
    let delivered = parse_chunk_frame(&text).expect("a stream_chunk");
    assert_eq!((delivered.seq, delivered.delta == fits), (1, true));

    // A repeated seq is ignored whatever its delta, also one too large; the stream goes on.
    assert_eq!(send_chunk(&api, "s1", 1, &over).await, (200, json!({})));
    assert_eq!(send_chunk(&api, "s1", 2, "more").await, (202, json!({})));
    assert_eq!(text_until(&mut phone, "s1", 2).await, "more");
    let open = server.ctx.streams.list("alice").await.unwrap();
    assert_eq!((open[0].seq, open[0].content.len()), (2, fits.len() + 4));
}

/// A `complete` whose message committed just before the chat's deletion, held there (before it announces
/// the end) while a device deletes the chat: the deletion finds no open stream to end (the completion
/// took it), every device gets `chat_deleted`, and then the completion's announcement. That must not be
/// `stream_completed`, which names the deleted chat as one holding a new message (a client that does not
/// ignore the events of a chat it saw deleted would list the chat again), as a backend's message is
/// not announced after its chat's deletion: the stream ends with `stream_cancelled` (`aborted`), as for a
/// start that raced the deletion.
#[tokio::test]
async fn a_completion_committed_before_its_chats_deletion_is_not_announced_after_it() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    set_title(&mut phone, "c1", "t").await;
    expect_msg!(next_event(&mut laptop).await, ChatTitleUpdated);
    assert_eq!(api.post(STREAMS, start_body("s1", "m1")).await.0, 201);
    assert_eq!(send_chunk(&api, "s1", 1, "hello").await.0, 202);
    for device in [&mut phone, &mut laptop] {
        expect_msg!(next_event(device).await, StreamStarted);
        expect_msg!(next_event(device).await, StreamChunk);
    }

    let mut held = server.ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    let (url, key) = (format!("{}{STREAMS}/s1/complete", server.api_base()), api.key.clone());
    let caller = tokio::spawn(async move {
        reqwest::Client::new().post(url).bearer_auth(key).json(&json!({})).send().await.unwrap().status()
    });
    held.reached().await;
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    expect_msg!(next_event(&mut laptop).await, ChatDeleted);
    held.release();
    assert_eq!(caller.await.unwrap(), 201, "stored before the deletion");

    // Whatever the completion announced was queued before its answer, so before these pongs.
    for device in [&mut phone, &mut laptop] {
        let pong = device.request(&ping()).await.unwrap();
        expect_msg!(pong, Pong);
        let mut after_deletion = Vec::new();
        while device.buffered() > 0 {
            after_deletion.push(device.recv().await.unwrap().message);
        }
        assert!(
            !after_deletion.iter().any(|m| matches!(m, ServerMessage::StreamCompleted(_))),
            "the deleted chat's stream was announced completed after chat_deleted: {after_deletion:?}"
        );
        let [ServerMessage::StreamCancelled(ended)] = &after_deletion[..] else {
            panic!("the stream was left open on the device: {after_deletion:?}");
        };
        assert_eq!((ended.stream_id.as_str(), ended.reason), ("s1", StreamCancelReason::Aborted));
    }
}
