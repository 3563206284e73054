#!/usr/bin/env bash
# chatsync.sh: run a chatsync-bench scenario against chatsync (release build, embedded default store).
#
# From the repo root: builds the release binaries, issues sessions into a fresh temp data dir with
# `chatsync sessions issue-bulk`, starts `chatsync serve` on a free loopback port, runs the scenario with
# --server-pid, stops the server (SIGTERM) and removes the temp dir. For `sync`, the server logs each
# request's server-side handling time at debug level and the script prints the percentiles of
# `initial_sync_request`. Bounded in time; leaves no process behind.
#
# Usage: scripts/bench/chatsync.sh [SCENARIO] [chatsync-bench SCENARIO options...]
#   SCENARIO      idle (default), fanout, saturate or sync
#   USERS=N DEVICES=D   sessions to issue (default: idle 5000 x 2; fanout 2000 x 3; saturate 400 x 1; sync 1 x 1)
#   OUT_DIR=dir   where <scenario>-chatsync.json / .svg / .server.log go (default target/bench)
#   SERVER_ARGS="..."   extra `chatsync serve` options
#   SERVER_BIN=path   serve, and issue the sessions, with this chatsync binary instead of the fresh build
#                 (to compare two builds in one session: copy the first build aside, change, rebuild, run
#                 both; the commands use it too, since a command migrates the store it opens)
#   DATABASE_URL=postgres://...   run on this store instead of SQLite in the temp data dir (sessions are
#                 issued into it too; use an empty database or schema, e.g.
#                 postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3Dbench)
# Examples:
#   scripts/bench/chatsync.sh idle --connections 10000 --hold 15
#   scripts/bench/chatsync.sh fanout --duration 30
#   scripts/bench/chatsync.sh saturate --connections 400 --start-rate 4000 --step-rate 2000 --max-rate 40000
#   scripts/bench/chatsync.sh sync --chats 1000,10000 --repeat 20
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

SCENARIO=${1:-idle}
if [ $# -gt 0 ]; then shift; fi
case "$SCENARIO" in
    idle) DEF_USERS=5000; DEF_DEVICES=2 ;;
    fanout) DEF_USERS=2000; DEF_DEVICES=3 ;;
    saturate) DEF_USERS=400; DEF_DEVICES=1 ;;
    sync) DEF_USERS=1; DEF_DEVICES=1 ;;
    *) echo "unknown scenario $SCENARIO (idle, fanout, saturate, sync)" >&2; exit 2 ;;
esac
USERS=${USERS:-$DEF_USERS}
DEVICES=${DEVICES:-$DEF_DEVICES}
OUT_DIR=${OUT_DIR:-target/bench}
mkdir -p "$OUT_DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

timeout 900 cargo build --release -q -p chatsync -p chatsync-bench
CHATSYNC=${SERVER_BIN:-target/release/chatsync}

DATA=$(mktemp -d /tmp/chatsync-bench.XXXXXX)
SERVER_PID=
cleanup() {
    stop_pid "$SERVER_PID"
    cp "$DATA/server.log" "$OUT_DIR/$SCENARIO-chatsync.server.log" 2>/dev/null || true
    rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

echo "issuing $((USERS * DEVICES)) sessions ($USERS users x $DEVICES devices) into $DATA"
DB_ARGS=()
[ -n "${DATABASE_URL:-}" ] && DB_ARGS=(--database-url "$DATABASE_URL")
timeout 300 "$CHATSYNC" --data-dir "$DATA" "${DB_ARGS[@]}" sessions issue-bulk \
    --users "$USERS" --devices "$DEVICES" --prefix u > "$DATA/tokens.jsonl"

LOG_LEVEL=warn
[ "$SCENARIO" = sync ] && LOG_LEVEL="warn,chatsync::gateway::connection=debug"
# The sync scenario populates thousands of chats over few connections: lift the per-connection rate
# limit for it (the limit is a guard against abuse, not part of what is measured).
EXTRA=()
[ "$SCENARIO" = sync ] && EXTRA=(--rate-per-sec 100000 --rate-burst 100000)
PORT=$(free_port)
# shellcheck disable=SC2086
"$CHATSYNC" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" "${DB_ARGS[@]}" --max-connections 30000 \
    --log-level "$LOG_LEVEL" "${EXTRA[@]}" ${SERVER_ARGS:-} > "$DATA/server.log" 2>&1 &
SERVER_PID=$!
wait_listen "$PORT" "$SERVER_PID" 30
echo "chatsync listening on 127.0.0.1:$PORT (pid $SERVER_PID)"

OUT="$OUT_DIR/$SCENARIO-chatsync"
run_bench "$PORT" "$DATA/tokens.jsonl" "$SERVER_PID" "$OUT" chatsync "$DATA/server.log" "$SCENARIO" "$@"
if [ "$status" -eq 0 ] && [ "$SCENARIO" = sync ]; then
    echo
    echo "== chatsync: server-side initial_sync_request time (from the server's debug log) =="
    python3 - "$DATA/server.log" "$OUT.json" <<'PY'
import json, re, sys
times = [int(m.group(1)) for line in open(sys.argv[1])
         if 'type="initial_sync_request"' in line or "type=initial_sync_request" in line
         for m in [re.search(r"elapsed_us=(\d+)", line)] if m]
report = json.load(open(sys.argv[2]))
# The bench runs the sizes in order, `repeat` requests each; split the server times the same way.
sizes = report.get("params", {}).get("chats", [])
repeat = report.get("params", {}).get("repeat", 0)
out = {}
if sizes and repeat and len(times) >= len(sizes) * repeat:
    tail = times[-len(sizes) * repeat:]
    for i, n in enumerate(sizes):
        chunk = sorted(tail[i * repeat:(i + 1) * repeat])
        p = lambda q: chunk[min(len(chunk) - 1, int(q * len(chunk)))] / 1000
        out[str(n)] = {"p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": chunk[-1] / 1000}
        print(f"{n:>6} chats: server time p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {chunk[-1]/1000:.2f} ms")
else:
    print(f"could not match server times ({len(times)}) to the bench's sizes {sizes} x {repeat}")
report["server_time"] = out
json.dump(report, open(sys.argv[2], "w"), indent=2)
PY
fi
exit "$status"
