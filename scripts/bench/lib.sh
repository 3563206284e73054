# Shared helpers for the scripts in scripts/bench/ (sourced, not run): pick a free loopback port,
# wait for a server to listen, and stop a background server (SIGTERM, then SIGKILL) on exit.

# A free TCP port on 127.0.0.1 (asks the kernel for one).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_listen PORT PID SECS: wait until 127.0.0.1:PORT accepts connections; fail if PID dies or SECS pass.
wait_listen() {
    local port=$1 pid=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "server (pid $pid) exited before listening" >&2
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "server did not listen on 127.0.0.1:$port within ${secs}s" >&2
    return 1
}

# stop_pid PID: SIGTERM, wait up to 15 s, then SIGKILL. Only the given process id is signalled.
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    echo "pid $pid did not stop after SIGTERM; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# json_get FILE PATH: prints a value from a JSON file, PATH like idle_server.rss_per_connection_kib.
json_get() {
    python3 - "$1" "$2" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("n/a" if v is None else (f"{v:.1f}" if isinstance(v, float) else v))
PY
}

# print_idle_summary FILE LABEL: the headline numbers of an idle run.
print_idle_summary() {
    local f=$1 label=$2
    echo
    echo "== $label =="
    echo "connections held:                 $(json_get "$f" results.held) of $(json_get "$f" results.requested) (failed: $(json_get "$f" results.failed))"
    echo "connect+auth latency p50/p99 ms:  $(json_get "$f" results.connect_latency.p50_ms) / $(json_get "$f" results.connect_latency.p99_ms)"
    echo "server RSS before / after (KiB):  $(json_get "$f" idle_server.rss_before_kib) / $(json_get "$f" idle_server.rss_after_hold_kib)"
    echo "RSS per idle authenticated connection: $(json_get "$f" idle_server.rss_per_connection_kib) KiB"
    echo "server CPU per connection (ms):   $(json_get "$f" idle_server.cpu_per_connection_ms)"
}

# run_bench PORT TOKENS PID OUT LABEL LOG SCENARIO [options...]: runs chatsync-bench against
# 127.0.0.1:PORT with the common options (server sampling, JSON and SVG to OUT.json / OUT.svg), prints
# the idle summary for `idle`, and on failure the tail of the server's LOG. Sets `status`.
run_bench() {
    local port=$1 tokens=$2 pid=$3 out=$4 label=$5 log=$6 scenario=$7
    shift 7
    status=0
    timeout 1000 target/release/chatsync-bench --url "ws://127.0.0.1:$port/v1/ws" --tokens "$tokens" \
        --server-pid "$pid" --json-out "$out.json" --plot "$out.svg" --max-runtime 900 \
        "$scenario" "$@" || status=$?
    if [ "$status" -eq 0 ] && [ "$scenario" = idle ]; then
        print_idle_summary "$out.json" "$label: idle connections"
    fi
    if [ "$status" -ne 0 ]; then
        echo "chatsync-bench exited with $status; last lines of the $label log:" >&2
        tail -20 "$log" >&2 || true
    fi
}

# peer_prelude SCENARIO: what both peer scripts do first: checks the scenario, sets USERS and DEVICES
# (defaults: idle 5000 x 2; fanout 2000 x 3; saturate and sync 200 x 2) and OUT_DIR, raises the file
# limit and builds chatsync-bench.
peer_prelude() {
    case "$1" in
        idle) DEF_USERS=5000; DEF_DEVICES=2 ;;
        fanout) DEF_USERS=2000; DEF_DEVICES=3 ;;
        saturate | sync) DEF_USERS=200; DEF_DEVICES=2 ;;
        *) echo "unknown scenario $1 (idle, fanout, saturate, sync)" >&2; exit 2 ;;
    esac
    USERS=${USERS:-$DEF_USERS}
    DEVICES=${DEVICES:-$DEF_DEVICES}
    OUT_DIR=${OUT_DIR:-target/bench}
    mkdir -p "$OUT_DIR"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    timeout 900 cargo build --release -q -p chatsync-bench
}
