//! Shared helpers for the chat-sync integration tests (`chat_sync.rs`, `chat_messages.rs`,
//! `multi_device.rs`, `offline_sync.rs`, `initial_sync.rs`, `persistence.rs`): message builders,
//! reply extractors, and round trips that collect a request's replies.
#![allow(dead_code, unused_macros)]

/// Takes the payload of an expected server message out of an `Incoming`, or panics naming what came.
macro_rules! expect_msg {
    ($incoming:expr, $variant:ident) => {{
        let incoming: &chatsync_protocol::Incoming = &$incoming;
        match &incoming.message {
            chatsync_protocol::ServerMessage::$variant(p) => p.clone(),
            other => panic!("expected {}, got {:?}", stringify!($variant), other),
        }
    }};
}

use crate::common::TestServer;
use chatsync_client::Client;
use chatsync_protocol::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// Builds a typed client message from its wire type and JSON payload.
pub fn msg(kind: &str, payload: Value) -> ClientMessage {
    serde_json::from_value(json!({ "type": kind, "payload": payload }))
        .unwrap_or_else(|e| panic!("test bug: bad {kind} payload: {e}"))
}

pub fn ping() -> ClientMessage {
    ClientMessage::Ping(Empty {})
}

pub fn cache_status() -> ClientMessage {
    ClientMessage::RequestCacheStatus(Empty {})
}

pub fn title(chat: &str, t: &str) -> ClientMessage {
    msg("update_title", json!({ "chat_id": chat, "new_title": t }))
}

/// `update_draft` with any draft value (an object, or `null` to clear).
pub fn draft(chat: &str, d: Value) -> ClientMessage {
    msg("update_draft", json!({ "chat_id": chat, "draft_json": d }))
}

pub fn delete_draft(chat: &str) -> ClientMessage {
    msg("delete_draft", json!({ "chat_id": chat }))
}

pub fn delete_chat(chat: &str) -> ClientMessage {
    msg("delete_chat", json!({ "chat_id": chat }))
}

/// `chat_message_added` with just an id and content (a JSON string or object).
pub fn message(chat: &str, id: &str, content: Value) -> ClientMessage {
    msg("chat_message_added", json!({ "chat_id": chat, "message": { "message_id": id, "content": content } }))
}

/// `chat_message_added` with the full message object given.
pub fn message_full(chat: &str, message: Value) -> ClientMessage {
    msg("chat_message_added", json!({ "chat_id": chat, "message": message }))
}

pub fn get_messages(chat: &str, after_seq: u64, limit: Option<u32>) -> ClientMessage {
    let mut p = json!({ "chat_id": chat, "after_seq": after_seq });
    if let Some(l) = limit {
        p["limit"] = json!(l);
    }
    msg("get_chat_messages", p)
}

pub fn batch(ids: &[&str]) -> ClientMessage {
    msg("request_chat_content_batch", json!({ "chat_ids": ids }))
}

pub fn offline(changes: Value) -> ClientMessage {
    msg("sync_offline_changes", json!({ "changes": changes }))
}

/// `initial_sync_request` with `chat_versions` as JSON.
pub fn sync_request(versions: Value, immediate: Option<&str>) -> ClientMessage {
    let mut p = json!({ "chat_versions": versions });
    if let Some(i) = immediate {
        p["immediate_view_chat_id"] = json!(i);
    }
    msg("initial_sync_request", p)
}

/// A Tiptap document with one paragraph of `text`.
pub fn doc(text: &str) -> Value {
    json!({ "type": "doc", "content": [{ "type": "paragraph", "content": [{ "type": "text", "text": text }] }] })
}

/// An offline title change.
pub fn off_title(change_id: &str, chat: &str, value: &str, version_before_edit: i64) -> Value {
    json!({ "change_id": change_id, "chat_id": chat, "type": "title", "value": value,
            "version_before_edit": version_before_edit })
}

/// An offline draft change (`value` an object or `null`).
pub fn off_draft(change_id: &str, chat: &str, value: Value, version_before_edit: i64) -> Value {
    json!({ "change_id": change_id, "chat_id": chat, "type": "draft", "value": value,
            "version_before_edit": version_before_edit })
}

/// An offline draft deletion.
pub fn off_delete_draft(change_id: &str, chat: &str, version_before_edit: i64) -> Value {
    json!({ "change_id": change_id, "chat_id": chat, "type": "delete_draft", "value": null,
            "version_before_edit": version_before_edit })
}

static RAW_IDS: AtomicU64 = AtomicU64::new(0);

/// Sends `{"type","payload","request_id"}` as raw text (so the payload may be malformed) and returns the
/// reply carrying that request id.
pub async fn request_raw(c: &mut Client, kind: &str, payload: Value) -> Incoming {
    let id = format!("raw{}", RAW_IDS.fetch_add(1, Ordering::Relaxed));
    let frame = json!({ "type": kind, "payload": payload, "request_id": id });
    c.send_text(frame.to_string()).await.unwrap();
    c.recv_reply(&id).await.unwrap()
}

/// The `error` payload of a reply.
pub fn error_of(m: &Incoming) -> ErrorPayload {
    expect_msg!(m, Error)
}

/// Asserts `m` is an `error` with `code`; when `field` is given, the error's `field` member is exactly it
/// (and, for `invalid_payload`, its message names it). Returns the error.
pub fn assert_error(m: &Incoming, code: ErrorCode, field: Option<&str>) -> ErrorPayload {
    let e = error_of(m);
    assert_eq!(e.code, code, "{e:?}");
    assert!(!e.message.is_empty(), "{e:?}");
    if let Some(f) = field {
        assert_eq!(e.field.as_deref(), Some(f), "{e:?}");
        if code == ErrorCode::InvalidPayload {
            assert!(e.message.contains(f), "the message should name `{f}`: {e:?}");
        }
    }
    e
}

/// Asserts a `limit_exceeded` error whose `field` is `field` and whose message names `limit`.
pub fn assert_limit(m: &Incoming, field: &str, limit: &str) -> ErrorPayload {
    let e = assert_error(m, ErrorCode::LimitExceeded, Some(field));
    assert!(e.message.contains(limit), "the message should name the limit `{limit}`: {e:?}");
    e
}

/// Asserts a `not_found` error.
pub fn assert_not_found(m: &Incoming) {
    assert_error(m, ErrorCode::NotFound, None);
}

/// Proves nothing is pending on `c`: a ping round trip answers with a pong and nothing was received
/// before it (everything queued for this connection before the ping arrives first).
pub async fn assert_quiet(c: &mut Client) {
    let reply = c.request(&ping()).await.unwrap();
    assert_eq!(reply.message, ServerMessage::Pong(Empty {}));
    assert_eq!(c.buffered(), 0, "unexpected messages: {:?}", drain(c).await);
}

/// Takes everything buffered (for failure messages).
async fn drain(c: &mut Client) -> Vec<Incoming> {
    let mut out = Vec::new();
    while c.buffered() > 0 {
        out.push(c.recv().await.unwrap());
    }
    out
}

/// Initial sync with the given client versions.
pub async fn sync_with(c: &mut Client, versions: Value, immediate: Option<&str>) -> InitialSyncResponse {
    let reply = c.request(&sync_request(versions, immediate)).await.unwrap();
    expect_msg!(reply, InitialSyncResponse)
}

/// Initial sync as a brand-new client: the whole state of the user.
pub async fn sync_all(c: &mut Client) -> InitialSyncResponse {
    sync_with(c, json!({}), None).await
}

/// The entry for `chat` in an initial sync response.
pub fn entry<'a>(r: &'a InitialSyncResponse, chat: &str) -> Option<&'a ChatUpdate> {
    r.chats_to_add_or_update.iter().find(|e| e.chat_id.as_str() == chat)
}

/// The owner's full view of one chat (from a fresh initial sync); panics if the chat is not listed.
pub async fn chat_state(c: &mut Client, chat: &str) -> ChatUpdate {
    let r = sync_all(c).await;
    entry(&r, chat).unwrap_or_else(|| panic!("{chat} not in {r:?}")).clone()
}

/// Whether the user's initial sync lists `chat` anywhere.
pub async fn lists_chat(c: &mut Client, chat: &str) -> bool {
    let r = sync_all(c).await;
    entry(&r, chat).is_some() || r.server_chat_order.iter().any(|id| id.as_str() == chat)
}

pub async fn set_title(c: &mut Client, chat: &str, t: &str) -> ChatTitleUpdated {
    let reply = c.request(&title(chat, t)).await.unwrap();
    expect_msg!(reply, ChatTitleUpdated)
}

pub async fn set_draft(c: &mut Client, chat: &str, d: Value) -> DraftUpdateConfirmed {
    let reply = c.request(&draft(chat, d)).await.unwrap();
    expect_msg!(reply, DraftUpdateConfirmed)
}

pub async fn add_message(c: &mut Client, chat: &str, id: &str, content: Value) -> ChatMessageConfirmed {
    let reply = c.request(&message(chat, id, content)).await.unwrap();
    expect_msg!(reply, ChatMessageConfirmed)
}

/// Every message of a chat (one page of at most 500).
pub async fn all_messages(c: &mut Client, chat: &str) -> ChatMessagesResponse {
    let reply = c.request(&get_messages(chat, 0, None)).await.unwrap();
    expect_msg!(reply, ChatMessagesResponse)
}

/// Sends `sync_offline_changes` and collects, in order, everything SELF receives up to and including
/// `offline_sync_complete` (SELF's copies of the broadcasts carry the same request id).
pub async fn offline_round(c: &mut Client, changes: Value) -> (Vec<Incoming>, OfflineSyncComplete) {
    let id = format!("off{}", RAW_IDS.fetch_add(1, Ordering::Relaxed));
    c.send(&offline(changes), Some(&id)).await.unwrap();
    let mut before = Vec::new();
    loop {
        let m = c.recv().await.unwrap();
        if let ServerMessage::OfflineSyncComplete(done) = &m.message {
            assert_eq!(m.request_id.as_deref(), Some(id.as_str()));
            return (before, done.clone());
        }
        before.push(m);
    }
}

/// Creates `user` and connects one device.
pub async fn new_user(server: &TestServer, user: &str, device: &str) -> Client {
    let token = server.user_token(user).await;
    server.connect(&token, device).await.0
}

/// Connects another device of an existing user (a fresh session: a session is bound to one device).
pub async fn another_device(server: &TestServer, user: &str, device: &str) -> Client {
    let token = server.token(user).await;
    server.connect(&token, device).await.0
}

/// The server clock, unix seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

pub fn ids(list: &[ChatId]) -> Vec<&str> {
    list.iter().map(ChatId::as_str).collect()
}

pub fn text(s: &str) -> MessageContent {
    MessageContent::Text(s.to_owned())
}

/// The commit window at work, on any backend: alice's write A (title of chat "a") reaches the idle writer,
/// which then waits the window (made long here: 2 s) before committing; write B (chat "b", from a second
/// device), sent once the writer has taken A, joins A's transaction. With no window (0), A would be
/// committing alone by then and B would get a transaction of its own. Leaves both chats written.
pub async fn a_second_write_joins_the_first_in_the_commit_window(server: &TestServer) {
    let batches = || server.ctx.chats.batches_begun().expect("the store has a writer");
    let mut c = new_user(server, "alice", "laptop").await;
    set_title(&mut c, "a", "v1").await;
    set_title(&mut c, "b", "v1").await;
    let mut other = another_device(server, "alice", "phone").await;
    server.ctx.chats.set_commit_window(std::time::Duration::from_secs(2));
    let before = batches();
    let first = tokio::spawn(async move { c.request(&title("a", "v2")).await.unwrap() });
    for _ in 0..2000 {
        if batches() > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(batches(), before + 1, "the writer took A and is waiting the window");
    let second = other.request(&title("b", "v2")).await.unwrap();
    expect_msg!(first.await.unwrap(), ChatTitleUpdated);
    expect_msg!(second, ChatTitleUpdated);
    assert_eq!(batches(), before + 1, "B shared A's transaction");
}
