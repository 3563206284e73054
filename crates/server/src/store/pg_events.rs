//! [`EventStore`] for PostgreSQL: the webhook outbox (`migrations/postgres/0007_webhooks.sql`) and its
//! heads (`0011_webhook_heads.sql`: one row per user with pending events, naming the next one, its
//! schedule and its lease).
//!
//! Several nodes share the tables. A claim is one statement on the heads: the due ones in `due_at` order
//! through `webhook_heads_due`, as many as asked for, locked `FOR UPDATE SKIP LOCKED` (two nodes never
//! take the same head; one skips what the other is claiming; the lock re-checks the due condition on the
//! newest row version), then leased by key in the same statement (by primary key, so that the `UPDATE`
//! never scans every due head: an index probe and the rows returned, whatever the backlog); the claimed
//! events are then read by id. A head whose user is inserting an event is locked by that insert (see
//! below) and skipped until it commits. A user's next event becomes the head only when the previous one
//! is deleted (delivered, or given up), and a head is claimable again only when its lease is released
//! (failed, rescheduled) or expires (its node died), so a user's events are never in flight twice, on any
//! node. Deleting and rescheduling are fenced by the claim's lease.
//!
//! Inserts maintain the heads through a trigger whose upsert locks the user's head row until the
//! inserting transaction commits; [`EventStore::event_done`] locks that row before it deletes the event
//! and looks for the next one in a later statement (a new snapshot under `READ COMMITTED`), so it sees
//! every event whose insert committed before it got the lock, and an insert that comes after its commit
//! makes a new head (see the migration).
//!
//! A user's events get ids in the order they commit: every insert draws its id under the user's owner
//! lock (the transaction-scoped advisory lock of the chat write batches, `0010_owner_locks_per_schema.sql`),
//! the batch's from its function, [`EventStore::record_event`]'s in its own statement; so the head a
//! trigger makes is always the user's oldest event.

use super::events::{EventStore, Lease, NewEvent, PendingEvent};
use super::pg::{PgStore, TxConn};
use super::{Millis, StoreError};
use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

fn pending(r: &PgRow, lease: Lease) -> PendingEvent {
    PendingEvent {
        id: r.get(0),
        event_id: r.get(1),
        user_id: r.get(2),
        kind: r.get(3),
        seq: r.get::<Option<i64>, _>(4).map(|s| s as u64),
        body: r.get(5),
        created_at_ms: r.get(6),
        attempts: r.get::<i32, _>(7).max(0) as u32,
        lease,
    }
}

/// Locks `user_id`'s head row if it is event `id` under `lease` (the fence of `event_done`); `false` when
/// it is not (the lease was lost). Waits for a transaction that is inserting an event of the user.
async fn lock_head(conn: &mut PgConnection, user_id: &str, id: i64, lease: &Lease) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "SELECT 1 FROM webhook_heads WHERE user_id = $1 AND head_id = $2 AND lease_owner = $3 AND lease_until = $4 \
         FOR UPDATE",
    )
    .bind(user_id)
    .bind(id)
    .bind(&lease.owner)
    .bind(lease.until)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// Deletes `user_id`'s head event `id` (if it is still there) and makes the user's next oldest event the
/// head, unleased and due at its own schedule, or drops the head when the user has no event left. The
/// caller's transaction holds the head row's lock (so no insert of the user commits meanwhile); the
/// second statement's snapshot sees every insert that committed before the lock was granted.
async fn pass_head(conn: &mut PgConnection, user_id: &str, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM webhook_events WHERE id = $1").bind(id).execute(&mut *conn).await?;
    sqlx::query(
        "WITH next AS (SELECT id, next_attempt_at FROM webhook_events WHERE user_id = $1 ORDER BY id LIMIT 1), \
         moved AS ( \
           UPDATE webhook_heads h SET head_id = next.id, due_at = next.next_attempt_at, lease_owner = NULL, \
             lease_until = 0, pending = GREATEST(h.pending - 1, 1) \
           FROM next WHERE h.user_id = $1 RETURNING 1) \
         DELETE FROM webhook_heads WHERE user_id = $1 AND NOT EXISTS (SELECT 1 FROM next)",
    )
    .bind(user_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl EventStore for PgStore {
    async fn record_event(&self, user_id: &str, event: &NewEvent) -> Result<(), StoreError> {
        // The trigger `webhook_events_head` makes it the user's head, or counts it. The user's owner lock
        // first (the one a chat write batch takes, migration `0010_owner_locks_per_schema.sql`), held to
        // the commit, in the same statement: the event's id is drawn only then, so a user's events get
        // their ids in the order they commit. Without it, an id drawn by a batch of the user still in
        // flight could be lower than this one's while this one's head row came first: the older event
        // was then delivered after the newer.
        sqlx::query(
            "INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at) \
             SELECT $1, $2, $3, NULL, $4, $5, $5 \
             FROM (SELECT pg_advisory_xact_lock(1668481025, \
                     hashtext(coalesce(current_schema(), '') || chr(31) || $2))) AS locked",
        )
        .bind(&event.event_id)
        .bind(user_id)
        .bind(&event.kind)
        .bind(&event.body)
        .bind(event.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn claim_events(
        &self,
        node: &str,
        now: Millis,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingEvent>, StoreError> {
        let until = now.saturating_add(lease_ms);
        let heads = sqlx::query(
            "WITH due AS ( \
               SELECT user_id FROM webhook_heads WHERE due_at <= $2 ORDER BY due_at, head_id LIMIT $4 \
               FOR UPDATE SKIP LOCKED) \
             UPDATE webhook_heads SET lease_owner = $1, lease_until = $3, due_at = $3 \
             WHERE user_id = ANY(ARRAY(SELECT user_id FROM due)) \
             RETURNING user_id, head_id",
        )
        .bind(node)
        .bind(now)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        if heads.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = heads.iter().map(|h| h.get(1)).collect();
        // A statement of its own (a new snapshot): a head moved on by another node just before this
        // claim locked it names an event that the claim's own snapshot may not see.
        let rows = sqlx::query(
            "SELECT id, event_id, user_id, kind, seq, body, created_at, attempts FROM webhook_events \
             WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let lease = Lease { owner: node.to_owned(), until };
        let mut events: Vec<PendingEvent> = rows.iter().map(|r| pending(r, lease.clone())).collect();
        if events.len() < heads.len() {
            for head in &heads {
                let (user_id, id): (String, i64) = (head.get(0), head.get(1));
                if !events.iter().any(|e| e.id == id) {
                    // Never left so by the store; repaired rather than leased for ever.
                    tracing::error!(user_id, id, "webhook head names no event; moving it on");
                    let mut conn = TxConn::acquire(&self.pool).await?;
                    let mut tx = conn.begin(None).await?;
                    if lock_head(&mut tx, &user_id, id, &lease).await? {
                        pass_head(&mut tx, &user_id, id).await?;
                    }
                    tx.commit().await?;
                }
            }
        }
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    async fn event_done(&self, event: &PendingEvent) -> Result<bool, StoreError> {
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(None).await?;
        if !lock_head(&mut tx, &event.user_id, event.id, &event.lease).await? {
            return Ok(false);
        }
        pass_head(&mut tx, &event.user_id, event.id).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn event_failed(
        &self,
        event: &PendingEvent,
        attempts: u32,
        next_attempt_ms: Millis,
    ) -> Result<bool, StoreError> {
        let rescheduled = sqlx::query(
            "WITH head AS ( \
               UPDATE webhook_heads SET due_at = $5, lease_owner = NULL, lease_until = 0 \
               WHERE user_id = $1 AND head_id = $2 AND lease_owner = $3 AND lease_until = $4 RETURNING head_id), \
             event AS ( \
               UPDATE webhook_events SET attempts = $6, next_attempt_at = $5 WHERE id IN (SELECT head_id FROM head)) \
             SELECT head_id FROM head",
        )
        .bind(&event.user_id)
        .bind(event.id)
        .bind(&event.lease.owner)
        .bind(event.lease.until)
        .bind(next_attempt_ms)
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .fetch_optional(&self.pool)
        .await?;
        Ok(rescheduled.is_some())
    }

    async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        // One head per statement: a statement that locked several heads while it waited for another
        // (an insert's transaction holds its users' heads, in its own order) could deadlock with it.
        let users: Vec<String> = sqlx::query_scalar("SELECT user_id FROM webhook_heads WHERE lease_owner = $1")
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
        for user_id in users {
            sqlx::query(
                "UPDATE webhook_heads h SET lease_owner = NULL, lease_until = 0, \
                   due_at = COALESCE((SELECT e.next_attempt_at FROM webhook_events e WHERE e.id = h.head_id), 0) \
                 WHERE user_id = $1 AND lease_owner = $2",
            )
            .bind(&user_id)
            .bind(node)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn pending_events(&self) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT COALESCE(sum(pending), 0)::bigint FROM webhook_heads").fetch_one(&self.pool).await?;
        Ok(row.get::<i64, _>(0).max(0) as u64)
    }
}
