//! `mark_read`: moves the user's read marker of a chat forward (to `seq`, capped at the chat's
//! `messages_v`) and recounts its unread messages (those from other senders above the marker), in the
//! writing statement. ALL `chat_read_updated` when the marker moved; SELF only, with the current values,
//! when `seq` was at or below it. Absent, deleted and foreign chats are `not_found`.

use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::{WriteOp, WriteResult};
use chatsync_protocol::{ChatReadUpdated, MarkRead, ServerMessage};

/// Handles `mark_read`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: MarkRead) -> Result<Outcome, Error> {
    let op = WriteOp::MarkRead { owner: conn.user_id.clone(), chat_id: p.chat_id.to_string(), seq: p.seq };
    let result = super::common::store_write(ctx, &conn.user_id, op).await?;
    super::common::cache_written(ctx, &conn.user_id, &result, false).await;
    let update = |read_seq, unread_count| ChatReadUpdated { chat_id: p.chat_id.clone(), read_seq, unread_count };
    match result {
        WriteResult::Applied(chat) => Ok(Outcome::default()
            .broadcast(Broadcast::All(ServerMessage::ChatReadUpdated(update(chat.read_seq, chat.unread_count))))),
        WriteResult::Unchanged(chat) => {
            Ok(Outcome::reply(ServerMessage::ChatReadUpdated(update(chat.read_seq, chat.unread_count))))
        }
        WriteResult::NotFound => Err(Error::chat_not_found(p.chat_id.as_str())),
        other => Err(Error::internal(format!("unexpected mark_read result {other:?}"))),
    }
}
