#!/usr/bin/env bash
# idle-rss.sh: memory cost of an idle authenticated connection on chatsync.
#
# From the repo root: builds the release binaries, issues sessions into a fresh temp data dir
# (`chatsync sessions issue-bulk`), starts `chatsync serve` on a free loopback port, runs
# `chatsync-bench idle` against it with --server-pid, prints the RSS per idle authenticated
# connection, then stops the server (SIGTERM) and removes the temp dir. Bounded in time; leaves no
# process behind.
#
# Usage: scripts/bench/idle-rss.sh [CONNECTIONS] [-- extra chatsync-bench idle options]
#   CONNECTIONS   default 10000 (sessions issued: CONNECTIONS/2 users x 2 devices)
#   OUT_DIR=dir   keep idle-chatsync.json and idle-chatsync.svg there (default target/bench)
#   HOLD=secs     hold time (default 15)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

CONNECTIONS=${1:-10000}
if [ $# -gt 0 ]; then shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
HOLD=${HOLD:-15}
OUT_DIR=${OUT_DIR:-target/bench}
USERS=$(( (CONNECTIONS + 1) / 2 ))
mkdir -p "$OUT_DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

timeout 900 cargo build --release -q -p chatsync -p chatsync-bench

DATA=$(mktemp -d /tmp/chatsync-idle.XXXXXX)
SERVER_PID=
cleanup() {
    stop_pid "$SERVER_PID"
    rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

echo "issuing $((USERS * 2)) sessions ($USERS users x 2 devices) into $DATA"
timeout 300 target/release/chatsync --data-dir "$DATA" sessions issue-bulk \
    --users "$USERS" --devices 2 --prefix u > "$DATA/tokens.jsonl"

PORT=$(free_port)
target/release/chatsync serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
    --max-connections 20000 > "$DATA/server.log" 2>&1 &
SERVER_PID=$!
wait_listen "$PORT" "$SERVER_PID" 30
echo "chatsync listening on 127.0.0.1:$PORT (pid $SERVER_PID)"

timeout 600 target/release/chatsync-bench --url "ws://127.0.0.1:$PORT/v1/ws" --tokens "$DATA/tokens.jsonl" \
    --server-pid "$SERVER_PID" --json-out "$OUT_DIR/idle-chatsync.json" --plot "$OUT_DIR/idle-chatsync.svg" \
    --max-runtime 500 idle --connections "$CONNECTIONS" --hold "$HOLD" "$@"

print_idle_summary "$OUT_DIR/idle-chatsync.json" "chatsync: $CONNECTIONS idle connections"
