//! [`EventStore`] for SQLite: the webhook outbox table (`migrations/sqlite/0006_webhooks.sql`).
//!
//! Events caused by chat writes are inserted by the chat writer thread inside the write's transaction
//! (`sqlite_chats::record_event`); everything here runs on the identity pool in `BEGIN IMMEDIATE`
//! transactions (SQLite's one writer lock orders them with the chat writer's batches). One process owns
//! a SQLite database (the data directory lock), so one dispatcher claims its rows; the leases still make
//! the rules the same as on PostgreSQL.

use super::events::{EventStore, NewEvent, PendingEvent};
use super::sqlite::{SqliteStore, BEGIN_WRITE};
use super::{Millis, StoreError};
use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

const EVENT_COLS: &str = "id, event_id, user_id, kind, seq, body, created_at, attempts";

fn pending(r: &SqliteRow) -> PendingEvent {
    PendingEvent {
        id: r.get(0),
        event_id: r.get(1),
        user_id: r.get(2),
        kind: r.get(3),
        seq: r.get::<Option<i64>, _>(4).map(|s| s as u64),
        body: r.get(5),
        created_at_ms: r.get(6),
        attempts: r.get::<i64, _>(7).clamp(0, u32::MAX as i64) as u32,
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn record_event(&self, user_id: &str, event: &NewEvent) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let rows = sqlx::query(&format!(
            "UPDATE webhook_events SET lease_owner = ?1, lease_until = ?2 + ?3 WHERE id IN ( \
               SELECT h.id FROM (SELECT user_id, MIN(id) AS id FROM webhook_events GROUP BY user_id) h \
               JOIN webhook_events e ON e.id = h.id \
               WHERE e.next_attempt_at <= ?2 AND e.lease_until <= ?2 \
                 AND NOT EXISTS (SELECT 1 FROM webhook_events o WHERE o.user_id = h.user_id AND o.lease_until > ?2) \
               ORDER BY h.id LIMIT ?4) \
             RETURNING {EVENT_COLS}"
        ))
        .bind(node)
        .bind(now)
        .bind(lease_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut events: Vec<PendingEvent> = rows.iter().map(pending).collect();
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    async fn event_done(&self, id: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query("DELETE FROM webhook_events WHERE id = ?1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn event_failed(&self, id: i64, attempts: u32, next_attempt_ms: Millis) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query(
            "UPDATE webhook_events SET attempts = ?2, next_attempt_at = ?3, lease_owner = NULL, lease_until = 0 \
             WHERE id = ?1",
        )
        .bind(id)
        .bind(i64::from(attempts))
        .bind(next_attempt_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query("UPDATE webhook_events SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = ?1")
            .bind(node)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pending_events(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM webhook_events").fetch_one(&self.reads).await?;
        Ok(row.get::<i64, _>(0).max(0) as u64)
    }
}
