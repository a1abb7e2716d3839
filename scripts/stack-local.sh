#!/usr/bin/env bash
# The whole stack as local processes, for a machine without Docker (and for quick experiments):
# the same services, ports and defaults as compose/docker-compose.yml, all on 127.0.0.1.
#
#   scripts/stack-local.sh            build (if needed), start everything, wait until healthy,
#                                     then run until Ctrl-C, which stops every process it started
#   scripts/stack-local.sh --fresh    the same on empty coordinator data
#
# Data and logs: ${STACK_DIR:-.stack-local}/ (coordinator-N data dirs, logs/<process>.log).
#
#   8080 lb-gateway proxy, 9103 its admin        2379/2479/2579 coordinators (2381/2481/2581 admin)
#   http://127.0.0.1:9103/ui/ the web dashboard (served by lb-gateway's admin server)
#   9200/9201/9101 registry-svc-1 (gRPC/REST/admin), registry-svc-2 on 9210/9211/9111
#   9300/9301/9102 config-svc-1   (gRPC/REST/admin), config-svc-2   on 9310/9311/9112
#   demo-1..3: 8501..8503 (HTTP + gRPC), admin 9141..9143 (reached through the gateway on 8080)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR="${STACK_DIR:-$ROOT/.stack-local}"
TARGET=x86_64-unknown-linux-gnu
TD=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TD/$TARGET/release
BINS=(coordinator registry-svc config-svc lb-gateway demo-svc)

if [[ ${1:-} == --fresh ]]; then rm -rf "$DIR"; shift; fi
if [[ $# -gt 0 ]]; then echo "usage: $0 [--fresh]" >&2; exit 64; fi

echo "==> building release binaries (${BINS[*]})"
args=()
for b in "${BINS[@]}"; do args+=(-p "$b" --bin "$b"); done
# The same static build as the images', so one build serves both.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$TARGET" "${args[@]}"

for port in 8080 9103 2379 2380 2381 2479 2480 2481 2579 2580 2581 9101 9200 9201 9111 9210 9211 \
  9102 9300 9301 9112 9310 9311 8501 8502 8503 9141 9142 9143; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: 127.0.0.1:$port is already in use (is the compose stack up? scripts/compose.sh -p platform -f compose/docker-compose.yml down)" >&2
    exit 1
  fi
done

mkdir -p "$DIR/logs"
PIDS=()
NAMES=()
stop_all() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping ${#PIDS[@]} processes"
  # Reverse start order: applications first, coordinators last.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
  local deadline=$((SECONDS + 15))
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    while kill -0 "${PIDS[i]}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "${PIDS[i]}" 2>/dev/null; then
      echo "    ${NAMES[i]} (pid ${PIDS[i]}) did not stop in time; SIGKILL"
      kill -KILL "${PIDS[i]}" 2>/dev/null || true
    fi
    wait "${PIDS[i]}" 2>/dev/null || true
  done
  echo "==> stopped (data kept in $DIR; --fresh starts empty)"
}
trap 'stop_all; exit 0' INT TERM
trap stop_all EXIT

SETSID=$(command -v setsid || true)

# start NAME BINARY [ENV=VALUE...]: runs BINARY with the environment given, logging to a file.
start() {
  local name=$1 bin=$2
  shift 2
  # Its own session: Ctrl-C reaches only this script, which stops the processes in order.
  $SETSID env LOG_FORMAT=text RUST_LOG="${RUST_LOG:-info}" "$@" "$BIN/$bin" >"$DIR/logs/$name.log" 2>&1 &
  PIDS+=($!)
  NAMES+=("$name")
  echo "    $name: pid $!"
}

# wait_ok NAME URL_PATH ADMIN_PORT: polls the admin server until it answers 200.
wait_ok() {
  local name=$1 path=$2 port=$3 deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null "http://127.0.0.1:$port$path" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "error: $name is not answering 200 on :$port$path after 60 s; its log:" >&2
      tail -n 20 "$DIR/logs/$name.log" >&2
      exit 1
    fi
    for i in "${!PIDS[@]}"; do
      if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
        echo "error: ${NAMES[i]} exited; its log:" >&2
        tail -n 20 "$DIR/logs/${NAMES[i]}.log" >&2
        exit 1
      fi
    done
    sleep 0.3
  done
}

command -v curl >/dev/null || { echo "error: curl is needed to wait for health" >&2; exit 1; }
t0=$SECONDS
echo "==> coordinators"
IC=coordinator-1=http://127.0.0.1:2380,coordinator-2=http://127.0.0.1:2480,coordinator-3=http://127.0.0.1:2580
for i in 1 2 3; do
  p=$((i + 22))
  start "coordinator-$i" coordinator ETCD_NAME="coordinator-$i" ETCD_DATA_DIR="$DIR/coordinator-$i" \
    ETCD_LISTEN_CLIENT_URLS="http://127.0.0.1:${p}79" ETCD_ADVERTISE_CLIENT_URLS="http://127.0.0.1:${p}79" \
    ETCD_LISTEN_PEER_URLS="http://127.0.0.1:${p}80" ETCD_INITIAL_ADVERTISE_PEER_URLS="http://127.0.0.1:${p}80" \
    ETCD_INITIAL_CLUSTER="$IC" ETCD_INITIAL_CLUSTER_TOKEN=platform-local \
    ETCD_LISTEN_METRICS_URLS="http://127.0.0.1:${p}81"
done
for i in 1 2 3; do wait_ok "coordinator-$i" /readyz "$((i + 22))81"; done
COORDS=http://127.0.0.1:2379,http://127.0.0.1:2479,http://127.0.0.1:2579

echo "==> registry-svc and config-svc, two replicas each"
for i in 1 2; do
  o=$(((i - 1) * 10))
  start "registry-svc-$i" registry-svc REGISTRY_ADMIN_LISTEN="127.0.0.1:$((9101 + o))" \
    REGISTRY_GRPC_LISTEN="127.0.0.1:$((9200 + o))" REGISTRY_HTTP_LISTEN="127.0.0.1:$((9201 + o))" \
    REGISTRY_COORDINATOR_ENDPOINTS="$COORDS" REGISTRY_REPLICA_ID="registry-svc-$i"
  start "config-svc-$i" config-svc CONFIG_ADMIN_LISTEN="127.0.0.1:$((9102 + o))" \
    CONFIG_GRPC_LISTEN="127.0.0.1:$((9300 + o))" CONFIG_HTTP_LISTEN="127.0.0.1:$((9301 + o))" \
    CONFIG_COORDINATOR_ENDPOINTS="$COORDS"
done
for i in 1 2; do
  o=$(((i - 1) * 10))
  wait_ok "registry-svc-$i" /healthz $((9101 + o))
  wait_ok "config-svc-$i" /healthz $((9102 + o))
done
REGS=http://127.0.0.1:9200,http://127.0.0.1:9210
CFGS=http://127.0.0.1:9300,http://127.0.0.1:9310

echo "==> lb-gateway and demo-1..3"
start lb-gateway lb-gateway LB_GATEWAY_LISTEN=127.0.0.1:8080 LB_GATEWAY_ADMIN_LISTEN=127.0.0.1:9103 \
  LB_GATEWAY_ROUTES="$ROOT/compose/gateway-routes.toml" LB_GATEWAY_REGISTRY_ENDPOINTS="$REGS" \
  LB_GATEWAY_WORKER_THREADS=2 LB_GATEWAY_DASHBOARD_COORDINATOR_ENDPOINTS="$COORDS" \
  LB_GATEWAY_DASHBOARD_CONFIG_URL=http://127.0.0.1:9301,http://127.0.0.1:9311 \
  LB_GATEWAY_DASHBOARD_CONFIG_NAMESPACES=demo
for i in 1 2 3; do
  start "demo-$i" demo-svc DEMO_INSTANCE_ID="demo-$i" DEMO_LISTEN="127.0.0.1:$((8500 + i))" \
    DEMO_ADMIN_LISTEN="127.0.0.1:$((9140 + i))" DEMO_REGISTRY_ENDPOINTS="$REGS" \
    DEMO_CONFIG_ENDPOINTS="$CFGS" DEMO_TTL=10s
done
wait_ok lb-gateway /healthz 9103
for i in 1 2 3; do wait_ok "demo-$i" /readyz $((9140 + i)); done

echo "==> all ${#PIDS[@]} processes healthy after $((SECONDS - t0)) s; logs in $DIR/logs. Try:"
echo "    curl -s 127.0.0.1:8080/users/alice"
echo "    the dashboard: http://127.0.0.1:9103/ui/"
echo "    ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:2379,127.0.0.1:2479,127.0.0.1:2579 endpoint status -w table"
echo "==> Ctrl-C stops everything"
# Wait until a signal arrives or a process dies.
while :; do
  for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      echo "error: ${NAMES[i]} exited; see $DIR/logs/${NAMES[i]}.log" >&2
      exit 1
    fi
  done
  sleep 1
done
