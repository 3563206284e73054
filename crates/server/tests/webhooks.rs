//! Webhooks end to end (SERVER_API.md section 5): a real HTTP receiver (axum, port 0) inside the test,
//! the real server, real devices. Events from device writes (`message.created`, `chat.deleted`) and
//! the standalone `stream.cancel_requested`; the body shape, headers and HMAC signature; retries of a
//! failed delivery with the same id; a redirect not followed (a failed attempt); order per user; giving
//! up after `webhook_max_age_secs`; delivery after a SIGKILL of the real binary; a delivery in flight at
//! a graceful stop that ends, and is recorded, instead of going again after the restart; no body
//! plaintext at rest; nothing recorded without a URL.
//! A receiver whose 2xx body never ends. On PostgreSQL (when `CHATSYNC_TEST_POSTGRES_URL` is set): two
//! nodes sharing one database deliver each user's events once and in order, also while nodes stop and
//! start (never two requests of a user open at once), and no body plaintext is in the outbox table. The store-level rules
//! (claims, leases, order, both backends) are in `chat_store_contract.rs`.

mod backends;
mod common;
#[macro_use]
mod sync_util;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chatsync_client::{Client, ConnectOptions};
use common::TestServer;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use sync_util::*;

const SECRET: &str = "test-webhook-secret";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    event: String,
    delivery: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
    /// The status the receiver answered.
    status: u16,
    /// When the receiver got it (the wall clock, which the server's `created_at` also reads).
    at: std::time::SystemTime,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct ReceiverState {
    got: parking_lot::Mutex<Vec<Delivery>>,
    attempts: parking_lot::Mutex<HashMap<String, u32>>,
    /// Each event id's first this-many attempts are answered 500.
    fail_attempts: AtomicU32,
    /// The next request is held (once counted in `attempts`): its event id is sent on the first
    /// channel, and it is answered only once the second one fires (or is dropped).
    hold: parking_lot::Mutex<Option<(tokio::sync::oneshot::Sender<String>, tokio::sync::oneshot::Receiver<()>)>>,
}

/// A webhook receiver on port 0.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

async fn hook(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let delivery = header("x-chatsync-delivery");
    let attempt = {
        let mut attempts = state.attempts.lock();
        let n = attempts.entry(delivery.clone()).or_default();
        *n += 1;
        *n
    };
    let hold = state.hold.lock().take();
    if let Some((reached, answer)) = hold {
        let _ = reached.send(delivery.clone());
        let _ = answer.await;
    }
    let status = if attempt <= state.fail_attempts.load(Ordering::SeqCst) { 500 } else { 200 };
    state.got.lock().push(Delivery {
        event: header("x-chatsync-event"),
        delivery,
        signature: header("x-chatsync-signature"),
        content_type: header("content-type"),
        body: body.to_vec(),
        status,
        at: std::time::SystemTime::now(),
    });
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start(fail_attempts: u32) -> Receiver {
        let state = Arc::new(ReceiverState { fail_attempts: AtomicU32::new(fail_attempts), ..Default::default() });
        let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, state, task }
    }

    /// Holds the next request: returns a channel that gets its event id once it arrived, and the one that
    /// lets the receiver answer it (by its usual rule).
    fn hold_next(&self) -> (tokio::sync::oneshot::Receiver<String>, tokio::sync::oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        *self.state.hold.lock() = Some((reached_tx, answer_rx));
        (reached_rx, answer_tx)
    }

    /// How many requests carried the event `id` (counted as they arrive, before any answer).
    fn requests_for(&self, id: &str) -> u32 {
        self.state.attempts.lock().get(id).copied().unwrap_or(0)
    }

    fn got(&self) -> Vec<Delivery> {
        self.state.got.lock().clone()
    }

    /// Waits until `done` holds for what was received (bounded, so a bug fails instead of hanging).
    async fn wait_until(&self, what: &str, done: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        for _ in 0..2000 {
            let got = self.got();
            if done(&got) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}; received {:#?}", self.got());
    }

    /// Waits until the event with this `id` was answered 200.
    async fn delivered(&self, what: &str, id: &str) -> Vec<Delivery> {
        self.wait_until(what, |got| got.iter().any(|d| d.delivery == id && d.status == 200)).await
    }

    /// The 2xx-answered deliveries, in arrival order.
    fn successes(&self) -> Vec<Value> {
        self.got().iter().filter(|d| d.status == 200).map(Delivery::json).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn configure(c: &mut chatsync::Config, receiver: &Receiver) {
    c.webhook_url = Some(receiver.url.clone());
    c.webhook_secret = Some(SECRET.to_owned().into());
    c.webhook_backoff_base_ms = 20;
}

async fn server_for(receiver: &Receiver) -> TestServer {
    TestServer::start_with(|c| configure(c, receiver)).await
}

fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Waits until the outbox is empty (a delivered event leaves it just after its 2xx; a dropped one after
/// its failure); bounded.
async fn drained(server: &TestServer) {
    // Up to 30 s: a test stalled on a loaded machine lets the backoff grow before the last attempt.
    for _ in 0..3000 {
        if server.ctx.events.pending_events().await.unwrap() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the outbox still holds {} events", server.ctx.events.pending_events().await.unwrap());
}

fn message_ids(events: &[Value], user: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["user_id"] == user && e["type"] == "message.created")
        .map(|e| e["message_id"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------- message.created

#[tokio::test]
async fn a_message_from_a_device_is_delivered_signed_with_every_field() {
    let receiver = Receiver::start(0).await;
    let server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let reply = alice
        .request(&message_full(
            "c1",
            json!({ "message_id": "m1", "content": { "text": "hi" }, "timestamp": 1700000000.5 }),
        ))
        .await
        .unwrap();
    let confirmed = expect_msg!(reply, ChatMessageConfirmed);
    assert_eq!(confirmed.new_messages_v, 1);

    let got = receiver.wait_until("message.created", |got| !got.is_empty()).await;
    let d = &got[0];
    let event = d.json();
    assert_eq!(d.event, "message.created");
    assert_eq!(d.content_type, "application/json");
    assert_eq!(d.signature, expected_signature(&d.body), "X-Chatsync-Signature is HMAC-SHA256(secret, raw body)");
    assert_eq!(event["id"].as_str().unwrap(), d.delivery, "X-Chatsync-Delivery is the event id");
    assert_eq!(event["type"], "message.created");
    assert_eq!(event["user_id"], "alice");
    assert_eq!(event["chat_id"], "c1");
    assert_eq!(event["message_id"], "m1");
    assert_eq!(event["seq"], 1);
    assert_eq!(event["content"], json!({ "text": "hi" }));
    assert_eq!(event["client_timestamp"], json!(1700000000.5));
    let created_at = event["created_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created_at).is_ok(), "created_at is RFC 3339: {created_at}");
    let keys: Vec<&str> = event.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 9, "no other fields: {keys:?}");

    // A second message: seq 2, a string content, no client timestamp (null); a duplicate records
    // nothing (the next event after it is m3's).
    add_message(&mut alice, "c1", "m2", json!("plain")).await;
    let dup = alice.request(&message("c1", "m1", json!("again"))).await.unwrap();
    assert!(expect_msg!(dup, ChatMessageConfirmed).duplicate);
    add_message(&mut alice, "c1", "m3", json!("third")).await;
    let got = receiver.wait_until("three events", |got| got.len() >= 3).await;
    let events: Vec<Value> = got.iter().map(Delivery::json).collect();
    assert_eq!(message_ids(&events, "alice"), ["m1", "m2", "m3"]);
    assert_eq!(events[1]["seq"], 2);
    assert_eq!(events[1]["content"], "plain");
    assert_eq!(events[1]["client_timestamp"], Value::Null);
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 3, "event ids are unique");
    drained(&server).await;
}

#[tokio::test]
async fn a_failed_delivery_is_retried_with_the_same_id_and_body_until_2xx() {
    let receiver = Receiver::start(2).await;
    let server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("retry me")).await;

    let got = receiver.wait_until("a delivery after two failures", |got| got.iter().any(|d| d.status == 200)).await;
    assert_eq!(got.iter().map(|d| d.status).collect::<Vec<_>>(), [500, 500, 200]);
    assert!(got.iter().all(|d| d.delivery == got[0].delivery && d.body == got[0].body), "same id and body");
    assert!(got.iter().all(|d| d.signature == expected_signature(&d.body)));
    drained(&server).await;

    let metrics_url = server.url.replace("ws://", "http://").replace("/v1/ws", "/metrics");
    let metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
    for outcome in ["failed", "delivered"] {
        let series = format!("chatsync_webhook_deliveries_total{{outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&series), "{series} missing: {metrics}");
    }
}

/// A receiver that answers a redirect is not followed (a redirect could send signed bodies to another
/// host): the 3xx is a failed attempt, retried later with the same id, and the redirect's target never
/// gets a request.
#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failed_attempt() {
    let elsewhere = Receiver::start(0).await;
    // Answers 307, then 308 (both keep the method and the body), then 200, each pointing at `elsewhere`.
    let answered: Arc<parking_lot::Mutex<Vec<(String, u16)>>> = Arc::default();
    let (seen, location) = (answered.clone(), elsewhere.url.clone());
    let redirecting = axum::routing::post(move |headers: HeaderMap| {
        let (seen, location) = (seen.clone(), location.clone());
        async move {
            let id = headers.get("x-chatsync-delivery").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let mut seen = seen.lock();
            let status = [307, 308].get(seen.len()).copied().unwrap_or(200);
            seen.push((id, status));
            (StatusCode::from_u16(status).unwrap(), [(axum::http::header::LOCATION, location)])
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().route("/hook", redirecting)).await.unwrap();
    });
    let server = TestServer::start_with(|c| {
        c.webhook_url = Some(url);
        c.webhook_secret = Some(SECRET.to_owned().into());
        c.webhook_backoff_base_ms = 20;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("signed, for this host only")).await;
    drained(&server).await;

    let answered = answered.lock().clone();
    let statuses: Vec<u16> = answered.iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [307, 308, 200], "each redirect was a failed attempt, retried");
    assert!(answered.iter().all(|(id, _)| *id == answered[0].0), "the same event each time: {answered:?}");
    assert!(elsewhere.got().is_empty(), "the redirect was followed: {:#?}", elsewhere.got());
    task.abort();
}

#[tokio::test]
async fn a_users_events_are_delivered_in_order_each_waiting_for_the_previous_2xx() {
    // Every event's first attempt fails: a user's next event must still wait for the retry.
    let receiver = Receiver::start(1).await;
    let server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    for i in 1..=5 {
        add_message(&mut alice, "a-chat", &format!("m{i}"), json!(format!("alice {i}"))).await;
        add_message(&mut bob, "b-chat", &format!("m{i}"), json!(format!("bob {i}"))).await;
    }
    let want: Vec<String> = (1..=5).map(|i| format!("m{i}")).collect();
    let got = receiver.wait_until("ten deliveries", |got| got.iter().filter(|d| d.status == 200).count() >= 10).await;
    for user in ["alice", "bob"] {
        // Arrival order of every attempt of this user's events: each event fails once, then succeeds,
        // and the next one never arrives before the previous one's success.
        let attempts: Vec<(String, u16)> = got
            .iter()
            .filter(|d| d.json()["user_id"] == user)
            .map(|d| (d.json()["message_id"].as_str().unwrap().to_owned(), d.status))
            .collect();
        let expected: Vec<(String, u16)> = want.iter().flat_map(|m| [(m.clone(), 500), (m.clone(), 200)]).collect();
        assert_eq!(attempts, expected, "{user}");
        let seqs: Vec<u64> = got
            .iter()
            .filter(|d| d.status == 200 && d.json()["user_id"] == user)
            .map(|d| d.json()["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    }
}

// ---------------------------------------------------------------- chat.deleted

#[tokio::test]
async fn chat_deleted_is_delivered_after_the_chats_messages_and_not_for_a_refused_delete() {
    let receiver = Receiver::start(0).await;
    let server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    add_message(&mut alice, "c1", "m1", json!("x")).await;
    // Bob cannot delete Alice's chat: not_found, and no event.
    let refused = request_raw(&mut bob, "delete_chat", json!({ "chat_id": "c1" })).await;
    assert_not_found(&refused);
    let deleted = alice.request(&delete_chat("c1")).await.unwrap();
    expect_msg!(deleted, ChatDeleted);
    // Deleting it again: not_found, no event. Then a marker message from each user: a user's events are
    // delivered in order, so once the markers arrived, any event of the refused deletes would have too.
    assert_not_found(&request_raw(&mut alice, "delete_chat", json!({ "chat_id": "c1" })).await);
    add_message(&mut alice, "c2", "marker", json!("y")).await;
    add_message(&mut bob, "b1", "marker", json!("y")).await;

    let got = receiver
        .wait_until("both markers", |got| {
            let events: Vec<Value> = got.iter().map(Delivery::json).collect();
            ["alice", "bob"].iter().all(|u| message_ids(&events, u).contains(&"marker".to_owned()))
        })
        .await;
    let events: Vec<Value> = got.iter().map(Delivery::json).collect();
    let of = |user: &str| -> Vec<String> {
        events.iter().filter(|e| e["user_id"] == user).map(|e| e["type"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(of("alice"), ["message.created", "chat.deleted", "message.created"]);
    assert_eq!(of("bob"), ["message.created"]);
    let deleted = events.iter().find(|e| e["type"] == "chat.deleted").unwrap();
    assert_eq!(deleted["chat_id"], "c1");
    assert_eq!(got.iter().find(|d| d.event == "chat.deleted").unwrap().delivery, deleted["id"].as_str().unwrap());
    let keys: Vec<&str> = deleted.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 5, "id, type, created_at, user_id, chat_id only: {keys:?}");
}

// ---------------------------------------------------------------- stream.cancel_requested

#[tokio::test]
async fn stream_cancel_requested_is_recorded_on_its_own_and_delivered() {
    let receiver = Receiver::start(0).await;
    let server = server_for(&receiver).await;
    server.user("alice", false).await;
    chatsync::webhooks::stream_cancel_requested(&server.ctx, "alice", "c1", "s1").await.unwrap();
    let got = receiver.wait_until("stream.cancel_requested", |got| !got.is_empty()).await;
    let event = got[0].json();
    assert_eq!(got[0].event, "stream.cancel_requested");
    assert_eq!(got[0].signature, expected_signature(&got[0].body));
    assert_eq!((event["user_id"].as_str(), event["chat_id"].as_str()), (Some("alice"), Some("c1")));
    assert_eq!(event["stream_id"], "s1");
    assert_eq!(event.as_object().unwrap().len(), 6);
}

/// The outbox of a real store, whose `record_event` fails while `failing` is set (as when the store is
/// unreachable).
struct FlakyOutbox {
    inner: Arc<dyn chatsync::store::events::EventStore>,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl chatsync::store::events::EventStore for FlakyOutbox {
    async fn record_event(
        &self,
        user_id: &str,
        event: &chatsync::store::events::NewEvent,
    ) -> Result<(), chatsync::store::StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(chatsync::store::StoreError::Unavailable("the test's outbox is down".into()));
        }
        self.inner.record_event(user_id, event).await
    }
    async fn claim_events(
        &self,
        node: &str,
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<chatsync::store::events::PendingEvent>, chatsync::store::StoreError> {
        self.inner.claim_events(node, now, lease_ms, limit).await
    }
    async fn event_done(
        &self,
        event: &chatsync::store::events::PendingEvent,
    ) -> Result<bool, chatsync::store::StoreError> {
        self.inner.event_done(event).await
    }
    async fn event_failed(
        &self,
        event: &chatsync::store::events::PendingEvent,
        attempts: u32,
        next: i64,
    ) -> Result<bool, chatsync::store::StoreError> {
        self.inner.event_failed(event, attempts, next).await
    }
    async fn release_leases(&self, node: &str) -> Result<(), chatsync::store::StoreError> {
        self.inner.release_leases(node).await
    }
    async fn pending_events(&self) -> Result<u64, chatsync::store::StoreError> {
        self.inner.pending_events().await
    }
}

/// A device's cancel whose `stream.cancel_requested` cannot be recorded does not happen: the device gets
/// `unavailable`, the stream stays open (its chunks still reach every device), and the retried cancel,
/// once the outbox answers, ends it and reaches the backend.
#[tokio::test]
async fn a_cancel_whose_webhook_event_cannot_be_recorded_leaves_the_stream_open() {
    let receiver = Receiver::start(0).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = chatsync::Config { data_dir: data.path().to_owned(), ..chatsync::Config::default() };
    configure(&mut config, &receiver);
    let mut backend = chatsync::store::open_backend(&config.store_url(), config.durability).await.unwrap();
    let outbox = Arc::new(FlakyOutbox { inner: backend.events.clone(), failing: true.into() });
    backend.events = outbox.clone();
    let (master, _) = chatsync::crypto::MasterKey::load_or_create(&config.data_dir, None).unwrap();
    let server = TestServer::serve(chatsync::assemble(config, backend, master, None).unwrap(), data).await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let key = chatsync::streams::StreamKey {
        user_id: "alice".into(),
        chat_id: chatsync_protocol::ChatId::new("c1").unwrap(),
        stream_id: chatsync_protocol::StreamId::new("s1").unwrap(),
    };
    let info = chatsync::streams::StreamInfo {
        message_id: chatsync_protocol::MessageId::new("m1").unwrap(),
        sender_name: "assistant".into(),
        meta: Default::default(),
    };
    chatsync::streams::ops::start(&server.ctx, &key, &info).await.unwrap();
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.recv().await.unwrap().message.wire_type(), "stream_started");
    }
    let cancel = msg("cancel_stream", json!({"chat_id": "c1", "stream_id": "s1"}));
    let reply = laptop.request(&cancel).await.unwrap();
    assert_eq!(error_of(&reply).code, chatsync_protocol::ErrorCode::Unavailable, "{reply:?}");
    // Still open: a chunk is accepted and reaches both devices, and nothing was cancelled.
    let appended = chatsync::streams::ops::chunk(&server.ctx, &key, 1, "Hi").await.unwrap();
    assert_eq!(appended, chatsync::streams::Appended::Accepted);
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.recv().await.unwrap().message.wire_type(), "stream_chunk");
    }
    outbox.failing.store(false, Ordering::SeqCst);
    let reply = laptop.request(&cancel).await.unwrap();
    assert_eq!(reply.message.wire_type(), "stream_cancelled");
    assert_eq!(phone.recv().await.unwrap().message.wire_type(), "stream_cancelled");
    let got = receiver.wait_until("stream.cancel_requested", |got| !got.is_empty()).await;
    assert_eq!((got.len(), got[0].event.as_str()), (1, "stream.cancel_requested"));
}

// ---------------------------------------------------------------- give up, configuration

#[tokio::test]
async fn an_event_failing_past_the_max_age_is_dropped_and_the_users_next_event_goes() {
    let receiver = Receiver::start(u32::MAX).await;
    let server = TestServer::start_with(|c| {
        configure(c, &receiver);
        c.webhook_max_age_secs = 0;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("lost")).await;
    receiver.wait_until("one attempt", |got| !got.is_empty()).await;
    drained(&server).await;
    assert_eq!(receiver.got().len(), 1, "never retried");
    receiver.state.fail_attempts.store(0, Ordering::SeqCst);
    add_message(&mut alice, "c1", "m2", json!("kept")).await;
    receiver.wait_until("m2", |got| got.iter().any(|d| d.status == 200)).await;
    assert_eq!(message_ids(&receiver.successes(), "alice"), ["m2"]);
}

/// The retry schedule ends at the max age: a retry that the backoff would put later comes at the max age
/// instead (and its failure drops the event), so an event is neither retried nor kept past
/// `webhook_max_age_secs` because its last backoff was long.
#[tokio::test]
async fn the_last_retry_comes_at_the_max_age_not_a_backoff_past_it() {
    let receiver = Receiver::start(u32::MAX).await;
    let server = TestServer::start_with(|c| {
        configure(c, &receiver);
        // Long enough that the first attempt comes before it, even on a loaded machine.
        c.webhook_max_age_secs = 3;
        // The backoff alone would put the first retry an hour after the first failure.
        c.webhook_backoff_base_ms = 3_600_000;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("late")).await;
    let got = receiver.wait_until("a retry at the max age", |got| got.len() >= 2).await;
    drained(&server).await;
    let got_now = receiver.got();
    assert_eq!(got_now.len(), 2, "no attempt after the one at the max age: {got_now:#?}");
    assert!(got_now.iter().all(|d| d.delivery == got[0].delivery && d.status == 500));
    let created = humantime::parse_rfc3339(got[0].json()["created_at"].as_str().unwrap()).unwrap();
    assert!(got[0].at < created + Duration::from_secs(3), "the first attempt came too late for this test");
    assert!(got[1].at >= created + Duration::from_secs(3), "the retry came before the max age");
}

/// The `attempts` of the outbox's events, read beside the server (empty once none is pending).
fn attempts(server: &TestServer) -> Vec<i64> {
    let db = rusqlite::Connection::open(server.data.path().join("chatsync.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut query = db.prepare("SELECT attempts FROM webhook_events").unwrap();
    query.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// Runs `sql` on the server's database beside it, from a blocking thread: the server shares this test's
/// one-thread runtime, so a write waiting for SQLite's lock on that thread would stall the server's own
/// transaction that holds it (the dispatcher's, between two awaits) until the busy timeout.
async fn beside(server: &TestServer, sql: &'static str) {
    let path = server.data.path().join("chatsync.db");
    tokio::task::spawn_blocking(move || {
        let db = rusqlite::Connection::open(path).unwrap();
        db.busy_timeout(Duration::from_secs(30)).unwrap();
        db.execute_batch(sql).unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_event_whose_users_key_cannot_be_read_now_is_retried_not_dropped() {
    let receiver = Receiver::start(u32::MAX).await;
    let server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("kept")).await;
    receiver.wait_until("one attempt", |got| !got.is_empty()).await;
    // The store cannot read the user's key now (an error that is not `unavailable`), and the node no
    // longer holds it in memory.
    beside(&server, "ALTER TABLE user_keys RENAME TO user_keys_away").await;
    server.ctx.keys.forget_all();
    receiver.state.fail_attempts.store(0, Ordering::SeqCst);
    let before = attempts(&server);
    assert_eq!(before.len(), 1);
    for i in 0.. {
        let now = attempts(&server);
        assert_eq!(now.len(), 1, "the event is still pending (not dropped)");
        if now[0] >= before[0] + 2 {
            break;
        }
        assert!(i < 2000, "the event was never retried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(receiver.successes().is_empty(), "nothing delivered without the key");
    beside(&server, "ALTER TABLE user_keys_away RENAME TO user_keys").await;
    receiver.wait_until("m1", |got| got.iter().any(|d| d.status == 200)).await;
    assert_eq!(message_ids(&receiver.successes(), "alice"), ["m1"]);
}

/// A stored user key that does not open under the master key never will: the event is dropped at once,
/// not retried for `webhook_max_age_secs` while it holds up the user's later events.
#[tokio::test]
async fn an_event_whose_users_key_does_not_open_is_dropped() {
    let receiver = Receiver::start(u32::MAX).await;
    let server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("lost")).await;
    receiver.wait_until("one attempt", |got| !got.is_empty()).await;
    beside(&server, "UPDATE user_keys SET wrapped = randomblob(60)").await;
    server.ctx.keys.forget_all();
    receiver.state.fail_attempts.store(0, Ordering::SeqCst);
    drained(&server).await;
    assert!(receiver.successes().is_empty(), "nothing delivered without the key");
}

#[tokio::test]
async fn without_a_webhook_url_nothing_is_recorded() {
    let server = TestServer::start().await;
    assert!(server.ctx.webhooks.is_none());
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("x")).await;
    expect_msg!(alice.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    chatsync::webhooks::stream_cancel_requested(&server.ctx, "alice", "c2", "s1").await.unwrap();
    assert_eq!(server.ctx.events.pending_events().await.unwrap(), 0);
}

#[test]
fn a_webhook_url_needs_a_secret_and_an_http_scheme() {
    let with = |url: &str, secret: Option<&str>| chatsync::Config {
        webhook_url: Some(url.into()),
        webhook_secret: secret.map(|s| s.to_owned().into()),
        ..chatsync::Config::default()
    };
    assert!(with("http://127.0.0.1:9/hook", Some("s")).validate().is_ok());
    assert!(with("https://backend.example/hook", Some("s")).validate().is_ok());
    assert!(with("http://127.0.0.1:9/hook", None).validate().unwrap_err().contains("webhook_secret"));
    assert!(with("http://127.0.0.1:9/hook", Some("")).validate().is_err());
    assert!(with("ftp://127.0.0.1/hook", Some("s")).validate().is_err());
    assert!(with("not a url", Some("s")).validate().is_err());
}

// ---------------------------------------------------------------- at rest, restart

#[tokio::test]
async fn pending_event_bodies_are_not_stored_in_plaintext() {
    let receiver = Receiver::start(u32::MAX).await;
    let mut server = TestServer::start_with(|c| {
        configure(c, &receiver);
        c.webhook_backoff_base_ms = 60_000;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let (plain, object_plain) = ("WebhookPlainZq8Lm", "WebhookObjectPv5Kd");
    add_message(&mut alice, "chat-at-rest", "m1", json!(plain)).await;
    add_message(&mut alice, "chat-at-rest", "m2", json!({ "text": object_plain })).await;
    expect_msg!(alice.request(&delete_chat("chat-at-rest")).await.unwrap(), ChatDeleted);
    chatsync::webhooks::stream_cancel_requested(&server.ctx, "alice", "other-chat", "StreamIdPlainWc4").await.unwrap();
    receiver.wait_until("a first attempt", |got| !got.is_empty()).await;
    assert_eq!(server.ctx.events.pending_events().await.unwrap(), 4, "all four still pending");
    drop(alice);
    server.stop().await;

    let files = server.data_files();
    let contains = |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    // The scan sees the outbox: event types and user ids are stored in the clear.
    assert!(files.iter().any(|(_, b)| contains(b, "message.created")), "the scan finds the outbox");
    for (path, bytes) in &files {
        for secret in [plain, object_plain, "StreamIdPlainWc4", "chat-at-rest\",\"message_id"] {
            assert!(!contains(bytes, secret), "{} contains the plaintext {secret:?}", path.display());
        }
    }
}

/// `chatsync serve` (the real binary) with the webhook flags, killed with SIGKILL on drop.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, receiver_url: &str) -> (Serve, String) {
    let (child, url, lines) = common::process::spawn_serve(
        common::process::chatsync()
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--listen", "127.0.0.1:0", "--webhook-url", receiver_url])
            .args(["--webhook-backoff-base-ms", "50", "--log-level", "info"])
            .env("CHATSYNC_WEBHOOK_SECRET", SECRET)
            .env_remove("CHATSYNC_MASTER_KEY"),
    );
    common::process::drain(lines);
    (Serve(child), url)
}

fn cli(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("CHATSYNC_CONFIG")
        .env_remove("CHATSYNC_MASTER_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn an_undelivered_event_is_delivered_after_a_sigkill_and_restart() {
    let receiver = Receiver::start(u32::MAX).await;
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["users", "add", "alice"]);
    let token = cli(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"]);

    let (mut first, url) = serve(dir.path(), &receiver.url);
    let (mut alice, _) = Client::connect_authenticated(&url, &ConnectOptions::new(&token, "laptop")).await.unwrap();
    add_message(&mut alice, "c1", "m1", json!("survive the kill")).await;
    let got = receiver.wait_until("a failed attempt", |got| !got.is_empty()).await;
    let id = got[0].delivery.clone();
    drop(alice);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let attempts_before_kill = receiver.got().len();

    receiver.state.fail_attempts.store(0, Ordering::SeqCst);
    let (_second, _url) = serve(dir.path(), &receiver.url);
    let got = receiver.delivered("the event after the restart", &id).await;
    assert!(got.len() > attempts_before_kill);
    let success: Vec<&Delivery> = got.iter().filter(|d| d.status == 200).collect();
    assert_eq!(success.len(), 1, "delivered once after the restart");
    assert_eq!(success[0].body, got[0].body, "the same event, byte for byte");
    assert_eq!(success[0].signature, expected_signature(&success[0].body));
    let event = success[0].json();
    assert_eq!((event["message_id"].as_str(), event["seq"].as_u64()), (Some("m1"), Some(1)));
}

/// A graceful stop (SIGTERM) does not abandon a delivery in flight: the dispatcher starts nothing more,
/// waits for the request (the receiver answers 200 only after the dispatcher took the stop signal) and
/// records the 2xx before the store closes, so the backend, which processed the event, does not get it a
/// second time after the restart.
#[tokio::test]
async fn a_delivery_in_flight_at_a_graceful_stop_ends_and_is_not_sent_again_after_the_restart() {
    let receiver = Receiver::start(0).await;
    let (reached, answer) = receiver.hold_next();
    let mut server = server_for(&receiver).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("held across the stop")).await;
    let id = reached.await.expect("the receiver got m1's request");
    drop(alice);

    // The stop signal, while the receiver holds the request; once the dispatcher has taken it (and would
    // have cut its requests off), the receiver answers 200.
    let mut stopping = server.ctx.pauses.arm(chatsync::pause::WEBHOOKS_STOPPING);
    server.signal_stop();
    stopping.reached().await;
    stopping.release();
    let _ = answer.send(());
    let server = server.restart().await;
    assert_eq!(receiver.requests_for(&id), 1);
    assert_eq!(
        receiver.got().iter().map(|d| (d.delivery.as_str(), d.status)).collect::<Vec<_>>(),
        [(id.as_str(), 200)]
    );

    // After the restart: a user's events go in order, so once m2 is delivered, m1 would have gone first
    // had it still been pending.
    let mut alice = another_device(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m2", json!("after the restart")).await;
    receiver.wait_until("m2", |got| got.iter().any(|d| d.status == 200 && d.json()["message_id"] == "m2")).await;
    assert_eq!(message_ids(&receiver.successes(), "alice"), ["m1", "m2"]);
    assert_eq!(receiver.requests_for(&id), 1, "m1 was not delivered a second time");
    drained(&server).await;
}

// ---------------------------------------------------------------- PostgreSQL

/// A second node on the same PostgreSQL database (its own pool and writers, the same master key), serving
/// on its own port: its dispatcher competes with the first node's for the same outbox.
async fn second_node(first: &TestServer, url: &str) -> TestServer {
    let config = (*first.ctx.config).clone();
    let backend = chatsync::store::open_backend(url, chatsync::store::Durability::Full).await.unwrap();
    let (master, _) = chatsync::crypto::MasterKey::load_or_create(&config.data_dir, None).unwrap();
    let node = chatsync::assemble(config, backend, master, None).unwrap();
    TestServer::serve(node, tempfile::tempdir().unwrap()).await
}

#[tokio::test]
async fn two_nodes_on_postgres_deliver_each_users_events_in_order() {
    let Some(schema) = backends::PgSchema::create().await else { return };
    // Every event's first attempt fails, so each user's next event must wait for a retry, on either node.
    let receiver = Receiver::start(1).await;
    let url = schema.url.clone();
    let first = TestServer::start_with(|c| {
        configure(c, &receiver);
        c.database_url = Some(url);
    })
    .await;
    let second = second_node(&first, &schema.url).await;
    let users = ["alice", "bob", "carol"];
    let mut devices = Vec::new();
    for user in users {
        devices.push(new_user(&first, user, "laptop").await);
    }
    for i in 1..=4 {
        for (device, user) in devices.iter_mut().zip(users) {
            add_message(device, &format!("{user}-chat"), &format!("m{i}"), json!(format!("{user} {i}"))).await;
        }
    }
    let got =
        receiver.wait_until("twelve deliveries", |got| got.iter().filter(|d| d.status == 200).count() >= 12).await;
    for user in users {
        let attempts: Vec<(String, u16)> = got
            .iter()
            .filter(|d| d.json()["user_id"] == user)
            .map(|d| (d.json()["message_id"].as_str().unwrap().to_owned(), d.status))
            .collect();
        let expected: Vec<(String, u16)> =
            (1..=4).flat_map(|i| [(format!("m{i}"), 500), (format!("m{i}"), 200)]).collect();
        assert_eq!(attempts, expected, "{user}");
    }
    drained(&first).await;
    drop(second);
}

#[tokio::test]
async fn no_event_body_plaintext_is_stored_on_postgres() {
    let Some(schema) = backends::PgSchema::create().await else { return };
    let receiver = Receiver::start(u32::MAX).await;
    let url = schema.url.clone();
    let server = TestServer::start_with(|c| {
        configure(c, &receiver);
        c.webhook_backoff_base_ms = 60_000;
        c.database_url = Some(url);
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("PgWebhookPlainRt6Yu")).await;
    chatsync::webhooks::stream_cancel_requested(&server.ctx, "alice", "c1", "PgStreamPlainJn2").await.unwrap();
    receiver.wait_until("a first attempt", |got| !got.is_empty()).await;
    let mut conn = schema.connect().await;
    let row = sqlx::query("SELECT count(*), max(seq) FROM webhook_events").fetch_one(&mut conn).await.unwrap();
    use sqlx::Row as _;
    assert_eq!((row.get::<i64, _>(0), row.get::<Option<i64>, _>(1)), (2, Some(1)));
    for needle in ["PgWebhookPlainRt6Yu", "PgStreamPlainJn2"] {
        let found: i64 = sqlx::query(
            "SELECT count(*) FROM webhook_events WHERE position(convert_to($1, 'UTF8') IN body) > 0 \
             OR position($1 IN event_id || user_id || kind) > 0",
        )
        .bind(needle)
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
        assert_eq!(found, 0, "{needle} stored in the clear");
    }
}

/// What a strict receiver saw: requests of one user overlapping, and each user's 2xx-answered events.
#[derive(Default)]
struct StrictState {
    in_flight: parking_lot::Mutex<HashMap<String, u32>>,
    violations: parking_lot::Mutex<Vec<String>>,
    /// Per user, the events answered 2xx (message id, or the type), in order.
    done: parking_lot::Mutex<HashMap<String, Vec<String>>>,
    attempts: parking_lot::Mutex<HashMap<String, u32>>,
}

impl StrictState {
    fn delivered(&self) -> usize {
        self.done.lock().values().map(Vec::len).sum()
    }
}

/// A receiver that answers about a third of the attempts 500 (by event id and attempt number), holds each
/// request a moment, and notes a user's request arriving while another of the same user is in flight,
/// or an event answered 2xx twice.
async fn strict_hook(State(state): State<Arc<StrictState>>, body: axum::body::Bytes) -> StatusCode {
    let v: Value = serde_json::from_slice(&body).unwrap();
    let user = v["user_id"].as_str().unwrap().to_owned();
    let label = match v["type"].as_str().unwrap() {
        "message.created" => v["message_id"].as_str().unwrap().to_owned(),
        other => other.to_owned(),
    };
    let id = v["id"].as_str().unwrap().to_owned();
    {
        let mut in_flight = state.in_flight.lock();
        let n = in_flight.entry(user.clone()).or_default();
        *n += 1;
        if *n > 1 {
            state.violations.lock().push(format!("{user}: {label} while another request of the user is in flight"));
        }
    }
    let attempt = {
        let mut attempts = state.attempts.lock();
        let n = attempts.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    // Long enough for other nodes' claims to come while the request is open.
    tokio::time::sleep(Duration::from_millis(3)).await;
    *state.in_flight.lock().get_mut(&user).unwrap() -= 1;
    if (u32::from(id.as_bytes()[4]) + attempt) % 3 == 0 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let mut done = state.done.lock();
    let list = done.entry(user.clone()).or_default();
    if list.contains(&label) {
        state.violations.lock().push(format!("{user}: {label} answered 2xx twice"));
    }
    list.push(label);
    StatusCode::OK
}

/// Several nodes on one database, users writing through two devices, a third of the attempts failing,
/// and nodes stopping and starting while events go: each user's events are answered once each, in the
/// order written (`chat.deleted` last), and no two requests of a user are ever open at once.
#[tokio::test]
async fn nodes_stopping_and_starting_on_postgres_never_overlap_or_reorder_a_users_events() {
    let Some(schema) = backends::PgSchema::create().await else { return };
    let state = Arc::new(StrictState::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(strict_hook)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = schema.url.clone();
    let first = TestServer::start_with(move |c| {
        c.webhook_url = Some(hook_url);
        c.webhook_secret = Some(SECRET.to_owned().into());
        c.webhook_backoff_base_ms = 5;
        c.database_url = Some(url);
    })
    .await;
    let mut other = second_node(&first, &schema.url).await;
    let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    let mut writers = Vec::new();
    for user in &users {
        let mut laptop = new_user(&first, user, "laptop").await;
        let mut phone = another_device(&first, user, "phone").await;
        let (user, chat) = (user.clone(), format!("{user}-chat"));
        writers.push(tokio::spawn(async move {
            for k in 0..10 {
                let device = if k % 2 == 0 { &mut laptop } else { &mut phone };
                add_message(device, &chat, &format!("m{k:02}"), json!(format!("{user} {k}"))).await;
            }
            let reply = laptop.request(&delete_chat(&chat)).await.unwrap();
            expect_msg!(reply, ChatDeleted);
        }));
    }
    // The other node is replaced twice while the events go (each stop lets its requests end).
    for at in [30, 60] {
        for _ in 0..3000 {
            if state.delivered() >= at {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        other.stop().await;
        other = second_node(&first, &schema.url).await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    drained(&first).await;
    let violations = state.violations.lock().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    let done = state.done.lock().clone();
    for user in &users {
        let mut expected: Vec<String> = (0..10).map(|k| format!("m{k:02}")).collect();
        expected.push("chat.deleted".into());
        assert_eq!(done.get(user).cloned().unwrap_or_default(), expected, "{user}");
    }
    drop(other);
    receiver.abort();
}

// ---------------------------------------------------------------- hostile receivers

/// A receiver that answers 200 and then sends a body without end: the answer counts (the body is never
/// read), the request is dropped, and the user's next event goes.
#[tokio::test]
async fn a_2xx_whose_body_never_ends_counts_and_holds_nothing_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicU32::new(0));
    let counted = requests.clone();
    let receiver = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = socket.read(&mut buf).await;
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await;
                let chunk = format!("{:x}\r\n{}\r\n", 60_000, "x".repeat(60_000));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    let server = TestServer::start_with(move |c| {
        c.webhook_url = Some(hook_url);
        c.webhook_secret = Some(SECRET.to_owned().into());
        c.webhook_backoff_base_ms = 20;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("a")).await;
    add_message(&mut alice, "c1", "m2", json!("b")).await;
    drained(&server).await;
    assert_eq!(requests.load(Ordering::SeqCst), 2, "each event sent once");
    receiver.abort();
}
