//! The keyring: resolves chats and users to their unwrapped data keys, creating keys for new chats and
//! users, and keeps unwrapped keys in process memory only (zeroized on drop; never in the cache or logs).
//!
//! A chat id's owner never changes (ids are never reused), so a resolved (chat → owner, key) pair can
//! be kept for the life of the process; deleting a chat forgets it here, and the store drops the row
//! that held its wrapped key (crypto-shredding).

use crate::crypto::{DataKey, MasterKey};
use crate::error::Error;
use crate::store::chats::{ChatLookup, ChatStore, WrappedKey, WriteOp, WriteResult};
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Unwrapped keys kept at most; past it the memo is cleared (keys are re-unwrapped on demand).
const MAX_KEYS: usize = 200_000;
/// Deleted chat ids remembered at most; past it the older half is forgotten (never the latest ones: a
/// request that resolved a key just before its chat's deletion must still find it there).
const MAX_DELETED: usize = 200_000;

/// A chat's owner and unwrapped key.
pub struct ChatKey {
    /// The owner.
    pub owner: String,
    /// The data key.
    pub key: DataKey,
}

/// What a user may do with a chat id.
pub enum ChatAccess {
    /// The user's chat, with its key.
    Owned(Arc<ChatKey>),
    /// No chat has this id yet: a write creates it.
    New,
    /// Another user's, or deleted: `not_found`.
    Denied,
}

/// Master key plus memoized unwrapped data keys.
pub struct Keyring {
    master: MasterKey,
    chats: DashMap<String, Arc<ChatKey>>,
    users: DashMap<String, Arc<DataKey>>,
    /// Chats deleted (through this node, or in a cluster announced on the bus), with their deletion's
    /// number: their keys are never memoized again, even by a request that resolved the key before the
    /// delete and finishes after it (crypto-shredding holds in memory too).
    deleted: DashMap<String, u64>,
    /// Chats whose deletion failed with its outcome unknown (it may have committed), with when: their
    /// keys are not memoized (a request that resolved the key before may finish after) until a store
    /// lookup that began [`Keyring::settle`] after the mark finds the chat (the deletion did not commit).
    uncertain: DashMap<String, std::time::Instant>,
    /// How long after a write failed with its outcome unknown the store surely shows its outcome: the
    /// store's timeout and the writer's grace for an answer, with a margin (a commit can land after the
    /// writer gave up on it: a slow flush, a batch still on the wire).
    settle: std::time::Duration,
    /// Deletions counted so far.
    deletions: AtomicU64,
    /// Bumped by every [`Keyring::forget_all`] (a gap in the cluster's bus), and by the recheck after
    /// one: a key resolved from what was read before either is not memoized after it
    /// ([`Keyring::chat_key_since`]).
    epoch: AtomicU64,
    /// Set by [`Keyring::forget_all`]: [`Keyring::settle`] after the last gap, every chat key is forgotten
    /// once more. A deletion of unknown outcome announced in the gap was lost with it, so no chat is
    /// marked uncertain, and such a deletion may still commit after a lookup here found the chat; once
    /// the store surely shows every outcome, the keys are resolved from it again. Checked on every
    /// [`Keyring::epoch`] (every request: a node that serves none keeps such a key until its next).
    recheck_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether `recheck_at` holds a time (read without the lock).
    recheck_pending: std::sync::atomic::AtomicBool,
    /// [`MAX_DELETED`].
    max_deleted: usize,
}

fn chat_ref(chat_id: &str) -> String {
    format!("chat:{chat_id}")
}

fn user_ref(user_id: &str) -> String {
    format!("user:{user_id}")
}

impl Keyring {
    /// A keyring over `master`.
    pub fn new(master: MasterKey) -> Keyring {
        Keyring::with_max_deleted(master, MAX_DELETED)
    }

    fn with_max_deleted(master: MasterKey, max_deleted: usize) -> Keyring {
        Keyring {
            master,
            chats: DashMap::new(),
            users: DashMap::new(),
            deleted: DashMap::new(),
            uncertain: DashMap::new(),
            settle: std::time::Duration::from_secs(60),
            deletions: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            recheck_at: std::sync::Mutex::new(None),
            recheck_pending: std::sync::atomic::AtomicBool::new(false),
            max_deleted,
        }
    }

    /// Sets [`Keyring::settle`] (60 s unless set): the store's timeout plus a margin.
    pub fn with_settle(mut self, settle: std::time::Duration) -> Keyring {
        self.settle = settle;
        self
    }

    /// The master key.
    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    /// What memory alone says of `chat_id` for `user_id`: `None` if it has no word on it.
    fn memoized(&self, user_id: &str, chat_id: &str) -> Option<ChatAccess> {
        if self.deleted.contains_key(chat_id) {
            return Some(ChatAccess::Denied);
        }
        let k = self.chats.get(chat_id)?;
        Some(if k.owner == user_id { ChatAccess::Owned(k.clone()) } else { ChatAccess::Denied })
    }

    /// Resolves `chat_id` for `user_id`.
    pub async fn chat(&self, store: &dyn ChatStore, user_id: &str, chat_id: &str) -> Result<ChatAccess, Error> {
        if let Some(access) = self.memoized(user_id, chat_id) {
            return Ok(access);
        }
        let began = std::time::Instant::now();
        // Before the lookup: a gap that comes while it runs may hide the chat's deletion elsewhere.
        let epoch = self.epoch();
        match store.chat_lookup(chat_id).await? {
            ChatLookup::Absent => Ok(ChatAccess::New),
            ChatLookup::Deleted => Ok(ChatAccess::Denied),
            ChatLookup::Exists { owner, key } => {
                // Marked uncertain long enough before this lookup began: the deletion did not commit.
                self.uncertain.remove_if(chat_id, |_, marked| began.saturating_duration_since(*marked) >= self.settle);
                let k = self.chat_key_since(chat_id, &owner, &key, epoch)?;
                Ok(if k.owner == user_id { ChatAccess::Owned(k) } else { ChatAccess::Denied })
            }
        }
    }

    /// Resolves `chat_id` for `user_id` for a write, from the user's chat list as this node's cache holds
    /// it when it holds it, else as [`Keyring::chat`] does, from the store. The cached list is the user's
    /// own and complete, so it spares the store a lookup; it may miss a chat another node created a moment
    /// ago, or still hold one deleted there, which the write itself then finds out (a creation that finds
    /// the chat is `Raced`, a change of a deleted chat `NotFound`): the caller retries such a write with
    /// [`Keyring::chat`]. A key taken from the cache is not memoized here (the chat may be deleted
    /// already), and the second value says so: the caller memoizes it with [`Keyring::confirmed`] once the
    /// store has accepted a write to the chat.
    pub async fn chat_for_write(
        &self,
        store: &dyn ChatStore,
        cache: &dyn crate::cache::Cache,
        user_id: &str,
        chat_id: &str,
    ) -> Result<(ChatAccess, bool), Error> {
        if let Some(access) = self.memoized(user_id, chat_id) {
            return Ok((access, false));
        }
        match cache.chat_key(user_id, chat_id).await {
            Some(Some(wrapped)) => {
                let key = self.unwrap(&wrapped, &chat_ref(chat_id))?;
                Ok((ChatAccess::Owned(Arc::new(ChatKey { owner: user_id.to_owned(), key })), true))
            }
            Some(None) => Ok((ChatAccess::New, false)),
            None => Ok((self.chat(store, user_id, chat_id).await?, false)),
        }
    }

    /// The current epoch: take it before reading the chat records whose keys [`Keyring::chat_key_since`]
    /// will resolve (every key resolved from a record is: a record read before a gap may be of a chat
    /// deleted elsewhere in it).
    pub fn epoch(&self) -> u64 {
        if self.recheck_pending.load(Ordering::SeqCst) {
            self.recheck_if_due(std::time::Instant::now());
        }
        self.epoch.load(Ordering::SeqCst)
    }

    /// The recheck after a gap, once it is due (`now`): every chat key is forgotten, and the epoch bumped
    /// so that nothing read before is memoized after it.
    fn recheck_if_due(&self, now: std::time::Instant) {
        let mut recheck_at = self.recheck_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recheck_at.is_some_and(|at| now >= at) {
            *recheck_at = None;
            self.recheck_pending.store(false, Ordering::SeqCst);
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.chats.clear();
        }
    }

    /// The key of a chat whose record (and wrapped key) the caller read at `epoch` (or later): the key is
    /// memoized only if no gap came since (a chat deleted elsewhere unseen in the gap must not be memoized from an older record;
    /// an initial sync builds its parts from its snapshot for as long as the client takes to read them).
    pub fn chat_key_since(
        &self,
        chat_id: &str,
        owner: &str,
        wrapped: &WrappedKey,
        epoch: u64,
    ) -> Result<Arc<ChatKey>, Error> {
        if let Some(k) = self.chats.get(chat_id) {
            return Ok(k.clone());
        }
        let k = Arc::new(ChatKey { owner: owner.to_owned(), key: self.unwrap(wrapped, &chat_ref(chat_id))? });
        self.memo_since(chat_id, &k, epoch);
        Ok(k)
    }

    /// A fresh key for a new chat, and its wrapped form to store.
    pub fn new_chat_key(&self, chat_id: &str) -> (DataKey, WrappedKey) {
        let key = DataKey::generate();
        let wrapped =
            WrappedKey { wrapped: self.master.wrap(&key, &chat_ref(chat_id)), kek_id: self.master.id().to_owned() };
        (key, wrapped)
    }

    /// Memoizes the key of a chat the store has just accepted a write to, or that the caller just created,
    /// unless it was deleted here since or a gap came since `epoch` (taken before the write resolved the
    /// chat: a chat deleted elsewhere unseen in the gap, after the write committed, must not stay in
    /// memory).
    pub fn confirmed(&self, chat_id: &str, key: &Arc<ChatKey>, epoch: u64) {
        self.memo_since(chat_id, key, epoch);
    }

    /// Forgets a chat's memoized key (it may be resolved again from the store).
    pub fn forget_chat(&self, chat_id: &str) {
        self.chats.remove(chat_id);
    }

    /// A deletion of the chat failed with its outcome unknown (here, or in a cluster on any node): its key
    /// is forgotten and not memoized again while the chat is remembered as uncertain (bounded as the
    /// deleted ids are), so that no request that resolved it before keeps it in memory if the deletion
    /// did commit. The chat is resolved from the store until a lookup that began [`Keyring::settle`] after
    /// this finds it.
    pub fn deletion_unknown(&self, chat_id: &str) {
        let now = std::time::Instant::now();
        self.uncertain.entry(chat_id.to_owned()).and_modify(|marked| *marked = (*marked).max(now)).or_insert(now);
        self.chats.remove(chat_id);
        if self.uncertain.len() > self.max_deleted {
            // The older half goes (their deletions have long been settled in the store).
            let mut times: Vec<std::time::Instant> = self.uncertain.iter().map(|e| *e.value()).collect();
            times.sort_unstable();
            let keep_from = times[times.len() / 2];
            self.uncertain.retain(|_, marked| *marked >= keep_from);
        }
    }

    /// Forgets every memoized key (they are unwrapped again on demand). Cluster mode calls it after a gap
    /// in the bus, when chats may have been deleted on other nodes unseen; and once more
    /// [`Keyring::settle`] later (a deletion of unknown outcome lost in the gap may commit meanwhile).
    pub fn forget_all(&self) {
        {
            let at = std::time::Instant::now() + self.settle;
            let mut recheck_at = self.recheck_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *recheck_at = Some(recheck_at.map_or(at, |t| t.max(at)));
            self.recheck_pending.store(true, Ordering::SeqCst);
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.chats.clear();
        self.users.clear();
    }

    /// Whether the chat's unwrapped key is memoized here (for tests of crypto-shredding).
    #[doc(hidden)]
    pub fn holds_key(&self, chat_id: &str) -> bool {
        self.chats.contains_key(chat_id)
    }

    /// Whether `chat_id` is among the chats known deleted (through this node, or announced on the bus by
    /// any node; the latest [`MAX_DELETED`] at least). Deleted ids are never reused, so any record of one
    /// is out of date.
    pub fn is_deleted(&self, chat_id: &str) -> bool {
        self.deleted.contains_key(chat_id)
    }

    /// Forgets a deleted chat, for good: its key is never memoized again (a deletion through this node, or
    /// in a cluster one announced on the bus by any node).
    pub fn chat_deleted(&self, chat_id: &str) {
        let n = self.deletions.fetch_add(1, Ordering::Relaxed);
        self.deleted.insert(chat_id.to_owned(), n);
        self.chats.remove(chat_id);
        if self.deleted.len() > self.max_deleted {
            let keep_from = n.saturating_sub(self.max_deleted as u64 / 2);
            self.deleted.retain(|_, deletion| *deletion >= keep_from);
        }
    }

    /// Memoizes `key` unless the chat is deleted (or its deletion uncertain) or a gap (or the recheck
    /// after one) came since `epoch`.
    fn memo_since(&self, chat_id: &str, key: &Arc<ChatKey>, epoch: u64) {
        self.trim();
        let refused =
            || self.epoch() != epoch || self.deleted.contains_key(chat_id) || self.uncertain.contains_key(chat_id);
        if !refused() {
            self.chats.insert(chat_id.to_owned(), key.clone());
            // A delete (or one of unknown outcome, or a gap: forget_all bumps the epoch, then clears)
            // between the check and the insert: take it out again.
            if refused() {
                self.chats.remove(chat_id);
            }
        }
    }

    /// The user's data key (for drafts), created on first use.
    pub async fn user_key(&self, store: &dyn ChatStore, user_id: &str) -> Result<Arc<DataKey>, Error> {
        self.user_key_or_why(store, user_id).await.map_err(|e| match e {
            UserKeyError::Store(e) | UserKeyError::Unwrap(e) => e,
        })
    }

    /// [`Keyring::user_key`], telling a store that failed (which may answer later) from a stored key
    /// that does not open under the master key (which never will).
    pub async fn user_key_or_why(&self, store: &dyn ChatStore, user_id: &str) -> Result<Arc<DataKey>, UserKeyError> {
        if let Some(k) = self.users.get(user_id) {
            return Ok(k.clone());
        }
        let wrapped = self.stored_or_created(store, user_id).await.map_err(UserKeyError::Store)?;
        if wrapped.kek_id != self.master.id() {
            // Wrapped under another master key (this node left running through a rotation): the store is
            // ahead of this node, not broken; another node, or this one restarted, can open it.
            return Err(UserKeyError::Store(Error::internal(format!(
                "the key of user {user_id} is wrapped under master key {}, this node has {}",
                wrapped.kek_id,
                self.master.id()
            ))));
        }
        let key = Arc::new(self.unwrap(&wrapped, &user_ref(user_id)).map_err(UserKeyError::Unwrap)?);
        self.trim();
        self.users.insert(user_id.to_owned(), key.clone());
        Ok(key)
    }

    /// Creates the user's data key now unless it exists, without keeping it in memory: called where the
    /// server creates a user (`POST /v1/api/users`, a JWT's first connection), so that the user's first
    /// write only reads its key instead of creating it in a transaction of its own (BENCHMARKS.md, sixth
    /// session: that creation held the cluster's cold start). Under the master key the server checked
    /// against the store at start (a rotation runs with the servers stopped; commands that create users
    /// use [`create_user_keys`], which checks the key itself). Best effort: a
    /// failure is logged, and the user's first write creates the key, as it would have.
    pub async fn ensure_user_key(&self, store: &dyn ChatStore, user_id: &str) {
        if self.users.contains_key(user_id) {
            return;
        }
        if let Err(e) = self.stored_or_created(store, user_id).await {
            tracing::warn!(%user_id, code = %e.code(), detail = e.internal_detail().unwrap_or(""), "could not create the new user's data key yet");
        }
    }

    /// The user's wrapped data key from the store, created there (under the master key) if it has none.
    async fn stored_or_created(&self, store: &dyn ChatStore, user_id: &str) -> Result<WrappedKey, Error> {
        if let Some(w) = store.user_key(user_id).await? {
            return Ok(w);
        }
        let candidate = WrappedKey {
            wrapped: self.master.wrap(&DataKey::generate(), &user_ref(user_id)),
            kek_id: self.master.id().to_owned(),
        };
        // Insert-if-missing: whoever created it first (another node, a concurrent first write) wins.
        match store.write(WriteOp::UserKey { user_id: user_id.to_owned(), candidate }).await? {
            WriteResult::UserKey(w) => Ok(w),
            other => Err(Error::internal(format!("unexpected user key result {other:?}"))),
        }
    }

    fn unwrap(&self, wrapped: &WrappedKey, key_ref: &str) -> Result<DataKey, Error> {
        self.master
            .unwrap(&wrapped.wrapped, key_ref)
            .map_err(|e| Error::internal(format!("cannot unwrap {key_ref} (kek {}): {e}", wrapped.kek_id)))
    }

    fn trim(&self) {
        if self.chats.len() + self.users.len() > MAX_KEYS {
            self.chats.clear();
            self.users.clear();
        }
    }
}

/// Why [`Keyring::user_key_or_why`] has no key.
#[derive(Debug)]
pub enum UserKeyError {
    /// Reading (or creating) the wrapped key in the store failed, or the key is wrapped under another
    /// master key than this node's.
    Store(Error),
    /// The stored key, wrapped under this node's master key, does not open.
    Unwrap(Error),
}

/// What [`create_user_keys`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserKeys {
    /// Stored (users that had a key keep theirs).
    Stored,
    /// No master key check value is stored yet (no server has started on this store): the keys are
    /// left to the users' first writes, under the master key the first server fixes.
    NotServedYet,
    /// The master key given cannot open this store: nothing stored.
    OtherMasterKey,
    /// A rotation committed between the check and the insert: nothing stored (on the embedded store,
    /// which stores 5,000 keys per transaction, the chunks stored before it may stay; see
    /// `ChatStore::create_user_keys`).
    RotatedMeanwhile,
}

/// Creates the data keys of users a command just created (`users add`, `sessions issue-bulk`), so that
/// their first writes only read them instead of creating them, as the server does for users it creates
/// ([`Keyring::ensure_user_key`]). A key wrapped under any master key but the store's would lock its
/// user out, so `master` is first verified against the store's check value, and the keys are stored
/// only if that value is still the same when they commit (a rotation in between changes it). Whatever
/// this does not store, the users' first writes create, as before.
pub async fn create_user_keys(
    master: &MasterKey,
    store: &dyn ChatStore,
    user_ids: &[String],
) -> Result<UserKeys, crate::store::StoreError> {
    let Some(check) = store.key_check().await? else { return Ok(UserKeys::NotServedYet) };
    if master.verify_check(&check).is_err() {
        return Ok(UserKeys::OtherMasterKey);
    }
    let keys: Vec<(String, WrappedKey)> = user_ids
        .iter()
        .map(|user_id| {
            let wrapped = master.wrap(&DataKey::generate(), &user_ref(user_id));
            (user_id.clone(), WrappedKey { wrapped, kek_id: master.id().to_owned() })
        })
        .collect();
    Ok(if store.create_user_keys(&keys, &check).await? { UserKeys::Stored } else { UserKeys::RotatedMeanwhile })
}

/// The master key if one is configured (`CHATSYNC_MASTER_KEY`, else an existing `<data_dir>/master.key`),
/// without creating one: for commands that only need to derive from it. A `master.key` symlink to a
/// missing file is an error, as at the server's start (not "no key": the key is lost, not absent).
pub fn existing_master_key(data_dir: &std::path::Path, env_value: Option<&str>) -> anyhow::Result<Option<MasterKey>> {
    let absent =
        std::fs::symlink_metadata(data_dir.join("master.key")).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
    if env_value.is_none() && absent {
        return Ok(None);
    }
    Ok(Some(MasterKey::load_or_create(data_dir, env_value)?.0))
}

/// Loads the master key (`CHATSYNC_MASTER_KEY`, else `<data_dir>/master.key`, created on first start)
/// and checks it against the store: a key that cannot unwrap the stored keys is refused with a clear
/// message. On a store without a check value yet, this key's is stored if none is by then, and read back
/// (another server may have stored its own first); a `master.key.next` is then left alone. What an interrupted rotation (see [`RotationStep`]) left behind is cleaned up: a
/// `master.key.next` that the store was re-wrapped under is moved into place; one that it was not (the
/// rotation stopped before its transaction committed) is removed. The caller holds the data directory
/// lock ([`crate::datadir::DataDirLock`]).
pub async fn load_master_key(
    data_dir: &std::path::Path,
    env_value: Option<&str>,
    store: &dyn ChatStore,
) -> anyhow::Result<MasterKey> {
    use anyhow::Context as _;
    let (master, created) = MasterKey::load_or_create(data_dir, env_value)?;
    let next = data_dir.join(NEXT_KEY_FILE);
    let (check, fresh) = match store.key_check().await? {
        Some(check) => (check, false),
        None => {
            store.init_key_check(&master.check_value()).await?;
            // Read back and verified below like any stored value: another server starting on the same
            // fresh store at the same moment (a cluster's nodes, each with a key of its own) may have
            // stored its check value first, and this node would then wrap keys that no other opens.
            (store.key_check().await?.context("the store has no master key check value")?, true)
        }
    };
    // A store that had no check value says nothing about a `master.key.next`: it may be the only copy of
    // the key of another store, whose rotation was interrupted (a data directory pointed at a new
    // database meanwhile). It is left alone.
    let next_is_ours = !fresh && env_value.is_none() && next.exists();
    if master.verify_check(&check).is_ok() {
        if next_is_ours {
            // The store is still under master.key: the new key never wrapped anything committed.
            std::fs::remove_file(&next)?;
            crate::datadir::sync_dir(data_dir)?;
            tracing::warn!(
                "discarded master.key.next left by a key rotation interrupted before it re-wrapped the store"
            );
        }
        return Ok(master);
    }
    if next_is_ours {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(&next)?);
        if let Ok(candidate) = MasterKey::from_base64(&text) {
            if candidate.verify_check(&check).is_ok() {
                std::fs::rename(&next, data_dir.join(KEY_FILE))?;
                crate::datadir::sync_dir(data_dir)?;
                tracing::warn!("completed an interrupted key rotation: master.key.next is now master.key");
                return Ok(candidate);
            }
        }
    }
    if created {
        // A key this start made, for a store that has one already (its key file lost or moved, the data
        // directory pointed at another node's database): it never encrypted anything, and left in place
        // it would pass for the key of this data (backed up, copied to other nodes).
        std::fs::remove_file(data_dir.join(KEY_FILE))?;
        crate::datadir::sync_dir(data_dir)?;
        anyhow::bail!(
            "{} did not exist, and the stored data keys are wrapped under another master key: configure the \
             master key this database was created or last rotated with (the new key this start created was \
             removed)",
            data_dir.join(KEY_FILE).display()
        );
    }
    let source = if env_value.is_some() {
        "CHATSYNC_MASTER_KEY".to_owned()
    } else {
        data_dir.join(KEY_FILE).display().to_string()
    };
    anyhow::bail!(
        "the master key from {source} (id {}) cannot unwrap the stored data keys; \
         configure the master key this database was created or last rotated with",
        master.id()
    )
}

/// The master key file in the data directory.
const KEY_FILE: &str = "master.key";
/// Where `keys rotate` writes the new master key before the store is re-wrapped under it.
const NEXT_KEY_FILE: &str = "master.key.next";

/// The steps of `keys rotate` with a key file, in order (with `CHATSYNC_MASTER_KEY` only
/// [`RotationStep::Prepared`] and [`RotationStep::StoreRewrapped`] happen). Whichever step a crash or
/// power loss interrupts, the next start finds a consistent pair: either the store still under
/// `master.key` (a `master.key.next` is then discarded), or the store re-wrapped and the new key in
/// `master.key.next` (moved into place).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RotationStep {
    /// The new key generated and every data key re-wrapped in memory; nothing written yet. With
    /// `CHATSYNC_MASTER_KEY` this is when the new key must be handed to the operator: once the store is
    /// re-wrapped, only the new key opens it.
    Prepared,
    /// `master.key.next` created (mode 0600), still empty.
    NextCreated,
    /// The new key written to `master.key.next` and flushed to disk.
    NextWritten,
    /// The data directory flushed: `master.key.next` survives power loss.
    NextDurable,
    /// Every data key re-wrapped under the new key, with the new check value, in one committed transaction.
    StoreRewrapped,
    /// `master.key.next` renamed over `master.key`.
    Renamed,
    /// The data directory flushed: the rename survives power loss. The rotation is complete.
    RenameDurable,
}

impl RotationStep {
    /// Every step, in order.
    pub const ALL: [RotationStep; 7] = [
        RotationStep::Prepared,
        RotationStep::NextCreated,
        RotationStep::NextWritten,
        RotationStep::NextDurable,
        RotationStep::StoreRewrapped,
        RotationStep::Renamed,
        RotationStep::RenameDurable,
    ];
}

/// Re-wraps every stored data key under a new master key (`chatsync keys rotate`). Takes the data
/// directory lock, so it fails at once while `serve` (or another rotation) runs on the directory. With a
/// key file, the new key is first written to `master.key.next`, the store is re-wrapped in one
/// transaction, then the file replaces `master.key`, each step flushed to disk (see [`RotationStep`]).
/// With `CHATSYNC_MASTER_KEY`, nothing is written: the new key is returned for the operator to configure.
/// A `master.key` that is a symlink is refused (see the error). Returns the new key and the number of
/// keys re-wrapped.
pub async fn rotate(
    data_dir: &std::path::Path,
    env_value: Option<&str>,
    store: &dyn ChatStore,
) -> anyhow::Result<(MasterKey, usize)> {
    rotate_with(data_dir, env_value, store, |_, _| Ok(())).await
}

/// [`rotate`], calling `after` with the new key once each step is done; an error from `after` stops the
/// rotation right there and is returned. The CLI prints an environment key at [`RotationStep::Prepared`];
/// tests kill the process after each step.
pub async fn rotate_with(
    data_dir: &std::path::Path,
    env_value: Option<&str>,
    store: &dyn ChatStore,
    mut after: impl FnMut(RotationStep, &MasterKey) -> anyhow::Result<()>,
) -> anyhow::Result<(MasterKey, usize)> {
    use anyhow::Context as _;
    let _lock = crate::datadir::DataDirLock::acquire(data_dir, "keys rotate")?;
    let key_file = data_dir.join(KEY_FILE);
    if env_value.is_none() && std::fs::symlink_metadata(&key_file).is_ok_and(|m| m.file_type().is_symlink()) {
        // The rename at the end would replace the link with a file, and leave the retired key where the
        // link pointed (a copy the operator believes gone).
        let target = std::fs::read_link(&key_file).map(|t| t.display().to_string()).unwrap_or_default();
        anyhow::bail!(
            "{} is a symlink to {target:?}: keys rotate replaces master.key in the data directory, which would \
             leave the retired key at {target:?}; copy the key file over the link first (and put the new key \
             where the link pointed afterwards), or rotate with CHATSYNC_MASTER_KEY",
            key_file.display()
        );
    }
    let old = load_master_key(data_dir, env_value, store).await?;
    // The check value the old key opens, read before the keys: the store's transaction fails if it is
    // not the one stored when it runs (another rotation meanwhile).
    let from_check = store.key_check().await?.context("the store has no master key check value")?;
    old.verify_check(&from_check).map_err(|e| anyhow::anyhow!("the master key was rotated meanwhile: {e}"))?;
    let new = MasterKey::generate();
    let mut rewrapped = Vec::new();
    for (key_ref, key) in store.wrapped_keys().await? {
        let dek = old
            .unwrap(&key.wrapped, &key_ref)
            .map_err(|e| anyhow::anyhow!("cannot unwrap {key_ref} with the current master key: {e}"))?;
        rewrapped
            .push((key_ref.clone(), WrappedKey { wrapped: new.wrap(&dek, &key_ref), kek_id: new.id().to_owned() }));
    }
    after(RotationStep::Prepared, &new)?;
    let next = data_dir.join(NEXT_KEY_FILE);
    if env_value.is_none() {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        // load_master_key removed any master.key.next left by an interrupted rotation.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&next)
            .with_context(|| format!("cannot create {}", next.display()))?;
        after(RotationStep::NextCreated, &new)?;
        file.write_all(new.to_base64().as_bytes())?;
        file.sync_all()?;
        after(RotationStep::NextWritten, &new)?;
        crate::datadir::sync_dir(data_dir)?;
        after(RotationStep::NextDurable, &new)?;
    }
    store.rewrap_keys(&rewrapped, &from_check, new.id(), &new.check_value()).await?;
    after(RotationStep::StoreRewrapped, &new)?;
    if env_value.is_none() {
        std::fs::rename(&next, data_dir.join(KEY_FILE))
            .with_context(|| format!("keys re-wrapped, but cannot move {} into place", next.display()))?;
        after(RotationStep::Renamed, &new)?;
        crate::datadir::sync_dir(data_dir)?;
        after(RotationStep::RenameDurable, &new)?;
    }
    Ok((new, rewrapped.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;

    #[test]
    fn a_key_resolved_from_a_record_read_before_a_gap_is_used_but_not_memoized() {
        let keys = Keyring::new(MasterKey::generate());
        let (key, wrapped) = keys.new_chat_key("c1");
        let sealed = key.encrypt(b"title", &crate::crypto::Aad::title("c1"));
        let before = keys.epoch();
        keys.forget_all(); // a gap: c1 may have been deleted on another node, unseen here
        let k = keys.chat_key_since("c1", "alice", &wrapped, before).unwrap();
        assert_eq!(&k.key.decrypt(&sealed, &crate::crypto::Aad::title("c1")).unwrap()[..], b"title");
        assert!(!keys.holds_key("c1"), "not memoized from a record older than the gap");
        keys.chat_key_since("c1", "alice", &wrapped, keys.epoch()).unwrap();
        assert!(keys.holds_key("c1"), "a record read after the gap is memoized");
    }

    #[test]
    fn past_its_bound_the_keyring_forgets_the_oldest_deletions_only() {
        let keys = Keyring::with_max_deleted(MasterKey::generate(), 4);
        for i in 0..5 {
            keys.chat_deleted(&format!("c{i}"));
        }
        for i in 0..5 {
            let key = Arc::new(ChatKey { owner: "alice".into(), key: DataKey::generate() });
            keys.confirmed(&format!("c{i}"), &key, keys.epoch());
        }
        let held: Vec<bool> = (0..5).map(|i| keys.holds_key(&format!("c{i}"))).collect();
        assert_eq!(held, [true, true, false, false, false], "the latest deletions are still refused");
    }

    #[test]
    fn a_chat_whose_deletion_is_uncertain_is_not_memoized_again_but_stays_usable() {
        let keys = Keyring::new(MasterKey::generate());
        let key = Arc::new(ChatKey { owner: "alice".into(), key: DataKey::generate() });
        keys.confirmed("c1", &key, keys.epoch());
        assert!(keys.holds_key("c1"));
        keys.deletion_unknown("c1");
        assert!(!keys.holds_key("c1"), "forgotten");
        // A write that resolved the key before the deletion confirms it after: not memoized again.
        keys.confirmed("c1", &key, keys.epoch());
        assert!(!keys.holds_key("c1"), "a late confirmation keeps no key in memory");
        assert!(keys.memoized("alice", "c1").is_none(), "resolved from the store, which knows");
        let before = keys.epoch();
        keys.forget_all();
        keys.confirmed("c2", &key, before);
        assert!(!keys.holds_key("c2"), "not memoized across a gap since the write resolved the chat");
        keys.confirmed("c2", &key, keys.epoch());
        assert!(keys.holds_key("c2"), "other chats as before");
    }

    #[test]
    fn after_a_gap_every_chat_key_is_forgotten_once_more_when_the_store_has_settled() {
        let settle = std::time::Duration::from_secs(60);
        let keys = Keyring::new(MasterKey::generate()).with_settle(settle);
        let key = Arc::new(ChatKey { owner: "alice".into(), key: DataKey::generate() });
        // A gap: a deletion of c1 of unknown outcome, announced by another node, was lost in it (no
        // chat is marked uncertain here), and may still commit after a lookup here found the chat.
        keys.forget_all();
        let during = keys.epoch();
        keys.confirmed("c1", &key, during);
        assert!(keys.holds_key("c1"), "memoized meanwhile");
        assert_eq!(keys.epoch(), during, "until the recheck");
        // `settle` later the store shows every outcome: the key is resolved from it again, and what was
        // read before is not memoized after.
        keys.recheck_if_due(std::time::Instant::now() + settle);
        assert!(!keys.holds_key("c1"), "forgotten at the recheck");
        keys.confirmed("c1", &key, during);
        assert!(!keys.holds_key("c1"), "read before the recheck: not memoized after it");
        keys.confirmed("c1", &key, keys.epoch());
        assert!(keys.holds_key("c1"), "read after it: memoized as before, and no recheck is left");
        keys.recheck_if_due(std::time::Instant::now() + 2 * settle);
        assert!(keys.holds_key("c1"));
    }

    #[test]
    fn a_dangling_master_key_symlink_is_an_error_for_commands_not_no_key() {
        let dir = tempfile::tempdir().unwrap();
        assert!(existing_master_key(dir.path(), None).unwrap().is_none(), "no key file: no key");
        std::os::unix::fs::symlink(dir.path().join("gone.key"), dir.path().join("master.key")).unwrap();
        let err = format!("{:#}", existing_master_key(dir.path(), None).unwrap_err());
        assert!(err.contains("does not exist"), "{err}");
        assert!(!dir.path().join("gone.key").exists(), "no key created through the link");
    }
}
