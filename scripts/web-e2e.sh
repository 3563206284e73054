#!/usr/bin/env bash
# End-to-end test of the web demo (issue 10) in headless Chromium: two browser contexts as two devices
# of one user sync a title, a draft and messages through a real `chatsync serve`; a backend message
# (posted through /v1/api) shows unread badges; a reply streamed through /v1/api shows word by word and
# its stop button cancels it; what one user queued offline is not sent by the next user signing in on the
# same browser; a chat deleted on another device stays gone; screenshots go to target/web-demo-*.png.
# Needs Node.js (20.10+) and npm; installs what else it needs, idempotently: Debian's `chromium` package (apt-get) when /usr/bin/chromium
# is missing, and playwright-core (pinned) into target/web-e2e/ (never into the repository). Builds the
# server unless CHATSYNC_BIN names a binary. `.ci/run` runs it; the README's test command
# (scripts/test.sh) does not, as it needs no Node.
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_VERSION=1.64.1
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
e2e_dir="$PWD/target/web-e2e"

log() { printf '== %s\n' "$*"; }
die() { printf 'FATAL: %s\n' "$*" >&2; exit 1; }

command -v node >/dev/null || die "node is missing (Node.js 20.10 or later is needed)"
command -v npm >/dev/null || die "npm is missing"

if [ ! -x "$CHROMIUM" ]; then
  log "installing Debian's chromium package"
  command -v apt-get >/dev/null || die "$CHROMIUM is missing and there is no apt-get to install it"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y chromium >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; } \
    || die "cannot install chromium with apt-get"
  [ -x "$CHROMIUM" ] || die "chromium installed, but $CHROMIUM is still missing"
fi
log "$("$CHROMIUM" --version 2>/dev/null || echo "chromium at $CHROMIUM")"

installed="$(node -p "try { require('$e2e_dir/node_modules/playwright-core/package.json').version } catch { '' }")"
if [ "$installed" != "$PLAYWRIGHT_VERSION" ]; then
  log "installing playwright-core@$PLAYWRIGHT_VERSION into $e2e_dir"
  mkdir -p "$e2e_dir"
  [ -f "$e2e_dir/package.json" ] || echo '{"private":true}' > "$e2e_dir/package.json"
  npm install --prefix "$e2e_dir" --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" \
    || die "npm install playwright-core@$PLAYWRIGHT_VERSION failed"
fi

if [ -z "${CHATSYNC_BIN:-}" ]; then
  log "cargo build -p chatsync --bin chatsync"
  cargo build -p chatsync --bin chatsync
  export CHATSYNC_BIN="$target/debug/chatsync"
fi
[ -x "$CHATSYNC_BIN" ] || die "no chatsync binary at $CHATSYNC_BIN"

log "web demo in headless Chromium (playwright-core $PLAYWRIGHT_VERSION)"
export PLAYWRIGHT_CORE_DIR="$e2e_dir" CHROMIUM
export SCREENSHOT_DIR="${SCREENSHOT_DIR:-$PWD/target}"
node --test clients/typescript/test/demo.e2e.js
log "screenshots: $SCREENSHOT_DIR/web-demo-{laptop,phone,unread,stream}.png"
