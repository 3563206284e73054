//! `request_chat_content_batch`: the most recent messages (at most one page each, oldest first) of up to
//! `max_batch_chats` chats. SELF `chat_content_batch_response`; ids that are not the user's chats
//! (absent, deleted, foreign) are listed in `not_found`.
//!
//! The reply is bounded ("Bounded replies"): the chats are split over parts of at most
//! `max_reply_bytes` (`more: true` on all but the last; `not_found` in the last), and a chat whose page
//! alone would not fit keeps its most recent messages that do. The parts are made lazily, one chat at a
//! time, each once the previous part has found room in the connection's queue: only one chat's page
//! and one part are in memory at once, however slowly the client reads. Decryption runs on the blocking
//! pool, newest message first, and stops at the first that does not fit.
//!
//! A chat deleted after its page was read and before its part is handed over is left out of the part,
//! and named in `not_found` (PROTOCOL.md "Changes racing a deletion": the node knows of a deletion before
//! it delivers its `chat_deleted`, so the device does not get the chat's messages after that).

use super::bounded::{json_len, off_workers, Packer};
use super::common::message_out;
use super::{Ctx, Outcome};
use crate::error::Error;
use crate::keys::{ChatAccess, ChatKey};
use crate::store::chats::MessageRecord;
use chatsync_protocol::{
    ChatContentBatchResponse, ChatId, MessageOut, MessagesVersion, RequestChatContentBatch, ServerMessage,
};
use std::collections::{BTreeMap, HashSet};

/// Handles `request_chat_content_batch`.
pub async fn handle(ctx: &Ctx, conn: &crate::hub::ConnHandle, p: RequestChatContentBatch) -> Result<Outcome, Error> {
    let max = ctx.limits.max_batch_chats as usize;
    if p.chat_ids.len() > max {
        return Err(Error::limit_exceeded("chat_ids", format!("More than max_batch_chats ({max}) chat ids.")));
    }
    let mut seen = HashSet::new();
    let ids: Vec<ChatId> = p.chat_ids.into_iter().filter(|id| seen.insert(id.clone())).collect();
    let budget = ctx.limits.max_reply_bytes as usize;
    let batch = Batch {
        ctx: ctx.clone(),
        user: conn.user_id.clone(),
        ids: ids.into_iter(),
        part: empty(),
        packer: Packer::new(budget),
        budget,
        not_found: Vec::new(),
        done: false,
    };
    Ok(Outcome::lazy(Box::pin(futures_util::stream::unfold(batch, Batch::next_part))))
}

/// The reply in the making.
struct Batch {
    ctx: Ctx,
    user: String,
    /// The chats not looked at yet.
    ids: std::vec::IntoIter<ChatId>,
    part: ChatContentBatchResponse,
    packer: Packer,
    budget: usize,
    not_found: Vec<ChatId>,
    done: bool,
}

/// One chat's share of the reply, and its size in the frame.
struct Entry {
    chat_id: ChatId,
    version: MessagesVersion,
    messages: Vec<MessageOut>,
    size: usize,
}

fn empty() -> ChatContentBatchResponse {
    ChatContentBatchResponse {
        messages_by_chat_id: BTreeMap::new(),
        versions_by_chat_id: BTreeMap::new(),
        not_found: Vec::new(),
        more: false,
    }
}

impl Batch {
    /// The next part (the stream's step): the chats that fit in it, and `not_found` in the last one.
    async fn next_part(mut self) -> Option<(Result<ServerMessage, Error>, Batch)> {
        if self.done {
            return None;
        }
        while let Some(chat_id) = self.ids.next() {
            let entry = match self.entry(chat_id.clone()).await {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    self.not_found.push(chat_id);
                    continue;
                }
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
            };
            let full = (!self.packer.fits(entry.size) && !self.packer.is_empty()).then(|| self.take_part());
            self.packer.add(entry.size);
            self.part.versions_by_chat_id.insert(entry.chat_id.clone(), entry.version);
            self.part.messages_by_chat_id.insert(entry.chat_id, entry.messages);
            if let Some(mut full) = full {
                self.ctx.pauses.at(crate::pause::BATCH_PART).await;
                self.leave_out_deleted(&mut full);
                return Some((Ok(ServerMessage::ChatContentBatchResponse(full)), self));
            }
        }
        let size: usize = self.not_found.iter().map(|id| json_len(id) + 1).sum();
        if !self.packer.fits(size) && !self.packer.is_empty() {
            // `not_found` goes in a part of its own, the next call.
            let mut full = self.take_part();
            self.ctx.pauses.at(crate::pause::BATCH_PART).await;
            self.leave_out_deleted(&mut full);
            return Some((Ok(ServerMessage::ChatContentBatchResponse(full)), self));
        }
        self.done = true;
        let mut last = std::mem::replace(&mut self.part, empty());
        self.ctx.pauses.at(crate::pause::BATCH_PART).await;
        self.leave_out_deleted(&mut last);
        // (The chats left out make the part smaller: `not_found` still fits.)
        last.not_found = std::mem::take(&mut self.not_found);
        Some((Ok(ServerMessage::ChatContentBatchResponse(last)), self))
    }

    /// Ends the current part (`more`: something follows it) and starts the next.
    fn take_part(&mut self) -> ChatContentBatchResponse {
        self.packer.next_part();
        let mut full = std::mem::replace(&mut self.part, empty());
        full.more = true;
        full
    }

    /// Moves the chats of `part` known deleted by now (their `chat_deleted` may have gone out since their
    /// page was read) to `not_found`, which the last part carries.
    fn leave_out_deleted(&mut self, part: &mut ChatContentBatchResponse) {
        let keys = &self.ctx.keys;
        let deleted: Vec<ChatId> =
            part.messages_by_chat_id.keys().filter(|id| keys.is_deleted(id.as_str())).cloned().collect();
        for id in deleted {
            part.messages_by_chat_id.remove(&id);
            part.versions_by_chat_id.remove(&id);
            self.not_found.push(id);
        }
    }

    /// The chat's most recent messages that fit one frame; `None` if it is not the user's chat.
    async fn entry(&self, chat_id: ChatId) -> Result<Option<Entry>, Error> {
        let ctx = &self.ctx;
        let page = ctx.limits.max_page_messages;
        let epoch = ctx.keys.epoch();
        // A cached run ends at the chat's latest message; it answers if it holds a full page or the
        // whole chat. Otherwise the store does.
        let cached = ctx
            .cache
            .messages(&self.user, chat_id.as_str())
            .await
            .filter(|run| run.len() >= page as usize || run.first().is_some_and(|m| m.seq == 1));
        let (key, messages_v, records) = match cached {
            Some(run) => match ctx.keys.chat(ctx.chats.as_ref(), &self.user, chat_id.as_str()).await? {
                ChatAccess::Owned(key) => {
                    let skip = run.len().saturating_sub(page as usize);
                    let messages_v = run.last().map_or(0, |m| m.seq);
                    (key, messages_v, run.into_iter().skip(skip).collect())
                }
                _ => return Ok(None),
            },
            None => match ctx.chats.latest_messages(&self.user, chat_id.as_str(), page).await? {
                Some((chat, records)) => {
                    (ctx.keys.chat_key_since(&chat.chat_id, &self.user, &chat.key, epoch)?, chat.messages_v, records)
                }
                None => return Ok(None),
            },
        };
        let version = MessagesVersion { messages_v };
        // The chat's cost: its id twice, its version, and its messages.
        let fixed = 2 * json_len(&chat_id) + json_len(&version) + 4;
        let budget = self.budget;
        let (messages, size) = if records.is_empty() {
            (Vec::new(), fixed)
        } else {
            let id = chat_id.clone();
            off_workers(move || newest_that_fit(&key, id.as_str(), records, fixed, budget)).await?
        };
        Ok(Some(Entry { chat_id, version, messages, size }))
    }
}

/// Decrypts the most recent messages (kept oldest first) whose total with `fixed` fits one frame, newest
/// first, stopping at the first that does not fit; returns them and that total.
fn newest_that_fit(
    key: &ChatKey,
    chat_id: &str,
    records: Vec<MessageRecord>,
    fixed: usize,
    budget: usize,
) -> Result<(Vec<MessageOut>, usize), Error> {
    let packer = Packer::new(budget);
    let mut total = fixed;
    let mut kept = Vec::new();
    for record in records.iter().rev() {
        let message = message_out(&key.key, chat_id, record)?;
        let size = json_len(&message) + 1;
        if !packer.fits(total + size) {
            break;
        }
        total += size;
        kept.push(message);
    }
    kept.reverse();
    Ok((kept, total))
}
