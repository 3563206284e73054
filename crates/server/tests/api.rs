//! The server API's transport, authentication, users, sessions and devices (SERVER_API.md sections 1-2),
//! over real HTTP against the real server, with real WebSocket clients for the revocation effects.

mod common;

use chatsync_client::ConnectOptions;
use common::{Api, TestServer};
use serde_json::json;

fn error_code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

async fn raw_response(server: &TestServer, auth: Option<&str>, path: &str) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{}{path}", server.api_base()));
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    req.send().await.unwrap()
}

async fn raw(server: &TestServer, auth: Option<&str>, path: &str) -> (u16, serde_json::Value) {
    let resp = raw_response(server, auth, path).await;
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn requests_without_a_valid_api_key_are_unauthorized() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    assert_eq!(api.get("/users/alice").await.0, 200);

    for auth in
        [None, Some("Bearer"), Some("Bearer ck_unknown"), Some("Basic abc"), Some(&format!("Bearer{}", api.key))]
    {
        let (status, body) = raw(&server, auth.map(|s| s as &str), "/users/alice").await;
        assert_eq!((status, error_code(&body)), (401, "unauthorized"), "auth {auth:?}");
    }
    // A session token is not an API key.
    let token = server.token("alice").await;
    let (status, body) = raw(&server, Some(&format!("Bearer {token}")), "/users/alice").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    // Unknown paths under /v1/api answer in the API's format, after authentication.
    assert_eq!(raw(&server, None, "/nope").await.0, 401);
    let (status, body) = api.get("/nope").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    // The prefix itself, with and without its trailing slash (`/v1/api/` fell through to the web server's
    // empty 404, before authentication).
    for root in ["", "/"] {
        let (status, body) = raw(&server, None, root).await;
        assert_eq!((status, error_code(&body)), (401, "unauthorized"), "{root:?}");
        let (status, body) = api.get(root).await;
        assert_eq!((status, error_code(&body)), (404, "not_found"), "{root:?}");
    }
    // A known path with a method it does not have, and a path segment that is not UTF-8: the API's
    // format too (not the framework's empty 405 or plain-text 400).
    let (status, body) = api.call(reqwest::Method::PUT, "/users/alice", None).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = api.get("/users/%FF").await;
    assert_eq!((status, error_code(&body), body["error"]["field"].as_str()), (400, "invalid_payload", Some("path")));
}

/// A 401 carries a `WWW-Authenticate` challenge (RFC 9110 section 15.5.2: a server generating a 401 MUST
/// send one; RFC 6750 section 3 for the `Bearer` scheme), for a missing key and for a refused one alike.
#[tokio::test]
async fn a_401_names_the_bearer_scheme_in_www_authenticate() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    for auth in [None, Some("Basic abc"), Some("Bearer ck_unknown")] {
        let resp = raw_response(&server, auth, "/users/alice").await;
        assert_eq!(resp.status(), 401, "auth {auth:?}");
        let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        assert!(challenge.as_deref().is_some_and(|c| c.starts_with("Bearer")), "auth {auth:?}: {challenge:?}");
    }
    let resp = raw_response(&server, Some(&format!("Bearer {}", api.key)), "/users/alice").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("www-authenticate").is_none(), "no challenge on success");
}

/// Every API response, a new session token's first, is `Cache-Control: no-store` and `nosniff`, errors
/// (a refused key, an unknown path) too: no cache between the backend and the server keeps a token or a
/// user's data.
#[tokio::test]
async fn api_responses_are_never_cached() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    let key = format!("Bearer {}", api.key);
    let issued = reqwest::Client::new()
        .post(format!("{}/users/alice/sessions", server.api_base()))
        .header("Authorization", &key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(issued.status(), 201);
    let mut responses = vec![("session issue", issued)];
    responses.push(("refused key", raw_response(&server, Some("Bearer ck_unknown"), "/users/alice").await));
    responses.push(("unknown path", raw_response(&server, Some(&key), "/nope").await));
    responses.push(("user", raw_response(&server, Some(&key), "/users/alice").await));
    for (what, resp) in responses {
        let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(header("cache-control").as_deref(), Some("no-store"), "{what}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "{what}");
    }
}

/// The auth-scheme of `Authorization` is case-insensitive (RFC 9110 section 11.1), as `/v1/ws` already
/// reads it: `BEARER <key>` was 401 because only `Bearer ` and `bearer ` were looked for.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, body) = raw(&server, Some(&format!("{scheme} {}", api.key)), "/users/alice").await;
        assert_eq!(status, 200, "scheme {scheme}: {body}");
    }
    let (status, body) = raw(&server, Some(&format!("Basic {}", api.key)), "/users/alice").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"), "another scheme is still refused");
}

#[tokio::test]
async fn a_revoked_api_key_is_refused_at_once() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    let other = server.api().await;
    assert_eq!(api.get("/users/alice").await.0, 200);
    let keys = server.ctx.store.api_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    // By the key's own id: the list is ordered by creation time, and both may share a millisecond.
    assert!(server.ctx.store.revoke_api_key(&api.key_id, chatsync::store::now_millis()).await.unwrap());
    let (status, body) = api.get("/users/alice").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    assert_eq!(other.get("/users/alice").await.0, 200, "only the revoked key is refused");
    assert!(!server.ctx.store.revoke_api_key(&api.key_id, chatsync::store::now_millis()).await.unwrap());
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not() {
    let server = TestServer::start_with(|c| {
        c.api_rate_per_sec = 1;
        c.api_rate_burst = 3;
    })
    .await;
    server.user("alice", false).await;
    let api = server.api().await;
    for _ in 0..3 {
        assert_eq!(api.get("/users/alice").await.0, 200, "the burst passes");
    }
    // At one request per second, one of the next 50 is refused (all of them unless the machine needs
    // more than a second per request).
    let mut refused = None;
    for _ in 0..50 {
        let resp = raw_response(&server, Some(&format!("Bearer {}", api.key)), "/users/alice").await;
        if resp.status() == 429 {
            refused = Some(resp);
            break;
        }
    }
    let resp = refused.expect("a request over the rate is refused");
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After in whole seconds, at least 1: {retry}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "rate_limited");
    // Another key has its own bucket; a bad key is still 401, not 429.
    assert_eq!(server.api().await.get("/users/alice").await.0, 200);
    let (status, body) = raw(&server, Some("Bearer ck_unknown"), "/users/alice").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
}

#[tokio::test]
async fn an_api_key_is_not_a_websocket_token() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let (code, reason) = server.refused(&ConnectOptions::new(&api.key, "laptop")).await;
    assert_eq!((code, reason.as_str()), (1008, "Invalid session"));
}

#[tokio::test]
async fn creating_users_and_its_errors() {
    let server = TestServer::start().await;
    let api = server.api().await;
    assert!(server.ctx.chats.user_key("alice").await.unwrap().is_none());
    let (status, body) = api.post("/users", json!({"user_id": "alice"})).await;
    assert_eq!((status, body), (201, json!({"user_id": "alice"})));
    let stored = server.ctx.chats.user_key("alice").await.unwrap();
    assert!(stored.is_some(), "the user's data key is created with the user, not in its first write");
    server.ctx.keys.user_key(server.ctx.chats.as_ref(), "alice").await.expect("and it opens under the master key");
    assert_eq!(server.ctx.chats.user_key("alice").await.unwrap(), stored, "the first use keeps it");
    let (status, body) = api.post("/users", json!({"user_id": "bob", "tfa": true})).await;
    assert_eq!(status, 201, "{body}");
    assert!(server.ctx.store.user("bob").await.unwrap().unwrap().tfa_enabled);

    let (status, body) = api.post("/users", json!({"user_id": "alice"})).await;
    assert_eq!((status, error_code(&body)), (409, "conflict"));
    let (status, body) = api.post("/users", json!({"user_id": "bad id!"})).await;
    assert_eq!((status, error_code(&body), body["error"]["field"].as_str()), (400, "invalid_payload", Some("user_id")));
    let (status, body) = api.post("/users", json!({"user_id": "carol", "admin": true})).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_payload"), "unknown fields are refused");
    assert!(body["error"]["message"].as_str().unwrap().contains("admin"), "{body}");
    let (status, body) = api.post("/users", json!({"user_id": 7})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("user_id")));
    let (status, body) = api.post("/users", json!({})).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_payload"));
    assert!(server.ctx.store.user("carol").await.unwrap().is_none());
    assert!(server.ctx.chats.user_key("carol").await.unwrap().is_none(), "no key for a refused user");

    let resp = api
        .http
        .post(format!("{}/users", api.base))
        .bearer_auth(&api.key)
        .header("Content-Type", "application/json")
        .body("{\"user_id\":")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(error_code(&resp.json().await.unwrap()), "invalid_json");

    let big = format!("{{\"user_id\":\"{}\"}}", "a".repeat(300 * 1024));
    let resp = api.http.post(format!("{}/users", api.base)).bearer_auth(&api.key).body(big).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(error_code(&resp.json().await.unwrap()), "payload_too_large");
}

#[tokio::test]
async fn a_user_is_created_even_when_its_data_key_cannot_be_yet() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let faults = server.ctx.chats.writer_faults().expect("the SQLite store has a writer");
    faults.break_next(1);
    let (status, body) = api.post("/users", json!({"user_id": "dave"})).await;
    assert_eq!((status, body), (201, json!({"user_id": "dave"})));
    assert!(server.ctx.store.user("dave").await.unwrap().is_some());
    assert!(server.ctx.chats.user_key("dave").await.unwrap().is_none(), "the key's write broke");
    server.ctx.keys.user_key(server.ctx.chats.as_ref(), "dave").await.expect("the first use creates it, as before");
    assert!(server.ctx.chats.user_key("dave").await.unwrap().is_some());
}

#[tokio::test]
async fn showing_a_user() {
    let server = TestServer::start().await;
    let api = server.api().await;
    let token = server.user_token("alice").await;
    let (mut phone, _) = server.connect(&token, "phone").await;
    phone.request(&sync_util_title("c1")).await.unwrap();

    let (status, body) = api.get("/users/alice").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "alice");
    assert_eq!(body["tfa"], false);
    assert_eq!(body["chat_count"], 1);
    assert_eq!(body["device_count"], 1);
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, body) = api.get("/users/nobody").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = api.get("/users/bad%20id").await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("user_id")));
}

fn sync_util_title(chat_id: &str) -> chatsync_protocol::ClientMessage {
    chatsync_protocol::ClientMessage::UpdateTitle(chatsync_protocol::UpdateTitle {
        chat_id: chatsync_protocol::ChatId::new(chat_id).unwrap(),
        new_title: "t".into(),
    })
}

#[tokio::test]
async fn issuing_a_session_over_the_api() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;

    let (status, body) = api.post("/users/alice/sessions", json!({})).await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("cs_"));
    assert!(body["session_id"].as_str().is_some() && body["expires_at"].as_str().is_some());
    let (_phone, connected) = server.connect(token, "phone").await;
    assert_eq!(connected.user_id, "alice");

    // Bound at issue to a device id: another device is refused.
    let (status, body) = api.post("/users/alice/sessions", json!({"device_id": "laptop", "ttl_secs": 60})).await;
    assert_eq!(status, 201);
    let bound = body["token"].as_str().unwrap();
    let (code, reason) = server.refused(&ConnectOptions::new(bound, "tablet")).await;
    assert_eq!((code, reason.as_str()), (1008, "Device mismatch"));
    server.connect(bound, "laptop").await;

    let (status, body) = api.post("/users/nobody/sessions", json!({})).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = api.post("/users/alice/sessions", json!({"ttl_secs": 0})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("ttl_secs")));
    let (status, body) = api.post("/users/alice/sessions", json!({"device_id": ""})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("device_id")));
    let (status, body) = api.post("/users/alice/sessions", json!({"ttl": 5})).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_payload"));
}

async fn issue(api: &Api, user: &str, device: &str) -> (String, String) {
    let (status, body) = api.post(&format!("/users/{user}/sessions"), json!({"device_id": device})).await;
    assert_eq!(status, 201, "{body}");
    (body["session_id"].as_str().unwrap().to_owned(), body["token"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn revoking_a_session_closes_its_sockets_and_no_others() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;
    server.user("bob", false).await;
    let (phone_session, phone_token) = issue(&api, "alice", "phone").await;
    let (_, laptop_token) = issue(&api, "alice", "laptop").await;
    let (_, bob_token) = issue(&api, "bob", "phone").await;
    let (mut phone, _) = server.connect(&phone_token, "phone").await;
    let (mut laptop, _) = server.connect(&laptop_token, "laptop").await;
    let (mut bob, _) = server.connect(&bob_token, "phone").await;

    let (status, body) = api.delete(&format!("/sessions/{phone_session}")).await;
    assert_eq!((status, body), (204, serde_json::Value::Null));
    assert_eq!(phone.recv_close().await.unwrap(), (1008, "Session revoked".to_owned()));
    assert_eq!(server.refused(&ConnectOptions::new(&phone_token, "phone")).await.1, "Invalid session");
    // The other device and the other user are untouched.
    for client in [&mut laptop, &mut bob] {
        let reply = client.request(&chatsync_protocol::ClientMessage::Ping(chatsync_protocol::Empty {})).await.unwrap();
        assert!(matches!(reply.message, chatsync_protocol::ServerMessage::Pong(_)), "{reply:?}");
    }
    // Revoking again is idempotent; unknown and malformed ids are told apart.
    assert_eq!(api.delete(&format!("/sessions/{phone_session}")).await.0, 204);
    let (status, body) = api.delete("/sessions/0123456789abcdef0123456789abcdef").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = api.delete("/sessions/bad!id").await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("session_id")));
}

#[tokio::test]
async fn listing_and_revoking_devices() {
    let server = TestServer::start().await;
    let api = server.api().await;
    server.user("alice", false).await;
    server.user("bob", false).await;
    let (_, phone_token) = issue(&api, "alice", "phone").await;
    let (_, laptop_token) = issue(&api, "alice", "laptop").await;
    let (_, bob_token) = issue(&api, "bob", "phone").await;
    let (mut phone, connected) = server.connect(&phone_token, "phone").await;
    let (mut laptop, _) = server.connect(&laptop_token, "laptop").await;
    let (mut bob, _) = server.connect(&bob_token, "phone").await;

    let (status, body) = api.get("/users/alice/devices").await;
    assert_eq!(status, 200, "{body}");
    let devices = body["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().any(|d| d["device_hash"] == connected.device_hash.as_str()));
    assert!(devices.iter().all(|d| d["first_seen"].is_string() && d["last_seen"].is_string()));

    // Bob has a device with the same id, hence the same hash: revoking alice's leaves bob's alone.
    let (status, _) = api.delete(&format!("/users/alice/devices/{}", connected.device_hash)).await;
    assert_eq!(status, 204);
    assert_eq!(phone.recv_close().await.unwrap(), (1008, "Session revoked".to_owned()));
    for client in [&mut laptop, &mut bob] {
        let reply = client.request(&chatsync_protocol::ClientMessage::Ping(chatsync_protocol::Empty {})).await.unwrap();
        assert!(matches!(reply.message, chatsync_protocol::ServerMessage::Pong(_)), "{reply:?}");
    }

    let (status, body) = api.delete(&format!("/users/alice/devices/{}", "0".repeat(64))).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = api.delete("/users/alice/devices/ABC").await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("device_hash")));
    let (status, body) = api.get("/users/nobody/devices").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
}

/// A session is bound to its device by its first connection, at authentication; the device is recorded
/// only once a connection is admitted. A connection that a cap refused (here the user's connection cap)
/// leaves its session bound to a device that `GET …/devices` does not list. Revoking that device must
/// still revoke the session: it was 404 ("no device with this hash") and revoked nothing, so the session
/// connected from that device later, after the backend had been told there was nothing to revoke.
#[tokio::test]
async fn revoking_a_device_revokes_a_session_bound_to_it_before_the_device_was_recorded() {
    let server = TestServer::start_with(|c| c.max_connections_per_user = 1).await;
    let api = server.api().await;
    server.user("alice", false).await;
    let (_, laptop_token) = issue(&api, "alice", "laptop").await;
    let (laptop, _) = server.connect(&laptop_token, "laptop").await;
    // A session issued without a device: its first connection, from "phone", binds it, and is refused.
    let (status, body) = api.post("/users/alice/sessions", json!({})).await;
    assert_eq!(status, 201, "{body}");
    let phone_token = body["token"].as_str().unwrap().to_owned();
    let (code, _) = server.refused(&ConnectOptions::new(&phone_token, "phone")).await;
    assert_eq!(code, 1013, "the user's connection cap refuses the phone");
    let phone = chatsync::gateway::auth::device_hash_for_id("phone").unwrap();

    let (status, body) = api.delete(&format!("/users/alice/devices/{phone}")).await;
    assert_eq!(status, 204, "the phone's session is bound to it: {body}");
    let (status, body) = api.delete(&format!("/users/alice/devices/{phone}")).await;
    assert_eq!(status, 204, "a retry is 204, as for a listed device without active sessions: {body}");
    drop(laptop);
    while server.ctx.hub.connection_count() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refused = server.refused(&ConnectOptions::new(&phone_token, "phone")).await;
    assert_eq!(refused, (1008, "Invalid session".to_owned()), "the revoked device's session connected");
}

#[tokio::test]
async fn a_store_that_is_down_is_unavailable_not_an_error_of_the_caller() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let api = server.api().await;
    server.ctx.store.close().await;
    for (status, body) in [api.get("/users/alice").await, api.post("/users", json!({"user_id": "bob"})).await] {
        assert_eq!((status, error_code(&body)), (503, "unavailable"), "{body}");
        assert!(!body.to_string().contains("closed"), "no internal detail: {body}");
    }
}
