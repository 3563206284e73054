#!/usr/bin/env bash
# peer-node.sh: run a chatsync-bench scenario against the node-ws peer (Node.js 20, `ws` + better-sqlite3
# in WAL mode, one process: the stack a JavaScript team would pick; ../shared/peers/node-ws or $PEER_SRC).
#
# From the repo root: builds chatsync-bench, installs the peer's npm dependencies once into
# target/bench-node-ws (a copy of the peer: shared/ is read-only), issues sessions with the peer's
# `issue-bulk`, starts `peer.mjs serve` on a free loopback port, runs the scenario with --server-pid,
# stops the peer (SIGTERM) and removes its data. Bounded in time; leaves no process behind.
#
# Usage: scripts/bench/peer-node.sh [SCENARIO] [chatsync-bench SCENARIO options...]
#   SCENARIO      idle (default), fanout, saturate or sync
#   USERS=N DEVICES=D   sessions to issue (default: idle 5000 x 2; fanout 2000 x 3; others 200 x 2)
#   OUT_DIR=dir   where <scenario>-node.json / .svg go (default target/bench)
#   PEER_SRC=dir  the peer's source (default ../shared/peers/node-ws beside the repo)
# Examples:
#   scripts/bench/peer-node.sh idle --connections 10000 --hold 15
#   scripts/bench/peer-node.sh fanout --duration 30
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

SCENARIO=${1:-idle}
if [ $# -gt 0 ]; then shift; fi
peer_prelude "$SCENARIO"
PEER_SRC=${PEER_SRC:-../shared/peers/node-ws}
[ -f "$PEER_SRC/peer.mjs" ] || { echo "node-ws peer not found at $PEER_SRC; set PEER_SRC" >&2; exit 2; }
command -v node >/dev/null || { echo "node-ws peer needs Node.js (node, npm)" >&2; exit 2; }

PEER=target/bench-node-ws
if ! cmp -s "$PEER_SRC/peer.mjs" "$PEER/peer.mjs" || ! cmp -s "$PEER_SRC/package.json" "$PEER/package.json" \
    || [ ! -d "$PEER/node_modules/better-sqlite3" ]; then
    echo "installing the node-ws peer and its dependencies into $PEER"
    mkdir -p "$PEER"
    cp "$PEER_SRC/peer.mjs" "$PEER_SRC/package.json" "$PEER/"
    (cd "$PEER" && timeout 900 npm install --no-audit --no-fund --loglevel=error)
fi
# npm 11 runs no install script unless approved: better-sqlite3 builds its native binding in one.
if ! (cd "$PEER" && node -e "new (require('better-sqlite3'))(':memory:')" 2>/dev/null); then
    echo "building better-sqlite3's native binding"
    (cd "$PEER" && { npm install-scripts approve better-sqlite3 >/dev/null 2>&1 || true; } \
        && timeout 900 npm rebuild better-sqlite3 --loglevel=error)
fi

WORK=$(mktemp -d /tmp/chatsync-peer-node.XXXXXX)
SERVER_PID=
cleanup() {
    stop_pid "$SERVER_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "issuing $((USERS * DEVICES)) sessions ($USERS users x $DEVICES devices) with the peer's issue-bulk"
timeout 300 node "$PEER/peer.mjs" issue-bulk --data "$WORK/data" \
    --users "$USERS" --devices "$DEVICES" --prefix u > "$WORK/tokens.jsonl"

PORT=$(free_port)
node "$PEER/peer.mjs" serve --data "$WORK/data" --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
wait_listen "$PORT" "$SERVER_PID" 60
echo "node-ws peer listening on 127.0.0.1:$PORT (pid $SERVER_PID)"

OUT="$OUT_DIR/$SCENARIO-node"
run_bench "$PORT" "$WORK/tokens.jsonl" "$SERVER_PID" "$OUT" node-ws "$WORK/server.log" "$SCENARIO" "$@"
exit "$status"
