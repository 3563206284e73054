//! `request_chat_content_batch`: the most recent messages (at most one page each, oldest first) of up to
//! `max_batch_chats` chats. SELF `chat_content_batch_response`; ids that are not the user's chats
//! (absent, deleted, foreign) are listed in `not_found`.
//!
//! The reply is bounded ("Bounded replies"): the chats are split over parts of at most
//! `max_reply_bytes` (`more: true` on all but the last; `not_found` in the last), and a chat whose page
//! alone would not fit keeps its most recent messages that do. Decryption runs on the blocking pool.

use super::bounded::{json_len, off_workers, Packer};
use super::common::{chat_key, message_out};
use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::keys::{ChatAccess, ChatKey};
use crate::store::chats::MessageRecord;
use chatsync_protocol::{
    ChatContentBatchResponse, ChatId, MessageOut, MessagesVersion, RequestChatContentBatch, ServerMessage,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Handles `request_chat_content_batch`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: RequestChatContentBatch) -> Result<Outcome, Error> {
    let max = ctx.limits.max_batch_chats as usize;
    if p.chat_ids.len() > max {
        return Err(Error::limit_exceeded("chat_ids", format!("More than max_batch_chats ({max}) chat ids.")));
    }
    let page = ctx.limits.max_page_messages;
    let mut found: Vec<(ChatId, Arc<ChatKey>, u64, Vec<MessageRecord>)> = Vec::new();
    let mut not_found = Vec::new();
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
        match cached {
            Some(run) => match ctx.keys.chat(ctx.chats.as_ref(), &conn.user_id, chat_id.as_str()).await? {
                ChatAccess::Owned(key) => {
                    let skip = run.len().saturating_sub(page as usize);
                    let messages_v = run.last().map_or(0, |m| m.seq);
                    found.push((chat_id, key, messages_v, run.into_iter().skip(skip).collect()));
                }
                _ => not_found.push(chat_id),
            },
            None => match ctx.chats.latest_messages(&conn.user_id, chat_id.as_str(), page).await? {
                Some((chat, records)) => {
                    let key = chat_key(ctx, &conn.user_id, &chat)?;
                    found.push((chat_id, key, chat.messages_v, records));
                }
                None => not_found.push(chat_id),
            },
        }
    }
    let budget = ctx.limits.max_reply_bytes as usize;
    let parts = off_workers(move || pack(found, not_found, budget)).await?;
    Ok(Outcome::parts(parts.into_iter().map(ServerMessage::ChatContentBatchResponse).collect()))
}

/// Decrypts the chats' messages and packs the chats into parts of at most `budget` bytes.
fn pack(
    found: Vec<(ChatId, Arc<ChatKey>, u64, Vec<MessageRecord>)>,
    not_found: Vec<ChatId>,
    budget: usize,
) -> Result<Vec<ChatContentBatchResponse>, Error> {
    let empty = || ChatContentBatchResponse {
        messages_by_chat_id: BTreeMap::new(),
        versions_by_chat_id: BTreeMap::new(),
        not_found: Vec::new(),
        more: false,
    };
    let mut parts = Vec::new();
    let mut part = empty();
    let mut packer = Packer::new(budget);
    for (chat_id, key, messages_v, records) in found {
        let messages =
            records.iter().map(|m| message_out(&key.key, chat_id.as_str(), m)).collect::<Result<Vec<_>, _>>()?;
        let version = MessagesVersion { messages_v };
        // The chat's cost: its id twice, its version, and its messages; a page that alone is too big
        // keeps its most recent messages.
        let fixed = 2 * json_len(&chat_id) + json_len(&version) + 4;
        let (messages, size) = newest_that_fit(messages, fixed, budget);
        if !packer.fits(size) && !packer.is_empty() {
            parts.push(std::mem::replace(&mut part, empty()));
            packer.next_part();
        }
        packer.add(size);
        part.versions_by_chat_id.insert(chat_id.clone(), version);
        part.messages_by_chat_id.insert(chat_id, messages);
    }
    let size: usize = not_found.iter().map(|id| json_len(id) + 1).sum();
    if !packer.fits(size) && !packer.is_empty() {
        parts.push(std::mem::replace(&mut part, empty()));
    }
    part.not_found = not_found;
    parts.push(part);
    let last = parts.len() - 1;
    for (i, p) in parts.iter_mut().enumerate() {
        p.more = i < last;
    }
    Ok(parts)
}

/// The most recent messages (kept oldest first) whose total with `fixed` fits one frame, and that total.
fn newest_that_fit(messages: Vec<MessageOut>, fixed: usize, budget: usize) -> (Vec<MessageOut>, usize) {
    let packer = Packer::new(budget);
    let sizes: Vec<usize> = messages.iter().map(|m| json_len(m) + 1).collect();
    let mut total = fixed;
    let mut keep = 0;
    for size in sizes.iter().rev() {
        if !packer.fits(total + size) {
            break;
        }
        total += size;
        keep += 1;
    }
    let skip = messages.len() - keep;
    (messages.into_iter().skip(skip).collect(), total)
}
