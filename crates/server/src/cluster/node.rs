//! What a node does with what arrives from the bus: deliver frames to its connections of the user,
//! apply other nodes' writes to its cache and keyring, close revoked sessions, forget a user's cached
//! state when its channel is (re)subscribed, and forget everything cached after a gap.

use super::{BusHandler, BusMessage};
use crate::cache::memory::MemoryCache;
use crate::cache::Cache;
use crate::hub::local::LocalHub;
use crate::hub::{Audience, CloseReason};
use crate::keys::Keyring;
use crate::pause::PausePoints;
use async_trait::async_trait;
use std::sync::Arc;

/// The [`BusHandler`] of a node.
pub struct NodeHandler {
    /// This node's connections.
    pub hub: Arc<LocalHub>,
    /// This node's cache (the inner cache: applying a message must not publish it again).
    pub cache: Arc<MemoryCache>,
    /// This node's unwrapped keys.
    pub keys: Arc<Keyring>,
    /// The node's pause points (tests hold the bus at [`BUS_FRAME`](crate::pause::BUS_FRAME)).
    pub pauses: Arc<PausePoints>,
}

#[async_trait]
impl BusHandler for NodeHandler {
    async fn on_message(&self, user_id: Option<&str>, message: BusMessage) {
        match (user_id, message) {
            (Some(user), BusMessage::Frame { frame, except }) => {
                self.pauses.at(crate::pause::BUS_FRAME).await;
                // A change another node published before it heard of its chat's deletion, which this
                // node knows of: the devices here had `chat_deleted`, and this would show them the chat
                // again (the origin checks too, gateway `deliver`, but may learn of the deletion later).
                let deleted = chatsync_protocol::frame_changed_chat(&frame).is_some_and(|c| self.keys.is_deleted(c));
                if !deleted {
                    self.hub.deliver_now(user, Audience::from_except(except.as_deref()), frame.into());
                }
            }
            // A late result of a write to a chat deleted since (every node hears of every deletion on
            // the control channel) is not taken for a new chat by an entry loaded after the deletion.
            (Some(user), BusMessage::ChatWritten { chat, created }) if !self.keys.is_deleted(&chat.chat_id) => {
                self.cache.chat_written(user, &chat, created).await
            }
            (Some(_), BusMessage::ChatWritten { .. }) => {}
            (Some(user), BusMessage::ChatDeleted { chat_id }) => {
                self.keys.chat_deleted(&chat_id);
                self.cache.chat_deleted(user, &chat_id).await;
            }
            (Some(user), BusMessage::MessageAdded { chat_id, message }) => {
                self.cache.message_added(user, &chat_id, &message).await
            }
            (Some(user), BusMessage::Forget { chat_id }) => self.cache.forget(user, chat_id.as_deref()),
            (None, BusMessage::Forget { chat_id: Some(chat_id) }) => self.keys.deletion_unknown(&chat_id),
            (_, BusMessage::SessionsRevoked { session_ids }) => {
                self.hub.close_sessions_now(&session_ids, CloseReason::SESSION_REVOKED)
            }
            (None, BusMessage::ChatDeleted { chat_id }) => self.keys.chat_deleted(&chat_id),
            (_, BusMessage::Resync) => self.on_gap().await,
            // Not logged: a frame carries the plaintext of what it announces.
            (None, _) => tracing::debug!("bus: a user message without a user was ignored"),
        }
    }

    async fn on_subscribed(&self, user_id: &str) {
        self.cache.invalidate(user_id);
        self.pauses.at(crate::pause::BUS_SUBSCRIBED).await;
    }

    async fn on_gap(&self) {
        self.cache.invalidate_all();
        // Chats deleted on other nodes during the gap must not stay decryptable here.
        self.keys.forget_all();
    }
}
