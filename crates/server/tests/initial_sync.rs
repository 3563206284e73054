//! `initial_sync_request`, the warm-up events and `request_cache_status` end to end (PROTOCOL.md
//! section 6): new and stale clients, chat order, deletions, the immediate-view chat, limits and errors.

mod common;
#[macro_use]
mod sync_util;

use chatsync_client::Client;
use chatsync_protocol::*;
use common::TestServer;
use serde_json::{json, Value};
use std::time::Duration;
use sync_util::*;

fn seqs(messages: &[MessageOut]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

/// Lets the server clock move on, so that writes get distinct millisecond timestamps (the order of
/// chats edited within one millisecond is by chat id).
async fn next_millisecond() {
    tokio::time::sleep(Duration::from_millis(3)).await;
}

async fn sync_error(c: &mut Client, frame: String) -> (InitialSyncError, Option<String>) {
    c.send_text(frame).await.unwrap();
    let m = c.recv().await.unwrap();
    (expect_msg!(m, InitialSyncError), m.request_id)
}

#[tokio::test]
async fn a_new_client_gets_every_chat_as_new_chat_with_title_draft_and_versions() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "full", "Full chat").await;
    set_draft(&mut alice, "full", doc("typing")).await;
    add_message(&mut alice, "full", "m1", json!("a")).await;
    add_message(&mut alice, "full", "m2", json!("b")).await;
    add_message(&mut alice, "bare", "m1", json!("only a message")).await;
    set_draft(&mut alice, "draft-only", doc("just a draft")).await;

    let r = sync_all(&mut alice).await;
    assert!(r.chat_ids_to_delete.is_empty());
    assert!(humantime::parse_rfc3339(&r.sync_completed_at).is_ok(), "{}", r.sync_completed_at);
    assert_eq!(r.chats_to_add_or_update.len(), 3);
    let mut order = ids(&r.server_chat_order);
    order.sort();
    assert_eq!(order, ["bare", "draft-only", "full"]);

    let full = entry(&r, "full").unwrap();
    assert_eq!(full.kind, ChatChangeKind::NewChat);
    assert_eq!(full.title.as_deref(), Some("Full chat"));
    assert_eq!(full.draft_json, Some(doc("typing").as_object().cloned()));
    assert_eq!(full.versions, Versions { messages_v: 2, title_v: 1, draft_v: 1 });

    let bare = entry(&r, "bare").unwrap();
    assert_eq!(bare.kind, ChatChangeKind::NewChat);
    assert_eq!(bare.title.as_deref(), Some(""), "a title never set is \"\"");
    assert_eq!(bare.draft_json, Some(None), "no draft is an explicit null");
    assert_eq!(bare.versions, Versions { messages_v: 1, title_v: 0, draft_v: 0 });

    let draft_only = entry(&r, "draft-only").unwrap();
    assert_eq!(draft_only.versions, Versions { messages_v: 0, title_v: 0, draft_v: 1 });
    assert_eq!(draft_only.draft_json, Some(doc("just a draft").as_object().cloned()));

    assert!(r.chats_to_add_or_update.iter().all(|e| e.messages.is_none()), "no immediate-view chat, no messages");
}

#[tokio::test]
async fn explicit_null_draft_is_on_the_wire() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut alice, _) = server.connect(&token, "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("x")).await;
    // A bare WebSocket, to read the frame's text rather than its typed decoding.
    let mut request = server.url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.headers_mut().insert("x-device-id", "laptop".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let frame = r#"{"type":"initial_sync_request","payload":{"chat_versions":{}},"request_id":"s"}"#;
    ws.send(Message::text(frame)).await.unwrap();
    let raw: Value = loop {
        let Message::Text(t) = ws.next().await.unwrap().unwrap() else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["request_id"] == "s" {
            break v;
        }
    };
    assert_eq!(raw["type"], "initial_sync_response", "{raw}");
    let e = &raw["payload"]["chats_to_add_or_update"][0];
    assert_eq!(e.get("draft_json"), Some(&Value::Null), "an explicit null, not an absent member: {e}");
    assert_eq!(e["title"], json!(""));
    assert!(e.get("messages").is_none(), "{e}");
}

#[tokio::test]
async fn server_chat_order_is_most_recent_first_and_titles_do_not_reorder_existing_chats() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    // Warm the cache first, so the order must also be right when served from it.
    sync_all(&mut alice).await;
    for chat in ["c1", "c2", "c3"] {
        add_message(&mut alice, chat, "m1", json!("x")).await;
        next_millisecond().await;
    }
    let r = sync_all(&mut alice).await;
    assert_eq!(ids(&r.server_chat_order), ["c3", "c2", "c1"]);

    // A title on the oldest chat does not move it; a draft or a message does.
    set_title(&mut alice, "c1", "renamed").await;
    next_millisecond().await;
    assert_eq!(ids(&sync_all(&mut alice).await.server_chat_order), ["c3", "c2", "c1"]);
    set_draft(&mut alice, "c1", doc("d")).await;
    next_millisecond().await;
    assert_eq!(ids(&sync_all(&mut alice).await.server_chat_order), ["c1", "c3", "c2"]);
    add_message(&mut alice, "c2", "m2", json!("x")).await;
    let r = sync_all(&mut alice).await;
    assert_eq!(ids(&r.server_chat_order), ["c2", "c1", "c3"]);

    // The order agrees with the reported timestamps.
    let stamps: Vec<i64> =
        r.server_chat_order.iter().map(|id| entry(&r, id.as_str()).unwrap().last_edited_overall_timestamp).collect();
    assert!(stamps.windows(2).all(|w| w[0] >= w[1]), "{stamps:?}");
}

#[tokio::test]
async fn a_title_on_an_existing_chat_does_not_change_its_last_edited_timestamp() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let stamp = add_message(&mut alice, "c1", "m1", json!("x")).await.new_last_edited_overall_timestamp;
    // Wait for the server clock to reach the next second, so a title that moved the timestamp would show.
    while now_secs() <= stamp {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set_title(&mut alice, "c1", "renamed").await;
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.last_edited_overall_timestamp, stamp);
    // A draft does move it.
    let drafted = set_draft(&mut alice, "c1", doc("d")).await.last_edited_overall_timestamp;
    assert!(drafted > stamp, "{drafted} > {stamp}");
    assert_eq!(chat_state(&mut alice, "c1").await.last_edited_overall_timestamp, drafted);
}

#[tokio::test]
async fn a_stale_client_gets_only_the_newer_components_and_up_to_date_chats_are_omitted() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for chat in ["t", "d", "m", "same"] {
        set_title(&mut alice, chat, "title 1").await;
        set_draft(&mut alice, chat, doc("draft 1")).await;
        add_message(&mut alice, chat, "m1", json!("x")).await;
    }
    let have = json!({ "messages_v": 1, "title_v": 1, "draft_v": 1 });
    set_title(&mut alice, "t", "title 2").await;
    set_draft(&mut alice, "d", doc("draft 2")).await;
    add_message(&mut alice, "m", "m2", json!("y")).await;

    let r = sync_with(&mut alice, json!({ "t": have, "d": have, "m": have, "same": have }), None).await;
    assert!(r.chat_ids_to_delete.is_empty());
    assert_eq!(r.chats_to_add_or_update.len(), 3, "{r:?}");
    assert!(entry(&r, "same").is_none(), "an up-to-date chat is omitted");
    assert_eq!(r.server_chat_order.len(), 4, "but still in the order");

    let t = entry(&r, "t").unwrap();
    assert_eq!(t.kind, ChatChangeKind::UpdatedChat);
    assert_eq!(t.title.as_deref(), Some("title 2"));
    assert_eq!(t.draft_json, None, "draft not newer: absent");
    assert_eq!(t.versions, Versions { messages_v: 1, title_v: 2, draft_v: 1 });

    let d = entry(&r, "d").unwrap();
    assert_eq!(d.kind, ChatChangeKind::UpdatedChat);
    assert_eq!(d.title, None, "title not newer: absent");
    assert_eq!(d.draft_json, Some(doc("draft 2").as_object().cloned()));
    assert_eq!(d.versions.draft_v, 2);

    let m = entry(&r, "m").unwrap();
    assert_eq!((m.title.as_ref(), m.draft_json.as_ref()), (None, None));
    assert_eq!(m.versions.messages_v, 2);
    assert!(m.messages.is_none(), "messages only for the immediate-view chat");
}

#[tokio::test]
async fn a_missing_component_version_counts_as_minus_one() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("x")).await; // versions 1/0/0
    let r = sync_with(&mut alice, json!({ "c1": { "messages_v": 1 } }), None).await;
    let e = entry(&r, "c1").expect("title_v 0 and draft_v 0 are newer than -1");
    assert_eq!(e.kind, ChatChangeKind::UpdatedChat);
    assert_eq!(e.title.as_deref(), Some(""));
    assert_eq!(e.draft_json, Some(None));
    let r = sync_with(&mut alice, json!({ "c1": { "messages_v": 1, "title_v": 0, "draft_v": 0 } }), None).await;
    assert!(r.chats_to_add_or_update.is_empty(), "{r:?}");
}

#[tokio::test]
async fn deleted_foreign_and_unknown_ids_are_in_chat_ids_to_delete_and_foreign_chats_never_leak() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut alice, "mine", "alice").await;
    set_title(&mut alice, "gone", "deleted").await;
    expect_msg!(alice.request(&delete_chat("gone")).await.unwrap(), ChatDeleted);
    set_title(&mut bob, "bobs", "bob's secret").await;
    set_draft(&mut bob, "bobs", doc("bob's draft")).await;
    let bob_before = chat_state(&mut bob, "bobs").await;

    let v = json!({ "messages_v": 0, "title_v": 0, "draft_v": 0 });
    let r = sync_with(&mut alice, json!({ "mine": v, "gone": v, "bobs": v, "never": v }), Some("bobs")).await;
    let mut deleted = ids(&r.chat_ids_to_delete);
    deleted.sort();
    assert_eq!(deleted, ["bobs", "gone", "never"]);
    assert_eq!(ids(&r.server_chat_order), ["mine"]);
    assert_eq!(r.chats_to_add_or_update.len(), 1);
    assert_eq!(r.chats_to_add_or_update[0].chat_id.as_str(), "mine");
    assert!(r.chats_to_add_or_update[0].messages.is_none(), "the foreign immediate-view chat gives nothing");

    assert_eq!(chat_state(&mut bob, "bobs").await, bob_before);
}

/// A cached list that lacks a chat the device names (here made stale by hand; in a cluster, a node that
/// has not noticed a gap in the bus yet) must not have the device delete a chat that exists: the list is
/// read again from the store, which tells a chat gone for good from one the cache missed.
#[tokio::test]
async fn a_chat_the_cached_list_lacks_is_asked_of_the_store_before_the_device_is_told_to_delete_it() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for chat in ["mine", "missed", "gone"] {
        set_title(&mut alice, chat, chat).await;
    }
    expect_msg!(alice.request(&delete_chat("gone")).await.unwrap(), ChatDeleted);
    let cache = &server.ctx.cache;
    let cached = cache.chats("alice").await.expect("alice's list is cached");
    let token = cache.begin_load("alice").await;
    let stale = cached.into_iter().filter(|c| c.chat_id != "missed").collect();
    assert!(cache.put_chats("alice", token, stale).await, "the stale list is in place");

    let v = json!({ "messages_v": 0, "title_v": 1, "draft_v": 0 });
    let r = sync_with(&mut alice, json!({ "mine": v, "missed": v, "gone": v }), None).await;
    assert_eq!(ids(&r.chat_ids_to_delete), ["gone"], "only the chat deleted in the store");
    let mut order = ids(&r.server_chat_order);
    order.sort();
    assert_eq!(order, ["mine", "missed"]);
    assert!(r.chats_to_add_or_update.is_empty(), "the device is up to date: {r:?}");
    let refreshed = cache.chats("alice").await.expect("the store's list is cached again");
    assert!(refreshed.iter().any(|c| c.chat_id == "missed"), "the cache holds the chat again");
}

#[tokio::test]
async fn the_immediate_view_chat_comes_first_with_exactly_the_messages_the_client_lacks() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for i in 1..=4 {
        add_message(&mut alice, "view", &format!("m{i}"), json!(format!("text {i}"))).await;
    }
    next_millisecond().await;
    add_message(&mut alice, "other", "m1", json!("newer chat")).await;
    next_millisecond().await;
    set_draft(&mut alice, "third", doc("newest")).await;

    let r =
        sync_with(&mut alice, json!({ "view": { "messages_v": 2, "title_v": 0, "draft_v": 0 } }), Some("view")).await;
    assert_eq!(ids(&r.server_chat_order), ["third", "other", "view"]);
    let first = &r.chats_to_add_or_update[0];
    assert_eq!(first.chat_id.as_str(), "view", "the immediate-view chat comes first");
    let messages = first.messages.as_ref().expect("messages for the immediate-view chat");
    assert_eq!(seqs(messages), [3, 4]);
    assert_eq!(messages[0].content, text("text 3"));
    assert_eq!(messages[1].message_id.as_str(), "m4");
    assert_eq!(first.versions.messages_v, 4);
    assert!(r.chats_to_add_or_update[1..].iter().all(|e| e.messages.is_none()));
    assert_eq!(r.chats_to_add_or_update.len(), 3);

    // New to the client: all its messages.
    let r = sync_with(&mut alice, json!({}), Some("view")).await;
    assert_eq!(r.chats_to_add_or_update[0].chat_id.as_str(), "view");
    assert_eq!(seqs(r.chats_to_add_or_update[0].messages.as_ref().unwrap()), [1, 2, 3, 4]);

    // Up to date: not listed, and no other entry carries messages.
    let r =
        sync_with(&mut alice, json!({ "view": { "messages_v": 4, "title_v": 0, "draft_v": 0 } }), Some("view")).await;
    assert!(entry(&r, "view").is_none());
    assert!(r.chats_to_add_or_update.iter().all(|e| e.messages.is_none()));
}

#[tokio::test]
async fn the_immediate_view_messages_are_at_most_one_page_oldest_first() {
    let server = TestServer::start_with(|c| c.max_page_messages = 2).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for i in 1..=5 {
        add_message(&mut alice, "view", &format!("m{i}"), json!("x")).await;
    }
    let r =
        sync_with(&mut alice, json!({ "view": { "messages_v": 1, "title_v": 0, "draft_v": 0 } }), Some("view")).await;
    assert_eq!(seqs(r.chats_to_add_or_update[0].messages.as_ref().unwrap()), [2, 3]);
}

#[tokio::test]
async fn more_than_10000_chat_versions_is_an_initial_sync_error_limit_exceeded() {
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 1 << 20;
        c.max_reply_bytes = 2 << 20;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "mine", "t").await;
    let frame = |n: usize| {
        let entries: Vec<String> = (0..n).map(|i| format!(r#""x{i}":{{}}"#)).collect();
        format!(
            r#"{{"type":"initial_sync_request","payload":{{"chat_versions":{{{}}}}},"request_id":"big"}}"#,
            entries.join(",")
        )
    };
    let (err, request_id) = sync_error(&mut alice, frame(10_001)).await;
    assert_eq!(err.code, ErrorCode::LimitExceeded);
    assert!(err.message.contains("chat_versions"), "{err:?}");
    assert_eq!(request_id.as_deref(), Some("big"));

    // Exactly 10,000 is accepted: none of them are alice's.
    alice.send_text(frame(10_000)).await.unwrap();
    let r = expect_msg!(alice.recv_reply("big").await.unwrap(), InitialSyncResponse);
    assert_eq!(r.chat_ids_to_delete.len(), 10_000);
    assert_eq!(ids(&r.server_chat_order), ["mine"]);
}

#[tokio::test]
async fn a_malformed_initial_sync_request_is_an_initial_sync_error_invalid_payload() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let cases = [
        r#"{"type":"initial_sync_request","payload":{},"request_id":"s1"}"#,
        r#"{"type":"initial_sync_request","payload":{"chat_versions":[]},"request_id":"s1"}"#,
        r#"{"type":"initial_sync_request","payload":{"chat_versions":{"bad id":{}}},"request_id":"s1"}"#,
        r#"{"type":"initial_sync_request","payload":{"chat_versions":{"c1":{"title_v":"one"}}},"request_id":"s1"}"#,
        r#"{"type":"initial_sync_request","payload":{"chat_versions":{},"immediate_view_chat_id":"a/b"},"request_id":"s1"}"#,
    ];
    for frame in cases {
        alice.send_text(frame).await.unwrap();
        let m = alice.recv().await.unwrap();
        assert_eq!(m.request_id.as_deref(), Some("s1"), "{frame}");
        let err = match &m.message {
            ServerMessage::InitialSyncError(e) => e.clone(),
            other => panic!("{frame}: expected initial_sync_error, got {other:?}"),
        };
        assert_eq!(err.code, ErrorCode::InvalidPayload, "{frame}");
        assert!(!err.message.is_empty());
    }
    assert_quiet(&mut alice).await;
}

// ---------------------------------------------------------------- warm-up and cache status

/// Waits until the server has seen `user`'s connections close and dropped their cache.
async fn wait_until_evicted(server: &TestServer, user: &str) {
    while server.ctx.hub.connection_count() > 0 || server.ctx.cache.is_primed(user).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn warm_up_announces_the_most_recent_chat_then_cache_primed() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut first, _) = server.connect(&token, "laptop").await;
    add_message(&mut first, "older", "m1", json!("x")).await;
    next_millisecond().await;
    set_draft(&mut first, "newest", doc("d")).await;
    next_millisecond().await;
    set_title(&mut first, "older", "a title does not count").await;
    first.close().await.unwrap();
    wait_until_evicted(&server, "alice").await;

    let (mut second, _) = server.connect_raw(&token, "laptop").await;
    let ready = expect_msg!(second.recv().await.unwrap(), PriorityChatReady);
    assert_eq!(ready.chat_id.as_str(), "newest");
    let primed = second.recv().await.unwrap();
    assert_eq!(primed.request_id, None);
    assert_eq!(expect_msg!(primed, CachePrimed).status, "full_sync_ready");
    let status = expect_msg!(second.request(&cache_status()).await.unwrap(), CacheStatusResponse);
    assert!(status.is_primed);
    assert_quiet(&mut second).await;
}

#[tokio::test]
async fn warm_up_for_a_user_without_chats_sends_only_cache_primed() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect_raw(&token, "laptop").await;
    let first = c.recv().await.unwrap();
    assert_eq!(expect_msg!(first, CachePrimed).status, "full_sync_ready");
    assert!(expect_msg!(c.request(&cache_status()).await.unwrap(), CacheStatusResponse).is_primed);
    assert_quiet(&mut c).await;
}

#[tokio::test]
async fn warm_up_events_go_only_to_the_warming_users_connections() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let bob_token = server.user_token("bob").await;
    let (mut bob, _) = server.connect_raw(&bob_token, "phone").await;
    expect_msg!(bob.recv().await.unwrap(), CachePrimed);
    let (mut alice, _) = server.connect_raw(&token, "laptop").await;
    expect_msg!(alice.recv().await.unwrap(), CachePrimed);
    assert_quiet(&mut bob).await;
    // Once primed, a second connection of alice starts no new warm-up.
    let (mut tab2, _) = server.connect_raw(&token, "laptop").await;
    assert_quiet(&mut tab2).await;
    assert_quiet(&mut alice).await;
}

#[tokio::test]
async fn request_cache_status_reports_primed_after_warm_up_and_ignores_payload_fields() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect_raw(&token, "laptop").await;
    expect_msg!(c.recv().await.unwrap(), CachePrimed);
    let reply = request_raw(&mut c, "request_cache_status", json!({ "unknown": 1 })).await;
    assert_eq!(expect_msg!(reply, CacheStatusResponse), CacheStatusResponse { is_primed: true });
}
