//! Delivery to a user's connections: the `Hub` trait, the per-connection handle it delivers to, and
//! the in-process implementation ([`local::LocalHub`]).
//!
//! A broadcast is encoded once by the caller and the bytes ([`Utf8Bytes`]) are shared by every
//! recipient. The hub never waits on a slow client: it pushes to bounded outboxes. The Redis-backed hub
//! ([`redis::RedisHub`], cluster mode) is a second implementation of the same trait that also publishes
//! to the other nodes through the bus.

pub mod local;
pub mod outbox;
pub mod redis;

use async_trait::async_trait;
pub use axum::extract::ws::Utf8Bytes;
pub use outbox::{CloseReason, Next, Outbox};
use std::sync::Arc;

/// One live connection, as the hub sees it.
pub struct ConnHandle {
    /// Unique connection id (sent in `connected`).
    pub id: String,
    /// The authenticated user.
    pub user_id: String,
    /// The session the connection authenticated with (for revocation).
    pub session_id: String,
    /// The device fingerprint.
    pub device_hash: String,
    /// When the connection's credential expires (a JWT's `exp` plus leeway, unix milliseconds): the
    /// writer closes it with 1008 `Token expired` then. `None` for session tokens.
    pub expires_at: Option<crate::store::Millis>,
    /// The bounded outbound queue, drained by the connection's writer task.
    pub outbox: Outbox,
}

/// Who receives a broadcast, besides the requesting connection's direct reply (PROTOCOL.md section 3).
#[derive(Debug, Clone, Copy)]
pub enum Audience<'a> {
    /// OTHERS: every connection of the user except the one with this id, on any node.
    Others {
        /// The requesting connection.
        except: &'a str,
    },
    /// ALL: every connection of the user, on any node.
    All,
}

impl<'a> Audience<'a> {
    /// The connection left out (OTHERS), if any: what travels on the bus.
    pub fn except(self) -> Option<&'a str> {
        match self {
            Audience::Others { except } => Some(except),
            Audience::All => None,
        }
    }

    /// OTHERS except `except`, or ALL (the inverse of [`Audience::except`]).
    pub fn from_except(except: Option<&'a str>) -> Audience<'a> {
        except.map_or(Audience::All, |except| Audience::Others { except })
    }
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The node is at its connection limit (1013 `Server overloaded`).
    #[error("the node is at its connection limit")]
    Overloaded,
    /// The user has the per-user maximum of connections on this node (1013 `Too many connections`).
    #[error("the user is at the per-user connection limit")]
    TooManyForUser,
}

impl Refused {
    /// The close the client gets.
    pub fn close_reason(self) -> CloseReason {
        match self {
            Refused::Overloaded => CloseReason::OVERLOADED,
            Refused::TooManyForUser => CloseReason::TOO_MANY_CONNECTIONS,
        }
    }
}

/// Connection registry and delivery.
#[async_trait]
pub trait Hub: Send + Sync + 'static {
    /// Registers a connection. Fails when the node is at its connection limit or the user at theirs.
    /// Returns once broadcasts for the user reach the connection (in a cluster: once this node listens
    /// to the user's channel, or at once while the bus is down).
    async fn register(&self, conn: Arc<ConnHandle>) -> Result<(), Refused>;

    /// Removes a connection; it receives nothing afterwards. Returns `true` when it was the user's last
    /// connection on this node.
    fn unregister(&self, conn: &ConnHandle) -> bool;

    /// Queues `frame` on every connection of `user_id` in `audience`. Never waits on a client.
    async fn deliver(&self, user_id: &str, audience: Audience<'_>, frame: Utf8Bytes);

    /// Like [`deliver`](Hub::deliver), in one order on every node: in a cluster, this node's connections
    /// get `frame` at its place among the frames other nodes send for the user (what they sent before it
    /// first), so an event announced through one node's API after another's was answered never overtakes
    /// it on any device. Returns once this node's connections have it queued. For the events of streams
    /// and messages from other senders; a device's own writes use `deliver` (no wait for the bus).
    async fn deliver_in_order(&self, user_id: &str, audience: Audience<'_>, frame: Utf8Bytes) {
        self.deliver(user_id, audience, frame).await
    }

    /// Closes every connection authenticated with one of these sessions.
    async fn close_sessions(&self, session_ids: &[String], reason: CloseReason);

    /// Closes every connection on this node (after their queued frames).
    fn close_all(&self, reason: CloseReason);

    /// Connections registered on this node.
    fn connection_count(&self) -> usize;

    /// How many times sessions were closed on this node ([`close_sessions`](Hub::close_sessions), and
    /// in a cluster the revocations other nodes announce), counted before the connections are looked
    /// at. A connection reads it before its session is read and again once registered: when it moved, a
    /// revocation may have looked for the connection before it was there, and the session is read again.
    fn revocations(&self) -> u64;
}
