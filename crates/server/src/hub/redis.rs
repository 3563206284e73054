//! The cluster hub: the in-process hub for this node's connections plus the Redis bus for the others.
//!
//! A broadcast is queued on the local connections at once and published on the user's channel; the
//! other nodes deliver it to their connections of the user (the requesting connection, excluded from
//! OTHERS, lives on the origin node, which skips its own messages). A broadcast delivered in order
//! (`deliver_in_order`: stream events, messages from other senders) reaches the local connections only
//! at its place in the channel's order, behind whatever the bus delivered before Redis confirmed it (see
//! `Bus::publish_user_in_turn`), so two API calls answered one after the other on two nodes reach every
//! device in that order; the frame is checked against the chats this node knows deleted when its turn
//! comes, as the other nodes check it (`cluster::node::after_deletions`). A node listens to the channel of a
//! user exactly while that user has a connection on it: the first registration subscribes, every
//! registration waits for the subscription (so no broadcast made after `connected` is missed, also by a
//! second connection arriving while the first one's subscription is on its way), the last
//! unregistration unsubscribes. Local bookkeeping and the subscription command are issued under one lock, so a
//! subscribe and an unsubscribe of the same user can never be reordered.

use super::local::LocalHub;
use super::{Audience, CloseReason, ConnHandle, Hub, Refused, Utf8Bytes};
use crate::cluster::node::{after_deletions, Delivery};
use crate::cluster::{Bus, BusMessage};
use crate::keys::Keyring;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::sync::Arc;

/// [`Hub`] for cluster mode.
pub struct RedisHub {
    local: Arc<LocalHub>,
    bus: Arc<Bus>,
    keys: Arc<Keyring>,
    order: Mutex<()>,
}

impl RedisHub {
    /// A hub delivering to `local` and, through `bus`, to the other nodes; `keys` knows the chats deleted
    /// (checked when a frame delivered in order gets its turn).
    pub fn new(local: Arc<LocalHub>, bus: Arc<Bus>, keys: Arc<Keyring>) -> RedisHub {
        RedisHub { local, bus, keys, order: Mutex::new(()) }
    }
}

#[async_trait]
impl Hub for RedisHub {
    async fn register(&self, conn: Arc<ConnHandle>) -> Result<(), Refused> {
        let user = conn.user_id.clone();
        // Every registration waits, not only the first: a second connection of the user arriving while
        // the first one's subscription is still on its way must not get `connected` before it holds. The
        // subscriber handles commands in order, so this one's (a no-op for a user already subscribed) is
        // answered after the first one's.
        let subscribed = {
            let _order = self.order.lock();
            self.local.add(conn)?;
            self.bus.subscribe(&user)
        };
        subscribed.await;
        Ok(())
    }

    fn unregister(&self, conn: &ConnHandle) -> bool {
        let _order = self.order.lock();
        let last = self.local.remove(conn);
        if last {
            self.bus.unsubscribe(&conn.user_id);
        }
        last
    }

    async fn deliver(&self, user_id: &str, audience: Audience<'_>, frame: Utf8Bytes) {
        let except = audience.except().map(str::to_owned);
        self.bus.publish_user(user_id, BusMessage::Frame { frame: frame.as_str().to_owned(), except });
        self.local.deliver_now(user_id, audience, frame);
    }

    async fn deliver_in_order(&self, user_id: &str, audience: Audience<'_>, frame: Utf8Bytes) {
        let except = audience.except().map(str::to_owned);
        let message = BusMessage::Frame { frame: frame.as_str().to_owned(), except: except.clone() };
        let (local, keys, user) = (self.local.clone(), self.keys.clone(), user_id.to_owned());
        // The turn comes after whatever the bus delivered first, which may be the chat's deletion by
        // another node (its `chat_deleted` already queued here): the frame is checked then, as another
        // node's frame is (the caller checked before publishing, when the deletion was not known yet).
        let own_delivery = move || {
            let frame = match after_deletions(frame.as_str(), |chat| keys.is_deleted(chat)) {
                Delivery::AsIs => frame,
                Delivery::Instead(other) => other.into(),
                Delivery::Dropped => return,
            };
            local.deliver_now(&user, Audience::from_except(except.as_deref()), frame)
        };
        self.bus.publish_user_in_turn(user_id, message, own_delivery).await;
    }

    async fn close_sessions(&self, session_ids: &[String], reason: CloseReason) {
        self.local.close_sessions_now(session_ids, reason);
    }

    fn close_all(&self, reason: CloseReason) {
        self.local.close_all(reason);
    }

    fn connection_count(&self) -> usize {
        self.local.connection_count()
    }

    fn revocations(&self) -> u64 {
        self.local.revocations()
    }
}
