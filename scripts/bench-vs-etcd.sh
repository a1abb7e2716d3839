#!/usr/bin/env bash
# Benchmarks the coordinator against Debian's etcd 3.4 on this machine, with the same client
# (target/release/bench), and prints Markdown tables ready for BENCHMARKS.md.
#
# Phases:
#   1. throughput/latency: put, range, mixed at each client count, alternating the two servers
#      (coordinator, etcd, coordinator, etcd, ...) so that noise from other work on a shared
#      machine hits both alike; each run also reports the server's CPU time per request.
#   2. fsync counts (if `perf` can count syscall tracepoints): fsync-family syscalls per put.
#   3. memory and scale, on fresh servers: load 1M keys in batched Txns, then RSS, data-dir size,
#      restart time (process start until a linearizable Range succeeds), then 10,000 watchers.
#
# Both servers listen on 127.0.0.1 at free ports, with data in a temporary directory. Only the
# processes this script starts are stopped (by PID, from an EXIT trap); the temp dir is removed.
#
# Environment (defaults in brackets):
#   BENCH_DURATION [10s]         measured time of each run (1 s warm-up comes on top)
#   BENCH_REPS [2]               repetitions of each (workload, clients) pair per server
#   BENCH_CLIENTS [1,64,256]     client counts
#   BENCH_WORKLOADS [put range mixed]
#   BENCH_LOAD_KEYS [1000000]    keys written in the scale phase (0 skips phase 3)
#   BENCH_WATCHERS [10000]       watchers in the scale phase, over BENCH_WATCH_STREAMS [100]
#   BENCH_FSYNC_DURATION [3s]    length of each fsync-counting run (phase 2; "0" skips it)
#   BENCH_SKIP_BUILD [0]         1: use the existing target/release binaries
#   BENCH_OUT [unset]            file to which the raw JSON lines of every run are copied
#   ETCD_BIN [/usr/bin/etcd]
# At the defaults the whole script takes about 8-10 minutes after the build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10s}
REPS=${BENCH_REPS:-2}
CLIENTS=${BENCH_CLIENTS:-1,64,256}
WORKLOADS=${BENCH_WORKLOADS:-put range mixed}
LOAD_KEYS=${BENCH_LOAD_KEYS:-1000000}
WATCHERS=${BENCH_WATCHERS:-10000}
WATCH_STREAMS=${BENCH_WATCH_STREAMS:-100}
FSYNC_DURATION=${BENCH_FSYNC_DURATION:-3s}
ETCD_BIN=${ETCD_BIN:-/usr/bin/etcd}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
COORD_BIN=$TARGET_DIR/release/coordinator
BENCH_BIN=$TARGET_DIR/release/bench
# Upper bounds for the phases that have no natural end (each is also enforced by `timeout`).
LOAD_MAX=${BENCH_LOAD_MAX_TIME:-120s}
READY_MAX=30s

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v jq >/dev/null || die "jq is required (apt-get install jq)"
[[ -x $ETCD_BIN ]] || die "$ETCD_BIN not found (apt-get install etcd-server)"
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building coordinator and bench (release)"
    (cd "$ROOT" && cargo build --release -p coordinator --bins) >&2
fi
[[ -x $COORD_BIN && -x $BENCH_BIN ]] || die "missing $COORD_BIN or $BENCH_BIN"

TMP=$(mktemp -d /tmp/bench-vs-etcd.XXXXXX)
RESULTS=$TMP/results.jsonl
: >"$RESULTS"
SINK=$RESULTS # where bench() appends its JSON lines

# PIDs of the servers this script started and has not yet reaped.
declare -A RUNNING=()

# Stops one server started by this script: SIGTERM, then SIGKILL after 20 s.
stop_pid() {
    local pid=$1 i
    [[ -n ${RUNNING[$pid]:-} ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid (${RUNNING[$pid]}) did not stop after SIGTERM in 20 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "RUNNING[$pid]"
}

cleanup() {
    local pid
    for pid in "${!RUNNING[@]}"; do stop_pid "$pid"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port VAR: stores in VAR a TCP port nobody listens on and this script has not handed out.
USED_PORTS=" "
free_port() {
    local p i
    for ((i = 0; i < 500; i++)); do
        p=$((20000 + RANDOM % 40000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if [[ -z $(ss -Htln "sport = :$p" 2>/dev/null) ]]; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found"
}

free_port ETCD_PORT
free_port ETCD_PEER_PORT
free_port COORD_PORT
free_port COORD_METRICS_PORT

# start_server NAME DATADIR: starts the server, sets PID_<NAME>.
start_server() {
    local name=$1 dir=$2 pid
    mkdir -p "$dir"
    case $name in
    etcd)
        "$ETCD_BIN" --name default --data-dir "$dir" \
            --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" \
            >>"$TMP/etcd.log" 2>&1 &
        ;;
    coordinator)
        "$COORD_BIN" --data-dir "$dir" \
            --listen-client-urls "http://127.0.0.1:$COORD_PORT" \
            --listen-metrics-urls "http://127.0.0.1:$COORD_METRICS_PORT" \
            >>"$TMP/coordinator.log" 2>&1 &
        ;;
    esac
    pid=$!
    RUNNING[$pid]=$name
    printf -v "PID_$name" '%s' "$pid"
}

port_of() { if [[ $1 == etcd ]]; then echo "$ETCD_PORT"; else echo "$COORD_PORT"; fi; }
pid_of() { local v="PID_$1"; echo "${!v}"; }

alive() {
    local pid
    pid=$(pid_of "$1")
    if kill -0 "$pid" 2>/dev/null; then return 0; fi
    log "$1 (pid $pid) is not running; last lines of its log:"
    tail -n 20 "$TMP/$1.log" >&2 || true
    return 1
}

# bench NAME LIMIT_SECONDS ARGS...: runs the load generator against server NAME, appending its
# JSON lines to $RESULTS and echoing them. A failing or overrunning run is logged, not fatal.
bench() {
    local name=$1 limit=$2 out rc=0
    shift 2
    out=$(timeout -k 5 "$limit" "$BENCH_BIN" --endpoints "127.0.0.1:$(port_of "$name")" \
        --label "$name" --server-pid "$(pid_of "$name")" --json "$@") || rc=$?
    if ((rc != 0)); then log "bench against $name failed (exit $rc): $*"; fi
    if [[ -n $out ]]; then
        printf '%s\n' "$out" >>"$SINK"
        printf '%s\n' "$out"
    fi
    return 0
}

# wait_ready NAME: prints ms from process start until a linearizable Range succeeds.
wait_ready() {
    local line
    line=$(bench "$1" 40 --workload ready --max-time "$READY_MAX" --clients 1)
    [[ -n $line ]] || die "$1 did not become ready in $READY_MAX (log: $(tail -n 5 "$TMP/$1.log"))"
    jq -r '.ready_ms' <<<"$line"
}

secs() { # "10s" / "500ms" / "2m" -> whole seconds, rounded up
    local d=$1
    case $d in
    *ms) echo $(((${d%ms} + 999) / 1000)) ;;
    *m) echo $((${d%m} * 60)) ;;
    *s) awk -v x="${d%s}" 'BEGIN { printf "%d", (x == int(x)) ? x : int(x) + 1 }' ;;
    *) awk -v x="$d" 'BEGIN { printf "%d", (x == int(x)) ? x : int(x) + 1 }' ;;
    esac
}

machine_info() {
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), nproc = $(nproc)"
    echo "- memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo); kernel $(uname -r)"
    echo "- data dirs on: $(df -T "$TMP" | awk 'NR == 2 { print $2 " (" $1 ")" }')"
    echo "- etcd: $("$ETCD_BIN" --version | head -n 1); coordinator: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- settings: duration $DURATION (+1 s warm-up), $REPS repetitions, clients $CLIENTS, value 256 B, key space 10000"
}

# ------------------------------------------------------------------------------------------------
# Phase 1: throughput and latency, alternating the servers.

# start_fresh TAG: starts both servers on new, empty data directories and waits until they serve.
# Each workload gets fresh servers: etcd 3.4's linearizable Range costs several times more CPU
# on a server that has taken a few hundred thousand puts (measured: 91 -> 330-400 us/request),
# and the faster server would otherwise carry more history into the next workload.
start_fresh() {
    local name ms
    for name in coordinator etcd; do
        rm -rf "$TMP/$name-data"
        start_server "$name" "$TMP/$name-data"
    done
    for name in coordinator etcd; do
        ms=$(wait_ready "$name")
        log "$1: $name pid $(pid_of "$name") on :$(port_of "$name") serving $ms ms after its start"
    done
}

stop_both() {
    stop_pid "$(pid_of coordinator)"
    stop_pid "$(pid_of etcd)"
    rm -rf "$TMP/coordinator-data" "$TMP/etcd-data"
}

run_limit=$(($(secs "$DURATION") + 30)) # 1 s warm-up, preload, connection setup, slack
IFS=, read -r -a client_list <<<"$CLIENTS"
for workload in $WORKLOADS; do
    start_fresh "phase 1 ($workload)"
    for c in "${client_list[@]}"; do
        for ((rep = 1; rep <= REPS; rep++)); do
            for name in coordinator etcd; do
                alive "$name" || continue
                log "phase 1: $workload clients=$c rep $rep/$REPS on $name"
                bench "$name" "$run_limit" --workload "$workload" --clients "$c" \
                    --duration "$DURATION" >/dev/null
            done
        done
    done
    stop_both
done

summary() {
    jq -rs '
      def mean(f): (map(f) | add / length);
      def r(n): (. * pow(10; n) | round) / pow(10; n);
      def order: {"put": 0, "range": 1, "mixed": 2}[.workload];
      [ .[] | select(.workload == "put" or .workload == "range" or .workload == "mixed") ]
      | group_by([order, .clients]) | .[] as $g
      | ($g | map(select(.label == "coordinator"))) as $c
      | ($g | map(select(.label == "etcd"))) as $e
      | [$c, $e] | .[] | select(length > 0)
      | "| \(.[0].workload) | \(.[0].clients) | \(.[0].label) | \(length) | \(mean(.rps) | round) | \(map(.rps) | min | round)–\(map(.rps) | max | round) | \(mean(.p50_ms) | r(2)) | \(mean(.p99_ms) | r(2)) | \(mean(.p999_ms) | r(2)) | \(map(.errors) | add) | \(if any(.server_cpu_us_per_req == null) then "-" else (mean(.server_cpu_us_per_req) | round) end) | \(mean(.bench_cpu_s / .duration_s) | r(2)) |"
    ' "$RESULTS"
}

ratios() {
    jq -rs '
      def mean(f): (map(f) | add / length);
      def r(n): (. * pow(10; n) | round) / pow(10; n);
      def order: {"put": 0, "range": 1, "mixed": 2}[.workload];
      [ .[] | select(.workload == "put" or .workload == "range" or .workload == "mixed") ]
      | group_by([order, .clients]) | .[]
      | (map(select(.label == "coordinator"))) as $c
      | (map(select(.label == "etcd"))) as $e
      | select(($c | length) > 0 and ($e | length) > 0)
      | "| \($c[0].workload) | \($c[0].clients) | \((($c | mean(.rps)) / ($e | mean(.rps))) | r(2)) | \(if any($c[], $e[]; .server_cpu_us_per_req == null) then "-" else ((($c | mean(.server_cpu_us_per_req)) / ($e | mean(.server_cpu_us_per_req))) | r(2)) end) | \((($c | mean(.p99_ms)) / ($e | mean(.p99_ms))) | r(2)) |"
    ' "$RESULTS"
}

# ------------------------------------------------------------------------------------------------
# Phase 2: fsync-family syscalls per put, counted by perf on the server process.

FSYNC_ROWS=()
# perf_count SYSCALL: how often the server entered SYSCALL, from perf's CSV output.
perf_count() {
    awk -F, -v e="syscalls:sys_enter_$1" '$3 == e && $1 ~ /^[0-9]+$/ { n += $1 } END { print n + 0 }' "$TMP/perf.out"
}
if [[ $FSYNC_DURATION != 0 ]] && command -v perf >/dev/null &&
    perf stat -x, -e syscalls:sys_enter_fdatasync -- true >/dev/null 2>&1; then
    fsync_events=syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_sync_file_range,syscalls:sys_enter_msync
    fsync_secs=$(($(secs "$FSYNC_DURATION") + 1))
    SINK=$TMP/fsync.jsonl
    start_fresh "phase 2"
    for c in 1 64; do
        for name in coordinator etcd; do
            alive "$name" || continue
            log "phase 2: fsync count, put clients=$c on $name"
            perf stat -x, -e "$fsync_events" -o "$TMP/perf.out" -p "$(pid_of "$name")" \
                -- sleep "$fsync_secs" >/dev/null 2>&1 &
            perf_pid=$!
            sleep 0.2
            line=$(bench "$name" $((fsync_secs + 30)) --workload put --clients "$c" \
                --warmup 0s --duration "$FSYNC_DURATION" | tail -n 1)
            wait "$perf_pid" || true
            [[ -n $line ]] || line='{}'
            reqs=$(jq -r '.requests // 0' <<<"$line")
            f=$(perf_count fsync) fd=$(perf_count fdatasync) sfr=$(perf_count sync_file_range) msy=$(perf_count msync)
            per=$(awk -v s=$((f + fd)) -v r="$reqs" 'BEGIN { if (s > 0) printf "%.1f", r / s; else printf "-" }')
            FSYNC_ROWS+=("| $name | $c | $reqs | $f | $fd | $sfr | $msy | $per |")
        done
    done
    SINK=$RESULTS
    stop_both
else
    log "phase 2 skipped (perf cannot count syscall tracepoints here, or BENCH_FSYNC_DURATION=0)"
fi

# ------------------------------------------------------------------------------------------------
# Phase 3: memory and scale on fresh servers, one server at a time.

SCALE_ROWS=()
WATCH_ROWS=()
if ((LOAD_KEYS > 0)); then
    for name in coordinator etcd; do
        dir=$TMP/$name-scale
        start_server "$name" "$dir"
        start_ms=$(wait_ready "$name")
        rss_idle=$(awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$(pid_of "$name")/status")
        log "phase 3: $name loading $LOAD_KEYS keys"
        load=$(bench "$name" $(($(secs "$LOAD_MAX") + 30)) --workload load --keys "$LOAD_KEYS" \
            --batch 100 --clients 16 --max-time "$LOAD_MAX")
        load=${load:-'{}'}
        stop_pid "$(pid_of "$name")"
        du_mib=$(du -sb "$dir" | awk '{ printf "%.0f", $1 / 1048576 }')
        start_server "$name" "$dir"
        restart_ms=$(wait_ready "$name")
        rss_restart=$(awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$(pid_of "$name")/status")
        SCALE_ROWS+=("$(jq -r --arg n "$name" --arg s "$start_ms" --arg ri "$rss_idle" --arg du "$du_mib" \
            --arg rs "$restart_ms" --arg rr "$rss_restart" '
            "| \($n) | \(.keys_acked // 0) | \(.elapsed_s // "-") | \(.keys_per_s // "-") | \(.errors // "-") | \($s) | \($ri) | \(.server_rss_mib // "-" | if type == "number" then round else . end) | \($du) | \($rs) | \($rr) |"' <<<"$load")")
        log "phase 3: $name opening $WATCHERS watchers"
        watch=$(bench "$name" 90 --workload watchers --watchers "$WATCHERS" \
            --watch-streams "$WATCH_STREAMS" --max-time 60s)
        if [[ -n $watch ]]; then
            WATCH_ROWS+=("$(jq -r '"| \(.label) | \(.created) | \(.streams) | \(.create_s) | \(.fanout_ms // "-") | \(.server_rss_before_mib // "-" | if type == "number" then round else . end) | \(.server_rss_after_mib // "-" | if type == "number" then round else . end) | \(.rss_kib_per_watch // "-") | \(.errors) |"' <<<"$watch")")
        fi
        stop_pid "$(pid_of "$name")"
    done
fi

# ------------------------------------------------------------------------------------------------
# Report

echo "## Machine"
echo
machine_info
echo
echo "## Throughput and latency (mean of $REPS runs; req/s range = min–max)"
echo
echo "| workload | clients | server | runs | req/s | req/s range | p50 ms | p99 ms | p99.9 ms | errors | server CPU µs/req | bench CPU (cores) |"
echo "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
summary
echo
echo "## Ratios coordinator / etcd (req/s: >1 is better; CPU per request and p99: <1 is better)"
echo
echo "| workload | clients | req/s | CPU µs/req | p99 |"
echo "|---|---:|---:|---:|---:|"
ratios
if ((${#FSYNC_ROWS[@]} > 0)); then
    echo
    echo "## Sync syscalls during $FSYNC_DURATION of puts (fresh servers, no warm-up), counted by perf"
    echo
    echo "| server | clients | puts | fsync | fdatasync | sync_file_range | msync | puts per fsync+fdatasync |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${FSYNC_ROWS[@]}"
fi
if ((${#SCALE_ROWS[@]} > 0)); then
    echo
    echo "## Scale: $LOAD_KEYS keys of 256 B in Txns of 100 puts, 16 in flight"
    echo
    echo "| server | keys acked | load s | keys/s | errors | first start ms | RSS idle MiB | RSS after load MiB | data dir MiB | restart ms | RSS after restart MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${SCALE_ROWS[@]}"
fi
if ((${#WATCH_ROWS[@]} > 0)); then
    echo
    echo "## Watchers on one prefix (after the restart above), one put fanned out to all"
    echo
    echo "| server | watchers | streams | create s | fan-out ms | RSS before MiB | RSS after MiB | KiB/watch | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${WATCH_ROWS[@]}"
fi
errs=$(jq -rs '[.[] | select(.first_error != null) | "\(.label) \(.workload) clients=\(.clients // "-"): \(.errors) errors, first: \(.first_error)"] | unique | .[]' "$RESULTS")
if [[ -n $errs ]]; then
    echo
    echo "## Errors"
    echo
    printf '%s\n' "$errs" | sed 's/^/- /'
fi
if [[ -n ${BENCH_OUT:-} ]]; then cp "$RESULTS" "$BENCH_OUT"; fi
