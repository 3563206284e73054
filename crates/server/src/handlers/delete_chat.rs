//! `delete_chat`: deletes one of the user's chats with its messages, draft and data key, and leaves a
//! tombstone so the id is never reused. ALL `chat_deleted` `{"chat_id","tombstone":true}`, after a
//! `stream_cancelled` (reason `aborted`) for each stream still open in the chat. With a webhook URL, the
//! deletion records `chat.deleted` in the same transaction.

use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::{WriteOp, WriteResult};
use crate::store::now_millis;
use chatsync_protocol::{ChatDeleted, DeleteChat, ServerMessage};

/// Handles `delete_chat`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: DeleteChat) -> Result<Outcome, Error> {
    let event = crate::webhooks::chat_deleted(ctx, &conn.user_id, p.chat_id.as_str()).await?;
    let op =
        WriteOp::DeleteChat { owner: conn.user_id.clone(), chat_id: p.chat_id.to_string(), now: now_millis(), event };
    match super::common::store_write(ctx, &conn.user_id, op).await? {
        WriteResult::Deleted => {
            crate::webhooks::recorded(ctx);
            ctx.keys.chat_deleted(p.chat_id.as_str());
            ctx.cache.chat_deleted(&conn.user_id, p.chat_id.as_str()).await;
            crate::streams::ops::chat_deleted(ctx, &conn.user_id, p.chat_id.as_str()).await;
            let event = ChatDeleted { chat_id: p.chat_id, tombstone: true };
            Ok(Outcome::default().broadcast(Broadcast::All(ServerMessage::ChatDeleted(event))))
        }
        WriteResult::NotFound => Err(Error::chat_not_found(p.chat_id.as_str())),
        other => Err(Error::internal(format!("unexpected delete_chat result {other:?}"))),
    }
}
