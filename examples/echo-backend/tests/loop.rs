//! The whole loop, on real servers: a device writes a message → chatsync stores it and calls the echo
//! backend's webhook → the backend streams a reply through the server API → every device of the user sees
//! the reply word by word and then stored; a device that cancels stops it; a reply that cannot be finished
//! is ended; a redelivered event is answered once; a bad signature is refused.

use chatsync_client::{Client, ConnectOptions};
use chatsync_protocol::{
    ChatId, ChatMessageAdded, ClientMessage, MessageContent, MessageId, NewMessage, ServerMessage,
};
use std::time::Duration;

const SECRET: &str = "echo-test-secret";

struct Loop {
    ws_url: String,
    hook: String,
    ctx: chatsync::Ctx,
    _data: tempfile::TempDir,
}

/// chatsync on port 0 with its webhook pointed at an echo backend on port 0.
async fn start(word_delay: Duration) -> Loop {
    start_with(word_delay, |_| {}).await
}

/// [`start`], with chatsync's configuration changed by `tweak`.
async fn start_with(word_delay: Duration, tweak: impl FnOnce(&mut chatsync::Config)) -> Loop {
    let backend_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/webhook", backend_listener.local_addr().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = chatsync::Config {
        data_dir: data.path().to_owned(),
        webhook_url: Some(hook.clone()),
        webhook_secret: Some(SECRET.to_owned().into()),
        ..chatsync::Config::default()
    };
    tweak(&mut config);
    let ctx = chatsync::build(config).await.unwrap();
    tokio::spawn(chatsync::run(listener, ctx.clone(), std::future::pending()));
    let (_, api_key) = chatsync::api::keys::create(ctx.store.as_ref(), Some("echo")).await.unwrap();
    let backend = chatsync_echo_backend::router(chatsync_echo_backend::Config {
        api_url: format!("http://{addr}"),
        api_key,
        webhook_secret: SECRET.into(),
        sender_name: "assistant".into(),
        word_delay,
    });
    tokio::spawn(async move { axum::serve(backend_listener, backend).await });
    ctx.store.create_user("alice", false, 0).await.unwrap();
    Loop { ws_url: format!("ws://{addr}/v1/ws"), hook, ctx, _data: data }
}

impl Loop {
    async fn device(&self, name: &str) -> Client {
        let token =
            chatsync::gateway::auth::issue_session(self.ctx.store.as_ref(), "alice", None, Duration::from_secs(600))
                .await
                .unwrap();
        let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(&token, name) };
        Client::connect_authenticated(&self.ws_url, &opts).await.unwrap().0
    }
}

fn say(text: &str) -> ClientMessage {
    ClientMessage::ChatMessageAdded(ChatMessageAdded {
        chat_id: ChatId::new("c1").unwrap(),
        message: NewMessage {
            message_id: MessageId::new("m1").unwrap(),
            content: MessageContent::Text(text.into()),
            timestamp: None,
            temp_id: None,
        },
    })
}

/// Reads `c` until the stream completes; returns the text assembled from its chunks.
async fn assemble(c: &mut Client) -> String {
    let mut text = String::new();
    loop {
        match c.recv().await.unwrap().message {
            ServerMessage::StreamChunk(chunk) => text.push_str(&chunk.delta),
            ServerMessage::StreamCompleted(_) => return text,
            ServerMessage::StreamCancelled(c) => panic!("cancelled: {c:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_message_gets_a_streamed_reply_on_every_device_and_it_is_stored() {
    let l = start(Duration::from_millis(5)).await;
    let mut phone = l.device("phone").await;
    let mut laptop = l.device("laptop").await;
    let reply = phone.request(&say("hello there world")).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatMessageConfirmed(_)), "{reply:?}");
    assert_eq!(assemble(&mut phone).await, "echo: hello there world");
    assert_eq!(assemble(&mut laptop).await, "echo: hello there world");

    let page = laptop
        .request(&ClientMessage::GetChatMessages(chatsync_protocol::GetChatMessages {
            chat_id: ChatId::new("c1").unwrap(),
            after_seq: 0,
            limit: None,
        }))
        .await
        .unwrap();
    let ServerMessage::ChatMessagesResponse(page) = page.message else { panic!("{page:?}") };
    let last = page.messages.last().unwrap();
    assert_eq!(
        (last.sender_name.as_str(), &last.content),
        ("assistant", &MessageContent::Text("echo: hello there world".into()))
    );
}

#[tokio::test]
async fn a_device_that_cancels_stops_the_reply() {
    let l = start(Duration::from_millis(300)).await;
    let mut phone = l.device("phone").await;
    phone.request(&say("one two three four five six seven eight nine ten")).await.unwrap();
    let started = loop {
        if let ServerMessage::StreamStarted(s) = phone.recv().await.unwrap().message {
            break s;
        }
    };
    let cancel = serde_json::json!({"type": "cancel_stream", "request_id": "c",
        "payload": {"chat_id": "c1", "stream_id": started.stream_id}});
    phone.send_text(cancel.to_string()).await.unwrap();
    loop {
        match phone.recv().await.unwrap().message {
            ServerMessage::StreamCancelled(c) => {
                assert_eq!(c.reason, chatsync_protocol::StreamCancelReason::CancelledByUser);
                break;
            }
            ServerMessage::StreamCompleted(_) => panic!("the reply completed after the cancel"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_webhook_with_a_bad_signature_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let backend = chatsync_echo_backend::router(chatsync_echo_backend::Config {
        api_url: "http://127.0.0.1:9".into(),
        api_key: "ck_x".into(),
        webhook_secret: SECRET.into(),
        sender_name: "assistant".into(),
        word_delay: Duration::ZERO,
    });
    tokio::spawn(async move { axum::serve(listener, backend).await });
    let http = reqwest::Client::new();
    let body = r#"{"id":"evt_1","type":"message.created"}"#;
    for sig in [None, Some("sha256=00"), Some("md5=abc")] {
        let mut req = http.post(&url).body(body);
        if let Some(sig) = sig {
            req = req.header("X-Chatsync-Signature", sig);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), 401, "{sig:?}");
    }
    assert!(chatsync_echo_backend::valid_signature(
        b"k",
        b"body",
        Some(&format!("sha256={}", hmac_hex(b"k", b"body")))
    ));
}

#[tokio::test]
async fn a_reply_that_cannot_be_finished_is_ended_on_every_device() {
    // The stream's text is capped below the reply: a chunk is refused (422) half way through.
    let l = start_with(Duration::from_millis(1), |c| {
        c.max_stream_bytes = 16;
        c.stream_idle_timeout_secs = 3600;
    })
    .await;
    let mut phone = l.device("phone").await;
    phone.request(&say("one two three four five six seven")).await.unwrap();
    // The backend gives up and says so: devices do not show a reply frozen until the idle timeout.
    let ended = async {
        loop {
            match phone.recv().await.unwrap().message {
                ServerMessage::StreamCancelled(c) => return c.reason,
                ServerMessage::StreamCompleted(c) => panic!("completed: {c:?}"),
                _ => {}
            }
        }
    };
    let reason = tokio::time::timeout(Duration::from_secs(30), ended).await.expect("the stream was left open");
    assert_eq!(reason, chatsync_protocol::StreamCancelReason::Aborted);
}

/// POSTs a signed `message.created` event to the backend, as chatsync delivers it; returns the status.
async fn deliver(l: &Loop, event_id: &str, message_id: &str, text: &str) -> u16 {
    let body = serde_json::json!({"id": event_id, "type": "message.created", "created_at": "2026-01-01T00:00:00.000Z",
        "user_id": "alice", "chat_id": "c1", "message_id": message_id, "seq": 1, "content": text,
        "client_timestamp": null})
    .to_string();
    let request = reqwest::Client::new()
        .post(&l.hook)
        .header("X-Chatsync-Signature", format!("sha256={}", hmac_hex(SECRET.as_bytes(), body.as_bytes())))
        .body(body);
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn a_redelivered_event_is_answered_once() {
    let l = start(Duration::from_millis(1)).await;
    let mut phone = l.device("phone").await;
    assert_eq!(deliver(&l, "evt_00000000000000000000000000000001", "m1", "hello again").await, 202);
    assert_eq!(assemble(&mut phone).await, "echo: hello again");
    // Delivery is at least once: the same event again (its 2xx lost on the way back) is acknowledged and
    // does nothing; devices would otherwise see the reply streamed a second time.
    assert_eq!(deliver(&l, "evt_00000000000000000000000000000001", "m1", "hello again").await, 200);
    assert_eq!(deliver(&l, "evt_00000000000000000000000000000002", "m2", "and again").await, 202);
    // What the phone sees next is the reply to m2 and nothing else.
    let (mut started, mut text) = (Vec::new(), String::new());
    loop {
        match phone.recv().await.unwrap().message {
            ServerMessage::StreamStarted(s) => started.push(s.stream_id),
            ServerMessage::StreamChunk(c) => text.push_str(&c.delta),
            ServerMessage::StreamCompleted(_) => break,
            _ => {}
        }
    }
    assert_eq!((started.len(), text.as_str()), (1, "echo: and again"), "{started:?}");
}

fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
