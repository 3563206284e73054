//! `docs/openapi.json` against the real server: each call below goes over real HTTP, and its status must
//! be one the spec lists for that operation, its body must match the spec's schema for that status, and
//! the request bodies sent for a success must match the spec's request schema. Covers success, the errors
//! each endpoint produces, and the cross-user case. (`crates/protocol/tests/specs.rs` checks that the
//! file is current.)

mod common;

use chatsync_client::{Client, ConnectOptions};
use common::TestServer;
use serde_json::{json, Value};
use std::sync::LazyLock;

static OPENAPI: LazyLock<Value> = LazyLock::new(chatsync_protocol::specs::openapi);

/// A validator for `schema` (possibly a `$ref`) with the document's components beside it.
fn validator(schema: &Value) -> jsonschema::Validator {
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [schema],
        "components": OPENAPI["components"],
    });
    jsonschema::draft202012::new(&root).unwrap()
}

fn errors(schema: &Value, instance: &Value) -> Vec<String> {
    validator(schema).iter_errors(instance).map(|e| format!("{e} at {}", e.instance_path())).collect()
}

/// Checks one exchange against the operation `method template` of the spec.
fn conforms(method: &str, template: &str, request: Option<&Value>, status: u16, body: &Value) {
    let op = &OPENAPI["paths"][template][method];
    assert!(op.is_object(), "the spec has no {method} {template}");
    let mut response = &op["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {template} answered {status}, which the spec does not list: {body}");
    if let Some(r) = response.get("$ref").and_then(Value::as_str) {
        response = OPENAPI.pointer(r.trim_start_matches('#')).unwrap();
    }
    match response["content"]["application/json"].get("schema") {
        Some(schema) => {
            let e = errors(schema, body);
            assert!(e.is_empty(), "{method} {template} {status}: {body} does not match the spec: {e:?}");
        }
        None => assert!(body.is_null(), "{method} {template} {status} has a body the spec does not describe: {body}"),
    }
    if let (Some(request), true) = (request, (200..300).contains(&status)) {
        let schema = &op["requestBody"]["content"]["application/json"]["schema"];
        let e = errors(schema, request);
        assert!(e.is_empty(), "{method} {template}: the request {request} does not match the spec: {e:?}");
    }
}

#[tokio::test]
async fn users_sessions_and_devices_answer_as_the_spec_says() {
    let server = TestServer::start().await;
    let api = server.api().await;

    let body = json!({"user_id": "alice"});
    let (s, b) = api.post("/users", body.clone()).await;
    assert_eq!(s, 201);
    conforms("post", "/users", Some(&body), s, &b);
    let (s, b) = api.post("/users", body.clone()).await;
    assert_eq!(s, 409);
    conforms("post", "/users", Some(&body), s, &b);
    for bad in [json!({"user_id": "a b"}), json!({"user_id": "bob", "admin": true}), json!({"user_id": 7})] {
        let (s, b) = api.post("/users", bad).await;
        assert_eq!(s, 400);
        conforms("post", "/users", None, s, &b);
    }
    let (s, b) = api.post("/users", json!({"user_id": "bob", "tfa": true})).await;
    conforms("post", "/users", None, s, &b);

    let (s, b) = api.get("/users/alice").await;
    assert_eq!(s, 200);
    conforms("get", "/users/{user_id}", None, s, &b);
    let (s, b) = api.get("/users/nobody").await;
    assert_eq!(s, 404);
    conforms("get", "/users/{user_id}", None, s, &b);

    let body = json!({"device_id": "laptop", "ttl_secs": 3600});
    let (s, session) = api.post("/users/alice/sessions", body.clone()).await;
    assert_eq!(s, 201);
    conforms("post", "/users/{user_id}/sessions", Some(&body), s, &session);
    let (s, b) = api.post("/users/nobody/sessions", json!({})).await;
    assert_eq!(s, 404);
    conforms("post", "/users/{user_id}/sessions", None, s, &b);
    let (s, b) = api.post("/users/alice/sessions", json!({"ttl_secs": 0})).await;
    assert_eq!(s, 400);
    conforms("post", "/users/{user_id}/sessions", None, s, &b);
    let (s, bob_session) = api.post("/users/bob/sessions", json!({"device_id": "bob-phone"})).await;
    assert_eq!(s, 201);

    // A connection records the device.
    let token = session["token"].as_str().unwrap();
    let (client, connected) =
        Client::connect_authenticated(&server.url, &ConnectOptions::new(token, "laptop")).await.unwrap();
    let bob_token = bob_session["token"].as_str().unwrap();
    let (bob_client, bob_connected) =
        Client::connect_authenticated(&server.url, &ConnectOptions::new(bob_token, "bob-phone")).await.unwrap();
    let (s, b) = api.get("/users/alice/devices").await;
    assert_eq!(s, 200);
    conforms("get", "/users/{user_id}/devices", None, s, &b);
    assert_eq!(b["devices"][0]["device_hash"], connected.device_hash.as_str());
    let (s, b) = api.get("/users/nobody/devices").await;
    assert_eq!(s, 404);
    conforms("get", "/users/{user_id}/devices", None, s, &b);

    // Cross-user: bob's device is not alice's.
    let (s, b) = api.delete(&format!("/users/alice/devices/{}", bob_connected.device_hash)).await;
    assert_eq!(s, 404);
    conforms("delete", "/users/{user_id}/devices/{device_hash}", None, s, &b);
    let (s, b) = api.delete("/users/alice/devices/NOT-A-HASH").await;
    assert_eq!(s, 400);
    conforms("delete", "/users/{user_id}/devices/{device_hash}", None, s, &b);
    let (s, b) = api.delete(&format!("/users/alice/devices/{}", connected.device_hash)).await;
    assert_eq!(s, 204);
    conforms("delete", "/users/{user_id}/devices/{device_hash}", None, s, &b);

    let (s, b) = api.delete(&format!("/sessions/{}", bob_session["session_id"].as_str().unwrap())).await;
    assert_eq!(s, 204);
    conforms("delete", "/sessions/{session_id}", None, s, &b);
    let (s, b) = api.delete("/sessions/doesnotexist").await;
    assert_eq!(s, 404);
    conforms("delete", "/sessions/{session_id}", None, s, &b);

    // No key: 401 on every operation, in the spec's error shape.
    let anonymous = reqwest::Client::new();
    let resp = anonymous.get(format!("{}/users/alice", api.base)).send().await.unwrap();
    let status = resp.status().as_u16();
    let b: Value = resp.json().await.unwrap();
    assert_eq!(status, 401);
    conforms("get", "/users/{user_id}", None, status, &b);
    drop((client, bob_client));
}

#[tokio::test]
async fn posting_a_message_answers_as_the_spec_says() {
    let server = TestServer::start().await;
    let api = server.api().await;
    api.post("/users", json!({"user_id": "alice"})).await;
    api.post("/users", json!({"user_id": "bob"})).await;
    let template = "/users/{user_id}/chats/{chat_id}/messages";
    let body = json!({"message_id": "m1", "sender_name": "assistant", "content": "hello"});
    let (s, b) = api.post("/users/alice/chats/c1/messages", body.clone()).await;
    if s == 404 && b["error"]["message"] == "No such endpoint." {
        eprintln!("POST …/messages is not routed on this server yet (SERVER_API.md section 3): skipped");
        return;
    }
    assert_eq!(s, 201, "{b}");
    conforms("post", template, Some(&body), s, &b);
    let (s, b) = api.post("/users/alice/chats/c1/messages", body.clone()).await;
    assert_eq!((s, &b["duplicate"]), (200, &json!(true)));
    conforms("post", template, Some(&body), s, &b);
    // Cross-user: alice's chat is not bob's.
    let (s, b) = api.post("/users/bob/chats/c1/messages", body.clone()).await;
    assert_eq!(s, 404);
    conforms("post", template, None, s, &b);
    let (s, b) = api.post("/users/alice/chats/c1/messages", json!({"message_id": "m2", "content": "x"})).await;
    assert_eq!(s, 400);
    conforms("post", template, None, s, &b);
}

#[tokio::test]
async fn streams_answer_as_the_spec_says() {
    let server = TestServer::start().await;
    let api = server.api().await;
    api.post("/users", json!({"user_id": "alice"})).await;
    api.post("/users", json!({"user_id": "bob"})).await;
    let start = "/users/{user_id}/chats/{chat_id}/streams";
    let chunks = "/users/{user_id}/chats/{chat_id}/streams/{stream_id}/chunks";
    let complete = "/users/{user_id}/chats/{chat_id}/streams/{stream_id}/complete";
    let abort = "/users/{user_id}/chats/{chat_id}/streams/{stream_id}";

    let body = json!({"stream_id": "s1", "message_id": "m1", "sender_name": "assistant", "meta": {"model": "x"}});
    let (s, b) = api.post("/users/alice/chats/c1/streams", body.clone()).await;
    assert_eq!(s, 201, "{b}");
    conforms("post", start, Some(&body), s, &b);
    let (s, b) = api.post("/users/alice/chats/c1/streams", body.clone()).await;
    assert_eq!(s, 200, "{b}");
    conforms("post", start, Some(&body), s, &b);
    let (s, b) = api.post("/users/nobody/chats/c1/streams", body.clone()).await;
    assert_eq!(s, 404, "{b}");
    conforms("post", start, None, s, &b);

    let chunk = json!({"seq": 1, "delta": "Hel"});
    let (s, b) = api.post("/users/alice/chats/c1/streams/s1/chunks", chunk.clone()).await;
    assert_eq!(s, 202, "{b}");
    conforms("post", chunks, Some(&chunk), s, &b);
    let (s, b) = api.post("/users/alice/chats/c1/streams/s1/chunks", chunk.clone()).await;
    assert_eq!(s, 200, "{b}");
    conforms("post", chunks, Some(&chunk), s, &b);
    let (s, b) = api.post("/users/alice/chats/c1/streams/s1/chunks", json!({"seq": 3, "delta": "x"})).await;
    assert_eq!(s, 409, "{b}");
    conforms("post", chunks, None, s, &b);
    // Cross-user: bob has no such stream.
    let (s, b) = api.post("/users/bob/chats/c1/streams/s1/chunks", json!({"seq": 2, "delta": "x"})).await;
    assert!(s == 404 || s == 409, "{s} {b}");
    conforms("post", chunks, None, s, &b);

    let (s, b) = api.post("/users/alice/chats/c1/streams/s1/complete", json!({})).await;
    assert_eq!(s, 201, "{b}");
    conforms("post", complete, Some(&json!({})), s, &b);
    let (s, b) = api.post("/users/alice/chats/c1/streams/s1/complete", json!({})).await;
    assert_eq!(s, 409, "{b}");
    conforms("post", complete, None, s, &b);

    let body = json!({"stream_id": "s2", "message_id": "m2", "sender_name": "assistant"});
    api.post("/users/alice/chats/c1/streams", body).await;
    let (s, b) = api.delete("/users/alice/chats/c1/streams/s2").await;
    assert_eq!(s, 204, "{b}");
    conforms("delete", abort, None, s, &b);
    let (s, b) = api.delete("/users/alice/chats/c1/streams/s2").await;
    assert!(s == 404 || s == 409, "{s} {b}");
    conforms("delete", abort, None, s, &b);
}

/// The bounds of a session request are the spec's: every body below is refused by the server (400) exactly
/// when the spec's request schema refuses it. (The spec allowed `ttl_secs` 0 and any `device_id`, so a client
/// generated from it sent requests the server answers 400.)
#[tokio::test]
async fn a_session_requests_bounds_are_the_specs() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;
    let schema =
        &OPENAPI["paths"]["/users/{user_id}/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let ten_years = 10 * 365 * 24 * 3600_u64;
    for body in [
        json!({"ttl_secs": 0}),
        json!({"ttl_secs": 1}),
        json!({"ttl_secs": ten_years}),
        json!({"ttl_secs": ten_years + 1}),
        json!({"device_id": ""}),
        json!({"device_id": "d".repeat(128)}),
        json!({"device_id": "d".repeat(129)}),
        json!({"device_id": "tab\u{7f}"}),
        json!({"device_id": "tablet é"}),
        json!({"device_id": " ~"}),
    ] {
        let (status, reply) = api.post("/users/alice/sessions", body.clone()).await;
        let spec_takes = errors(schema, &body).is_empty();
        assert!(status == 201 || status == 400, "{body}: {status} {reply}");
        assert_eq!(
            status == 201,
            spec_takes,
            "{body}: the server answered {status}, the spec says valid: {spec_takes}"
        );
    }
}

/// The ids, chunk numbers and completion contents of message and stream bodies are bounded as the server
/// bounds them: every body below is refused by the server (400) exactly when the spec's request schema
/// refuses it. (The spec had no bounds on `message_id`, `stream_id` and `sender_name`, allowed chunk `seq`
/// 0, and any JSON value as a completion's `content`, so a client generated from it sent requests the
/// server answers 400.)
#[tokio::test]
async fn message_and_stream_bodies_are_bounded_as_the_spec_says() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;
    let schema_of = |template: &str| {
        OPENAPI["paths"][template]["post"]["requestBody"]["content"]["application/json"]["schema"].clone()
    };
    let ids = ["", "a", "A-z_0.9:x", "a b", "a/b", "é", &"m".repeat(128), &"m".repeat(129)];
    let senders = ["assistant", "bot@x.y", "user", "", "a b", "a:b", &"s".repeat(64), &"s".repeat(65)];
    let mut n = 0;
    let mut unique = || {
        n += 1;
        format!("u{n}")
    };

    let mut cases = Vec::new();
    let messages = "/users/{user_id}/chats/{chat_id}/messages";
    for id in ids {
        cases.push((messages, json!({"message_id": id, "sender_name": "assistant", "content": "x"})));
    }
    for sender in senders {
        cases.push((messages, json!({"message_id": unique(), "sender_name": sender, "content": "x"})));
    }
    let streams = "/users/{user_id}/chats/{chat_id}/streams";
    for id in ids {
        cases.push((streams, json!({"stream_id": id, "message_id": unique(), "sender_name": "assistant"})));
        cases.push((streams, json!({"stream_id": unique(), "message_id": id, "sender_name": "assistant"})));
    }
    for sender in senders {
        cases.push((streams, json!({"stream_id": unique(), "message_id": unique(), "sender_name": sender})));
    }
    for (template, body) in cases {
        let path = template.replace("{user_id}", "alice").replace("{chat_id}", "c1");
        let (status, reply) = api.post(&path, body.clone()).await;
        // Each accepted start opens a stream: end it, so the user's cap of open streams is never reached.
        if template == streams && status == 201 {
            let stream = body["stream_id"].as_str().unwrap();
            assert_eq!(api.delete(&format!("{path}/{stream}")).await.0, 204);
        }
        server_and_spec_agree(&schema_of(template), &body, (status, &reply), 201);
    }

    let complete = "/users/{user_id}/chats/{chat_id}/streams/{stream_id}/complete";
    for content in [json!(null), json!("x"), json!({"a": 1}), json!(5), json!([1]), json!(true)] {
        let stream = unique();
        let start = json!({"stream_id": stream, "message_id": stream, "sender_name": "assistant"});
        assert_eq!(api.post("/users/alice/chats/c1/streams", start).await.0, 201);
        let path = format!("/users/alice/chats/c1/streams/{stream}");
        let body = json!({ "content": content });
        let (status, reply) = api.post(&format!("{path}/complete"), body.clone()).await;
        if status != 201 {
            assert_eq!(api.delete(&path).await.0, 204);
        }
        server_and_spec_agree(&schema_of(complete), &body, (status, &reply), 201);
    }

    let start = json!({"stream_id": "s1", "message_id": "m1", "sender_name": "assistant"});
    assert_eq!(api.post("/users/alice/chats/c1/streams", start).await.0, 201);
    let chunks = "/users/{user_id}/chats/{chat_id}/streams/{stream_id}/chunks";
    for body in [json!({"seq": 0, "delta": "x"}), json!({"seq": 1, "delta": "x"})] {
        let (status, reply) = api.post("/users/alice/chats/c1/streams/s1/chunks", body.clone()).await;
        server_and_spec_agree(&schema_of(chunks), &body, (status, &reply), 202);
    }
}

/// The server took `body` (answered `success`) exactly when `schema` takes it, and refused it with 400
/// otherwise.
fn server_and_spec_agree(schema: &Value, body: &Value, (status, reply): (u16, &Value), success: u16) {
    let spec_takes = errors(schema, body).is_empty();
    assert!(status == success || status == 400, "{body}: {status} {reply}");
    assert_eq!(
        status == success,
        spec_takes,
        "{body}: the server answered {status}, the spec says valid: {spec_takes}"
    );
}
