//! [`EventStore`] for PostgreSQL: the webhook outbox table (`migrations/postgres/0007_webhooks.sql`).
//!
//! Several nodes share the table. A claim is one statement: the oldest row of each user (`DISTINCT ON`),
//! due and not leased, with no leased row of the same user, locked `FOR UPDATE SKIP LOCKED` (two nodes
//! never take the same row; one skips what the other is claiming) and leased in the same `UPDATE`, whose
//! lease condition is re-checked on the newest row version. A user's next row becomes claimable only
//! when the previous one is deleted (delivered) or its lease is released (failed, rescheduled) or
//! expires (its node died), so a user's events are never in flight twice, on any node.

use super::events::{EventStore, NewEvent, PendingEvent};
use super::pg::PgStore;
use super::{Millis, StoreError};
use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

fn pending(r: &PgRow) -> PendingEvent {
    PendingEvent {
        id: r.get(0),
        event_id: r.get(1),
        user_id: r.get(2),
        kind: r.get(3),
        seq: r.get::<Option<i64>, _>(4).map(|s| s as u64),
        body: r.get(5),
        created_at_ms: r.get(6),
        attempts: r.get::<i32, _>(7).max(0) as u32,
    }
}

#[async_trait]
impl EventStore for PgStore {
    async fn record_event(&self, user_id: &str, event: &NewEvent) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at) \
             VALUES ($1, $2, $3, NULL, $4, $5, $5)",
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
        let rows = sqlx::query(
            "WITH heads AS ( \
               SELECT DISTINCT ON (user_id) id FROM webhook_events ORDER BY user_id, id), \
             due AS ( \
               SELECT e.id FROM webhook_events e JOIN heads h ON h.id = e.id \
               WHERE e.next_attempt_at <= $2 AND e.lease_until <= $2 \
                 AND NOT EXISTS (SELECT 1 FROM webhook_events o WHERE o.user_id = e.user_id AND o.lease_until > $2) \
               ORDER BY e.id LIMIT $4 \
               FOR UPDATE OF e SKIP LOCKED) \
             UPDATE webhook_events w SET lease_owner = $1, lease_until = $2 + $3 \
             FROM due WHERE w.id = due.id AND w.lease_until <= $2 \
             RETURNING w.id, w.event_id, w.user_id, w.kind, w.seq, w.body, w.created_at, w.attempts",
        )
        .bind(node)
        .bind(now)
        .bind(lease_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut events: Vec<PendingEvent> = rows.iter().map(pending).collect();
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    async fn event_done(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM webhook_events WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn event_failed(&self, id: i64, attempts: u32, next_attempt_ms: Millis) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_events SET attempts = $2, next_attempt_at = $3, lease_owner = NULL, lease_until = 0 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .bind(next_attempt_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE webhook_events SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = $1")
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn pending_events(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT count(*) FROM webhook_events").fetch_one(&self.pool).await?;
        Ok(row.get::<i64, _>(0).max(0) as u64)
    }
}
