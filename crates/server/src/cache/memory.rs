//! The in-process cache (the embedded default): one entry per user, dropped when the user's last
//! connection on this node closes.

use super::{Cache, LoadToken, WarmClaim};
use crate::store::chats::{ChatRecord, MessageRecord, WrappedKey};
use async_trait::async_trait;
use dashmap::DashMap;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Entry {
    /// Open connections of the user on this node.
    connections: usize,
    /// Set from the cache-wide counter at creation and by every merged write; a load stores its result
    /// only if it is unchanged.
    generation: u64,
    chats: Option<HashMap<String, ChatRecord>>,
    /// Chats deleted while this entry lives: late write results for them are ignored. `None` once more
    /// than [`MAX_DELETED`] were: the entry then caches no chat list for the rest of its life.
    deleted: Option<HashSet<String>>,
    /// Chats whose deletion failed with its outcome unknown (it may have committed) while this entry
    /// lives: a write result for one is merged into a cached list that holds it, and is never inserted
    /// (that could bring back a chat deleted in the store): for one the list does not hold, the lists are
    /// dropped instead, and the store answers. Bounded with `deleted`: past [`MAX_DELETED`], the entry
    /// caches no chat list.
    uncertain: HashSet<String>,
    messages: HashMap<String, VecDeque<MessageRecord>>,
    primed: bool,
    /// The running warm-up: its claim id and cancellation.
    warming: Option<(u64, CancellationToken)>,
    /// When the lists are dropped once more: [`MemoryCache::settle`] after the last write of the user's
    /// whose outcome was unknown (or the last gap in a cluster's bus). Such a write may commit after the
    /// lists were reloaded, and then nothing announces it: the reload after this sees it.
    recheck_at: Option<Instant>,
}

/// Deleted chat ids remembered per entry. A user who deletes more while connected (a script creating
/// and deleting chats in a loop) would otherwise grow the set without bound; past this, the entry stops
/// caching the user's chat list instead (reads go to the store, which keeps the tombstones).
pub const MAX_DELETED: usize = 1024;

/// In-memory [`Cache`].
pub struct MemoryCache {
    users: DashMap<String, Entry>,
    /// Source of generations and claim ids; never repeats, never 0 ([`LoadToken::NEVER`]).
    clock: AtomicU64,
    /// Messages kept per chat.
    keep_messages: usize,
    /// Deleted ids remembered per entry ([`MAX_DELETED`]).
    max_deleted: usize,
    /// How long after a write failed with its outcome unknown the store surely shows its outcome (as
    /// the keyring's `settle`): the lists loaded meanwhile are dropped then ([`Entry::recheck_at`]).
    settle: Duration,
    /// [`Entry::recheck_at`] for entries created after the last gap (a write of unknown outcome announced
    /// in the gap was lost with it, whoever it was of), while it is still ahead.
    recheck_all_at: Mutex<Option<Instant>>,
}

impl MemoryCache {
    /// A cache keeping up to `keep_messages` recent messages per cached chat.
    pub fn new(keep_messages: usize) -> MemoryCache {
        MemoryCache::with_max_deleted(keep_messages, MAX_DELETED)
    }

    fn with_max_deleted(keep_messages: usize, max_deleted: usize) -> MemoryCache {
        MemoryCache {
            users: DashMap::new(),
            clock: AtomicU64::new(1),
            keep_messages: keep_messages.max(1),
            max_deleted,
            settle: Duration::from_secs(60),
            recheck_all_at: Mutex::new(None),
        }
    }

    /// Sets [`MemoryCache::settle`] (60 s unless set): the store's timeout plus a margin.
    pub fn with_settle(mut self, settle: Duration) -> MemoryCache {
        self.settle = settle;
        self
    }

    /// The user's entry for a read, its lists dropped first if their recheck is due.
    fn entry(&self, user_id: &str) -> Option<dashmap::mapref::one::Ref<'_, String, Entry>> {
        let due = |e: &Entry| e.recheck_at.is_some_and(|t| Instant::now() >= t);
        let entry = self.users.get(user_id)?;
        if !due(&entry) {
            return Some(entry);
        }
        drop(entry);
        if let Some(mut entry) = self.users.get_mut(user_id) {
            if due(&entry) {
                entry.recheck_at = None;
                self.drop_lists(&mut entry);
            }
        }
        self.users.get(user_id)
    }

    /// `now + settle`, or `current` when that is later.
    fn recheck_after(&self, current: Option<Instant>) -> Instant {
        let at = Instant::now() + self.settle;
        current.map_or(at, |c| c.max(at))
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops every cached chat list and message run (the entries stay, with fresh generations, so no
    /// load begun before this can store its result). Cluster mode calls it after a gap in the bus.
    pub fn invalidate_all(&self) {
        {
            let mut all = self.recheck_all_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *all = Some(self.recheck_after(*all));
        }
        for mut entry in self.users.iter_mut() {
            self.drop_lists(&mut entry);
            entry.recheck_at = Some(self.recheck_after(entry.recheck_at));
        }
    }

    /// After a write of the user's whose outcome is unknown (here or, in a cluster, on another node):
    /// drops the user's lists, and for a deletion (`deleting`) remembers the chat as uncertain, so that a
    /// write result for it that arrives late (a write that committed before the deletion, merged after a
    /// reload without the chat) does not bring it back. The lists are dropped once more
    /// [`MemoryCache::settle`] later, when the store surely shows the write's outcome.
    pub fn forget(&self, user_id: &str, deleting: Option<&str>) {
        let Some(mut entry) = self.users.get_mut(user_id) else { return };
        self.drop_lists(&mut entry);
        entry.recheck_at = Some(self.recheck_after(entry.recheck_at));
        let Some(chat_id) = deleting else { return };
        if entry.deleted.is_none() {
            return; // caches no list already
        }
        if entry.uncertain.len() < self.max_deleted {
            entry.uncertain.insert(chat_id.to_owned());
        } else {
            entry.deleted = None;
        }
    }

    /// Drops the user's cached chat list and message runs, as [`invalidate_all`](Self::invalidate_all)
    /// does for everyone. Cluster mode calls it when the user's channel is subscribed (again).
    pub fn invalidate(&self, user_id: &str) {
        if let Some(mut entry) = self.users.get_mut(user_id) {
            self.drop_lists(&mut entry);
        }
    }

    /// A fresh generation, no lists, and no longer primed (`cache_status_response` says so; nothing is
    /// cached any more).
    fn drop_lists(&self, entry: &mut Entry) {
        entry.generation = self.tick();
        entry.chats = None;
        entry.messages.clear();
        entry.primed = false;
    }
}

/// Orders chats most recently edited first, ties by id.
pub fn sort_chats(chats: &mut [ChatRecord]) {
    chats.sort_by(|a, b| b.last_edited_ms.cmp(&a.last_edited_ms).then_with(|| a.chat_id.cmp(&b.chat_id)));
}

fn merge(old: &mut ChatRecord, new: &ChatRecord) {
    if new.title_v >= old.title_v {
        old.title_v = new.title_v;
        old.title.clone_from(&new.title);
    }
    if new.draft_v >= old.draft_v {
        old.draft_v = new.draft_v;
        old.draft.clone_from(&new.draft);
    }
    // Writes commit in one order and both messages_v and read_seq only grow along it, so of two states one
    // is at least as new in both: its unread count is the one that holds.
    if new.messages_v >= old.messages_v && new.read_seq >= old.read_seq {
        old.read_seq = new.read_seq;
        old.unread_count = new.unread_count;
    }
    old.messages_v = old.messages_v.max(new.messages_v);
    old.last_edited_ms = old.last_edited_ms.max(new.last_edited_ms);
}

#[async_trait]
impl Cache for MemoryCache {
    async fn attach(&self, user_id: &str) {
        let generation = self.tick();
        let recheck_at = *self.recheck_all_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let recheck_at = recheck_at.filter(|t| *t > Instant::now());
        self.users
            .entry(user_id.to_owned())
            .or_insert_with(|| Entry {
                connections: 0,
                generation,
                chats: None,
                deleted: Some(HashSet::new()),
                uncertain: HashSet::new(),
                messages: HashMap::new(),
                primed: false,
                warming: None,
                recheck_at,
            })
            .connections += 1;
    }

    async fn detach(&self, user_id: &str) {
        let removed = self.users.remove_if_mut(user_id, |_, entry| {
            entry.connections = entry.connections.saturating_sub(1);
            entry.connections == 0
        });
        if let Some((_, entry)) = removed {
            if let Some((_, cancel)) = entry.warming {
                cancel.cancel();
            }
        }
    }

    async fn chats(&self, user_id: &str) -> Option<Vec<ChatRecord>> {
        let entry = self.entry(user_id)?;
        let mut chats: Vec<ChatRecord> = entry.chats.as_ref()?.values().cloned().collect();
        drop(entry);
        sort_chats(&mut chats);
        Some(chats)
    }

    async fn chat_key(&self, user_id: &str, chat_id: &str) -> Option<Option<WrappedKey>> {
        let entry = self.entry(user_id)?;
        Some(entry.chats.as_ref()?.get(chat_id).map(|chat| chat.key.clone()))
    }

    async fn begin_load(&self, user_id: &str) -> LoadToken {
        self.entry(user_id).map_or(LoadToken::NEVER, |e| LoadToken(e.generation))
    }

    async fn put_chats(&self, user_id: &str, token: LoadToken, chats: Vec<ChatRecord>) -> bool {
        let Some(mut entry) = self.users.get_mut(user_id) else { return false };
        if entry.generation != token.0 || entry.deleted.is_none() {
            return false;
        }
        entry.chats = Some(chats.into_iter().map(|c| (c.chat_id.clone(), c)).collect());
        true
    }

    async fn chat_written(&self, user_id: &str, chat: &ChatRecord, created: bool) {
        let Some(mut entry) = self.users.get_mut(user_id) else { return };
        entry.generation = self.tick();
        if entry.deleted.as_ref().is_none_or(|deleted| deleted.contains(&chat.chat_id)) {
            return;
        }
        let uncertain = entry.uncertain.contains(&chat.chat_id);
        let Some(chats) = entry.chats.as_mut() else { return };
        match chats.get_mut(&chat.chat_id) {
            Some(old) => merge(old, chat),
            None if !uncertain && created => {
                chats.insert(chat.chat_id.clone(), chat.clone());
            }
            // An uncertain chat the cached list does not hold: a late result of a write to a chat that
            // the deletion removed (inserting it would bring it back), or a chat created since under
            // an id the failed deletion named but that did not exist then. Likewise a chat the list
            // does not hold whose record is not of the write that created it: the chat existed before
            // this write, so either its creation has not reached this entry yet (a record from another
            // node overtaken by this one, or a write that raced the creation), or it was deleted before
            // the list was loaded and this is a late result (in a cluster, a deletion lost in a gap of
            // the bus is known to no keyring here). Only the store can tell.
            None => self.drop_lists(&mut entry),
        }
    }

    async fn chat_deleted(&self, user_id: &str, chat_id: &str) {
        let Some(mut entry) = self.users.get_mut(user_id) else { return };
        entry.generation = self.tick();
        entry.messages.remove(chat_id);
        entry.uncertain.remove(chat_id);
        let Some(deleted) = entry.deleted.as_mut() else { return };
        if deleted.len() < self.max_deleted {
            deleted.insert(chat_id.to_owned());
            if let Some(chats) = entry.chats.as_mut() {
                chats.remove(chat_id);
            }
        } else {
            // Forgetting an id could let a late write result bring its chat back; caching no list cannot.
            entry.deleted = None;
            entry.chats = None;
            entry.primed = false;
        }
    }

    async fn write_unknown(&self, user_id: &str, deleting: Option<&str>) {
        self.forget(user_id, deleting);
    }

    async fn messages(&self, user_id: &str, chat_id: &str) -> Option<Vec<MessageRecord>> {
        let entry = self.entry(user_id)?;
        Some(entry.messages.get(chat_id)?.iter().cloned().collect())
    }

    async fn put_messages(&self, user_id: &str, token: LoadToken, chat_id: &str, messages: Vec<MessageRecord>) {
        let Some(mut entry) = self.users.get_mut(user_id) else { return };
        if entry.generation != token.0 {
            return;
        }
        let skip = messages.len().saturating_sub(self.keep_messages);
        entry.messages.insert(chat_id.to_owned(), messages.into_iter().skip(skip).collect());
    }

    async fn message_added(&self, user_id: &str, chat_id: &str, message: &MessageRecord) {
        let Some(mut entry) = self.users.get_mut(user_id) else { return };
        entry.generation = self.tick();
        let Some(run) = entry.messages.get_mut(chat_id) else { return };
        match run.back().map(|m| m.seq) {
            None if message.seq == 1 => run.push_back(message.clone()),
            Some(last) if message.seq <= last => {}
            Some(last) if message.seq == last + 1 => {
                run.push_back(message.clone());
                if run.len() > self.keep_messages {
                    run.pop_front();
                }
            }
            // A gap (a message merged out of order) or an empty run: the run no longer ends at the
            // chat's latest message, so drop it and let reads go to the store.
            _ => {
                entry.messages.remove(chat_id);
            }
        }
    }

    async fn is_primed(&self, user_id: &str) -> bool {
        self.entry(user_id).is_some_and(|e| e.primed)
    }

    async fn begin_warm(&self, user_id: &str) -> Option<WarmClaim> {
        drop(self.entry(user_id)?);
        let mut entry = self.users.get_mut(user_id)?;
        // An entry past its bound of deleted ids caches no list: a warm-up could only load in vain.
        if entry.primed || entry.warming.is_some() || entry.deleted.is_none() {
            return None;
        }
        let claim =
            WarmClaim { id: self.tick(), token: LoadToken(entry.generation), cancelled: CancellationToken::new() };
        entry.warming = Some((claim.id, claim.cancelled.clone()));
        Some(claim)
    }

    async fn end_warm(&self, user_id: &str, claim: &WarmClaim, primed: bool) {
        if let Some(mut entry) = self.users.get_mut(user_id) {
            if entry.warming.as_ref().is_some_and(|(id, _)| *id == claim.id) {
                entry.warming = None;
                // Lists dropped since the warm-up stored its list (a gap, a write of unknown outcome, on
                // another thread): nothing it loaded is cached any more, so the entry is not primed, and
                // the next connection warms it again.
                entry.primed = primed && entry.chats.is_some();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(id: &str, title_v: u64, draft_v: u64, messages_v: u64, edited: i64) -> ChatRecord {
        ChatRecord {
            chat_id: id.into(),
            title: Some(vec![title_v as u8]),
            draft: Some(vec![draft_v as u8]),
            title_v,
            messages_v,
            draft_v,
            last_edited_ms: edited,
            unread_count: 0,
            key: WrappedKey { wrapped: vec![], kek_id: "k".into() },
            read_seq: 0,
        }
    }

    fn msg(seq: u64) -> MessageRecord {
        MessageRecord {
            seq,
            message_id: format!("m{seq}"),
            content: vec![],
            client_timestamp: None,
            created_at_ms: 0,
            sender: "user".into(),
        }
    }

    async fn cache() -> MemoryCache {
        let c = MemoryCache::new(10);
        c.attach("u").await;
        c
    }

    #[tokio::test]
    async fn a_late_merge_never_moves_a_version_back() {
        let c = cache().await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 1, 1, 10)]).await);
        c.chat_written("u", &chat("a", 3, 1, 1, 20), false).await;
        c.chat_written("u", &chat("a", 2, 4, 0, 15), false).await;
        let got = &c.chats("u").await.unwrap()[0];
        assert_eq!((got.title_v, got.title.as_deref()), (3, Some(&[3u8][..])));
        assert_eq!(got.draft_v, 4);
        assert_eq!(got.messages_v, 1);
        assert_eq!(got.last_edited_ms, 20);
    }

    #[tokio::test]
    async fn a_late_write_result_never_brings_back_a_chat_whose_deletion_is_uncertain() {
        let c = cache().await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 0, 0, 1), chat("b", 1, 0, 0, 1)]).await);
        // Deleting "a" failed with its outcome unknown; a reload finds it gone (it did commit).
        c.write_unknown("u", Some("a")).await;
        assert!(c.chats("u").await.is_none());
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("b", 1, 0, 0, 1)]).await);
        // A write to "a" that committed before the deletion reports late: not brought back (the list is
        // dropped; the store knows).
        c.chat_written("u", &chat("a", 2, 0, 0, 2), true).await;
        assert!(c.chats("u").await.is_none());
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("b", 1, 0, 0, 1)]).await);
        // Other chats' writes merge as before.
        c.chat_written("u", &chat("b", 2, 0, 0, 3), false).await;
        assert_eq!(c.chats("u").await.unwrap()[0].title_v, 2);
        // A deletion confirmed afterwards makes it an ordinary deleted chat: late results are ignored.
        c.chat_deleted("u", "a").await;
        c.chat_written("u", &chat("a", 3, 0, 0, 4), true).await;
        assert_eq!(c.chats("u").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_chat_whose_deletion_did_not_commit_is_cached_and_merged_as_before() {
        let c = cache().await;
        c.write_unknown("u", Some("a")).await;
        // The deletion did not commit (a deadlock rolled it back): the reload holds the chat.
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 0, 0, 1)]).await);
        c.chat_written("u", &chat("a", 2, 0, 0, 2), false).await;
        let got = c.chats("u").await.expect("the list stays cached");
        assert_eq!((got.len(), got[0].title_v), (1, 2), "the write merged into it");
    }

    #[tokio::test]
    async fn a_chat_created_under_an_id_whose_deletion_failed_reaches_the_cache() {
        let c = cache().await;
        // A deletion of "x", which did not exist, failed with its outcome unknown; "x" is created since.
        c.write_unknown("u", Some("x")).await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 0, 0, 1)]).await);
        c.chat_written("u", &chat("x", 1, 0, 0, 2), true).await;
        assert!(c.chats("u").await.is_none(), "not left out of a list that stays cached");
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 0, 0, 1), chat("x", 1, 0, 0, 2)]).await);
        c.chat_written("u", &chat("x", 2, 0, 0, 3), false).await;
        let x = c.chats("u").await.unwrap().into_iter().find(|c| c.chat_id == "x").unwrap();
        assert_eq!(x.title_v, 2, "merged as any chat once the store listed it");
    }

    #[tokio::test]
    async fn a_chat_the_list_lacks_is_inserted_only_from_the_record_of_its_creation() {
        let c = cache().await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 0, 0, 1)]).await);
        // New chats: the records of the writes that created them.
        for (id, title_v, draft_v, messages_v) in [("t", 1, 0, 0), ("d", 0, 1, 0), ("m", 0, 0, 1)] {
            c.chat_written("u", &chat(id, title_v, draft_v, messages_v, 2), true).await;
        }
        assert_eq!(c.chats("u").await.unwrap().len(), 4);
        // Any other write of a chat the list lacks (whatever its versions: a mark_read or a duplicate
        // message leave them as they are): deleted before the list was loaded (a late result), or its
        // creation not merged yet. Only the store can tell: the list is dropped.
        c.chat_written("u", &chat("x", 0, 0, 1, 3), false).await;
        assert!(c.chats("u").await.is_none());
    }

    #[tokio::test]
    async fn a_load_overtaken_by_a_write_is_not_stored() {
        let c = cache().await;
        let t = c.begin_load("u").await;
        c.chat_written("u", &chat("a", 1, 0, 0, 1), true).await;
        assert!(!c.put_chats("u", t, vec![]).await);
        assert!(c.chats("u").await.is_none(), "miss, so reads go to the store");
    }

    #[tokio::test]
    async fn chats_are_ordered_most_recent_first() {
        let c = cache().await;
        let t = c.begin_load("u").await;
        c.put_chats("u", t, vec![chat("a", 0, 0, 0, 1), chat("b", 0, 0, 0, 5), chat("c", 0, 0, 0, 5)]).await;
        let ids: Vec<String> = c.chats("u").await.unwrap().into_iter().map(|c| c.chat_id).collect();
        assert_eq!(ids, ["b", "c", "a"]);
        c.chat_deleted("u", "b").await;
        assert_eq!(c.chats("u").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn one_chat_is_found_in_the_cached_list_only() {
        let c = cache().await;
        assert_eq!(c.chat_key("u", "a").await, None, "no list cached");
        let t = c.begin_load("u").await;
        let a = chat("a", 1, 0, 0, 1);
        c.put_chats("u", t, vec![a.clone()]).await;
        assert_eq!(c.chat_key("u", "a").await, Some(Some(a.key)));
        assert_eq!(c.chat_key("u", "b").await, Some(None), "the list is complete: no such chat");
        c.chat_deleted("u", "a").await;
        assert_eq!(c.chat_key("u", "a").await, Some(None));
        assert_eq!(c.chat_key("nobody", "a").await, None);
    }

    #[tokio::test]
    async fn message_runs_stay_contiguous_and_bounded() {
        let c = MemoryCache::new(2);
        c.attach("u").await;
        let t = c.begin_load("u").await;
        c.put_messages("u", t, "a", vec![msg(1), msg(2), msg(3)]).await;
        assert_eq!(c.messages("u", "a").await.unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
        c.message_added("u", "a", &msg(4)).await;
        assert_eq!(c.messages("u", "a").await.unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);
        c.message_added("u", "a", &msg(6)).await;
        assert!(c.messages("u", "a").await.is_none(), "a gap drops the run");
    }

    #[tokio::test]
    async fn warm_up_is_claimed_once() {
        let c = cache().await;
        let claim = c.begin_warm("u").await.unwrap();
        assert!(c.begin_warm("u").await.is_none());
        assert!(c.put_chats("u", claim.token, vec![chat("a", 1, 1, 1, 10)]).await);
        c.end_warm("u", &claim, true).await;
        assert!(c.is_primed("u").await);
        assert!(c.begin_warm("u").await.is_none());
        c.detach("u").await;
        assert!(!c.is_primed("u").await);
    }

    #[tokio::test]
    async fn a_write_merged_after_a_delete_does_not_bring_the_chat_back() {
        let c = cache().await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 1, 1, 10)]).await);
        c.chat_deleted("u", "a").await;
        c.chat_written("u", &chat("a", 1, 2, 1, 20), true).await;
        assert!(c.chats("u").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn past_its_bound_of_deleted_ids_an_entry_caches_no_chat_list() {
        let c = MemoryCache::with_max_deleted(10, 2);
        c.attach("u").await;
        let t = c.begin_load("u").await;
        assert!(
            c.put_chats("u", t, vec![chat("a", 1, 1, 1, 10), chat("b", 1, 1, 1, 10), chat("c", 1, 1, 1, 10)]).await
        );
        c.chat_deleted("u", "a").await;
        c.chat_deleted("u", "b").await;
        assert_eq!(c.chats("u").await.unwrap().len(), 1, "two deleted ids are remembered");
        c.chat_deleted("u", "c").await;
        assert!(c.users.get("u").unwrap().deleted.is_none(), "the set is dropped, not grown");
        assert!(c.chats("u").await.is_none());
        let t = c.begin_load("u").await;
        assert!(!c.put_chats("u", t, vec![chat("d", 1, 1, 1, 10)]).await, "no list is cached again");
        c.chat_written("u", &chat("a", 1, 2, 1, 20), true).await;
        assert!(c.chats("u").await.is_none(), "so no late write can bring a deleted chat back");
        assert!(c.begin_warm("u").await.is_none(), "and no warm-up loads in vain");
        c.detach("u").await;
        c.attach("u").await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![]).await, "a new entry caches again");
    }

    #[tokio::test]
    async fn invalidating_a_user_drops_its_lists_and_refuses_loads_begun_before() {
        let c = cache().await;
        c.attach("v").await;
        for user in ["u", "v"] {
            let t = c.begin_load(user).await;
            assert!(c.put_chats(user, t, vec![chat("a", 1, 1, 1, 10)]).await);
            let claim = c.begin_warm(user).await.unwrap();
            c.end_warm(user, &claim, true).await;
        }
        let stale = c.begin_load("u").await;
        c.invalidate("u");
        assert!(c.chats("u").await.is_none());
        assert!(!c.is_primed("u").await, "cache_status_response tells the truth");
        assert!(!c.put_chats("u", stale, vec![chat("a", 1, 1, 1, 10)]).await);
        assert_eq!(c.chats("v").await.unwrap().len(), 1, "other users keep theirs");
        c.invalidate_all();
        assert!(c.chats("v").await.is_none() && !c.is_primed("v").await);
    }

    #[tokio::test]
    async fn the_entry_lives_exactly_as_long_as_the_users_connections() {
        let c = MemoryCache::new(10);
        assert_eq!(c.begin_load("u").await, LoadToken::NEVER, "no connection, no entry");
        assert!(c.begin_warm("u").await.is_none());
        assert!(!c.put_chats("u", LoadToken::NEVER, vec![]).await);
        assert!(c.users.is_empty(), "reads and loads never create an entry");
        c.attach("u").await;
        c.attach("u").await;
        let claim = c.begin_warm("u").await.unwrap();
        c.detach("u").await;
        assert!(!claim.cancelled.is_cancelled(), "one connection is left");
        c.detach("u").await;
        assert!(claim.cancelled.is_cancelled(), "the last connection cancels the warm-up");
        assert!(c.users.is_empty());
    }

    #[tokio::test]
    async fn a_load_begun_before_the_entry_was_replaced_is_never_stored() {
        let c = cache().await;
        let stale = c.begin_load("u").await;
        let claim = c.begin_warm("u").await.unwrap();
        c.detach("u").await;
        c.attach("u").await;
        assert!(!c.put_chats("u", stale, vec![chat("gone", 0, 0, 0, 1)]).await);
        assert!(!c.put_chats("u", claim.token, vec![chat("gone", 0, 0, 0, 1)]).await);
        c.end_warm("u", &claim, true).await;
        assert!(!c.is_primed("u").await, "a stale warm-up cannot mark the new entry primed");
        assert!(c.begin_warm("u").await.is_some(), "the new entry can be warmed");
    }

    #[tokio::test]
    async fn lists_dropped_between_a_warm_ups_store_and_its_end_leave_the_entry_unprimed() {
        let c = cache().await;
        let claim = c.begin_warm("u").await.unwrap();
        assert!(c.put_chats("u", claim.token, vec![chat("a", 1, 1, 1, 10)]).await);
        // A gap in the cluster's bus (another thread) between the warm-up's store and its end.
        c.invalidate_all();
        c.end_warm("u", &claim, true).await;
        assert!(c.chats("u").await.is_none());
        assert!(!c.is_primed("u").await, "cache_status_response tells the truth");
        assert!(c.begin_warm("u").await.is_some(), "the next connection warms the entry again");
    }

    /// The settle time passes: every recheck pending is due now.
    fn settle_passes(c: &MemoryCache) {
        let now = Instant::now();
        for mut entry in c.users.iter_mut() {
            entry.recheck_at = entry.recheck_at.map(|_| now);
        }
        let mut all = c.recheck_all_at.lock().unwrap();
        *all = all.map(|_| now);
    }

    #[tokio::test]
    async fn a_list_reloaded_after_a_write_of_unknown_outcome_is_dropped_once_the_store_has_settled() {
        let c = cache().await;
        // A title write failed with its outcome unknown; the reload happens before it commits late.
        c.write_unknown("u", None).await;
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 1, 0, 0, 1)]).await);
        assert!(c.chats("u").await.is_some(), "until the store has settled, the reload serves");
        let before = c.begin_load("u").await;
        // Nothing announces the late commit: the list read before it is dropped at the recheck, and a
        // load begun before the recheck is not stored.
        settle_passes(&c);
        assert!(c.chats("u").await.is_none(), "dropped when the store surely shows the write");
        assert!(!c.put_chats("u", before, vec![chat("a", 1, 0, 0, 1)]).await);
        let t = c.begin_load("u").await;
        assert!(c.put_chats("u", t, vec![chat("a", 2, 0, 0, 2)]).await);
        assert_eq!(c.chats("u").await.unwrap()[0].title_v, 2, "once: the reload after it stays");
    }

    #[tokio::test]
    async fn after_a_gap_every_list_is_dropped_once_more_when_the_store_has_settled_even_a_later_user_s() {
        let c = cache().await;
        c.invalidate_all();
        // A user whose first connection comes after the gap: a write of theirs lost in it may land late.
        c.attach("v").await;
        for user in ["u", "v"] {
            let t = c.begin_load(user).await;
            assert!(c.put_chats(user, t, vec![chat("a", 1, 0, 0, 1)]).await);
        }
        settle_passes(&c);
        // A user attached once the settling is over is not rechecked.
        c.attach("w").await;
        let t = c.begin_load("w").await;
        assert!(c.put_chats("w", t, vec![chat("a", 1, 0, 0, 1)]).await);
        for user in ["u", "v"] {
            assert!(c.chats(user).await.is_none(), "{user}: dropped at the recheck");
            let t = c.begin_load(user).await;
            assert!(c.put_chats(user, t, vec![chat("a", 1, 0, 0, 1)]).await);
            assert!(c.chats(user).await.is_some(), "{user}: once");
        }
        assert!(c.chats("w").await.is_some());
    }
}
