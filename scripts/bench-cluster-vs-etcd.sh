#!/usr/bin/env bash
# Three-member coordinator cluster vs three-member etcd 3.4 cluster, on loopback, same bench.
# Alternates the two, BENCH_REPS times; prints one Markdown row per run (req/s, p50, p99, and the
# CPU of all three server processes per request). Stops only the processes it started.
# BENCH_WORKER_THREADS=N (unset: each server's default, one thread per CPU) runs the coordinators
# with `--worker-threads N` and etcd with GOMAXPROCS=N: six servers share this machine's CPUs.
# BENCH_CLIENT_THREADS=N (unset: one per CPU) gives the load generator N threads (`bench
# --threads`; 1 = Tokio's single-threaded scheduler, the cheapest per request).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${BENCH_DURATION:-5s}
REPS=${BENCH_REPS:-2}
CLIENTS=${BENCH_CLIENTS:-1,64}
BIN=${CARGO_TARGET_DIR:-target}/release
THREADS=${BENCH_WORKER_THREADS:-}
CLIENT_THREADS=${BENCH_CLIENT_THREADS:-0}
command -v etcd >/dev/null || bash scripts/install-deps.sh
cargo build --release -q -p coordinator --bins
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_cluster() { # kind -> sets CPIDS and ENDPOINTS
  local kind=$1; CPIDS=(); local c=() p=() m=() ic="" token="bench-$RANDOM"
  for i in 1 2 3; do c[$i]=$(port); p[$i]=$(port); m[$i]=$(port); ic+="${ic:+,}n$i=http://127.0.0.1:${p[$i]}"; done
  for i in 1 2 3; do
    local d="$TMP/$kind-$i-$RANDOM"
    if [ "$kind" = etcd ]; then
      GOMAXPROCS=${THREADS:-${GOMAXPROCS:-}} etcd --name n$i --data-dir "$d" --listen-client-urls http://127.0.0.1:${c[$i]} \
        --advertise-client-urls http://127.0.0.1:${c[$i]} --listen-peer-urls http://127.0.0.1:${p[$i]} \
        --initial-advertise-peer-urls http://127.0.0.1:${p[$i]} --initial-cluster "$ic" \
        --initial-cluster-token "$token" >"$d.log" 2>&1 &
    else
      "$BIN/coordinator" --name n$i --data-dir "$d" --listen-client-urls http://127.0.0.1:${c[$i]} \
        --listen-peer-urls http://127.0.0.1:${p[$i]} --initial-advertise-peer-urls http://127.0.0.1:${p[$i]} \
        --listen-metrics-urls http://127.0.0.1:${m[$i]} --initial-cluster "$ic" \
        ${THREADS:+--worker-threads "$THREADS"} >"$d.log" 2>&1 &
    fi
    CPIDS+=($!); PIDS+=($!)
  done
  ENDPOINTS="127.0.0.1:${c[1]},127.0.0.1:${c[2]},127.0.0.1:${c[3]}"
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints="$ENDPOINTS" endpoint status 2>/dev/null | grep -q true && break
    sleep 0.1
  done
  LEADER=$(ETCDCTL_API=3 etcdctl --endpoints="$ENDPOINTS" endpoint status | awk -F', ' '$5=="true"{print $1}')
}
cpu() { local t=0; for p in "${CPIDS[@]}"; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }

echo "| server | workload | clients | req/s | p50 ms | p99 ms | cluster CPU µs/req |"
echo "|---|---|---:|---:|---:|---:|---:|"
HZ=$(getconf CLK_TCK)
for rep in $(seq 1 "$REPS"); do
  for kind in coordinator etcd; do
    start_cluster $kind
    for wl in put range; do
      for n in ${CLIENTS//,/ }; do
        before=$(cpu)
        row=$("$BIN/bench" --threads "$CLIENT_THREADS" --endpoints "$LEADER" --workload $wl --clients "$n" --duration "$DUR" --json 2>/dev/null | tail -1)
        after=$(cpu)
        python3 - "$kind" "$wl" "$n" "$row" "$before" "$after" "$HZ" <<'PY'
import json, sys
kind, wl, n, row, b, a, hz = sys.argv[1:]
r = json.loads(row)
reqs = r.get("requests", 0) or 1
cpu_us = (int(a) - int(b)) / int(hz) * 1e6 / reqs
print(f"| {kind} | {wl} | {n} | {r.get('rps', 0):.0f} | {r.get('p50_ms', 0):.2f} | {r.get('p99_ms', 0):.2f} | {cpu_us:.0f} |")
PY
      done
    done
    for p in "${CPIDS[@]}"; do kill "$p"; done; wait "${CPIDS[@]}" 2>/dev/null || true
  done
done
