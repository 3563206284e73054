//! `cancel_stream` `{"chat_id","stream_id"}`: a device stops a reply being generated (SERVER_API.md
//! section 4). ALL `stream_cancelled` `{"chat_id","stream_id","reason":"cancelled_by_user"}`; the stream is
//! closed, so later chunks or `complete` for it get 409 `conflict`. `not_found` when the user has no such
//! open stream (another user's stream is indistinguishable from none); `unavailable` (the stream stays
//! open) when the `stream.cancel_requested` webhook event cannot be recorded.

use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::streams::StreamKey;
use chatsync_protocol::{CancelStream, ServerMessage, StreamCancelReason, StreamCancelled};

/// Handles `cancel_stream`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: CancelStream) -> Result<Outcome, Error> {
    let key = StreamKey { user_id: conn.user_id.clone(), chat_id: p.chat_id, stream_id: p.stream_id };
    match ctx.streams.take(&key).await {
        Ok(Some(open)) => {
            // Tell the backend (SERVER_API.md section 5: at least once). An event that cannot be recorded
            // undoes the cancel: the stream is put back and the device told `unavailable`, so that the
            // backend never keeps generating a reply the user cancelled without hearing of it.
            let (user, chat, stream) = (key.user_id.as_str(), key.chat_id.as_str(), key.stream_id.as_str());
            if let Err(e) = crate::webhooks::stream_cancel_requested(ctx, user, chat, stream).await {
                if let Err(restore) = ctx.streams.restore(open, crate::store::now_millis()).await {
                    tracing::warn!(error = %restore, "a stream whose cancel could not be recorded stays closed");
                }
                return Err(e);
            }
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
