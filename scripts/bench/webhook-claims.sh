#!/usr/bin/env bash
# webhook-claims.sh: what one webhook claim costs with a large outbox backlog, before and after the
# per-user heads (migrations sqlite/0007_webhook_heads.sql, postgres/0011_webhook_heads.sql).
#
# Builds an outbox of EVENTS events over USERS users (300-byte bodies) as a backend outage leaves it:
# every user's oldest event failed and waits for its next attempt, the others wait behind it. Then times,
# on SQLite (sqlite3, a temp file, WAL) and on PostgreSQL (psql, a schema of its own, dropped at the end),
# the claim statement of the previous schema (grouping the outbox by user) and of the new one (due heads
# through an index), REPEAT times each, in a transaction rolled back each time: first with nothing due,
# then with 16 users' heads due (a claim of 16, the dispatcher's concurrency). Also times the migration
# that fills the heads, and the pending-events figure (COUNT(*) before, the sum of the heads' counts
# after), and prints each claim's plan (EXPLAIN QUERY PLAN / EXPLAIN ANALYZE) once.
# Prints the median and the maximum of each, in ms. Needs sqlite3, python3 and psql; no build.
#
# Usage: scripts/bench/webhook-claims.sh
#   EVENTS=300000 USERS=2000 REPEAT=20
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test (empty: SQLite only)
set -euo pipefail
cd "$(dirname "$0")/../.."

EVENTS=${EVENTS:-300000}
USERS=${USERS:-2000}
REPEAT=${REPEAT:-20}
DATABASE_URL=${DATABASE_URL-postgres://postgres@127.0.0.1:5432/test}
NOW=2000000000 # after every event's creation
LATER=9000000000 # the failed heads' next attempt
LEASE_END=$((NOW + 30000))
MIG_SQLITE_OLD=crates/server/migrations/sqlite/0006_webhooks.sql
MIG_SQLITE_NEW=crates/server/migrations/sqlite/0007_webhook_heads.sql
MIG_PG_OLD=crates/server/migrations/postgres/0007_webhooks.sql
MIG_PG_NEW=crates/server/migrations/postgres/0011_webhook_heads.sql

TMP=$(mktemp -d)
SCHEMA=bench_hooks_$$
cleanup() {
    rm -rf "$TMP"
    if [ -n "$DATABASE_URL" ]; then psql -q "$DATABASE_URL" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# median and max of the numbers on stdin (ms)
stats() { sort -n | awk '{a[NR]=$1} END {if (NR==0) {print "n/a"; exit} printf "median %.3f ms, max %.3f ms (n=%d)\n", a[int((NR+1)/2)], a[NR], NR}'; }

# ---- the claim statements: before (the previous pg_events.rs / sqlite_events.rs) and after
OLD_CLAIM_SQLITE="UPDATE webhook_events SET lease_owner = 'bench', lease_until = $LEASE_END WHERE id IN (
  SELECT h.id FROM (SELECT user_id, MIN(id) AS id FROM webhook_events GROUP BY user_id) h
  JOIN webhook_events e ON e.id = h.id
  WHERE e.next_attempt_at <= $NOW AND e.lease_until <= $NOW
    AND NOT EXISTS (SELECT 1 FROM webhook_events o WHERE o.user_id = h.user_id AND o.lease_until > $NOW)
  ORDER BY h.id LIMIT 16)
RETURNING id, event_id, user_id, kind, seq, length(body), created_at, attempts"
NEW_CHECK_SQLITE="SELECT 1 FROM webhook_heads WHERE due_at <= $NOW LIMIT 1"
NEW_CLAIM_SQLITE="UPDATE webhook_heads SET lease_owner = 'bench', lease_until = $LEASE_END, due_at = $LEASE_END
  WHERE user_id IN (SELECT user_id FROM webhook_heads WHERE due_at <= $NOW ORDER BY due_at, head_id LIMIT 16)
RETURNING user_id, head_id"
OLD_CLAIM_PG="WITH heads AS (
  SELECT DISTINCT ON (user_id) id FROM webhook_events ORDER BY user_id, id),
due AS (
  SELECT e.id FROM webhook_events e JOIN heads h ON h.id = e.id
  WHERE e.next_attempt_at <= $NOW AND e.lease_until <= $NOW
    AND NOT EXISTS (SELECT 1 FROM webhook_events o WHERE o.user_id = e.user_id AND o.lease_until > $NOW)
  ORDER BY e.id LIMIT 16
  FOR UPDATE OF e SKIP LOCKED)
UPDATE webhook_events w SET lease_owner = 'bench', lease_until = $LEASE_END
FROM due WHERE w.id = due.id AND w.lease_until <= $NOW
RETURNING w.id, w.event_id, w.user_id, w.kind, w.seq, length(w.body), w.created_at, w.attempts"
NEW_CLAIM_PG="WITH due AS (
  SELECT user_id FROM webhook_heads WHERE due_at <= $NOW ORDER BY due_at, head_id LIMIT 16
  FOR UPDATE SKIP LOCKED)
UPDATE webhook_heads SET lease_owner = 'bench', lease_until = $LEASE_END, due_at = $LEASE_END
WHERE user_id = ANY(ARRAY(SELECT user_id FROM due))
RETURNING user_id, head_id"
NEW_READ_PG="SELECT id, event_id, user_id, kind, seq, length(body), created_at, attempts FROM webhook_events
WHERE id = ANY(ARRAY(SELECT head_id FROM webhook_heads WHERE lease_owner = 'bench'))"

# ---------------------------------------------------------------- SQLite
DB=$TMP/old.db
sq() { sqlite3 -batch "$1"; }
{
    echo "PRAGMA journal_mode=WAL;"
    cat "$MIG_SQLITE_OLD"
    echo "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $EVENTS)
      INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at)
      SELECT 'evt_' || i, 'user' || (i % $USERS), 'message.created', i, randomblob(300), 1000 + i, 1000 + i FROM n;
      UPDATE webhook_events SET attempts = 5, next_attempt_at = $LATER
        WHERE id IN (SELECT MIN(id) FROM webhook_events GROUP BY user_id);"
} | sq "$DB" >/dev/null
cp "$DB" "$TMP/new.db"
echo "SQLite $(sqlite3 --version | cut -d' ' -f1): $EVENTS events over $USERS users, every head failed and waiting"
start=$(date +%s%N)
sq "$TMP/new.db" <"$MIG_SQLITE_NEW"
echo "  migration 0007 (fill the heads): $(( ($(date +%s%N) - start) / 1000000 )) ms"

# times STATEMENT on DB, REPEAT times, each in BEGIN IMMEDIATE ... ROLLBACK (the statement and the
# fetch of its rows, with Python's sqlite3 for microseconds); prints the ms of each
time_sqlite() {
    python3 - "$1" "$2" "$REPEAT" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
for _ in range(int(sys.argv[3])):
    db.execute("BEGIN IMMEDIATE")
    t = time.perf_counter()
    db.execute(sys.argv[2]).fetchall()
    print((time.perf_counter() - t) * 1000)
    db.execute("ROLLBACK")
PY
}
# 16 users' heads due now (in both layouts)
due16_old="UPDATE webhook_events SET next_attempt_at = $NOW - 1 WHERE id IN (
  SELECT MIN(id) FROM webhook_events WHERE user_id IN (SELECT DISTINCT user_id FROM webhook_events ORDER BY user_id LIMIT 16) GROUP BY user_id);"
due16_new="UPDATE webhook_events SET next_attempt_at = $NOW - 1 WHERE id IN (
  SELECT head_id FROM webhook_heads ORDER BY user_id LIMIT 16);
  UPDATE webhook_heads SET due_at = $NOW - 1 WHERE user_id IN (SELECT user_id FROM webhook_heads ORDER BY user_id LIMIT 16);"

echo "  nothing due:"
echo "    before, claim (write lock held):       $(time_sqlite "$DB" "$OLD_CLAIM_SQLITE" | stats)"
echo "    after, due check (off the lock):       $(time_sqlite "$TMP/new.db" "$NEW_CHECK_SQLITE" | stats)"
echo "    after, claim (write lock held):        $(time_sqlite "$TMP/new.db" "$NEW_CLAIM_SQLITE" | stats)"
echo "    before, pending COUNT(*):              $(time_sqlite "$DB" "SELECT COUNT(*) FROM webhook_events" | stats)"
echo "    after, pending SUM(heads.pending):     $(time_sqlite "$TMP/new.db" "SELECT COALESCE(SUM(pending), 0) FROM webhook_heads" | stats)"
echo "$due16_old" | sq "$DB"
echo "$due16_new" | sq "$TMP/new.db"
echo "  16 heads due (a claim returns $(printf 'BEGIN IMMEDIATE;\n%s;\nROLLBACK;\n' "$OLD_CLAIM_SQLITE" | sq "$DB" | wc -l) / $(printf 'BEGIN IMMEDIATE;\n%s;\nROLLBACK;\n' "$NEW_CLAIM_SQLITE" | sq "$TMP/new.db" | wc -l) rows):"
echo "    before, claim (write lock held):       $(time_sqlite "$DB" "$OLD_CLAIM_SQLITE" | stats)"
echo "    after, claim (write lock held):        $(time_sqlite "$TMP/new.db" "$NEW_CLAIM_SQLITE" | stats)"
echo "UPDATE webhook_events SET next_attempt_at = $NOW - 1 WHERE next_attempt_at = $LATER;" | sq "$DB"
echo "UPDATE webhook_events SET next_attempt_at = $NOW - 1 WHERE next_attempt_at = $LATER;
  UPDATE webhook_heads SET due_at = $NOW - 1;" | sq "$TMP/new.db"
echo "  every head due ($USERS; a claim takes 16):"
echo "    before, claim (write lock held):       $(time_sqlite "$DB" "$OLD_CLAIM_SQLITE" | stats)"
echo "    after, claim (write lock held):        $(time_sqlite "$TMP/new.db" "$NEW_CLAIM_SQLITE" | stats)"
echo "  plans:"
echo "EXPLAIN QUERY PLAN $OLD_CLAIM_SQLITE;" | sq "$DB" | sed 's/^/    before | /'
echo "EXPLAIN QUERY PLAN $NEW_CLAIM_SQLITE;" | sq "$TMP/new.db" | sed 's/^/    after  | /'
echo "EXPLAIN QUERY PLAN $NEW_CHECK_SQLITE;" | sq "$TMP/new.db" | sed 's/^/    check  | /'

[ -n "$DATABASE_URL" ] || exit 0

# ---------------------------------------------------------------- PostgreSQL
pg() { psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
# times STATEMENT REPEAT times, each in BEGIN ... ROLLBACK; prints the ms of each (psql's \timing lines)
time_pg() {
    local sql=$1
    { echo "SET search_path = $SCHEMA;"; for _ in $(seq "$REPEAT"); do
        printf 'BEGIN;\n\\timing on\n%s;\n\\timing off\nROLLBACK;\n' "$sql"
    done; } | pg -f - 2>&1 | awk '/^Time:/ {print $2}'
}
pg -c "CREATE SCHEMA $SCHEMA" >/dev/null
{
    echo "SET search_path = $SCHEMA;"
    cat "$MIG_PG_OLD"
    echo "INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at)
      SELECT 'evt_' || i, 'user' || (i % $USERS), 'message.created', i,
             convert_to(repeat(md5(i::text), 9) || md5((-i)::text), 'UTF8')::bytea, 1000 + i, 1000 + i
      FROM generate_series(1, $EVENTS) AS i;
      UPDATE webhook_events SET attempts = 5, next_attempt_at = $LATER
        WHERE id IN (SELECT min(id) FROM webhook_events GROUP BY user_id);
      VACUUM ANALYZE webhook_events;"
} | pg -f - >/dev/null
echo "PostgreSQL $(pg -Atc 'SHOW server_version'): $EVENTS events over $USERS users, every head failed and waiting"
# EXPLAIN ANALYZE runs the statement: rolled back, as the timed runs are
explain_pg() {
    pg -c "SET search_path = $SCHEMA" -c "BEGIN" -c "EXPLAIN (ANALYZE, COSTS OFF) $1" -c "ROLLBACK" | sed "s/^/    $2 | /"
}
echo "  nothing due:"
echo "    before, claim:                         $(time_pg "$OLD_CLAIM_PG" | stats)"
echo "    before, pending count(*):              $(time_pg "SELECT count(*) FROM webhook_events" | stats)"
explain_pg "$OLD_CLAIM_PG" before
pg -c "SET search_path = $SCHEMA" -c "UPDATE webhook_events SET next_attempt_at = $NOW - 1 WHERE id IN (
  SELECT min(id) FROM webhook_events WHERE user_id IN (SELECT DISTINCT user_id FROM webhook_events ORDER BY user_id LIMIT 16)
  GROUP BY user_id)" >/dev/null
echo "  16 heads due:"
echo "    before, claim:                         $(time_pg "$OLD_CLAIM_PG" | stats)"
explain_pg "$OLD_CLAIM_PG" before
pg -c "SET search_path = $SCHEMA" -c "UPDATE webhook_events SET next_attempt_at = $NOW - 2 WHERE next_attempt_at = $LATER" >/dev/null
echo "  every head due ($USERS; a claim takes 16):"
echo "    before, claim:                         $(time_pg "$OLD_CLAIM_PG" | stats)"
mig=$( { echo "SET search_path = $SCHEMA;"; echo "BEGIN;"; echo '\timing on'; cat "$MIG_PG_NEW"; echo '\timing off'; echo "COMMIT;"; } | pg -f - 2>&1 | awk '/^Time:/ {s += $2} END {printf "%.1f ms", s}')
pg -c "SET search_path = $SCHEMA" -c "VACUUM ANALYZE webhook_heads" -c "VACUUM ANALYZE webhook_events" >/dev/null
echo "    after, claim:                          $(time_pg "$NEW_CLAIM_PG" | stats)"
explain_pg "$NEW_CLAIM_PG" "after "
pg -c "SET search_path = $SCHEMA" -c "UPDATE webhook_heads SET due_at = $LATER WHERE due_at = $NOW - 2" >/dev/null
echo "  16 heads due:"
echo "    after, claim:                          $(time_pg "$NEW_CLAIM_PG" | stats)"
echo "    after, claim then read of the events:  $(time_pg "$NEW_CLAIM_PG; $NEW_READ_PG" | stats) (each statement)"
explain_pg "$NEW_CLAIM_PG" "after "
pg -c "SET search_path = $SCHEMA" -c "UPDATE webhook_heads SET due_at = $LATER WHERE due_at < $LATER" >/dev/null
echo "  nothing due:"
echo "    after, claim:                          $(time_pg "$NEW_CLAIM_PG" | stats)"
echo "    after, pending sum(heads.pending):     $(time_pg "SELECT COALESCE(sum(pending), 0)::bigint FROM webhook_heads" | stats)"
explain_pg "$NEW_CLAIM_PG" "after "
echo "  migration 0011 (fill the heads; every head due): $mig"
