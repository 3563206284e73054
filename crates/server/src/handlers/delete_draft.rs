//! `delete_draft`: clears the draft of one of the user's chats. With a draft: SELF `draft_delete_receipt`
//! (`success: true`, new `draft_v`) and OTHERS `draft_deleted`; without one: SELF `draft_delete_receipt`
//! (`success: false`, "Draft not found."). Absent, deleted and foreign chats are `not_found`.

use super::common::write_chat;
use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::{Target, WriteOp, WriteResult};
use chatsync_protocol::{DeleteDraft, DraftDeleteReceipt, DraftDeleted, ServerMessage};

/// Handles `delete_draft`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: DeleteDraft) -> Result<Outcome, Error> {
    match apply(ctx, &conn.user_id, p.chat_id.as_str(), None, false).await? {
        WriteResult::Applied(chat) => {
            let receipt = DraftDeleteReceipt {
                chat_id: p.chat_id.clone(),
                success: true,
                draft_v: Some(chat.draft_v),
                message: None,
            };
            let event = DraftDeleted { chat_id: p.chat_id, draft_v: chat.draft_v };
            Ok(Outcome::reply(ServerMessage::DraftDeleteReceipt(receipt))
                .broadcast(Broadcast::Others(ServerMessage::DraftDeleted(event))))
        }
        WriteResult::NoDraft(_) => Ok(Outcome::reply(ServerMessage::DraftDeleteReceipt(DraftDeleteReceipt {
            chat_id: p.chat_id,
            success: false,
            draft_v: None,
            message: Some("Draft not found.".into()),
        }))),
        other => Err(Error::internal(format!("unexpected delete_draft result {other:?}"))),
    }
}

/// Clears a draft (shared with `sync_offline_changes`) and merges the result into the cache. With
/// `create` (offline sync), an unknown chat is created (without a draft: `NoDraft`); without it, an
/// unknown chat is `not_found` like absent, deleted and foreign ones.
pub async fn apply(
    ctx: &Ctx,
    user_id: &str,
    chat_id: &str,
    if_version_at_most: Option<i64>,
    create: bool,
) -> Result<WriteResult, Error> {
    let op = |target| WriteOp::DeleteDraft {
        owner: user_id.to_owned(),
        chat_id: chat_id.to_owned(),
        target,
        if_version_at_most,
    };
    if create {
        return write_chat(ctx, user_id, chat_id, |target, _chat_key| op(target)).await;
    }
    let result = super::common::store_write(ctx, user_id, op(Target::Existing)).await?;
    if let WriteResult::NotFound = result {
        return Err(Error::chat_not_found(chat_id));
    }
    super::common::cache_written(ctx, user_id, &result, false).await;
    Ok(result)
}
