#!/usr/bin/env bash
# Probes one three-member coordinator cluster under puts: where the CPU goes (leader and each
# follower, user and system, µs per put, and by thread), how many commands a Raft entry
# carried, and how long each member's Raft snapshots took. Complements
# scripts/bench-cluster-vs-etcd.sh (which compares with etcd) when a change is weighed against
# the build before it: run it with COORDINATOR_BIN pointing at each build in turn, alternating,
# a fresh cluster each time.
#
#   scripts/probe-cluster.sh [clients] [duration]          (defaults: 64 10s)
#
# Environment:
#   COORDINATOR_BIN [target/release/coordinator]  the member binary
#   BENCH_BIN       [target/release/bench]        the bench client
#   PROBE_FLAGS     [unset]  extra member flags, e.g. "--snapshot-count 10000000"
#   BENCH_FLAGS     [unset]  extra bench flags, e.g. "--threads 1"
#   PROBE_PERF      [unset]  leader|follower: `perf record` that member during the run; the
#                            data file is kept and named at the end
#   PROBE_PERF_CALLGRAPH [-g]  e.g. "--call-graph dwarf,8192"
# Everything runs on 127.0.0.1 at free ports in a temporary directory; only the processes
# this script started are stopped (by PID, from an EXIT trap), and the run is bounded.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLIENTS=${1:-64}
DURATION=${2:-10s}
COORD=${COORDINATOR_BIN:-$ROOT/target/release/coordinator}
BENCH=${BENCH_BIN:-$ROOT/target/release/bench}
[[ -x $COORD && -x $BENCH ]] || { echo "build first: cargo build --release -p coordinator --bins" >&2; exit 1; }
command -v etcdctl >/dev/null || bash "$ROOT/scripts/install-deps.sh"

TMP=$(mktemp -d)
PIDS=()
PERF_PID=
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [[ -n ${PROBE_PERF:-} ]] || rm -rf "$TMP"
}
trap cleanup EXIT
# Nine distinct free ports, all held open until all are chosen (ports chosen one process at a
# time can repeat: the kernel may hand a just-released port out again, and a member that cannot
# bind its port exits, which once made a run end without a row).
read -r -a ports < <(python3 -c '
import socket
held = []
for _ in range(9):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))')
client=() peer=() metrics=() initial=""
for i in 1 2 3; do
    client[i]=${ports[3 * i - 3]} peer[i]=${ports[3 * i - 2]} metrics[i]=${ports[3 * i - 1]}
    initial+="${initial:+,}n$i=http://127.0.0.1:${peer[i]}"
done
for i in 1 2 3; do
    # shellcheck disable=SC2086 # PROBE_FLAGS is a list of flags
    "$COORD" --name "n$i" --data-dir "$TMP/d$i" --listen-client-urls "http://127.0.0.1:${client[i]}" \
        --listen-peer-urls "http://127.0.0.1:${peer[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peer[i]}" \
        --listen-metrics-urls "http://127.0.0.1:${metrics[i]}" --initial-cluster "$initial" \
        ${PROBE_FLAGS:-} >"$TMP/d$i.log" 2>&1 &
    PIDS+=($!)
done
endpoints="127.0.0.1:${client[1]},127.0.0.1:${client[2]},127.0.0.1:${client[3]}"
leader=
for _ in $(seq 1 100); do
    leader=$(timeout 5 etcdctl --endpoints="$endpoints" endpoint status 2>/dev/null | awk -F', ' '$5=="true"{print $1}') || true
    [[ -n $leader ]] && break
    sleep 0.1
done
[[ -n $leader ]] || { echo "no leader elected; logs in $TMP" >&2; exit 1; }
li=0
for i in 1 2 3; do [[ "127.0.0.1:${client[i]}" == "$leader" ]] && li=$i; done
fi_=$((li % 3 + 1))

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# CPU ticks (user + system) of a member's threads, summed by thread name without its trailing
# number ("sled-io-3" counts as "sled-io"): "name ticks" lines.
thread_ticks() {
    local t
    for t in /proc/"$1"/task/*; do
        printf '%s %s\n' "$(cat "$t/comm" 2>/dev/null)" "$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}')"
    done | awk 'NF == 2 {n = $1; sub(/-[0-9]+$/, "", n); a[n] += $2} END {for (k in a) print k, a[k]}'
}
# A member that exited (say, it could not bind a port) is reported with its log, not by an
# error reading its /proc entry.
alive() {
    local i
    for i in 1 2 3; do
        if ! kill -0 "${PIDS[i - 1]}" 2>/dev/null; then
            echo "member n$i exited; the end of its log:" >&2
            tail -20 "$TMP/d$i.log" >&2
            exit 1
        fi
    done
}
alive
declare -A before
for i in 1 2 3; do
    before[$i]=$(ticks "${PIDS[i-1]}")
    thread_ticks "${PIDS[i-1]}" >"$TMP/threads$i.before"
done
if [[ -n ${PROBE_PERF:-} ]]; then
    target=$li
    [[ $PROBE_PERF == follower ]] && target=$fi_
    # shellcheck disable=SC2086 # the call-graph option is a list of flags
    perf record -q -F 999 ${PROBE_PERF_CALLGRAPH:--g} -p "${PIDS[target-1]}" -o "$TMP/perf.data" >/dev/null 2>&1 &
    PERF_PID=$!
fi
# shellcheck disable=SC2086 # BENCH_FLAGS is a list of flags
row=$(timeout 600 "$BENCH" ${BENCH_FLAGS:-} --endpoints "$leader" --workload put --clients "$CLIENTS" --duration "$DURATION" --json 2>/dev/null | tail -1)
if [[ -n $PERF_PID ]]; then kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true; fi
echo "$row"
alive
hz=$(getconf CLK_TCK)
reqs=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$row")
for i in 1 2 3; do
    role=follower
    [[ $i == "$li" ]] && role=leader
    read -r u0 s0 <<<"${before[$i]}"
    read -r u1 s1 <<<"$(ticks "${PIDS[i-1]}")"
    python3 - "$i" "$role" "$u0" "$s0" "$u1" "$s1" "$hz" "$reqs" <<'PY'
import sys
i, role = sys.argv[1:3]
u0, s0, u1, s1, hz, reqs = map(int, sys.argv[3:])
u = (u1 - u0) / hz * 1e6 / reqs
s = (s1 - s0) / hz * 1e6 / reqs
print(f"n{i} {role}: user {u:.1f} + system {s:.1f} = {u + s:.1f} µs CPU per put")
PY
    # The same CPU by thread: the request thread(s) ("coordinator", or Tokio's workers), the
    # Raft log's writer, sled's I/O pool and the key space's write-back. A thread that started
    # during the run counts from zero; one that ended is missing.
    thread_ticks "${PIDS[i-1]}" >"$TMP/threads$i.after"
    python3 - "$i" "$TMP/threads$i.before" "$TMP/threads$i.after" "$hz" "$reqs" <<'PY'
import sys
i, before, after = sys.argv[1:4]
hz, reqs = int(sys.argv[4]), int(sys.argv[5])
read = lambda f: {k: int(v) for k, v in (line.split() for line in open(f) if line.strip())}
b, a = read(before), read(after)
per = {k: (a[k] - b.get(k, 0)) / hz * 1e6 / reqs for k in a}
print(f"n{i} by thread (µs per put): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05))
PY
done
curl -s "127.0.0.1:${metrics[li]}/metrics" | awk '/^coordinator_raft_entry_commands_(sum|count)/ {v[$1]=$2}
    END {c=v["coordinator_raft_entry_commands_count"]; if (c > 0) printf "commands per Raft entry (leader): %.1f\n", v["coordinator_raft_entry_commands_sum"] / c}'
# Snapshot durations: from "build snapshot" to its "BuildSnapshot" completion in each log.
for i in 1 2 3; do
    python3 - "$TMP/d$i.log" "n$i" <<'PY'
import re, sys
from datetime import datetime
start, took = None, []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"(\S+Z)", line)
    if not m:
        continue
    t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ")
    if line.rstrip().endswith("build snapshot"):
        start = t
    elif "command done: BuildSnapshot" in line and start is not None:
        took.append(round((t - start).total_seconds() * 1000))
        start = None
print(f"{sys.argv[2]} snapshots: {len(took)}" + (f" ({', '.join(map(str, took))} ms)" if took else ""))
PY
done
[[ -n ${PROBE_PERF:-} ]] && echo "perf data: $TMP/perf.data (perf report -i it)"
exit 0
