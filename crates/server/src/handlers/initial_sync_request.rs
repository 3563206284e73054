//! `initial_sync_request`: brings a (re)connecting client up to date from the versions it has.
//! SELF `initial_sync_response`: ids to delete, new or newer chats (the immediate-view chat first, with
//! the messages the client lacks), and the server's chat order. Failures are `initial_sync_error`.
//!
//! The reply is bounded ("Bounded replies"): it is sent in parts of at most `max_reply_bytes`, `more: true`
//! on all but the last; the lists are split over the parts, `server_chat_order` and `sync_completed_at`
//! (the time of the snapshot) come whole in the last part. It is built from a snapshot of the user's chats
//! taken at once, but each part is decrypted and measured (on the blocking pool) only when the previous
//! one has found room in the connection's queue, so a client reading a big sync slowly holds one part's
//! plaintext in server memory, not the whole reply's.
//!
//! A chat deleted after the snapshot (by another device, while the reply is made) is left out of the
//! parts made after this node knows of the deletion, which it does before it delivers the deletion's
//! `chat_deleted`: no part sent after that event lists the chat again (PROTOCOL.md section 8, "Changes
//! racing a deletion"). A client that named it in `chat_versions` finds it in `chat_ids_to_delete`. A
//! part is checked while it is made (on the blocking pool) and again once it is back, just before the
//! connection queues it: the hop back took milliseconds on a loaded machine, and a `chat_deleted` queued
//! meanwhile came before a part that listed the chat.

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
    // Taken before the snapshot: its keys are not memoized if a gap in the cluster's bus comes meanwhile.
    let epoch = ctx.keys.epoch();
    let chats = user_chats(ctx, &user, &p.chat_versions).await?;
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
    // the sync: the device then sees the streams' messages when they complete. No chunk queued for this
    // connection merges across a stream's `seq` in the snapshot (Outbox::split_chunks_at).
    conn.outbox.hold_chunk_merges();
    let active_streams: Vec<ActiveStream> = match ctx.streams.list(&user).await {
        Ok(streams) => streams.iter().map(|s| s.active()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "open streams unavailable for initial sync; sent without them");
            Vec::new()
        }
    };
    conn.outbox.split_chunks_at(
        active_streams
            .iter()
            .map(|s| (chatsync_protocol::chunk_key(s.chat_id.as_str(), s.stream_id.as_str()), s.seq))
            .collect(),
    );
    ctx.pauses.at(crate::pause::SYNC_STREAMS_LISTED).await;
    let job = SyncJob::new(
        ctx.keys.clone(),
        epoch,
        user,
        user_key,
        chats,
        p.chat_versions,
        immediate,
        active_streams,
        ctx.limits.max_reply_bytes as usize,
    )?;
    // Each part is built on the blocking pool when the previous one has found room (Outcome::lazy).
    let pauses = ctx.pauses.clone();
    let parts = futures_util::stream::unfold(Some(job), move |job| {
        let pauses = pauses.clone();
        async move {
            let mut job = job?;
            let built = off_workers(move || {
                let part = job.next_part();
                Ok((job, part))
            })
            .await;
            match built {
                Ok((job, Ok(Some(mut part)))) => {
                    pauses.at(crate::pause::SYNC_PART).await;
                    // Checked again now that it is back from the blocking pool, just before the connection
                    // queues it: a deletion known since it was made may have queued its `chat_deleted` first.
                    job.leave_out_deleted(&mut part);
                    Some((Ok(ServerMessage::InitialSyncResponse(part)), Some(job)))
                }
                Ok((_, Ok(None))) => None,
                Ok((_, Err(e))) | Err(e) => Some((Err(e), None)),
            }
        }
    });
    Ok(Outcome::lazy(Box::pin(parts)))
}

/// Whether the client lacks something of `chat` (any component newer than it has; `-1` when missing).
fn needs_update(chat: &ChatRecord, known: Option<&ClientVersions>) -> bool {
    let Some(k) = known else { return true };
    let have = |v: Option<i64>| v.unwrap_or(-1);
    chat.title_v as i64 > have(k.title_v)
        || chat.draft_v as i64 > have(k.draft_v)
        || chat.messages_v as i64 > have(k.messages_v)
}

/// The reply in the making, from the snapshot taken when the request was handled: each part is built
/// (decrypted, measured) when it is to be sent, so only one part's plaintext is in memory at a time.
struct SyncJob {
    keys: Arc<Keyring>,
    /// The keyring's epoch before the snapshot was read ([`Keyring::chat_key_since`]).
    epoch: u64,
    user: String,
    user_key: Arc<DataKey>,
    chats: Vec<ChatRecord>,
    chat_versions: BTreeMap<ChatId, ClientVersions>,
    immediate: Option<(String, Vec<MessageRecord>)>,
    budget: usize,
    /// The time of the snapshot (the last part's `sync_completed_at`).
    synced_at: String,
    /// Still to place, in order: the ids to delete, the chats to add or update (indices into `chats`,
    /// the immediate-view chat first), the open streams.
    to_delete: std::vec::IntoIter<ChatId>,
    updates: std::vec::IntoIter<usize>,
    streams: std::vec::IntoIter<ActiveStream>,
    /// An item that did not fit in the previous part, with its size.
    carried: Option<(Item, usize)>,
    /// The server's chat order, whole in the last part (`None` once sent).
    order: Option<Vec<ChatId>>,
}

/// One item of a part.
enum Item {
    Delete(ChatId),
    Update(Box<ChatUpdate>),
    Stream(ActiveStream),
}

impl SyncJob {
    #[allow(clippy::too_many_arguments)]
    fn new(
        keys: Arc<Keyring>,
        epoch: u64,
        user: String,
        user_key: Arc<DataKey>,
        chats: Vec<ChatRecord>,
        chat_versions: BTreeMap<ChatId, ClientVersions>,
        immediate: Option<(String, Vec<MessageRecord>)>,
        active_streams: Vec<ActiveStream>,
        budget: usize,
    ) -> Result<SyncJob, Error> {
        let owned: HashSet<&str> = chats.iter().map(|c| c.chat_id.as_str()).collect();
        let to_delete: Vec<ChatId> = chat_versions.keys().filter(|id| !owned.contains(id.as_str())).cloned().collect();
        let mut updates: Vec<usize> = (0..chats.len())
            .filter(|&i| needs_update(&chats[i], chat_versions.get(chats[i].chat_id.as_str())))
            .collect();
        // The immediate-view chat (the one that carries messages) comes first.
        if let Some((id, _)) = &immediate {
            if let Some(at) = updates.iter().position(|&i| chats[i].chat_id == *id) {
                let first = updates.remove(at);
                updates.insert(0, first);
            }
        }
        let order = chats.iter().map(|c| chat_id(&c.chat_id)).collect::<Result<Vec<_>, _>>()?;
        Ok(SyncJob {
            keys,
            epoch,
            user,
            user_key,
            chats,
            chat_versions,
            immediate,
            budget,
            synced_at: rfc3339(now_millis()),
            to_delete: to_delete.into_iter(),
            updates: updates.into_iter(),
            streams: active_streams.into_iter(),
            carried: None,
            order: Some(order),
        })
    }

    /// The next part (`None` after the last): the lists split over the parts, then the order, whole, and
    /// `sync_completed_at` in the last part (Config::validate makes sure the order fits in one frame).
    fn next_part(&mut self) -> Result<Option<InitialSyncResponse>, Error> {
        let Some(order) = self.order.as_mut() else { return Ok(None) };
        // A chat deleted since the snapshot is left out: its `chat_deleted` may have reached the client
        // already, and the order would show it the chat again.
        let keys = &self.keys;
        order.retain(|id| !keys.is_deleted(id.as_str()));
        let order_size = json_len(&*order);
        let mut part = empty_part();
        let mut packer = Packer::new(self.budget);
        loop {
            let (item, size) = match self.carried.take() {
                Some(carried) => carried,
                None => match self.next_item()? {
                    Some(next) => next,
                    None => break,
                },
            };
            if !packer.fits(size) && !packer.is_empty() {
                self.carried = Some((item, size));
                part.more = true;
                return Ok(Some(part));
            }
            packer.add(size);
            match item {
                Item::Delete(id) => part.chat_ids_to_delete.push(id),
                Item::Update(entry) => part.chats_to_add_or_update.push(*entry),
                Item::Stream(stream) => part.active_streams.push(stream),
            }
        }
        if !packer.fits(order_size) && !packer.is_empty() {
            // The order goes in a part of its own, the next call.
            part.more = true;
            return Ok(Some(part));
        }
        part.server_chat_order = self.order.take().unwrap_or_default();
        part.sync_completed_at = std::mem::take(&mut self.synced_at);
        Ok(Some(part))
    }

    /// Leaves out of a part made the chats deleted since it was made: an entry of a chat the client knew
    /// becomes an id to delete (as when the deletion is known while the part is made), and the chat leaves
    /// the order and the open streams.
    fn leave_out_deleted(&self, part: &mut InitialSyncResponse) {
        let keys = &self.keys;
        let known = &self.chat_versions;
        let mut gone = Vec::new();
        part.chats_to_add_or_update.retain(|e| {
            let deleted = keys.is_deleted(e.chat_id.as_str());
            if deleted && known.contains_key(e.chat_id.as_str()) {
                gone.push(e.chat_id.clone());
            }
            !deleted
        });
        part.chat_ids_to_delete.extend(gone);
        part.server_chat_order.retain(|id| !keys.is_deleted(id.as_str()));
        part.active_streams.retain(|s| !keys.is_deleted(s.chat_id.as_str()));
    }

    /// The next item to place, decrypted, and its size.
    fn next_item(&mut self) -> Result<Option<(Item, usize)>, Error> {
        if let Some(id) = self.to_delete.next() {
            let size = json_len(&id);
            return Ok(Some((Item::Delete(id), size)));
        }
        for i in self.updates.by_ref() {
            let chat = &self.chats[i];
            let known = self.chat_versions.get(chat.chat_id.as_str());
            // Deleted since the snapshot (by another device, while this reply waited or was being made):
            // its `chat_deleted` may have reached the client before this part, which must not bring the
            // chat back. A client that knew it is told to delete it, as for any chat it no longer owns.
            if self.keys.is_deleted(&chat.chat_id) {
                if known.is_some() {
                    let id = chat_id(&chat.chat_id)?;
                    let size = json_len(&id);
                    return Ok(Some((Item::Delete(id), size)));
                }
                continue;
            }
            let entry = self.entry(chat, known)?;
            let size = json_len(&entry);
            return Ok(Some((Item::Update(Box::new(entry)), size)));
        }
        // A stream whose text so far cannot fit in one frame on its own (only text that escapes heavily
        // in JSON can) is left out: the device shows its message when it completes.
        for stream in self.streams.by_ref() {
            // A deleted chat's streams were cancelled (`stream_cancelled` before its `chat_deleted`).
            if self.keys.is_deleted(stream.chat_id.as_str()) {
                continue;
            }
            let size = json_len(&stream);
            if Packer::new(self.budget).fits(size) {
                return Ok(Some((Item::Stream(stream), size)));
            }
            tracing::warn!(chat_id = %stream.chat_id, stream_id = %stream.stream_id, "open stream too large for a sync frame; left out");
        }
        Ok(None)
    }

    /// One `chats_to_add_or_update` entry, decrypted; the immediate-view chat carries its messages, as
    /// many (oldest first) as fit in one frame.
    fn entry(&self, chat: &ChatRecord, known: Option<&ClientVersions>) -> Result<ChatUpdate, Error> {
        let have = |v: Option<i64>| v.unwrap_or(-1);
        let (new_title, new_draft) = match known {
            None => (true, true),
            Some(k) => (chat.title_v as i64 > have(k.title_v), chat.draft_v as i64 > have(k.draft_v)),
        };
        let key = self.keys.chat_key_since(&chat.chat_id, &self.user, &chat.key, self.epoch)?;
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

/// The user's chats, most recent first: the cached list, unless it lacks a chat the client names; then (and on a miss)
/// the store's, cached if no write came meanwhile. The ids a sync tells a device to delete are never
/// taken from a cache alone: a list that missed a chat's creation (on a node that has not noticed a gap
/// in the cluster's bus yet, or by any other fault) would have the device drop a chat that exists, and a
/// client that remembers deletions would then ignore the chat until it starts afresh. A chat that is
/// truly gone (deleted while the device was offline) costs that sync one read of the store.
pub async fn user_chats(
    ctx: &Ctx,
    user_id: &str,
    named: &BTreeMap<ChatId, ClientVersions>,
) -> Result<Vec<ChatRecord>, Error> {
    if let Some(chats) = ctx.cache.chats(user_id).await {
        let holds_named = named.is_empty() || {
            let held: HashSet<&str> = chats.iter().map(|c| c.chat_id.as_str()).collect();
            named.keys().all(|id| held.contains(id.as_str()))
        };
        if holds_named {
            metrics::counter!(crate::metrics::CACHE_LOOKUPS, "result" => "hit").increment(1);
            return Ok(chats);
        }
    }
    metrics::counter!(crate::metrics::CACHE_LOOKUPS, "result" => "miss").increment(1);
    let token = ctx.cache.begin_load(user_id).await;
    let chats = ctx.chats.chats(user_id).await?;
    ctx.cache.put_chats(user_id, token, chats.clone()).await;
    Ok(chats)
}
