//! What several handlers share: limits, the create-or-write path with key resolution, encryption of
//! titles, drafts and messages, and turning store records into wire messages.

use super::Ctx;
use crate::crypto::{Aad, DataKey};
use crate::drafts::DraftLimit;
use crate::error::Error;
use crate::keys::{ChatAccess, ChatKey};
use crate::store::chats::{ChatRecord, MessageRecord, Target, WriteOp, WriteResult};
use crate::store::StoreError;
use chatsync_protocol::{ChatId, ClientTimestamp, MessageContent, MessageId, MessageOut, Versions};
use serde_json::{Map, Value};
use std::sync::Arc;

pub use crate::store::chats::USER_SENDER;

/// Unix seconds of a store timestamp (milliseconds).
pub fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// RFC 3339 (UTC, milliseconds) of a store timestamp.
pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(crate::store::system_time(ms)).to_string()
}

/// The wire versions of a chat record.
pub fn versions(c: &ChatRecord) -> Versions {
    Versions { messages_v: c.messages_v, title_v: c.title_v, draft_v: c.draft_v }
}

/// Checks a title against `max_title_chars`.
pub fn check_title(ctx: &Ctx, title: &str, field: &str) -> Result<(), Error> {
    let max = ctx.limits.max_title_chars as usize;
    if title.chars().count() > max {
        return Err(Error::limit_exceeded(field, format!("The title is longer than max_title_chars ({max}).")));
    }
    Ok(())
}

/// Checks a draft against `Limits::MAX_DRAFT_DEPTH`, `max_draft_chars` and `max_draft_words` (text as in
/// [`crate::drafts::draft_text`]).
pub fn check_draft(ctx: &Ctx, draft: &Map<String, Value>, field: &str) -> Result<(), Error> {
    let (max_chars, max_words) = (ctx.limits.max_draft_chars as usize, ctx.limits.max_draft_words as usize);
    match crate::drafts::check_limits(draft, max_chars, max_words) {
        Ok(()) => Ok(()),
        Err(DraftLimit::Depth) => Err(Error::limit_exceeded(
            field,
            format!(
                "The draft nests objects and arrays deeper than {} levels (the draft depth limit).",
                chatsync_protocol::Limits::MAX_DRAFT_DEPTH
            ),
        )),
        Err(DraftLimit::Chars) => {
            Err(Error::limit_exceeded(field, format!("The draft text is longer than max_draft_chars ({max_chars}).")))
        }
        Err(DraftLimit::Words) => {
            Err(Error::limit_exceeded(field, format!("The draft has more than max_draft_words ({max_words}) words.")))
        }
    }
}

/// Applies `op`, a write of `owner`'s, in the store. A write that fails with `unavailable` may have
/// committed (its answer lost: a connection that broke after the commit, a timeout): what the cache holds
/// of the user is dropped (in a cluster, on every node) and, for a deletion, the chat's unwrapped key is
/// forgotten, so that no read serves what the write may have replaced until the store is asked again.
pub async fn store_write(ctx: &Ctx, owner: &str, op: WriteOp) -> Result<WriteResult, Error> {
    let deleting = match &op {
        WriteOp::DeleteChat { chat_id, .. } => Some(chat_id.clone()),
        _ => None,
    };
    let result = ctx.chats.write(op).await;
    if let Err(StoreError::Unavailable(_)) = &result {
        if let Some(chat_id) = &deleting {
            ctx.keys.deletion_unknown(chat_id);
        }
        ctx.cache.write_unknown(owner, deleting.as_deref()).await;
    }
    Ok(result?)
}

/// Runs a write against a chat of `owner`, creating the chat when the id is new: resolves the chat's
/// key (first from the node's cache, [`crate::keys::Keyring::chat_for_write`]), builds the op (`build`
/// gets the target and the key to encrypt with), starts over, asking the store, if another connection
/// created the chat in the meantime, and merges the resulting chat state into the cache. Absent-and-deleted
/// or foreign chats are `not_found`.
pub async fn write_chat(
    ctx: &Ctx,
    owner: &str,
    chat_id: &str,
    build: impl Fn(Target, &DataKey) -> WriteOp,
) -> Result<WriteResult, Error> {
    for attempt in 0..4 {
        // Taken before the chat is resolved: its key is not memoized if a gap in the cluster's bus comes
        // before the write's end (a deletion elsewhere after the commit may have gone unseen).
        let epoch = ctx.keys.epoch();
        let (access, unconfirmed) = if attempt == 0 {
            ctx.keys.chat_for_write(ctx.chats.as_ref(), ctx.cache.as_ref(), owner, chat_id).await?
        } else {
            (ctx.keys.chat(ctx.chats.as_ref(), owner, chat_id).await?, false)
        };
        // The write's result, the key to memoize once it is known to have been accepted, and whether the
        // write created the chat.
        let (result, accepted, created) = match access {
            ChatAccess::Denied => return Err(Error::chat_not_found(chat_id)),
            ChatAccess::Owned(k) => {
                let result = store_write(ctx, owner, build(Target::Existing, &k.key)).await?;
                let accepted = unconfirmed && !matches!(result, WriteResult::NotFound | WriteResult::Raced);
                (result, accepted.then_some(k), false)
            }
            ChatAccess::New => {
                let (key, wrapped) = ctx.keys.new_chat_key(chat_id);
                let target = Target::Create { key: wrapped, max_chats: ctx.config.max_chats_per_user };
                let result = store_write(ctx, owner, build(target, &key)).await?;
                let created = !matches!(result, WriteResult::Raced | WriteResult::NotFound | WriteResult::ChatLimit);
                (result, created.then(|| Arc::new(ChatKey { owner: owner.to_owned(), key })), created)
            }
        };
        ctx.pauses.at(crate::pause::WRITE_COMMITTED).await;
        if let Some(k) = accepted {
            ctx.keys.confirmed(chat_id, &k, epoch);
        }
        cache_written(ctx, owner, &result, created).await;
        match result {
            WriteResult::Raced => continue,
            // The first answer may have been the cache's, out of date (the chat deleted elsewhere, or
            // another user's): the store's answer is memoized, so later writes are refused from memory.
            WriteResult::NotFound if attempt == 0 => ctx.keys.forget_chat(chat_id),
            WriteResult::NotFound => {
                ctx.keys.forget_chat(chat_id);
                return Err(Error::chat_not_found(chat_id));
            }
            WriteResult::ChatLimit => return Err(Error::chat_limit(chat_id, ctx.config.max_chats_per_user)),
            other => return Ok(other),
        }
    }
    Err(Error::internal("chat creation raced three times"))
}

/// Merges the chat state a write returned into the cache (applied or not: it is the store's truth), unless
/// the chat has been deleted since the write committed: a cache entry made after the deletion (or, in a
/// cluster, another node's) would take the late record for a new chat and list a deleted one. `created`:
/// the write created the chat (see [`crate::cache::Cache::chat_written`]).
pub async fn cache_written(ctx: &Ctx, user_id: &str, result: &WriteResult, created: bool) {
    match result {
        WriteResult::Applied(chat)
        | WriteResult::Conflict(chat)
        | WriteResult::NoDraft(chat)
        | WriteResult::Unchanged(chat)
        | WriteResult::Message { chat, .. }
            if !ctx.keys.is_deleted(&chat.chat_id) =>
        {
            ctx.cache.chat_written(user_id, chat, created).await
        }
        _ => {}
    }
}

/// The key of one of the user's chats, from its record, read at the keyring's `epoch` (taken before the
/// read: see [`crate::keys::Keyring::chat_key_since`]).
pub fn chat_key(ctx: &Ctx, owner: &str, chat: &ChatRecord, epoch: u64) -> Result<Arc<ChatKey>, Error> {
    ctx.keys.chat_key_since(&chat.chat_id, owner, &chat.key, epoch)
}

/// Encrypts a draft (or `None` for no draft) under the user's key.
pub fn seal_draft(key: &DataKey, chat_id: &str, user_id: &str, draft: Option<&Map<String, Value>>) -> Option<Vec<u8>> {
    draft.map(|d| {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(d).expect("a JSON map serializes"));
        key.encrypt(&plain, &Aad::draft(chat_id, user_id))
    })
}

/// Decrypts a stored draft.
pub fn open_draft(
    key: &DataKey,
    chat_id: &str,
    user_id: &str,
    sealed: Option<&[u8]>,
) -> Result<Option<Map<String, Value>>, Error> {
    let Some(sealed) = sealed else { return Ok(None) };
    let plain = key
        .decrypt(sealed, &Aad::draft(chat_id, user_id))
        .map_err(|e| Error::internal(format!("draft of {chat_id}: {e}")))?;
    serde_json::from_slice(&plain).map(Some).map_err(|e| Error::internal(format!("draft of {chat_id}: {e}")))
}

/// Encrypts a title.
pub fn seal_title(key: &DataKey, chat_id: &str, title: &str) -> Vec<u8> {
    key.encrypt(title.as_bytes(), &Aad::title(chat_id))
}

/// Decrypts a stored title (`""` if never set).
pub fn open_title(key: &DataKey, chat_id: &str, sealed: Option<&[u8]>) -> Result<String, Error> {
    let Some(sealed) = sealed else { return Ok(String::new()) };
    let plain =
        key.decrypt(sealed, &Aad::title(chat_id)).map_err(|e| Error::internal(format!("title of {chat_id}: {e}")))?;
    String::from_utf8(plain.to_vec()).map_err(|e| Error::internal(format!("title of {chat_id}: {e}")))
}

/// Encrypts message content (its JSON text).
pub fn seal_content(key: &DataKey, chat_id: &str, message_id: &str, content: &MessageContent) -> Vec<u8> {
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(content).expect("message content serializes"));
    key.encrypt(&plain, &Aad::message(chat_id, message_id))
}

/// Decrypts a stored message into its wire form.
pub fn message_out(key: &DataKey, chat_id: &str, m: &MessageRecord) -> Result<MessageOut, Error> {
    let fail = |e: &dyn std::fmt::Display| Error::internal(format!("message {} of {chat_id}: {e}", m.message_id));
    let plain = key.decrypt(&m.content, &Aad::message(chat_id, &m.message_id)).map_err(|e| fail(&e))?;
    let content: MessageContent = serde_json::from_slice(&plain).map_err(|e| fail(&e))?;
    Ok(MessageOut {
        message_id: MessageId::new(m.message_id.clone()).map_err(|e| fail(&e))?,
        seq: m.seq,
        sender_name: m.sender.clone(),
        content,
        created_at: rfc3339(m.created_at_ms),
        client_timestamp: client_timestamp(m.client_timestamp.as_deref()),
    })
}

/// The stored client timestamp (JSON text) in wire form.
pub fn client_timestamp(stored: Option<&str>) -> Option<ClientTimestamp> {
    stored.and_then(|s| serde_json::from_str(s).ok())
}

/// A chat id from the store (always valid: it was validated on the way in).
pub fn chat_id(id: &str) -> Result<ChatId, Error> {
    ChatId::new(id).map_err(|e| Error::internal(format!("stored chat id {id:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use crate::store::LATEST_MILLIS;

    #[test]
    fn every_stored_time_formats_without_panicking_clamped_to_the_four_digit_years() {
        assert_eq!(rfc3339(LATEST_MILLIS), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(LATEST_MILLIS + 1), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(-1), "1970-01-01T00:00:00.000Z");
        assert_eq!(crate::api::rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
    }
}
