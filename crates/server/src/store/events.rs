//! The webhook outbox (SERVER_API.md section 5): the `EventStore` trait and its records.
//!
//! An event is recorded in the same transaction as the write that causes it (a [`NewEvent`] carried by
//! `WriteOp::Message` / `WriteOp::DeleteChat`), or on its own by [`EventStore::record_event`] (events
//! that no chat write causes, such as `stream.cancel_requested`). Bodies arrive sealed (see
//! `webhooks/`) and leave sealed: the store never sees an event's plaintext.
//!
//! Delivery order is per user: only a user's oldest pending event (its *head*) can be claimed, and only
//! while it is not leased. Both backends keep one head row per user with pending events (`webhook_heads`:
//! the head's id, when it is due, its lease), kept in the transaction that inserts, deletes or reschedules
//! the user's events, so that a claim reads only the due heads through an index on `due_at`: its cost
//! follows what it returns, not the backlog. A claim leases heads to one node until a deadline; the node
//! then deletes the event ([`EventStore::event_done`], which makes the user's next event the head) or
//! reschedules it ([`EventStore::event_failed`]), which releases the lease. Both are *fenced*: they change
//! nothing unless the head still carries the lease the claim returned ([`Lease`]), so the late result of
//! an attempt whose lease expired (and that another node may have claimed again) is dropped. A node that
//! dies mid-delivery loses its leases when they expire.

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

/// The lease under which an event was claimed: its holder and its end (the store's fence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node that claimed the event.
    pub owner: String,
    /// The end of the lease (`now + lease_ms` of the claim).
    pub until: Millis,
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
    /// The lease of this claim ([`EventStore::event_done`] and [`EventStore::event_failed`] check it).
    pub lease: Lease,
}

/// Durable outbox of webhook events. Every method is atomic on its own.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Records one event for `user_id`, due at once, in a transaction of its own.
    async fn record_event(&self, user_id: &str, event: &NewEvent) -> Result<(), StoreError>;

    /// Leases up to `limit` due events to `node` until `now + lease_ms`: each is the head (oldest pending
    /// event) of its user, due (`next attempt <= now`) and not leased (or its lease ended by `now`). The
    /// heads due longest are taken first; the result is in id order. Costs an index probe and the heads
    /// it returns, whatever the number of events waiting.
    async fn claim_events(
        &self,
        node: &str,
        now: Millis,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingEvent>, StoreError>;

    /// Removes a claimed event (delivered, or given up) and makes its user's next event the head, if the
    /// event still holds the claim's lease (`event.lease`: same owner, same end; an expired lease that
    /// nobody claimed again still holds). `Ok(false)`: the lease was lost, nothing changed.
    async fn event_done(&self, event: &PendingEvent) -> Result<bool, StoreError>;

    /// Records a failed attempt of a claimed event (`attempts`, the next attempt time) and releases its
    /// lease, under the same fence as [`EventStore::event_done`]. `Ok(false)`: the lease was lost.
    async fn event_failed(
        &self,
        event: &PendingEvent,
        attempts: u32,
        next_attempt_ms: Millis,
    ) -> Result<bool, StoreError>;

    /// Releases every lease held by `node` (its dispatcher stops, or restarts on a store it owns alone).
    async fn release_leases(&self, node: &str) -> Result<(), StoreError>;

    /// Events still to deliver (summed over the heads' counts: one row per user with pending events,
    /// not a count of the outbox).
    async fn pending_events(&self) -> Result<u64, StoreError>;
}
