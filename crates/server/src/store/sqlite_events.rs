//! [`EventStore`] for SQLite: the webhook outbox (`migrations/sqlite/0006_webhooks.sql`) and its heads
//! (`0007_webhook_heads.sql`: one row per user with pending events, naming the next one, its schedule and
//! its lease).
//!
//! Events caused by chat writes are inserted by the chat writer thread inside the write's transaction
//! (`sqlite_chats::record_event`); a trigger keeps the user's head in that transaction. Everything here
//! runs on the identity pool in `BEGIN IMMEDIATE` transactions (SQLite's one writer lock orders them with
//! the chat writer's batches), and reads only heads that are due (`webhook_heads_due`) or rows named by
//! id or by user (`webhook_events_by_user`): nothing here costs time in proportion to the backlog while
//! holding the writer's lock. A claim first looks, off the lock, whether any head is due at all. One
//! process owns a SQLite database (the data directory lock), so one dispatcher claims its rows; the
//! leases still make the rules the same as on PostgreSQL.

use super::events::{EventStore, Lease, NewEvent, PendingEvent};
use super::sqlite::{SqliteStore, BEGIN_WRITE};
use super::{Millis, StoreError};
use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

const EVENT_COLS: &str = "id, event_id, user_id, kind, seq, body, created_at, attempts";

fn pending(r: &SqliteRow, lease: Lease) -> PendingEvent {
    PendingEvent {
        id: r.get(0),
        event_id: r.get(1),
        user_id: r.get(2),
        kind: r.get(3),
        seq: r.get::<Option<i64>, _>(4).map(|s| s as u64),
        body: r.get(5),
        created_at_ms: r.get(6),
        attempts: r.get::<i64, _>(7).clamp(0, u32::MAX as i64) as u32,
        lease,
    }
}

/// Whether `user_id`'s head is event `id` under `lease` (the fence of `event_done` / `event_failed`).
async fn holds(conn: &mut SqliteConnection, user_id: &str, id: i64, lease: &Lease) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "SELECT 1 FROM webhook_heads WHERE user_id = ?1 AND head_id = ?2 AND lease_owner = ?3 AND lease_until = ?4",
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
/// caller holds the write lock and has checked the lease.
async fn pass_head(conn: &mut SqliteConnection, user_id: &str, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM webhook_events WHERE id = ?1").bind(id).execute(&mut *conn).await?;
    let next = sqlx::query("SELECT id, next_attempt_at FROM webhook_events WHERE user_id = ?1 ORDER BY id LIMIT 1")
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    match next {
        Some(next) => {
            sqlx::query(
                "UPDATE webhook_heads SET head_id = ?2, due_at = ?3, lease_owner = NULL, lease_until = 0, \
                 pending = MAX(pending - 1, 1) WHERE user_id = ?1",
            )
            .bind(user_id)
            .bind(next.get::<i64, _>(0))
            .bind(next.get::<i64, _>(1))
            .execute(&mut *conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM webhook_heads WHERE user_id = ?1").bind(user_id).execute(&mut *conn).await?;
        }
    }
    Ok(())
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn record_event(&self, user_id: &str, event: &NewEvent) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // The trigger `webhook_events_head` makes it the user's head, or counts it.
        sqlx::query(
            "INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at) \
             VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?5)",
        )
        .bind(&event.event_id)
        .bind(user_id)
        .bind(&event.kind)
        .bind(&event.body)
        .bind(event.created_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn claim_events(
        &self,
        node: &str,
        now: Millis,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingEvent>, StoreError> {
        // Off the write lock first: most claims (the poll, a wake-up while the backend is down) find
        // nothing due, and need not wait for the chat writer, nor make it wait.
        let due = sqlx::query("SELECT 1 FROM webhook_heads WHERE due_at <= ?1 LIMIT 1")
            .bind(now)
            .fetch_optional(&self.reads)
            .await?;
        if due.is_none() || limit == 0 {
            return Ok(Vec::new());
        }
        let until = now.saturating_add(lease_ms);
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let heads = sqlx::query(
            "UPDATE webhook_heads SET lease_owner = ?1, lease_until = ?3, due_at = ?3 WHERE user_id IN ( \
               SELECT user_id FROM webhook_heads WHERE due_at <= ?2 ORDER BY due_at, head_id LIMIT ?4) \
             RETURNING user_id, head_id",
        )
        .bind(node)
        .bind(now)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let lease = Lease { owner: node.to_owned(), until };
        let mut events = Vec::with_capacity(heads.len());
        for head in &heads {
            let (user_id, id): (String, i64) = (head.get(0), head.get(1));
            let row = sqlx::query(&format!("SELECT {EVENT_COLS} FROM webhook_events WHERE id = ?1"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some(row) => events.push(pending(&row, lease.clone())),
                None => {
                    // Never left so by the store; repaired rather than leased for ever.
                    tracing::error!(user_id, id, "webhook head names no event; moving it on");
                    pass_head(&mut tx, &user_id, id).await?;
                }
            }
        }
        tx.commit().await?;
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    async fn event_done(&self, event: &PendingEvent) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        if !holds(&mut tx, &event.user_id, event.id, &event.lease).await? {
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let released = sqlx::query(
            "UPDATE webhook_heads SET due_at = ?5, lease_owner = NULL, lease_until = 0 \
             WHERE user_id = ?1 AND head_id = ?2 AND lease_owner = ?3 AND lease_until = ?4",
        )
        .bind(&event.user_id)
        .bind(event.id)
        .bind(&event.lease.owner)
        .bind(event.lease.until)
        .bind(next_attempt_ms)
        .execute(&mut *tx)
        .await?;
        if released.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE webhook_events SET attempts = ?2, next_attempt_at = ?3 WHERE id = ?1")
            .bind(event.id)
            .bind(i64::from(attempts))
            .bind(next_attempt_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query(
            "UPDATE webhook_heads SET lease_owner = NULL, lease_until = 0, \
               due_at = COALESCE((SELECT next_attempt_at FROM webhook_events e WHERE e.id = webhook_heads.head_id), 0) \
             WHERE lease_owner = ?1",
        )
        .bind(node)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pending_events(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(SUM(pending), 0) FROM webhook_heads").fetch_one(&self.reads).await?;
        Ok(row.get::<i64, _>(0).max(0) as u64)
    }
}
