#!/usr/bin/env bash
# Tests of the TypeScript SDK (clients/typescript): a type check (tsc, strict: the JSDoc-typed
# src/index.js and the web demo's app.js against src/index.d.ts, and test/types-check.ts using the
# declarations as an application would), then node's test runner: unit tests on a fake socket, and the SDK
# against a real `chatsync serve` (port 0, fresh data directory, tokens from the CLI), and a seeded randomized
# convergence test against it (CHATSYNC_CONVERGE_SEED, _RUNS, _OPS: see test/convergence.test.js).
# Needs Node.js 20.10 or later and npm (the pinned TypeScript compiler is installed into
# target/sdk-tsc/ when missing, never into the repository). Builds the server unless CHATSYNC_BIN names a
# binary.
# `.ci/run` runs it; the README's test command (scripts/test.sh) does not, as it needs no Node.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v node >/dev/null || { echo "FATAL: node is missing (Node.js 20.10 or later is needed)" >&2; exit 1; }

TYPESCRIPT_VERSION=5.9.3
tsc_dir="$PWD/target/sdk-tsc"
installed="$(node -p "try { require('$tsc_dir/node_modules/typescript/package.json').version } catch { '' }")"
if [ "$installed" != "$TYPESCRIPT_VERSION" ]; then
  echo "== installing typescript@$TYPESCRIPT_VERSION into $tsc_dir"
  mkdir -p "$tsc_dir"
  [ -f "$tsc_dir/package.json" ] || echo '{"private":true}' > "$tsc_dir/package.json"
  npm install --prefix "$tsc_dir" --no-audit --no-fund --loglevel=error "typescript@$TYPESCRIPT_VERSION" \
    || { echo "FATAL: npm install typescript@$TYPESCRIPT_VERSION failed" >&2; exit 1; }
fi
echo "== type check (tsc $TYPESCRIPT_VERSION, strict)"
"$tsc_dir/node_modules/.bin/tsc" -p clients/typescript/tsconfig.json

if [ -z "${CHATSYNC_BIN:-}" ]; then
  echo "== cargo build -p chatsync --bin chatsync"
  cargo build -p chatsync --bin chatsync
  export CHATSYNC_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/chatsync"
fi
# Node 20 has WebSocket behind a flag (built in from Node 22).
exec node --experimental-websocket --test clients/typescript/test/unit.test.js clients/typescript/test/integration.test.js \
  clients/typescript/test/convergence.test.js
