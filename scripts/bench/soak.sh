#!/usr/bin/env bash
# soak.sh: the soak check of issue 7 item 14: 10,002 authenticated connections (3,334 users x 3 devices)
# held for 10 minutes under a mixed open-loop load on chatsync, judged by `chatsync-bench soak`:
# server RSS drift over the steady window (minute 1 to the end of sending) at most 5%, no close the
# bench did not initiate, every connection opened and reopened, every delivery exactly once, no error
# reply. Exits non-zero when the check fails.
#
# From the repo root: builds the release binaries, issues sessions into a fresh temp data dir with
# `chatsync sessions issue-bulk`, starts `chatsync serve` on a free loopback port with its defaults
# (`--durability full`: every write fsynced before it is confirmed; per-connection rate limit 100/s,
# burst 200; at most 100 connections per user: the soak stays far below them), runs the soak with
# --server-pid, stops the server (SIGTERM) and removes the temp dir. Leaves no process behind.
#
# Usage: scripts/bench/soak.sh [chatsync-bench soak options...]
#   USERS=N DEVICES=D   sessions to issue and connections to hold (default 3334 x 3)
#   DURATION=secs       seconds of sending (default 600); the ramp comes before, the drain after
#   RATE=n              requests per second over all connections (default 800)
#   OUT_DIR=dir         where soak-chatsync.json / .svg / .log go (default target/bench)
#   SERVER_ARGS="..."   extra `chatsync serve` options (e.g. "--durability normal")
# Examples:
#   scripts/bench/soak.sh
#   DURATION=120 scripts/bench/soak.sh --warmup 30         # a short rehearsal
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

USERS=${USERS:-3334}
DEVICES=${DEVICES:-3}
DURATION=${DURATION:-600}
RATE=${RATE:-800}
OUT_DIR=${OUT_DIR:-target/bench}
mkdir -p "$OUT_DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" -lt $((USERS * DEVICES + 1000)) ]; then
    echo "the open-files limit ($NOFILE) is too low for $((USERS * DEVICES)) connections" >&2
    exit 2
fi

timeout 1500 cargo build --release -q -p chatsync -p chatsync-bench

DATA=$(mktemp -d /tmp/chatsync-soak.XXXXXX)
SERVER_PID=
cleanup() {
    stop_pid "$SERVER_PID"
    if [ -f "$DATA/server.log" ]; then cp "$DATA/server.log" "$OUT_DIR/soak-chatsync.log" 2>/dev/null || true; fi
    rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

echo "issuing $((USERS * DEVICES)) sessions ($USERS users x $DEVICES devices) into $DATA"
timeout 300 target/release/chatsync --data-dir "$DATA" sessions issue-bulk \
    --users "$USERS" --devices "$DEVICES" --prefix u > "$DATA/tokens.jsonl"

PORT=$(free_port)
# shellcheck disable=SC2086
target/release/chatsync serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" --max-connections 30000 \
    --log-level warn ${SERVER_ARGS:-} > "$DATA/server.log" 2>&1 &
SERVER_PID=$!
wait_listen "$PORT" "$SERVER_PID" 30
echo "chatsync listening on 127.0.0.1:$PORT (pid $SERVER_PID; serve options: ${SERVER_ARGS:-defaults, --durability full})"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) before the run"

OUT="$OUT_DIR/soak-chatsync"
MAX=$((DURATION + 300))
status=0
RUST_LIB_BACKTRACE=0 RUST_BACKTRACE=0 timeout $((MAX + 60)) target/release/chatsync-bench --url "ws://127.0.0.1:$PORT/v1/ws" --tokens "$DATA/tokens.jsonl" \
    --server-pid "$SERVER_PID" --json-out "$OUT.json" --plot "$OUT.svg" --max-runtime "$MAX" --no-progress \
    soak --users "$USERS" --devices "$DEVICES" --duration "$DURATION" --rate "$RATE" "$@" || status=$?
echo "machine: load average $(cut -d' ' -f1-3 /proc/loadavg) after the run"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited during the soak" >&2
    status=1
fi
if [ -s "$DATA/server.log" ]; then
    echo "server log (warnings and errors): $(wc -l < "$DATA/server.log") lines; last lines:"
    tail -5 "$DATA/server.log"
fi
if [ "$status" -eq 0 ]; then
    echo "SOAK PASSED"
else
    echo "SOAK FAILED (chatsync-bench exited with $status)" >&2
fi
exit "$status"
