//! `initial_sync_request`: brings a (re)connecting client up to date from the versions it has.
//! SELF `initial_sync_response`: ids to delete, new or newer chats (the immediate-view chat first, with
//! the messages the client lacks), and the server's chat order. Failures are `initial_sync_error`.

use super::common::{chat_id, chat_key, message_out, open_draft, open_title, rfc3339, secs, versions};
use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::ChatRecord;
use crate::store::now_millis;
use chatsync_protocol::{ChatChangeKind, ChatUpdate, InitialSyncRequest, InitialSyncResponse, Limits, ServerMessage};
use std::collections::HashSet;

/// Handles `initial_sync_request`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: InitialSyncRequest) -> Result<Outcome, Error> {
    if p.chat_versions.len() > Limits::MAX_SYNC_CHAT_VERSIONS {
        return Err(Error::limit_exceeded(
            "chat_versions",
            format!("More than {} entries in chat_versions.", Limits::MAX_SYNC_CHAT_VERSIONS),
        ));
    }
    let user = conn.user_id.as_str();
    let chats = user_chats(ctx, user).await?;
    let owned: HashSet<&str> = chats.iter().map(|c| c.chat_id.as_str()).collect();
    let chat_ids_to_delete = p.chat_versions.keys().filter(|id| !owned.contains(id.as_str())).cloned().collect();

    let user_key = ctx.keys.user_key(ctx.chats.as_ref(), user).await?;
    let immediate = p.immediate_view_chat_id.as_ref().map(|c| c.as_str());
    let mut updates = Vec::new();
    for chat in &chats {
        let known = p.chat_versions.get(chat.chat_id.as_str());
        let have = |v: Option<i64>| v.unwrap_or(-1);
        let (new_title, new_draft, new_messages) = match known {
            None => (true, true, true),
            Some(k) => (
                chat.title_v as i64 > have(k.title_v),
                chat.draft_v as i64 > have(k.draft_v),
                chat.messages_v as i64 > have(k.messages_v),
            ),
        };
        if !(new_title || new_draft || new_messages) {
            continue;
        }
        let key = chat_key(ctx, user, chat)?;
        let messages = if immediate == Some(chat.chat_id.as_str()) {
            let after = known.and_then(|k| k.messages_v).unwrap_or(0).max(0) as u64;
            let page = ctx.limits.max_page_messages;
            let records = match ctx.chats.messages_after(user, &chat.chat_id, after, page).await? {
                Some((_, records, _)) => records,
                None => Vec::new(),
            };
            Some(records.iter().map(|m| message_out(&key.key, &chat.chat_id, m)).collect::<Result<Vec<_>, _>>()?)
        } else {
            None
        };
        let entry = ChatUpdate {
            chat_id: chat_id(&chat.chat_id)?,
            kind: if known.is_none() { ChatChangeKind::NewChat } else { ChatChangeKind::UpdatedChat },
            versions: versions(chat),
            last_edited_overall_timestamp: secs(chat.last_edited_ms),
            unread_count: chat.unread_count,
            title: if new_title { Some(open_title(&key.key, &chat.chat_id, chat.title.as_deref())?) } else { None },
            draft_json: if new_draft {
                Some(open_draft(&user_key, &chat.chat_id, user, chat.draft.as_deref())?)
            } else {
                None
            },
            messages,
        };
        if entry.messages.is_some() {
            updates.insert(0, entry);
        } else {
            updates.push(entry);
        }
    }
    let server_chat_order = chats.iter().map(|c| chat_id(&c.chat_id)).collect::<Result<Vec<_>, _>>()?;
    Ok(Outcome::reply(ServerMessage::InitialSyncResponse(InitialSyncResponse {
        chat_ids_to_delete,
        chats_to_add_or_update: updates,
        server_chat_order,
        sync_completed_at: rfc3339(now_millis()),
    })))
}

/// The user's chats, most recent first: from the cache, else from the store (then cached).
pub async fn user_chats(ctx: &Ctx, user_id: &str) -> Result<Vec<ChatRecord>, Error> {
    if let Some(chats) = ctx.cache.chats(user_id).await {
        return Ok(chats);
    }
    let token = ctx.cache.begin_load(user_id).await;
    let chats = ctx.chats.chats(user_id).await?;
    ctx.cache.put_chats(user_id, token, chats.clone()).await;
    Ok(chats)
}
