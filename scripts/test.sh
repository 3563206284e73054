#!/usr/bin/env bash
# The README's test command: runs the whole test suite with cargo-nextest (each test in its own process,
# hung tests killed per .config/nextest.toml), installing nextest first when the machine lacks it (a fresh
# machine with only the Rust toolchain). Tests that need PostgreSQL or Redis run when
# CHATSYNC_TEST_POSTGRES_URL / CHATSYNC_TEST_REDIS_URL are set (.ci/run sets both) and say they are skipped
# otherwise. Extra arguments go to `cargo nextest run`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== cargo-nextest is missing: installing it (once) with cargo install --locked cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
# Passing tests' output is hidden by nextest: say here which service-backed cases will pass without running.
for var in CHATSYNC_TEST_POSTGRES_URL CHATSYNC_TEST_REDIS_URL; do
  if [ -z "${!var:-}" ]; then
    echo "== $var is not set: the tests that need it pass without running (README, Quick start)" >&2
  fi
done
exec cargo nextest run --workspace --no-fail-fast "$@"
