//! The stream operations of SERVER_API.md section 4 that do not store anything (start, chunk, abort), as
//! domain operations with no transport: the HTTP API (`api/streams.rs`) calls them, and so can anything
//! else. Each one changes the registry first and then tells ALL of the user's connections (on every node,
//! through the hub), so a device never sees a chunk the registry refused.
//!
//! Order: the chunks of one stream reach a device in `seq` order when the backend sends each after the
//! previous one was answered (the seq rule asks for that: a chunk that overtakes its predecessor is a gap),
//! whichever nodes the calls reach: every event here goes through `Hub::deliver_in_order`, which queues it
//! on this node's connections at its place in the bus order before the call is answered.

use super::{Appended, OpenStream, Opened, StreamError, StreamInfo, StreamKey};
use crate::hub::Audience;
use crate::keys::ChatAccess;
use crate::store::chats::ChatLookup;
use crate::store::now_millis;
use crate::Ctx;
use chatsync_protocol::{encode, ServerMessage, StreamCancelReason, StreamChunk, StreamStarted};

/// Why a stream operation failed (each maps to one status of SERVER_API.md section 4).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The chat belongs to another user or was deleted (404 `not_found`).
    #[error("chat not found")]
    ChatNotFound,
    /// The registry refused (409 `conflict` for a closed stream, a gap or another stream under the id; 422
    /// `limit_exceeded` past the cap; 503 `unavailable`).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The store failed while checking the chat, or the chat cannot be created (past `max_chats_per_user`).
    #[error("{0:?}")]
    Store(crate::error::Error),
    /// The chunk's `stream_chunk` frame would be larger than `max_reply_bytes` (PROTOCOL.md "Bounded
    /// replies"), so no device could be sent it (422 `limit_exceeded` naming `delta`). Only a delta that
    /// grows in JSON (control characters escaped as `\u00XX`, six bytes each) gets there within the 16 KiB
    /// limit of a delta. Nothing was applied: the stream stays open at the same `seq`.
    #[error("the chunk's frame would be larger than {max} bytes")]
    FrameTooLarge {
        /// `max_reply_bytes`.
        max: usize,
    },
}

impl From<crate::error::Error> for OpError {
    fn from(e: crate::error::Error) -> OpError {
        OpError::Store(e)
    }
}

/// Opens a stream in a chat of `key.user_id` (a chat id that is new is accepted, unless the user owns
/// `max_chats_per_user` chats already; the chat is created when the stream's message is stored) and
/// announces it to ALL with `stream_started`. A retried start of the same stream announces nothing.
pub async fn start(ctx: &Ctx, key: &StreamKey, info: &StreamInfo) -> Result<Opened, OpError> {
    match ctx.keys.chat(ctx.chats.as_ref(), &key.user_id, key.chat_id.as_str()).await? {
        ChatAccess::Denied => return Err(OpError::ChatNotFound),
        // The completion would create the chat and be refused at the limit: a stream that can never be
        // stored is refused before devices see it grow, as a message to that chat is. (A chat created
        // meanwhile still takes the last place: `complete` is then 422 and the stream stays open.)
        ChatAccess::New => {
            let max = ctx.config.max_chats_per_user;
            let owned = ctx.store.user_summary(&key.user_id).await.map_err(crate::error::Error::from)?;
            // (A retried start of a stream already open and announced, the limit reached since, goes on
            // as a retry: refused, it would leave the devices a stream that never ends.)
            if owned.is_some_and(|u| u.chat_count >= u64::from(max)) && !ctx.streams.is_open(key).await? {
                return Err(crate::error::Error::chat_limit(key.chat_id.as_str(), max).into());
            }
        }
        ChatAccess::Owned(_) => {}
    }
    let opened = ctx.streams.open(key, info, now_millis()).await?;
    if opened == Opened::New {
        metrics::counter!(crate::metrics::STREAMS_STARTED).increment(1);
        let event = ServerMessage::StreamStarted(StreamStarted {
            chat_id: key.chat_id.clone(),
            stream_id: key.stream_id.clone(),
            message_id: info.message_id.clone(),
            sender_name: info.sender_name.clone(),
            meta: info.meta.clone(),
        });
        ctx.hub.deliver_in_order(&key.user_id, Audience::All, encode(&event, None).into()).await;
        if still_deleted(ctx, key).await {
            return Err(OpError::ChatNotFound);
        }
    }
    Ok(opened)
}

/// After a stream was opened (or put back) and announced: if its chat was deleted meanwhile, ends it
/// (`true`). The deletion may have listed the chat's streams before this one was open (see
/// [`chat_deleted`]); looking at the chat after opening closes that gap, since one of the two always sees
/// the other (the deletion commits before it lists; this opens before it looks). The end is announced
/// after the stream's own announcement, even when the deletion took the stream first and announced it
/// earlier: a device may see `stream_cancelled` twice, never a stream left open. A failed look leaves the
/// stream open (its chat is looked at again when it completes; the idle timeout ends it otherwise).
async fn still_deleted(ctx: &Ctx, key: &StreamKey) -> bool {
    match ctx.chats.chat_lookup(key.chat_id.as_str()).await {
        Ok(ChatLookup::Deleted) => {
            match ctx.streams.take(key).await {
                Ok(Some(_)) => ended_without_message(ctx, key).await,
                // The deletion took it (and announced its end, perhaps before this stream's start).
                Ok(None) => {
                    let frame = super::cancelled_frame(key, StreamCancelReason::Aborted);
                    ctx.hub.deliver_in_order(&key.user_id, Audience::All, frame.into()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot close a stream whose chat was deleted; the idle timeout will")
                }
            }
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the chat of a stream just opened");
            false
        }
    }
}

/// Accepts chunk `seq` and delivers it to ALL as `stream_chunk`; a repeated `seq` is ignored. A chunk whose
/// frame would exceed `max_reply_bytes` is [`OpError::FrameTooLarge`] before the registry sees it (checked
/// on the frame itself, as it would be delivered), so it is never accepted without being deliverable.
pub async fn chunk(ctx: &Ctx, key: &StreamKey, seq: u64, delta: &str) -> Result<Appended, OpError> {
    let event = ServerMessage::StreamChunk(StreamChunk {
        chat_id: key.chat_id.clone(),
        stream_id: key.stream_id.clone(),
        seq,
        delta: delta.to_owned(),
    });
    let frame = encode(&event, None);
    let max = ctx.config.max_reply_bytes as usize;
    if frame.len() > max {
        return Err(OpError::FrameTooLarge { max });
    }
    let appended = ctx.streams.append(key, seq, delta, now_millis()).await?;
    if appended == Appended::Accepted {
        metrics::counter!(crate::metrics::STREAM_CHUNKS).increment(1);
        ctx.hub.deliver_in_order(&key.user_id, Audience::All, frame.into()).await;
        ctx.streams.tidy(key).await;
    }
    Ok(appended)
}

/// Closes the stream for completion: the caller stores its message and then calls [`completed`], or
/// [`completion_failed`] to put it back. `Ok(None)` when the stream is not open.
pub async fn take_for_completion(ctx: &Ctx, key: &StreamKey) -> Result<Option<OpenStream>, OpError> {
    Ok(ctx.streams.take(key).await?)
}

/// Puts back a stream whose message could not be stored, so that the backend can retry `complete`; if
/// its chat was deleted while it was out of the registry, ends it instead (as [`start`] does).
pub async fn completion_failed(ctx: &Ctx, stream: OpenStream) {
    let key = stream.key.clone();
    if let Err(e) = ctx.streams.restore(stream, now_millis()).await {
        tracing::warn!(error = %e, "a stream whose completion failed could not be reopened");
        return;
    }
    still_deleted(ctx, &key).await;
}

/// Announces a stored stream message to ALL with `stream_completed` (nothing else of the stream follows).
/// If the chat was deleted since the message committed, the devices had `chat_deleted` already (the
/// deletion found no open stream to end: this completion had taken it), and `stream_completed` would name
/// the deleted chat as one holding a new message: the stream ends with `stream_cancelled` (`aborted`)
/// instead, as a backend's message is not announced after its chat's deletion.
pub async fn completed(
    ctx: &Ctx,
    key: &StreamKey,
    message_id: &chatsync_protocol::MessageId,
    seq: u64,
    messages_v: u64,
) {
    if ctx.keys.is_deleted(key.chat_id.as_str()) {
        ended_without_message(ctx, key).await;
        return;
    }
    metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "completed").increment(1);
    let event = ServerMessage::StreamCompleted(chatsync_protocol::StreamCompleted {
        chat_id: key.chat_id.clone(),
        stream_id: key.stream_id.clone(),
        message_id: message_id.clone(),
        seq,
        messages_v,
    });
    ctx.hub.deliver_in_order(&key.user_id, Audience::All, encode(&event, None).into()).await;
}

/// Tells ALL that a stream taken for completion ended without a message (its chat is gone):
/// `stream_cancelled` with reason `aborted`.
pub async fn ended_without_message(ctx: &Ctx, key: &StreamKey) {
    metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "aborted").increment(1);
    let frame = super::cancelled_frame(key, StreamCancelReason::Aborted);
    ctx.hub.deliver_in_order(&key.user_id, Audience::All, frame.into()).await;
}

/// The backend aborts a stream: ALL `stream_cancelled` with reason `aborted`. `Err(NotOpen)` when it is
/// not open.
pub async fn abort(ctx: &Ctx, key: &StreamKey) -> Result<(), OpError> {
    match ctx.streams.take(key).await? {
        Some(_) => {
            metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "aborted").increment(1);
            let frame = super::cancelled_frame(key, StreamCancelReason::Aborted);
            ctx.hub.deliver_in_order(&key.user_id, Audience::All, frame.into()).await;
            Ok(())
        }
        None => Err(OpError::Stream(StreamError::NotOpen)),
    }
}

/// Ends every open stream of a chat that was just deleted (after the deletion committed): ALL get
/// `stream_cancelled` with reason `aborted`, before the `chat_deleted` the caller broadcasts, and later
/// chunks or `complete` for those streams get 409 `conflict`. The deletion stands whatever happens here:
/// a registry failure is logged (the streams then end at their completion, which finds no chat, or by the
/// idle timeout).
pub async fn chat_deleted(ctx: &Ctx, user_id: &str, chat_id: &str) {
    let open = match ctx.streams.list(user_id).await {
        Ok(open) => open,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the open streams of a deleted chat");
            return;
        }
    };
    for stream in open.into_iter().filter(|s| s.key.chat_id.as_str() == chat_id) {
        match ctx.streams.take(&stream.key).await {
            Ok(Some(_)) => ended_without_message(ctx, &stream.key).await,
            Ok(None) => {} // completed, aborted or cancelled meanwhile: whoever took it announced it
            Err(e) => tracing::warn!(error = %e, "cannot close an open stream of a deleted chat"),
        }
    }
}
