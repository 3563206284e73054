//! `update_title`: sets the title of one of the user's chats (`""` clears it), creating the chat when
//! the id is new. ALL `chat_title_updated` (SELF's copy carries the `request_id`).

use super::common::{check_title, seal_title, write_chat};
use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::{ChatRecord, WriteOp, WriteResult};
use crate::store::now_millis;
use chatsync_protocol::{ChatId, ChatTitleUpdated, ServerMessage, TitleData, TitleVersion, UpdateTitle};

/// Handles `update_title`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: UpdateTitle) -> Result<Outcome, Error> {
    check_title(ctx, &p.new_title, "new_title").map_err(|e| e.with_chat(p.chat_id.as_str()))?;
    match apply(ctx, &conn.user_id, p.chat_id.as_str(), &p.new_title, None).await? {
        WriteResult::Applied(chat) => {
            Ok(Outcome::default().broadcast(Broadcast::All(event(&p.chat_id, &chat, p.new_title))))
        }
        other => Err(Error::internal(format!("unexpected title result {other:?}"))),
    }
}

/// Writes a title (shared with `sync_offline_changes`) and merges the result into the cache.
pub async fn apply(
    ctx: &Ctx,
    user_id: &str,
    chat_id: &str,
    title: &str,
    if_version_at_most: Option<i64>,
) -> Result<WriteResult, Error> {
    let now = now_millis();
    write_chat(ctx, user_id, chat_id, |target, key| WriteOp::Title {
        owner: user_id.to_owned(),
        chat_id: chat_id.to_owned(),
        title: seal_title(key, chat_id, title),
        target,
        if_version_at_most,
        now,
    })
    .await
}

/// The `chat_title_updated` event for a written title.
pub fn event(chat_id: &ChatId, chat: &ChatRecord, title: String) -> ServerMessage {
    ServerMessage::ChatTitleUpdated(ChatTitleUpdated {
        chat_id: chat_id.clone(),
        data: TitleData { title },
        versions: TitleVersion { title_v: chat.title_v },
    })
}
