#!/usr/bin/env bash
# Load harness for fresh-proxy.
#
# Starts a fast fake upstream, the release proxy (follower mode, full filter), and a reference
# passthrough (nginx proxy_pass, or the harness's own hyper passthrough when nginx is absent);
# loads direct-to-upstream, reference, the bare passthrough (FLOOR) and proxy in alternation with
# wrk POSTing the 3.7 KB agent request; then runs 1,000 concurrent slow SSE streams through a fresh proxy. Prints throughput
# ratio, added p50/p99 latency, peak RSS, and whether each target is met.
#
# Loopback only. Every load run is bounded in time and count; the servers stop when this script
# ends (and by themselves after --max-seconds).
#
# Usage: tools/loadtest/run.sh
# Settings, from the environment:
#   ROUNDS=3            alternating rounds (direct, reference, proxy in each)
#   DURATION=10         seconds per wrk run; WARMUP=2 seconds per target before round 1
#   CONNECTIONS=32      wrk connections for the throughput and added-latency targets
#   PACED_DELAY_MS="16 32 64 128"
#                       also run CONNECTIONS connections that each pause between requests,
#                       exponentially distributed with this mean, once per mean in the list: a
#                       sweep of offered load from about 2,000 req/s (16) down to 250 (128),
#                       loaded but not saturated; empty: skip
#   PACED_SECONDS=      seconds per paced run (default: half of DURATION, rounded up). A paced
#                       run at about 1,000 req/s for 3 s has its p99 in its 30 slowest requests,
#                       where one stall of the machine decides it; 20 s gives 200
#   LOW_CONNECTIONS=1   also measure added latency at this concurrency (empty: skip)
#   WRK_THREADS=1       wrk threads
#   UPSTREAM_THREADS=1  worker threads of the fake upstream
#   REFERENCE=auto      auto | nginx | hyper
#   FLOOR=auto          1: also load the harness's bare hyper passthrough (no filter) as a fourth
#                       target, "floor": the least any reverse proxy adds on this machine.
#                       auto: on when the reference is nginx (otherwise it is the reference)
#   NGINX_WORKERS=auto  nginx worker_processes (auto: one per CPU)
#   NGINX_KEEPALIVE=1   nginx keeps upstream connections alive (HTTP/1.1, keepalive 64), as a
#                       careful operator runs it; 0: a new upstream connection per request (a
#                       weaker reference, kept for comparison with older figures)
#   WRK_CPUS= UPSTREAM_CPUS= PROXY_CPUS=   taskset CPU lists (PROXY_CPUS also pins the reference)
#   SSE_STREAMS=1000 SSE_EVENTS=10 SSE_INTERVAL_MS=100
#                       the streams run through the proxy, then through a fresh bare passthrough
#                       for comparison
#   SKIP_BUILD=0        1: use the binaries already in target/release
#   SKIP_THROUGHPUT=0 SKIP_SSE=0
#   PROXY_BIN=          the proxy binary (default target/release/fresh-proxy)
#   PROXY_ENV=          extra KEY=VALUE words for the proxy's environment (e.g. an LD_PRELOAD)
#   PERF=0              1: after the measured rounds, `perf record` the proxy during one more run
# Output: stdout, also kept in target/loadtest/ (last-run.txt, results.tsv, perf.data).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
LOW_CONNECTIONS="${LOW_CONNECTIONS-1}"
PACED_DELAY_MS="${PACED_DELAY_MS-16 32 64 128}"
PACED_SECONDS="${PACED_SECONDS:-$(((DURATION + 1) / 2))}"
WRK_THREADS="${WRK_THREADS:-1}"
UPSTREAM_THREADS="${UPSTREAM_THREADS:-1}"
REFERENCE="${REFERENCE:-auto}"
FLOOR="${FLOOR:-auto}"
NGINX_WORKERS="${NGINX_WORKERS:-auto}"
NGINX_KEEPALIVE="${NGINX_KEEPALIVE:-1}"
WRK_CPUS="${WRK_CPUS:-}"
UPSTREAM_CPUS="${UPSTREAM_CPUS:-}"
PROXY_CPUS="${PROXY_CPUS:-}"
SSE_STREAMS="${SSE_STREAMS:-1000}"
SSE_EVENTS="${SSE_EVENTS:-10}"
SSE_INTERVAL_MS="${SSE_INTERVAL_MS:-100}"
SKIP_BUILD="${SKIP_BUILD:-0}"
SKIP_THROUGHPUT="${SKIP_THROUGHPUT:-0}"
SKIP_SSE="${SKIP_SSE:-0}"
PROXY_ENV="${PROXY_ENV:-}"
PERF="${PERF:-0}"
OUT="$ROOT/target/loadtest"
mkdir -p "$OUT"
exec > >(tee "$OUT/last-run.txt") 2>&1

BODY="$ROOT/tools/loadtest/agent-request.json"
LUA="$ROOT/tools/loadtest/post.lua"
PROXY_BIN="${PROXY_BIN:-$ROOT/target/release/fresh-proxy}"
LT="$ROOT/target/release/loadtest"
ENDPOINT_PATH="/databricks-claude-sonnet-4/invocations"
TOKEN="dapi0123456789abcdef0123456789abcdef-loadtest"
MAX_SECONDS=1800
CLK_TCK="$(getconf CLK_TCK)"

say() { printf '%s\n' "$*"; }
die() { say "run.sh: $*" >&2; exit 1; }

# `pin CPUS`: sets PIN to the taskset prefix for a CPU list (empty: no pinning). Background
# processes are started as `"${PIN[@]}" cmd &` so that $! is the process itself, not a subshell.
PIN=()
pin() {
    PIN=()
    if [[ -n "$1" ]]; then PIN=(taskset -c "$1"); fi
}

command -v wrk >/dev/null || die "wrk is required: apt-get install -y wrk"
command -v curl >/dev/null || die "curl is required: apt-get install -y curl"

# 1,000 streams hold 2,000 sockets in the proxy: raise the soft open-files limit to the hard one.
need_files=$((SSE_STREAMS * 2 + 256))
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt "$need_files" ]]; then
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
files_limit="$(ulimit -n)"
if [[ "$files_limit" != unlimited && "$files_limit" -lt "$need_files" ]]; then
    say "warning: ulimit -n is $files_limit, below the $need_files that $SSE_STREAMS streams need"
fi

if [[ "$SKIP_BUILD" != 1 ]]; then
    # Separate commands so the proxy is built exactly as `cargo build --release` builds it.
    cargo build --release --quiet
    cargo build --release --quiet -p fresh-proxy-loadtest
fi
[[ -x "$PROXY_BIN" && -x "$LT" ]] || die "missing $PROXY_BIN or $LT (build them or unset SKIP_BUILD)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fresh-proxy-load.XXXXXX")"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    kill "${WATCHDOG:-}" 2>/dev/null || true
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then say "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# `started PID`: remember a server so that it is stopped when this script ends, even if the
# script itself is killed (the watchdog polls for it).
started() {
    PIDS+=("$1")
    say "$1" >>"$WORK/pids"
}
(
    while kill -0 $$ 2>/dev/null; do sleep 1; done
    [[ -f "$WORK/pids" ]] && xargs kill <"$WORK/pids" 2>/dev/null
) >/dev/null 2>&1 &
WATCHDOG=$!

wait_for_file() {
    local file="$1"
    for _ in $(seq 100); do
        [[ -s "$file" ]] && return 0
        sleep 0.05
    done
    die "timed out waiting for $file"
}

wait_for_url() {
    local url="$1"
    for _ in $(seq 200); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.05
    done
    die "timed out waiting for $url"
}

peak_rss_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
mb() { awk -v kb="$1" 'BEGIN {printf "%.1f", kb / 1024}'; }

machine_load() { awk '{print $1, $2, $3}' /proc/loadavg; }

# --- upstream ---------------------------------------------------------------------------------
pin "$UPSTREAM_CPUS"
"${PIN[@]}" "$LT" upstream --port-file "$WORK/upstream.port" \
    --threads "$UPSTREAM_THREADS" --sse-events "$SSE_EVENTS" \
    --sse-interval-ms "$SSE_INTERVAL_MS" --max-seconds "$MAX_SECONDS" \
    >"$WORK/upstream.log" 2>&1 &
UPSTREAM_PID=$!
started "$UPSTREAM_PID"
wait_for_file "$WORK/upstream.port"
UPSTREAM_PORT="$(cat "$WORK/upstream.port")"
wait_for_url "http://127.0.0.1:$UPSTREAM_PORT/__stats"

# --- proxy ------------------------------------------------------------------------------------
mkdir -p "$WORK/home"
cat >"$WORK/home/.databrickscfg" <<EOF
[DEFAULT]
host = http://127.0.0.1:$UPSTREAM_PORT
token = $TOKEN
EOF
chmod 600 "$WORK/home/.databrickscfg"

PROXY_PID=""
PROXY_PORT=""
start_proxy() {
    PROXY_PORT="$("$LT" free-port)"
    pin "$PROXY_CPUS"
    # shellcheck disable=SC2086 # PROXY_ENV is a list of words on purpose
    "${PIN[@]}" env -i PATH="$PATH" HOME="$WORK/home" PAT_ROTATION=off \
        PROXY_PORT="$PROXY_PORT" RUST_LOG=warn $PROXY_ENV "$PROXY_BIN" >>"$WORK/proxy.log" 2>&1 &
    PROXY_PID=$!
    started "$PROXY_PID"
    wait_for_url "http://127.0.0.1:$PROXY_PORT/ready"
}

# `stop_server PID`: stop a server `started` remembered, and forget it.
stop_server() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    sed -i "/^$1\$/d" "$WORK/pids"
}

stop_proxy() { stop_server "$PROXY_PID"; }

# --- reference passthrough --------------------------------------------------------------------
# `start_passthrough PORT`: the harness's bare hyper passthrough on PORT, in the background.
start_passthrough() {
    pin "$PROXY_CPUS"
    "${PIN[@]}" "$LT" passthrough --listen "127.0.0.1:$1" \
        --upstream "http://127.0.0.1:$UPSTREAM_PORT/serving-endpoints" \
        --threads "$(nproc)" --max-seconds "$MAX_SECONDS" >>"$WORK/passthrough.log" 2>&1 &
}

# `wait_for_listener PORT WHAT`: any answer (even 4xx) shows that it is listening.
wait_for_listener() {
    for _ in $(seq 200); do
        curl -sS -o /dev/null "http://127.0.0.1:$1/" 2>/dev/null && return 0
        sleep 0.05
    done
    die "$2 did not start (see $WORK)"
}

uses_nginx() {
    [[ "$REFERENCE" == nginx || ("$REFERENCE" == auto && -x "$(command -v nginx || true)") ]]
}

REF_PID=""
REF_PORT=""
REF_KIND=""
start_reference() {
    REF_PORT="$("$LT" free-port)"
    if uses_nginx; then
        command -v nginx >/dev/null || die "REFERENCE=nginx but nginx is not installed"
        local keepalive="" http11=""
        if [[ "$NGINX_KEEPALIVE" == 1 ]]; then
            keepalive="keepalive 64;"
            http11='proxy_http_version 1.1; proxy_set_header Connection "";'
            REF_KIND="nginx proxy_pass (worker_processes $NGINX_WORKERS on $(nproc) CPUs, upstream keepalive 64, HTTP/1.1)"
        else
            REF_KIND="nginx proxy_pass (worker_processes $NGINX_WORKERS on $(nproc) CPUs, NO upstream keepalive: a new connection per request)"
        fi
        mkdir -p "$WORK/nginx"
        cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    upstream model { server 127.0.0.1:$UPSTREAM_PORT; $keepalive }
    server {
        listen 127.0.0.1:$REF_PORT;
        location / {
            proxy_pass http://model/serving-endpoints/;
            proxy_set_header Authorization "Bearer $TOKEN";
            $http11
        }
    }
}
EOF
        pin "$PROXY_CPUS"
        "${PIN[@]}" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
            >"$WORK/nginx/stdout.log" 2>&1 &
    else
        REF_KIND="hyper passthrough"
        [[ "$REFERENCE" == auto ]] && REF_KIND="hyper passthrough (nginx is not installed)"
        start_passthrough "$REF_PORT"
    fi
    REF_PID=$!
    started "$REF_PID"
    wait_for_listener "$REF_PORT" "the reference passthrough"
}

FLOOR_PID=""
FLOOR_PORT=""
start_floor() {
    FLOOR_PORT="$("$LT" free-port)"
    start_passthrough "$FLOOR_PORT"
    FLOOR_PID=$!
    started "$FLOOR_PID"
    wait_for_listener "$FLOOR_PORT" "the bare passthrough"
}

# Peak RSS of the reference: its own process plus nginx's workers.
reference_peak_rss_kb() {
    local total=0 pid
    for pid in "$REF_PID" $(pgrep -P "$REF_PID" || true); do
        total=$((total + $(peak_rss_kb "$pid")))
    done
    say "$total"
}

url_of() {
    case "$1" in
        direct) say "http://127.0.0.1:$UPSTREAM_PORT/serving-endpoints$ENDPOINT_PATH" ;;
        reference) say "http://127.0.0.1:$REF_PORT$ENDPOINT_PATH" ;;
        floor) say "http://127.0.0.1:$FLOOR_PORT$ENDPOINT_PATH" ;;
        proxy) say "http://127.0.0.1:$PROXY_PORT$ENDPOINT_PATH" ;;
    esac
}

# `cpu_ticks PID...`: user + system CPU time of the processes, in clock ticks.
cpu_ticks() {
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    say "$total"
}

# `machine_ticks`: busy (user, nice, system) and steal ticks of the whole machine. Interrupt time
# is left out: the harness's own loopback traffic makes most of it and no process is charged.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4, $9}' /proc/stat; }

# The processes that serve TARGET, for CPU accounting.
pids_of() {
    case "$1" in
        direct) say "$UPSTREAM_PID" ;;
        reference) say "$REF_PID $(pgrep -P "$REF_PID" | tr '\n' ' ')" ;;
        floor) say "$FLOOR_PID" ;;
        proxy) say "$PROXY_PID" ;;
    esac
}

# `load TARGET CONNECTIONS SECONDS [PAUSE_MS]`: one wrk run; prints its RESULT line with the CPU
# time the target (cpu_us) and the upstream (upstream_cpu_us) spent per request, and the share of
# the machine that anything else used meanwhile (other_pct; steal_pct: taken by the hypervisor).
# A run with a large other_pct was disturbed by foreign load and should be repeated.
load() {
    local target="$1" conns="$2" seconds="$3" pause="${4:-0}" threads="$WRK_THREADS"
    local pids before up_before busy_before steal_before busy_after steal_after gen_before result
    ((threads > conns)) && threads="$conns"
    pids="$(pids_of "$target")"
    # shellcheck disable=SC2086
    before="$(cpu_ticks $pids)"
    up_before="$(cpu_ticks "$UPSTREAM_PID")"
    pin "$WRK_CPUS"
    # This function runs in a subshell: wrk's CPU time lands in the subshell's children's time.
    local self="$BASHPID"
    gen_before="$(awk '{print $16 + $17}' "/proc/$self/stat")"
    read -r busy_before steal_before < <(machine_ticks)
    result="$(LOADTEST_BODY="$BODY" LOADTEST_DELAY_MS="$pause" "${PIN[@]}" timeout $((seconds + 30)) \
        wrk -t "$threads" -c "$conns" -d "${seconds}s" --timeout 10s -s "$LUA" "$(url_of "$target")" \
        | awk '/^RESULT/')"
    read -r busy_after steal_after < <(machine_ticks)
    [[ -n "$result" ]] || return 0
    local ticks up gen
    # shellcheck disable=SC2086
    ticks=$(($(cpu_ticks $pids) - before))
    up=$(($(cpu_ticks "$UPSTREAM_PID") - up_before))
    [[ "$target" == direct ]] && up=0
    gen=$(($(awk '{print $16 + $17}' "/proc/$self/stat") - gen_before))
    awk -v line="$result" -v ticks="$ticks" -v up="$up" -v gen="$gen" -v hz="$CLK_TCK" \
        -v busy=$((busy_after - busy_before)) -v steal=$((steal_after - steal_before)) \
        -v cpus="$(nproc)" 'BEGIN {
            match(line, /requests=[0-9]+/); n = substr(line, RSTART + 9, RLENGTH - 9) + 0
            match(line, /duration_us=[0-9]+/); secs = substr(line, RSTART + 12, RLENGTH - 12) / 1e6
            if (n == 0) n = 1
            if (secs == 0) secs = 1
            other = busy - ticks - up - gen
            if (other < 0) other = 0
            printf "%s cpu_us=%.0f upstream_cpu_us=%.0f other_pct=%.0f steal_pct=%.0f\n", line,
                ticks * 1e6 / hz / n, (up ? up : ticks) * 1e6 / hz / n,
                100 * other / (secs * hz * cpus), 100 * steal / (secs * hz * cpus)
        }'
}

RESULTS="$OUT/results.tsv"
# What each round loads, in this order.
TARGETS=(direct reference proxy)
if [[ "$FLOOR" == 1 ]] || { [[ "$FLOOR" == auto ]] && uses_nginx; }; then
    TARGETS=(direct reference floor proxy)
fi
# Load modes, CONNECTIONS:PAUSE_MS. The first one is the one the targets are about.
MODES=("$CONNECTIONS:0")
for pause in $PACED_DELAY_MS; do MODES+=("$CONNECTIONS:$pause"); done
[[ -n "$LOW_CONNECTIONS" ]] && MODES+=("$LOW_CONNECTIONS:0")
mode_label() {
    local conns="${1%%:*}" pause="${1#*:}"
    if [[ "$pause" == 0 ]]; then say "c=$conns"; else say "c=$conns paced (mean pause ${pause} ms)"; fi
}
: >"$RESULTS"

say "== fresh-proxy load harness"
say "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r)"
say "load average at start: $(machine_load)"
say "request body: $BODY ($(wc -c <"$BODY") bytes)"
say "open files limit: $files_limit"
[[ -n "$PROXY_ENV" ]] && say "proxy environment: $PROXY_ENV"

if [[ "$SKIP_THROUGHPUT" != 1 ]]; then
    start_proxy
    start_reference
    say "reference: $REF_KIND"
    if [[ " ${TARGETS[*]} " == *" floor "* ]]; then
        start_floor
        say "floor: hyper passthrough, no filter"
    fi
    say "wrk: $WRK_THREADS thread(s), $CONNECTIONS connections, ${DURATION}s per run (paced: ${PACED_SECONDS}s), $ROUNDS rounds"
    [[ -n "$WRK_CPUS$UPSTREAM_CPUS$PROXY_CPUS" ]] &&
        say "pinning: wrk=${WRK_CPUS:-any} upstream=${UPSTREAM_CPUS:-any} proxy/reference=${PROXY_CPUS:-any}"

    # The filter must have work: the upstream sees a smaller body through the proxy.
    curl -fsS -o /dev/null -H 'Content-Type: application/json' --data-binary "@$BODY" "$(url_of proxy)"
    before="$(curl -fsS "http://127.0.0.1:$UPSTREAM_PORT/__stats")"
    curl -fsS -o /dev/null -H 'Content-Type: application/json' --data-binary "@$BODY" "$(url_of proxy)"
    after="$(curl -fsS "http://127.0.0.1:$UPSTREAM_PORT/__stats")"
    request_bytes() { sed -n 's/.*"request_bytes":\([0-9]*\).*/\1/p'; }
    sent=$(($(request_bytes <<<"$after") - $(request_bytes <<<"$before")))
    say "filter: the proxy forwards $sent of $(wc -c <"$BODY") bytes"

    for target in "${TARGETS[@]}"; do
        load "$target" "$CONNECTIONS" "$WARMUP" >/dev/null
    done
    for round in $(seq "$ROUNDS"); do
        for mode in "${MODES[@]}"; do
            conns="${mode%%:*}"
            pause="${mode#*:}"
            seconds="$DURATION"
            [[ "$mode" != "$CONNECTIONS:0" ]] && seconds=$(((DURATION + 1) / 2))
            [[ "$pause" != 0 ]] && seconds="$PACED_SECONDS"
            for target in "${TARGETS[@]}"; do
                line="$(load "$target" "$conns" "$seconds" "$pause")"
                [[ -n "$line" ]] || die "wrk printed no result for $target"
                say "round $round $(mode_label "$mode") $target: $line"
                printf '%s\t%s\t%s\t%s\n' "$round" "$mode" "$target" "$line" >>"$RESULTS"
            done
        done
    done
    say "load average after throughput: $(machine_load)"
    if [[ "$PERF" == 1 ]]; then
        # An extra proxy run under perf, after the measured ones: sampling slows the proxy.
        load proxy "$CONNECTIONS" "$DURATION" >/dev/null &
        wrk_job=$!
        sleep 1
        perf record -F 499 --call-graph dwarf,32768 -p "$PROXY_PID" -o "$OUT/perf.data" \
            -- sleep $((DURATION > 3 ? DURATION - 2 : 1)) >"$OUT/perf.log" 2>&1 || true
        wait "$wrk_job"
    fi
    PROXY_PEAK_KB="$(peak_rss_kb "$PROXY_PID")"
    REF_PEAK_KB="$(reference_peak_rss_kb)"
    stop_proxy
fi

# `sse_streams URL`: the SSE scale client against URL; prints its result line.
sse_streams() {
    pin "$WRK_CPUS"
    "${PIN[@]}" timeout 300 "$LT" sse --url "$1" --body "$BODY" \
        --streams "$SSE_STREAMS" --events "$SSE_EVENTS" --timeout-secs 240
}

if [[ "$SKIP_SSE" != 1 ]]; then
    # A fresh proxy, so its peak RSS is that of the SSE run alone.
    start_proxy
    SSE_IDLE_KB="$(rss_kb "$PROXY_PID")"
    say "SSE: $SSE_STREAMS concurrent streams, $SSE_EVENTS events ${SSE_INTERVAL_MS} ms apart"
    set +e
    SSE_LINE="$(sse_streams "$(url_of proxy)")"
    SSE_STATUS=$?
    set -e
    say "$SSE_LINE"
    SSE_PEAK_KB="$(peak_rss_kb "$PROXY_PID")"
    SSE_AFTER_KB="$(rss_kb "$PROXY_PID")"
    SSE_UPSTREAM="$(curl -fsS "http://127.0.0.1:$UPSTREAM_PORT/__stats")"
    say "upstream: $SSE_UPSTREAM"
    curl -fsS -o /dev/null "http://127.0.0.1:$PROXY_PORT/health" || say "warning: /health failed after the SSE run"
    stop_proxy
    # The same streams through a fresh bare passthrough: what any hyper-based HTTP/1.1 proxy
    # holds per stream on this machine, for comparison with the proxy's figure.
    SSE_FLOOR_PORT="$("$LT" free-port)"
    start_passthrough "$SSE_FLOOR_PORT"
    SSE_FLOOR_PID=$!
    started "$SSE_FLOOR_PID"
    wait_for_listener "$SSE_FLOOR_PORT" "the bare passthrough"
    SSE_FLOOR_IDLE_KB="$(rss_kb "$SSE_FLOOR_PID")"
    set +e
    SSE_FLOOR_LINE="$(sse_streams "http://127.0.0.1:$SSE_FLOOR_PORT$ENDPOINT_PATH")"
    set -e
    say "floor $SSE_FLOOR_LINE"
    SSE_FLOOR_PEAK_KB="$(peak_rss_kb "$SSE_FLOOR_PID")"
    stop_server "$SSE_FLOOR_PID"
    say "load average after SSE: $(machine_load)"
fi

# --- summary ----------------------------------------------------------------------------------
# `field KEY`: the number after KEY= in the line on stdin.
field() { sed -n "s/.*[[:space:]]$1=\(-\{0,1\}[0-9.]*\).*/\1/p"; }
# `summary MODE`: per-target medians over rounds in one load mode, then the target figures.
summary() {
    awk -F'\t' -v mode="$1" -v targets="${TARGETS[*]}" '
        function get(line, key) { return match(line, key "=[0-9]+") ? substr(line, RSTART + length(key) + 1, RLENGTH - length(key) - 1) : 0 }
        # Sorts a copy: the callers still read `a` round by round afterwards.
        function median(a, n,   i, j, t, s) {
            for (i = 1; i <= n; i++) s[i] = a[i]
            for (i = 2; i <= n; i++) for (j = i; j > 1 && s[j-1] > s[j]; j--) { t = s[j]; s[j] = s[j-1]; s[j-1] = t }
            return n % 2 ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2
        }
        $2 == mode {
            r = $1; t = $3
            rps[t, r] = get($4, "requests") / (get($4, "duration_us") / 1e6)
            p50[t, r] = get($4, "p50_us"); p99[t, r] = get($4, "p99_us"); cpu[t, r] = get($4, "cpu_us")
            bad[t] += get($4, "errors") + get($4, "non2xx")
            if (get($4, "other_pct") + 0 > other[t]) other[t] = get($4, "other_pct") + 0
            if (r > rounds) rounds = r
        }
        END {
            if (!rounds) exit
            n = split(targets, names, " ")
            for (k = 1; k <= n; k++) {
                t = names[k]
                for (r = 1; r <= rounds; r++) { a[r] = rps[t, r]; b[r] = p50[t, r]; c[r] = p99[t, r]; d[r] = cpu[t, r] }
                printf "  %-9s  %9.0f req/s   p50 %7.3f ms   p99 %7.3f ms   CPU %4.0f us/req   errors %d   other load <= %d%%\n", t, median(a, rounds), median(b, rounds) / 1000, median(c, rounds) / 1000, median(d, rounds), bad[t], other[t]
            }
            for (r = 1; r <= rounds; r++) {
                ratio[r] = rps["proxy", r] / rps["reference", r]
                add50[r] = (p50["proxy", r] - p50["direct", r]) / 1000
                add99[r] = (p99["proxy", r] - p99["direct", r]) / 1000
                refadd99[r] = (p99["reference", r] - p99["direct", r]) / 1000
                flooradd99[r] = (p99["floor", r] - p99["direct", r]) / 1000
            }
            printf "  throughput proxy/reference: %.2f (rounds:", median(ratio, rounds)
            for (r = 1; r <= rounds; r++) printf " %.2f", rps["proxy", r] / rps["reference", r]
            printf ")\n"
            printf "  added by proxy:     p50 %.3f ms   p99 %.3f ms\n", median(add50, rounds), median(add99, rounds)
            printf "  added by reference: p99 %.3f ms\n", median(refadd99, rounds)
            if (("floor", 1) in p99) printf "  added by floor:     p99 %.3f ms\n", median(flooradd99, rounds)
            printf "TARGETS ratio=%.3f add99=%.3f", median(ratio, rounds), median(add99, rounds)
            if (("floor", 1) in p99) {
                # The worst round of what the proxy adds beyond the bare passthrough, and CPU per
                # request against that of the passthrough.
                worst = -1e9
                for (r = 1; r <= rounds; r++) {
                    over = add99[r] - flooradd99[r]
                    if (over > worst) worst = over
                    pc[r] = cpu["proxy", r]; fc[r] = cpu["floor", r]
                }
                printf " floor99=%.3f over_floor_worst=%.3f", median(flooradd99, rounds), worst
                if (median(fc, rounds) > 0) printf " cpu_ratio=%.2f", median(pc, rounds) / median(fc, rounds)
            }
            printf "\n"
        }' "$RESULTS"
}

say ""
say "== summary (load average now $(machine_load))"
verdict() { if awk "BEGIN {exit !($1)}"; then say "met"; else say "MISSED"; fi; }
if [[ "$SKIP_THROUGHPUT" != 1 ]]; then
    say "reference: $REF_KIND; medians over $ROUNDS rounds"
    for mode in "${MODES[@]}"; do
        say "$(mode_label "$mode"):"
        summary "$mode" | grep -v '^TARGETS'
    done
    targets="$(summary "$CONNECTIONS:0" | grep '^TARGETS')"
    ratio="$(field ratio <<<"$targets")"
    add99="$(field add99 <<<"$targets")"
    say "proxy peak RSS (throughput): $(mb "$PROXY_PEAK_KB") MB; reference peak RSS: $(mb "$REF_PEAK_KB") MB"
fi
if [[ "$SKIP_SSE" != 1 ]]; then
    say "SSE: $(field completed <<<"$SSE_LINE")/$SSE_STREAMS completed, peak open $(field peak_open <<<"$SSE_LINE"); proxy RSS idle $(mb "$SSE_IDLE_KB") MB, peak $(mb "$SSE_PEAK_KB") MB, after $(mb "$SSE_AFTER_KB") MB"
    say "SSE through the bare passthrough: $(field completed <<<"$SSE_FLOOR_LINE")/$SSE_STREAMS completed; RSS idle $(mb "$SSE_FLOOR_IDLE_KB") MB, peak $(mb "$SSE_FLOOR_PEAK_KB") MB ($(( (SSE_FLOOR_PEAK_KB - SSE_FLOOR_IDLE_KB) / SSE_STREAMS )) KB a stream above idle)"
fi
say ""
say "== targets"
if [[ "$SKIP_THROUGHPUT" != 1 ]]; then
    say "throughput >= 0.6x reference at c=$CONNECTIONS: $ratio  $(verdict "$ratio >= 0.6")"
    cpu_ratio="$(field cpu_ratio <<<"$targets")"
    [[ -n "$cpu_ratio" ]] && say "CPU per request <= 2x the bare passthrough's at c=$CONNECTIONS: ${cpu_ratio}x  $(verdict "$cpu_ratio <= 2")"
    # With the floor loaded, each latency verdict also says what the bare passthrough adds.
    floor_note() {
        local floor99
        floor99="$(field floor99 <<<"$1")"
        [[ -n "$floor99" ]] && say "  (bare passthrough adds $floor99 ms)"
        return 0
    }
    say "p99 added latency <= 1 ms at c=$CONNECTIONS: $add99 ms  $(verdict "$add99 <= 1")$(floor_note "$targets")"
    for mode in "${MODES[@]}"; do
        [[ "$mode" == "$CONNECTIONS:0" || "${mode%%:*}" != "$CONNECTIONS" ]] && continue
        line="$(summary "$mode" | grep '^TARGETS')"
        paced="$(field add99 <<<"$line")"
        say "  $(mode_label "$mode"): $paced ms  $(verdict "$paced <= 1")$(floor_note "$line")"
        worst="$(field over_floor_worst <<<"$line")"
        [[ -n "$worst" ]] && say "  $(mode_label "$mode"): p99 added beyond the bare passthrough's <= 0.3 ms in every round: worst $worst ms  $(verdict "$worst <= 0.3")"
    done
    say "peak RSS < 64 MB: $(mb "$PROXY_PEAK_KB") MB  $(verdict "$PROXY_PEAK_KB < 65536")"
fi
[[ "$PERF" == 1 ]] && say "profile: perf report -i $OUT/perf.data --no-children --sort symbol"
if [[ "$SKIP_SSE" != 1 ]]; then
    completed="$(field completed <<<"$SSE_LINE")"
    peak_open="$(field peak_open <<<"$SSE_LINE")"
    say "$SSE_STREAMS concurrent SSE streams, none dropped, < 40 MB: ${completed:-0} completed, ${peak_open:-0} open at once, $(mb "$SSE_PEAK_KB") MB ($(( (SSE_PEAK_KB - SSE_IDLE_KB) / SSE_STREAMS )) KB a stream above idle)  $(verdict "${completed:-0} == $SSE_STREAMS && ${peak_open:-0} == $SSE_STREAMS && $SSE_STATUS == 0 && $SSE_PEAK_KB < 40960")"
    say "  (the bare passthrough: $(mb "$SSE_FLOOR_PEAK_KB") MB, $(( (SSE_FLOOR_PEAK_KB - SSE_FLOOR_IDLE_KB) / SSE_STREAMS )) KB a stream above idle)"
fi
