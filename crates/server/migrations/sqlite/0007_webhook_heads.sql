-- Webhook heads (SERVER_API.md section 5): one row per user with events still to deliver, naming the
-- event that goes next (`head_id`, the user's oldest) and when it may be claimed (`due_at`: its next
-- attempt, or while it is leased the end of its lease), so that a claim reads only the heads that are
-- due, through `webhook_heads_due`, instead of grouping the whole outbox by user under the write lock
-- (BENCHMARKS.md, fourteenth session). The lease moves here from the event rows: only a head is ever
-- leased. `pending` counts the user's events (the `chatsync_webhook_pending` gauge sums it).
--
-- Inserts keep the table by the trigger below, in the inserting transaction, whatever inserts (the chat
-- writer, `record_event`): a user's first event makes it the head, later ones only count. The store
-- moves a head on (`event_done`: the user's next oldest event, or no row) or reschedules it
-- (`event_failed`) in the transaction that deletes or reschedules the event. Existing events get their
-- heads here: each user's oldest row, with its lease and schedule.
CREATE TABLE webhook_heads (
    user_id     TEXT PRIMARY KEY,
    head_id     INTEGER NOT NULL,
    due_at      INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    pending     INTEGER NOT NULL
) STRICT;

INSERT INTO webhook_heads (user_id, head_id, due_at, lease_owner, lease_until, pending)
SELECT e.user_id, e.id, MAX(e.next_attempt_at, m.lease_until), e.lease_owner, e.lease_until, m.n
FROM (SELECT user_id, MIN(id) AS id, COUNT(*) AS n, MAX(lease_until) AS lease_until
      FROM webhook_events GROUP BY user_id) m
JOIN webhook_events e ON e.id = m.id;

CREATE INDEX webhook_heads_due ON webhook_heads(due_at, head_id);
CREATE INDEX webhook_heads_leased ON webhook_heads(lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TRIGGER webhook_events_head AFTER INSERT ON webhook_events
BEGIN
    INSERT INTO webhook_heads (user_id, head_id, due_at, pending)
    VALUES (NEW.user_id, NEW.id, NEW.next_attempt_at, 1)
    ON CONFLICT (user_id) DO UPDATE SET pending = pending + 1;
END;

ALTER TABLE webhook_events DROP COLUMN lease_owner;
ALTER TABLE webhook_events DROP COLUMN lease_until;
