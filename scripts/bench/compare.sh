#!/usr/bin/env bash
# compare.sh: run one chatsync-bench scenario against chatsync, then the python-reference peer, then the
# node-ws peer, with the same options, sessions and machine, and print the headline figures side by side
# with chatsync's ratio against each. This is the command behind each row of BENCHMARKS.md.
# PEERS="python node" (default) chooses the peers; the node-ws peer needs Node.js (skipped, with a
# warning, when `node` is missing).
#
# Usage: scripts/bench/compare.sh SCENARIO [chatsync-bench SCENARIO options...]
#   SCENARIO   idle, fanout, saturate or sync
#   USERS=N DEVICES=D   sessions issued on both servers (defaults per scenario, as in chatsync.sh)
#   OUT_DIR=dir         JSON and SVG outputs (default target/bench)
# Examples:
#   scripts/bench/compare.sh idle --connections 10000 --hold 15 --ramp-per-sec 500
#   scripts/bench/compare.sh fanout --duration 30
#   scripts/bench/compare.sh saturate --connections 400 --start-rate 1000 --step-rate 1000 --max-rate 30000
#   scripts/bench/compare.sh sync --chats 1000,10000 --repeat 20
set -euo pipefail
cd "$(dirname "$0")/../.."
SCENARIO=${1:?usage: compare.sh SCENARIO [options]}
shift
case "$SCENARIO" in
    idle) : "${USERS:=5000}" "${DEVICES:=2}" ;;
    fanout) : "${USERS:=2000}" "${DEVICES:=3}" ;;
    saturate) : "${USERS:=400}" "${DEVICES:=1}" ;;
    sync) : "${USERS:=1}" "${DEVICES:=1}" ;;
    *) echo "unknown scenario $SCENARIO (idle, fanout, saturate, sync)" >&2; exit 2 ;;
esac
export USERS DEVICES
export OUT_DIR=${OUT_DIR:-target/bench}

echo "######## chatsync: $SCENARIO $*"
scripts/bench/chatsync.sh "$SCENARIO" "$@"
echo
PEERS=${PEERS:-python node}
RESULTS=("$OUT_DIR/$SCENARIO-chatsync.json")
for peer in $PEERS; do
    case "$peer" in
        python) echo "######## python-reference: $SCENARIO $*"; scripts/bench/peer-python.sh "$SCENARIO" "$@" ;;
        node)
            if ! command -v node >/dev/null; then echo "warning: no node on PATH: skipping the node-ws peer" >&2; continue; fi
            echo "######## node-ws: $SCENARIO $*"; scripts/bench/peer-node.sh "$SCENARIO" "$@" ;;
        *) echo "unknown peer $peer (python, node)" >&2; exit 2 ;;
    esac
    RESULTS+=("$OUT_DIR/$SCENARIO-$peer.json")
    echo
done
python3 - "$SCENARIO" "${RESULTS[@]}" <<'PY'
import json, os, sys
scenario, files = sys.argv[1], sys.argv[2:]
runs = [(os.path.basename(f).split("-", 1)[1].rsplit(".", 1)[0], json.load(open(f))) for f in files]
a = runs[0][1]
def get(d, path):
    for k in path.split("."):
        if isinstance(d, list):
            d = d[int(k)] if d else None
        elif isinstance(d, dict):
            d = d.get(k)
        if d is None:
            return None
    return d
rows = {
    "idle": [("held connections", "results.held", "high"),
             ("RSS per idle connection (KiB)", "idle_server.rss_per_connection_kib", "low"),
             ("connect+auth p99 (ms)", "results.connect_latency.p99_ms", "low"),
             ("server CPU per connect (ms)", "idle_server.cpu_per_connection_ms", "low")],
    "fanout": [("deliveries received", "results.completeness.received", "high"),
               ("missing", "results.completeness.missing", "low"),
               ("duplicates", "results.completeness.duplicates", "low"),
               ("fan-out p50 (ms)", "results.latency.p50_ms", "low"),
               ("fan-out p99 (ms)", "results.latency.p99_ms", "low"),
               ("fan-out p99.9 (ms)", "results.latency.p999_ms", "low"),
               ("server CPU (s)", "server.cpu_used_secs", "low"),
               ("server CPU per write, steady (us)", "results.steady_window.server_cpu_us_per_write", "low")],
    "saturate": [("highest sustained update_draft/s", "results.highest_sustained_rate", "high"),
                 ("p99 at that rate (ms)", "results.best.latency.p99_ms", "low")],
    "sync": [],
}[scenario]
peers = runs[1:]
print(f"== {scenario}: chatsync vs {', '.join(n for n, _ in peers)} (same bench, same machine, one run) ==")
header = f"{'':38} {'chatsync':>12}" + "".join(f" {n:>12}" for n, _ in peers) + "".join(f" {'vs ' + n:>10}" for n, _ in peers)
print(header)
fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
for label, path, better in rows:
    x = get(a, path)
    line = f"{label:38} {fmt(x):>12}"
    ratios = ""
    for _, d in peers:
        y = get(d, path)
        line += f" {fmt(y):>12}"
        r = ""
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x and y:
            r = f"{(x / y if better == 'high' else y / x):.1f}x"
        ratios += f" {r:>10}"
    print(line + ratios)
b = dict(peers).get("python") or (peers[0][1] if peers else {})
if scenario == "saturate" and peers:
    # p99 of each server at the python peer's highest sustained rate (same offered load).
    rate = get(b, "results.highest_sustained_rate")
    steps = {s.get("offered_rate"): s for s in (get(a, "results.steps") or [])}
    if rate in steps:
        x, y = steps[rate]["latency"]["p99_ms"], get(b, "results.best.latency.p99_ms")
        print(f"{'p99 at the peer best rate ' + str(rate) + '/s (ms)':38} {x:>12.2f} {y:>12.2f} {y / x:>7.1f}x")
if scenario == "sync":
    for size, t in (a.get("server_time") or {}).items():
        print(f"chatsync server time, {size} chats: p50 {t['p50_ms']:.2f} ms, p99 {t['p99_ms']:.2f} ms")
    for name, d in runs:
        for r in get(d, "results.sizes") or []:
            lat = r.get('latency') or {}
            print(f"{name} round trip, {r.get('chats')} chats: p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms, reply {r.get('reply_bytes')} bytes")
PY
