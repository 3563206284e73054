#!/usr/bin/env bash
# fuzz.sh: run every cargo-fuzz target in fuzz/ for a given time, one after another, and print a summary
# (executions, libFuzzer's coverage figures, crashes) per target.
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target starts from its
# seed corpus in fuzz/corpus/<target>/ (read only); the inputs libFuzzer adds go to a scratch directory,
# so the repository's corpus stays the small seed set. Crash inputs land in fuzz/artifacts/<target>/
# (git-ignored): minimise one with `cargo +nightly fuzz tmin <target> <file>`.
#
# Usage: scripts/fuzz.sh [SECONDS]      seconds per target (default 60)
#   TARGETS="a b"     run only these targets (default: all four)
#   FUZZ_OUT=dir      where logs and the grown corpora go (default: a new /tmp/chatsync-fuzz.XXXXXX)
#   FUZZ_FLAGS="..."  extra `cargo fuzz run` options, e.g. "-s none" to build without AddressSanitizer
# Exit status: 0 when no target found a crash.
set -euo pipefail

secs=${1:-60}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
targets=${TARGETS:-"decode_envelope decode_payloads draft_text open_ciphertext"}
out=${FUZZ_OUT:-$(mktemp -d /tmp/chatsync-fuzz.XXXXXX)}
mkdir -p "$out"
cd "$root/fuzz"

# shellcheck disable=SC2086
cargo +nightly fuzz build ${FUZZ_FLAGS:-}

summary=()
failed=0
for t in $targets; do
    mkdir -p "$out/corpus-$t"
    log="$out/$t.log"
    echo "== $t: ${secs}s (log $log)"
    rc=0
    # shellcheck disable=SC2086
    cargo +nightly fuzz run ${FUZZ_FLAGS:-} "$t" "$out/corpus-$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    cov=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n1 | sed -E 's/.*(cov: [0-9]+ ft: [0-9]+ corp: [^ ]+).*/\1/')
    if [ "$rc" -eq 0 ]; then
        result="ok"
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
        result="FAILED (exit $rc${artifact:+, input $artifact})"
    fi
    summary+=("$(printf '%-16s %6ss  execs %-12s %-40s %s' "$t" "$secs" "${execs:-?}" "${cov:-?}" "$result")")
done

echo
echo "== summary (logs and grown corpora in $out)"
printf '%s\n' "${summary[@]}"
exit "$failed"
