-- Webhook heads (SERVER_API.md section 5); same semantics as migrations/sqlite/0007_webhook_heads.sql.
-- One row per user with events still to deliver, naming the event that goes next (`head_id`, the
-- user's oldest) and when it may be claimed (`due_at`: its next attempt, or while it is leased the end
-- of its lease). A claim reads only the heads that are due, through `webhook_heads_due`, and locks them
-- `FOR UPDATE SKIP LOCKED`, instead of a `DISTINCT ON` over the whole outbox (BENCHMARKS.md, fourteenth
-- session). The lease moves here from the event rows: only a head is ever leased. `pending` counts the
-- user's events (the `chatsync_webhook_pending` gauge sums it instead of counting the outbox).
--
-- Inserts keep the table by the trigger below, in the inserting statement's transaction, whichever
-- statement inserts (the batch's CTE, `record_event`, a node of the previous version). The upsert
-- updates the head row even when it only counts, so the inserting transaction holds the row's lock to
-- its commit: a node moving the head on (`event_done` locks the row first, then looks for the next
-- event in a new snapshot) waits for it and sees its event, and never drops the head of a user whose
-- event is being committed. Existing events get their heads here (each user's oldest row, with its
-- lease and schedule, and not due before any of the user's leases ends), under a lock that keeps
-- inserts out until the trigger is in place. The lease columns leave the event rows, so nodes of the
-- previous version can no longer claim (their claims fail and are logged) while their writes' events
-- still get heads.
LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE;

CREATE TABLE webhook_heads (
    user_id     TEXT PRIMARY KEY,
    head_id     BIGINT NOT NULL,
    due_at      BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    pending     BIGINT NOT NULL
);

INSERT INTO webhook_heads (user_id, head_id, due_at, lease_owner, lease_until, pending)
SELECT DISTINCT ON (e.user_id) e.user_id, e.id, GREATEST(e.next_attempt_at, m.lease_until), e.lease_owner,
       e.lease_until, m.n
FROM webhook_events e
JOIN (SELECT user_id, count(*) AS n, max(lease_until) AS lease_until FROM webhook_events GROUP BY user_id) m
  ON m.user_id = e.user_id
ORDER BY e.user_id, e.id;

CREATE INDEX webhook_heads_due ON webhook_heads(due_at, head_id);
CREATE INDEX webhook_heads_leased ON webhook_heads(lease_owner) WHERE lease_owner IS NOT NULL;

CREATE FUNCTION chatsync_webhook_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_heads (user_id, head_id, due_at, pending)
    VALUES (NEW.user_id, NEW.id, NEW.next_attempt_at, 1)
    ON CONFLICT (user_id) DO UPDATE SET pending = webhook_heads.pending + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_events_head AFTER INSERT ON webhook_events
    FOR EACH ROW EXECUTE FUNCTION chatsync_webhook_head();

ALTER TABLE webhook_events DROP COLUMN lease_owner, DROP COLUMN lease_until;
