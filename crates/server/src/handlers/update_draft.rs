//! `update_draft`: sets (or, with `null`, clears) the draft of one of the user's chats, creating the
//! chat when the id is new. SELF `draft_update_confirmed`; OTHERS `chat_draft_updated`.

use super::common::{check_draft, seal_draft, secs, write_chat};
use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::{ChatRecord, WriteOp, WriteResult};
use crate::store::now_millis;
use chatsync_protocol::{ChatDraftUpdated, DraftData, DraftUpdateConfirmed, DraftVersion, ServerMessage, UpdateDraft};
use serde_json::{Map, Value};

/// Handles `update_draft`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: UpdateDraft) -> Result<Outcome, Error> {
    if let Some(draft) = &p.draft_json {
        check_draft(ctx, draft, "draft_json").map_err(|e| e.with_chat(p.chat_id.as_str()))?;
    }
    let chat = match apply(ctx, &conn.user_id, p.chat_id.as_str(), p.draft_json.as_ref(), None).await? {
        WriteResult::Applied(chat) => chat,
        other => return Err(Error::internal(format!("unexpected draft result {other:?}"))),
    };
    let confirmed = DraftUpdateConfirmed {
        chat_id: p.chat_id.clone(),
        draft_v: chat.draft_v,
        last_edited_overall_timestamp: secs(chat.last_edited_ms),
    };
    Ok(Outcome::reply(ServerMessage::DraftUpdateConfirmed(confirmed)).broadcast(Broadcast::Others(event(
        &p.chat_id,
        &chat,
        p.draft_json,
    ))))
}

/// Writes a draft (shared with `sync_offline_changes`): encrypts it under the user's key and merges the
/// result into the cache.
pub async fn apply(
    ctx: &Ctx,
    user_id: &str,
    chat_id: &str,
    draft: Option<&Map<String, Value>>,
    if_version_at_most: Option<i64>,
) -> Result<WriteResult, Error> {
    let user_key = ctx.keys.user_key(ctx.chats.as_ref(), user_id).await?;
    let sealed = seal_draft(&user_key, chat_id, user_id, draft);
    let now = now_millis();
    write_chat(ctx, user_id, chat_id, |target, _chat_key| WriteOp::Draft {
        owner: user_id.to_owned(),
        chat_id: chat_id.to_owned(),
        draft: sealed.clone(),
        target,
        if_version_at_most,
        now,
    })
    .await
}

/// The `chat_draft_updated` event for a written draft.
pub fn event(
    chat_id: &chatsync_protocol::ChatId,
    chat: &ChatRecord,
    draft: Option<Map<String, Value>>,
) -> ServerMessage {
    ServerMessage::ChatDraftUpdated(ChatDraftUpdated {
        chat_id: chat_id.clone(),
        data: DraftData { draft_json: draft },
        versions: DraftVersion { draft_v: chat.draft_v },
        last_edited_overall_timestamp: secs(chat.last_edited_ms),
    })
}
