//! The cache of a cluster node: this node's [`MemoryCache`], kept true across nodes through the bus.
//!
//! Design (ARCHITECTURE.md, "Caches in a cluster"): per-node caches, invalidated and updated through the
//! bus. Every write's effect on the cache (the chat record the store returned, a deletion, a new message)
//! is applied here and published on the user's channel; the other nodes with connections of that user
//! apply it to their caches with the same merge rules (version-max, deleted ids never come back), so the
//! order in which records arrive does not matter. The cache is trusted only while the bus is healthy:
//! while it is down every read misses (and goes to the store) and nothing is stored, and when it
//! (re)connects every cached list is dropped, because messages may have been missed in between.

use super::memory::MemoryCache;
use super::{Cache, LoadToken, WarmClaim};
use crate::cluster::{Bus, BusMessage};
use crate::store::chats::{ChatRecord, MessageRecord, WrappedKey};
use async_trait::async_trait;
use std::sync::Arc;

/// [`Cache`] for cluster mode.
pub struct CoherentCache {
    inner: Arc<MemoryCache>,
    bus: Arc<Bus>,
}

impl CoherentCache {
    /// This node's `inner` cache, kept coherent through `bus`.
    pub fn new(inner: Arc<MemoryCache>, bus: Arc<Bus>) -> CoherentCache {
        CoherentCache { inner, bus }
    }
}

#[async_trait]
impl Cache for CoherentCache {
    async fn attach(&self, user_id: &str) {
        self.inner.attach(user_id).await;
    }

    async fn detach(&self, user_id: &str) {
        self.inner.detach(user_id).await;
    }

    async fn chats(&self, user_id: &str) -> Option<Vec<ChatRecord>> {
        if !self.bus.is_healthy() {
            return None;
        }
        self.inner.chats(user_id).await
    }

    async fn chat_key(&self, user_id: &str, chat_id: &str) -> Option<Option<WrappedKey>> {
        if !self.bus.is_healthy() {
            return None;
        }
        self.inner.chat_key(user_id, chat_id).await
    }

    async fn begin_load(&self, user_id: &str) -> LoadToken {
        self.inner.begin_load(user_id).await
    }

    async fn put_chats(&self, user_id: &str, token: LoadToken, chats: Vec<ChatRecord>) -> bool {
        self.bus.is_healthy() && self.inner.put_chats(user_id, token, chats).await
    }

    async fn chat_written(&self, user_id: &str, chat: &ChatRecord, created: bool) {
        self.inner.chat_written(user_id, chat, created).await;
        self.bus.publish_user(user_id, BusMessage::ChatWritten { chat: chat.clone(), created });
    }

    async fn chat_deleted(&self, user_id: &str, chat_id: &str) {
        self.inner.chat_deleted(user_id, chat_id).await;
        self.bus.publish_user(user_id, BusMessage::ChatDeleted { chat_id: chat_id.to_owned() });
        // Every node, not only those with a connection of the user, may hold the chat's unwrapped key
        // (an API write, a connection since closed): all of them forget it (crypto-shredding).
        self.bus.publish_control(BusMessage::ChatDeleted { chat_id: chat_id.to_owned() });
    }

    async fn write_unknown(&self, user_id: &str, deleting: Option<&str>) {
        self.inner.forget(user_id, deleting);
        // The write may have committed on PostgreSQL, which every node reads: the others drop what they
        // cached of the user too (and take a deletion's chat as uncertain), and every node forgets the
        // deleted chat's key (as for a deletion).
        self.bus.publish_user(user_id, BusMessage::Forget { chat_id: deleting.map(str::to_owned) });
        if let Some(chat_id) = deleting {
            self.bus.publish_control(BusMessage::Forget { chat_id: Some(chat_id.to_owned()) });
        }
    }

    async fn messages(&self, user_id: &str, chat_id: &str) -> Option<Vec<MessageRecord>> {
        if !self.bus.is_healthy() {
            return None;
        }
        self.inner.messages(user_id, chat_id).await
    }

    async fn put_messages(&self, user_id: &str, token: LoadToken, chat_id: &str, messages: Vec<MessageRecord>) {
        if self.bus.is_healthy() {
            self.inner.put_messages(user_id, token, chat_id, messages).await;
        }
    }

    async fn message_added(&self, user_id: &str, chat_id: &str, message: &MessageRecord) {
        self.inner.message_added(user_id, chat_id, message).await;
        let event = BusMessage::MessageAdded { chat_id: chat_id.to_owned(), message: message.clone() };
        self.bus.publish_user(user_id, event);
    }

    async fn is_primed(&self, user_id: &str) -> bool {
        self.inner.is_primed(user_id).await
    }

    async fn begin_warm(&self, user_id: &str) -> Option<WarmClaim> {
        self.inner.begin_warm(user_id).await
    }

    async fn end_warm(&self, user_id: &str, claim: &WarmClaim, primed: bool) {
        self.inner.end_warm(user_id, claim, primed).await;
    }
}
