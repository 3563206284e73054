#!/usr/bin/env bash
# stream.sh: run the `stream` scenario (server-API streams, SERVER_API.md section 4) against chatsync
# (release build, embedded store, --durability normal).
#
# From the repo root: builds the release binaries, issues STREAMS users x 3 device sessions and an API key
# into a fresh temp data dir, starts `chatsync serve` on a free loopback port, runs
# `chatsync-bench stream` with --server-pid, stops the server (SIGTERM) and removes the temp dir.
#
# Usage: scripts/bench/stream.sh [STREAMS] [CHUNKS_PER_SEC] [DURATION_SECS] [BENCH OPTIONS…]   (default 200 20 10)
#   e.g. scripts/bench/stream.sh 1000 20 10 --chunk-bytes 100   (options only after all three numbers;
#   not --streams, --devices, --chunks-per-sec, --duration or --api-key, which the script sets)
#   OUT_DIR=dir   where stream-chatsync.json goes (default target/bench)
#   SERVER_BIN=path   serve, and issue the sessions and the API key, with this chatsync binary instead of
#                 the fresh build (to compare two builds; a command migrates the store it opens)
#   BENCH_BIN=path    drive it with this chatsync-bench binary instead of the fresh build
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh
STREAMS=${1:-200}; RATE=${2:-20}; DURATION=${3:-10}
OUT_DIR=${OUT_DIR:-target/bench}
mkdir -p "$OUT_DIR"
cargo build --release -q -p chatsync -p chatsync-bench
B=${CARGO_TARGET_DIR:-target}/release
CHATSYNC=${SERVER_BIN:-$B/chatsync}
DATA=$(mktemp -d)
PORT=$(free_port)
PID=
cleanup() { stop_pid "$PID"; rm -rf "$DATA"; }
trap cleanup EXIT
"$CHATSYNC" --data-dir "$DATA" sessions issue-bulk --users "$STREAMS" --devices 3 --prefix bs > "$DATA/tokens.jsonl"
KEY=$("$CHATSYNC" --data-dir "$DATA" api-keys create --name bench)
"$CHATSYNC" --data-dir "$DATA" serve --listen "127.0.0.1:$PORT" --durability normal --log-level warn &
PID=$!
wait_listen "$PORT" "$PID" 30
"${BENCH_BIN:-$B/chatsync-bench}" --no-progress --url "ws://127.0.0.1:$PORT/v1/ws" --tokens "$DATA/tokens.jsonl" \
    --server-pid "$PID" --json-out "$OUT_DIR/stream-chatsync.json" \
    stream --streams "$STREAMS" --devices 3 --chunks-per-sec "$RATE" --duration "$DURATION" --api-key "$KEY" "${@:4}"
