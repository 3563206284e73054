#!/usr/bin/env bash
# idle-rss.sh: RSS per idle authenticated connection on chatsync (the measurement of BENCHMARKS.md's
# idle row): `scripts/bench/chatsync.sh idle` with 10,000 connections by default.
# Usage: scripts/bench/idle-rss.sh [CONNECTIONS] [-- extra chatsync-bench idle options]   (HOLD=secs, OUT_DIR=dir)
set -euo pipefail
cd "$(dirname "$0")/../.."
CONNECTIONS=${1:-10000}
if [ $# -gt 0 ]; then shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
USERS=$(( (CONNECTIONS + 1) / 2 )) DEVICES=2 exec scripts/bench/chatsync.sh idle \
    --connections "$CONNECTIONS" --hold "${HOLD:-15}" "$@"
