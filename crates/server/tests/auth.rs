//! Authentication and devices (PROTOCOL.md section 2): every close code and reason of the table.

mod common;

use chatsync::gateway::auth::{self, sha256_hex};
use chatsync_client::{Client, ConnectOptions, TokenPlacement};
use chatsync_protocol::ServerMessage;
use common::TestServer;
use std::time::Duration;

fn opts(token: &str, device: &str) -> ConnectOptions {
    ConnectOptions::new(token, device)
}

#[tokio::test]
async fn no_token_is_authentication_required() {
    let server = TestServer::start().await;
    let close = server.refused(&ConnectOptions { device_id: Some("d".into()), ..Default::default() }).await;
    assert_eq!(close, (1008, "Authentication required".into()));
}

#[tokio::test]
async fn unknown_token_is_invalid_session() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    assert_eq!(server.refused(&opts("not-a-token", "d")).await, (1008, "Invalid session".into()));
    let huge = "x".repeat(5000);
    assert_eq!(server.refused(&opts(&huge, "d")).await, (1008, "Invalid session".into()));
}

#[tokio::test]
async fn expired_token_is_invalid_session() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let token = auth::issue_session(server.ctx.store.as_ref(), "alice", None, Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(server.refused(&opts(&token, "d")).await, (1008, "Invalid session".into()));
}

#[tokio::test]
async fn revoked_token_is_invalid_session() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    assert!(server.ctx.store.revoke_session(&auth::token_hash(&token), chatsync::store::now_millis()).await.unwrap());
    assert_eq!(server.refused(&opts(&token, "d")).await, (1008, "Invalid session".into()));
}

const APP: &str = "https://app.example";

fn with_origin(mut o: ConnectOptions, origin: &str) -> ConnectOptions {
    o.headers.push(("Origin".into(), origin.into()));
    o
}

async fn http_status(server: &TestServer, o: &ConnectOptions) -> u16 {
    match Client::connect(&server.url, o).await {
        Err(chatsync_client::ClientError::Ws(chatsync_client::tungstenite::Error::Http(resp))) => {
            resp.status().as_u16()
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

#[tokio::test]
async fn token_is_read_from_cookie_bearer_and_query() {
    let server = TestServer::start_with(|c| c.allowed_origins = vec![APP.into()]).await;
    let token = server.user_token("alice").await;
    for placement in [TokenPlacement::Cookie, TokenPlacement::Bearer, TokenPlacement::Query] {
        let o = with_origin(ConnectOptions { token_placement: placement, ..opts(&token, "d") }, APP);
        let (_c, hello) = Client::connect_authenticated(&server.url, &o).await.unwrap();
        assert_eq!(hello.user_id, "alice", "{placement:?}");
    }
}

#[tokio::test]
async fn cookie_wins_over_bearer() {
    let server = TestServer::start_with(|c| c.allowed_origins = vec![APP.into()]).await;
    let alice = server.user_token("alice").await;
    let bob = server.user_token("bob").await;
    let mut o = with_origin(ConnectOptions { token_placement: TokenPlacement::Bearer, ..opts(&bob, "d") }, APP);
    o.headers.push(("Cookie".into(), format!("theme=dark; auth_refresh_token={alice}")));
    let (_c, hello) = Client::connect_authenticated(&server.url, &o).await.unwrap();
    assert_eq!(hello.user_id, "alice");
}

/// An empty cookie is no cookie, quoted (`auth_refresh_token=""`, as a logout may leave it) or not: the
/// bearer token of the same upgrade is used, without the cookie's Origin rule.
#[tokio::test]
async fn an_empty_cookie_is_no_cookie() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    for cookie in ["auth_refresh_token=", "auth_refresh_token=\"\"", "theme=dark; auth_refresh_token=\"\""] {
        let mut o = ConnectOptions { token_placement: TokenPlacement::Bearer, ..opts(&token, "d") };
        o.headers.push(("Cookie".into(), cookie.into()));
        let (_c, hello) =
            Client::connect_authenticated(&server.url, &o).await.unwrap_or_else(|e| panic!("{cookie}: {e}"));
        assert_eq!(hello.user_id, "alice");
    }
}

/// Cross-site WebSocket hijacking: the cookie counts only with an Origin from the allow-list.
#[tokio::test]
async fn a_cookie_without_an_allowed_origin_is_refused_with_403() {
    // No allow-list: cookie authentication is off, whatever the Origin.
    let open = TestServer::start().await;
    let token = open.user_token("alice").await;
    let cookie = ConnectOptions { token_placement: TokenPlacement::Cookie, ..opts(&token, "d") };
    assert_eq!(http_status(&open, &cookie).await, 403);
    assert_eq!(http_status(&open, &with_origin(cookie.clone(), "https://evil.example")).await, 403);
    assert_eq!(http_status(&open, &with_origin(cookie.clone(), APP)).await, 403);
    // Bearer and query tokens are not affected, with or without an Origin.
    for placement in [TokenPlacement::Bearer, TokenPlacement::Query] {
        let o = ConnectOptions { token_placement: placement, ..opts(&token, "d") };
        Client::connect_authenticated(&open.url, &o).await.unwrap();
        Client::connect_authenticated(&open.url, &with_origin(o, "https://evil.example")).await.unwrap();
    }

    // With an allow-list: a cookie needs an Origin, and one from the list.
    let guarded = TestServer::start_with(|c| c.allowed_origins = vec![APP.into()]).await;
    let token = guarded.user_token("alice").await;
    let cookie = ConnectOptions { token_placement: TokenPlacement::Cookie, ..opts(&token, "d") };
    assert_eq!(http_status(&guarded, &cookie).await, 403, "a cookie without an Origin");
    assert_eq!(http_status(&guarded, &with_origin(cookie.clone(), "https://evil.example")).await, 403);
    Client::connect_authenticated(&guarded.url, &with_origin(cookie, APP)).await.unwrap();
    let bearer = ConnectOptions { token_placement: TokenPlacement::Bearer, ..opts(&token, "d") };
    Client::connect_authenticated(&guarded.url, &bearer).await.unwrap();
}

#[tokio::test]
async fn second_device_with_the_same_token_is_a_device_mismatch() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (_laptop, hello) = server.connect(&token, "laptop").await;
    assert_eq!(hello.device_hash, sha256_hex("id:laptop"));
    assert_eq!(server.refused(&opts(&token, "phone")).await, (1008, "Device mismatch".into()));
    // The bound device still gets in.
    server.connect(&token, "laptop").await;
}

#[tokio::test]
async fn device_mismatch_says_2fa_required_when_the_user_has_2fa() {
    let server = TestServer::start().await;
    server.user("carol", true).await;
    let token = server.token("carol").await;
    server.connect(&token, "laptop").await;
    assert_eq!(server.refused(&opts(&token, "phone")).await, (1008, "Device mismatch, 2FA required".into()));
}

#[tokio::test]
async fn session_bound_at_issue_admits_only_that_device() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let hash = auth::device_hash_for_id("tablet").unwrap();
    let token =
        auth::issue_session(server.ctx.store.as_ref(), "alice", Some(hash), Duration::from_secs(60)).await.unwrap();
    assert_eq!(server.refused(&opts(&token, "laptop")).await, (1008, "Device mismatch".into()));
    server.connect(&token, "tablet").await;
}

#[tokio::test]
async fn fingerprint_without_device_id_uses_user_agent_and_language() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let browser = |ua: &str| ConnectOptions {
        token: Some(token.clone()),
        headers: vec![("User-Agent".into(), ua.into()), ("Accept-Language".into(), "en-GB".into())],
        ..Default::default()
    };
    let (_c, hello) = Client::connect_authenticated(&server.url, &browser("Firefox/130")).await.unwrap();
    assert_eq!(hello.device_hash, sha256_hex("ua:Firefox/130|lang:en-GB"));
    assert_eq!(server.refused(&browser("Chrome/140")).await, (1008, "Device mismatch".into()));
}

#[tokio::test]
async fn device_id_in_query_is_the_same_device_as_the_header() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    server.connect(&token, "tab-7").await;
    let o =
        ConnectOptions { device_id_in_query: true, token_placement: TokenPlacement::Query, ..opts(&token, "tab-7") };
    let (_c, hello) = Client::connect_authenticated(&server.url, &o).await.unwrap();
    assert_eq!(hello.device_hash, sha256_hex("id:tab-7"));
}

/// A query parameter given twice counts once, with its first value, as a repeated header or cookie does:
/// the device id is never dropped for the User-Agent fingerprint (which would bind the session to a device
/// the client did not name), nor the query token.
#[tokio::test]
async fn a_repeated_query_parameter_counts_with_its_first_value() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let url = format!("{}?device_id=phone&device_id=laptop", server.url);
    let bearer = ConnectOptions { device_id: None, ..opts(&token, "") };
    let (_c, hello) = Client::connect_authenticated(&url, &bearer).await.unwrap();
    assert_eq!(hello.device_hash, sha256_hex("id:phone"));
    let url = format!("{}?token={token}&token=cs_other", server.url);
    let (_c, hello) = Client::connect_authenticated(&url, &opts_without_token("phone")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
}

fn opts_without_token(device: &str) -> ConnectOptions {
    ConnectOptions { token: None, ..opts("", device) }
}

#[tokio::test]
async fn malformed_device_id_is_refused() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let long = "d".repeat(129);
    assert_eq!(server.refused(&opts(&token, &long)).await, (1008, "Invalid device id".into()));
}

#[tokio::test]
async fn devices_are_recorded_per_user() {
    let server = TestServer::start().await;
    let alice = server.user_token("alice").await;
    let alice2 = server.token("alice").await;
    let bob = server.user_token("bob").await;
    server.connect(&alice, "laptop").await;
    server.connect(&alice2, "phone").await;
    server.connect(&bob, "desk").await;
    let mut devices: Vec<String> =
        server.ctx.store.devices("alice").await.unwrap().into_iter().map(|d| d.device_hash).collect();
    devices.sort();
    let mut expected = vec![sha256_hex("id:laptop"), sha256_hex("id:phone")];
    expected.sort();
    assert_eq!(devices, expected);
    assert_eq!(server.ctx.store.devices("bob").await.unwrap().len(), 1);
}

/// A session valid when its connection read it, revoked before the connection was registered (the
/// revocation found no connection of it to close): the connection is refused at once, not left open until
/// the periodic check (an hour here).
#[tokio::test]
async fn a_session_revoked_while_its_connection_is_being_set_up_is_refused() {
    let server = TestServer::start_with(|c| c.session_check_interval_secs = 3600).await;
    let doomed = server.user_token("alice").await;
    let kept = server.token("alice").await;
    let mut held = server.ctx.pauses.arm(chatsync::pause::AUTHENTICATED);
    let mut phone = Client::connect(&server.url, &opts(&doomed, "phone")).await.unwrap();
    held.reached().await;
    // Another session of the user, being set up at the same time, is checked again and let in.
    let mut held_too = server.ctx.pauses.arm(chatsync::pause::AUTHENTICATED);
    let laptop = tokio::spawn({
        let (url, kept) = (server.url.clone(), kept.clone());
        async move {
            let opts = ConnectOptions { ignore_warmup_events: true, ..opts(&kept, "laptop") };
            Client::connect_authenticated(&url, &opts).await.unwrap().0
        }
    });
    held_too.reached().await;
    assert!(server.ctx.store.revoke_session(&auth::token_hash(&doomed), chatsync::store::now_millis()).await.unwrap());
    server
        .ctx
        .hub
        .close_sessions(&[session_of(&server, &doomed).await], chatsync::hub::CloseReason::SESSION_REVOKED)
        .await;
    held.release();
    held_too.release();
    match tokio::time::timeout(Duration::from_secs(10), phone.recv()).await.expect("an answer") {
        Err(chatsync_client::ClientError::Closed(close)) => {
            assert_eq!(close, Some((1008, "Session revoked".into())))
        }
        other => panic!("the connection of a revoked session was set up: {other:?}"),
    }
    let mut laptop = laptop.await.unwrap();
    let pong = laptop.request(&chatsync_protocol::ClientMessage::Ping(Default::default())).await.unwrap();
    assert_eq!(pong.message, ServerMessage::Pong(Default::default()));
}

/// The id of the session of `token`.
async fn session_of(server: &TestServer, token: &str) -> String {
    server.ctx.store.session_by_token_hash(&auth::token_hash(token)).await.unwrap().unwrap().session_id
}

#[tokio::test]
async fn revoking_a_session_closes_its_open_connections_only() {
    let server = TestServer::start_with(|c| c.session_check_interval_secs = 1).await;
    let doomed = server.user_token("alice").await;
    let kept = server.token("alice").await;
    let (mut a, _) = server.connect(&doomed, "laptop").await;
    let (mut b, _) = server.connect(&doomed, "laptop").await;
    let (mut other, _) = server.connect(&kept, "phone").await;
    assert!(server.ctx.store.revoke_session(&auth::token_hash(&doomed), chatsync::store::now_millis()).await.unwrap());
    assert_eq!(a.recv_close().await.unwrap(), (1008, "Session revoked".into()));
    assert_eq!(b.recv_close().await.unwrap(), (1008, "Session revoked".into()));
    let pong = other.request(&chatsync_protocol::ClientMessage::Ping(Default::default())).await.unwrap();
    assert_eq!(pong.message, ServerMessage::Pong(Default::default()));
}

#[tokio::test]
async fn backend_failure_during_authentication_is_1011() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    server.ctx.store.close().await;
    assert_eq!(server.refused(&opts(&token, "d")).await, (1011, "Authentication error".into()));
}

#[tokio::test]
async fn node_at_its_connection_limit_is_overloaded() {
    let server = TestServer::start_with(|c| c.max_connections = 1).await;
    let token = server.user_token("alice").await;
    let (first, _) = server.connect(&token, "d").await;
    assert_eq!(server.refused(&opts(&token, "d")).await, (1013, "Server overloaded".into()));
    // Counted like every other refusal, so that an operator sees the node turning clients away.
    let metrics = server.metrics().await;
    let refused = common::sample(&metrics, "chatsync_connects_total", "result=\"Server overloaded\"");
    assert_eq!(refused, Some(1.0), "{metrics}");
    first.close().await.unwrap();
    // The slot is freed once the first connection is gone.
    let mut tries = 0;
    loop {
        let mut c = Client::connect(&server.url, &opts(&token, "d")).await.unwrap();
        match c.recv().await {
            Ok(m) if matches!(m.message, ServerMessage::Connected(_)) => break,
            _ if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("slot never freed: {other:?}"),
        }
    }
}

/// One user cannot take all of a node's slots: beyond the per-user cap, 1013 `Too many connections`;
/// other users still get in, and a closed connection frees its slot.
#[tokio::test]
async fn a_user_beyond_the_per_user_cap_gets_1013_too_many_connections() {
    let server = TestServer::start_with(|c| c.max_connections_per_user = 3).await;
    let token = server.user_token("alice").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(server.connect(&token, "d").await.0);
    }
    assert_eq!(server.refused(&opts(&token, "d")).await, (1013, "Too many connections".into()));
    // A device whose connection the cap refused is not recorded as one of the user's devices.
    let other = server.token("alice").await;
    assert_eq!(server.refused(&opts(&other, "tablet")).await, (1013, "Too many connections".into()));
    let devices = server.ctx.store.devices("alice").await.unwrap();
    assert_eq!(devices.iter().map(|d| d.device_hash.clone()).collect::<Vec<_>>(), [sha256_hex("id:d")]);
    let metrics = server.metrics().await;
    let refused = common::sample(&metrics, "chatsync_connects_total", "result=\"Too many connections\"");
    assert_eq!(refused, Some(2.0), "both refusals are counted: {metrics}");
    let bob = server.user_token("bob").await;
    server.connect(&bob, "d").await;
    open.pop().unwrap().close().await.unwrap();
    // The slot is free once the server has seen the close.
    loop {
        let mut c = Client::connect(&server.url, &opts(&token, "d")).await.unwrap();
        match c.recv().await {
            Ok(m) if matches!(m.message, ServerMessage::Connected(_)) => break,
            Err(chatsync_client::ClientError::Closed(Some((1013, reason)))) => {
                assert_eq!(reason, "Too many connections");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
