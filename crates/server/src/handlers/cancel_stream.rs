//! `cancel_stream` `{"chat_id","stream_id"}`: a device stops a reply being generated (SERVER_API.md
//! section 4). ALL `stream_cancelled` `{"chat_id","stream_id","reason":"cancelled_by_user"}`; the stream is
//! closed, so later chunks or `complete` for it get 409 `conflict`. `not_found` when the user has no such
//! open stream (another user's stream is indistinguishable from none); `unavailable` when the
//! `stream.cancel_requested` webhook event cannot be recorded (the stream is left as it was), or when the
//! registry fails after it was (the backend is told; the stream stays open until the device retries, the
//! backend aborts it or the idle timeout ends it).
//!
//! The event is recorded before the stream is closed (SERVER_API.md section 5: at least once): a cancel
//! that the backend would never hear of cannot happen, and the stream stays open for the backend while
//! the event is being recorded. A stream that ends otherwise between the two (completed, aborted) costs a
//! spare event, which the backend ignores like any repeated one.

use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::streams::StreamKey;
use chatsync_protocol::{CancelStream, ServerMessage, StreamCancelReason, StreamCancelled};

/// Handles `cancel_stream`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: CancelStream) -> Result<Outcome, Error> {
    let key = StreamKey { user_id: conn.user_id.clone(), chat_id: p.chat_id, stream_id: p.stream_id };
    if !ctx.streams.is_open(&key).await.map_err(|e| Error::unavailable(e.to_string()))? {
        return Err(Error::stream_not_found(key.chat_id.as_str()));
    }
    let (user, chat, stream) = (key.user_id.as_str(), key.chat_id.as_str(), key.stream_id.as_str());
    crate::webhooks::stream_cancel_requested(ctx, user, chat, stream).await?;
    match ctx.streams.take(&key).await {
        Ok(Some(_)) => {
            metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "cancelled_by_user").increment(1);
            let event = StreamCancelled {
                chat_id: key.chat_id,
                stream_id: key.stream_id,
                reason: StreamCancelReason::CancelledByUser,
            };
            Ok(Outcome::default().broadcast(Broadcast::All(ServerMessage::StreamCancelled(event))))
        }
        Ok(None) => Err(Error::stream_not_found(key.chat_id.as_str())),
        Err(e) => Err(Error::unavailable(e.to_string())),
    }
}
