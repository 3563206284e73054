#!/usr/bin/env bash
# floor.sh: run `chatsync-bench fanout` or `stream` against the floor server
# (crates/bench/examples/floor.rs): the least a server can do for that exchange on chatsync's own stack
# (axum, hyper, tungstenite, tokio): the greeting, then a reply to the sender and a copy to each other
# device (fanout), or a 202 and a copy to each device (stream); nothing stored, encrypted or checked. Its
# CPU per write or per delivery is what the exchange costs this machine before any server work: the bar
# against which chatsync's and the peers' figures can be read.
#
# Usage: scripts/bench/floor.sh [fanout|stream] [chatsync-bench scenario options...]
#   USERS=N DEVICES=D   sessions (default 2000 x 3 for fanout, 1000 x 3 for stream: USERS must be at
#                       least fanout's --users or stream's --streams)
#   FLOOR_ARGS="..."    floor options: --threads N (default 1: one thread), --direct (frames written by
#                       the producing task instead of a writer task per connection)
#   NODES=N             run N floor nodes joined by Redis pub/sub (default 1), the bench spreading each
#                       user's devices over them as cluster.sh does; CPU is sampled for node 1
#   REDIS_URL=url       the Redis of a cluster (default redis://127.0.0.1:6379)
#   OUT_DIR=dir         where <scenario>-floor<NODES>.json / .svg go (default target/bench)
# Examples:
#   scripts/bench/floor.sh fanout --duration 30
#   NODES=3 scripts/bench/floor.sh fanout --duration 30
#   FLOOR_ARGS="--threads 2" scripts/bench/floor.sh stream --streams 1000 --chunks-per-sec 20 --duration 10
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

SCENARIO=${1:-fanout}
if [ $# -gt 0 ]; then shift; fi
case "$SCENARIO" in
    fanout) DEF_USERS=2000 ;;
    stream) DEF_USERS=1000 ;;
    *) echo "unknown scenario $SCENARIO (fanout, stream)" >&2; exit 2 ;;
esac
if [ "$SCENARIO" = stream ] && [ "${NODES:-1}" -gt 1 ]; then
    echo "stream runs on one floor node (its chunks are not published to other nodes)" >&2
    exit 2
fi
USERS=${USERS:-$DEF_USERS}
DEVICES=${DEVICES:-3}
NODES=${NODES:-1}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
OUT_DIR=${OUT_DIR:-target/bench}
mkdir -p "$OUT_DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
timeout 900 cargo build --release -q -p chatsync-bench --bins --example floor

DATA=$(mktemp -d /tmp/chatsync-floor.XXXXXX)
PIDS=()
cleanup() {
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do stop_pid "$pid"; done
    rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

python3 - "$USERS" "$DEVICES" > "$DATA/tokens.jsonl" <<'PY'
import json, sys
users, devices = int(sys.argv[1]), int(sys.argv[2])
for u in range(users):
    for d in range(devices):
        print(json.dumps({"user_id": f"u{u}", "device_id": f"u{u}-d{d}", "token": f"floor-{u}-{d}"}))
PY

URLS=()
for n in $(seq 1 "$NODES"); do
    PORT=$(free_port)
    BUS=()
    [ "$NODES" -gt 1 ] && BUS=(--redis-url "$REDIS_URL")
    # shellcheck disable=SC2086
    target/release/examples/floor --tokens "$DATA/tokens.jsonl" --listen "127.0.0.1:$PORT" ${FLOOR_ARGS:-} \
        ${BUS[@]+"${BUS[@]}"} > "$DATA/node$n.log" 2>&1 &
    PIDS+=($!)
    wait_listen "$PORT" "$!" 30
    URLS+=("ws://127.0.0.1:$PORT/v1/ws")
    echo "floor node $n listening on 127.0.0.1:$PORT (pid $!, ${FLOOR_ARGS:-one thread, writer tasks})"
done
URL_LIST=$(IFS=,; echo "${URLS[*]}")
EXTRA=()
[ "$SCENARIO" = stream ] && EXTRA=(--api-key floor --devices "$DEVICES")
OUT="$OUT_DIR/$SCENARIO-floor$NODES"
status=0
timeout 1000 target/release/chatsync-bench --url "$URL_LIST" --tokens "$DATA/tokens.jsonl" \
    --server-pid "${PIDS[0]}" --json-out "$OUT.json" --plot "$OUT.svg" --max-runtime 900 \
    "$SCENARIO" ${EXTRA[@]+"${EXTRA[@]}"} "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "chatsync-bench exited with $status; last lines of node 1's log:" >&2
    tail -20 "$DATA/node1.log" >&2 || true
fi
exit "$status"
