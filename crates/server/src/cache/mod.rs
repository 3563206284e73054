//! The cache: a fast copy of what initial sync and the read handlers need — each user's chat list
//! (order, versions, encrypted titles and drafts, unread counts), the most recent chats' encrypted
//! messages, and whether the user's warm-up has finished.
//!
//! Architecture invariants (ARCHITECTURE.md repeats them):
//! * The cache never holds plaintext or unwrapped keys: only the store's ciphertext records.
//! * The cache never invents a version: every entry is a record the store returned, and merging keeps
//!   the newer version of each component, so a late merge cannot move a version backwards.
//! * A user's entry exists exactly while the user has at least one connection on this node
//!   ([`Cache::attach`] / [`Cache::detach`]); nothing else creates one, so no entry outlives its user's
//!   connections. Dropping the entry cancels its warm-up.
//! * A cached chat list is complete (every chat of the user) or absent. A list loaded from the store is
//!   stored only if no write for that user was merged since the load began ([`LoadToken`]). Tokens are
//!   drawn from one counter for the whole cache, so a load begun before an entry was dropped can never
//!   match the entry that replaces it.
//! * A deleted chat never comes back: the entry remembers the ids deleted while it lives, and a write
//!   result merged after the delete (a write that committed just before it) is ignored for those ids.
//!   The memory is bounded: past [`memory::MAX_DELETED`] ids, the entry forgets them and caches no chat
//!   list for the rest of its life.
//! * A write whose outcome is unknown (`unavailable`) drops what is cached of its user
//!   ([`Cache::write_unknown`]): the store may hold what it wrote. For a deletion, the chat is uncertain
//!   while the entry lives: a write result for it is merged into a list that holds it and never inserted
//!   (the lists are dropped instead), so a deleted chat does not come back this way either.
//! * The cache is best-effort: a miss (or a failing cache) falls back to the store.

pub mod coherent;
pub mod memory;

use crate::store::chats::{ChatRecord, MessageRecord, WrappedKey};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// Proof that nothing was written for a user since a load began (see [`Cache::begin_load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadToken(pub u64);

impl LoadToken {
    /// A token that matches no entry (the user had no entry when the load began).
    pub const NEVER: LoadToken = LoadToken(0);
}

/// The claim on a user's warm-up returned by [`Cache::begin_warm`].
#[derive(Debug, Clone)]
pub struct WarmClaim {
    /// Identifies this claim (for [`Cache::end_warm`]).
    pub id: u64,
    /// For the loads of the warm-up.
    pub token: LoadToken,
    /// Cancelled when the user's last connection on this node closes.
    pub cancelled: CancellationToken,
}

/// What the server caches per user.
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// A connection of the user opened on this node (creates the user's entry on the first).
    async fn attach(&self, user_id: &str);

    /// A connection of the user closed; after the last, the entry is dropped and its warm-up cancelled.
    async fn detach(&self, user_id: &str);

    /// The user's complete chat list, most recently edited first, if cached.
    async fn chats(&self, user_id: &str) -> Option<Vec<ChatRecord>>;

    /// The wrapped key of one chat of the user's cached list: `None` if the list is not cached,
    /// `Some(None)` if it is and holds no such chat.
    async fn chat_key(&self, user_id: &str, chat_id: &str) -> Option<Option<WrappedKey>>;

    /// Starts a load from the store; pass the token to the `put_*` calls that store its result.
    async fn begin_load(&self, user_id: &str) -> LoadToken;

    /// Stores a complete chat list loaded since `token`; ignored if a write was merged since.
    async fn put_chats(&self, user_id: &str, token: LoadToken, chats: Vec<ChatRecord>) -> bool;

    /// Merges a chat record the store returned after a committed write (never moves a version back,
    /// never brings back a chat deleted meanwhile).
    /// `created`: this write created the chat; only such a record adds a chat the cached list lacks (any
    /// other is of a chat that existed before the write: its creation not merged yet, or a deletion
    /// before the list was loaded, which only the store can tell apart).
    async fn chat_written(&self, user_id: &str, chat: &ChatRecord, created: bool);

    /// Removes a deleted chat and its messages, for good.
    async fn chat_deleted(&self, user_id: &str, chat_id: &str);

    /// A write of the user failed with its outcome unknown (`unavailable`: it may have committed, its
    /// answer lost): drops what is cached for the user (in a cluster, on every node), so that reads go to
    /// the store, and its next load is cached, instead of serving what the write may have replaced. For a
    /// deletion (`deleting`), a cluster's other nodes also forget the chat's unwrapped key (the caller
    /// forgets this node's).
    async fn write_unknown(&self, user_id: &str, deleting: Option<&str>);

    /// The chat's most recent messages (contiguous, oldest first, ending at the chat's latest), if cached.
    async fn messages(&self, user_id: &str, chat_id: &str) -> Option<Vec<MessageRecord>>;

    /// Stores a chat's most recent messages loaded since `token`; ignored if a write was merged since.
    async fn put_messages(&self, user_id: &str, token: LoadToken, chat_id: &str, messages: Vec<MessageRecord>);

    /// Appends a message the store accepted (kept only if it extends the cached run).
    async fn message_added(&self, user_id: &str, chat_id: &str, message: &MessageRecord);

    /// Whether the user's warm-up has finished (and nothing has been evicted since).
    async fn is_primed(&self, user_id: &str) -> bool;

    /// Claims the user's warm-up: `None` if the user has no entry, or it is primed, being warmed, or caches
    /// no list (see [`memory::MAX_DELETED`]).
    async fn begin_warm(&self, user_id: &str) -> Option<WarmClaim>;

    /// Ends the warm-up `claim`; `primed` says whether it completed. Ignored if the claim is stale.
    async fn end_warm(&self, user_id: &str, claim: &WarmClaim, primed: bool);
}
