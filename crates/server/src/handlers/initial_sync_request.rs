//! `initial_sync_request`: brings a (re)connecting client up to date from the versions it has.
//! SELF `initial_sync_response`: ids to delete, new or newer chats (the immediate-view chat first, with
//! the messages the client lacks), and the server's chat order. Failures are `initial_sync_error`.
//!
//! The reply is bounded ("Bounded replies"): it is built (decrypted, measured) on the blocking pool and
//! sent in parts of at most `max_reply_bytes`, `more: true` on all but the last; the lists are split over
//! the parts, `server_chat_order` and `sync_completed_at` come whole in the last part.

use super::bounded::{json_len, off_workers, Packer, ENVELOPE_BYTES};
use super::common::{chat_id, message_out, open_draft, open_title, rfc3339, secs, versions};
use super::{Ctx, Outcome};
use crate::crypto::DataKey;
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::keys::Keyring;
use crate::store::chats::{ChatRecord, MessageRecord};
use crate::store::now_millis;
use chatsync_protocol::{
    ActiveStream, ChatChangeKind, ChatId, ChatUpdate, ClientVersions, InitialSyncRequest, InitialSyncResponse, Limits,
    ServerMessage,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Handles `initial_sync_request`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: InitialSyncRequest) -> Result<Outcome, Error> {
    if p.chat_versions.len() > Limits::MAX_SYNC_CHAT_VERSIONS {
        return Err(Error::limit_exceeded(
            "chat_versions",
            format!("More than {} entries in chat_versions.", Limits::MAX_SYNC_CHAT_VERSIONS),
        ));
    }
    let user = conn.user_id.clone();
    let chats = user_chats(ctx, &user).await?;
    let user_key = ctx.keys.user_key(ctx.chats.as_ref(), &user).await?;
    // The immediate-view chat's missing messages, if it is among the chats the client needs.
    let mut immediate = None;
    if let Some(id) = &p.immediate_view_chat_id {
        if let Some(chat) = chats.iter().find(|c| c.chat_id == id.as_str()) {
            let known = p.chat_versions.get(id);
            if needs_update(chat, known) {
                let after = known.and_then(|k| k.messages_v).unwrap_or(0).max(0) as u64;
                let page = ctx.limits.max_page_messages;
                let records = match ctx.chats.messages_after(&user, &chat.chat_id, after, page).await? {
                    Some((_, records, _)) => records,
                    None => Vec::new(),
                };
                immediate = Some((chat.chat_id.clone(), records));
            }
        }
    }
    // Open streams (SERVER_API.md section 4). Their state being unreachable (Redis down) must not fail
    // the sync: the device then sees the streams' messages when they complete.
    let active_streams = match ctx.streams.list(&user).await {
        Ok(streams) => streams.iter().map(|s| s.active()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "open streams unavailable for initial sync; sent without them");
            Vec::new()
        }
    };
    let job = SyncJob {
        keys: ctx.keys.clone(),
        user,
        user_key,
        chats,
        chat_versions: p.chat_versions,
        immediate,
        active_streams,
        budget: ctx.limits.max_reply_bytes as usize,
    };
    let parts = off_workers(move || job.build()).await?;
    Ok(Outcome::parts(parts.into_iter().map(ServerMessage::InitialSyncResponse).collect()))
}

/// Whether the client lacks something of `chat` (any component newer than it has; `-1` when missing).
fn needs_update(chat: &ChatRecord, known: Option<&ClientVersions>) -> bool {
    let Some(k) = known else { return true };
    let have = |v: Option<i64>| v.unwrap_or(-1);
    chat.title_v as i64 > have(k.title_v)
        || chat.draft_v as i64 > have(k.draft_v)
        || chat.messages_v as i64 > have(k.messages_v)
}

/// Everything the reply is built from, moved to the blocking pool.
struct SyncJob {
    keys: Arc<Keyring>,
    user: String,
    user_key: Arc<DataKey>,
    chats: Vec<ChatRecord>,
    chat_versions: BTreeMap<ChatId, ClientVersions>,
    immediate: Option<(String, Vec<MessageRecord>)>,
    active_streams: Vec<ActiveStream>,
    budget: usize,
}

impl SyncJob {
    /// Decrypts what the client needs and packs it into parts.
    fn build(self) -> Result<Vec<InitialSyncResponse>, Error> {
        let owned: HashSet<&str> = self.chats.iter().map(|c| c.chat_id.as_str()).collect();
        let to_delete: Vec<ChatId> =
            self.chat_versions.keys().filter(|id| !owned.contains(id.as_str())).cloned().collect();

        let mut updates = Vec::new();
        for chat in &self.chats {
            let known = self.chat_versions.get(chat.chat_id.as_str());
            if !needs_update(chat, known) {
                continue;
            }
            let entry = self.entry(chat, known)?;
            if entry.messages.is_some() {
                updates.insert(0, entry);
            } else {
                updates.push(entry);
            }
        }
        let order = self.chats.iter().map(|c| chat_id(&c.chat_id)).collect::<Result<Vec<_>, _>>()?;

        let mut parts = Vec::new();
        let mut part = empty_part();
        let mut packer = Packer::new(self.budget);
        for id in to_delete {
            let size = json_len(&id);
            if !packer.fits(size) {
                parts.push(std::mem::replace(&mut part, empty_part()));
                packer.next_part();
            }
            packer.add(size);
            part.chat_ids_to_delete.push(id);
        }
        for entry in updates {
            let size = json_len(&entry);
            if !packer.fits(size) && !packer.is_empty() {
                parts.push(std::mem::replace(&mut part, empty_part()));
                packer.next_part();
            }
            packer.add(size);
            part.chats_to_add_or_update.push(entry);
        }
        // Open streams, split over the parts like the lists. A stream whose text so far cannot fit in one
        // frame on its own (only text that escapes heavily in JSON can) is left out: the device shows its
        // message when it completes.
        for stream in self.active_streams {
            let size = json_len(&stream);
            if !Packer::new(self.budget).fits(size) {
                tracing::warn!(chat_id = %stream.chat_id, stream_id = %stream.stream_id, "open stream too large for a sync frame; left out");
                continue;
            }
            if !packer.fits(size) && !packer.is_empty() {
                parts.push(std::mem::replace(&mut part, empty_part()));
                packer.next_part();
            }
            packer.add(size);
            part.active_streams.push(stream);
        }
        // The order comes whole in the last part (Config::validate makes sure it fits in one frame).
        if !packer.fits(json_len(&order)) && !packer.is_empty() {
            parts.push(std::mem::replace(&mut part, empty_part()));
        }
        part.server_chat_order = order;
        part.sync_completed_at = rfc3339(now_millis());
        parts.push(part);
        let last = parts.len() - 1;
        for (i, p) in parts.iter_mut().enumerate() {
            p.more = i < last;
        }
        Ok(parts)
    }

    /// One `chats_to_add_or_update` entry, decrypted; the immediate-view chat carries its messages, as
    /// many (oldest first) as fit in one frame.
    fn entry(&self, chat: &ChatRecord, known: Option<&ClientVersions>) -> Result<ChatUpdate, Error> {
        let have = |v: Option<i64>| v.unwrap_or(-1);
        let (new_title, new_draft) = match known {
            None => (true, true),
            Some(k) => (chat.title_v as i64 > have(k.title_v), chat.draft_v as i64 > have(k.draft_v)),
        };
        let key = self.keys.chat_key(&chat.chat_id, &self.user, &chat.key)?;
        let mut entry = ChatUpdate {
            chat_id: chat_id(&chat.chat_id)?,
            kind: if known.is_none() { ChatChangeKind::NewChat } else { ChatChangeKind::UpdatedChat },
            versions: versions(chat),
            last_edited_overall_timestamp: secs(chat.last_edited_ms),
            unread_count: chat.unread_count,
            title: if new_title { Some(open_title(&key.key, &chat.chat_id, chat.title.as_deref())?) } else { None },
            draft_json: if new_draft {
                Some(open_draft(&self.user_key, &chat.chat_id, &self.user, chat.draft.as_deref())?)
            } else {
                None
            },
            messages: None,
        };
        if let Some((_, records)) = self.immediate.as_ref().filter(|(id, _)| *id == chat.chat_id) {
            let mut room = self.budget.saturating_sub(ENVELOPE_BYTES + json_len(&entry) + 16);
            let mut messages = Vec::new();
            for record in records {
                let message = message_out(&key.key, &chat.chat_id, record)?;
                let size = json_len(&message) + 1;
                if size > room {
                    break;
                }
                room -= size;
                messages.push(message);
            }
            entry.messages = Some(messages);
        }
        Ok(entry)
    }
}

fn empty_part() -> InitialSyncResponse {
    InitialSyncResponse {
        chat_ids_to_delete: Vec::new(),
        chats_to_add_or_update: Vec::new(),
        server_chat_order: Vec::new(),
        sync_completed_at: String::new(),
        active_streams: Vec::new(),
        more: false,
    }
}

/// The user's chats, most recent first: from the cache, else from the store (then cached).
pub async fn user_chats(ctx: &Ctx, user_id: &str) -> Result<Vec<ChatRecord>, Error> {
    if let Some(chats) = ctx.cache.chats(user_id).await {
        metrics::counter!(crate::metrics::CACHE_LOOKUPS, "result" => "hit").increment(1);
        return Ok(chats);
    }
    metrics::counter!(crate::metrics::CACHE_LOOKUPS, "result" => "miss").increment(1);
    let token = ctx.cache.begin_load(user_id).await;
    let chats = ctx.chats.chats(user_id).await?;
    ctx.cache.put_chats(user_id, token, chats.clone()).await;
    Ok(chats)
}
