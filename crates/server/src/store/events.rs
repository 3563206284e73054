//! The webhook outbox (SERVER_API.md section 5): the `EventStore` trait and its records.
//!
//! An event is recorded in the same transaction as the write that causes it (a [`NewEvent`] carried by
//! `WriteOp::Message` / `WriteOp::DeleteChat`), or on its own by [`EventStore::record_event`] (events
//! that no chat write causes, such as `stream.cancel_requested`). Bodies arrive sealed (see
//! `webhooks/`) and leave sealed: the store never sees an event's plaintext.
//!
//! Delivery order is per user: only a user's oldest pending event (its *head*) can be claimed, and only
//! while no other event of that user is leased. A claim leases the row to one node until a deadline; the
//! node then deletes it ([`EventStore::event_done`]) or reschedules it ([`EventStore::event_failed`]),
//! which releases the lease. A node that dies mid-delivery loses its leases when they expire.

use super::{Millis, StoreError};
use async_trait::async_trait;

/// An event to record (its body sealed by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event id (unique, stable across retries; the backend de-duplicates by it).
    pub event_id: String,
    /// The event type, e.g. `message.created`.
    pub kind: String,
    /// The sealed event JSON (without `seq`, which the write fills in for `message.created`).
    pub body: Vec<u8>,
    /// Creation time (server clock).
    pub created_at_ms: Millis,
}

/// A pending event, as claimed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    /// The row id (delivery order within a user).
    pub id: i64,
    /// The event id.
    pub event_id: String,
    /// The user the event is about.
    pub user_id: String,
    /// The event type.
    pub kind: String,
    /// The message's `seq` (`message.created`), stored beside the sealed body.
    pub seq: Option<u64>,
    /// The sealed event JSON.
    pub body: Vec<u8>,
    /// Creation time.
    pub created_at_ms: Millis,
    /// Failed delivery attempts so far.
    pub attempts: u32,
}

/// Durable outbox of webhook events. Every method is atomic on its own.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Records one event for `user_id`, due at once, in a transaction of its own.
    async fn record_event(&self, user_id: &str, event: &NewEvent) -> Result<(), StoreError>;

    /// Leases up to `limit` due events to `node` until `now + lease_ms`: each is the oldest pending event
    /// of its user, due (`next attempt <= now`), and no event of its user is leased. Oldest first.
    async fn claim_events(
        &self,
        node: &str,
        now: Millis,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingEvent>, StoreError>;

    /// Removes event `id` (delivered, or given up).
    async fn event_done(&self, id: i64) -> Result<(), StoreError>;

    /// Records a failed attempt of event `id`: `attempts`, the next attempt time, and releases its lease.
    async fn event_failed(&self, id: i64, attempts: u32, next_attempt_ms: Millis) -> Result<(), StoreError>;

    /// Releases every lease held by `node` (its dispatcher stops, or restarts on a store it owns alone).
    async fn release_leases(&self, node: &str) -> Result<(), StoreError>;

    /// Events still to deliver.
    async fn pending_events(&self) -> Result<u64, StoreError>;
}
