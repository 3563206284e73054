//! `request_chat_content_batch`: the most recent messages (at most one page each, oldest first) of up to
//! `max_batch_chats` chats. SELF `chat_content_batch_response`; ids that are not the user's chats
//! (absent, deleted, foreign) are listed in `not_found`.

use super::common::{chat_key, message_out};
use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::keys::ChatAccess;
use chatsync_protocol::{ChatContentBatchResponse, MessagesVersion, RequestChatContentBatch, ServerMessage};
use std::collections::{BTreeMap, HashSet};

/// Handles `request_chat_content_batch`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: RequestChatContentBatch) -> Result<Outcome, Error> {
    let max = ctx.limits.max_batch_chats as usize;
    if p.chat_ids.len() > max {
        return Err(Error::limit_exceeded("chat_ids", format!("More than max_batch_chats ({max}) chat ids.")));
    }
    let page = ctx.limits.max_page_messages;
    let mut response = ChatContentBatchResponse {
        messages_by_chat_id: BTreeMap::new(),
        versions_by_chat_id: BTreeMap::new(),
        not_found: Vec::new(),
    };
    let mut seen = HashSet::new();
    for chat_id in p.chat_ids {
        if !seen.insert(chat_id.clone()) {
            continue;
        }
        // A cached run ends at the chat's latest message; it answers if it holds a full page or the
        // whole chat. Otherwise the store does.
        let cached = ctx
            .cache
            .messages(&conn.user_id, chat_id.as_str())
            .await
            .filter(|run| run.len() >= page as usize || run.first().is_some_and(|m| m.seq == 1));
        let (key, messages_v, records) = match cached {
            Some(run) => match ctx.keys.chat(ctx.chats.as_ref(), &conn.user_id, chat_id.as_str()).await? {
                ChatAccess::Owned(key) => {
                    let skip = run.len().saturating_sub(page as usize);
                    (key, run.last().map_or(0, |m| m.seq), run.into_iter().skip(skip).collect::<Vec<_>>())
                }
                _ => {
                    response.not_found.push(chat_id);
                    continue;
                }
            },
            None => {
                let Some((chat, records)) = ctx.chats.latest_messages(&conn.user_id, chat_id.as_str(), page).await?
                else {
                    response.not_found.push(chat_id);
                    continue;
                };
                (chat_key(ctx, &conn.user_id, &chat)?, chat.messages_v, records)
            }
        };
        let messages =
            records.iter().map(|m| message_out(&key.key, chat_id.as_str(), m)).collect::<Result<Vec<_>, _>>()?;
        response.versions_by_chat_id.insert(chat_id.clone(), MessagesVersion { messages_v });
        response.messages_by_chat_id.insert(chat_id, messages);
    }
    Ok(Outcome::reply(ServerMessage::ChatContentBatchResponse(response)))
}
