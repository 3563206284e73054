//! Bounded replies (PROTOCOL.md "Bounded replies"): no server frame is larger than `max_reply_bytes`;
//! initial sync and content batches are split into parts with `more`, message pages are shortened with
//! `has_more`, and a user owns at most `max_chats_per_user` chats; a failure after the first parts ends
//! the reply with an error. Checked on the raw frames.

#[macro_use]
mod sync_util;
mod common;

use chatsync_client::Client;
use chatsync_protocol::*;
use common::TestServer;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use sync_util::*;

const REPLY: u32 = 80_000;

async fn small_reply_server() -> TestServer {
    TestServer::start_with(|c| {
        c.max_frame_bytes = 16_384;
        c.max_reply_bytes = REPLY;
        c.max_chats_per_user = 1_000;
        c.max_offline_changes = 50;
        c.rate_burst = 10_000;
    })
    .await
}

/// Sends `frame` and reads raw reply frames with `request_id` `rid` until one says `more: false` (or has
/// no `more`); checks that each is within the bound.
async fn raw_parts(c: &mut Client, frame: Value, rid: &str) -> Vec<Value> {
    c.send_text(frame.to_string()).await.unwrap();
    let mut parts = Vec::new();
    loop {
        let text = c.recv_text().await.unwrap();
        assert!(text.len() <= REPLY as usize, "a frame of {} bytes exceeds max_reply_bytes", text.len());
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["request_id"] != rid {
            continue;
        }
        let more = v["payload"]["more"].as_bool();
        parts.push(v);
        if more != Some(true) {
            return parts;
        }
    }
}

fn long_title(i: usize) -> String {
    format!("{i:04} {}", "title text ".repeat(22))
}

#[tokio::test]
async fn the_greeting_announces_max_reply_bytes() {
    let server = small_reply_server().await;
    let token = server.user_token("alice").await;
    let (_c, hello) = server.connect(&token, "d").await;
    assert_eq!(hello.limits.max_reply_bytes, REPLY);
}

#[tokio::test]
async fn a_large_initial_sync_comes_in_parts_that_add_up_to_the_whole() {
    let server = small_reply_server().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for i in 0..400 {
        set_title(&mut alice, &format!("c{i:03}"), &long_title(i)).await;
    }
    add_message(&mut alice, "c007", "m1", json!("hello")).await;
    // The client also lists 200 chats it should delete.
    let mut versions = serde_json::Map::new();
    for i in 0..200 {
        versions.insert(format!("gone-{i:03}-{}", "x".repeat(30)), json!({}));
    }
    let frame = json!({"type": "initial_sync_request", "request_id": "big",
        "payload": {"chat_versions": versions, "immediate_view_chat_id": "c007"}});
    let parts = raw_parts(&mut alice, frame, "big").await;
    assert!(parts.len() >= 2, "about 100 KB of titles must be split: {} part(s)", parts.len());
    let mut entries = Vec::new();
    let mut deletes = BTreeSet::new();
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(part["type"], "initial_sync_response");
        let p = &part["payload"];
        assert_eq!(p["more"], i + 1 < parts.len(), "more on every part but the last");
        let last = i + 1 == parts.len();
        assert_eq!(p["server_chat_order"].as_array().unwrap().is_empty(), !last, "the order comes in the last part");
        assert_eq!(p["sync_completed_at"].as_str().unwrap().is_empty(), !last);
        // Each part is a valid payload of its own.
        let decoded: InitialSyncResponse = serde_json::from_value(p.clone()).unwrap();
        entries.extend(decoded.chats_to_add_or_update);
        deletes.extend(decoded.chat_ids_to_delete.into_iter().map(|c| c.to_string()));
    }
    assert_eq!(deletes.len(), 200);
    assert_eq!(entries.len(), 400);
    assert_eq!(entries[0].chat_id.as_str(), "c007", "the immediate-view chat comes first");
    assert_eq!(entries[0].messages.as_ref().map(Vec::len), Some(1));
    let ids: BTreeSet<&str> = entries.iter().map(|e| e.chat_id.as_str()).collect();
    assert_eq!(ids.len(), 400, "every chat exactly once");
    let titles_ok = entries
        .iter()
        .all(|e| e.title.as_deref() == Some(long_title(e.chat_id.as_str()[1..].parse().unwrap()).as_str()));
    assert!(titles_ok);
    let order = parts.last().unwrap()["payload"]["server_chat_order"].as_array().unwrap().len();
    assert_eq!(order, 400);
    assert_alive(&mut alice).await;
}

#[tokio::test]
async fn a_small_reply_is_one_frame_with_more_false() {
    let server = small_reply_server().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "t").await;
    let parts = raw_parts(
        &mut alice,
        json!({"type": "initial_sync_request", "request_id": "s",
        "payload": {"chat_versions": {}}}),
        "s",
    )
    .await;
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["payload"]["more"], false);
    let parts = raw_parts(
        &mut alice,
        json!({"type": "request_chat_content_batch", "request_id": "b",
        "payload": {"chat_ids": ["c1", "nope"]}}),
        "b",
    )
    .await;
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["payload"]["more"], false);
    assert_eq!(parts[0]["payload"]["not_found"], json!(["nope"]));
}

#[tokio::test]
async fn message_pages_and_content_batches_are_bounded_by_bytes() {
    let server = small_reply_server().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let body = "m".repeat(8_000);
    for chat in ["a", "b", "c"] {
        for i in 0..12 {
            add_message(&mut alice, chat, &format!("m{i}"), json!(body)).await;
        }
    }
    // 12 messages of 8 KB do not fit in 80 KB: the page is shorter and says has_more.
    let page = expect_msg!(alice.request(&get_messages("a", 0, Some(12))).await.unwrap(), ChatMessagesResponse);
    assert!(page.has_more);
    let got = page.messages.len();
    assert!((1..12).contains(&got), "{got}");
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=got as u64).collect::<Vec<_>>());
    // Paging on collects all 12, each page within the bound.
    let mut seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    while seqs.len() < 12 {
        let after = *seqs.last().unwrap();
        let page = expect_msg!(alice.request(&get_messages("a", after, Some(12))).await.unwrap(), ChatMessagesResponse);
        seqs.extend(page.messages.iter().map(|m| m.seq));
    }
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());

    // A batch of three such chats: split by chats, each chat's newest messages that fit.
    let parts = raw_parts(
        &mut alice,
        json!({"type": "request_chat_content_batch", "request_id": "b",
        "payload": {"chat_ids": ["a", "b", "c", "zz"]}}),
        "b",
    )
    .await;
    assert!(parts.len() >= 3, "{} parts", parts.len());
    let mut chats = BTreeSet::new();
    for (i, part) in parts.iter().enumerate() {
        let p: ChatContentBatchResponse = serde_json::from_value(part["payload"].clone()).unwrap();
        assert_eq!(p.more, i + 1 < parts.len());
        for (id, messages) in &p.messages_by_chat_id {
            assert!(chats.insert(id.to_string()), "a chat in two parts");
            assert_eq!(p.versions_by_chat_id[id].messages_v, 12);
            assert!(!messages.is_empty());
            assert_eq!(messages.last().unwrap().seq, 12, "the most recent messages are kept");
        }
        assert_eq!(p.not_found.is_empty(), i + 1 < parts.len(), "not_found comes in the last part");
    }
    assert_eq!(chats.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_alive(&mut alice).await;
}

#[tokio::test]
async fn a_user_cannot_own_more_than_max_chats_per_user() {
    let server = TestServer::start_with(|c| c.max_chats_per_user = 3).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    for chat in ["c1", "c2", "c3"] {
        set_title(&mut alice, chat, "t").await;
    }
    for attempt in [title("c4", "t"), draft("c4", doc("x")), message("c4", "m1", json!("x"))] {
        let reply = alice.request(&attempt).await.unwrap();
        let err = assert_limit(&reply, "chat_id", "max_chats_per_user");
        assert_eq!(err.chat_id.as_deref(), Some("c4"));
    }
    let (_, done) = offline_round(&mut alice, json!([off_title("o", "c4", "t", 0)])).await;
    assert_eq!(done.results[0].code, Some(ErrorCode::LimitExceeded));
    // Writes to existing chats go on; another user is not affected; deleting one frees a slot.
    set_title(&mut alice, "c1", "still").await;
    set_title(&mut bob, "b1", "mine").await;
    expect_msg!(alice.request(&delete_chat("c2")).await.unwrap(), ChatDeleted);
    set_title(&mut alice, "c4", "now").await;
    assert_eq!(sync_all(&mut alice).await.server_chat_order.len(), 3);
}

#[tokio::test]
async fn a_reply_budget_too_small_for_one_item_is_refused_at_start() {
    let data = tempfile::tempdir().unwrap();
    let config =
        chatsync::Config { data_dir: data.path().to_owned(), max_reply_bytes: 20_000, ..chatsync::Config::default() };
    let err = chatsync::build(config).await.err().expect("refused");
    assert!(err.to_string().contains("max_reply_bytes"), "{err}");
}

async fn assert_alive(c: &mut Client) {
    expect_msg!(c.request(&ping()).await.unwrap(), Pong);
}

/// A reply far larger than the socket buffers, read at a slow but steady pace, arrives whole: while the
/// reader waits for room to queue the next part it reads nothing (the client's Pongs wait unread), and
/// that time is not counted as the client's silence: no heartbeat timeout. (The Pings queue
/// behind the reply in the socket too, so the timeout must still cover draining the socket buffers,
/// a few MB on loopback, at the client's pace: ~2 s here.) The parts are made as the client takes them.
#[tokio::test]
async fn a_reply_read_slowly_for_longer_than_the_heartbeat_timeout_arrives_whole() {
    let server = TestServer::start_with(|c| {
        c.ping_interval_secs = 1;
        c.heartbeat_timeout_secs = 5;
        c.outbox_max_bytes = 16_384;
        c.max_reply_bytes = 320 * 1024;
        c.max_chats_per_user = 100;
        c.max_batch_chats = 100;
        c.rate_burst = 10_000;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    // 24 MB of messages in 80 chats, a part each: several times what loopback's buffers hold.
    let text = "x".repeat(30_000);
    let chats: Vec<String> = (0..80).map(|i| format!("c{i}")).collect();
    for chat in &chats {
        for m in 0..10 {
            add_message(&mut alice, chat, &format!("m{m:03}"), json!(text)).await;
        }
    }
    let frame = json!({"type": "request_chat_content_batch", "request_id": "big",
        "payload": {"chat_ids": chats}});
    alice.send_text(frame.to_string()).await.unwrap();
    let mut phone = another_device(&server, "alice", "phone").await;
    let mut messages = 0;
    let mut late_seen = false;
    loop {
        // At most 3 MB/s: the reply takes ~10 s, for ~6 s of which the server's reader waits for room.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let text = alice.recv_text().await.unwrap_or_else(|e| panic!("after {messages} messages: {e}"));
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["request_id"] != "big" {
            continue;
        }
        if messages == 0 {
            // The parts are made as the client takes them: the last chat's is made long after this
            // message is written (a few MB of parts fit in the socket buffers, not 24).
            add_message(&mut phone, "c79", "late", json!("late")).await;
        }
        for (chat, list) in v["payload"]["messages_by_chat_id"].as_object().unwrap() {
            let list = list.as_array().unwrap();
            messages += list.len();
            late_seen |= chat == "c79" && list.last().unwrap()["message_id"] == "late";
        }
        if v["payload"]["more"] != json!(true) {
            break;
        }
    }
    assert_eq!(messages, 80 * 10 + 1);
    assert!(late_seen, "the last chat's part was made before the client took the first");
    let reply = alice.request(&ClientMessage::Ping(Empty {})).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::Pong(_)), "{reply:?}");
}

/// Flips one bit of a stored ciphertext: `select` reads it, `update` writes it back as `?1`.
fn corrupt(server: &TestServer, select: &str, update: &str) {
    let db = rusqlite::Connection::open(server.data.path().join("chatsync.db")).unwrap();
    let mut blob: Vec<u8> = db.query_row(select, [], |r| r.get(0)).unwrap();
    let last = blob.len() - 1;
    blob[last] ^= 0x01;
    assert_eq!(db.execute(update, [blob]).unwrap(), 1);
}

/// A failure met while a split reply is being built (here stored data that no longer decrypts, in a
/// chat of a later part) ends the reply with `initial_sync_error` / `error` after the parts already sent;
/// the connection carries on.
#[tokio::test]
async fn a_reply_that_fails_after_its_first_parts_ends_with_an_error_and_the_connection_lives() {
    let server = small_reply_server().await;
    let token = server.user_token("alice").await;
    {
        let (mut alice, _) = server.connect(&token, "laptop").await;
        for i in 0..400 {
            set_title(&mut alice, &format!("c{i:03}"), &long_title(i)).await;
        }
        let body = "m".repeat(8_000);
        for chat in ["a", "b", "c"] {
            for i in 0..12 {
                add_message(&mut alice, chat, &format!("m{i}"), json!(body)).await;
            }
        }
        alice.close().await.unwrap();
    }
    // The oldest chat's title and the last batch chat's newest message no longer decrypt (read from the
    // store: the user's cache went with the last connection).
    while server.ctx.hub.connection_count() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    corrupt(
        &server,
        "SELECT title FROM chats WHERE chat_id = 'c000'",
        "UPDATE chats SET title = ?1 WHERE chat_id = 'c000'",
    );
    corrupt(
        &server,
        "SELECT content FROM messages WHERE chat_id = 'c' AND seq = 12",
        "UPDATE messages SET content = ?1 WHERE chat_id = 'c' AND seq = 12",
    );
    let (mut alice, _) = server.connect(&token, "laptop").await;

    let frame = json!({"type": "initial_sync_request", "request_id": "s", "payload": {"chat_versions": {}}});
    let parts = raw_parts(&mut alice, frame, "s").await;
    let (last, sent) = parts.split_last().unwrap();
    assert!(!sent.is_empty(), "the failure comes after parts already sent");
    assert!(sent.iter().all(|p| p["type"] == "initial_sync_response" && p["payload"]["more"] == true));
    assert_eq!((&last["type"], &last["payload"]["code"]), (&json!("initial_sync_error"), &json!("internal")));

    let frame =
        json!({"type": "request_chat_content_batch", "request_id": "b", "payload": {"chat_ids": ["a", "b", "c"]}});
    let parts = raw_parts(&mut alice, frame, "b").await;
    let (last, sent) = parts.split_last().unwrap();
    assert!(!sent.is_empty(), "the failure comes after parts already sent");
    assert!(sent.iter().all(|p| p["type"] == "chat_content_batch_response" && p["payload"]["more"] == true));
    assert_eq!((&last["type"], &last["payload"]["code"]), (&json!("error"), &json!("internal")));
    assert_alive(&mut alice).await;
}

#[tokio::test]
async fn the_offline_summary_fits_the_smallest_reply_budget_the_server_accepts() {
    // `offline_sync_complete` is one frame (it has no parts): its results may add ~90 bytes per change to
    // what the request echoes, so a budget just above one inbound frame is not enough for it.
    // Few chats, so that the chat order does not set the smallest budget.
    let config =
        |max_reply_bytes| chatsync::Config { max_reply_bytes, max_chats_per_user: 100, ..chatsync::Config::default() };
    let (mut refused, mut accepted) = (0u32, 8 << 20);
    assert!(config(accepted).validate().is_ok());
    while accepted - refused > 1 {
        let mid = refused + (accepted - refused) / 2;
        if config(mid).validate().is_ok() {
            accepted = mid;
        } else {
            refused = mid;
        }
    }
    let server = TestServer::start_with(|c| {
        c.max_reply_bytes = accepted;
        c.max_chats_per_user = 100;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut alice, hello) = server.connect(&token, "d").await;
    let (max_frame, max_changes) = (hello.limits.max_frame_bytes as usize, hello.limits.max_offline_changes as usize);
    // The most results for the fewest bytes: malformed changes (`5`), and one echoing a change id that
    // fills the rest of the inbound frame.
    let mut changes = vec!["5".to_owned(); max_changes - 1];
    let head = r#"{"type":"sync_offline_changes","payload":{"changes":["#;
    let tail = r#"]},"request_id":"r"}"#;
    let used =
        head.len() + tail.len() + changes.iter().map(|c| c.len() + 1).sum::<usize>() + r#"{"change_id":""}"#.len();
    changes.push(format!(r#"{{"change_id":"{}"}}"#, "x".repeat(max_frame - used)));
    let frame = format!("{head}{}{tail}", changes.join(","));
    assert_eq!(frame.len(), max_frame);
    alice.send_text(frame).await.unwrap();
    let text = alice.recv_text().await.unwrap();
    let done: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(done["type"], "offline_sync_complete", "{}", &text[..200.min(text.len())]);
    assert_eq!(done["payload"]["errors"], max_changes);
    assert!(text.len() <= accepted as usize, "a frame of {} bytes exceeds max_reply_bytes ({accepted})", text.len());
}
