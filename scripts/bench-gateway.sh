#!/usr/bin/env bash
# Benchmarks lb-gateway against nginx and HAProxy as consistent-hashing reverse proxies, in one
# run with the same backends, and prints a Markdown table ready for BENCHMARKS.md.
#
# Setup (everything on 127.0.0.1, at free ports, in a temporary directory):
#   - backends: one nginx process (1 worker) serving BACKENDS ports, each answering
#     `200 ok` with a 2-byte body;
#   - a coordinator and a registry-svc, with the backends registered (TTL 1 h) — the gateway's
#     backend set comes from the registry watch, as in production;
#   - the three proxies, each with PROXY_THREADS workers (gateway: Tokio worker threads;
#     nginx: worker processes; HAProxy: nbthread), each hashing the request URI consistently:
#     lb-gateway `hash = "uri"` (ring, bounded loads ε = 0.25, its defaults), nginx
#     `hash $request_uri consistent`, HAProxy `balance uri` + `hash-type consistent`. Upstream
#     keep-alive on in all three; access logs off in all three; all three append the client to
#     X-Forwarded-For (the gateway always does; it also always sends a traceparent).
#
# Each run is `wrk -t WRK_THREADS -c CONNECTIONS -d DURATION --latency` with a Lua script that
# spreads requests over 1000 paths (`/item/0` .. `/item/999`), against: one backend directly,
# the gateway, nginx, HAProxy. The targets alternate (REPS rounds of all four, the proxies'
# order rotated from round to round) so that noise
# from other work on a shared machine hits all alike; the table reports each target's median
# run. "CPU/req" is the proxy's user+system CPU time (all its processes and threads, from
# /proc) during the run divided by the requests served. Each run's log line also gives, per
# request: the backends' and wrk's CPU, the machine's interrupt and softirq CPU (loopback
# delivery is accounted there, to no process), how often the proxy and the backends went to
# sleep, and TCP segments; and the machine's idle cores. A second table gives their medians per
# target: what a request cost the whole machine, and how much of it stayed idle.
#
# Only processes this script started are stopped (by PID, from an EXIT trap); the whole run is
# bounded by `timeout`. Installs wrk, nginx and haproxy with apt-get if missing.
#
# Environment (defaults in brackets):
#   BENCH_DURATION [10s]  BENCH_REPS [3]  BENCH_CONNECTIONS [64]  BENCH_WRK_THREADS [1]
#   BENCH_PROXY_THREADS [1]  BENCH_BACKENDS [4]  BENCH_SKIP_BUILD [0]  BENCH_MAX_TIME [900]
#   BENCH_WRK_OUT [unset]  a path prefix: keep each run's wrk output in PREFIX.TARGET.ROUND
#   BENCH_PROXY_CPU [unset]  e.g. 0.5: give each proxy that many cores' worth of CPU time (a CFS
#                         quota, the same for all three; needs root), which makes the proxy
#                         the bottleneck instead of the core wrk and the backend share
#   BENCH_PROFILE [unset]  a file: `perf record -g` the gateway (or BENCH_PROFILE_TARGET: nginx,
#                         haproxy, with their workers) for BENCH_PROFILE_SECONDS [3] s of its
#                         first run into it
#                         (BENCH_PERF_CALLGRAPH replaces `-g`, e.g. `--call-graph dwarf`)
#   BENCH_GATEWAY_HYPER [0]  1 or `client`: also run a second gateway with `--http1-client hyper`
#                         (hyper's HTTP/1.1 client instead of the gateway's own) as target
#                         lb-gateway-hyper; `server`: the second gateway with `--http1-server hyper`
#                         (hyper's HTTP/1.1 server instead of the listener's fast path)
#   BENCH_GATEWAY_BASELINE [unset]  another lb-gateway binary (say, the build before a change):
#                         also run it, with the gateway's flags, as target lb-gateway-baseline,
#                         in every round (in the rotation with the others)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10s}
REPS=${BENCH_REPS:-3}
CONNS=${BENCH_CONNECTIONS:-64}
WRK_THREADS=${BENCH_WRK_THREADS:-1}
PROXY_THREADS=${BENCH_PROXY_THREADS:-1}
NBACKENDS=${BENCH_BACKENDS:-4}
MAX_TIME=${BENCH_MAX_TIME:-900}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The whole run is bounded: re-exec under timeout once.
if [[ -z ${BENCH_GATEWAY_BOUNDED:-} ]]; then
    export BENCH_GATEWAY_BOUNDED=1
    exec timeout --foreground -k 10 "$MAX_TIME" "$0" "$@"
fi

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building lb-gateway, registry-svc and coordinator (release)"
    (cd "$ROOT" && cargo build --release -p lb-gateway -p registry-svc -p coordinator --bins) >&2
fi
GATEWAY_BIN=$TARGET_DIR/release/lb-gateway
REGISTRY_BIN=$TARGET_DIR/release/registry-svc
COORD_BIN=$TARGET_DIR/release/coordinator
for b in "$GATEWAY_BIN" "$REGISTRY_BIN" "$COORD_BIN"; do
    [[ -x $b ]] || die "missing $b"
done

TMP=$(mktemp -d /tmp/bench-gateway.XXXXXX)
declare -A RUNNING=()

stop_pid() {
    local pid=$1 i
    [[ -n ${RUNNING[$pid]:-} ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "RUNNING[$pid]"
}

CGROUPS=()
cleanup() {
    local pid cg
    for pid in "${!RUNNING[@]}"; do stop_pid "$pid"; done
    for cg in "${CGROUPS[@]}"; do rmdir "$cg" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free TCP port on 127.0.0.1 (bound and released by the kernel's choice).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Starts a process in the background, logging to $TMP/NAME.log; its PID is left in LAST_PID.
# (Not called in $(...): the PID must be recorded in this shell for the EXIT trap.)
LAST_PID=
start() { # name, command...
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    RUNNING[$LAST_PID]=$name
}

wait_http() { # url, what
    local i
    for ((i = 0; i < 300; i++)); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    die "$2 did not answer at $1 (see $TMP)"
}

# --- backends: one nginx, one worker, NBACKENDS ports ---
BACKEND_PORTS=()
for ((i = 0; i < NBACKENDS; i++)); do BACKEND_PORTS+=("$(free_port)"); done
mkdir -p "$TMP/backend"
{
    echo "worker_processes 1; daemon off; pid $TMP/backend/nginx.pid; error_log $TMP/backend/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; keepalive_requests 1000000; client_body_temp_path $TMP/backend;"
    for p in "${BACKEND_PORTS[@]}"; do
        echo "  server { listen 127.0.0.1:$p; location / { return 200 'ok'; } }"
    done
    echo "}"
} >"$TMP/backend/nginx.conf"
start backend "$NGINX" -c "$TMP/backend/nginx.conf" -p "$TMP/backend"
BACKEND_PID=$LAST_PID
wait_http "http://127.0.0.1:${BACKEND_PORTS[0]}/" "backend nginx"

# --- coordinator + registry, backends registered ---
CPORT=$(free_port)
start coordinator "$COORD_BIN" --data-dir "$TMP/coord" \
    --listen-client-urls "http://127.0.0.1:$CPORT" --listen-metrics-urls "http://127.0.0.1:$(free_port)"
COORD_PID=$LAST_PID
RGRPC=$(free_port)
RHTTP=$(free_port)
RADMIN=$(free_port)
start registry "$REGISTRY_BIN" --coordinator-endpoints "http://127.0.0.1:$CPORT" \
    --grpc-listen "127.0.0.1:$RGRPC" --http-listen "127.0.0.1:$RHTTP" --admin-listen "127.0.0.1:$RADMIN"
REGISTRY_PID=$LAST_PID
wait_http "http://127.0.0.1:$RADMIN/readyz" "registry-svc"
for i in "${!BACKEND_PORTS[@]}"; do
    curl -fsS -o /dev/null -X POST "http://127.0.0.1:$RHTTP/v1/instances" -H 'content-type: application/json' \
        -d "{\"namespace\":\"bench\",\"service\":\"web\",\"instance_id\":\"b$i\",\"address\":\"127.0.0.1\",\"port\":${BACKEND_PORTS[$i]},\"ttl_seconds\":3600}" ||
        die "registering backend $i failed"
done

# --- the three proxies ---
GPORT=$(free_port)
GADMIN=$(free_port)
cat >"$TMP/routes.toml" <<EOF
[gateway]
max_in_flight = 100000

[[routes]]
name = "web"
backend = { namespace = "bench", service = "web" }
hash = "uri"
circuit_breaker = { max_requests = 100000 }
EOF
start gateway "$GATEWAY_BIN" --listen "127.0.0.1:$GPORT" --admin-listen "127.0.0.1:$GADMIN" \
    --routes "$TMP/routes.toml" --registry-endpoints "http://127.0.0.1:$RGRPC" \
    --worker-threads "$PROXY_THREADS" --access-log false --http1-server own
GATEWAY_PID=$LAST_PID
wait_http "http://127.0.0.1:$GADMIN/readyz" "lb-gateway"
TARGETS=(direct lb-gateway nginx haproxy)
HYPER_PART=
case ${BENCH_GATEWAY_HYPER:-0} in
0) ;;
1 | client) HYPER_PART=client ;;
server) HYPER_PART=server ;;
*) die "BENCH_GATEWAY_HYPER must be 0, 1, client or server" ;;
esac
if [[ -n $HYPER_PART ]]; then
    G2PORT=$(free_port)
    G2ADMIN=$(free_port)
    start gateway-hyper "$GATEWAY_BIN" --listen "127.0.0.1:$G2PORT" --admin-listen "127.0.0.1:$G2ADMIN" \
        --routes "$TMP/routes.toml" --registry-endpoints "http://127.0.0.1:$RGRPC" \
        --worker-threads "$PROXY_THREADS" --access-log false "--http1-$HYPER_PART" hyper
    GATEWAY2_PID=$LAST_PID
    wait_http "http://127.0.0.1:$G2ADMIN/readyz" "lb-gateway (hyper $HYPER_PART)"
    TARGETS+=(lb-gateway-hyper)
fi
if [[ -n ${BENCH_GATEWAY_BASELINE:-} ]]; then
    [[ -x $BENCH_GATEWAY_BASELINE ]] || die "missing $BENCH_GATEWAY_BASELINE"
    G3PORT=$(free_port)
    G3ADMIN=$(free_port)
    start gateway-baseline "$BENCH_GATEWAY_BASELINE" --listen "127.0.0.1:$G3PORT" --admin-listen "127.0.0.1:$G3ADMIN" \
        --routes "$TMP/routes.toml" --registry-endpoints "http://127.0.0.1:$RGRPC" \
        --worker-threads "$PROXY_THREADS" --access-log false --http1-server own
    GATEWAY3_PID=$LAST_PID
    wait_http "http://127.0.0.1:$G3ADMIN/readyz" "lb-gateway (baseline)"
    TARGETS+=(lb-gateway-baseline)
fi
for ((i = 0; i < 100; i++)); do
    [[ $(curl -fsS "http://127.0.0.1:$GADMIN/admin/backends" | grep -o '"instance_id"' | wc -l) == "$NBACKENDS" ]] && break
    sleep 0.1
done

NPORT=$(free_port)
mkdir -p "$TMP/nginx"
{
    echo "worker_processes $PROXY_THREADS; daemon off; pid $TMP/nginx/nginx.pid; error_log $TMP/nginx/error.log warn;"
    echo "events { worker_connections 8192; }"
    echo "http { access_log off; keepalive_requests 1000000; client_body_temp_path $TMP/nginx;"
    echo "  proxy_temp_path $TMP/nginx;"
    echo "  upstream web { hash \$request_uri consistent;"
    for p in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$p;"; done
    echo "    keepalive 256; }"
    echo "  server { listen 127.0.0.1:$NPORT; location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }"
    echo "}"
} >"$TMP/nginx/nginx.conf"
start nginx "$NGINX" -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx"
NGINX_PID=$LAST_PID
wait_http "http://127.0.0.1:$NPORT/item/1" "nginx proxy"

HPORT=$(free_port)
{
    echo "global"
    echo "  nbthread $PROXY_THREADS"
    echo "  maxconn 4000"
    echo "defaults"
    echo "  mode http"
    echo "  option http-keep-alive"
    echo "  http-reuse always"
    echo "  option forwardfor"
    echo "  timeout connect 1s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HPORT"
    echo "  default_backend be"
    echo "backend be"
    echo "  balance uri"
    echo "  hash-type consistent"
    for i in "${!BACKEND_PORTS[@]}"; do echo "  server b$i 127.0.0.1:${BACKEND_PORTS[$i]}"; done
} >"$TMP/haproxy.cfg"
start haproxy "$HAPROXY" -db -f "$TMP/haproxy.cfg"
HAPROXY_PID=$LAST_PID
wait_http "http://127.0.0.1:$HPORT/item/1" "haproxy"

cat >"$TMP/paths.lua" <<'EOF'
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/item/" .. (n % 1000))
end
EOF

# CPU ticks of a process and all its children (nginx workers): "user+system user".
cpu_ticks() {
    local pid=$1 total=0 user=0 p u s
    for p in $pid $(pgrep -P "$pid" || true); do
        [[ -r /proc/$p/stat ]] || continue
        read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat")
        total=$((total + u + s))
        user=$((user + u))
    done
    echo "$total $user"
}
HZ=$(getconf CLK_TCK)

# Voluntary context switches (the times a thread went to sleep) of a process, its threads and
# its children's.
switches() {
    local pid=$1 total=0 p n
    for p in $pid $(pgrep -P "$pid" || true); do
        for n in $(awk '/^voluntary_ctxt_switches/ {print $2}' /proc/"$p"/task/*/status 2>/dev/null); do
            total=$((total + n))
        done
    done
    echo "$total"
}

# The machine's idle CPU ticks (idle + iowait, all CPUs, from /proc/stat).
idle_ticks() { awk '$1 == "cpu" {print $5 + $6}' /proc/stat; }

# The machine's interrupt and softirq CPU ticks (/proc/stat): the kernel's network work done
# outside any process's account, such as loopback delivery.
irq_ticks() { awk '$1 == "cpu" {print $7 + $8}' /proc/stat; }

# TCP segments sent by the machine so far (all of them are on loopback here).
tcp_segments() { awk '$1 == "Tcp:" && $12 ~ /^[0-9]+$/ {print $12}' /proc/net/snmp; }

# One run: name, port, pid (or 0 for none). Appends "name rps p99_ms cpu_us_per_req" to results.
run() {
    local name=$1 port=$2 pid=$3 out before after reqs rps p99 cpu user before_user after_user
    # Warm-up (connections, pools).
    wrk -t "$WRK_THREADS" -c "$CONNS" -d 1s -s "$TMP/paths.lua" "http://127.0.0.1:$port" >/dev/null 2>&1 || true
    before=0 before_user=0
    [[ $pid != 0 ]] && read -r before before_user < <(cpu_ticks "$pid")
    local backend_before backend_after _u sw_before=0 sw_after=0
    read -r backend_before _u < <(cpu_ticks "$BACKEND_PID")
    [[ $pid != 0 ]] && sw_before=$(switches "$pid")
    local bsw_before bsw_after idle_before idle_after t0 t1
    bsw_before=$(switches "$BACKEND_PID")
    idle_before=$(idle_ticks)
    local segs_before segs_after
    segs_before=$(tcp_segments)
    local irq_before irq_after
    irq_before=$(irq_ticks)
    t0=$(date +%s.%N)
    local prof=
    if [[ -n ${BENCH_PROFILE:-} && $name == "${BENCH_PROFILE_TARGET:-lb-gateway}" && ! -e $BENCH_PROFILE ]] && command -v perf >/dev/null; then
        local pids
        pids=$(echo "$pid" $(pgrep -P "$pid" || true) | tr ' ' ',')
        perf record -q -F 1999 ${BENCH_PERF_CALLGRAPH:--g} -p "$pids" -o "$BENCH_PROFILE" -- sleep "${BENCH_PROFILE_SECONDS:-3}" >/dev/null 2>&1 &
        prof=$!
    fi
    if [[ -n ${BENCH_STRACE:-} && $pid != 0 ]] && command -v strace >/dev/null; then
        local traced=$pid
        [[ $name == nginx ]] && traced=$(pgrep -P "$pid" | head -1)
        timeout -s INT 3 strace -c -f -p "$traced" -o "$BENCH_STRACE.$name" >/dev/null 2>&1 &
        prof=$!
    fi
    # wrk's own CPU time comes from bash's `time` (TIMEFORMAT: user and system seconds).
    local wrk_cpu
    out=$( { TIMEFORMAT='%U %S'; time wrk -t "$WRK_THREADS" -c "$CONNS" -d "$DURATION" --latency -s "$TMP/paths.lua" "http://127.0.0.1:$port" 2>/dev/null; } 2>"$TMP/wrk.time")
    wrk_cpu=$(awk '{print $1 + $2}' "$TMP/wrk.time")
    [[ -n ${BENCH_WRK_OUT:-} ]] && printf '%s\n' "$out" >"$BENCH_WRK_OUT.$name.$ROUND"
    read -r backend_after _u < <(cpu_ticks "$BACKEND_PID")
    [[ $pid != 0 ]] && sw_after=$(switches "$pid")
    bsw_after=$(switches "$BACKEND_PID")
    idle_after=$(idle_ticks)
    segs_after=$(tcp_segments)
    irq_after=$(irq_ticks)
    t1=$(date +%s.%N)
    [[ -n $prof ]] && wait "$prof" 2>/dev/null || true
    after=0 after_user=0
    [[ $pid != 0 ]] && read -r after after_user < <(cpu_ticks "$pid")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then
        log "$name: $(grep Non-2xx <<<"$out")"
    fi
    cpu=- user=-
    if [[ $pid != 0 && ${reqs:-0} -gt 0 ]]; then
        cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v r="$reqs" 'BEGIN {printf "%.1f", t / hz * 1e6 / r}')
        user=$(awk -v t=$((after_user - before_user)) -v hz="$HZ" -v r="$reqs" 'BEGIN {printf "%.1f", t / hz * 1e6 / r}')
    fi
    # The CPU the rest of the machine spent per request: the backends and wrk.
    local others=-
    if [[ ${reqs:-0} -gt 0 ]]; then
        others=$(awk -v b=$((backend_after - backend_before)) -v hz="$HZ" -v w="$wrk_cpu" -v r="$reqs" \
            -v s=$((sw_after - sw_before)) -v bs=$((bsw_after - bsw_before)) \
            -v i=$((idle_after - idle_before)) -v dt="$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" \
            -v sg=$((segs_after - segs_before)) -v q=$((irq_after - irq_before)) \
            'BEGIN {printf "backends %.1f, wrk %.1f, interrupts %.1f us/req; sleeps/req: proxy %.3f, backends %.3f; machine idle %.2f cores; %.2f TCP segments/req", b / hz * 1e6 / r, w * 1e6 / r, q / hz * 1e6 / r, s / r, bs / r, i / hz / dt, sg / r}')
    fi
    log "$name: $rps req/s, p99 $p99 ms, CPU $cpu us/req (user space $user; $others)"
    echo "$name $rps $p99 $cpu $ROUND $user" >>"$TMP/results"
    # For the machine table: backends + wrk, interrupts, idle cores, proxy sleeps per request.
    if [[ $others != - ]]; then
        awk -v n="$name" '{gsub(/,|;/, ""); print n, $2 + $4, $6, $15, $10}' <<<"$others" >>"$TMP/machine"
    fi
}

# What each target answers (wrk parses every byte of it): the answer head's size, once.
for t in "direct ${BACKEND_PORTS[0]}" "lb-gateway $GPORT" "nginx $NPORT" "haproxy $HPORT"; do
    read -r name port <<<"$t"
    curl -fsS -D "$TMP/answer" -o /dev/null "http://127.0.0.1:$port/item/1"
    log "$name answers with a $(wc -c <"$TMP/answer")-byte head: $(tr -d '\r' <"$TMP/answer" | sed 1d | cut -d: -f1 | tr '\n' ' ')"
done
# BENCH_PROXY_CPU: each proxy (all its processes) in a CPU cgroup of its own with that many
# cores' worth of CPU time (CFS quota over a 5 ms period), the same for all three.
if [[ -n ${BENCH_PROXY_CPU:-} ]]; then
    CG_ROOT=/sys/fs/cgroup/cpu
    [[ -w $CG_ROOT ]] || CG_ROOT=/sys/fs/cgroup/unified
    quota=$(awk -v c="$BENCH_PROXY_CPU" 'BEGIN {printf "%d", c * 5000}')
    ((quota >= 1000)) || die "BENCH_PROXY_CPU must be at least 0.2 (cores)"
    for t in "lb-gateway $GATEWAY_PID" "lb-gateway-baseline ${GATEWAY3_PID:-}" "lb-gateway-hyper ${GATEWAY2_PID:-}" \
        "nginx $NGINX_PID" "haproxy $HAPROXY_PID"; do
        read -r name pid <<<"$t"
        [[ -n ${pid:-} ]] || continue
        cg=$CG_ROOT/bench-gateway.$$.$name
        mkdir "$cg" || die "cannot make the cgroup $cg"
        CGROUPS+=("$cg")
        if [[ -e $cg/cpu.cfs_quota_us ]]; then
            echo 5000 >"$cg/cpu.cfs_period_us"
            echo "$quota" >"$cg/cpu.cfs_quota_us"
        else
            echo "$quota 5000" >"$cg/cpu.max"
        fi
        for p in $pid $(pgrep -P "$pid" || true); do echo "$p" >"$cg/cgroup.procs"; done
    done
    log "each proxy limited to $BENCH_PROXY_CPU cores of CPU time ($quota us per 5 ms)"
fi
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
log "measuring: $REPS rounds × 4 targets × $DURATION, $CONNS connections, wrk -t$WRK_THREADS, proxies with $PROXY_THREADS worker(s)"
# The proxies of a round, in the order of the first round; each later round starts one further
# along (rotated), so that no proxy always runs right after the direct run or before another.
PROXIES=(lb-gateway)
[[ -n ${GATEWAY3_PID:-} ]] && PROXIES+=(lb-gateway-baseline)
PROXIES+=(nginx haproxy)
[[ -n ${GATEWAY2_PID:-} ]] && PROXIES+=(lb-gateway-hyper)
run_proxy() {
    case $1 in
    lb-gateway) run lb-gateway "$GPORT" "$GATEWAY_PID" ;;
    lb-gateway-baseline) run lb-gateway-baseline "$G3PORT" "$GATEWAY3_PID" ;;
    lb-gateway-hyper) run lb-gateway-hyper "$G2PORT" "$GATEWAY2_PID" ;;
    nginx) run nginx "$NPORT" "$NGINX_PID" ;;
    haproxy) run haproxy "$HPORT" "$HAPROXY_PID" ;;
    esac
}
for ((ROUND = 1; ROUND <= REPS; ROUND++)); do
    run direct "${BACKEND_PORTS[0]}" 0
    for ((k = 0; k < ${#PROXIES[@]}; k++)); do
        run_proxy "${PROXIES[(k + ROUND - 1) % ${#PROXIES[@]}]}"
    done
done

log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Spread check: how the proxies spread the 1000 paths over the backends is not measured
# here; the gateway's own spread is in its admin API (/admin/table?route=web).

echo
echo "| target | req/s | p99 (ms) | proxy CPU per request (µs) |"
echo "|---|---:|---:|---:|"
for name in "${TARGETS[@]}"; do
    # The median run by req/s.
    awk -v n="$name" '$1 == n' "$TMP/results" | sort -k2 -g | awk -v reps="$REPS" '
        { rows[NR] = $0 }
        END { split(rows[int((NR + 1) / 2)], f, " "); printf "| %s | %.0f | %.2f | %s |\n", f[1], f[2], f[3], f[4] }'
done
echo
# Within each round the targets ran back to back, so ratios within a round are less disturbed
# by other work on the machine than the medians above. Two are printed: the gateway against
# the better of nginx's and HAProxy's runs in each round, and against each of them, paired by
# round; the verdict is against the better proxy (by median throughput over all rounds).
HYPER_PART=$HYPER_PART python3 - "$TMP/results" <<'EOF'
import os, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, rps, p99, cpu, rnd, _user = line.split()
    runs[(int(rnd), name)] = (float(rps), float(p99), None if cpu == "-" else float(cpu))
rounds = sorted({r for r, _ in runs})
t, l, c = [], [], []
for r in rounds:
    gw, ng, hp = runs[(r, "lb-gateway")], runs[(r, "nginx")], runs[(r, "haproxy")]
    t.append(gw[0] / max(ng[0], hp[0]))
    l.append(gw[1] / min(ng[1], hp[1]))
    c.append(gw[2] / min(ng[2], hp[2]))
    print(f"round {r}: throughput {t[-1]:.2f}x, p99 {l[-1]:.2f}x, CPU per request {c[-1]:.2f}x")
print(f"lb-gateway vs the better of nginx's and HAProxy's runs in the same round (median of {len(rounds)} rounds): "
      f"throughput {statistics.median(t):.2f}x, p99 {statistics.median(l):.2f}x, CPU per request {statistics.median(c):.2f}x")
print("  (biased low: the better of two noisy runs is compared, so three proxies of equal speed with")
print("  5 % run-to-run noise come out at 0.97x in the median of 10 rounds; the comparison below is not)")
# The better proxy: the one with the higher median throughput over all rounds; the gateway is
# compared with it round by round (paired: each round's ratio, then their median).
def median_of(name, i):
    return statistics.median(runs[(r, name)][i] for r in rounds)
better = max(("nginx", "haproxy"), key=lambda n: median_of(n, 0))
for peer in ("nginx", "haproxy"):
    pt = [runs[(r, "lb-gateway")][0] / runs[(r, peer)][0] for r in rounds]
    pl = [runs[(r, "lb-gateway")][1] / runs[(r, peer)][1] for r in rounds]
    pc = [runs[(r, "lb-gateway")][2] / runs[(r, peer)][2] for r in rounds]
    wins = sum(1 for x in pt if x > 1)
    tag = "the better proxy (higher median req/s)" if peer == better else "the other proxy"
    print(f"lb-gateway vs {peer}, {tag}, paired by round (median of {len(rounds)}): "
          f"throughput {statistics.median(pt):.3f}x (faster in {wins} of {len(rounds)} rounds), "
          f"p99 {statistics.median(pl):.3f}x, CPU per request {statistics.median(pc):.3f}x")
if all((r, "lb-gateway-hyper") in runs for r in rounds):
    own = [runs[(r, "lb-gateway")] for r in rounds]
    hyp = [runs[(r, "lb-gateway-hyper")] for r in rounds]
    part = os.environ.get("HYPER_PART") or "client"
    print(f"lb-gateway's own HTTP/1.1 {part} vs hyper's, same rounds (median): "
          f"throughput {statistics.median(o[0] / h[0] for o, h in zip(own, hyp)):.2f}x, "
          f"CPU per request {statistics.median(o[2] / h[2] for o, h in zip(own, hyp)):.2f}x")
if all((r, "lb-gateway-baseline") in runs for r in rounds):
    own = [runs[(r, "lb-gateway")] for r in rounds]
    base = [runs[(r, "lb-gateway-baseline")] for r in rounds]
    print(f"lb-gateway vs lb-gateway-baseline, same rounds (median): "
          f"throughput {statistics.median(o[0] / b[0] for o, b in zip(own, base)):.2f}x, "
          f"p99 {statistics.median(o[1] / b[1] for o, b in zip(own, base)):.2f}x, "
          f"CPU per request {statistics.median(o[2] / b[2] for o, b in zip(own, base)):.2f}x")
EOF
# What a request cost the whole machine through each target (medians over the rounds): the
# proxy, the backend and wrk, the kernel's interrupt and softirq time, and how many of the
# machine's cores stayed idle. The sum overlaps a little (a process's system time and the interrupt time
# share some ticks), the same for every target.
echo
echo "| target | proxy CPU (µs/req) | backend + wrk (µs/req) | interrupts (µs/req) | sum (µs/req) | machine idle (cores) | proxy sleeps per request |"
echo "|---|---:|---:|---:|---:|---:|---:|"
python3 - "$TMP/results" "$TMP/machine" "${TARGETS[@]}" <<'EOF'
import statistics, sys
cpu, machine = {}, {}
for line in open(sys.argv[1]):
    name, _rps, _p99, c, *_ = line.split()
    if c != "-":
        cpu.setdefault(name, []).append(float(c))
try:
    lines = open(sys.argv[2]).readlines()
except FileNotFoundError:  # no run served a request
    lines = []
for line in lines:
    name, *vals = line.split()
    machine.setdefault(name, []).append([float(v) for v in vals])
for name in sys.argv[3:]:
    rows = machine.get(name)
    if not rows:
        continue
    others, irq, idle, sleeps = (statistics.median(col) for col in zip(*rows))
    proxy = statistics.median(cpu[name]) if name in cpu else 0.0
    shown = f"{proxy:.2f}" if name in cpu else "-"
    print(f"| {name} | {shown} | {others:.2f} | {irq:.2f} | {proxy + others + irq:.2f} | {idle:.3f} | {sleeps:.3f} |")
EOF
echo
echo "All runs (target, req/s, p99 ms, CPU µs/req, round, of it user space µs/req):"
sed 's/^/    /' "$TMP/results"
