//! Hostile-client battery (issue 7, item 12): malformed and abusive input against a real server.
//!
//! Every case checks that the attacker gets exactly the documented answer (PROTOCOL.md sections 1, 2,
//! 4 and 8): an `error` (or `initial_sync_error`) with the documented code, `field` and echoed
//! `request_id`, after which the attacker's connection still answers a `ping`; or the documented close
//! code and reason. After each group the server must still accept a new connection, and a bystander
//! (another user, connected throughout) must still complete a write round trip and must have received
//! nothing but its own replies.
//!
//! Invalid UTF-8 and broken WebSocket framing close with 1007 and 1002 (docs/PROTOCOL.md section 8).
//! Where the protocol is silent (`null` for an optional field), the test pins only what any reading
//! requires: the server answers or drops that one connection and nobody else notices.

mod common;
#[macro_use]
mod sync_util;

use chatsync_client::tungstenite::protocol::frame::coding::{Data, OpCode};
use chatsync_client::tungstenite::protocol::frame::Frame;
use chatsync_client::tungstenite::Message;
use chatsync_client::{Client, ClientError, ConnectOptions};
use chatsync_protocol::*;
use common::TestServer;
use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use sync_util::*;

/// The request id every table frame carries (so every answer must echo it).
const RID: &str = "hostile-1";
/// 2^64: one more than the largest u64.
const BEYOND_U64: &str = "18446744073709551616";
/// 2^63: one more than the largest i64.
const BEYOND_I64: &str = "9223372036854775808";
/// Well beyond f64.
const BEYOND_F64: &str = "1e400";
/// Generous bound on any single wait, so that a hang fails with a message instead of a nextest kill.
const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// What the attacker must get back for one frame.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// `error` with this code and, when given, exactly this `field`.
    Error(ErrorCode, Option<&'static str>),
    /// `error` with this code and `field`, and the payload's `chat_id` and `message.message_id` as its
    /// context (an error the handler found in a payload that decoded).
    ErrorAbout(ErrorCode, &'static str),
    /// `initial_sync_error` with this code; its message names the given field.
    SyncError(ErrorCode, &'static str),
    /// A normal reply of this wire type (a boundary value that is accepted).
    Reply(&'static str),
    /// Undocumented (`null` for an optional field): the normal reply of this type, or `invalid_payload`
    /// naming the field. Either way the connection stays usable.
    ReplyOrInvalid(&'static str, &'static str),
}

struct Case {
    name: String,
    frame: String,
    request_id: Option<&'static str>,
    want: Want,
}

/// A case whose frame is a full envelope with `type`, `payload` and the table's request id.
fn req(name: impl Into<String>, kind: &str, payload: Value, want: Want) -> Case {
    let frame = json!({ "type": kind, "payload": payload, "request_id": RID }).to_string();
    Case { name: name.into(), frame, request_id: Some(RID), want }
}

/// A case with a hand-written frame; `request_id` is what must be echoed (only a valid one is).
fn raw(name: impl Into<String>, frame: impl Into<String>, request_id: Option<&'static str>, want: Want) -> Case {
    Case { name: name.into(), frame: frame.into(), request_id, want }
}

/// `payload` with the member at `path` (dotted) replaced by `value`, or removed when `value` is `None`.
fn with(payload: &Value, path: &str, value: Option<Value>) -> Value {
    let mut out = payload.clone();
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap();
    let mut at = &mut out;
    for p in parts {
        at = at.get_mut(p).unwrap_or_else(|| panic!("test bug: no {p} in {payload}"));
    }
    let obj = at.as_object_mut().expect("test bug: parent is not an object");
    match value {
        Some(v) => obj.insert(last.to_owned(), v),
        None => obj.remove(last),
    };
    out
}

/// A frame of type `kind` whose member at `path` is the raw number token `number` (which `json!` could
/// not build: beyond 64 bits, or not representable at all).
fn with_number(kind: &str, payload: &Value, path: &str, number: &str) -> String {
    let frame = json!({ "type": kind, "payload": with(payload, path, Some(json!("__BIG__"))), "request_id": RID });
    frame.to_string().replace("\"__BIG__\"", number)
}

/// The wire type of a server message.
fn wire_type(m: &Incoming) -> String {
    serde_json::to_value(&m.message).unwrap()["type"].as_str().unwrap().to_owned()
}

/// One server with an attacker and a bystander.
struct Arena {
    server: TestServer,
    attacker_token: String,
    attacker: Client,
    /// The connection id of `attacker`.
    attacker_conn: String,
    bystander: Client,
    rounds: u32,
}

impl Arena {
    async fn start() -> Arena {
        Arena::start_with(|_| {}).await
    }

    /// A server with a rate limit high enough for the table (each case costs two frames).
    async fn start_with(tweak: impl FnOnce(&mut chatsync::Config)) -> Arena {
        let server = TestServer::start_with(|c| {
            c.rate_per_sec = 100_000;
            c.rate_burst = 100_000;
            tweak(c);
        })
        .await;
        let attacker_token = server.user_token("mallory").await;
        let (attacker, hello) = server.connect(&attacker_token, "evil").await;
        server.user("carol-probe", false).await;
        let mut bystander = new_user(&server, "bob", "phone").await;
        set_title(&mut bystander, "bob-chat", "before").await;
        Arena { server, attacker_token, attacker, attacker_conn: hello.connection_id, bystander, rounds: 0 }
    }

    /// Another connection of the attacker (same session and device).
    async fn fresh_attacker(&self) -> Client {
        self.server.connect(&self.attacker_token, "evil").await.0
    }

    /// Sends each case on the attacker's connection, checks its answer and that the connection still
    /// answers a ping with nothing else pending; then checks the server's health.
    async fn run(&mut self, cases: Vec<Case>) {
        for case in &cases {
            check_case(&mut self.attacker, case).await;
        }
        self.healthy().await;
    }

    /// The server still accepts a connection, and the bystander still writes and has seen nothing else.
    async fn healthy(&mut self) {
        self.rounds += 1;
        let t = format!("round {}", self.rounds);
        let updated = within("bystander write", set_title(&mut self.bystander, "bob-chat", &t)).await;
        assert_eq!(updated.data.title, t);
        within("bystander ping", assert_quiet(&mut self.bystander)).await;
        let token = self.server.token("carol-probe").await;
        let (mut probe, hello) = within("a new connection", self.server.connect(&token, "probe")).await;
        assert_eq!(hello.user_id, "carol-probe");
        within("probe ping", assert_quiet(&mut probe)).await;
        probe.close().await.unwrap();
    }

    /// Sends `messages` on a new attacker connection and expects the server to close it with `code` and
    /// `reason`. With `or_gone`, a connection that ends without a readable close also passes (a frame
    /// far beyond the limit is never read to its end, so the close may be lost to a TCP reset).
    async fn expect_close(&mut self, name: &str, messages: Vec<Message>, code: u16, reason: &str, or_gone: bool) {
        let mut c = self.fresh_attacker().await;
        for m in messages {
            if c.send_raw(m).await.is_err() {
                break; // the server is already closing; what it said is read below
            }
        }
        match within(name, c.recv_close()).await {
            Ok(close) => assert_eq!(close, (code, reason.to_owned()), "{name}"),
            Err(e) if or_gone && gone(&e) => {}
            Err(e) => panic!("{name}: expected close {code} {reason}, got {e}"),
        }
        self.healthy().await;
    }

    /// Sends `messages` on a new attacker connection and expects the server to end it, by any close or a
    /// dropped connection (undocumented cases: broken WebSocket framing, invalid UTF-8).
    async fn expect_end(&mut self, name: &str, messages: Vec<Message>) -> Option<(u16, String)> {
        let mut c = self.fresh_attacker().await;
        for m in messages {
            if c.send_raw(m).await.is_err() {
                break;
            }
        }
        let end = match within(name, c.recv_close()).await {
            Ok(close) => Some(close),
            Err(e) if gone(&e) => None,
            Err(e) => panic!("{name}: expected the connection to end, got {e}"),
        };
        self.healthy().await;
        end
    }
}

/// Whether a client error means the connection is gone (closed without a close frame, or reset).
fn gone(e: &ClientError) -> bool {
    let s = e.to_string().to_lowercase();
    matches!(e, ClientError::Closed(None)) || s.contains("reset") || s.contains("closed") || s.contains("broken pipe")
}

async fn check_case(c: &mut Client, case: &Case) {
    let name = &case.name;
    c.send_text(case.frame.clone()).await.unwrap_or_else(|e| panic!("{name}: send failed: {e}"));
    let reply = within(name, c.recv()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(reply.request_id.as_deref(), case.request_id, "{name}: request_id of {reply:?}");
    let payload = serde_json::from_str::<Value>(&case.frame).ok().map(|v| v["payload"].clone()).unwrap_or_default();
    let context = |e: &ErrorPayload| {
        assert_eq!(e.chat_id.as_deref(), payload["chat_id"].as_str(), "{name}: the chat is the context: {e:?}");
        let message_id = payload["message"]["message_id"].as_str();
        assert_eq!(e.message_id.as_deref(), message_id, "{name}: the message is the context: {e:?}");
    };
    match case.want {
        Want::ErrorAbout(code, field) => {
            let ServerMessage::Error(e) = &reply.message else { panic!("{name}: expected an error, got {reply:?}") };
            assert_eq!((e.code, e.field.as_deref()), (code, Some(field)), "{name}: {e:?}");
            context(e);
        }
        // A limit is checked by the handler, which knows the chat (and message) the request is about.
        Want::Error(code @ ErrorCode::LimitExceeded, field) if payload["chat_id"].is_string() => {
            let ServerMessage::Error(e) = &reply.message else { panic!("{name}: expected an error, got {reply:?}") };
            assert_eq!((e.code, e.field.as_deref()), (code, field), "{name}: {e:?}");
            context(e);
        }
        Want::Error(code, field) => {
            let ServerMessage::Error(e) = &reply.message else { panic!("{name}: expected an error, got {reply:?}") };
            assert_eq!(e.code, code, "{name}: {e:?}");
            assert!(!e.message.is_empty(), "{name}");
            if let Some(f) = field {
                assert_eq!(e.field.as_deref(), Some(f), "{name}: {e:?}");
                if code == ErrorCode::InvalidPayload {
                    assert!(e.message.contains(f), "{name}: the message should name `{f}`: {e:?}");
                }
            }
        }
        Want::SyncError(code, field) => {
            let ServerMessage::InitialSyncError(e) = &reply.message else {
                panic!("{name}: expected initial_sync_error, got {reply:?}")
            };
            assert_eq!(e.code, code, "{name}: {e:?}");
            assert!(e.message.contains(field), "{name}: the message should name `{field}`: {e:?}");
        }
        Want::Reply(kind) => assert_eq!(wire_type(&reply), kind, "{name}: {reply:?}"),
        Want::ReplyOrInvalid(kind, field) => match &reply.message {
            ServerMessage::Error(e) => {
                assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidPayload, Some(field)), "{name}: {e:?}")
            }
            _ => assert_eq!(wire_type(&reply), kind, "{name}: {reply:?}"),
        },
    }
    within(name, assert_quiet(c)).await;
}

// ---------------------------------------------------------------------------------------------------
// Envelope: syntax, shape, `type`, `payload`, `request_id`.

#[tokio::test]
async fn malformed_envelopes_get_their_documented_errors() {
    use ErrorCode::*;
    let mut arena = Arena::start().await;
    let mut cases = vec![
        raw("not JSON", "{oops", None, Want::Error(InvalidJson, None)),
        raw("truncated JSON", r#"{"type":"ping","request_id":"hostile-1""#, None, Want::Error(InvalidJson, None)),
        raw("empty frame", "", None, Want::Error(InvalidJson, None)),
        raw("whitespace-only frame", " \n\t\r ", None, Want::Error(InvalidJson, None)),
        raw("BOM prefix", "\u{feff}{\"type\":\"ping\"}", None, Want::Error(InvalidJson, None)),
        raw("two objects in one frame", r#"{"type":"ping"}{"type":"ping"}"#, None, Want::Error(InvalidJson, None)),
        raw("NaN literal", r#"{"type":"ping","payload":{"x":NaN}}"#, None, Want::Error(InvalidJson, None)),
        raw("single quotes", "{'type':'ping'}", None, Want::Error(InvalidJson, None)),
        // Valid JSON syntax, but not a string Rust can hold.
        raw("type with a lone surrogate escape", r#"{"type":"\ud800"}"#, None, Want::Error(InvalidMessage, None)),
        raw("JSON array", r#"[{"type":"ping"}]"#, None, Want::Error(InvalidMessage, None)),
        // serde would read an array as the envelope's members in order.
        raw("JSON array of the members", r#"["ping",{},"hostile-1"]"#, None, Want::Error(InvalidMessage, None)),
        raw(
            "JSON array of a write's members",
            r#"["update_title",{"chat_id":"c1","new_title":"x"},"hostile-1"]"#,
            None,
            Want::Error(InvalidMessage, None),
        ),
        raw("JSON string", r#""ping""#, None, Want::Error(InvalidMessage, None)),
        raw("JSON number", "42", None, Want::Error(InvalidMessage, None)),
        raw("JSON null", "null", None, Want::Error(InvalidMessage, None)),
        raw("JSON true", "true", None, Want::Error(InvalidMessage, None)),
        raw("empty object", "{}", None, Want::Error(InvalidMessage, None)),
        raw("type missing", r#"{"payload":{},"request_id":"hostile-1"}"#, Some(RID), Want::Error(InvalidMessage, None)),
        raw("duplicate type", r#"{"type":"ping","type":"teleport"}"#, None, Want::Error(InvalidMessage, None)),
        raw(
            "duplicate request_id",
            r#"{"type":"ping","request_id":"a","request_id":"b"}"#,
            None,
            Want::Error(InvalidMessage, None),
        ),
        raw(
            "duplicate payload",
            r#"{"type":"ping","payload":{},"payload":{}}"#,
            None,
            Want::Error(InvalidMessage, None),
        ),
        raw(
            "unknown type",
            r#"{"type":"teleport","request_id":"hostile-1"}"#,
            Some(RID),
            Want::Error(UnknownType, None),
        ),
        raw("empty type", r#"{"type":"","request_id":"hostile-1"}"#, Some(RID), Want::Error(UnknownType, None)),
        raw(
            "type in capitals",
            r#"{"type":"PING","request_id":"hostile-1"}"#,
            Some(RID),
            Want::Error(UnknownType, None),
        ),
        raw(
            "type with NUL",
            r#"{"type":"ping\u0000","request_id":"hostile-1"}"#,
            Some(RID),
            Want::Error(UnknownType, None),
        ),
        raw(
            "type 20,000 chars",
            format!(r#"{{"type":"{}","request_id":"hostile-1"}}"#, "x".repeat(20_000)),
            Some(RID),
            Want::Error(UnknownType, None),
        ),
        raw(
            "server message type sent by a client",
            r#"{"type":"pong","request_id":"hostile-1"}"#,
            Some(RID),
            Want::Error(UnknownType, None),
        ),
    ];
    for (label, v) in [("number", "5"), ("null", "null"), ("object", "{}"), ("array", "[\"ping\"]"), ("bool", "true")] {
        cases.push(raw(
            format!("type is {label}"),
            format!(r#"{{"type":{v},"request_id":"hostile-1"}}"#),
            Some(RID),
            Want::Error(InvalidMessage, None),
        ));
    }
    for (label, v) in [("string", "\"x\""), ("number", "5"), ("null", "null"), ("array", "[]"), ("bool", "false")] {
        cases.push(raw(
            format!("payload is {label}"),
            format!(r#"{{"type":"ping","payload":{v},"request_id":"hostile-1"}}"#),
            Some(RID),
            Want::Error(InvalidMessage, None),
        ));
    }
    // Every failure of an initial sync is `initial_sync_error`, a malformed envelope's too.
    for (label, v) in [("null", "null"), ("array", "[]"), ("string", "\"x\"")] {
        cases.push(raw(
            format!("initial sync payload is {label}"),
            format!(r#"{{"type":"initial_sync_request","payload":{v},"request_id":"hostile-1"}}"#),
            Some(RID),
            Want::SyncError(InvalidMessage, "payload"),
        ));
    }
    let long = format!("\"{}\"", "r".repeat(65));
    for (label, v) in [
        ("number", "5"),
        ("null", "null"),
        ("object", "{}"),
        ("array", "[\"a\"]"),
        ("empty", "\"\""),
        ("65 chars", long.as_str()),
        ("a control char", r#""a\u0001b""#),
        ("a tab", r#""a\tb""#),
        ("DEL", r#""a\u007fb""#),
        ("non-ASCII", "\"r\u{e9}q\""),
        ("an emoji", "\"\u{1f600}\""),
    ] {
        cases.push(raw(
            format!("request_id is {label}"),
            format!(r#"{{"type":"ping","request_id":{v}}}"#),
            None,
            Want::Error(InvalidMessage, None),
        ));
        // An initial sync's failure is `initial_sync_error` (PROTOCOL.md section 8), a malformed
        // `request_id`'s too: the type is known, and a client waits for one of the initial sync's replies.
        cases.push(raw(
            format!("initial sync request_id is {label}"),
            format!(r#"{{"type":"initial_sync_request","request_id":{v}}}"#),
            None,
            Want::SyncError(InvalidMessage, "request_id"),
        ));
    }
    cases.push(raw(
        "payload string with a lone surrogate escape",
        format!(r#"{{"type":"update_title","payload":{{"chat_id":"m1","new_title":"\ud800"}},"request_id":"{RID}"}}"#),
        Some(RID),
        Want::Error(InvalidPayload, Some("new_title")),
    ));
    // Boundaries that are accepted.
    let rid64: &'static str = Box::leak("q".repeat(64).into_boxed_str());
    cases.push(raw(
        "request_id of 64 chars",
        format!(r#"{{"type":"ping","request_id":"{rid64}"}}"#),
        Some(rid64),
        Want::Reply("pong"),
    ));
    cases.push(raw("payload omitted", r#"{"type":"ping","request_id":"hostile-1"}"#, Some(RID), Want::Reply("pong")));
    cases.push(raw(
        "unknown envelope member",
        r#"{"type":"ping","x":[1,{"y":null}],"request_id":"hostile-1"}"#,
        Some(RID),
        Want::Reply("pong"),
    ));
    arena.run(cases).await;
}

// ---------------------------------------------------------------------------------------------------
// Every field of every client message with a wrong type, with null, and missing.

/// Values of every JSON kind except those `right` lists (`|`-separated: string, integer, float, bool,
/// array, object).
fn wrong_values(right: &str) -> Vec<(&'static str, Value)> {
    let all = [
        ("string", json!("x")),
        ("integer", json!(5)),
        ("float", json!(1.5)),
        ("bool", json!(true)),
        ("array", json!([])),
        ("object", json!({})),
    ];
    all.into_iter().filter(|(k, _)| !right.split('|').any(|r| r == *k)).collect()
}

/// How a field may be present.
#[derive(Clone, Copy, PartialEq)]
enum Presence {
    /// Missing or `null` is `invalid_payload`.
    Required,
    /// Required, but `null` is a meaningful value (`draft_json`).
    Nullable,
    /// May be omitted; `null` is left open by the protocol.
    Optional,
    /// A map entry: `null` is `invalid_payload`, omitting it is just a smaller map.
    Entry,
}

/// For each field: every wrong type, `null`, and (when required) missing.
fn field_cases(
    kind: &'static str,
    base: Value,
    reply: &'static str,
    fields: &[(&'static str, &str, Presence)],
) -> Vec<Case> {
    let mut cases = Vec::new();
    let bad = |field: &'static str| {
        if kind == "initial_sync_request" {
            Want::SyncError(ErrorCode::InvalidPayload, field)
        } else {
            Want::Error(ErrorCode::InvalidPayload, Some(field))
        }
    };
    for &(field, right, presence) in fields {
        for (label, v) in wrong_values(right) {
            cases.push(req(format!("{kind}: {field} is {label}"), kind, with(&base, field, Some(v)), bad(field)));
        }
        let null = match presence {
            Presence::Required | Presence::Entry => bad(field),
            Presence::Nullable => Want::Reply(reply),
            Presence::Optional => Want::ReplyOrInvalid(reply, field),
        };
        cases.push(req(format!("{kind}: {field} is null"), kind, with(&base, field, Some(Value::Null)), null));
        if matches!(presence, Presence::Required | Presence::Nullable) {
            cases.push(req(format!("{kind}: {field} missing"), kind, with(&base, field, None), bad(field)));
        }
    }
    cases
}

#[tokio::test]
async fn every_field_of_every_message_with_a_wrong_type_or_null() {
    let mut arena = Arena::start().await;
    // Chats the attacker owns, so that a well-formed request would succeed.
    set_title(&mut arena.attacker, "m1", "mine").await;
    let mut cases = Vec::new();
    cases.extend(field_cases(
        "initial_sync_request",
        json!({ "chat_versions": { "m1": { "messages_v": 0, "title_v": 0, "draft_v": 0 } }, "immediate_view_chat_id": "m1" }),
        "initial_sync_response",
        &[
            ("chat_versions", "object", Presence::Required),
            ("immediate_view_chat_id", "string", Presence::Optional),
            ("chat_versions.m1", "object", Presence::Entry),
            ("chat_versions.m1.messages_v", "integer", Presence::Optional),
            ("chat_versions.m1.title_v", "integer", Presence::Optional),
            ("chat_versions.m1.draft_v", "integer", Presence::Optional),
        ],
    ));
    cases.extend(field_cases(
        "update_draft",
        json!({ "chat_id": "m1", "draft_json": doc("hi") }),
        "draft_update_confirmed",
        &[("chat_id", "string", Presence::Required), ("draft_json", "object", Presence::Nullable)],
    ));
    cases.extend(field_cases(
        "delete_draft",
        json!({ "chat_id": "m1" }),
        "draft_delete_receipt",
        &[("chat_id", "string", Presence::Required)],
    ));
    cases.extend(field_cases(
        "update_title",
        json!({ "chat_id": "m1", "new_title": "t" }),
        "chat_title_updated",
        &[("chat_id", "string", Presence::Required), ("new_title", "string", Presence::Required)],
    ));
    cases.extend(field_cases(
        "chat_message_added",
        json!({ "chat_id": "m1", "message": { "message_id": "x1", "content": "hi", "timestamp": 1_700_000_000, "temp_id": "t1" } }),
        "chat_message_confirmed",
        &[
            ("chat_id", "string", Presence::Required),
            ("message", "object", Presence::Required),
            ("message.message_id", "string", Presence::Required),
            ("message.timestamp", "integer|float|string", Presence::Optional),
            ("message.temp_id", "integer|float|string", Presence::Optional),
        ],
    ));
    // `content` is an object or a string, `timestamp` a number or a string, `temp_id` a string or a number.
    for (label, v) in [("number", json!(5)), ("bool", json!(true)), ("array", json!(["hi"])), ("null", Value::Null)] {
        let p = json!({ "chat_id": "m1", "message": { "message_id": "x1", "content": v } });
        cases.push(req(
            format!("chat_message_added: message.content is {label}"),
            "chat_message_added",
            p,
            Want::Error(ErrorCode::InvalidPayload, Some("message.content")),
        ));
    }
    cases.push(req(
        "chat_message_added: message.content missing",
        "chat_message_added",
        json!({ "chat_id": "m1", "message": { "message_id": "x1" } }),
        Want::Error(ErrorCode::InvalidPayload, Some("message.content")),
    ));
    cases.extend(field_cases(
        "get_chat_messages",
        json!({ "chat_id": "m1", "after_seq": 0, "limit": 10 }),
        "chat_messages_response",
        &[
            ("chat_id", "string", Presence::Required),
            ("after_seq", "integer", Presence::Optional),
            ("limit", "integer", Presence::Optional),
        ],
    ));
    cases.extend(field_cases(
        "request_chat_content_batch",
        json!({ "chat_ids": ["m1"] }),
        "chat_content_batch_response",
        &[("chat_ids", "array", Presence::Required)],
    ));
    for (label, v) in [("number", json!(5)), ("null", Value::Null), ("array", json!(["m1"])), ("object", json!({}))] {
        cases.push(req(
            format!("request_chat_content_batch: chat_ids[0] is {label}"),
            "request_chat_content_batch",
            json!({ "chat_ids": [v] }),
            Want::Error(ErrorCode::InvalidPayload, Some("chat_ids[0]")),
        ));
    }
    cases.extend(field_cases(
        "delete_chat",
        json!({ "chat_id": "zz-not-there" }),
        "chat_deleted",
        &[("chat_id", "string", Presence::Required)],
    ));
    for kind in ["delete_draft", "delete_chat"] {
        for (label, v) in [("number", json!(5)), ("null", Value::Null)] {
            cases.push(req(
                format!("{kind}: chatId alias is {label}"),
                kind,
                json!({ "chatId": v }),
                Want::Error(ErrorCode::InvalidPayload, Some("chatId")),
            ));
        }
    }
    cases.extend(field_cases(
        "sync_offline_changes",
        json!({ "changes": [] }),
        "offline_sync_complete",
        &[("changes", "array", Presence::Required)],
    ));
    // Payloads for the field-less messages may carry anything (unknown fields are ignored).
    for kind in ["ping", "request_cache_status"] {
        let reply = if kind == "ping" { "pong" } else { "cache_status_response" };
        cases.push(req(
            format!("{kind}: unknown fields ignored"),
            kind,
            json!({ "x": [null, { "y": 1 }] }),
            Want::Reply(reply),
        ));
    }
    assert!(cases.len() > 100, "{}", cases.len());
    arena.run(cases).await;
}

#[tokio::test]
async fn each_malformed_offline_change_is_an_error_result_and_nothing_is_applied() {
    let mut arena = Arena::start().await;
    let good = json!({ "change_id": "c", "chat_id": "off1", "type": "title", "value": "t", "version_before_edit": 0 });
    let mut changes: Vec<String> = vec!["5".into(), "null".into(), "\"x\"".into(), "[]".into(), "{}".into()];
    for (field, v) in [
        ("chat_id", json!(5)),
        ("chat_id", Value::Null),
        ("chat_id", json!("bad id!")),
        ("chat_id", json!("c".repeat(65))),
        ("type", json!("rename")),
        ("type", json!(5)),
        ("type", Value::Null),
        ("value", json!(5)),
        ("value", json!({})),
        ("value", Value::Null),
        ("version_before_edit", json!("0")),
        ("version_before_edit", Value::Null),
        ("version_before_edit", json!(1.5)),
        ("version_before_edit", json!([])),
        ("change_id", json!({})),
    ] {
        changes.push(with(&good, field, Some(v)).to_string());
    }
    for field in ["chat_id", "type", "version_before_edit"] {
        changes.push(with(&good, field, None).to_string());
    }
    for n in [BEYOND_U64, BEYOND_I64, "-9223372036854775809"] {
        changes.push(with(&good, "version_before_edit", Some(json!("__BIG__"))).to_string().replace("\"__BIG__\"", n));
    }
    let n = changes.len();
    let frame = format!(
        r#"{{"type":"sync_offline_changes","payload":{{"changes":[{}]}},"request_id":"{RID}"}}"#,
        changes.join(",")
    );
    arena.attacker.send_text(frame).await.unwrap();
    let reply = within("offline_sync_complete", arena.attacker.recv()).await.unwrap();
    assert_eq!(reply.request_id.as_deref(), Some(RID));
    let done = expect_msg!(reply, OfflineSyncComplete);
    assert_eq!((done.processed, done.conflicts, done.errors), (0, 0, n as u32), "{done:?}");
    assert_eq!(done.results.len(), n);
    for (i, r) in done.results.iter().enumerate() {
        assert_eq!(
            (r.status, r.code),
            (OfflineStatus::Error, Some(ErrorCode::InvalidPayload)),
            "change {i}: {}",
            changes[i]
        );
    }
    assert_quiet(&mut arena.attacker).await;
    assert!(!lists_chat(&mut arena.attacker, "off1").await, "no malformed change may create the chat");
    arena.healthy().await;
}

// ---------------------------------------------------------------------------------------------------
// Numbers beyond 64 bits, ids, limits.

#[tokio::test]
async fn numbers_beyond_64_bits_in_every_numeric_field() {
    use ErrorCode::*;
    let mut arena = Arena::start().await;
    set_title(&mut arena.attacker, "m1", "mine").await;
    let sync = json!({ "chat_versions": { "m1": { "messages_v": 0, "title_v": 0, "draft_v": 0 } } });
    let get = json!({ "chat_id": "m1", "after_seq": 0, "limit": 10 });
    let mut cases = Vec::new();
    for n in [BEYOND_U64, BEYOND_I64, "-9223372036854775809", BEYOND_F64, "-1"] {
        for field in ["messages_v", "title_v", "draft_v"] {
            let frame = with_number("initial_sync_request", &sync, &format!("chat_versions.m1.{field}"), n);
            let want =
                if n == "-1" { Want::Reply("initial_sync_response") } else { Want::SyncError(InvalidPayload, field) };
            cases.push(raw(format!("initial_sync_request: {field} = {n}"), frame, Some(RID), want));
        }
        let frame = with_number("get_chat_messages", &get, "after_seq", n);
        // `after_seq` is unsigned: 2^63 is just a large sequence number.
        let want = if n == BEYOND_I64 {
            Want::Reply("chat_messages_response")
        } else {
            Want::Error(InvalidPayload, Some("after_seq"))
        };
        cases.push(raw(format!("get_chat_messages: after_seq = {n}"), frame, Some(RID), want));
    }
    // A number no float can hold, inside one offline change, cannot even be parsed: the request fails.
    let frame = with_number(
        "sync_offline_changes",
        &json!({ "changes": [off_title("c", "m1", "t", 0)] }),
        "changes",
        &format!(r#"[{{"chat_id":"m1","type":"title","value":"t","version_before_edit":{BEYOND_F64}}}]"#),
    );
    cases.push(raw(
        "sync_offline_changes: version_before_edit = 1e400",
        frame,
        Some(RID),
        Want::Error(InvalidPayload, None),
    ));
    // `limit` above max_page_messages is `limit_exceeded` (PROTOCOL.md section 8), however large.
    for n in ["501", "4294967296", BEYOND_U64] {
        let frame = with_number("get_chat_messages", &get, "limit", n);
        cases.push(raw(
            format!("get_chat_messages: limit = {n}"),
            frame,
            Some(RID),
            Want::Error(LimitExceeded, Some("limit")),
        ));
    }
    for n in ["-1", BEYOND_F64] {
        let frame = with_number("get_chat_messages", &get, "limit", n);
        cases.push(raw(
            format!("get_chat_messages: limit = {n}"),
            frame,
            Some(RID),
            Want::Error(InvalidPayload, Some("limit")),
        ));
    }
    cases.push(req(
        "get_chat_messages: limit = 0",
        "get_chat_messages",
        with(&get, "limit", Some(json!(0))),
        Want::Error(InvalidPayload, Some("limit")),
    ));
    // A timestamp must be finite, non-negative unix seconds or RFC 3339 text.
    let msg = json!({ "chat_id": "m1", "message": { "message_id": "big-ts", "content": "hi", "timestamp": 0 } });
    for n in [BEYOND_F64, "-1e400", "-1"] {
        let frame = with_number("chat_message_added", &msg, "message.timestamp", n);
        cases.push(raw(
            format!("chat_message_added: timestamp = {n}"),
            frame,
            Some(RID),
            Want::Error(InvalidPayload, Some("message.timestamp")),
        ));
    }
    for text in ["yesterday", "2024-13-45T99:99:99Z", ""] {
        cases.push(req(
            format!("chat_message_added: timestamp = {text:?}"),
            "chat_message_added",
            with(&msg, "message.timestamp", Some(json!(text))),
            Want::ErrorAbout(InvalidPayload, "message.timestamp"),
        ));
    }
    // 2^64 is a finite non-negative number of seconds: accepted as the client's clock, kept as given.
    let frame = with_number("chat_message_added", &msg, "message.timestamp", BEYOND_U64);
    cases.push(raw("chat_message_added: timestamp = 2^64", frame, Some(RID), Want::Reply("chat_message_confirmed")));
    // A numeric temp_id of any size is echoed.
    let frame = with_number(
        "chat_message_added",
        &with(&msg, "message.message_id", Some(json!("big-temp"))),
        "message.temp_id",
        "123456789012345678901234567890",
    );
    cases.push(raw(
        "chat_message_added: temp_id beyond 64 bits",
        frame,
        Some(RID),
        Want::Reply("chat_message_confirmed"),
    ));
    arena.run(cases).await;
    // The stored messages read back.
    let page = all_messages(&mut arena.attacker, "m1").await;
    assert_eq!(page.messages.len(), 2, "{page:?}");
}

#[tokio::test]
async fn overlong_and_foreign_character_ids() {
    use ErrorCode::*;
    let mut arena = Arena::start().await;
    let mut cases = Vec::new();
    let bad_chat_ids: Vec<(String, Value)> = vec![
        ("65 chars".into(), json!("c".repeat(65))),
        ("10,000 chars".into(), json!("c".repeat(10_000))),
        ("empty".into(), json!("")),
        ("a space".into(), json!("a b")),
        ("a dot".into(), json!("a.b")),
        ("a slash".into(), json!("../etc")),
        ("NUL".into(), json!("a\u{0}b")),
        ("a newline".into(), json!("a\nb")),
        ("DEL".into(), json!("a\u{7f}")),
        ("non-ASCII".into(), json!("caf\u{e9}")),
        ("fullwidth letters".into(), json!("\u{ff41}\u{ff42}")),
        ("RTL override".into(), json!("a\u{202e}b")),
        ("SQL".into(), json!("x' OR '1'='1")),
    ];
    for (label, id) in &bad_chat_ids {
        cases.push(req(
            format!("update_title: chat_id {label}"),
            "update_title",
            json!({ "chat_id": id, "new_title": "t" }),
            Want::Error(InvalidPayload, Some("chat_id")),
        ));
        cases.push(req(
            format!("initial_sync_request: chat_versions key {label}"),
            "initial_sync_request",
            json!({ "chat_versions": Value::Object([(id.as_str().unwrap().to_owned(), json!({}))].into_iter().collect()) }),
            Want::SyncError(InvalidPayload, "chat_versions"),
        ));
    }
    for (label, id) in [("64 chars", "c".repeat(64)), ("every allowed char", "azAZ09_-".into())] {
        cases.push(req(
            format!("update_title: chat_id {label} (accepted)"),
            "update_title",
            json!({ "chat_id": id, "new_title": "t" }),
            Want::Reply("chat_title_updated"),
        ));
    }
    cases.push(req(
        "get_chat_messages: chat_id 65 chars",
        "get_chat_messages",
        json!({ "chat_id": "c".repeat(65) }),
        Want::Error(InvalidPayload, Some("chat_id")),
    ));
    cases.push(req(
        "delete_chat: chat_id with NUL",
        "delete_chat",
        json!({ "chat_id": "a\u{0}" }),
        Want::Error(InvalidPayload, Some("chat_id")),
    ));
    cases.push(req(
        "delete_draft: chatId 65 chars",
        "delete_draft",
        json!({ "chatId": "c".repeat(65) }),
        Want::Error(InvalidPayload, Some("chatId")),
    ));
    cases.push(req(
        "initial_sync_request: immediate_view_chat_id 65 chars",
        "initial_sync_request",
        json!({ "chat_versions": {}, "immediate_view_chat_id": "c".repeat(65) }),
        Want::SyncError(InvalidPayload, "immediate_view_chat_id"),
    ));
    cases.push(req(
        "request_chat_content_batch: second id 65 chars",
        "request_chat_content_batch",
        json!({ "chat_ids": ["ok", "c".repeat(65)] }),
        Want::Error(InvalidPayload, Some("chat_ids[1]")),
    ));
    for (label, id) in [
        ("129 chars", json!("m".repeat(129))),
        ("empty", json!("")),
        ("a space", json!("a b")),
        ("a slash", json!("a/b")),
        ("a control char", json!("a\u{1}")),
        ("non-ASCII", json!("\u{e9}")),
    ] {
        cases.push(req(
            format!("chat_message_added: message_id {label}"),
            "chat_message_added",
            json!({ "chat_id": "m1", "message": { "message_id": id, "content": "x" } }),
            Want::Error(InvalidPayload, Some("message.message_id")),
        ));
    }
    cases.push(req(
        "chat_message_added: message_id 128 chars (accepted)",
        "chat_message_added",
        json!({ "chat_id": "m1", "message": { "message_id": "m".repeat(128), "content": "x" } }),
        Want::Reply("chat_message_confirmed"),
    ));
    arena.run(cases).await;
    // Nothing but the accepted ids exists.
    let all = sync_all(&mut arena.attacker).await;
    let mut listed = ids(&all.server_chat_order);
    listed.sort();
    let c64 = "c".repeat(64);
    let mut expected = vec!["azAZ09_-", c64.as_str(), "m1"];
    expected.sort();
    assert_eq!(listed, expected);
}

#[tokio::test]
async fn content_limits_titles_drafts_batches_and_offline_lists() {
    use ErrorCode::*;
    let mut arena = Arena::start().await;
    let words = |n: usize| vec!["w"; n].join(" ");
    let nested_text = {
        // Text hidden 14 nodes deep in non-paragraph nodes still counts (31 levels of nesting, within the
        // draft depth limit of 32: the text limit refuses it, not the depth limit).
        let mut v = json!({ "type": "text", "text": "x".repeat(7_001) });
        for _ in 0..14 {
            v = json!({ "type": "weird", "content": [v] });
        }
        json!({ "type": "doc", "content": [v] })
    };
    let cases = vec![
        req(
            "title of 256 chars",
            "update_title",
            json!({ "chat_id": "m1", "new_title": "t".repeat(256) }),
            Want::Error(LimitExceeded, Some("new_title")),
        ),
        req(
            "title of 20,000 chars",
            "update_title",
            json!({ "chat_id": "m1", "new_title": "t".repeat(20_000) }),
            Want::Error(LimitExceeded, Some("new_title")),
        ),
        req(
            "title of 256 emoji",
            "update_title",
            json!({ "chat_id": "m1", "new_title": "\u{1f600}".repeat(256) }),
            Want::Error(LimitExceeded, Some("new_title")),
        ),
        req(
            "title of 255 emoji (accepted)",
            "update_title",
            json!({ "chat_id": "m1", "new_title": "\u{1f600}".repeat(255) }),
            Want::Reply("chat_title_updated"),
        ),
        req(
            "draft of 7,001 chars",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": doc(&"d".repeat(7_001)) }),
            Want::Error(LimitExceeded, Some("draft_json")),
        ),
        req(
            "draft of 1,001 words",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": doc(&words(1_001)) }),
            Want::Error(LimitExceeded, Some("draft_json")),
        ),
        req(
            "draft of 30,000 words",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": doc(&words(30_000)) }),
            Want::Error(LimitExceeded, Some("draft_json")),
        ),
        req(
            "draft of 1,500 one-word text nodes",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": { "content": vec![json!({"text": "w"}); 1_500] } }),
            Want::Error(LimitExceeded, Some("draft_json")),
        ),
        req(
            "draft text 14 nodes deep",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": nested_text }),
            Want::Error(LimitExceeded, Some("draft_json")),
        ),
        req(
            "draft of 1,000 words (accepted)",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": doc(&words(1_000)) }),
            Want::Reply("draft_update_confirmed"),
        ),
        req(
            "message content over 32 KiB",
            "chat_message_added",
            json!({ "chat_id": "m1", "message": { "message_id": "big", "content": "c".repeat(33_000) } }),
            Want::Error(LimitExceeded, Some("message.content")),
        ),
        req(
            "message content of 40,000 escapes",
            "chat_message_added",
            json!({ "chat_id": "m1", "message": { "message_id": "esc", "content": "\u{1}".repeat(6_000) } }),
            Want::Error(LimitExceeded, Some("message.content")),
        ),
        req(
            "51 chat ids in a batch",
            "request_chat_content_batch",
            json!({ "chat_ids": (0..51).map(|i| format!("b{i}")).collect::<Vec<_>>() }),
            Want::Error(LimitExceeded, Some("chat_ids")),
        ),
        req(
            "2,000 chat ids in a batch",
            "request_chat_content_batch",
            json!({ "chat_ids": vec!["same"; 2_000] }),
            Want::Error(LimitExceeded, Some("chat_ids")),
        ),
        req(
            "501 offline changes",
            "sync_offline_changes",
            json!({ "changes": vec![json!({}); 501] }),
            Want::Error(LimitExceeded, Some("changes")),
        ),
        req(
            "10,000 offline changes",
            "sync_offline_changes",
            json!({ "changes": vec![json!(0); 10_000] }),
            Want::Error(LimitExceeded, Some("changes")),
        ),
    ];
    arena.run(cases).await;
    // An over-limit offline change is a `limit_exceeded` result, not a failed batch.
    let (_, done) = offline_round(
        &mut arena.attacker,
        json!([off_title("t", "m1", &"t".repeat(256), 100), off_draft("d", "m1", doc(&words(1_001)), 100)]),
    )
    .await;
    let codes: Vec<_> = done.results.iter().map(|r| (r.status, r.code)).collect();
    assert_eq!(codes, vec![(OfflineStatus::Error, Some(LimitExceeded)); 2], "{done:?}");
    arena.healthy().await;
}

// ---------------------------------------------------------------------------------------------------
// Deep nesting and huge collections (a server with a large frame limit, so that they are parsed).

#[tokio::test]
async fn deep_nesting_and_huge_collections_do_not_hurt_the_server() {
    use ErrorCode::*;
    let mut arena = Arena::start_with(|c| {
        c.max_frame_bytes = 2 << 20;
        c.max_reply_bytes = 4 << 20;
    })
    .await;
    const DEPTH: usize = 100_000;
    let arrays = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(DEPTH), "}".repeat(DEPTH));
    let many_versions =
        |n: usize| format!("{{{}}}", (0..n).map(|i| format!(r#""v{i}":{{}}"#)).collect::<Vec<_>>().join(","));
    let cases = vec![
        raw("array nested 100,000 deep", arrays.clone(), None, Want::Error(InvalidMessage, None)),
        raw("object nested 100,000 deep", objects.clone(), None, Want::Error(InvalidMessage, None)),
        raw("unclosed array 100,000 deep", "[".repeat(DEPTH), None, Want::Error(InvalidJson, None)),
        raw(
            "type nested 100,000 deep",
            format!(r#"{{"type":{arrays},"request_id":"{RID}"}}"#),
            Some(RID),
            Want::Error(InvalidMessage, None),
        ),
        raw(
            "payload nested 100,000 deep",
            format!(r#"{{"type":"ping","payload":{objects},"request_id":"{RID}"}}"#),
            Some(RID),
            Want::Reply("pong"),
        ),
        raw(
            "request_id nested 100,000 deep",
            format!(r#"{{"type":"ping","request_id":{arrays}}}"#),
            None,
            Want::Error(InvalidMessage, None),
        ),
        raw(
            "unknown payload member nested 100,000 deep",
            format!(r#"{{"type":"ping","payload":{{"x":{arrays}}},"request_id":"{RID}"}}"#),
            Some(RID),
            Want::Reply("pong"),
        ),
        raw(
            "draft nested 100,000 deep",
            format!(
                r#"{{"type":"update_draft","payload":{{"chat_id":"m1","draft_json":{objects}}},"request_id":"{RID}"}}"#
            ),
            Some(RID),
            Want::Error(InvalidPayload, None),
        ),
        raw(
            "message content nested 100,000 deep",
            format!(
                r#"{{"type":"chat_message_added","payload":{{"chat_id":"m1","message":{{"message_id":"d","content":{objects}}}}},"request_id":"{RID}"}}"#
            ),
            Some(RID),
            Want::Error(InvalidPayload, None),
        ),
        // Unknown members of a versions entry are ignored, however deep.
        raw(
            "chat_versions entry nested 100,000 deep",
            format!(
                r#"{{"type":"initial_sync_request","payload":{{"chat_versions":{{"m1":{objects}}}}},"request_id":"{RID}"}}"#
            ),
            Some(RID),
            Want::Reply("initial_sync_response"),
        ),
        raw(
            "offline change value nested 100,000 deep",
            format!(
                r#"{{"type":"sync_offline_changes","payload":{{"changes":[{{"chat_id":"m1","type":"draft","value":{objects},"version_before_edit":0}}]}},"request_id":"{RID}"}}"#
            ),
            Some(RID),
            Want::Error(InvalidPayload, None),
        ),
        raw(
            "10,001 chat_versions entries",
            format!(
                r#"{{"type":"initial_sync_request","payload":{{"chat_versions":{}}},"request_id":"{RID}"}}"#,
                many_versions(10_001)
            ),
            Some(RID),
            Want::SyncError(LimitExceeded, "chat_versions"),
        ),
        raw(
            "10,000 chat_versions entries (accepted)",
            format!(
                r#"{{"type":"initial_sync_request","payload":{{"chat_versions":{}}},"request_id":"{RID}"}}"#,
                many_versions(10_000)
            ),
            Some(RID),
            Want::Reply("initial_sync_response"),
        ),
        req(
            "100,000 offline changes",
            "sync_offline_changes",
            json!({ "changes": vec![json!({}); 100_000] }),
            Want::Error(LimitExceeded, Some("changes")),
        ),
        // Within the parser's depth but past the protocol's (32 levels): stored, such a document made
        // every later read of it fail in a reader whose parser stops at 128 levels, frame included.
        req(
            "draft nested 100 deep",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": nested(100) }),
            Want::Error(LimitExceeded, Some("draft_json")),
        ),
        req(
            "draft nested 32 deep (accepted)",
            "update_draft",
            json!({ "chat_id": "m1", "draft_json": nested(Limits::MAX_DRAFT_DEPTH - 1) }),
            Want::Reply("draft_update_confirmed"),
        ),
        req(
            "message content nested 100 deep",
            "chat_message_added",
            json!({ "chat_id": "m1", "message": { "message_id": "deep", "content": nested(100) } }),
            Want::Error(LimitExceeded, Some("message.content")),
        ),
        req(
            "message content nested 32 deep (accepted)",
            "chat_message_added",
            json!({ "chat_id": "m1", "message": { "message_id": "deep", "content": nested(Limits::MAX_MESSAGE_CONTENT_DEPTH - 1) } }),
            Want::Reply("chat_message_confirmed"),
        ),
    ];
    arena.run(cases).await;
}

/// An object nested `depth` deep under the outermost one (`depth + 1` levels).
fn nested(depth: usize) -> Value {
    let mut v = json!({ "text": "deep" });
    for _ in 0..depth {
        v = json!({ "content": v });
    }
    v
}

// ---------------------------------------------------------------------------------------------------
// Frames: size limit, fragments, binary, invalid UTF-8, broken framing.

fn text_frame(bytes: impl Into<Vec<u8>>, fin: bool) -> Message {
    Message::Frame(Frame::message(bytes.into(), OpCode::Data(Data::Text), fin))
}

fn continuation(bytes: impl Into<Vec<u8>>, fin: bool) -> Message {
    Message::Frame(Frame::message(bytes.into(), OpCode::Data(Data::Continue), fin))
}

/// A `ping` frame of exactly `len` bytes carrying request id `rid`.
fn ping_of_len(len: usize, rid: &str) -> String {
    let head = format!(r#"{{"type":"ping","request_id":"{rid}","payload":{{"pad":""#);
    let tail = r#""}}"#;
    let frame = format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()));
    assert_eq!(frame.len(), len);
    frame
}

#[tokio::test]
async fn frames_at_over_and_far_over_the_size_limit() {
    let mut arena = Arena::start().await;
    let limit = 65_536;
    for len in [limit - 1, limit] {
        let c = raw(format!("frame of {len} bytes"), ping_of_len(len, RID), Some(RID), Want::Reply("pong"));
        check_case(&mut arena.attacker, &c).await;
    }
    arena.healthy().await;
    arena
        .expect_close(
            "frame one byte over",
            vec![Message::text(ping_of_len(limit + 1, RID))],
            1009,
            "Message too big",
            false,
        )
        .await;
    // At the default limit, JSON nested 100,000 deep never reaches the parser.
    arena
        .expect_close(
            "array nested 100,000 deep",
            vec![Message::text("[".repeat(100_000))],
            1009,
            "Message too big",
            false,
        )
        .await;
    arena.expect_close("frame of 1 MiB", vec![Message::text("x".repeat(1 << 20))], 1009, "Message too big", true).await;
    // 100,000 offline changes of realistic size are ~7 MB: far beyond the frame limit.
    let change = off_title("c", "m1", "t", 0);
    let frame = json!({ "type": "sync_offline_changes", "payload": { "changes": vec![change; 100_000] } }).to_string();
    arena
        .expect_close("100,000 offline changes (7 MB)", vec![Message::text(frame)], 1009, "Message too big", true)
        .await;
}

#[tokio::test]
async fn fragmented_frames_are_assembled_and_counted_against_the_limit() {
    let mut arena = Arena::start().await;
    // A valid message in three fragments, with a WebSocket Ping between them (allowed by RFC 6455).
    let frame = format!(
        r#"{{"type":"update_title","payload":{{"chat_id":"frag","new_title":"pieces"}},"request_id":"{RID}"}}"#
    );
    let (a, rest) = frame.as_bytes().split_at(10);
    let (b, c) = rest.split_at(30);
    let mut attacker = arena.fresh_attacker().await;
    for m in [text_frame(a, false), Message::Ping(vec![1, 2].into()), continuation(b, false), continuation(c, true)] {
        attacker.send_raw(m).await.unwrap();
    }
    let reply = within("fragmented write", attacker.recv_reply(RID)).await.unwrap();
    assert_eq!(expect_msg!(reply, ChatTitleUpdated).data.title, "pieces");
    // The attacker's first connection (OTHERS) gets the broadcast; nothing else is pending anywhere.
    let other = within("broadcast", arena.attacker.recv()).await.unwrap();
    assert!(matches!(other.message, ServerMessage::ChatTitleUpdated(_)), "{other:?}");
    assert_quiet(&mut attacker).await;
    assert_quiet(&mut arena.attacker).await;
    // A UTF-8 character split across two fragments is fine.
    let frame = format!(r#"{{"type":"ping","payload":{{"x":"caf{}"}},"request_id":"{RID}"}}"#, '\u{e9}');
    let cut = frame.find('\u{e9}').unwrap() + 1;
    attacker.send_raw(text_frame(&frame.as_bytes()[..cut], false)).await.unwrap();
    attacker.send_raw(continuation(&frame.as_bytes()[cut..], true)).await.unwrap();
    assert_eq!(within("split char", attacker.recv_reply(RID)).await.unwrap().message, ServerMessage::Pong(Empty {}));
    // 2,000 one-byte fragments.
    let frame = format!(r#"{{"type":"ping","request_id":"{RID}","payload":{{"pad":"{}"}}}}"#, "p".repeat(1_950));
    let bytes = frame.as_bytes();
    attacker.send_raw(text_frame(&bytes[..1], false)).await.unwrap();
    for (i, byte) in bytes[1..].iter().enumerate() {
        attacker.send_raw(continuation(vec![*byte], i == bytes.len() - 2)).await.unwrap();
    }
    assert_eq!(
        within("tiny fragments", attacker.recv_reply(RID)).await.unwrap().message,
        ServerMessage::Pong(Empty {})
    );
    assert_quiet(&mut attacker).await;
    arena.healthy().await;

    // Fragments each well under the limit, summing to one byte over it.
    let over = ping_of_len(65_537, RID).into_bytes();
    let mut parts: Vec<Message> = over.chunks(20_000).map(|c| continuation(c, false)).collect();
    parts[0] = text_frame(&over[..20_000], false);
    let last = parts.len() - 1;
    parts[last] = continuation(over.chunks(20_000).last().unwrap(), true);
    arena.expect_close("fragments summing to the limit + 1", parts, 1009, "Message too big", false).await;
    // Fragments summing far past the limit, never finished.
    let mut parts = vec![text_frame(vec![b' '; 16_000], false)];
    parts.extend((0..64).map(|_| continuation(vec![b' '; 16_000], false)));
    arena.expect_close("unfinished fragments summing to 1 MB", parts, 1009, "Message too big", true).await;
}

#[tokio::test]
async fn binary_invalid_utf8_and_broken_framing_end_only_that_connection() {
    let mut arena = Arena::start().await;
    arena
        .expect_close(
            "binary frame",
            vec![Message::binary(b"{\"type\":\"ping\"}".to_vec())],
            1003,
            "Binary frames are not supported",
            false,
        )
        .await;
    arena
        .expect_close(
            "empty binary frame",
            vec![Message::binary(Vec::new())],
            1003,
            "Binary frames are not supported",
            false,
        )
        .await;
    arena
        .expect_close(
            "binary fragments",
            vec![
                Message::Frame(Frame::message(vec![1u8], OpCode::Data(Data::Binary), false)),
                continuation(vec![2u8], true),
            ],
            1003,
            "Binary frames are not supported",
            false,
        )
        .await;
    // RFC 6455 §7.4.1 (docs/PROTOCOL.md section 8): 1007 for a text message that is not UTF-8, 1002 for
    // broken framing; nobody else notices.
    let ends = [
        ("invalid UTF-8 in a text frame", vec![text_frame(b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec(), true)]),
        ("overlong UTF-8 encoding", vec![text_frame(b"{\"type\":\"\xc0\xafping\"}".to_vec(), true)]),
        ("UTF-8 surrogate", vec![text_frame(b"\"\xed\xa0\x80\"".to_vec(), true)]),
        ("truncated UTF-8 at the end of the message", vec![text_frame(b"{\"type\":\"ping\"}\xe2\x82".to_vec(), true)]),
        (
            "invalid UTF-8 across fragments",
            vec![text_frame(b"{\"type\":\"\xe2".to_vec(), false), continuation(b"\x28\xa1\"}".to_vec(), true)],
        ),
        ("continuation without a start", vec![continuation(b"{\"type\":\"ping\"}".to_vec(), true)]),
        (
            "new data frame inside a fragmented one",
            vec![text_frame(b"{\"type\"".to_vec(), false), text_frame(b"{\"type\":\"ping\"}".to_vec(), true)],
        ),
    ];
    for (name, messages) in ends {
        let close = arena.expect_end(name, messages).await;
        let expected = if name.contains("UTF-8") { (1007, "Invalid UTF-8") } else { (1002, "Protocol error") };
        assert_eq!(close, Some((expected.0, expected.1.to_owned())), "{name}");
    }
    // The attacker's first connection was never disturbed.
    assert_quiet(&mut arena.attacker).await;
}

// ---------------------------------------------------------------------------------------------------
// Floods.

#[tokio::test]
async fn a_websocket_ping_flood_is_answered_without_harm() {
    let mut arena = Arena::start().await;
    let mut attacker = arena.fresh_attacker().await;
    for i in 0..5_000u32 {
        attacker.send_raw(Message::Ping(i.to_be_bytes().to_vec().into())).await.unwrap();
    }
    // Control frames are not requests: the connection still works and is not rate-limited.
    let reply = within("ping after flood", attacker.request(&ping())).await.unwrap();
    assert_eq!(reply.message, ServerMessage::Pong(Empty {}));
    assert_quiet(&mut attacker).await;
    arena.healthy().await;
}

#[tokio::test]
async fn a_protocol_ping_flood_is_rate_limited_then_closed() {
    let mut arena = Arena::start_with(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 10;
    })
    .await;
    // The bystander's own budget is separate; it writes once per health check.
    let mut attacker = arena.fresh_attacker().await;
    for i in 0..400 {
        if attacker.send(&ping(), Some(&format!("f{i}"))).await.is_err() {
            break;
        }
    }
    let mut pongs = 0;
    let mut limited = 0;
    let close = loop {
        match within("flood replies", attacker.recv()).await {
            Ok(m) => match &m.message {
                ServerMessage::Pong(_) => pongs += 1,
                ServerMessage::Error(e) => {
                    assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
                    assert!(m.request_id.as_deref().is_some_and(|r| r.starts_with('f')), "{m:?}");
                    limited += 1;
                }
                other => panic!("{other:?}"),
            },
            Err(ClientError::Closed(Some(close))) => break close,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(close, (1008, "Rate limit exceeded".to_owned()));
    assert!(pongs >= 10, "the burst is served: {pongs}");
    assert!(limited >= 1, "drops are answered before the close: {limited}");
    // The first attacker connection has its own budget and was untouched.
    assert_quiet(&mut arena.attacker).await;
    arena.healthy().await;
}

#[tokio::test]
async fn thousands_of_connects_without_a_token_are_each_refused() {
    let mut arena = Arena::start().await;
    let url = arena.server.url.clone();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let opts = ConnectOptions {
                    device_id: if i % 2 == 0 { Some(format!("d{t}-{i}")) } else { None },
                    ..Default::default()
                };
                let mut c = Client::connect(&url, &opts).await.unwrap();
                let close = within("refusal", c.recv_close()).await.unwrap();
                assert_eq!(close, (1008, "Authentication required".to_owned()));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(arena.server.ctx.hub.connection_count(), 2, "refused connections are never registered");
    arena.healthy().await;
    // Bad credentials of other kinds.
    let fresh = arena.server.token("mallory").await;
    let opts = |token: &str, device: &str| ConnectOptions::new(token, device);
    for (name, o, want) in [
        ("garbage token", opts("garbage", "d"), "Invalid session"),
        ("8 KB token", opts(&"t".repeat(8_000), "d"), "Invalid session"),
        ("device id of 129 chars", opts(&fresh, &"d".repeat(129)), "Invalid device id"),
        (
            "device id with a control char",
            ConnectOptions { device_id_in_query: true, ..opts(&fresh, "a\u{1}b") },
            "Invalid device id",
        ),
        (
            "device id non-ASCII",
            ConnectOptions { device_id_in_query: true, ..opts(&fresh, "caf\u{e9}") },
            "Invalid device id",
        ),
    ] {
        let close = within(name, arena.server.refused(&o)).await;
        assert_eq!(close, (1008, want.to_owned()), "{name}");
    }
    arena.healthy().await;
}

#[tokio::test]
async fn a_socket_that_never_reads_is_closed_as_slow_consumer_and_nobody_else_waits() {
    let mut arena = Arena::start_with(|c| {
        c.outbox_max_messages = 16;
        c.outbox_max_bytes = 64 * 1024;
        c.durability = chatsync::store::Durability::Normal;
    })
    .await;
    // The sink: another connection of the attacker that never reads; every write by the attacker's main
    // connection is broadcast to it.
    let mut sink = arena.fresh_attacker().await;
    let big = "w".repeat(6_900);
    for i in 0..100u64 {
        let confirmed =
            within("attacker write", set_draft(&mut arena.attacker, "flood", doc(&format!("{i} {big}")))).await;
        assert_eq!(confirmed.draft_v, i + 1);
        if i % 50 == 0 {
            arena.healthy().await;
        }
    }
    // Past the socket buffers as well: large in-process broadcasts to the sink only (each push is a
    // reference count; once the sink's outbox is closed, a no-op).
    let title = ChatTitleUpdated {
        chat_id: ChatId::new("flood").unwrap(),
        data: TitleData { title: "t".repeat(60_000) },
        versions: TitleVersion { title_v: 1 },
    };
    let frame: String = encode(&ServerMessage::ChatTitleUpdated(title), None);
    let others = chatsync::hub::Audience::Others { except: &arena.attacker_conn };
    for _ in 0..2_000 {
        arena.server.ctx.hub.deliver("mallory", others, frame.clone().into()).await;
    }
    assert_quiet(&mut arena.attacker).await;
    arena.healthy().await;
    let close = within("slow consumer close", sink.recv_close()).await.unwrap();
    assert_eq!(close, (1013, "Slow consumer".to_owned()));
    // The main attacker connection got nothing of that and keeps working.
    assert_quiet(&mut arena.attacker).await;
    arena.healthy().await;
}

/// Reads until the server ends the connection; the bytes it sent meanwhile.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Without credentials, a peer must not hold a socket (and the buffer of a request head it never finishes)
/// for ever: a request head that does not arrive within `http_idle_timeout_secs` ends the TCP connection, as
/// does an HTTP/1.1 connection idle that long between requests. HTTP/2 (which has no such bound here and
/// is not part of the protocol) is not spoken.
#[tokio::test]
async fn a_request_head_that_never_ends_does_not_hold_a_connection() {
    use tokio::io::AsyncWriteExt as _;
    let server = TestServer::start_with(|c| {
        c.http_idle_timeout_secs = 2;
    })
    .await;
    let host = server.host();
    let connect = || tokio::net::TcpStream::connect(host.clone());
    // Nothing at all, a request line and a header without the blank line, an idle keep-alive connection.
    let mut silent = connect().await.unwrap();
    let mut partial = connect().await.unwrap();
    partial.write_all(format!("GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nX-Slow: ").as_bytes()).await.unwrap();
    let mut idle = connect().await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let mut h2 = connect().await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    assert!(within("the silent connection's end", read_until_closed(&mut silent)).await.is_empty());
    assert!(within("the unfinished head's end", read_until_closed(&mut partial)).await.is_empty());
    let answered =
        String::from_utf8_lossy(&within("the idle connection's end", read_until_closed(&mut idle)).await).into_owned();
    assert!(answered.starts_with("HTTP/1.1 200"), "the request was answered first: {answered}");
    let h2_answer = within("the HTTP/2 connection's end", read_until_closed(&mut h2)).await;
    assert!(!h2_answer.starts_with(&[0, 0]), "no HTTP/2 SETTINGS frame: {h2_answer:?}");
    // A connection that does speak in time is served as before.
    let token = server.user_token("alice").await;
    let (_c, hello) = server.connect(&token, "phone").await;
    assert_eq!(hello.user_id, "alice");
}
