#!/usr/bin/env bash
# Tests of the TypeScript SDK (clients/typescript) with node's test runner: unit tests on a fake socket,
# then the SDK against a real `chatsync serve` (port 0, fresh data directory, tokens from the CLI).
# Needs Node.js 20.10 or later (no npm packages). Builds the server unless CHATSYNC_BIN names a binary.
# `.ci/run` runs it; the README's test command (scripts/test.sh) does not, as it needs no Node.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v node >/dev/null || { echo "FATAL: node is missing (Node.js 20.10 or later is needed)" >&2; exit 1; }
if [ -z "${CHATSYNC_BIN:-}" ]; then
  echo "== cargo build -p chatsync --bin chatsync"
  cargo build -p chatsync --bin chatsync
  export CHATSYNC_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/chatsync"
fi
# Node 20 has WebSocket behind a flag (built in from Node 22).
exec node --experimental-websocket --test clients/typescript/test/unit.test.js clients/typescript/test/integration.test.js
