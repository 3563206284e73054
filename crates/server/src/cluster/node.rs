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
use chatsync_protocol::{ServerMessage, StreamCancelReason, StreamCancelled, StreamProgress};
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
                let frame = match after_deletions(&frame, |chat| self.keys.is_deleted(chat)) {
                    Delivery::AsIs => frame,
                    Delivery::Instead(other) => other,
                    Delivery::Dropped => return,
                };
                self.hub.deliver_now(user, Audience::from_except(except.as_deref()), frame.into());
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

/// What of a frame reaches this node's devices ([`after_deletions`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The frame, unchanged.
    AsIs,
    /// Nothing.
    Dropped,
    /// Another frame in its place.
    Instead(String),
}

/// A frame published by a node that had not heard of its chat's deletion yet, checked against the
/// deletions this node knows of (`is_deleted`): the devices here had `chat_deleted`, and the frame would
/// show them the chat again (its origin checked too, but may learn of the deletion later).
/// - A change of the chat (title, draft, message, read marker; `frame_changed_chat`) is dropped.
/// - `stream_completed` would name the deleted chat as holding a new message: it becomes
///   `stream_cancelled` (`aborted`), what a single node sends for a stream completed after its chat's
///   deletion (`streams::ops::completed`), so the stream still ends on every device.
/// - `stream_chunk` is dropped: devices ignore a stream's chunks after its end, and its end (the
///   deletion's `stream_cancelled`, or the completion's as above) comes all the same.
///
/// `stream_started` and `stream_cancelled` pass (SERVER_API.md allows both just after `chat_deleted`), as
/// does every frame of a chat not known deleted. Cheap: the type and chat are read off the frame's start;
/// a frame is parsed only to rewrite a completion of a deleted chat.
pub fn after_deletions(frame: &str, is_deleted: impl Fn(&str) -> bool) -> Delivery {
    if chatsync_protocol::frame_changed_chat(frame).is_some_and(&is_deleted) {
        return Delivery::Dropped;
    }
    match chatsync_protocol::frame_stream_progress(frame) {
        Some((StreamProgress::Chunk, chat)) if is_deleted(chat) => Delivery::Dropped,
        Some((StreamProgress::Completed, chat)) if is_deleted(chat) => {
            match chatsync_protocol::decode_server(frame).map(|m| m.message) {
                Ok(ServerMessage::StreamCompleted(c)) => {
                    let end = StreamCancelled {
                        chat_id: c.chat_id,
                        stream_id: c.stream_id,
                        reason: StreamCancelReason::Aborted,
                    };
                    Delivery::Instead(chatsync_protocol::encode(&ServerMessage::StreamCancelled(end), None))
                }
                // Not a frame a node writes: nothing of a deleted chat goes out on a guess.
                _ => Delivery::Dropped,
            }
        }
        _ => Delivery::AsIs,
    }
}

#[cfg(test)]
mod tests {
    use super::{after_deletions, Delivery};
    use chatsync_protocol::*;
    use serde_json::json;

    fn frame(value: serde_json::Value) -> String {
        encode(&serde_json::from_value::<ServerMessage>(value).expect("a valid sample"), None)
    }

    #[test]
    fn a_frame_of_a_chat_known_deleted_does_not_show_the_chat_again() {
        let deleted = |chat: &str| chat == "gone";
        let stream = |chat: &str, kind: &str| {
            let payload = match kind {
                "stream_started" => json!({"chat_id": chat, "stream_id": "s", "message_id": "m", "sender_name": "a"}),
                "stream_chunk" => json!({"chat_id": chat, "stream_id": "s", "seq": 2, "delta": "x"}),
                "stream_completed" => {
                    json!({"chat_id": chat, "stream_id": "s", "message_id": "m", "seq": 3, "messages_v": 3})
                }
                _ => json!({"chat_id": chat, "stream_id": "s", "reason": "timeout"}),
            };
            frame(json!({"type": kind, "payload": payload}))
        };
        let aborted = frame(json!({"type": "stream_cancelled",
            "payload": {"chat_id": "gone", "stream_id": "s", "reason": "aborted"}}));
        assert_eq!(after_deletions(&stream("gone", "stream_completed"), deleted), Delivery::Instead(aborted));
        assert_eq!(after_deletions(&stream("gone", "stream_chunk"), deleted), Delivery::Dropped);
        for kind in ["stream_started", "stream_cancelled"] {
            assert_eq!(after_deletions(&stream("gone", kind), deleted), Delivery::AsIs, "{kind}");
        }
        for kind in ["stream_started", "stream_chunk", "stream_completed", "stream_cancelled"] {
            assert_eq!(after_deletions(&stream("here", kind), deleted), Delivery::AsIs, "{kind}");
        }
        let title = |chat: &str| {
            frame(json!({"type": "chat_title_updated",
                "payload": {"chat_id": chat, "data": {"title": "t"}, "versions": {"title_v": 1}}}))
        };
        assert_eq!(after_deletions(&title("gone"), deleted), Delivery::Dropped);
        assert_eq!(after_deletions(&title("here"), deleted), Delivery::AsIs);
        let tombstone = frame(json!({"type": "chat_deleted", "payload": {"chat_id": "gone", "tombstone": true}}));
        assert_eq!(after_deletions(&tombstone, deleted), Delivery::AsIs);
    }
}
