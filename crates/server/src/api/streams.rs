//! Streams (SERVER_API.md section 4): a reply being generated, sent to all of the user's devices chunk by
//! chunk and stored as one message when it completes.
//!
//! * `POST /v1/api/users/{user_id}/chats/{chat_id}/streams` `{"stream_id","message_id","sender_name","meta"?}`
//!   → 201 `{"stream_id"}` (200 for a retried start of the same stream; 409 when the id is open with
//!   another message id or sender); ALL `stream_started`.
//! * `POST …/streams/{stream_id}/chunks` `{"seq","delta"}` → 202 `{}`; a repeated `seq` → 200 `{}` and
//!   ignored (whatever its delta); a gap or a stream that is not open → 409; a delta over 16 KiB, past
//!   the text cap, or whose `stream_chunk` frame would exceed `max_reply_bytes` → 422; ALL `stream_chunk`.
//! * `POST …/streams/{stream_id}/complete` `{"content"?}` → 201 as `POST …/messages`; ALL
//!   `stream_completed` (nothing else: devices fetch the stored message). A stream that is not open →
//!   409. A retry after a 503 whose write had committed finds the stream's own message stored → 200 with
//!   `duplicate: true`, and ALL get what a first success sends; another message under the stream's id →
//!   409, ALL `stream_cancelled` (`aborted`).
//! * `DELETE …/streams/{stream_id}` → 204; ALL `stream_cancelled` (`aborted`). Not open → 409.
//!
//! A stream of another user (the user id in the path is part of the stream's name) is simply not open.
//! The work is in `streams::ops` (no transport); this file validates and maps outcomes to statuses.

use super::messages::{self, write_message, NewMessage, Written};
use super::Path;
use super::{path_chat_id, path_user_id, ApiError, ApiResult, ApiState, Body};
use crate::handlers::common::{chat_key, message_out};
use crate::handlers::Ctx;
use crate::store::chats::{ChatRecord, MessageRecord};
use crate::streams::ops::{self, OpError};
use crate::streams::{Appended, Opened, StreamError, StreamInfo, StreamKey};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use chatsync_protocol::api::{CompleteStream, MessagePosted, PostChunk, StartStream, StreamOpened};
use chatsync_protocol::{MessageContent, StreamId};
use serde_json::{json, Value};

/// Largest `meta`, bytes of JSON.
pub const MAX_META_BYTES: usize = 4096;
/// Deepest `meta`, levels of nested objects and arrays as [`chatsync_protocol::object_depth`] counts them
/// (`meta` itself is the first): the limit of message content, since `meta` reaches the devices in
/// `stream_started` and in every `initial_sync_response` while the stream is open.
pub const MAX_META_DEPTH: usize = chatsync_protocol::Limits::MAX_MESSAGE_CONTENT_DEPTH;
/// Largest `delta` of one chunk, bytes.
pub const MAX_DELTA_BYTES: usize = 16 * 1024;

/// The routes of this resource.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/users/{user_id}/chats/{chat_id}/streams", post(start))
        .route("/users/{user_id}/chats/{chat_id}/streams/{stream_id}/chunks", post(chunk))
        .route("/users/{user_id}/chats/{chat_id}/streams/{stream_id}/complete", post(complete))
        .route("/users/{user_id}/chats/{chat_id}/streams/{stream_id}", delete(abort))
}

/// The stream named by a path (400 naming the malformed segment).
fn stream_key(user_id: &str, chat_id: &str, stream_id: &str) -> ApiResult<StreamKey> {
    Ok(StreamKey {
        user_id: path_user_id(user_id)?,
        chat_id: path_chat_id(chat_id)?,
        stream_id: parse_stream_id(stream_id)?,
    })
}

fn parse_stream_id(id: &str) -> ApiResult<StreamId> {
    StreamId::new(id).map_err(|why| ApiError::invalid_payload("stream_id", format!("Invalid stream id: {why}.")))
}

/// The status of a failed stream operation.
fn op_error(e: OpError) -> ApiError {
    match e {
        OpError::ChatNotFound => ApiError::not_found("Chat not found."),
        OpError::Store(e) => e.into(),
        OpError::Stream(StreamError::NotOpen) => ApiError::conflict("The stream is not open."),
        OpError::Stream(StreamError::Gap { last, got }) => {
            ApiError::conflict(format!("Chunk {got} does not follow chunk {last}: send chunk {}.", last + 1))
        }
        OpError::Stream(StreamError::Conflict) => {
            ApiError::conflict("A stream with this id is open with another message_id or sender_name.")
        }
        OpError::Stream(StreamError::TooLarge { max }) => {
            ApiError::limit_exceeded("delta", format!("The stream's text would exceed max_stream_bytes ({max})."))
        }
        OpError::Stream(StreamError::TooMany { max }) => ApiError::limit_exceeded(
            "stream_id",
            format!("The user has {max} streams open (max_open_streams_per_user); end one before starting another."),
        ),
        OpError::Stream(StreamError::Unavailable(detail)) => ApiError::unavailable(detail),
        OpError::FrameTooLarge { max } => ApiError::limit_exceeded(
            "delta",
            format!("The stream_chunk frame of this delta would be larger than max_reply_bytes ({max}) in JSON."),
        ),
    }
}

async fn start(
    State(s): State<ApiState>,
    Path((user_id, chat_id)): Path<(String, String)>,
    Body(body): Body<StartStream>,
) -> ApiResult<(StatusCode, Json<StreamOpened>)> {
    let user_id = path_user_id(&user_id)?;
    let chat_id = path_chat_id(&chat_id)?;
    let stream_id = StreamId::new(body.stream_id.as_str())
        .map_err(|why| ApiError::invalid_payload("stream_id", format!("Invalid stream_id: {why}.")))?;
    let message_id = messages::message_id(&body.message_id)?;
    let sender_name = messages::sender_name(&body.sender_name)?;
    let meta = body.meta.unwrap_or_default();
    if serde_json::to_vec(&meta).map_or(usize::MAX, |v| v.len()) > MAX_META_BYTES {
        return Err(ApiError::limit_exceeded("meta", format!("meta is larger than {MAX_META_BYTES} bytes of JSON.")));
    }
    if chatsync_protocol::object_depth(&meta) > MAX_META_DEPTH {
        return Err(ApiError::limit_exceeded(
            "meta",
            format!("meta nests objects and arrays deeper than {MAX_META_DEPTH} levels."),
        ));
    }
    if s.ctx.store.user(&user_id).await?.is_none() {
        return Err(ApiError::not_found("No user has this id."));
    }
    let key = StreamKey { user_id, chat_id, stream_id };
    let info = StreamInfo { message_id, sender_name, meta };
    let status = match ops::start(&s.ctx, &key, &info).await.map_err(op_error)? {
        Opened::New => StatusCode::CREATED,
        Opened::AlreadyOpen => StatusCode::OK,
    };
    Ok((status, Json(StreamOpened { stream_id: key.stream_id.to_string() })))
}

async fn chunk(
    State(s): State<ApiState>,
    Path((user_id, chat_id, stream_id)): Path<(String, String, String)>,
    Body(body): Body<PostChunk>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let key = stream_key(&user_id, &chat_id, &stream_id)?;
    if body.seq == 0 {
        return Err(ApiError::invalid_payload("seq", "seq starts at 1."));
    }
    if body.delta.len() > MAX_DELTA_BYTES {
        // A repeated `seq` is ignored whatever its delta (SERVER_API.md section 4): only a chunk that
        // could be accepted is refused for its size. The stream is looked up on this error path only.
        if already_accepted(&s, &key, body.seq).await {
            return Ok((StatusCode::OK, Json(json!({}))));
        }
        return Err(ApiError::limit_exceeded("delta", format!("delta is longer than {MAX_DELTA_BYTES} bytes.")));
    }
    let status = match ops::chunk(&s.ctx, &key, body.seq, &body.delta).await {
        Ok(Appended::Accepted) => StatusCode::ACCEPTED,
        Ok(Appended::Duplicate) => StatusCode::OK,
        // As for a delta over 16 KiB: a repeated `seq` is ignored whatever its delta.
        Err(OpError::FrameTooLarge { .. }) if already_accepted(&s, &key, body.seq).await => StatusCode::OK,
        Err(e) => return Err(op_error(e)),
    };
    Ok((status, Json(json!({}))))
}

/// Whether `key` is open with chunk `seq` accepted already (a registry that fails answers no).
async fn already_accepted(s: &ApiState, key: &StreamKey, seq: u64) -> bool {
    let open = s.ctx.streams.list(&key.user_id).await.unwrap_or_default();
    open.iter().any(|o| o.key == *key && seq <= o.seq)
}

async fn complete(
    State(s): State<ApiState>,
    Path((user_id, chat_id, stream_id)): Path<(String, String, String)>,
    Body(body): Body<CompleteStream>,
) -> ApiResult<(StatusCode, Json<MessagePosted>)> {
    let key = stream_key(&user_id, &chat_id, &stream_id)?;
    // An explicit content is checked like `POST …/messages` before the stream is touched.
    let explicit = body.content.map(messages::content).transpose()?;
    let Some(stream) = ops::take_for_completion(&s.ctx, &key).await.map_err(op_error)? else {
        return Err(ApiError::conflict("The stream is not open."));
    };
    let content = match explicit {
        Some(c) => c,
        None => MessageContent::Text(stream.content.clone()),
    };
    // The stored message must fit in one reply frame (bounded replies): only text that escapes heavily
    // in JSON can exceed it; the stream stays open so the backend can complete with shorter content.
    let budget = (s.ctx.config.max_reply_bytes as usize).saturating_sub(16 * 1024);
    if serde_json::to_vec(&content).map_or(usize::MAX, |v| v.len()) > budget {
        ops::completion_failed(&s.ctx, stream).await;
        return Err(ApiError::limit_exceeded(
            "content",
            format!("The message would be larger than {budget} bytes of JSON."),
        ));
    }
    let message = NewMessage {
        message_id: stream.info.message_id.clone(),
        sender_name: stream.info.sender_name.clone(),
        content,
        created_at_ms: crate::store::now_millis(),
    };
    let message_id = message.message_id.clone();
    let posted = |status, seq, messages_v, duplicate| -> ApiResult<(StatusCode, Json<MessagePosted>)> {
        let body = MessagePosted {
            chat_id: key.chat_id.to_string(),
            message_id: message_id.to_string(),
            seq,
            messages_v,
            duplicate,
        };
        Ok((status, Json(body)))
    };
    // Before the write reads the chat: a duplicate's key is resolved from the record it returns.
    let epoch = s.ctx.keys.epoch();
    match write_message(&s.ctx, &key.user_id, &key.chat_id, &message).await {
        Ok(Written::New { chat, message: stored }) => {
            // Only `stream_completed` is broadcast (SERVER_API.md section 4: "followed by nothing else";
            // devices fetch the stored message), the cache takes the message.
            s.ctx.cache.message_added(&key.user_id, key.chat_id.as_str(), &stored).await;
            ops::completed(&s.ctx, &key, &stream.info.message_id, stored.seq, chat.messages_v).await;
            posted(StatusCode::CREATED, stored.seq, chat.messages_v, false)
        }
        Ok(Written::Duplicate { chat, original })
            if is_this_message(&s.ctx, &key, &chat, &original, &message, epoch) =>
        {
            // This stream's own message, stored by an earlier `complete` whose answer was lost after the
            // commit (it answered 503 and put the stream back; this is the retry). It was never announced:
            // devices get what a first success sends, and the backend the duplicate answer of section 3.
            s.ctx.cache.message_added(&key.user_id, key.chat_id.as_str(), &original).await;
            ops::completed(&s.ctx, &key, &stream.info.message_id, original.seq, chat.messages_v).await;
            posted(StatusCode::OK, original.seq, chat.messages_v, true)
        }
        Ok(Written::Duplicate { .. }) => {
            // The stream's message id already names another stored message of the chat (a backend reusing
            // ids): the streamed text can never be stored under it, so the stream ends without a message.
            ops::ended_without_message(&s.ctx, &key).await;
            Err(ApiError::conflict(
                "The stream's message_id already names a message of this chat; the stream was ended.",
            ))
        }
        Err(e) if e.status() == StatusCode::NOT_FOUND => {
            // The chat was deleted (or the user removed) while the stream ran: it can never complete.
            ops::ended_without_message(&s.ctx, &key).await;
            Err(e)
        }
        Err(e) => {
            // Not stored, or not known to be (the store is unavailable; a write that committed but lost
            // its answer is found by the retry, above): the stream is open again, so `complete` can be
            // retried.
            ops::completion_failed(&s.ctx, stream).await;
            Err(e)
        }
    }
}

/// Whether `original`, the message stored under the stream's message id in its chat, is the one this
/// `complete` would store: same sender and same content (the store already matched the chat and the id).
/// So a retried `complete` tells its own earlier write, committed but unanswered, from another message
/// under the id. A message that does not open is not this one (logged).
/// `epoch`: the keyring's, taken before the write.
fn is_this_message(
    ctx: &Ctx,
    key: &StreamKey,
    chat: &ChatRecord,
    original: &MessageRecord,
    m: &NewMessage,
    epoch: u64,
) -> bool {
    if original.sender != m.sender_name {
        return false;
    }
    let opened =
        chat_key(ctx, &key.user_id, chat, epoch).and_then(|k| message_out(&k.key, key.chat_id.as_str(), original));
    match opened {
        Ok(out) => out.content == m.content,
        Err(e) => {
            tracing::warn!(error = ?e, chat_id = %key.chat_id, "a stored message under a stream's id does not open");
            false
        }
    }
}

async fn abort(
    State(s): State<ApiState>,
    Path((user_id, chat_id, stream_id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let key = stream_key(&user_id, &chat_id, &stream_id)?;
    ops::abort(&s.ctx, &key).await.map_err(op_error)?;
    Ok(StatusCode::NO_CONTENT)
}
