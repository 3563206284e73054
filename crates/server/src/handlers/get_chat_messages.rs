//! `get_chat_messages`: one page of a chat's messages after `after_seq`, oldest first.
//! SELF `chat_messages_response` `{"chat_id","messages","messages_v","has_more"}`. The page is also
//! bounded by `max_reply_bytes`: fewer messages, with `has_more: true`.

use super::bounded::{json_len, off_workers, Packer};
use super::common::{chat_key, message_out};
use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use chatsync_protocol::{ChatMessagesResponse, GetChatMessages, Limits, ServerMessage};

/// Handles `get_chat_messages`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: GetChatMessages) -> Result<Outcome, Error> {
    let limit = p.limit.unwrap_or(Limits::DEFAULT_PAGE_MESSAGES.min(ctx.limits.max_page_messages));
    if limit == 0 {
        return Err(Error::invalid_payload("limit", "Invalid payload: field `limit` must be at least 1.")
            .with_chat(p.chat_id.as_str()));
    }
    if limit > ctx.limits.max_page_messages {
        return Err(Error::limit_exceeded(
            "limit",
            format!("`limit` is larger than max_page_messages ({}).", ctx.limits.max_page_messages),
        )
        .with_chat(p.chat_id.as_str()));
    }
    let chat_id = p.chat_id.as_str();
    // Before the read: a gap in the cluster's bus after it may hide the chat's deletion elsewhere.
    let epoch = ctx.keys.epoch();
    let Some((chat, records, has_more)) = ctx.chats.messages_after(&conn.user_id, chat_id, p.after_seq, limit).await?
    else {
        return Err(Error::chat_not_found(chat_id));
    };
    let key = chat_key(ctx, &conn.user_id, &chat, epoch)?;
    let budget = ctx.limits.max_reply_bytes as usize;
    let owned_id = chat_id.to_owned();
    // Decrypt on the blocking pool; stop at the frame budget ("Bounded replies": fewer messages and
    // `has_more`). A single message always fits (Config::validate).
    let (messages, cut) = off_workers(move || {
        let mut packer = Packer::new(budget);
        let mut messages = Vec::with_capacity(records.len());
        for record in &records {
            let message = message_out(&key.key, &owned_id, record)?;
            let size = json_len(&message);
            if !packer.fits(size) && !packer.is_empty() {
                return Ok((messages, true));
            }
            packer.add(size);
            messages.push(message);
        }
        Ok((messages, false))
    })
    .await?;
    let messages_v = chat.messages_v.max(messages.last().map_or(0, |m| m.seq));
    Ok(Outcome::reply(ServerMessage::ChatMessagesResponse(ChatMessagesResponse {
        chat_id: p.chat_id,
        messages,
        messages_v,
        has_more: has_more || cut,
    })))
}
