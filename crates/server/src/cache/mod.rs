//! The cache: a fast copy of what initial sync and the read handlers need — each user's chat list
//! (order, versions, encrypted titles and drafts, unread counts), the most recent chats' encrypted
//! messages, and whether the user's warm-up has finished.
//!
//! Architecture invariants:
//! * The cache never holds plaintext or unwrapped keys: only the store's ciphertext records.
//! * The cache never invents a version: every entry is a record the store returned, and merging keeps
//!   the newer version of each component, so a late merge cannot move a version backwards.
//! * A cached chat list is complete (every chat of the user) or absent. A list loaded from the store is
//!   stored only if no write for that user was merged since the load began ([`LoadToken`]).
//! * The cache is best-effort: a miss (or a failing cache) falls back to the store.

pub mod memory;

use crate::store::chats::{ChatRecord, MessageRecord};
use async_trait::async_trait;

/// Proof that nothing was written for a user since a load began (see [`Cache::begin_load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadToken(pub u64);

/// What the server caches per user.
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// The user's complete chat list, most recently edited first, if cached.
    async fn chats(&self, user_id: &str) -> Option<Vec<ChatRecord>>;

    /// Starts a load from the store; pass the token to the `put_*` calls that store its result.
    async fn begin_load(&self, user_id: &str) -> LoadToken;

    /// Stores a complete chat list loaded since `token`; ignored if a write was merged since.
    async fn put_chats(&self, user_id: &str, token: LoadToken, chats: Vec<ChatRecord>) -> bool;

    /// Merges a chat record the store returned after a committed write (never moves a version back).
    async fn chat_written(&self, user_id: &str, chat: &ChatRecord);

    /// Removes a deleted chat and its messages.
    async fn chat_deleted(&self, user_id: &str, chat_id: &str);

    /// The chat's most recent messages (contiguous, oldest first, ending at the chat's latest), if cached.
    async fn messages(&self, user_id: &str, chat_id: &str) -> Option<Vec<MessageRecord>>;

    /// Stores a chat's most recent messages loaded since `token`; ignored if a write was merged since.
    async fn put_messages(&self, user_id: &str, token: LoadToken, chat_id: &str, messages: Vec<MessageRecord>);

    /// Appends a message the store accepted (kept only if it extends the cached run).
    async fn message_added(&self, user_id: &str, chat_id: &str, message: &MessageRecord);

    /// Whether the user's warm-up has finished (and nothing has been evicted since).
    async fn is_primed(&self, user_id: &str) -> bool;

    /// Claims the user's warm-up: `None` if it is primed or being warmed by someone else.
    async fn begin_warm(&self, user_id: &str) -> Option<LoadToken>;

    /// Ends the warm-up claimed by `begin_warm`; `primed` says whether it completed.
    async fn end_warm(&self, user_id: &str, primed: bool);

    /// Drops everything cached for the user (their last connection on this node closed).
    async fn evict(&self, user_id: &str);
}
