-- Webhook outbox (SERVER_API.md section 5): one row per event still to deliver, inserted by the same
-- transaction as the write that causes it, deleted once the backend answered 2xx (or the event is given
-- up). `body` is the event JSON, AES-256-GCM-sealed under the user's data key (never plaintext at rest);
-- `seq` (message.created) is filled in by the write, beside the body, because only the write knows it.
-- A user's events are delivered in `id` order, one at a time: only the user's oldest row (its head) is
-- ever claimed, and it is leased (`lease_owner`, `lease_until`) while it is in flight.
CREATE TABLE webhook_events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    user_id         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    seq             INTEGER,
    body            BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until     INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX webhook_events_by_user ON webhook_events(user_id, id);
