//! The chat half of the store: the `ChatStore` trait, its records and its write operations.
//!
//! Everything here is ciphertext: titles, drafts and message contents arrive encrypted (see
//! `crypto.rs`) and leave encrypted. Every write is one [`WriteOp`] executed by [`ChatStore::write`]
//! inside a transaction that also increments the versions (no read-modify-write above the store), and
//! the call returns only once that transaction is durable. Backends may batch concurrent writes into
//! one transaction (group commit); each op still sees the effects of the ops before it.

pub use super::events::NewEvent;
use super::{Millis, StoreError};
use async_trait::async_trait;

/// A data key wrapped by a master key, with the id of that master key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    /// The wrapped key bytes.
    #[serde(with = "super::bytes")]
    pub wrapped: Vec<u8>,
    /// The master key id.
    pub kek_id: String,
}

/// What the store knows about a chat id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatLookup {
    /// The chat exists.
    Exists {
        /// Its owner.
        owner: String,
        /// Its wrapped data key.
        key: WrappedKey,
    },
    /// The chat was deleted; the id is never reused.
    Deleted,
    /// No chat has this id.
    Absent,
}

/// A chat's state (ciphertext fields as stored). Serializable for the cluster bus (ciphertext only).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatRecord {
    /// The chat id.
    pub chat_id: String,
    /// Encrypted title; `None` if never set.
    #[serde(with = "super::bytes::option")]
    pub title: Option<Vec<u8>>,
    /// Encrypted draft; `None` if there is none.
    #[serde(with = "super::bytes::option")]
    pub draft: Option<Vec<u8>>,
    /// Title version.
    pub title_v: u64,
    /// Message count.
    pub messages_v: u64,
    /// Draft version.
    pub draft_v: u64,
    /// Last message or draft change (server clock, never decreasing).
    pub last_edited_ms: Millis,
    /// Messages from other senders (not `"user"`) with a `seq` above `read_seq`.
    pub unread_count: u64,
    /// The owner's read marker: the highest `seq` a device marked read (`mark_read`).
    #[serde(default)]
    pub read_seq: u64,
    /// The chat's wrapped data key.
    pub key: WrappedKey,
}

/// A stored message (content encrypted). Serializable for the cluster bus (ciphertext only).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MessageRecord {
    /// 1-based position in the chat.
    pub seq: u64,
    /// Client-chosen id, unique per chat.
    pub message_id: String,
    /// Encrypted content (JSON text of the content).
    #[serde(with = "super::bytes")]
    pub content: Vec<u8>,
    /// The client's timestamp as sent (JSON text), if any.
    pub client_timestamp: Option<String>,
    /// Server time of acceptance, or the time the application backend gave (`created_at`).
    pub created_at_ms: Millis,
    /// Who wrote it: `"user"` for the owner's devices, the backend's `sender_name` otherwise.
    #[serde(default = "user_sender")]
    pub sender: String,
}

fn user_sender() -> String {
    USER_SENDER.to_owned()
}

/// `sender` of every message from a user's own devices. Messages from any other sender count as unread
/// until the owner marks them read.
pub const USER_SENDER: &str = "user";

/// How a write reaches its chat.
#[derive(Debug, Clone)]
pub enum Target {
    /// The chat is believed to exist and be the writer's (else the write is [`WriteResult::NotFound`]).
    Existing,
    /// The chat is believed to be new: create it with this data key (the payload is encrypted under it).
    /// If it exists by the time the write runs, the result is [`WriteResult::Raced`] (when the writer owns
    /// it: encrypt again under the existing key and retry) or [`WriteResult::NotFound`].
    Create {
        /// The new chat's wrapped data key.
        key: WrappedKey,
        /// The most chats the owner may have: at the limit the write is [`WriteResult::ChatLimit`].
        max_chats: u32,
    },
}

/// One write. `if_version_at_most` (offline sync) applies the change only if the component's current
/// version is at most that value, checked in the same transaction; otherwise [`WriteResult::Conflict`].
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Set the title (`title_v` + 1). Does not touch `last_edited_ms` (except when creating the chat).
    Title {
        /// Writer.
        owner: String,
        /// Chat.
        chat_id: String,
        /// Encrypted title.
        title: Vec<u8>,
        /// Existing or new chat.
        target: Target,
        /// Offline-sync condition on `title_v`.
        if_version_at_most: Option<i64>,
        /// Server clock.
        now: Millis,
    },
    /// Set or clear the draft (`draft_v` + 1, `last_edited_ms` = max(old, now)).
    Draft {
        /// Writer.
        owner: String,
        /// Chat.
        chat_id: String,
        /// Encrypted draft, or `None` to clear.
        draft: Option<Vec<u8>>,
        /// Existing or new chat.
        target: Target,
        /// Offline-sync condition on `draft_v`.
        if_version_at_most: Option<i64>,
        /// Server clock.
        now: Millis,
    },
    /// Clear an existing draft (`draft_v` + 1); [`WriteResult::NoDraft`] when there is none (also for a
    /// chat this op creates, which has no draft).
    DeleteDraft {
        /// Writer.
        owner: String,
        /// Chat.
        chat_id: String,
        /// Existing or new chat (offline sync creates unknown chats; the live message does not).
        target: Target,
        /// Offline-sync condition on `draft_v`.
        if_version_at_most: Option<i64>,
    },
    /// Append a message (`messages_v` + 1, `seq` = new `messages_v`), or report the original when the
    /// `message_id` is already stored ([`WriteResult::Message`] with `duplicate`).
    Message {
        /// Writer.
        owner: String,
        /// Chat.
        chat_id: String,
        /// Client-chosen id.
        message_id: String,
        /// Encrypted content.
        content: Vec<u8>,
        /// Client timestamp as sent (JSON text).
        client_timestamp: Option<String>,
        /// `"user"` ([`USER_SENDER`]) from a device; the backend's sender otherwise (counted as unread).
        sender: String,
        /// The message's time (`now`, or the time an application backend gave).
        created_at: Millis,
        /// Existing or new chat.
        target: Target,
        /// Server clock (`last_edited_ms`).
        now: Millis,
        /// A webhook event (`message.created`) to record for `owner` in the same transaction, with the
        /// new message's `seq`, if the message is stored (not for a duplicate or a refused write).
        event: Option<NewEvent>,
    },
    /// Move the owner's read marker forward to `seq` (capped at `messages_v`) and recount the unread
    /// messages: [`WriteResult::Applied`] if it moved, [`WriteResult::Unchanged`] if `seq` was at or below it.
    MarkRead {
        /// Writer.
        owner: String,
        /// Chat.
        chat_id: String,
        /// The highest seq read.
        seq: u64,
    },
    /// Delete the chat, its messages, its draft and its data key; leave a tombstone.
    DeleteChat {
        /// Writer.
        owner: String,
        /// Chat.
        chat_id: String,
        /// Server clock.
        now: Millis,
        /// A webhook event (`chat.deleted`) to record for `owner` in the same transaction, if the chat
        /// is deleted.
        event: Option<NewEvent>,
    },
    /// Store the user's data key unless one exists; returns the one in force ([`WriteResult::UserKey`]).
    UserKey {
        /// The user.
        user_id: String,
        /// The key to store if the user has none.
        candidate: WrappedKey,
    },
}

/// The outcome of a [`WriteOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    /// Applied; the chat as it is after the write.
    Applied(ChatRecord),
    /// A message op: the chat after the write (for a duplicate: unchanged) and the message's record.
    Message {
        /// The chat.
        chat: ChatRecord,
        /// The message as stored (for a duplicate: the original).
        message: MessageRecord,
        /// The `message_id` was already stored; nothing changed.
        duplicate: bool,
    },
    /// The chat is absent, deleted or another user's; nothing changed.
    NotFound,
    /// [`Target::Create`] found the writer's chat already created; nothing changed.
    Raced,
    /// The offline condition failed; nothing changed. The chat as it is.
    Conflict(ChatRecord),
    /// `DeleteDraft` found no draft; nothing changed.
    NoDraft(ChatRecord),
    /// `DeleteChat` done.
    Deleted,
    /// Nothing to change (`MarkRead` at or below the marker); the chat as it is.
    Unchanged(ChatRecord),
    /// [`Target::Create`] found the owner at `max_chats`; nothing changed.
    ChatLimit,
    /// `UserKey`: the key in force.
    UserKey(WrappedKey),
}

/// Durable truth for chats. Reads see every write that has returned.
#[async_trait]
pub trait ChatStore: Send + Sync + 'static {
    /// Executes one write in a durable transaction (possibly shared with concurrent writes).
    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError>;

    /// What the store knows about `chat_id`, whoever owns it.
    async fn chat_lookup(&self, chat_id: &str) -> Result<ChatLookup, StoreError>;

    /// The user's data key, if one was stored.
    async fn user_key(&self, user_id: &str) -> Result<Option<WrappedKey>, StoreError>;

    /// Every chat of `owner`, most recently edited first (ties by chat id).
    async fn chats(&self, owner: &str) -> Result<Vec<ChatRecord>, StoreError>;

    /// One chat of `owner`; `None` if absent, deleted or another user's.
    async fn chat(&self, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError>;

    /// Up to `limit` messages with `seq > after_seq`, oldest first, plus whether more follow; `None` if
    /// the chat is not `owner`'s.
    async fn messages_after(
        &self,
        owner: &str,
        chat_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>, bool)>, StoreError>;

    /// The `limit` most recent messages, oldest first; `None` if the chat is not `owner`'s.
    async fn latest_messages(
        &self,
        owner: &str,
        chat_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError>;

    /// Every wrapped data key, as (`chat:<id>` or `user:<id>`, key): for master key rotation.
    async fn wrapped_keys(&self) -> Result<Vec<(String, WrappedKey)>, StoreError>;

    /// Replaces wrapped data keys and the master key check value (`from_check`, the one the old master
    /// key was verified against, by `check`) in one transaction (rotation), the new keys being under
    /// `kek_id`. Fails and changes nothing if the stored check value is no longer `from_check` (another
    /// rotation), or if, once the keys are replaced, a stored key is still not under `kek_id`: one stored
    /// after the rotation read the keys (a server or command still running), which would otherwise stay
    /// wrapped under the old master key and lock its owner out.
    async fn rewrap_keys(
        &self,
        keys: &[(String, WrappedKey)],
        from_check: &[u8],
        kek_id: &str,
        check: &[u8],
    ) -> Result<(), StoreError>;

    /// Stores users' wrapped data keys, each unless the user has one, only while the stored master key
    /// check value is still `check` (the value the caller verified its master key against; a rotation
    /// committing meanwhile changes it). PostgreSQL stores them in one transaction; the embedded store in
    /// transactions of 5,000, each checking the value, so that a server's writes on the same file never
    /// wait long. Returns whether it stored them all: `false` when the check value differs or none is
    /// stored (nothing written on PostgreSQL; on the embedded store, the chunks committed before the
    /// rotation stay: like any key stored around a rotation, they are re-wrapped by it, or make it fail
    /// when stored after it read the keys). The users must exist.
    async fn create_user_keys(&self, keys: &[(String, WrappedKey)], check: &[u8]) -> Result<bool, StoreError>;

    /// The stored master key check value, if any.
    async fn key_check(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores the master key check value if none is stored yet.
    async fn init_key_check(&self, check: &[u8]) -> Result<(), StoreError>;

    /// Resolves, with the reason, once the backend can no longer write at all (the SQLite writer died
    /// too often and gave up): the server then stops and exits non-zero. Never resolves by default.
    async fn failed(&self) -> String {
        std::future::pending().await
    }

    /// Sets how long the writer waits, when a write reaches it idle, for more writes to share the
    /// transaction (`--commit-window-us`); backends that batch otherwise ignore it.
    fn set_commit_window(&self, _window: std::time::Duration) {}

    /// Sets how long a batch of writes may take before its writes fail with `unavailable`
    /// (`--store-timeout-secs`; PostgreSQL only: the embedded store's writer cannot lose its database).
    fn set_write_timeout(&self, _timeout: std::time::Duration) {}

    /// Fault injection into the backend's writer, for tests; `None` for backends without one.
    #[doc(hidden)]
    fn writer_faults(&self) -> Option<std::sync::Arc<super::WriterFaults>> {
        None
    }

    /// Batches the writer has begun (counted when it takes a batch's first write, before the commit
    /// window), for tests; `None` for backends without a writer.
    #[doc(hidden)]
    fn batches_begun(&self) -> Option<u64> {
        self.writer_faults().map(|faults| faults.batches())
    }
}

/// The error of a rotation that found another check value than the one it verified its key against.
pub(super) const ROTATED_MEANWHILE: &str =
    "the master key was rotated meanwhile (another `keys rotate`?); nothing was changed";

/// The error of a rotation that found `left` keys it did not re-wrap (stored after it read the keys).
pub(super) fn stored_during_rotation(left: i64) -> String {
    format!(
        "{left} data key(s) were stored after the rotation read the keys (is a server or command still \
         running?); nothing was changed: stop them and rotate again"
    )
}
