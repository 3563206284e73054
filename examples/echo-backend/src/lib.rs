//! echo-backend: the smallest application backend for chatsync (SERVER_API.md), to read and to copy.
//!
//! It receives chatsync's webhooks (section 5), checks their signature, and answers every message a user's
//! device writes with a reply **streamed word by word** through the server API (section 4): every device
//! of the user sees the reply being written, a device that connects meanwhile gets the text so far, and
//! the completed reply is stored like any message. A device that presses "stop" (`cancel_stream`) makes
//! chatsync send `stream.cancel_requested`; the backend stops at once.
//!
//! What it shows, beyond the calls themselves:
//! - verify `X-Chatsync-Signature` over the raw body, in constant time, before parsing anything;
//! - answer the webhook quickly (202) and do the slow work (generating the reply) in the background:
//!   chatsync delivers a user's events one at a time and waits for each answer;
//! - be idempotent, since delivery is at least once: an event id seen before is acknowledged (200) and
//!   nothing else (replayed, the reply would stream again on every device, and come back after the user
//!   cancelled it); and the stream id and the reply's `message_id` are derived from the user's message,
//!   so that even a redelivery this process cannot recognise (it restarted meanwhile) stores no second
//!   reply;
//! - end a reply it cannot finish with `DELETE …/streams/{id}`: devices would otherwise show it frozen
//!   until chatsync's idle timeout;
//! - log event types and ids, never contents.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the backend reaches chatsync and checks what chatsync sends.
#[derive(Debug, Clone)]
pub struct Config {
    /// chatsync's base URL, e.g. `http://127.0.0.1:8080`.
    pub api_url: String,
    /// An API key (`chatsync api-keys create`).
    pub api_key: String,
    /// The webhook secret chatsync signs with (`--webhook-secret`).
    pub webhook_secret: String,
    /// The reply's sender.
    pub sender_name: String,
    /// Pause between two words of the reply (to make the streaming visible).
    pub word_delay: Duration,
}

/// The backend's state: its configuration, an HTTP client, and the streams it is writing.
pub struct Backend {
    config: Config,
    http: reqwest::Client,
    /// Streams being written (a redelivered event does not start a second writer).
    writing: Mutex<HashSet<String>>,
    /// Streams a device cancelled: their writer stops before its next chunk.
    cancelled: Mutex<HashSet<String>>,
    /// The ids of the latest events received, to acknowledge a redelivery without acting on it again.
    seen: Mutex<Seen>,
}

/// The most event ids remembered: a redelivery comes after a lost answer, within the sender's retry
/// schedule, so the latest ones are the ones that matter.
const SEEN_EVENTS: usize = 10_000;

/// Event ids received, the oldest forgotten first.
#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// Records `id`; `false` if it was already there.
    fn first_time(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > SEEN_EVENTS {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
        true
    }
}

/// The webhook route: `POST /webhook`.
pub fn router(config: Config) -> Router {
    let backend = Arc::new(Backend {
        config,
        http: reqwest::Client::new(),
        writing: Mutex::default(),
        cancelled: Mutex::default(),
        seen: Mutex::default(),
    });
    Router::new().route("/webhook", post(webhook)).with_state(backend)
}

/// Whether `header` is `sha256=<hex HMAC-SHA256(secret, body)>` (compared in constant time).
pub fn valid_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.strip_prefix("sha256=")) else { return false };
    let Ok(given) = hex::decode(hex_sig) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

async fn webhook(State(b): State<Arc<Backend>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers.get("x-chatsync-signature").and_then(|v| v.to_str().ok());
    if !valid_signature(b.config.webhook_secret.as_bytes(), &body, signature) {
        tracing::warn!("webhook refused: bad signature");
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST };
    let (kind, id) = (event["type"].as_str().unwrap_or(""), event["id"].as_str().unwrap_or(""));
    tracing::info!(kind, id, "webhook");
    if !id.is_empty() && !b.seen.lock().unwrap().first_time(id) {
        tracing::info!(kind, id, "redelivered: already handled");
        return StatusCode::OK;
    }
    match kind {
        "message.created" => {
            let b = b.clone();
            tokio::spawn(async move { b.reply(&event).await });
            StatusCode::ACCEPTED
        }
        "stream.cancel_requested" => {
            // Only a stream being written has a writer to stop (and to forget the mark when it ends).
            let writing = b.writing.lock().unwrap();
            if let Some(stream_id) = event["stream_id"].as_str().filter(|id| writing.contains(*id)) {
                b.cancelled.lock().unwrap().insert(stream_id.to_owned());
            }
            StatusCode::NO_CONTENT
        }
        _ => StatusCode::NO_CONTENT,
    }
}

/// The text of a message's content: a string, a document's text nodes, or its JSON.
pub fn text_of(content: &Value) -> String {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(t)) = o.get("text") {
                    out.push(t.clone());
                }
                o.values().filter(|c| c.is_array() || c.is_object()).for_each(|c| collect(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| collect(c, out)),
            _ => {}
        }
    }
    match content {
        Value::String(s) => s.clone(),
        other => {
            let mut parts = Vec::new();
            collect(other, &mut parts);
            if parts.is_empty() {
                other.to_string()
            } else {
                parts.join(" ")
            }
        }
    }
}

impl Backend {
    /// Streams `echo: <text>` back into the chat of a `message.created` event.
    async fn reply(&self, event: &Value) {
        let (Some(user), Some(chat), Some(message_id)) =
            (event["user_id"].as_str(), event["chat_id"].as_str(), event["message_id"].as_str())
        else {
            return;
        };
        // Derived from the user's message: the same event always gives the same ids (idempotency).
        let digest = hex::encode(&Sha256::digest(format!("{chat}/{message_id}"))[..16]);
        let stream_id = format!("s-{digest}");
        if !self.writing.lock().unwrap().insert(stream_id.clone()) {
            return;
        }
        let mut started = false;
        let reply = format!("r-{digest}");
        let result = self.write_stream(user, chat, &stream_id, &reply, &text_of(&event["content"]), &mut started).await;
        if let Err(e) = result {
            tracing::warn!(stream_id, error = %e, "reply not completed");
            // A stream this call opened is ended for every device at once (they would otherwise show the
            // reply frozen until chatsync's idle timeout); one whose start failed may be another writer's
            // (a start refused as already open) and is left alone. A 409 means it is not open anyway.
            if started {
                let url = format!("{}/{stream_id}", self.streams_url(user, chat));
                match self.http.delete(&url).bearer_auth(&self.config.api_key).send().await {
                    Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT => {}
                    Ok(r) => {
                        tracing::warn!(stream_id, status = %r.status(), "reply not aborted; chatsync's idle timeout ends it")
                    }
                    Err(e) => {
                        tracing::warn!(stream_id, error = %e, "reply not aborted; chatsync's idle timeout ends it")
                    }
                }
            }
        }
        // With a cancel that came after the last look at it (under `writing`'s lock, as the mark is made).
        let mut writing = self.writing.lock().unwrap();
        writing.remove(&stream_id);
        self.cancelled.lock().unwrap().remove(&stream_id);
    }

    /// `…/users/{user}/chats/{chat}/streams` on chatsync's API.
    fn streams_url(&self, user: &str, chat: &str) -> String {
        format!("{}/v1/api/users/{user}/chats/{chat}/streams", self.config.api_url.trim_end_matches('/'))
    }

    async fn write_stream(
        &self,
        user: &str,
        chat: &str,
        stream_id: &str,
        reply_id: &str,
        text: &str,
        started: &mut bool,
    ) -> anyhow::Result<()> {
        let base = self.streams_url(user, chat);
        let start = json!({"stream_id": stream_id, "message_id": reply_id, "sender_name": self.config.sender_name});
        self.call(&base, start).await?;
        *started = true;
        let words: Vec<String> = format!("echo: {text}").split_whitespace().map(str::to_owned).collect();
        for (i, word) in words.iter().enumerate() {
            tokio::time::sleep(self.config.word_delay).await;
            if self.cancelled.lock().unwrap().remove(stream_id) {
                tracing::info!(stream_id, "cancelled by the user");
                return Ok(());
            }
            let delta = if i == 0 { word.clone() } else { format!(" {word}") };
            match self.call(&format!("{base}/{stream_id}/chunks"), json!({"seq": i + 1, "delta": delta})).await {
                // 409: the stream is no longer open (cancelled from a device, or timed out): stop.
                Err(e) if e.to_string().contains("409") => return Ok(()),
                other => other?,
            };
        }
        self.call(&format!("{base}/{stream_id}/complete"), json!({})).await?;
        tracing::info!(stream_id, words = words.len(), "reply completed");
        Ok(())
    }

    /// POSTs `body` to `url` with the API key; any non-2xx status is an error naming it.
    async fn call(&self, url: &str, body: Value) -> anyhow::Result<()> {
        let response = self.http.post(url).bearer_auth(&self.config.api_key).json(&body).send().await?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            anyhow::bail!("{status}: {text}");
        }
        Ok(())
    }
}
