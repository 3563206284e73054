//! Messages from other senders (SERVER_API.md section 3), unread counts and `mark_read` (PROTOCOL.md):
//! `POST /v1/api/users/{user_id}/chats/{chat_id}/messages` over real HTTP, seen by the user's devices over
//! real WebSockets; every status code; the read marker across devices; the cross-user cases.

mod common;
#[macro_use]
mod sync_util;

use chatsync_protocol::*;
use common::{Api, TestServer};
use serde_json::{json, Value};
use sync_util::*;

fn error_code(body: &Value) -> (&str, Option<&str>) {
    (
        body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}")),
        body["error"]["field"].as_str(),
    )
}

async fn post(api: &Api, user: &str, chat: &str, body: Value) -> (u16, Value) {
    api.post(&format!("/users/{user}/chats/{chat}/messages"), body).await
}

fn mark_read(chat: &str, seq: u64) -> ClientMessage {
    msg("mark_read", json!({"chat_id": chat, "seq": seq}))
}

#[tokio::test]
async fn a_backend_message_is_stored_and_reaches_every_device() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;

    let body = json!({"message_id": "a1", "sender_name": "assistant", "content": {"text": "Hello!"},
                      "created_at": "2026-01-02T03:04:05Z"});
    let (status, reply) = post(&api, "alice", "c1", body.clone()).await;
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply, json!({"chat_id": "c1", "message_id": "a1", "seq": 1, "messages_v": 1, "duplicate": false}));
    for device in [&mut phone, &mut laptop] {
        let event = expect_msg!(device.recv().await.unwrap(), ChatMessageAdded);
        assert_eq!(event.chat_id.as_str(), "c1");
        assert_eq!(event.message.sender_name, "assistant");
        assert_eq!(event.message.seq, 1);
        assert_eq!(event.message.created_at, "2026-01-02T03:04:05.000Z");
        assert_eq!(serde_json::to_value(&event.message.content).unwrap(), json!({"text": "Hello!"}));
        assert_eq!(event.versions.messages_v, 1);
    }
    // The chat was created for alice; the message is in her history with its sender.
    let state = chat_state(&mut phone, "c1").await;
    assert_eq!(state.unread_count, 1);
    let page = all_messages(&mut phone, "c1").await;
    assert_eq!(page.messages[0].sender_name, "assistant");

    // A repeated message_id: 200, the original's seq, nothing broadcast.
    let (status, reply) = post(&api, "alice", "c1", body).await;
    assert_eq!(status, 200);
    assert_eq!((reply["seq"].clone(), reply["duplicate"].clone()), (json!(1), json!(true)));
    assert_quiet(&mut laptop).await;

    // A string content, default time.
    let (status, reply) =
        post(&api, "alice", "c1", json!({"message_id": "a2", "sender_name": "bot", "content": "hi"})).await;
    assert_eq!((status, reply["seq"].clone()), (201, json!(2)));
    let event = expect_msg!(laptop.recv().await.unwrap(), ChatMessageAdded);
    assert_eq!(event.message.content, MessageContent::Text("hi".into()));
}

#[tokio::test]
async fn every_error_of_posting_a_message() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut alice = new_user(&server, "alice", "phone").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut bob, "bobs", "Bob's").await;
    set_title(&mut alice, "gone", "x").await;
    alice.request(&delete_chat("gone")).await.unwrap();
    let ok = |extra: Value| {
        let mut body = json!({"message_id": "m1", "sender_name": "assistant", "content": "x"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };

    // Another user's chat, a deleted chat, an unknown user: 404, and nothing reaches bob.
    for (user, chat) in [("alice", "bobs"), ("alice", "gone"), ("nobody", "c1")] {
        let (status, body) = post(&api, user, chat, ok(json!({}))).await;
        assert_eq!((status, error_code(&body).0), (404, "not_found"), "{user}/{chat}");
    }
    assert_quiet(&mut bob).await;
    assert_eq!(all_messages(&mut bob, "bobs").await.messages.len(), 0);

    let cases = [
        (json!({"sender_name": "user"}), "sender_name"),
        (json!({"sender_name": "bad name"}), "sender_name"),
        (json!({"message_id": "bad id!"}), "message_id"),
        (json!({"content": 5}), "content"),
        (json!({"content": [1]}), "content"),
        (json!({"created_at": "yesterday"}), "created_at"),
        (json!({"created_at": "1969-12-31T23:59:59Z"}), "created_at"),
        // Year 9999 at an offset west of UTC is year 10000 in UTC, which the wire cannot carry.
        (json!({"created_at": "9999-12-31T23:59:59-00:01"}), "created_at"),
        (json!({"extra": 1}), "extra"),
    ];
    for (extra, field) in cases {
        let (status, body) = post(&api, "alice", "c1", ok(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(error_code(&body), ("invalid_payload", Some(field)), "{extra}: {body}");
    }
    let (status, body) = post(&api, "alice", "bad%20chat", ok(json!({}))).await;
    assert_eq!((status, error_code(&body)), (400, ("invalid_payload", Some("chat_id"))));
    let (status, body) = post(&api, "alice", "c1", json!({"message_id": "m1", "sender_name": "a"})).await;
    assert_eq!((status, error_code(&body)), (400, ("invalid_payload", Some("content"))), "content is required");
    let big = "x".repeat(Limits::MAX_MESSAGE_CONTENT_BYTES);
    let (status, body) = post(&api, "alice", "c1", ok(json!({"content": big}))).await;
    assert_eq!((status, error_code(&body)), (422, ("limit_exceeded", Some("content"))));
    assert!(!lists_chat(&mut alice, "c1").await, "no failed request created the chat");
}

#[tokio::test]
async fn unread_counts_follow_other_senders_and_the_read_marker_syncs_across_devices() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;

    for (id, sender) in [("a1", "assistant"), ("a2", "assistant")] {
        let (status, _) =
            post(&api, "alice", "c1", json!({"message_id": id, "sender_name": sender, "content": "x"})).await;
        assert_eq!(status, 201);
    }
    add_message(&mut phone, "c1", "u1", json!("thanks")).await; // the user's own: never unread
    let (status, _) =
        post(&api, "alice", "c1", json!({"message_id": "a3", "sender_name": "assistant", "content": "y"})).await;
    assert_eq!(status, 201);
    assert_eq!(chat_state(&mut laptop, "c1").await.unread_count, 3);
    while laptop.buffered() > 0 || phone.buffered() > 0 {
        let _ = if laptop.buffered() > 0 { laptop.recv().await } else { phone.recv().await };
    }
    // drain what is still on the wire
    assert_quiet_after_events(&mut phone).await;
    assert_quiet_after_events(&mut laptop).await;

    // Reading up to seq 2 on the phone: both devices learn the marker and what is left.
    let reply = phone.request(&mark_read("c1", 2)).await.unwrap();
    let update = expect_msg!(reply, ChatReadUpdated);
    assert_eq!((update.read_seq, update.unread_count), (2, 1));
    let update = expect_msg!(laptop.recv().await.unwrap(), ChatReadUpdated);
    assert_eq!((update.read_seq, update.unread_count), (2, 1));
    assert_eq!(chat_state(&mut laptop, "c1").await.unread_count, 1);

    // At or below the marker: SELF only, current values.
    let update = expect_msg!(laptop.request(&mark_read("c1", 1)).await.unwrap(), ChatReadUpdated);
    assert_eq!((update.read_seq, update.unread_count), (2, 1));
    assert_quiet(&mut phone).await;

    // Beyond the end: capped at messages_v.
    let update = expect_msg!(laptop.request(&mark_read("c1", 1000)).await.unwrap(), ChatReadUpdated);
    assert_eq!((update.read_seq, update.unread_count), (4, 0));
    expect_msg!(phone.recv().await.unwrap(), ChatReadUpdated);

    // Another user's chat, an unknown chat, a bad payload.
    assert_not_found(&bob.request(&mark_read("c1", 1)).await.unwrap());
    assert_not_found(&bob.request(&mark_read("nope", 1)).await.unwrap());
    assert_error(
        &request_raw(&mut bob, "mark_read", json!({"chat_id": "c1"})).await,
        ErrorCode::InvalidPayload,
        Some("seq"),
    );
    assert_error(
        &request_raw(&mut bob, "mark_read", json!({"chat_id": "c1", "seq": -1})).await,
        ErrorCode::InvalidPayload,
        Some("seq"),
    );
    assert_quiet(&mut phone).await;

    // The marker and the count survive a restart.
    drop((phone, laptop, bob));
    let server = server.restart().await;
    let mut phone = another_device(&server, "alice", "phone2").await;
    assert_eq!(chat_state(&mut phone, "c1").await.unread_count, 0);

    // Her own chat, once deleted, has no marker to move.
    set_title(&mut phone, "gone", "x").await;
    phone.request(&delete_chat("gone")).await.unwrap();
    assert_not_found(&phone.request(&mark_read("gone", 1)).await.unwrap());
}

/// Reads and drops warm-up and broadcast events until a ping round trip finds nothing pending.
async fn assert_quiet_after_events(c: &mut chatsync_client::Client) {
    loop {
        let reply = c.request(&ping()).await.unwrap();
        if reply.message == ServerMessage::Pong(Empty {}) && c.buffered() == 0 {
            return;
        }
        while c.buffered() > 0 {
            c.recv().await.unwrap();
        }
    }
}

#[tokio::test]
async fn backend_messages_are_encrypted_at_rest() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;
    let secret = "the-assistant-said-something-private";
    let (status, _) =
        post(&api, "alice", "c1", json!({"message_id": "a1", "sender_name": "assistant", "content": secret})).await;
    assert_eq!(status, 201);
    let server_data = server.stop_into_data().await;
    for entry in walkdir(server_data.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "plaintext in {}", entry.display());
    }
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walkdir(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A backend that goes away while its message is being stored (hyper then drops the request's future)
/// does not leave it committed but never broadcast: the request still runs to its end.
#[tokio::test]
async fn a_message_whose_caller_hangs_up_after_the_commit_still_reaches_every_device() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut held = server.ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    let url = format!("{}/users/alice/chats/c1/messages", server.api_base());
    let key = api.key.clone();
    let caller = tokio::spawn(async move {
        let body = json!({"message_id": "a1", "sender_name": "assistant", "content": "hi"});
        reqwest::Client::new().post(url).bearer_auth(key).json(&body).send().await
    });
    held.reached().await;
    caller.abort();
    // Give hyper the time to notice the closed connection and drop the request (without the request's
    // own task this resolves within milliseconds; with it, never).
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), held.abandoned()).await;
    held.release();
    let event = tokio::time::timeout(std::time::Duration::from_secs(10), phone.recv())
        .await
        .expect("the message was committed but never broadcast")
        .unwrap();
    let event = expect_msg!(event, ChatMessageAdded);
    assert_eq!((event.chat_id.as_str(), event.message.sender_name.as_str()), ("c1", "assistant"));
    // The backend's retry is a duplicate of the stored message.
    let (status, reply) =
        post(&api, "alice", "c1", json!({"message_id": "a1", "sender_name": "assistant", "content": "hi"})).await;
    assert_eq!((status, reply["duplicate"].clone()), (200, json!(true)));
}

/// A shutdown does not wait past `shutdown_timeout_secs` (from the signal) for an API request in flight
/// whose caller is still connected: here one held after its commit for good.
#[tokio::test]
async fn shutdown_does_not_wait_past_its_timeout_for_an_api_request_in_flight() {
    let mut server = TestServer::start_with(|c| c.shutdown_timeout_secs = 1).await;
    server.user("alice", false).await;
    let api = server.api().await;
    let mut held = server.ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    let (url, key) = (format!("{}/users/alice/chats/c1/messages", server.api_base()), api.key.clone());
    let caller = tokio::spawn(async move {
        let body = json!({"message_id": "a1", "sender_name": "assistant", "content": "hi"});
        reqwest::Client::new().post(url).bearer_auth(key).json(&body).send().await
    });
    held.reached().await;
    tokio::time::timeout(std::time::Duration::from_secs(60), server.stop())
        .await
        .expect("the shutdown waited for the held request");
    held.release();
    caller.abort();
}
