//! The Rust client's reconnecting mode (`chatsync_client::ReconnectingClient`) against the real server:
//! a connection cut by a proxy or a server restart is re-established with backoff, changes made offline
//! reach the server as one `sync_offline_changes` (then an initial sync) and the user's other device sees
//! them; conflicts are reported; another user sees nothing; a session the server refuses stops the client.
//! The interleavings a real server cannot be held at (a connection dropped while requests are in flight and
//! unanswered, a server that greets and then fails) are played by a scripted server (`Scripted`).

mod common;

use chatsync_client::{Change, ConnectOptions, Event, ReconnectOptions, ReconnectingClient};
use chatsync_protocol::*;
use common::proxy::Proxy;
use common::TestServer;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn chat(id: &str) -> ChatId {
    ChatId::new(id).unwrap()
}

fn doc(text: &str) -> Map<String, Value> {
    json!({"type": "doc", "content": [{"type": "paragraph", "content": [{"type": "text", "text": text}]}]})
        .as_object()
        .unwrap()
        .clone()
}

fn quick() -> ReconnectOptions {
    ReconnectOptions {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        ..ReconnectOptions::default()
    }
}

fn start(url: &str, token: &str, device: &str) -> ReconnectingClient {
    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(token, device) };
    ReconnectingClient::start(url, opts, quick())
}

/// A proxy in front of `server` that the test can cut, and the "laptop" device connected through it.
async fn behind_proxy(server: &TestServer, token: &str) -> (Proxy, ReconnectingClient) {
    let proxy = Proxy::start(server.url.trim_start_matches("ws://").trim_end_matches("/v1/ws").to_owned()).await;
    let laptop = start(&format!("ws://127.0.0.1:{}/v1/ws", proxy.port), token, "laptop");
    (proxy, laptop)
}

/// Takes events until `f` picks one (a hang guard, not a timing assertion: the test fails instead of
/// hanging if the event never comes).
async fn until<T>(rc: &mut ReconnectingClient, mut f: impl FnMut(&Event) -> Option<T>) -> T {
    let wait = async {
        loop {
            let event = rc.next_event().await.expect("the client stopped");
            if let Some(t) = f(&event) {
                return t;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait).await.expect("the awaited event never came")
}

async fn synced(rc: &mut ReconnectingClient) -> InitialSyncResponse {
    until(rc, |e| match e {
        Event::Synced(s) => Some(s.clone()),
        _ => None,
    })
    .await
}

async fn disconnected(rc: &mut ReconnectingClient) -> (Option<(u16, String)>, Option<Duration>) {
    until(rc, |e| match e {
        Event::Disconnected { close, retry_in, .. } => Some((close.clone(), *retry_in)),
        _ => None,
    })
    .await
}

async fn offline_synced(rc: &mut ReconnectingClient) -> OfflineSyncComplete {
    until(rc, |e| match e {
        Event::OfflineSynced(s) => Some(s.clone()),
        _ => None,
    })
    .await
}

async fn confirmed_title(rc: &mut ReconnectingClient) {
    until(rc, |e| {
        matches!(e, Event::Message(m) if matches!(m.message, ServerMessage::ChatTitleUpdated(_))).then_some(())
    })
    .await
}

/// Receives on a plain client until `f` picks a message.
async fn recv_until<T>(c: &mut chatsync_client::Client, mut f: impl FnMut(&ServerMessage) -> Option<T>) -> T {
    loop {
        let m = c.recv().await.unwrap();
        if let Some(t) = f(&m.message) {
            return t;
        }
    }
}

async fn sync_state(c: &mut chatsync_client::Client) -> InitialSyncResponse {
    let reply = c
        .request(&ClientMessage::InitialSyncRequest(InitialSyncRequest {
            chat_versions: BTreeMap::new(),
            immediate_view_chat_id: Some(chat("c1")),
        }))
        .await
        .unwrap();
    match reply.message {
        ServerMessage::InitialSyncResponse(r) => r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn changes_made_offline_are_applied_on_reconnect_and_seen_by_the_other_device() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let phone_token = server.token("alice").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    let (mut phone, _) = server.connect(&phone_token, "phone").await;
    synced(&mut laptop).await;

    // Online: a change goes out live and the phone sees it.
    laptop.change(Change::Title { chat_id: chat("c1"), title: "online".into() });
    let title = recv_until(&mut phone, |m| match m {
        ServerMessage::ChatTitleUpdated(t) => Some(t.clone()),
        _ => None,
    })
    .await;
    assert_eq!((title.data.title.as_str(), title.versions.title_v), ("online", 1));
    // The laptop holds title_v 1 once its own confirmation arrived (before that, an edit would be made
    // from version 0 and conflict, correctly).
    confirmed_title(&mut laptop).await;

    // Offline: the connection is cut; the laptop keeps editing.
    proxy.cut();
    let (_, retry) = disconnected(&mut laptop).await;
    assert!(retry.is_some(), "a cut connection is retried");
    laptop.change(Change::Title { chat_id: chat("c1"), title: "draft of a title".into() });
    laptop.change(Change::Title { chat_id: chat("c1"), title: "offline".into() });
    laptop.change(Change::Draft { chat_id: chat("c1"), draft_json: Some(doc("written on the train")) });
    let message = NewMessage {
        message_id: MessageId::new("m1").unwrap(),
        content: MessageContent::Text("sent offline".into()),
        timestamp: None,
        temp_id: None,
    };
    laptop.send_message(chat("c1"), message);
    // Commands are handled in order: once a request fails (offline), the changes before it are queued.
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!(
        (laptop.queued_changes(), laptop.unconfirmed_messages()),
        (2, 1),
        "two edits of one title are one change"
    );
    assert!(!laptop.is_connected());

    // Back online: one sync_offline_changes (both changes applied), the message, then an initial sync.
    proxy.restore();
    let done = offline_synced(&mut laptop).await;
    assert_eq!((done.processed, done.conflicts, done.errors), (2, 0, 0), "{done:?}");
    let sync = synced(&mut laptop).await;
    let c1 = sync.chats_to_add_or_update.iter().find(|c| c.chat_id == chat("c1")).expect("c1 is newer than held");
    assert_eq!((c1.versions.title_v, c1.versions.draft_v, c1.versions.messages_v), (2, 1, 1));
    assert_eq!((laptop.queued_changes(), laptop.unconfirmed_messages()), (0, 0));
    assert_eq!(laptop.versions()[&chat("c1")].title_v, Some(2));

    // The phone, connected all along, received every change as a broadcast.
    let mut seen = (false, false, false);
    while seen != (true, true, true) {
        match phone.recv().await.unwrap().message {
            ServerMessage::ChatTitleUpdated(t) => {
                assert_eq!(t.data.title, "offline");
                seen.0 = true;
            }
            ServerMessage::ChatDraftUpdated(d) => {
                assert_eq!(d.data.draft_json, Some(doc("written on the train")));
                seen.1 = true;
            }
            ServerMessage::ChatMessageAdded(m) => {
                assert_eq!(m.message.content, MessageContent::Text("sent offline".into()));
                seen.2 = true;
            }
            _ => {}
        }
    }
    let state = sync_state(&mut phone).await;
    let c1 = &state.chats_to_add_or_update[0];
    assert_eq!(c1.title.as_deref(), Some("offline"));
    assert_eq!(c1.messages.as_ref().map(Vec::len), Some(1));
    laptop.close();
    assert_eq!(disconnected(&mut laptop).await.1, None);
}

#[tokio::test]
async fn an_offline_change_that_lost_to_another_device_is_a_conflict() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let phone_token = server.token("alice").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    let (mut phone, _) = server.connect(&phone_token, "phone").await;
    synced(&mut laptop).await;
    laptop.change(Change::Title { chat_id: chat("c1"), title: "first".into() });
    confirmed_title(&mut laptop).await;

    proxy.cut();
    disconnected(&mut laptop).await;
    laptop.change(Change::Title { chat_id: chat("c1"), title: "laptop".into() });
    // Meanwhile the phone renames the chat.
    let reply = phone
        .request(&ClientMessage::UpdateTitle(UpdateTitle { chat_id: chat("c1"), new_title: "phone".into() }))
        .await
        .unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatTitleUpdated(_)));

    proxy.restore();
    let done = offline_synced(&mut laptop).await;
    assert_eq!((done.processed, done.conflicts), (0, 1), "{done:?}");
    assert_eq!(done.results[0].status, OfflineStatus::Conflict);
    let sync = synced(&mut laptop).await;
    let c1 = sync.chats_to_add_or_update.iter().find(|c| c.chat_id == chat("c1")).unwrap();
    assert_eq!(c1.title.as_deref(), Some("phone"), "the newer title wins");
    assert_eq!(laptop.queued_changes(), 0, "a conflict is reported, not retried");
    laptop.close();
}

#[tokio::test]
async fn another_user_sees_nothing_of_the_offline_changes() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let bob_token = server.user_token("bob").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    synced(&mut laptop).await;
    proxy.cut();
    disconnected(&mut laptop).await;
    laptop.change(Change::Title { chat_id: chat("c1"), title: "secret".into() });
    proxy.restore();
    let done = offline_synced(&mut laptop).await;
    assert_eq!(done.processed, 1);

    let (mut bob, _) = server.connect(&bob_token, "bob-phone").await;
    let state = sync_state(&mut bob).await;
    assert!(state.chats_to_add_or_update.is_empty() && state.server_chat_order.is_empty(), "{state:?}");
    let reply = bob
        .request(&ClientMessage::UpdateTitle(UpdateTitle { chat_id: chat("c1"), new_title: "mine".into() }))
        .await
        .unwrap();
    assert!(matches!(reply.message, ServerMessage::Error(ref e) if e.code == ErrorCode::NotFound), "{reply:?}");
    laptop.close();
}

#[tokio::test]
async fn a_queued_message_the_server_refuses_is_reported_and_not_resent() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    synced(&mut laptop).await;
    proxy.cut();
    disconnected(&mut laptop).await;
    let too_big = NewMessage {
        message_id: MessageId::new("big").unwrap(),
        content: MessageContent::Text("x".repeat(Limits::MAX_MESSAGE_CONTENT_BYTES + 1)),
        timestamp: None,
        temp_id: None,
    };
    laptop.send_message(chat("c1"), too_big);
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!(laptop.unconfirmed_messages(), 1);
    proxy.restore();
    let code = until(&mut laptop, |e| match e {
        Event::Message(Incoming { message: ServerMessage::Error(e), .. }) => Some(e.code),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::LimitExceeded);
    synced(&mut laptop).await;
    assert_eq!(laptop.unconfirmed_messages(), 0, "a refused message leaves the outbox");
    laptop.close();
}

#[tokio::test]
async fn a_refused_session_stops_the_client_instead_of_retrying() {
    let server = TestServer::start().await;
    server.user("alice", false).await;
    let mut rc = start(&server.url, "cs_not-a-real-token", "laptop");
    let (close, retry) = disconnected(&mut rc).await;
    assert_eq!(close, Some((1008, "Invalid session".to_owned())));
    assert_eq!(retry, None);
    assert!(rc.next_event().await.is_none(), "no event after the client stopped");
    // A change made after that stays queued; nothing panics.
    rc.change(Change::DeleteDraft { chat_id: chat("c1") });
}

#[tokio::test]
async fn a_server_restart_is_survived_with_the_queued_change_applied() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let phone_token = server.token("alice").await;
    let addr = server.url.trim_start_matches("ws://").trim_end_matches("/v1/ws").to_owned();
    let config = (*server.ctx.config).clone();
    let mut laptop = start(&server.url, &token, "laptop");
    synced(&mut laptop).await;

    let data = server.stop_into_data().await;
    let (close, retry) = disconnected(&mut laptop).await;
    assert_eq!(close, Some((1001, "Server shutting down".to_owned())));
    assert!(retry.is_some());
    laptop.change(Change::Draft { chat_id: chat("c9"), draft_json: Some(doc("kept across the restart")) });
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!(laptop.queued_changes(), 1);

    // The same address, the same data directory.
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let ctx = chatsync::build(config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(chatsync::run(listener, ctx.clone(), async move {
        let _ = stopped.await;
    }));
    let done = offline_synced(&mut laptop).await;
    assert_eq!(done.processed, 1, "{done:?}");
    synced(&mut laptop).await;

    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(&phone_token, "phone") };
    let (mut phone, _) =
        chatsync_client::Client::connect_authenticated(&format!("ws://{addr}/v1/ws"), &opts).await.unwrap();
    let reply = phone
        .request(&ClientMessage::InitialSyncRequest(InitialSyncRequest {
            chat_versions: BTreeMap::new(),
            immediate_view_chat_id: None,
        }))
        .await
        .unwrap();
    let ServerMessage::InitialSyncResponse(state) = reply.message else { panic!("{reply:?}") };
    let c9 = state.chats_to_add_or_update.iter().find(|c| c.chat_id == chat("c9")).expect("c9 exists");
    assert_eq!(c9.draft_json, Some(Some(doc("kept across the restart"))));

    laptop.close();
    disconnected(&mut laptop).await;
    drop(phone);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    drop(data);
}

/// A stand-in for the server that the test drives frame by frame: every connection it accepts is handed
/// to the test, which greets it, reads what the client sends, answers or drops it.
struct Scripted {
    url: String,
    /// Each connection upgraded, with the `Authorization` header of its upgrade request (the token).
    accepted: tokio::sync::mpsc::UnboundedReceiver<(WebSocketStream<TcpStream>, String)>,
}

impl Scripted {
    // The handshake callback's error type is tungstenite's (an HTTP response), large by its design.
    #[allow(clippy::result_large_err)]
    async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
        let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut auth = String::new();
                let capture = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    let header = req.headers().get("authorization").and_then(|v| v.to_str().ok());
                    auth = header.unwrap_or_default().to_owned();
                    Ok(resp)
                };
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, capture).await {
                    if tx.send((ws, auth)).is_err() {
                        return;
                    }
                }
            }
        });
        Scripted { url, accepted }
    }

    /// The client's next connection (upgraded, not greeted yet).
    async fn accept(&mut self) -> WebSocketStream<TcpStream> {
        self.accept_with_auth().await.0
    }

    /// The client's next connection and the `Authorization` header of its upgrade request.
    async fn accept_with_auth(&mut self) -> (WebSocketStream<TcpStream>, String) {
        let next = tokio::time::timeout(Duration::from_secs(30), self.accepted.recv());
        next.await.expect("the client never connected again").unwrap()
    }
}

/// Starts a client with token `token` on `server` and brings it online: its connection greeted as
/// `user`, its initial sync answered with `chats` (id, version of each). Returns the client and the
/// server's side of that connection.
async fn online(
    server: &mut Scripted,
    token: &str,
    user: &str,
    opts: ReconnectOptions,
    chats: &[(&str, u64)],
) -> (ReconnectingClient, WebSocketStream<TcpStream>) {
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new(token, "laptop"), opts);
    let mut ws = server.accept().await;
    greet_as(&mut ws, user).await;
    let sync = read_frame(&mut ws).await;
    answer_sync(&mut ws, &sync, chats).await;
    synced(&mut laptop).await;
    (laptop, ws)
}

/// Sends `connected`, as the server does after authenticating.
async fn greet(ws: &mut WebSocketStream<TcpStream>) {
    greet_as(ws, "alice").await;
}

/// Sends `connected` naming `user_id`.
async fn greet_as(ws: &mut WebSocketStream<TcpStream>, user_id: &str) {
    use futures_util::SinkExt;
    let connected = ServerMessage::Connected(Connected {
        connection_id: "conn".into(),
        user_id: user_id.into(),
        device_hash: "0".repeat(64),
        protocol: "chatsync.v1".into(),
        server_time: "2026-01-01T00:00:00Z".into(),
        limits: Limits::default(),
    });
    ws.send(Message::text(encode(&connected, None))).await.unwrap();
}

/// The next frame the client sent, as JSON.
async fn read_frame(ws: &mut WebSocketStream<TcpStream>) -> Value {
    use futures_util::StreamExt;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("the client sent nothing");
        if let Message::Text(t) = frame.expect("the client hung up").unwrap() {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

#[tokio::test]
async fn edits_in_flight_when_the_connection_drops_are_resent_the_newest_winning() {
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    // A first connection that ends at once: the laptop is offline and queues an edit.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    drop(ws);
    disconnected(&mut laptop).await;
    laptop.change(Change::Title { chat_id: chat("c1"), title: "old".into() });
    // The next connection is upgraded but not greeted: the laptop is still offline.
    let mut ws = server.accept().await;
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!(laptop.queued_changes(), 1);

    // Greeted: the queued edit goes out, then the sync; nothing is answered.
    greet(&mut ws).await;
    let offline = read_frame(&mut ws).await;
    assert_eq!(
        (offline["type"].as_str(), offline["payload"]["changes"][0]["value"].as_str()),
        (Some("sync_offline_changes"), Some("old"))
    );
    assert_eq!(read_frame(&mut ws).await["type"], "initial_sync_request");
    // Online now, the user edits the same title again, and, in other chats, one title twice.
    laptop.change(Change::Title { chat_id: chat("c1"), title: "new".into() });
    let chats: Vec<ChatId> = (0..8).map(|i| chat(&format!("k{i}"))).collect();
    for c in &chats {
        laptop.change(Change::Title { chat_id: c.clone(), title: "first".into() });
        laptop.change(Change::Title { chat_id: c.clone(), title: "second".into() });
    }
    for _ in 0..1 + 2 * chats.len() {
        assert_eq!(read_frame(&mut ws).await["type"], "update_title");
    }
    // The connection drops with all of that unanswered.
    drop(ws);
    disconnected(&mut laptop).await;

    // The next connection carries the last title the user gave each chat.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let offline = read_frame(&mut ws).await;
    assert_eq!(offline["type"], "sync_offline_changes");
    let titles: BTreeMap<String, String> = offline["payload"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["chat_id"].as_str().unwrap().to_owned(), c["value"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(titles.get("c1").map(String::as_str), Some("new"), "{offline}");
    for c in &chats {
        assert_eq!(titles.get(c.as_str()).map(String::as_str), Some("second"), "{offline}");
    }
    assert_eq!(titles.len(), 1 + chats.len(), "one change per chat: {offline}");
    laptop.close();
}

#[tokio::test]
async fn a_server_that_greets_and_then_fails_counts_as_a_failed_attempt() {
    let mut server = Scripted::start().await;
    let once = ReconnectOptions { max_attempts: Some(3), ..quick() };
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), once);
    // Each connection is greeted and dropped before its initial sync is answered: the backoff grows as
    // for a refused connection, and max_attempts ends it.
    for attempt in 1..=3 {
        let mut ws = server.accept().await;
        greet(&mut ws).await;
        assert_eq!(read_frame(&mut ws).await["type"], "initial_sync_request");
        drop(ws);
        let (_, retry) = disconnected(&mut laptop).await;
        assert_eq!(retry.is_none(), attempt == 3, "attempt {attempt}");
    }
}

#[tokio::test]
async fn a_failed_initial_sync_is_retried_on_a_new_connection() {
    use futures_util::SinkExt;
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    let failed = ServerMessage::InitialSyncError(InitialSyncError {
        code: ErrorCode::Unavailable,
        message: "The store is unavailable.".into(),
    });
    ws.send(Message::text(encode(&failed, sync["request_id"].as_str()))).await.unwrap();
    // The client does not stay on a connection whose sync failed: it would never learn what changed
    // while it was offline.
    let (_, retry) = disconnected(&mut laptop).await;
    assert!(retry.is_some());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    assert_eq!(sync["type"], "initial_sync_request");
    let done = ServerMessage::InitialSyncResponse(InitialSyncResponse {
        chat_ids_to_delete: vec![],
        chats_to_add_or_update: vec![],
        server_chat_order: vec![],
        sync_completed_at: "2026-01-01T00:00:00Z".into(),
        active_streams: vec![],
        more: false,
    });
    ws.send(Message::text(encode(&done, sync["request_id"].as_str()))).await.unwrap();
    synced(&mut laptop).await;
    laptop.close();
}

#[tokio::test]
async fn an_upgrade_the_server_forbids_stops_the_client_instead_of_retrying() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    // A cookie without an allowed Origin: HTTP 403 before any upgrade, on every attempt alike.
    let opts = ConnectOptions {
        token_placement: chatsync_client::TokenPlacement::Cookie,
        ..ConnectOptions::new(&token, "laptop")
    };
    let mut rc = ReconnectingClient::start(&server.url, opts, quick());
    let stopped = until(&mut rc, |e| match e {
        Event::Disconnected { error, retry_in, .. } => Some((error.clone(), *retry_in)),
        _ => None,
    })
    .await;
    assert_eq!(stopped.1, None, "{stopped:?}");
    assert!(stopped.0.contains("403"), "{stopped:?}");
    assert!(rc.next_event().await.is_none(), "no event after the client stopped");
}

#[tokio::test]
async fn a_user_with_more_chats_than_one_frame_can_name_still_resyncs() {
    // Small frames, so that a few dozen chats' versions are more than one initial_sync_request can hold.
    let server = TestServer::start_with(|c| c.max_frame_bytes = 2048).await;
    let token = server.user_token("alice").await;
    let phone_token = server.token("alice").await;
    let (mut phone, _) = server.connect(&phone_token, "phone").await;
    let chats: Vec<ChatId> = (0..60).map(|i| chat(&format!("a-chat-with-a-longer-id-{i:02}"))).collect();
    for c in &chats {
        let title = UpdateTitle { chat_id: c.clone(), new_title: "t".into() };
        let reply = phone.request(&ClientMessage::UpdateTitle(title)).await.unwrap();
        assert!(matches!(reply.message, ServerMessage::ChatTitleUpdated(_)), "{reply:?}");
    }
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    assert_eq!(synced(&mut laptop).await.chats_to_add_or_update.len(), chats.len());
    assert_eq!(laptop.versions().len(), chats.len());

    // Offline, the laptop misses a rename and a deletion.
    proxy.cut();
    disconnected(&mut laptop).await;
    let renamed = UpdateTitle { chat_id: chats[59].clone(), new_title: "renamed".into() };
    phone.request(&ClientMessage::UpdateTitle(renamed)).await.unwrap();
    let deleted = DeleteChat { chat_id: chats[58].clone() };
    phone.request(&ClientMessage::DeleteChat(deleted)).await.unwrap();
    proxy.restore();

    // Its versions do not fit in one frame: it still syncs (instead of being closed with 1009 on every
    // attempt), and learns both.
    let sync = until(&mut laptop, |e| match e {
        Event::Synced(s) => Some(s.clone()),
        Event::Disconnected { close: Some(close), .. } => panic!("closed: {close:?}"),
        _ => None,
    })
    .await;
    let c59 = sync.chats_to_add_or_update.iter().find(|c| c.chat_id == chats[59]).expect("the renamed chat");
    assert_eq!(c59.title.as_deref(), Some("renamed"));
    assert!(sync.chat_ids_to_delete.contains(&chats[58]), "{:?}", sync.chat_ids_to_delete);
    let held = laptop.versions();
    assert_eq!(held.len(), chats.len() - 1);
    assert!(!held.contains_key(&chats[58]));
    assert_eq!(held[&chats[59]].title_v, Some(2));
    laptop.close();
}

#[tokio::test]
async fn offline_changes_larger_than_one_frame_go_in_several_batches() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 2048).await;
    let token = server.user_token("alice").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    synced(&mut laptop).await;
    proxy.cut();
    disconnected(&mut laptop).await;
    // 20 long titles: some 4 KiB of changes, twice what one frame may hold.
    for i in 0..20 {
        laptop.change(Change::Title { chat_id: chat(&format!("c{i}")), title: format!("{i:02}").repeat(100) });
    }
    // And one change that no frame can hold: refused by the client, not sent.
    laptop.change(Change::Title { chat_id: chat("huge"), title: "é".repeat(255).repeat(5) });
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!(laptop.queued_changes(), 21);
    proxy.restore();
    let (mut processed, mut refused) = (0usize, Vec::new());
    while processed + refused.len() < 21 {
        let done = until(&mut laptop, |e| match e {
            Event::OfflineSynced(s) => Some(s.clone()),
            Event::Disconnected { close: Some(close), .. } => panic!("closed: {close:?}"),
            _ => None,
        })
        .await;
        processed += done.processed as usize;
        refused.extend(done.results.into_iter().filter(|r| r.status == OfflineStatus::Error));
    }
    assert_eq!(processed, 20);
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0].chat_id.as_deref(), refused[0].code), (Some("huge"), Some(ErrorCode::LimitExceeded)));
    synced(&mut laptop).await;
    assert_eq!(laptop.queued_changes(), 0);
    assert_eq!(laptop.versions()[&chat("c19")].title_v, Some(1));
    laptop.close();
}

#[tokio::test]
async fn a_message_larger_than_a_frame_is_refused_without_losing_the_connection() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 4096).await;
    let token = server.user_token("alice").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    synced(&mut laptop).await;
    let big = |id: &str| NewMessage {
        message_id: MessageId::new(id).unwrap(),
        content: MessageContent::Text("x".repeat(5000)),
        timestamp: None,
        temp_id: None,
    };
    let refused = |e: &Event| match e {
        Event::Message(Incoming { message: ServerMessage::Error(e), .. }) => Some(e.clone()),
        Event::Disconnected { close, .. } => panic!("disconnected: {close:?}"),
        _ => None,
    };
    // Online: sent, the frame would close the connection (1009), and again on every reconnection.
    laptop.send_message(chat("c1"), big("online"));
    let error = until(&mut laptop, refused).await;
    assert_eq!((error.code, error.message_id.as_deref()), (ErrorCode::LimitExceeded, Some("online")));
    assert_eq!(laptop.unconfirmed_messages(), 0);
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_ok(), "still connected");

    // Queued offline: refused at the reconnection, which goes on to sync.
    proxy.cut();
    disconnected(&mut laptop).await;
    laptop.send_message(chat("c1"), big("offline"));
    proxy.restore();
    let error = until(&mut laptop, refused).await;
    assert_eq!((error.code, error.message_id.as_deref()), (ErrorCode::LimitExceeded, Some("offline")));
    synced(&mut laptop).await;
    assert_eq!(laptop.unconfirmed_messages(), 0);
    laptop.close();
}

/// Sends a raw frame on a scripted connection.
async fn send_json(ws: &mut WebSocketStream<TcpStream>, frame: Value) {
    use futures_util::SinkExt;
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// Answers the initial sync `sync` (a frame read from the client) with `chats` (`(id, title_v)`).
async fn answer_sync(ws: &mut WebSocketStream<TcpStream>, sync: &Value, chats: &[(&str, u64)]) {
    assert_eq!(sync["type"], "initial_sync_request", "{sync}");
    let chats: Vec<Value> = chats
        .iter()
        .map(|(id, title_v)| {
            json!({"chat_id": id, "type": "new_chat", "title": "t", "draft_json": null,
                "versions": {"messages_v": 0, "title_v": title_v, "draft_v": 0},
                "last_edited_overall_timestamp": 0, "unread_count": 0})
        })
        .collect();
    let order: Vec<&str> = chats.iter().map(|c| c["chat_id"].as_str().unwrap()).collect();
    let reply = json!({"type": "initial_sync_response", "request_id": sync["request_id"], "payload": {
        "chat_ids_to_delete": [], "chats_to_add_or_update": chats, "server_chat_order": order,
        "sync_completed_at": "2026-01-01T00:00:00Z", "active_streams": [], "more": false}});
    send_json(ws, reply).await;
}

#[tokio::test]
async fn the_drop_of_a_synced_connection_is_not_a_failed_attempt() {
    let mut server = Scripted::start().await;
    let once = ReconnectOptions { max_attempts: Some(1), ..quick() };
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), once);
    // A connection that syncs is a success: when it drops later, the client tries again.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    answer_sync(&mut ws, &sync, &[]).await;
    synced(&mut laptop).await;
    drop(ws);
    let (_, retry) = disconnected(&mut laptop).await;
    assert!(retry.is_some(), "a synced connection that drops is retried, even with max_attempts 1");
    // That retry failing is the one failed attempt allowed.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    read_frame(&mut ws).await;
    drop(ws);
    let (_, retry) = disconnected(&mut laptop).await;
    assert_eq!(retry, None);
}

#[tokio::test]
async fn close_ends_the_client_when_the_server_never_answers_the_close() {
    let mut server = Scripted::start().await;
    let (mut laptop, ws) = online(&mut server, "cs_t", "alice", quick(), &[]).await;
    // The server (a half-open connection, a peer that hangs) reads nothing more and answers nothing.
    laptop.close();
    let (_, retry) = disconnected(&mut laptop).await;
    assert_eq!(retry, None);
    let end = tokio::time::timeout(Duration::from_secs(30), laptop.next_event()).await;
    assert!(matches!(end, Ok(None)), "no event after the last one: {end:?}");
    drop(ws);
}

#[tokio::test]
async fn an_edit_resent_after_a_drop_is_based_on_the_devices_own_confirmed_edit() {
    let mut server = Scripted::start().await;
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", quick(), &[("c1", 3)]).await;
    // Two quick edits of one title, made from title_v 3: the first is applied (title_v 4) and confirmed,
    // the connection drops before the second arrives.
    laptop.change(Change::Title { chat_id: chat("c1"), title: "a".into() });
    laptop.change(Change::Title { chat_id: chat("c1"), title: "ab".into() });
    let first = read_frame(&mut ws).await;
    assert_eq!(read_frame(&mut ws).await["payload"]["new_title"], "ab");
    let confirmed = json!({"type": "chat_title_updated", "request_id": first["request_id"],
        "payload": {"chat_id": "c1", "data": {"title": "a"}, "versions": {"title_v": 4}}});
    send_json(&mut ws, confirmed).await;
    drop(ws);
    disconnected(&mut laptop).await;
    // The second is re-sent on the version the first produced: the server holds only this device's
    // own edit since, and would otherwise discard the user's last word as a conflict.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let offline = read_frame(&mut ws).await;
    let change = &offline["payload"]["changes"][0];
    assert_eq!((change["value"].as_str(), change["version_before_edit"].as_i64()), (Some("ab"), Some(4)), "{offline}");
    laptop.close();
}

#[tokio::test]
async fn an_edit_made_while_its_queued_predecessor_is_in_flight_is_based_on_it() {
    let mut server = Scripted::start().await;
    let (mut laptop, ws) = online(&mut server, "cs_t", "alice", quick(), &[("c1", 3)]).await;
    drop(ws);
    disconnected(&mut laptop).await;
    // Offline: an edit queued on title_v 3.
    laptop.change(Change::Title { chat_id: chat("c1"), title: "queued".into() });
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let offline = read_frame(&mut ws).await;
    assert_eq!(offline["payload"]["changes"][0]["version_before_edit"], 3);
    let sync = read_frame(&mut ws).await;
    // Online, before the batch is answered, the user edits the title again (still on title_v 3).
    laptop.change(Change::Title { chat_id: chat("c1"), title: "live".into() });
    assert_eq!(read_frame(&mut ws).await["payload"]["new_title"], "live");
    // The queued edit is applied (title_v 4); the connection drops before the live one arrives.
    let rid = offline["request_id"].clone();
    send_json(
        &mut ws,
        json!({"type": "chat_title_updated", "request_id": rid,
        "payload": {"chat_id": "c1", "data": {"title": "queued"}, "versions": {"title_v": 4}}}),
    )
    .await;
    let result = json!({"change_id": offline["payload"]["changes"][0]["change_id"], "chat_id": "c1", "type": "title",
        "status": "applied", "versions": {"messages_v": 0, "title_v": 4, "draft_v": 0}});
    send_json(
        &mut ws,
        json!({"type": "offline_sync_complete", "request_id": rid,
        "payload": {"processed": 1, "conflicts": 0, "errors": 0, "results": [result]}}),
    )
    .await;
    answer_sync(&mut ws, &sync, &[("c1", 4)]).await;
    synced(&mut laptop).await;
    drop(ws);
    disconnected(&mut laptop).await;
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let offline = read_frame(&mut ws).await;
    let change = &offline["payload"]["changes"][0];
    assert_eq!(
        (change["value"].as_str(), change["version_before_edit"].as_i64()),
        (Some("live"), Some(4)),
        "{offline}"
    );
    laptop.close();
}

#[tokio::test]
async fn an_attempt_that_is_never_greeted_is_given_up_and_retried() {
    let mut server = Scripted::start().await;
    let opts = ReconnectOptions { connect_timeout: Duration::from_millis(200), ..quick() };
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), opts);
    // Upgraded, never greeted (a network that died mid-handshake, a server stuck authenticating).
    let _silent = server.accept().await;
    let (_, retry) = disconnected(&mut laptop).await;
    assert!(retry.is_some());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    answer_sync(&mut ws, &sync, &[]).await;
    synced(&mut laptop).await;
    laptop.close();
}

#[tokio::test]
async fn a_half_open_connection_is_found_by_the_keepalive_and_replaced() {
    let mut server = Scripted::start().await;
    let opts = ReconnectOptions { keepalive: Duration::from_millis(200), ..quick() };
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", opts, &[]).await;
    // A quiet connection is pinged; a live server's pong keeps it (and is not surfaced).
    let ping = read_frame(&mut ws).await;
    assert_eq!(ping["type"], "ping");
    send_json(&mut ws, json!({"type": "pong", "payload": {}, "request_id": ping["request_id"]})).await;
    assert_eq!(read_frame(&mut ws).await["type"], "ping", "pinged again once quiet again");
    assert!(laptop.is_connected());
    // That one is never answered: the connection is taken for dead and replaced.
    let (close, retry) = until(&mut laptop, |e| match e {
        Event::Disconnected { close, retry_in, .. } => Some((close.clone(), *retry_in)),
        Event::Message(m) => panic!("the keepalive's pong is not surfaced: {m:?}"),
        _ => None,
    })
    .await;
    assert_eq!((close, retry.is_some()), (None, true));
    let mut ws2 = server.accept().await;
    greet(&mut ws2).await;
    assert_eq!(read_frame(&mut ws2).await["type"], "initial_sync_request");
    laptop.close();
    drop(ws);
}

/// A server busy with a long request answers no `ping` (it handles a connection's requests in order), but
/// its WebSocket Pings (the server's heartbeat) show it alive: the connection is kept, and not pinged.
#[tokio::test]
async fn a_server_that_sends_websocket_pings_is_alive_though_it_answers_no_ping() {
    use futures_util::{FutureExt, SinkExt};
    let mut server = Scripted::start().await;
    let opts = ReconnectOptions { keepalive: Duration::from_millis(200), ..quick() };
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", opts, &[]).await;
    // Five times the keepalive (two and a half times what would drop a silent connection), the server
    // sending nothing but WebSocket Pings.
    for _ in 0..20 {
        ws.send(Message::Ping(Vec::new().into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some(Some(event)) = laptop.next_event().now_or_never() {
        assert!(!matches!(event, Event::Disconnected { .. }), "dropped: {event:?}");
    }
    assert!(laptop.is_connected());
    // The next text frame the client sent is a request of its own, not a keepalive ping.
    laptop.change(Change::Title { chat_id: chat("c1"), title: "t".into() });
    assert_eq!(read_frame(&mut ws).await["type"], "update_title");
    laptop.close();
}

#[tokio::test]
async fn a_frame_the_client_cannot_read_is_reported_and_the_connection_kept() {
    let mut server = Scripted::start().await;
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", quick(), &[("c1", 3)]).await;
    // A newer server's event, a malformed one, a frame that is not JSON: none answers a request of the
    // client's. Dropping the connection for them would reconnect (and resync) in a loop, since each new
    // connection syncs and gets them again.
    send_json(&mut ws, json!({"type": "server_notice", "payload": {"text": "hello"}})).await;
    send_json(&mut ws, json!({"type": "chat_title_updated", "payload": {"chat_id": "c1"}})).await;
    {
        use futures_util::SinkExt;
        ws.send(Message::text("not json")).await.unwrap();
    }
    send_json(
        &mut ws,
        json!({"type": "chat_title_updated",
        "payload": {"chat_id": "c1", "data": {"title": "x"}, "versions": {"title_v": 4}}}),
    )
    .await;
    let mut unreadable = Vec::new();
    until(&mut laptop, |e| match e {
        Event::ProtocolError { frame, .. } => {
            unreadable.push(frame.clone());
            None
        }
        Event::Message(m) => matches!(m.message, ServerMessage::ChatTitleUpdated(_)).then_some(()),
        Event::Disconnected { error, .. } => panic!("disconnected: {error}"),
        _ => None,
    })
    .await;
    assert_eq!(unreadable.len(), 3, "{unreadable:?}");
    assert_eq!(laptop.versions()[&chat("c1")].title_v, Some(4));
    // One that carries the request_id of a request in flight is its lost reply: the connection ends.
    let laptop = std::sync::Arc::new(tokio::sync::Mutex::new(laptop));
    let asking = laptop.clone();
    let request = tokio::spawn(async move { asking.lock().await.request(ClientMessage::Ping(Empty {})).await });
    let ping = read_frame(&mut ws).await;
    send_json(&mut ws, json!({"type": "pong", "payload": "pong", "request_id": ping["request_id"]})).await;
    assert!(request.await.unwrap().is_err());
    let (_, retry) = disconnected(&mut *laptop.lock().await).await;
    assert!(retry.is_some());
    laptop.lock().await.close();
}

#[tokio::test]
async fn a_live_edit_the_server_could_not_take_for_now_is_queued_not_lost() {
    let mut server = Scripted::start().await;
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", quick(), &[("c1", 3), ("c2", 1)]).await;
    let refused = |e: &Event| match e {
        Event::Message(Incoming { message: ServerMessage::Error(e), .. }) => Some(e.code),
        _ => None,
    };
    // The store is briefly unavailable: the edit is kept for the next connection, as a message would be.
    for (chat_id, title) in [("c1", "a"), ("c2", "z")] {
        laptop.change(Change::Title { chat_id: chat(chat_id), title: title.into() });
        let sent = read_frame(&mut ws).await;
        send_json(
            &mut ws,
            json!({"type": "error", "request_id": sent["request_id"],
            "payload": {"code": "unavailable", "message": "The store is unavailable.", "chat_id": chat_id}}),
        )
        .await;
        assert_eq!(until(&mut laptop, refused).await, ErrorCode::Unavailable);
    }
    assert_eq!(laptop.queued_changes(), 2);
    // A later live edit of c1's title supersedes the queued one (sent after it, it would undo it, or
    // meet it as a conflict).
    laptop.change(Change::Title { chat_id: chat("c1"), title: "ab".into() });
    let sent = read_frame(&mut ws).await;
    send_json(
        &mut ws,
        json!({"type": "chat_title_updated", "request_id": sent["request_id"],
        "payload": {"chat_id": "c1", "data": {"title": "ab"}, "versions": {"title_v": 4}}}),
    )
    .await;
    confirmed_title(&mut laptop).await;
    assert_eq!(laptop.queued_changes(), 1);
    drop(ws);
    disconnected(&mut laptop).await;
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let offline = read_frame(&mut ws).await;
    let changes = offline["payload"]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{offline}");
    assert_eq!((changes[0]["chat_id"].as_str(), changes[0]["value"].as_str()), (Some("c2"), Some("z")));
    assert_eq!(changes[0]["version_before_edit"], 1);
    laptop.close();
}

/// The app signs in as Bob on a client that Alice left offline with work unsent: her edit, message and
/// chats are never sent as his (the edit would create a chat with her title in his account, the message
/// be posted as his); what Bob did after `set_token` named him, still offline, is his and goes out.
#[tokio::test]
async fn what_one_user_left_unsent_never_reaches_another_users_account_and_the_new_users_work_does() {
    let mut server = Scripted::start().await;
    let (mut laptop, ws) = online(&mut server, "cs_alice", "alice", quick(), &[("alice-chat", 3)]).await;
    drop(ws);
    disconnected(&mut laptop).await;
    let message = |id: &str, text: &str| NewMessage {
        message_id: MessageId::new(id).unwrap(),
        content: MessageContent::Text(text.into()),
        timestamp: None,
        temp_id: None,
    };
    laptop.change(Change::Title { chat_id: chat("alice-chat"), title: "alice's title".into() });
    laptop.send_message(chat("alice-chat"), message("m1", "alice's message"));
    laptop.set_token("cs_bob");
    // Bob, signed in while offline, edits and writes before the connection comes.
    laptop.change(Change::Title { chat_id: chat("bob-chat"), title: "bob's title".into() });
    laptop.send_message(chat("bob-chat"), message("m2", "bob's message"));
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!((laptop.queued_changes(), laptop.unconfirmed_messages()), (2, 2));
    // The first connection with Bob's token (an attempt begun before the call still carries Alice's: it
    // is turned away before its greeting, as a server that failed).
    let mut ws = loop {
        let (ws, auth) = server.accept_with_auth().await;
        if auth == "Bearer cs_bob" {
            break ws;
        }
    };
    greet_as(&mut ws, "bob").await;
    let offline = read_frame(&mut ws).await;
    assert_eq!(offline["type"], "sync_offline_changes", "{offline}");
    let changes = offline["payload"]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{offline}");
    assert_eq!(changes[0]["chat_id"], "bob-chat", "{offline}");
    let sent = read_frame(&mut ws).await;
    assert_eq!(
        (sent["type"].as_str(), sent["payload"]["chat_id"].as_str()),
        (Some("chat_message_added"), Some("bob-chat")),
        "{sent}"
    );
    let sync = read_frame(&mut ws).await;
    assert_eq!(sync["type"], "initial_sync_request", "{sync}");
    assert_eq!(sync["payload"]["chat_versions"], json!({}), "{sync}");
    assert_eq!((laptop.queued_changes(), laptop.unconfirmed_messages()), (1, 1), "only bob's");
    assert!(laptop.versions().is_empty());
    laptop.close();
}

#[tokio::test]
async fn a_stray_frame_with_the_syncs_request_id_does_not_lose_the_sync() {
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    // A buggy server's frame of another type carrying the sync's request_id, then the sync's reply.
    send_json(&mut ws, json!({"type": "pong", "payload": {}, "request_id": sync["request_id"]})).await;
    answer_sync(&mut ws, &sync, &[("c1", 3)]).await;
    synced(&mut laptop).await;
    laptop.close();
}

#[tokio::test]
async fn the_parts_of_a_sync_that_never_completed_are_not_taken_as_held() {
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let part = |sync: &Value, id: &str| {
        json!({"type": "initial_sync_response", "request_id": sync["request_id"], "payload": {
            "chat_ids_to_delete": [], "server_chat_order": [], "sync_completed_at": "2026-01-01T00:00:00Z",
            "active_streams": [], "more": true, "chats_to_add_or_update": [{"chat_id": id, "type": "new_chat",
            "title": "renamed", "draft_json": null, "versions": {"messages_v": 0, "title_v": 5, "draft_v": 0},
            "last_edited_overall_timestamp": 0, "unread_count": 0}]}})
    };
    // A sync that fails after a first part (the store gone mid-reply), then one cut after a first part.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    send_json(&mut ws, part(&sync, "c1")).await;
    send_json(
        &mut ws,
        json!({"type": "initial_sync_error", "request_id": sync["request_id"],
        "payload": {"code": "unavailable", "message": "The store is unavailable."}}),
    )
    .await;
    disconnected(&mut laptop).await;
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    assert_eq!(sync["payload"]["chat_versions"], json!({}), "{sync}");
    send_json(&mut ws, part(&sync, "c2")).await;
    drop(ws);
    disconnected(&mut laptop).await;
    // The application never got those parts (no Event::Synced): the next sync must not claim the
    // chats' new versions as held, or the server would never send what they carry.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    assert_eq!(sync["payload"]["chat_versions"], json!({}), "{sync}");
    assert!(laptop.versions().is_empty());
    laptop.close();
}

#[tokio::test]
async fn a_chat_seen_deleted_is_not_held_again() {
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    // A first part lists c1 and c2, c1 is deleted (on another device) before the last part comes.
    let chat_entry = |id: &str| {
        json!({"chat_id": id, "type": "new_chat", "title": "t", "draft_json": null,
            "versions": {"messages_v": 0, "title_v": 1, "draft_v": 0}, "last_edited_overall_timestamp": 0,
            "unread_count": 0})
    };
    send_json(
        &mut ws,
        json!({"type": "initial_sync_response", "request_id": sync["request_id"], "payload": {
        "chat_ids_to_delete": [], "chats_to_add_or_update": [chat_entry("c1"), chat_entry("c2")],
        "server_chat_order": [], "sync_completed_at": "2026-01-01T00:00:00Z", "active_streams": [], "more": true}}),
    )
    .await;
    send_json(&mut ws, json!({"type": "chat_deleted", "payload": {"chat_id": "c1", "tombstone": true}})).await;
    answer_sync(&mut ws, &sync, &[("c3", 1)]).await;
    synced(&mut laptop).await;
    // And a broadcast that raced the deletion (PROTOCOL.md: a client ignores events for a chat it saw
    // deleted), then one of a live chat, to know both were handled.
    send_json(
        &mut ws,
        json!({"type": "chat_title_updated",
        "payload": {"chat_id": "c1", "data": {"title": "x"}, "versions": {"title_v": 9}}}),
    )
    .await;
    send_json(
        &mut ws,
        json!({"type": "chat_title_updated",
        "payload": {"chat_id": "c2", "data": {"title": "x"}, "versions": {"title_v": 2}}}),
    )
    .await;
    until(&mut laptop, |e| match e {
        Event::Message(Incoming { message: ServerMessage::ChatTitleUpdated(c), .. }) => {
            (c.chat_id == chat("c2")).then_some(())
        }
        _ => None,
    })
    .await;
    let held: Vec<ChatId> = laptop.versions().into_keys().collect();
    assert_eq!(held, [chat("c2"), chat("c3")]);
    laptop.close();
}

/// A client offline with one queued title change and one unconfirmed message, on `server`'s next
/// connection (upgraded, not greeted).
async fn offline_with_work(server: &mut Scripted) -> (ReconnectingClient, WebSocketStream<TcpStream>) {
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    drop(ws);
    disconnected(&mut laptop).await;
    laptop.change(Change::Title { chat_id: chat("c1"), title: "offline".into() });
    let message = NewMessage {
        message_id: MessageId::new("m1").unwrap(),
        content: MessageContent::Text("hello".into()),
        timestamp: None,
        temp_id: None,
    };
    laptop.send_message(chat("c1"), message);
    let ws = server.accept().await;
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    assert_eq!((laptop.queued_changes(), laptop.unconfirmed_messages()), (1, 1));
    (laptop, ws)
}

/// A greeting whose `max_frame_bytes` is 0, below the 1024 any chatsync server takes, or missing, says
/// nothing usable about the frame size: the client keeps to the protocol's default instead of taking every
/// queued change and message for "larger than a frame" and dropping them all.
#[tokio::test]
async fn a_greeting_with_a_zero_frame_size_does_not_empty_the_queue() {
    let mut server = Scripted::start().await;
    // 0, absurdly small, and missing (a greeting whose `limits` lacks them): the default.
    for max_frame_bytes in [Some(0), Some(10), None] {
        let (mut laptop, mut ws) = offline_with_work(&mut server).await;
        let limits =
            Limits { max_frame_bytes: max_frame_bytes.unwrap_or(0), max_offline_changes: 0, ..Limits::default() };
        let mut greeting = json!({"type": "connected", "payload": {"connection_id": "conn", "user_id": "alice",
            "device_hash": "0".repeat(64), "protocol": "chatsync.v1", "server_time": "2026-01-01T00:00:00Z",
            "limits": limits}});
        if max_frame_bytes.is_none() {
            let limits = greeting["payload"]["limits"].as_object_mut().unwrap();
            limits.remove("max_frame_bytes");
            limits.remove("max_offline_changes");
        }
        send_json(&mut ws, greeting).await;
        let offline = read_frame(&mut ws).await;
        assert_eq!(offline["type"], "sync_offline_changes", "{offline}");
        assert_eq!(offline["payload"]["changes"][0]["value"], "offline");
        let message = read_frame(&mut ws).await;
        assert_eq!(
            (message["type"].as_str(), message["payload"]["message"]["message_id"].as_str()),
            (Some("chat_message_added"), Some("m1"))
        );
        assert_eq!(read_frame(&mut ws).await["type"], "initial_sync_request");
        assert_eq!((laptop.queued_changes(), laptop.unconfirmed_messages()), (1, 1), "nothing dropped");
        laptop.close();
        disconnected(&mut laptop).await;
    }
}

/// A `sync_offline_changes` batch the server refuses as a whole for now (`unavailable`) stays queued for
/// the next connection; one it refuses with an error a retry would repeat (`invalid_payload`) leaves the
/// queue, each change reported as refused, instead of being sent again on every connection, forever.
#[tokio::test]
async fn an_offline_batch_refused_for_good_leaves_the_queue_and_is_reported() {
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    drop(ws);
    disconnected(&mut laptop).await;
    laptop.change(Change::Title { chat_id: chat("c1"), title: "a".into() });
    laptop.change(Change::DeleteDraft { chat_id: chat("c2") });
    let refused = |code: &'static str| {
        move |offline: &Value| {
            json!({"type": "error", "request_id": offline["request_id"],
                "payload": {"code": code, "message": "Refused.", "field": "changes"}})
        }
    };
    for (code, kept) in [("unavailable", 2), ("invalid_payload", 0)] {
        let mut ws = server.accept().await;
        greet(&mut ws).await;
        let offline = read_frame(&mut ws).await;
        assert_eq!(offline["type"], "sync_offline_changes", "{offline}");
        assert_eq!(offline["payload"]["changes"].as_array().unwrap().len(), 2, "{offline}");
        send_json(&mut ws, refused(code)(&offline)).await;
        let error = until(&mut laptop, |e| match e {
            Event::Message(Incoming { message: ServerMessage::Error(e), .. }) => Some(e.code),
            _ => None,
        })
        .await;
        assert_eq!(serde_json::to_value(error).unwrap(), code);
        if kept == 0 {
            let done = offline_synced(&mut laptop).await;
            assert_eq!((done.processed, done.errors), (0, 2));
            let results: Vec<(Option<&str>, OfflineStatus, Option<ErrorCode>)> =
                done.results.iter().map(|r| (r.chat_id.as_deref(), r.status, r.code)).collect();
            assert_eq!(
                results,
                [
                    (Some("c1"), OfflineStatus::Error, Some(ErrorCode::InvalidPayload)),
                    (Some("c2"), OfflineStatus::Error, Some(ErrorCode::InvalidPayload))
                ]
            );
        }
        let sync = read_frame(&mut ws).await;
        answer_sync(&mut ws, &sync, &[]).await;
        synced(&mut laptop).await;
        assert_eq!(laptop.queued_changes(), kept, "after {code}");
        drop(ws);
        disconnected(&mut laptop).await;
    }
    // The next connection has nothing left to send but its sync.
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    assert_eq!(read_frame(&mut ws).await["type"], "initial_sync_request");
    laptop.close();
}

/// One empty part of an initial sync's reply to request `rid`.
fn sync_part(rid: &Value, more: bool) -> Value {
    json!({"type": "initial_sync_response", "request_id": rid, "payload": {
        "chat_ids_to_delete": [], "chats_to_add_or_update": [], "server_chat_order": [],
        "sync_completed_at": "2026-01-01T00:00:00Z", "active_streams": [], "more": more}})
}

/// A server that sends the parts of a reply forever (`more: true`, again and again) does not make the
/// client collect them without end: past `max_reply_parts` (1024 by default) a caller's request fails,
/// and the connection's initial sync fails (the connection is dropped and retried).
#[tokio::test]
async fn a_reply_in_endless_parts_is_given_up_not_collected_forever() {
    let mut server = Scripted::start().await;
    let parts = ReconnectOptions::default().max_reply_parts;
    assert_eq!(parts, 1024);
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", quick(), &[]).await;
    let request = ClientMessage::InitialSyncRequest(InitialSyncRequest {
        chat_versions: BTreeMap::new(),
        immediate_view_chat_id: None,
    });
    let script = async {
        let sent = read_frame(&mut ws).await;
        for _ in 0..=parts {
            send_json(&mut ws, sync_part(&sent["request_id"], true)).await;
        }
        // The parts after the cap are dropped, up to the last one; the connection goes on.
        send_json(&mut ws, sync_part(&sent["request_id"], false)).await;
        let ping = read_frame(&mut ws).await;
        send_json(&mut ws, json!({"type": "pong", "request_id": ping["request_id"], "payload": {}})).await;
    };
    let asked = async {
        let reply = tokio::time::timeout(Duration::from_secs(30), laptop.request(request)).await;
        let error =
            reply.expect("the request never ended").map(|parts| parts.len()).expect_err("more parts than allowed");
        assert!(error.to_string().contains("parts"), "{error}");
        let pong = tokio::time::timeout(Duration::from_secs(30), laptop.request(ClientMessage::Ping(Empty {})));
        assert!(pong.await.expect("no pong").is_ok());
    };
    tokio::join!(script, asked);

    // The connection's own initial sync, in endless parts: the sync fails and the connection is dropped.
    drop(ws);
    disconnected(&mut laptop).await;
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let sync = read_frame(&mut ws).await;
    let script = async {
        // The last of these is one too many: the client hangs up after it.
        for _ in 0..parts {
            send_json(&mut ws, sync_part(&sync["request_id"], true)).await;
        }
    };
    let gone = async {
        until(&mut laptop, |e| match e {
            Event::Disconnected { error, .. } => Some(error.clone()),
            Event::Synced(_) => panic!("synced"),
            _ => None,
        })
        .await
    };
    let (_, error) = tokio::join!(script, gone);
    assert!(error.contains("parts"), "{error}");
    laptop.close();
}

/// Another device's `chat_title_updated` of chat c1 (a broadcast: no `request_id`).
fn title_broadcast(title: &str, title_v: usize) -> Value {
    json!({"type": "chat_title_updated",
        "payload": {"chat_id": "c1", "data": {"title": title}, "versions": {"title_v": title_v}}})
}

/// An application that takes its events slowly holds the connection back (the client stops reading it
/// while `event_capacity` events wait), instead of the client buffering whatever the server sends:
/// the events waiting never exceed the capacity, and none is lost.
#[tokio::test]
async fn events_the_application_has_not_taken_are_bounded_and_none_is_lost() {
    let mut server = Scripted::start().await;
    let capacity = 16;
    let opts = ReconnectOptions { event_capacity: capacity, ..quick() };
    let (mut laptop, mut ws) = online(&mut server, "cs_t", "alice", opts, &[]).await;
    let broadcasts = 2000;
    let script = tokio::spawn(async move {
        for i in 0..=broadcasts {
            let title = if i == broadcasts { "last".to_owned() } else { format!("t{i}") };
            send_json(&mut ws, title_broadcast(&title, i + 1)).await;
        }
        ws
    });
    // The application is busy: the events fill up to the capacity...
    let full = async {
        while laptop.buffered_events() < capacity {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), full).await.expect("the events never filled up");
    // ...and no further, while it takes them one by one, to the last.
    let mut titles = 0;
    loop {
        let waiting = laptop.buffered_events();
        assert!(waiting <= capacity, "{waiting} events waiting, capacity {capacity}");
        let event = tokio::time::timeout(Duration::from_secs(30), laptop.next_event()).await.expect("no event");
        if let Some(Event::Message(Incoming { message: ServerMessage::ChatTitleUpdated(t), .. })) = event {
            titles += 1;
            if t.data.title == "last" {
                break;
            }
        }
    }
    assert_eq!(titles, broadcasts + 1);
    let _ws = script.await.unwrap();
    laptop.close();
}

/// A caller awaiting a request cannot take events meanwhile (both calls need the handle), and the reply
/// may come behind more events than `event_capacity`: the client reads on while a request waits, so the
/// request is answered; with far more events than that waiting (four times the capacity) it drops the
/// connection, failing the request, rather than holding them all. Blocking on the full channel, the
/// client read nothing more and the request waited for ever.
#[tokio::test]
async fn a_request_awaited_behind_more_events_than_the_capacity_is_answered_or_fails() {
    let mut server = Scripted::start().await;
    let capacity = 16;
    let opts = ReconnectOptions { event_capacity: capacity, ..quick() };
    let (laptop, mut ws) = online(&mut server, "cs_t", "alice", opts, &[]).await;
    let title = |i: usize| title_broadcast(&format!("t{i}"), i + 1);
    // Before its reply, the server sends twice the capacity in events.
    let script = tokio::spawn(async move {
        let request = read_frame(&mut ws).await;
        assert_eq!(request["type"], "ping", "{request}");
        for i in 0..2 * capacity {
            send_json(&mut ws, title(i)).await;
        }
        send_json(&mut ws, json!({"type": "pong", "payload": {}, "request_id": request["request_id"]})).await;
        ws
    });
    let reply = tokio::time::timeout(Duration::from_secs(30), laptop.request(ClientMessage::Ping(Empty {})))
        .await
        .expect("the request was never answered");
    assert!(matches!(reply.unwrap()[0].message, ServerMessage::Pong(_)));
    let mut ws = script.await.unwrap();

    // With five times the capacity before the reply, the connection is dropped once four times wait.
    let script = tokio::spawn(async move {
        read_frame(&mut ws).await;
        for i in 0..5 * capacity {
            use futures_util::SinkExt;
            if ws.send(Message::text(title(2 * capacity + i).to_string())).await.is_err() {
                break;
            }
        }
    });
    let reply = tokio::time::timeout(Duration::from_secs(30), laptop.request(ClientMessage::Ping(Empty {})))
        .await
        .expect("the request neither answered nor failed");
    assert!(reply.is_err(), "the connection was dropped with the request in flight: {reply:?}");
    script.await.unwrap();
    laptop.close();
}

/// After a long time offline, what the client has to send (queued changes, unconfirmed messages, the
/// initial sync) is more frames than the server's rate burst: the client spaces them by the rate the
/// greeting announces, so that none is refused `rate_limited` and the initial sync completes on the
/// first connection (sent at once, the messages past the burst were refused, and the sync with them,
/// which cost the connection).
#[tokio::test]
async fn a_long_outbox_is_paced_to_the_servers_rate_and_the_sync_is_not_refused() {
    let server = TestServer::start_with(|c| {
        c.rate_per_sec = 20;
        c.rate_burst = 10;
    })
    .await;
    let token = server.user_token("alice").await;
    let (proxy, mut laptop) = behind_proxy(&server, &token).await;
    synced(&mut laptop).await;
    proxy.cut();
    disconnected(&mut laptop).await;
    // 42 frames, four times the burst: some 2 s at the pace of the rate.
    let messages = 40;
    for i in 0..messages {
        let message = NewMessage {
            message_id: MessageId::new(format!("m{i}")).unwrap(),
            content: MessageContent::Text(format!("offline {i}")),
            timestamp: None,
            temp_id: None,
        };
        laptop.send_message(chat("c1"), message);
    }
    laptop.change(Change::Title { chat_id: chat("c2"), title: "offline".into() });
    assert!(laptop.request(ClientMessage::Ping(Empty {})).await.is_err());
    proxy.restore();
    // Attempts that failed before the restore aside, the next connection is the one.
    until(&mut laptop, |e| matches!(e, Event::Connected(_)).then_some(())).await;
    let mut confirmed = 0;
    let mut offline = None;
    let refused = |e: &Event| match e {
        Event::Message(Incoming { message: ServerMessage::Error(e), .. }) => Some(format!("{:?}", e.code)),
        Event::Message(Incoming { message: ServerMessage::InitialSyncError(e), .. }) => Some(format!("{:?}", e.code)),
        Event::Disconnected { error, .. } => Some(error.clone()),
        _ => None,
    };
    loop {
        let event = until(&mut laptop, |e| Some(e.clone())).await;
        assert_eq!(refused(&event), None, "{event:?}");
        match event {
            Event::Message(Incoming { message: ServerMessage::ChatMessageConfirmed(_), .. }) => confirmed += 1,
            Event::OfflineSynced(done) => offline = Some(done),
            Event::Synced(_) => break,
            _ => {}
        }
    }
    assert_eq!(confirmed, messages);
    assert_eq!(offline.map(|done| done.processed), Some(1));
    assert_eq!((laptop.unconfirmed_messages(), laptop.queued_changes()), (0, 0));
    laptop.close();
}

/// A server (or a proxy) that refuses the initial sync `rate_limited` every time does not hold the
/// client on that connection for ever: after a few tries the connection ends as a failed attempt (the
/// backoff and `max_attempts` apply), where it was sent again for as long as the server answered.
#[tokio::test]
async fn an_initial_sync_refused_for_rate_every_time_ends_the_connection() {
    let mut server = Scripted::start().await;
    let opts = ReconnectOptions { max_attempts: Some(1), ..quick() };
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), opts);
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    let script = tokio::spawn(async move {
        let mut refusals = 0;
        loop {
            use futures_util::StreamExt;
            let Some(Ok(Message::Text(frame))) = ws.next().await else { return refusals };
            let sync: Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(sync["type"], "initial_sync_request", "{sync}");
            refusals += 1;
            send_json(
                &mut ws,
                json!({"type": "initial_sync_error", "request_id": sync["request_id"],
                "payload": {"code": "rate_limited", "message": "Too many messages; this one was dropped."}}),
            )
            .await;
        }
    });
    let (close, retry_in) = until(&mut laptop, |e| match e {
        Event::Synced(_) => panic!("synced"),
        Event::Disconnected { close, retry_in, .. } => Some((close.clone(), *retry_in)),
        _ => None,
    })
    .await;
    assert_eq!((close, retry_in), (None, None), "one attempt allowed, and it failed");
    let refusals = tokio::time::timeout(Duration::from_secs(30), script).await.expect("still connected").unwrap();
    assert_eq!(refusals, 9, "sent once, then again after each of 8 refusals");
}

/// An initial sync refused `rate_limited` all the same (a server slower than it announced: it charges a
/// frame when it reads it, and frames sent while it worked on a long request are read together) is
/// sent again on the same connection after a pause, as the TypeScript SDK does, instead of costing the
/// connection: the rate refills as time passes, where a new connection would cost a connect more.
#[tokio::test]
async fn an_initial_sync_refused_for_rate_is_sent_again_on_the_same_connection() {
    let mut server = Scripted::start().await;
    let mut laptop = ReconnectingClient::start(&server.url, ConnectOptions::new("cs_t", "laptop"), quick());
    let mut ws = server.accept().await;
    greet(&mut ws).await;
    for _ in 0..2 {
        let sync = read_frame(&mut ws).await;
        assert_eq!(sync["type"], "initial_sync_request", "{sync}");
        send_json(
            &mut ws,
            json!({"type": "initial_sync_error", "request_id": sync["request_id"],
            "payload": {"code": "rate_limited", "message": "Too many messages; this one was dropped."}}),
        )
        .await;
    }
    let sync = read_frame(&mut ws).await;
    answer_sync(&mut ws, &sync, &[("c1", 2)]).await;
    let done = until(&mut laptop, |e| match e {
        Event::Synced(s) => Some(s.clone()),
        Event::Disconnected { error, .. } => panic!("disconnected: {error}"),
        _ => None,
    })
    .await;
    assert_eq!(done.chats_to_add_or_update.len(), 1);
    assert_eq!(laptop.versions()[&chat("c1")].title_v, Some(2));
    laptop.close();
}
