-- Webhook outbox (SERVER_API.md section 5); same semantics as migrations/sqlite/0006_webhooks.sql. One
-- row per event still to deliver, inserted by the statement of the write that causes it (store/pg_chats.rs
-- wraps `chatsync_write_batch` in a data-modifying CTE: same statement, same transaction; the function
-- itself is unchanged), deleted once delivered or given up. `body` is sealed under the user's data key.
-- Several nodes claim rows: only a user's oldest row is claimed, with `FOR UPDATE SKIP LOCKED` and a
-- lease, and never while another row of the same user is leased.
CREATE TABLE webhook_events (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    user_id         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    seq             BIGINT,
    body            BYTEA NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until     BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX webhook_events_by_user ON webhook_events(user_id, id);
