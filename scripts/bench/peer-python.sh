#!/usr/bin/env bash
# peer-python.sh: run a chatsync-bench scenario against the python-reference peer
# (FastAPI/uvicorn, ../shared/peers/python-reference beside the repository, or $PEER_SRC).
#
# From the repo root: builds chatsync-bench, installs the peer's requirements into a venv under
# target/ (once), copies the peer to a temp dir, issues sessions with the peer's `issue-bulk`,
# starts `peer.py serve` on a free loopback port, runs the scenario with --server-pid, stops the
# peer (SIGTERM) and removes the temp dir. Bounded in time; leaves no process behind.
#
# Usage: scripts/bench/peer-python.sh [SCENARIO] [chatsync-bench SCENARIO options...]
#   SCENARIO      idle (default), fanout, saturate or sync
#   USERS=N DEVICES=D   sessions to issue (default: idle 5000 x 2; fanout 2000 x 3; others 200 x 2)
#   OUT_DIR=dir   where <scenario>-python.json / .svg go (default target/bench)
#   PEER_SRC=dir  the peer's source (default ../shared/peers/python-reference, beside the repository)
# Examples:
#   scripts/bench/peer-python.sh idle --connections 10000 --hold 15
#   USERS=500 DEVICES=3 scripts/bench/peer-python.sh fanout --users 500 --duration 20
#   scripts/bench/peer-python.sh saturate --start-rate 200 --step-rate 200
#   scripts/bench/peer-python.sh sync --chats 1000,10000 --repeat 10
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

SCENARIO=${1:-idle}
if [ $# -gt 0 ]; then shift; fi
peer_prelude "$SCENARIO"
PEER_SRC=${PEER_SRC:-../shared/peers/python-reference}
[ -f "$PEER_SRC/peer.py" ] || { echo "python-reference peer not found at $PEER_SRC; set PEER_SRC" >&2; exit 2; }

VENV=target/bench-venv-python
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import fastapi, uvicorn, uvloop, httptools, cryptography' 2>/dev/null; then
    echo "installing the peer's requirements into $VENV"
    python3 -m venv "$VENV"
    timeout 600 "$VENV/bin/pip" install -q -r "$PEER_SRC/requirements.txt"
fi

WORK=$(mktemp -d /tmp/chatsync-peer-python.XXXXXX)
SERVER_PID=
cleanup() {
    stop_pid "$SERVER_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cp -r "$PEER_SRC" "$WORK/peer"
chmod -R u+w "$WORK/peer"

echo "issuing $((USERS * DEVICES)) sessions ($USERS users x $DEVICES devices) with the peer's issue-bulk"
timeout 300 "$VENV/bin/python" "$WORK/peer/peer.py" issue-bulk --data "$WORK/data" \
    --users "$USERS" --devices "$DEVICES" --prefix u > "$WORK/tokens.jsonl"

PORT=$(free_port)
"$VENV/bin/python" "$WORK/peer/peer.py" serve --data "$WORK/data" --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
wait_listen "$PORT" "$SERVER_PID" 60
echo "python-reference peer listening on 127.0.0.1:$PORT (pid $SERVER_PID)"

OUT="$OUT_DIR/$SCENARIO-python"
run_bench "$PORT" "$WORK/tokens.jsonl" "$SERVER_PID" "$OUT" python-reference "$WORK/server.log" "$SCENARIO" "$@"
exit "$status"
