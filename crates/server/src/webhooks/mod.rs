//! Webhooks (SERVER_API.md section 5): telling the application backend what users did.
//!
//! A transactional outbox. Handlers never call HTTP: they build the event here ([`message_created`],
//! [`chat_deleted`]) and hand it to the store inside the write that causes it (`WriteOp::Message` /
//! `WriteOp::DeleteChat` carry it), so the event exists if and only if the write committed.
//! [`stream_cancel_requested`] records an event that no chat write causes, in a transaction of its own.
//! The [`dispatcher`] (a task started by `run` when a URL is configured) delivers them, signed, in order
//! per user, with retries and backoff kept in the rows, so a restart resumes them.
//!
//! Bodies are sealed (AES-256-GCM) under the user's data key, bound to the user and the event id
//! ([`Aad::webhook`]): never plaintext at rest. (The user key rather than a key derived from the master
//! key, so that `keys rotate`, which re-wraps data keys, keeps pending events readable.) `seq` is not in
//! the sealed body: only the write knows it, and the store keeps it in a column beside the body.
//! Without a webhook URL nothing is recorded.

pub mod dispatcher;

use crate::crypto::Aad;
use crate::error::Error;
use crate::handlers::Ctx;
use crate::store::events::{EventStore, NewEvent};
use crate::store::now_millis;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// `message.created`: a user's device added a message.
pub const MESSAGE_CREATED: &str = "message.created";
/// `chat.deleted`: a device deleted a chat.
pub const CHAT_DELETED: &str = "chat.deleted";
/// `stream.cancel_requested`: a device sent `cancel_stream`.
pub const STREAM_CANCEL_REQUESTED: &str = "stream.cancel_requested";

/// The webhook state of a node with a webhook URL: the outbox and the dispatcher's wake-up call.
pub struct Webhooks {
    /// The outbox.
    pub events: Arc<dyn EventStore>,
    /// This node's lease owner id (the dispatcher's).
    pub node: String,
    wake: tokio::sync::Notify,
}

impl Webhooks {
    /// Webhook state over `events`, for lease owner `node`.
    pub fn new(events: Arc<dyn EventStore>, node: String) -> Webhooks {
        Webhooks { events, node, wake: tokio::sync::Notify::new() }
    }

    /// Tells the dispatcher that an event was recorded (it also polls, for other nodes' events).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// One event as the backend receives it (`{"id","type","created_at","user_id","chat_id", …}`), and as
/// it is sealed at rest (then without `seq`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique, stable across retries.
    pub id: String,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339.
    pub created_at: String,
    /// The user.
    pub user_id: String,
    /// The chat.
    pub chat_id: String,
    /// `message.created`: the message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// `message.created`: the message's position in the chat (filled in from the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// `message.created`: the content, as the device sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// `message.created`: the client's timestamp as sent (`null` when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_timestamp: Option<Value>,
    /// `stream.cancel_requested`: the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
}

impl Event {
    fn new(kind: &str, user_id: &str, chat_id: &str, now: i64) -> Event {
        Event {
            id: format!("evt_{}", uuid::Uuid::new_v4().simple()),
            kind: kind.to_owned(),
            created_at: rfc3339(now),
            user_id: user_id.to_owned(),
            chat_id: chat_id.to_owned(),
            message_id: None,
            seq: None,
            content: None,
            client_timestamp: None,
            stream_id: None,
        }
    }

    /// The JSON body sent to the backend, with `seq` from the store.
    pub fn body(mut self, seq: Option<u64>) -> zeroize::Zeroizing<Vec<u8>> {
        if self.kind == MESSAGE_CREATED {
            self.seq = seq;
            self.client_timestamp.get_or_insert(Value::Null);
        }
        zeroize::Zeroizing::new(serde_json::to_vec(&self).expect("an event serializes"))
    }
}

/// RFC 3339 (UTC, milliseconds) of a store timestamp.
fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Seals `event` under its user's data key.
async fn seal(ctx: &Ctx, event: &Event, now: i64) -> Result<NewEvent, Error> {
    let key = ctx.keys.user_key(ctx.chats.as_ref(), &event.user_id).await?;
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(event).expect("an event serializes"));
    Ok(NewEvent {
        event_id: event.id.clone(),
        kind: event.kind.clone(),
        body: key.encrypt(&plain, &Aad::webhook(&event.user_id, &event.id)),
        created_at_ms: now,
    })
}

/// Opens a stored event body under its user's `key` (the caller adds `seq`); an error means the body
/// will never open (it does not decrypt or parse).
pub fn open(key: &crate::crypto::DataKey, user_id: &str, event_id: &str, sealed: &[u8]) -> Result<Event, Error> {
    let plain = key
        .decrypt(sealed, &Aad::webhook(user_id, event_id))
        .map_err(|e| Error::internal(format!("webhook event {event_id}: {e}")))?;
    serde_json::from_slice(&plain).map_err(|e| Error::internal(format!("webhook event {event_id}: {e}")))
}

/// The `message.created` event of a message a user's device adds, to put in its `WriteOp::Message`;
/// `None` without a webhook URL. Build it once per message: its id must not change if the write is
/// retried.
pub async fn message_created(
    ctx: &Ctx,
    user_id: &str,
    chat_id: &str,
    message_id: &str,
    content: &impl Serialize,
    client_timestamp: Option<&impl Serialize>,
) -> Result<Option<NewEvent>, Error> {
    if ctx.webhooks.is_none() {
        return Ok(None);
    }
    let now = now_millis();
    let mut event = Event::new(MESSAGE_CREATED, user_id, chat_id, now);
    event.message_id = Some(message_id.to_owned());
    event.content = Some(serde_json::to_value(content).map_err(|e| Error::internal(e.to_string()))?);
    event.client_timestamp = match client_timestamp {
        Some(ts) => Some(serde_json::to_value(ts).map_err(|e| Error::internal(e.to_string()))?),
        None => Some(Value::Null),
    };
    Ok(Some(seal(ctx, &event, now).await?))
}

/// The `chat.deleted` event of a chat a device deletes, to put in its `WriteOp::DeleteChat`; `None`
/// without a webhook URL.
pub async fn chat_deleted(ctx: &Ctx, user_id: &str, chat_id: &str) -> Result<Option<NewEvent>, Error> {
    if ctx.webhooks.is_none() {
        return Ok(None);
    }
    let now = now_millis();
    Ok(Some(seal(ctx, &Event::new(CHAT_DELETED, user_id, chat_id, now), now).await?))
}

/// Records `stream.cancel_requested` (a device sent `cancel_stream`) in a transaction of its own and
/// wakes the dispatcher; does nothing without a webhook URL. Call it once the cancellation is accepted.
pub async fn stream_cancel_requested(ctx: &Ctx, user_id: &str, chat_id: &str, stream_id: &str) -> Result<(), Error> {
    let Some(hooks) = &ctx.webhooks else { return Ok(()) };
    let now = now_millis();
    let mut event = Event::new(STREAM_CANCEL_REQUESTED, user_id, chat_id, now);
    event.stream_id = Some(stream_id.to_owned());
    let sealed = seal(ctx, &event, now).await?;
    hooks.events.record_event(user_id, &sealed).await?;
    hooks.wake();
    Ok(())
}

/// Wakes the dispatcher after a write that carried an event committed (a no-op without a webhook URL).
pub fn recorded(ctx: &Ctx) {
    if let Some(hooks) = &ctx.webhooks {
        hooks.wake();
    }
}
