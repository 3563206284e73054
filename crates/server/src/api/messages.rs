//! Messages from other senders (SERVER_API.md section 3): `POST /v1/api/users/{user_id}/chats/{chat_id}/messages`
//! puts a message of the application backend (the assistant, a bot, an agent) into a user's chat.
//!
//! [`store_message`] is the one path by which a backend's message is stored (also a completed stream):
//! encrypted under the chat's key and durable before it returns, idempotent by `message_id`, counted as
//! unread, merged into the cache, and broadcast as `chat_message_added` to ALL of the user's connections
//! on every node (nothing is broadcast for a duplicate).

use super::Path;
use super::{path_chat_id, path_user_id, valid_user_id, ApiError, ApiResult, ApiState, Body};
use crate::handlers::common::{rfc3339, seal_content, secs, write_chat, USER_SENDER};
use crate::handlers::Ctx;
use crate::hub::Audience;
use crate::store::chats::{ChatRecord, MessageRecord, WriteOp, WriteResult};
use crate::store::now_millis;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use chatsync_protocol::api::{MessagePosted, PostMessage};
use chatsync_protocol::{encode, Limits, MessageAddedEvent, MessageContent, MessageId, MessageOut, MessagesVersion};
use chatsync_protocol::{ChatId, ServerMessage};

/// The routes of this resource.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/users/{user_id}/chats/{chat_id}/messages", post(create))
}

/// A backend's message, validated.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Idempotency key, unique per chat.
    pub message_id: MessageId,
    /// Not `"user"`.
    pub sender_name: String,
    /// The content.
    pub content: MessageContent,
    /// The message's time.
    pub created_at_ms: i64,
}

/// What [`store_message`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its position (the original's for a duplicate).
    pub seq: u64,
    /// The chat's message count after the write.
    pub messages_v: u64,
    /// The id was already stored: nothing changed, nothing was broadcast.
    pub duplicate: bool,
}

async fn create(
    State(s): State<ApiState>,
    Path((user_id, chat_id)): Path<(String, String)>,
    Body(body): Body<PostMessage>,
) -> ApiResult<(StatusCode, Json<MessagePosted>)> {
    let user_id = path_user_id(&user_id)?;
    let chat_id = path_chat_id(&chat_id)?;
    let message = NewMessage {
        message_id: message_id(&body.message_id)?,
        sender_name: sender_name(&body.sender_name)?,
        content: content(body.content)?,
        created_at_ms: match &body.created_at {
            None => now_millis(),
            Some(text) => parse_time(text)?,
        },
    };
    let stored = store_message(&s.ctx, &user_id, &chat_id, message).await?;
    let status = if stored.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    Ok((
        status,
        Json(MessagePosted {
            chat_id: chat_id.to_string(),
            message_id: body.message_id,
            seq: stored.seq,
            messages_v: stored.messages_v,
            duplicate: stored.duplicate,
        }),
    ))
}

/// Stores a backend's message in `user_id`'s chat (creating the chat when its id is new) and broadcasts
/// it to ALL of the user's connections. `not_found` when the user does not exist, or the chat is another
/// user's or was deleted.
pub async fn store_message(ctx: &Ctx, user_id: &str, chat_id: &ChatId, m: NewMessage) -> ApiResult<StoredMessage> {
    match write_message(ctx, user_id, chat_id, &m).await? {
        Written::New { chat, message } => {
            announce(ctx, user_id, chat_id, &chat, &message, m).await;
            Ok(StoredMessage { seq: message.seq, messages_v: chat.messages_v, duplicate: false })
        }
        Written::Duplicate { chat, original } => {
            Ok(StoredMessage { seq: original.seq, messages_v: chat.messages_v, duplicate: true })
        }
    }
}

/// What [`write_message`] found.
pub enum Written {
    /// The message was stored by this write (not announced yet).
    New {
        /// The chat after the write.
        chat: ChatRecord,
        /// The message as stored.
        message: MessageRecord,
    },
    /// The chat already holds a message with this id (nothing changed).
    Duplicate {
        /// The chat as it is.
        chat: ChatRecord,
        /// The stored message (sealed): the caller may open it to see whether it is its own (a retried
        /// `complete` whose first write committed but lost its answer).
        original: MessageRecord,
    },
}

/// Stores a backend's message, announcing nothing ([`store_message`] is the whole path; a completed
/// stream uses the two steps to tell its own earlier write from another message under its id).
pub async fn write_message(ctx: &Ctx, user_id: &str, chat_id: &ChatId, m: &NewMessage) -> ApiResult<Written> {
    if ctx.store.user(user_id).await?.is_none() {
        return Err(ApiError::not_found("No user has this id."));
    }
    let now = now_millis();
    let result = write_chat(ctx, user_id, chat_id.as_str(), |target, key| WriteOp::Message {
        owner: user_id.to_owned(),
        chat_id: chat_id.to_string(),
        message_id: m.message_id.to_string(),
        content: seal_content(key, chat_id.as_str(), m.message_id.as_str(), &m.content),
        client_timestamp: None,
        sender: m.sender_name.clone(),
        created_at: m.created_at_ms,
        target,
        now,
        // The backend's own messages are not told back to it (SERVER_API.md section 5).
        event: None,
    })
    .await
    .map_err(|e| match e.code() {
        chatsync_protocol::ErrorCode::NotFound => {
            ApiError::not_found("The chat belongs to another user or was deleted.")
        }
        _ => ApiError::from(e),
    })?;
    match result {
        WriteResult::Message { chat, message, duplicate: false } => Ok(Written::New { chat, message }),
        WriteResult::Message { chat, message, duplicate: true } => Ok(Written::Duplicate { chat, original: message }),
        other => Err(ApiError::internal(format!("unexpected message result {other:?}"))),
    }
}

/// Merges a stored message into the cache and broadcasts it as `chat_message_added` to ALL of the user's
/// connections (in the cluster's order for the user): `stored` as the store returned it, `m` what it holds
/// in the clear (its id, sender and content).
async fn announce(
    ctx: &Ctx,
    user_id: &str,
    chat_id: &ChatId,
    chat: &ChatRecord,
    stored: &MessageRecord,
    m: NewMessage,
) {
    ctx.cache.message_added(user_id, chat_id.as_str(), stored).await;
    // Deleted since it committed: the devices had `chat_deleted`, and this would show them the chat again.
    if ctx.keys.is_deleted(chat_id.as_str()) {
        return;
    }
    let event = MessageAddedEvent {
        chat_id: chat_id.clone(),
        message: MessageOut {
            message_id: m.message_id,
            seq: stored.seq,
            sender_name: m.sender_name,
            content: m.content,
            created_at: rfc3339(stored.created_at_ms),
            client_timestamp: None,
        },
        versions: MessagesVersion { messages_v: chat.messages_v },
        last_edited_overall_timestamp: secs(chat.last_edited_ms),
    };
    let frame = encode(&ServerMessage::ChatMessageAdded(event), None);
    ctx.hub.deliver_in_order(user_id, Audience::All, frame.into()).await;
}

/// A `message_id` from a body (PROTOCOL.md id rules).
pub fn message_id(id: &str) -> ApiResult<MessageId> {
    MessageId::new(id).map_err(|why| ApiError::invalid_payload("message_id", format!("Invalid message id: {why}.")))
}

/// A `sender_name`: an id (1-64 characters of `[A-Za-z0-9_.@-]`) other than `"user"`.
pub fn sender_name(name: &str) -> ApiResult<String> {
    if name == USER_SENDER {
        return Err(ApiError::invalid_payload(
            "sender_name",
            "sender_name \"user\" is reserved for the user's own devices.",
        ));
    }
    if !valid_user_id(name) {
        return Err(ApiError::invalid_payload(
            "sender_name",
            "Invalid sender_name: use 1-64 characters of [A-Za-z0-9_.@-].",
        ));
    }
    Ok(name.to_owned())
}

/// Message content: a JSON object or a string, at most [`Limits::MAX_MESSAGE_CONTENT_BYTES`] of JSON and
/// [`Limits::MAX_MESSAGE_CONTENT_DEPTH`] levels of nesting.
pub fn content(value: serde_json::Value) -> ApiResult<MessageContent> {
    let size = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(usize::MAX);
    let content = match value {
        serde_json::Value::String(s) => MessageContent::Text(s),
        serde_json::Value::Object(o) => MessageContent::Json(o),
        _ => return Err(ApiError::invalid_payload("content", "content must be a JSON object or a string.")),
    };
    if size > Limits::MAX_MESSAGE_CONTENT_BYTES {
        return Err(ApiError::limit_exceeded(
            "content",
            format!("The content is larger than {} bytes of JSON.", Limits::MAX_MESSAGE_CONTENT_BYTES),
        ));
    }
    if content.depth() > Limits::MAX_MESSAGE_CONTENT_DEPTH {
        return Err(ApiError::limit_exceeded(
            "content",
            format!("The content nests objects and arrays deeper than {} levels.", Limits::MAX_MESSAGE_CONTENT_DEPTH),
        ));
    }
    Ok(content)
}

/// An RFC 3339 `created_at`, in milliseconds since the epoch, between 1970 and the end of 9999 in UTC
/// (an offset can take a year-9999 time past it, and the wire has four-digit years).
fn parse_time(text: &str) -> ApiResult<i64> {
    let bad = || {
        ApiError::invalid_payload(
            "created_at",
            "created_at must be an RFC 3339 date-time between 1970 and 9999-12-31T23:59:59.999Z.",
        )
    };
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(|_| bad())?;
    // Floor, not truncation toward zero: 1969-12-31T23:59:59.9995Z is -0.5 ms, the last millisecond of
    // 1969 (-1, refused), which `/` made 0 (1970-01-01T00:00:00.000Z, taken as a time the backend never sent).
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    let ms = i64::try_from(ms).map_err(|_| bad())?;
    if !(0..=crate::store::LATEST_MILLIS).contains(&ms) {
        return Err(bad());
    }
    Ok(ms)
}
