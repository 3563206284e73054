#!/usr/bin/env bash
# cluster.sh: run a chatsync-bench scenario against a three-node chatsync cluster on this machine
# (release build): three `chatsync serve` processes sharing one PostgreSQL schema and one Redis, and the
# bench spreading each user's devices over the nodes (connection i goes to node i mod 3).
#
# A fresh schema `bench_<random>` is created in the PostgreSQL database named by DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/test) and dropped afterwards; the bus uses REDIS_URL (default
# redis://127.0.0.1:6379) with a prefix of its own. Server CPU and RSS are sampled for node 1 (each node
# carries a third of the connections). Bounded in time; leaves no process behind.
#
# Usage: scripts/bench/cluster.sh [SCENARIO] [chatsync-bench SCENARIO options...]
#   SCENARIO      fanout (default), idle, saturate, sync or stream (the server API is called on node 1;
#                 an API key is created for it)
#   USERS=N DEVICES=D   sessions to issue (default 2000 x 3)
#   NODES=N       nodes (default 3)
#   SERVER_ARGS="..."   extra `chatsync serve` options (e.g. --durability normal)
#   SERVER_BIN=path   serve, and issue the sessions, with this chatsync binary instead of the fresh build
#                 (to compare two builds in one session: copy the first build aside, change, rebuild, run
#                 both; the commands use it too, since a command migrates the store it opens)
# Example:
#   scripts/bench/cluster.sh fanout --duration 30
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

SCENARIO=${1:-fanout}
if [ $# -gt 0 ]; then shift; fi
USERS=${USERS:-2000}
DEVICES=${DEVICES:-3}
NODES=${NODES:-3}
BASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
OUT_DIR=${OUT_DIR:-target/bench}
mkdir -p "$OUT_DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

timeout 900 cargo build --release -q -p chatsync -p chatsync-bench
CHATSYNC=${SERVER_BIN:-target/release/chatsync}

SCHEMA="bench_$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SEP='?'; case "$BASE_URL" in *\?*) SEP='&' ;; esac
DB_URL="${BASE_URL}${SEP}options=-c%20search_path%3D${SCHEMA}"
export CHATSYNC_MASTER_KEY
CHATSYNC_MASTER_KEY=$(head -c 32 /dev/urandom | base64)
PREFIX="bench-${SCHEMA}:"
DATA=$(mktemp -d /tmp/chatsync-cluster.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    psql -q "$BASE_URL" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

psql -q "$BASE_URL" -c "CREATE SCHEMA $SCHEMA" >/dev/null
COMMON=(--database-url "$DB_URL" --redis-url "$REDIS_URL" --redis-prefix "$PREFIX")
URLS=()
for n in $(seq 1 "$NODES"); do
    PORT=$(free_port)
    # shellcheck disable=SC2086
    "$CHATSYNC" --data-dir "$DATA/node$n" "${COMMON[@]}" serve --listen "127.0.0.1:$PORT" \
        --max-connections 30000 --log-level warn ${SERVER_ARGS:-} > "$DATA/node$n.log" 2>&1 &
    PIDS+=($!)
    wait_listen "$PORT" "$!" 30
    URLS+=("ws://127.0.0.1:$PORT/v1/ws")
    echo "node $n listening on 127.0.0.1:$PORT (pid $!)"
done
URL_LIST=$(IFS=,; echo "${URLS[*]}")

# Users are provisioned once the nodes run, as in a live cluster: the first node has fixed the master
# key in the store, so `issue-bulk` (which has CHATSYNC_MASTER_KEY) also creates the users' data keys.
echo "issuing $((USERS * DEVICES)) sessions ($USERS users x $DEVICES devices) into schema $SCHEMA"
timeout 300 "$CHATSYNC" --data-dir "$DATA/cli" "${COMMON[@]}" sessions issue-bulk \
    --users "$USERS" --devices "$DEVICES" --prefix u > "$DATA/tokens.jsonl"

if [ "$SCENARIO" = stream ]; then
    # The bench reads the key from its environment (not on a command line, where `ps` shows it).
    CHATSYNC_BENCH_API_KEY=$(timeout 60 "$CHATSYNC" --data-dir "$DATA/cli" "${COMMON[@]}" \
        api-keys create --name bench)
    export CHATSYNC_BENCH_API_KEY
fi

OUT="$OUT_DIR/$SCENARIO-cluster$NODES"
status=0
timeout 1000 target/release/chatsync-bench --url "$URL_LIST" --tokens "$DATA/tokens.jsonl" \
    --server-pid "${PIDS[0]}" --json-out "$OUT.json" --plot "$OUT.svg" --max-runtime 900 \
    "$SCENARIO" "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "chatsync-bench exited with $status; last lines of node 1's log:" >&2
    tail -20 "$DATA/node1.log" >&2 || true
fi
exit "$status"
