//! The gateway end to end: greeting, ping, envelope errors, frame errors, delivery, shutdown.

mod common;

use chatsync::hub::Audience;
use chatsync_client::tungstenite::Message;
use chatsync_client::{Client, ConnectOptions};
use chatsync_protocol::*;
use common::TestServer;

fn error_of(m: &Incoming) -> &ErrorPayload {
    match &m.message {
        ServerMessage::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn assert_alive(client: &mut Client) {
    let reply = client.request(&ClientMessage::Ping(Empty {})).await.unwrap();
    assert_eq!(reply.message, ServerMessage::Pong(Empty {}));
}

#[tokio::test]
async fn connected_greeting_carries_identity_and_configured_limits() {
    let server = TestServer::start_with(|c| {
        c.max_draft_chars = 1234;
        c.rate_burst = 77;
    })
    .await;
    let token = server.user_token("alice").await;
    let (_client, hello) = server.connect(&token, "laptop").await;
    assert_eq!(hello.user_id, "alice");
    assert_eq!(hello.protocol, "chatsync.v1");
    assert_eq!(hello.device_hash, chatsync::gateway::auth::sha256_hex("id:laptop"));
    assert_eq!(hello.limits.max_draft_chars, 1234);
    assert_eq!(hello.limits.rate_burst, 77);
    assert_eq!(hello.limits.max_frame_bytes, 65_536);
    assert!(!hello.connection_id.is_empty());
    assert!(humantime::parse_rfc3339_weak(&hello.server_time).is_ok(), "{}", hello.server_time);
}

#[tokio::test]
async fn ping_echoes_request_id_and_plain_ping_has_none() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    client.send_text(r#"{"type":"ping","payload":{},"request_id":"abc-1"}"#).await.unwrap();
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.message, ServerMessage::Pong(Empty {}));
    assert_eq!(reply.request_id.as_deref(), Some("abc-1"));
    client.send_text(r#"{"type":"ping"}"#).await.unwrap();
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.message, ServerMessage::Pong(Empty {}));
    assert_eq!(reply.request_id, None);
}

#[tokio::test]
async fn request_cache_status_answers() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    let reply = client.request(&ClientMessage::RequestCacheStatus(Empty {})).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::CacheStatusResponse(_)), "{reply:?}");
}

#[tokio::test]
async fn every_envelope_error_code_leaves_the_connection_usable() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    let cases: &[(&str, ErrorCode, Option<&str>)] = &[
        ("{oops", ErrorCode::InvalidJson, None),
        ("[1,2,3]", ErrorCode::InvalidMessage, None),
        (r#"{"payload":{}}"#, ErrorCode::InvalidMessage, None),
        (r#"{"type":"ping","payload":"x","request_id":"q1"}"#, ErrorCode::InvalidMessage, Some("q1")),
        (r#"{"type":"teleport","request_id":"q2"}"#, ErrorCode::UnknownType, Some("q2")),
        (
            r#"{"type":"update_title","payload":{"chat_id":"c1"},"request_id":"q3"}"#,
            ErrorCode::InvalidPayload,
            Some("q3"),
        ),
    ];
    for (frame, code, request_id) in cases {
        client.send_text(*frame).await.unwrap();
        let reply = client.recv().await.unwrap();
        let err = error_of(&reply);
        assert_eq!(err.code, *code, "{frame}");
        assert_eq!(reply.request_id.as_deref(), *request_id, "{frame}");
        assert!(!err.message.is_empty());
        assert_alive(&mut client).await;
    }
    client.send_text(r#"{"type":"teleport"}"#).await.unwrap();
    let reply = client.recv().await.unwrap();
    assert!(error_of(&reply).message.contains("teleport"));
    client.send_text(r#"{"type":"update_title","payload":{"chat_id":"c1"}}"#).await.unwrap();
    let reply = client.recv().await.unwrap();
    assert_eq!(error_of(&reply).field.as_deref(), Some("new_title"));
    assert!(error_of(&reply).message.contains("new_title"));
}

#[tokio::test]
async fn rate_limited_requests_are_dropped_with_an_error_and_the_connection_survives() {
    let server = TestServer::start_with(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 2;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    for i in 0..3 {
        client.send(&ClientMessage::Ping(Empty {}), Some(&format!("p{i}"))).await.unwrap();
    }
    // A dropped frame whose payload would not even have decoded still gets its request id back.
    let bad = r#"{"type":"update_title","request_id":"bad-1","payload":{"chat_id":5}}"#;
    client.send_raw(Message::text(bad)).await.unwrap();
    // A dropped initial sync is answered as every failure of one is: `initial_sync_error`.
    client.send_raw(Message::text(r#"{"type":"initial_sync_request","request_id":"sync-1"}"#)).await.unwrap();
    let bad_sync = r#"{"type":"initial_sync_request","request_id":"sync-2","payload":{"chat_versions":5}}"#;
    client.send_raw(Message::text(bad_sync)).await.unwrap();
    let mut codes = Vec::new();
    for i in 0..3 {
        let reply = client.recv_reply(&format!("p{i}")).await.unwrap();
        codes.push(match reply.message {
            ServerMessage::Pong(_) => None,
            ServerMessage::Error(e) => Some(e.code),
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(codes, [None, None, Some(ErrorCode::RateLimited)]);
    let reply = tokio::time::timeout(std::time::Duration::from_secs(10), client.recv_reply("bad-1"))
        .await
        .expect("no reply carried the request id")
        .unwrap();
    assert!(matches!(reply.message, ServerMessage::Error(ref e) if e.code == ErrorCode::RateLimited), "{reply:?}");
    for rid in ["sync-1", "sync-2"] {
        let reply = client.recv_reply(rid).await.unwrap();
        let dropped =
            matches!(reply.message, ServerMessage::InitialSyncError(ref e) if e.code == ErrorCode::RateLimited);
        assert!(dropped, "{rid}: {reply:?}");
    }
}

/// PROTOCOL.md section 8, "Error context": every error answering a request that names one chat carries
/// its `chat_id` (and `message_id` for a message), whatever the code, so that a client sending without
/// `request_id` can tell which write failed. A write dropped by the rate limit is one of those.
#[tokio::test]
async fn a_rate_limited_write_without_request_id_names_its_chat_and_message() {
    let server = TestServer::start_with(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 1;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    client.send(&ClientMessage::Ping(Empty {}), Some("p0")).await.unwrap();
    client
        .send_text(
            r#"{"type":"chat_message_added","payload":{"chat_id":"c7","message":{"message_id":"m7","content":"x"}}}"#,
        )
        .await
        .unwrap();
    client.send_text(r#"{"type":"update_title","payload":{"chat_id":"c8","new_title":"t"}}"#).await.unwrap();
    let mut errors = Vec::new();
    while errors.len() < 2 {
        let m = client.recv().await.unwrap();
        if let ServerMessage::Error(e) = m.message {
            assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
            errors.push((e.chat_id, e.message_id));
        }
    }
    assert_eq!(
        errors,
        [(Some("c7".to_string()), Some("m7".to_string())), (Some("c8".to_string()), None)],
        "a dropped write names what was dropped"
    );
}

#[tokio::test]
async fn a_flood_far_above_the_burst_closes_with_1008() {
    let server = TestServer::start_with(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 1;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    // Far more than 10x the burst, so that a refill during a slow run cannot save the connection.
    for _ in 0..40 {
        client.send(&ClientMessage::Ping(Empty {}), None).await.unwrap();
    }
    assert_eq!(client.recv_close().await.unwrap(), (1008, "Rate limit exceeded".into()));
}

/// PROTOCOL.md section 8, "Rate limit": every inbound text frame counts, undecodable ones too, so that a
/// flood of garbage (each answered with an error) is held to the rate as requests are: the frames past
/// the burst are dropped as `rate_limited`, and a flood far above it closes with 1008.
#[tokio::test]
async fn undecodable_frames_count_towards_the_rate_limit() {
    let server = TestServer::start_with(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 1;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    for _ in 0..40 {
        client.send_raw(Message::text("{oops")).await.unwrap();
    }
    let close = tokio::time::timeout(std::time::Duration::from_secs(30), client.recv_close())
        .await
        .expect("the flood of undecodable frames was never closed: they are not counted");
    assert_eq!(close.unwrap(), (1008, "Rate limit exceeded".into()));
}

#[tokio::test]
async fn binary_frame_closes_with_1003() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    client.send_raw(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(client.recv_close().await.unwrap(), (1003, "Binary frames are not supported".into()));
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 4096).await;
    let token = server.user_token("alice").await;
    let (mut client, hello) = server.connect(&token, "d").await;
    assert_eq!(hello.limits.max_frame_bytes, 4096);
    let big = format!(r#"{{"type":"ping","payload":{{"pad":"{}"}}}}"#, "x".repeat(5000));
    client.send_text(big).await.unwrap();
    assert_eq!(client.recv_close().await.unwrap(), (1009, "Message too big".into()));
}

#[tokio::test]
async fn a_frame_at_the_limit_is_accepted() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 4096).await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    let head = r#"{"type":"ping","payload":{"pad":""#;
    let tail = r#""}}"#;
    let frame = format!("{head}{}{tail}", "x".repeat(4096 - head.len() - tail.len()));
    assert_eq!(frame.len(), 4096);
    client.send_text(frame).await.unwrap();
    assert_eq!(client.recv().await.unwrap().message, ServerMessage::Pong(Empty {}));
}

#[tokio::test]
async fn two_tabs_on_one_device_are_two_reachable_connections() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut tab1, hello1) = server.connect(&token, "laptop").await;
    let (mut tab2, hello2) = server.connect(&token, "laptop").await;
    let bob = server.user_token("bob").await;
    let (mut other_user, _) = server.connect(&bob, "phone").await;
    assert_ne!(hello1.connection_id, hello2.connection_id);
    assert_eq!(hello1.device_hash, hello2.device_hash);
    assert_eq!(server.ctx.hub.connection_count(), 3);

    let frame =
        encode(&ServerMessage::ChatDeleted(ChatDeleted { chat_id: ChatId::new("c1").unwrap(), tombstone: true }), None);
    server.ctx.hub.deliver("alice", Audience::All, frame.clone().into()).await;
    for tab in [&mut tab1, &mut tab2] {
        assert!(matches!(tab.recv().await.unwrap().message, ServerMessage::ChatDeleted(_)));
    }
    server.ctx.hub.deliver("alice", Audience::Others { except: &hello1.connection_id }, frame.into()).await;
    assert!(matches!(tab2.recv().await.unwrap().message, ServerMessage::ChatDeleted(_)));
    // tab1 and bob got nothing: the next thing each sees is its own pong.
    assert_alive(&mut tab1).await;
    assert_eq!(tab1.buffered(), 0, "OTHERS excludes the sender");
    assert_alive(&mut other_user).await;
    assert_eq!(other_user.buffered(), 0, "another user receives nothing");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_as_slow_consumer() {
    let server = TestServer::start_with(|c| c.outbox_max_messages = 8).await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    // Far more than the socket buffers and the outbox hold, delivered while the client reads nothing.
    let frame =
        encode(&ServerMessage::ChatDeleted(ChatDeleted { chat_id: ChatId::new("c1").unwrap(), tombstone: true }), None);
    for _ in 0..200 {
        server.ctx.hub.deliver("alice", Audience::All, frame.clone().into()).await;
    }
    assert_eq!(client.recv_clean_close().await.unwrap(), (1013, "Slow consumer".into()));
}

/// A client whose TCP window stays shut (it reads nothing while the server has far more to send than the
/// socket buffers hold) cannot be sent a close frame either: the connection is dropped once a send has
/// waited `heartbeat_timeout` (plus a second per 4 KB of the frame), and its per-user slot is free again.
/// Without that, the slot stays taken for good and the wait below runs out.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_frees_its_slot() {
    let server = TestServer::start_with(|c| {
        c.ping_interval_secs = 1;
        c.heartbeat_timeout_secs = 2;
        c.max_connections_per_user = 1;
        c.outbox_max_bytes = 64 << 20;
        c.outbox_max_messages = 100_000;
    })
    .await;
    let token = server.user_token("alice").await;
    let (stalled, _) = server.connect(&token, "d").await;
    let pad = "x".repeat(4000);
    let frame = format!(r#"{{"type":"pong","payload":{{}},"pad":"{pad}"}}"#);
    // 32 MB: more than loopback's socket buffers take from a peer that reads nothing.
    for _ in 0..8000 {
        server.ctx.hub.deliver("alice", Audience::All, frame.clone().into()).await;
    }
    let dropped = async {
        loop {
            let mut c = Client::connect(&server.url, &ConnectOptions::new(&token, "d")).await.unwrap();
            match c.recv().await {
                Ok(m) if matches!(m.message, ServerMessage::Connected(_)) => break,
                Err(chatsync_client::ClientError::Closed(Some((1013, _)))) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), dropped)
        .await
        .expect("the stalled connection still holds the user's only slot after 60 s");
    let stalls = common::sample(&server.metrics().await, "chatsync_closes_total", r#"code="stalled""#);
    assert!(stalls >= Some(1.0), "{stalls:?}");
    drop(stalled);
}

#[tokio::test]
async fn a_silent_client_is_closed_on_heartbeat_timeout() {
    let server = TestServer::start_with(|c| {
        c.ping_interval_secs = 1;
        c.heartbeat_timeout_secs = 2;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    // A client that does not read does not answer Pings either. (The check at the third Ping finds 3 s of
    // silence, more than the 2 s allowed.)
    tokio::time::sleep(std::time::Duration::from_millis(4000)).await;
    assert_eq!(client.recv_close().await.unwrap(), (1001, "Heartbeat timeout".into()));
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    let mut server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut a, _) = server.connect(&token, "d1").await;
    let (mut b, _) = server.connect(&token, "d1").await;
    let closes =
        tokio::spawn(async move { (a.recv_clean_close().await.unwrap(), b.recv_clean_close().await.unwrap()) });
    server.stop().await;
    let (ca, cb) = closes.await.unwrap();
    assert_eq!(ca, (1001, "Server shutting down".into()));
    assert_eq!(cb, (1001, "Server shutting down".into()));
}

/// A shutdown waits for a connection whose upgrade was done just before it, and closes it with 1001 like
/// every other. axum hands the upgraded socket over in a task of its own once the HTTP connection has
/// ended (held here at the `upgraded` pause point); the connection was tracked only from there, so `run`
/// found nothing to wait for: it closed the store, released the data directory and returned while the
/// connection went on (in `serve`, the process exited under it: the client was cut off without a close).
#[tokio::test]
async fn shutdown_waits_for_a_connection_upgraded_just_before_it() {
    let mut server = TestServer::start_with(|c| c.shutdown_timeout_secs = 600).await;
    let token = server.user_token("alice").await;
    let mut held = server.ctx.pauses.arm(chatsync::pause::UPGRADED);
    let mut client = Client::connect(&server.url, &ConnectOptions::new(&token, "d")).await.unwrap();
    held.reached().await;
    let mut stopping = tokio::spawn(async move {
        server.stop().await;
        server
    });
    // `run` cannot return while the connection is held (its grace is 10 minutes): it used to at once.
    let early = tokio::time::timeout(std::time::Duration::from_secs(3), &mut stopping).await;
    assert!(early.is_err(), "the server stopped while an upgraded connection had not started");
    held.release();
    assert_eq!(client.recv_clean_close().await.unwrap(), (1001, "Server shutting down".into()));
    stopping.await.unwrap();
}

#[tokio::test]
async fn origin_outside_the_allowed_list_gets_403_before_upgrade() {
    let server = TestServer::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let token = server.user_token("alice").await;
    let mut opts = ConnectOptions::new(&token, "d");
    opts.headers.push(("Origin".into(), "https://evil.example".into()));
    match Client::connect(&server.url, &opts).await {
        Err(chatsync_client::ClientError::Ws(chatsync_client::tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 403)
        }
        Err(e) => panic!("expected HTTP 403, got {e}"),
        Ok(_) => panic!("expected HTTP 403, got an upgrade"),
    }
    let mut opts = ConnectOptions::new(&token, "d");
    opts.headers.push(("Origin".into(), "https://app.example".into()));
    Client::connect_authenticated(&server.url, &opts).await.unwrap();
}

#[tokio::test]
async fn a_frame_far_beyond_the_limit_still_closes_with_1009() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 4096).await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    client.send_text("x".repeat(100_000)).await.unwrap();
    match client.recv_close().await {
        Ok(close) => assert_eq!(close, (1009, "Message too big".into())),
        // Past the backstop limit the rest of the frame is never read; the close may then be lost
        // to a TCP reset, but the connection must be gone.
        Err(e) => assert!(e.to_string().contains("reset") || e.to_string().contains("closed"), "{e}"),
    }
}

/// RFC 6455 §5.5.1: a client's close is answered with a close echoing its code, so the client sees a
/// clean close with its own code (never 1006).
#[tokio::test]
async fn a_client_close_is_answered_with_its_own_code() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    for code in [1000u16, 1001, 4000] {
        let (mut client, _) = server.connect(&token, "d").await;
        let answer = client.close_with(code, "bye").await.unwrap_or_else(|e| panic!("close {code}: {e}"));
        assert_eq!(answer.0, code);
    }
    // The same while the server has frames queued for the client: nothing is sent after its close.
    let (mut busy, _) = server.connect(&token, "d").await;
    let frame =
        encode(&ServerMessage::ChatDeleted(ChatDeleted { chat_id: ChatId::new("c1").unwrap(), tombstone: true }), None);
    for _ in 0..20 {
        server.ctx.hub.deliver("alice", Audience::All, frame.clone().into()).await;
    }
    assert_eq!(busy.close_with(1000, "").await.unwrap().0, 1000);
    let (mut still, _) = server.connect(&token, "d").await;
    assert_alive(&mut still).await;
}

#[tokio::test]
async fn revocation_closes_cleanly_with_1008() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    let session = server.ctx.store.session_by_token_hash(&chatsync::gateway::auth::token_hash(&token)).await.unwrap();
    let session_id = session.expect("session exists").session_id;
    server.ctx.hub.close_sessions(&[session_id], chatsync::hub::CloseReason::SESSION_REVOKED).await;
    assert_eq!(client.recv_clean_close().await.unwrap(), (1008, "Session revoked".into()));
}

/// A request that panics (a bug: none should be reachable from the network, which is why nothing else
/// would notice) ends its connection with 1011 `Internal error` and gives back everything the connection
/// held: its slot in the user's cap and the node's, the open-connections gauge, the user's cache entry.
/// The panic used to unwind through the connection's task past all of that: the user stayed at its cap
/// for good (here its only slot: locked out until a restart), and the writer task, left running, kept the
/// socket open and answering Pings, so the client waited for its reply forever instead of reconnecting.
#[tokio::test]
async fn a_request_that_panics_closes_its_connection_and_gives_back_what_it_held() {
    let server = TestServer::start_with(|c| c.max_connections_per_user = 1).await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect_raw(&token, "d").await;
    while !matches!(client.recv().await.unwrap().message, ServerMessage::CachePrimed(_)) {}
    assert!(server.ctx.cache.chats("alice").await.is_some(), "the user's entry holds its chat list");

    server.ctx.pauses.arm_panic(chatsync::pause::WRITE_COMMITTED);
    client.send_text(r#"{"type":"update_title","payload":{"chat_id":"c1","new_title":"t"}}"#).await.unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), client.recv_close()).await;
    assert_eq!(closed.expect("no close 10 s after the panic").unwrap(), (1011, "Internal error".into()));
    let released = async {
        loop {
            let open = common::sample(&server.metrics().await, "chatsync_connections_open", "");
            if server.ctx.hub.connection_count() == 0 && open == Some(0.0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), released)
        .await
        .expect("the connection still counts (hub or gauge) 10 s after it closed");
    assert!(server.ctx.cache.chats("alice").await.is_none(), "the cache entry outlived the user's connections");
    let (mut again, _) = server.connect(&token, "d").await;
    assert_alive(&mut again).await;
}

/// A panic between a connection's registration and its service (the revocation recheck, the device
/// sighting: a bug in a store) refuses that connection with 1011 and gives its slot back. It used to unwind
/// past the unregistering: the user stayed at its cap for good (here its only slot).
#[tokio::test]
async fn a_panic_while_admitting_a_connection_refuses_it_and_gives_its_slot_back() {
    let server = TestServer::start_with(|c| c.max_connections_per_user = 1).await;
    let token = server.user_token("alice").await;
    server.ctx.pauses.arm_panic(chatsync::pause::REGISTERED);
    let mut refused = Client::connect(&server.url, &ConnectOptions::new(&token, "d")).await.unwrap();
    assert_eq!(refused.recv_clean_close().await.unwrap(), (1011, "Internal error".into()));
    assert_eq!(server.ctx.hub.connection_count(), 0, "the refused connection is still registered");
    let (mut again, _) = server.connect(&token, "d").await;
    assert_alive(&mut again).await;
}

/// A shutdown (SIGTERM) lets a request in flight finish: a write that committed is answered before the
/// 1001, never dropped after its commit. A connection still authenticating when it began is closed with
/// 1001 too, and `run` waits for both.
#[tokio::test]
async fn shutdown_answers_a_write_that_is_committing_and_closes_a_connection_still_authenticating() {
    let mut server = TestServer::start_with(|c| c.shutdown_timeout_secs = 600).await;
    let token = server.user_token("alice").await;
    let (mut client, _) = server.connect(&token, "d").await;
    let mut write = server.ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    client
        .send_text(r#"{"type":"update_title","request_id":"r1","payload":{"chat_id":"c1","new_title":"t"}}"#)
        .await
        .unwrap();
    write.reached().await;
    let mut authenticating = server.ctx.pauses.arm(chatsync::pause::AUTHENTICATED);
    let other = server.token("alice").await;
    let mut late = Client::connect(&server.url, &ConnectOptions::new(&other, "e")).await.unwrap();
    authenticating.reached().await;
    let addr = server.host();
    let stopping = tokio::spawn(async move {
        server.stop().await;
        server
    });
    // The shutdown has begun once the listener is gone.
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        tokio::task::yield_now().await;
    }
    write.release();
    authenticating.release();
    let answer = client.recv().await.unwrap();
    assert_eq!(answer.request_id.as_deref(), Some("r1"));
    assert!(matches!(answer.message, ServerMessage::ChatTitleUpdated(_)), "{answer:?}");
    assert_eq!(client.recv_clean_close().await.unwrap(), (1001, "Server shutting down".into()));
    assert_eq!(late.recv_clean_close().await.unwrap(), (1001, "Server shutting down".into()));
    let server = stopping.await.unwrap();
    assert_eq!(server.ctx.hub.connection_count(), 0);
}
