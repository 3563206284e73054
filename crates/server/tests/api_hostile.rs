//! The server API's edges (SERVER_API.md sections 1-4) with hostile input, over real HTTP: numbers out of
//! range or of the wrong kind, nesting past the JSON parser's depth, bodies at and one byte past the size
//! limit, deltas at the byte limit in multi-byte UTF-8, session lifetimes at their bound. Each is a clear
//! 4xx with a stable code and field, never a 500, and leaves the server and the stream working.

mod common;

use common::{Api, TestServer};
use serde_json::{json, Value};

const STREAMS: &str = "/users/alice/chats/c1/streams";
/// SERVER_API.md section 4: at most 16 KiB of UTF-8 per chunk.
const MAX_DELTA_BYTES: usize = 16 * 1024;

fn error(body: &Value) -> (&str, Option<&str>) {
    (
        body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}")),
        body["error"]["field"].as_str(),
    )
}

/// POSTs a raw body (not built by `json!`, so that it can hold what `json!` cannot).
async fn post_raw(api: &Api, path: &str, body: String) -> (u16, Value) {
    let resp = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.key)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A server with user alice and her stream `s1` open in chat `c1`; the API and the stream's chunks path.
async fn open_stream() -> (TestServer, Api, String) {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    let start = json!({"stream_id": "s1", "message_id": "m1", "sender_name": "assistant"});
    assert_eq!(api.post(STREAMS, start).await.0, 201);
    (server, api, format!("{STREAMS}/s1/chunks"))
}

#[tokio::test]
async fn chunk_numbers_out_of_range_or_of_the_wrong_kind_are_invalid_payload() {
    let (_server, api, chunks) = open_stream().await;
    for seq in
        ["18446744073709551616", "-1", "1.5", "\"1\"", "null", "1e-3", "1.8446744073709552e19", "9007199254740993.0"]
    {
        let (status, body) = post_raw(&api, &chunks, format!(r#"{{"seq":{seq},"delta":"x"}}"#)).await;
        assert_eq!((status, error(&body)), (400, ("invalid_payload", Some("seq"))), "seq {seq}: {body}");
    }
    // The largest seq is a gap, not an overflow; the stream still takes its first chunk.
    let (status, body) = post_raw(&api, &chunks, r#"{"seq":18446744073709551615,"delta":"x"}"#.into()).await;
    assert_eq!((status, error(&body).0), (409, "conflict"), "{body}");
    assert_eq!(post_raw(&api, &chunks, r#"{"seq":1,"delta":"x"}"#.into()).await.0, 202);
}

/// JSON Schema's `integer`, which the spec declares for `seq` and `ttl_secs`, is any number with a
/// zero fractional part: `2.0` and `3e0` are integers, and a backend whose JSON library writes its
/// integers as floats (Python's `timedelta.total_seconds()`) sends them. schemathesis found them refused
/// as "invalid type: floating point" (SERVER_API.md section 7, "Bodies").
#[tokio::test]
async fn integers_written_with_a_zero_fraction_or_an_exponent_are_integers() {
    let (_server, api, chunks) = open_stream().await;
    for (seq, status) in [("1.0", 202), ("1", 200), ("2e0", 202), ("3.000", 202), ("30E-1", 200)] {
        let (s, body) = post_raw(&api, &chunks, format!(r#"{{"seq":{seq},"delta":"x"}}"#)).await;
        assert_eq!(s, status, "seq {seq}: {body}");
    }
    let (status, body) = post_raw(&api, "/users/alice/sessions", r#"{"ttl_secs":3600.0}"#.into()).await;
    assert_eq!(status, 201, "{body}");
    for ttl in ["0.0", "1.5", "-1.0", "3.15360001e8"] {
        let (status, body) = post_raw(&api, "/users/alice/sessions", format!(r#"{{"ttl_secs":{ttl}}}"#)).await;
        assert_eq!((status, error(&body)), (400, ("invalid_payload", Some("ttl_secs"))), "ttl {ttl}: {body}");
    }
}

#[tokio::test]
async fn a_delta_at_the_byte_limit_in_multi_byte_utf8_is_taken_and_one_byte_more_is_not() {
    let (_server, api, chunks) = open_stream().await;
    let at_limit = "é".repeat(MAX_DELTA_BYTES / 2);
    let (status, body) = api.post(&chunks, json!({"seq": 2, "delta": format!("{at_limit}a")})).await;
    assert_eq!((status, error(&body)), (422, ("limit_exceeded", Some("delta"))), "{body}");
    assert_eq!(api.post(&chunks, json!({"seq": 1, "delta": at_limit})).await.0, 202);
}

#[tokio::test]
async fn bodies_at_the_size_limit_are_read_and_one_byte_more_is_413() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    let body_of = |len: usize| {
        let shell = r#"{"message_id":"m1","sender_name":"bot","content":""}"#;
        let pad = "x".repeat(len - shell.len());
        format!(r#"{{"message_id":"m1","sender_name":"bot","content":"{pad}"}}"#)
    };
    let path = "/users/alice/chats/c1/messages";
    let (status, body) = post_raw(&api, path, body_of(chatsync::api::MAX_BODY_BYTES)).await;
    assert_eq!((status, error(&body)), (422, ("limit_exceeded", Some("content"))), "read, then refused by content");
    let (status, body) = post_raw(&api, path, body_of(chatsync::api::MAX_BODY_BYTES + 1)).await;
    assert_eq!((status, error(&body).0), (413, "payload_too_large"));
}

#[tokio::test]
async fn nesting_past_the_parsers_depth_is_a_client_error_and_the_server_goes_on() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let body = format!(r#"{{"message_id":"m1","sender_name":"bot","content":{{"a":{deep}}}}}"#);
    let (status, body) = post_raw(&api, "/users/alice/chats/c1/messages", body).await;
    // Well-formed JSON, refused by the typed parse at its depth limit, naming where.
    assert_eq!((status, error(&body).0), (400, "invalid_payload"), "{body}");
    assert!(error(&body).1.is_some_and(|f| f.starts_with("content.a[0]")), "{body}");
    let ok = json!({"message_id": "m1", "sender_name": "bot", "content": "fine"});
    assert_eq!(api.post("/users/alice/chats/c1/messages", ok).await.0, 201);
}

#[tokio::test]
async fn a_session_lifetime_at_its_bound_is_taken_and_one_second_more_is_not() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    let ten_years: u64 = 10 * 365 * 24 * 3600;
    let (status, body) = api.post("/users/alice/sessions", json!({"ttl_secs": ten_years + 1})).await;
    assert_eq!((status, error(&body)), (400, ("invalid_payload", Some("ttl_secs"))));
    let (status, body) = api.post("/users/alice/sessions", json!({"ttl_secs": u64::MAX})).await;
    assert_eq!((status, error(&body)), (400, ("invalid_payload", Some("ttl_secs"))));
    let (status, body) = api.post("/users/alice/sessions", json!({"ttl_secs": ten_years})).await;
    assert_eq!(status, 201, "{body}");
    assert!(body["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
}

/// serde reads a struct from a JSON array too, its fields by position: `[1,"x"]` was accepted as chunk 1
/// (202), `["carol", true]` created a user with 2FA, and `[]` completed a stream. Every request body is a
/// JSON object (SERVER_API.md section 7, "Bodies"): any other JSON value is 400 `invalid_payload` naming
/// `body`, and changes nothing.
#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_refused_and_changes_nothing() {
    let (server, api, chunks) = open_stream().await;
    let complete = format!("{STREAMS}/s1/complete");
    let bodies = [r#"[1,"x"]"#, " \n[1, \"x\"]", "[]", "1", r#""x""#, "null", "true"];
    for path in
        [chunks.as_str(), &complete, STREAMS, "/users", "/users/alice/sessions", "/users/alice/chats/c1/messages"]
    {
        for body in bodies {
            let (status, reply) = post_raw(&api, path, body.into()).await;
            assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("body"))), "{path} {body}: {reply}");
        }
    }
    let (status, reply) = post_raw(&api, "/users", r#"["carol", true]"#.into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("body"))), "{reply}");
    assert!(server.ctx.store.user("carol").await.unwrap().is_none(), "no user from an array");
    // Not JSON at all stays `invalid_json`; an object (also after whitespace) is read as before.
    let (status, reply) = post_raw(&api, &chunks, "[1,".into()).await;
    assert_eq!((status, error(&reply).0), (400, "invalid_json"), "{reply}");
    // The stream is still open, with no chunk: it takes chunk 1 now.
    assert_eq!(post_raw(&api, &chunks, " \r\n\t{\"seq\":1,\"delta\":\"x\"}".into()).await.0, 202);
}

/// A missing field is named (SERVER_API.md section 1: `field` is the offending field's dotted path), not
/// reported as `body`, the object that lacks it.
#[tokio::test]
async fn a_missing_field_is_named() {
    let (_server, api, chunks) = open_stream().await;
    let (status, reply) = post_raw(&api, &chunks, r#"{"seq":1}"#.into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("delta"))), "{reply}");
    let (status, reply) = post_raw(&api, &chunks, r#"{"delta":"x"}"#.into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("seq"))), "{reply}");
    let (status, reply) = post_raw(&api, "/users", "".into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("user_id"))), "an empty body is {{}}: {reply}");
    let (status, reply) = post_raw(&api, STREAMS, r#"{"stream_id":"s2","message_id":"m2"}"#.into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("sender_name"))), "{reply}");
}

/// A field given twice is refused (serde: "duplicate field") and named, not reported as `body`: the
/// offending field is the repeated one (SERVER_API.md section 1), and nothing of the request runs.
#[tokio::test]
async fn a_duplicated_field_is_named() {
    let (server, api, chunks) = open_stream().await;
    let (status, reply) = post_raw(&api, &chunks, r#"{"seq":1,"seq":2,"delta":"x"}"#.into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("seq"))), "{reply}");
    let (status, reply) = post_raw(&api, "/users", r#"{"user_id":"carol","user_id":"dave"}"#.into()).await;
    assert_eq!((status, error(&reply)), (400, ("invalid_payload", Some("user_id"))), "{reply}");
    assert!(server.ctx.store.user("carol").await.unwrap().is_none());
    assert!(server.ctx.store.user("dave").await.unwrap().is_none());
    // The stream took nothing: its first chunk is still 1.
    assert_eq!(post_raw(&api, &chunks, r#"{"seq":1,"delta":"x"}"#.into()).await.0, 202);
}

/// `created_at` is between 1970 and 9999-12-31T23:59:59.999Z in UTC (SERVER_API.md section 7, "Section 3"),
/// to the millisecond, rounding a finer fraction down (toward the past). A time in the last millisecond of
/// 1969 (a negative epoch millisecond with a fraction, also written at an offset) was truncated toward zero,
/// into 1970-01-01T00:00:00.000Z, and taken: it is 400 naming `created_at`, like the rest of 1969. The
/// first and last instants of the range are taken, and the devices see them to the millisecond.
#[tokio::test]
async fn a_created_at_in_the_last_millisecond_of_1969_is_refused_and_the_range_ends_are_taken() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut device, _) = server.connect(&token, "phone").await;
    let api = server.api().await;
    let post = |id: &str, created_at: &str| json!({"message_id": id, "sender_name": "bot", "content": "x", "created_at": created_at});
    let path = "/users/alice/chats/c1/messages";
    for before in [
        "1969-12-31T23:59:59.9995Z",
        "1969-12-31T23:59:59.999999999Z",
        "1970-01-01T00:59:59.9999+01:00",
        "1969-12-31T23:59:59.999Z",
    ] {
        let (status, body) = api.post(path, post("m0", before)).await;
        assert_eq!((status, error(&body)), (400, ("invalid_payload", Some("created_at"))), "{before}: {body}");
    }
    for (i, (sent, seen)) in [
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000Z"),
        ("1970-01-01T00:00:00.0009Z", "1970-01-01T00:00:00.000Z"),
        ("1970-01-01T01:00:00.0015+01:00", "1970-01-01T00:00:00.001Z"),
        ("9999-12-31T23:59:59.9999999Z", "9999-12-31T23:59:59.999Z"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = api.post(path, post(&format!("m{}", i + 1), sent)).await;
        assert_eq!(status, 201, "{sent}: {body}");
        let event = device.recv().await.unwrap();
        let chatsync_protocol::ServerMessage::ChatMessageAdded(event) = event.message else {
            panic!("{sent}: expected chat_message_added, got {event:?}");
        };
        assert_eq!(event.message.created_at, seen, "{sent}");
    }
}

/// `levels` levels of objects, each the only member `a` of the one around it (`{"a":{}}` is 2).
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
}

/// Message content nested past `Limits::MAX_MESSAGE_CONTENT_DEPTH` (within the byte limits) was stored,
/// and poisoned the devices' later reads of it (initial sync, message pages: a reader's parser stops at 128
/// levels, the frame's own levels included). Content at the limit is taken; one level more is 422
/// `limit_exceeded` naming `content`, on `POST …/messages` and on a stream's `complete` (which leaves the
/// stream open, so that the backend can complete it with other content).
#[tokio::test]
async fn content_nested_at_the_depth_limit_is_taken_and_one_level_more_is_limit_exceeded() {
    let (_server, api, _chunks) = open_stream().await;
    let max = chatsync_protocol::Limits::MAX_MESSAGE_CONTENT_DEPTH;
    let path = "/users/alice/chats/c1/messages";
    let post = |id: &str, content: Value| json!({"message_id": id, "sender_name": "bot", "content": content});
    let (status, body) = api.post(path, post("m2", nested(max + 1))).await;
    assert_eq!((status, error(&body)), (422, ("limit_exceeded", Some("content"))), "{body}");
    let in_arrays = (2..=max).fold(json!([]), |inner, _| json!([inner]));
    let (status, body) = api.post(path, post("m2", json!({"a": in_arrays}))).await;
    assert_eq!((status, error(&body)), (422, ("limit_exceeded", Some("content"))), "{body}");
    let (status, body) = api.post(path, post("m2", nested(max))).await;
    assert_eq!((status, body["seq"].clone()), (201, json!(1)), "{body}");

    let complete = format!("{STREAMS}/s1/complete");
    let (status, body) = api.post(&complete, json!({"content": nested(max + 1)})).await;
    assert_eq!((status, error(&body)), (422, ("limit_exceeded", Some("content"))), "{body}");
    let (status, body) = api.post(&complete, json!({"content": nested(max)})).await;
    assert_eq!((status, body["seq"].clone()), (201, json!(2)), "{body}");
}
