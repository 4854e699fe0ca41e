#!/usr/bin/env bash
# pgshift's cost, measured against a direct connection and PgBouncer (session mode) on one
# machine, in one run. See docs/BENCHMARKS.md for the method and the latest table.
#
# Starts ONE throwaway PostgreSQL cluster, PgBouncer in session mode and pgshift (release
# build, blue and green both pointing at that cluster, so only the proxy differs), loads
# `pgbench -i -s 10`, then runs the same pgbench command line against direct / PgBouncer /
# pgshift, interleaved A B C A B C over several rounds. Also measures pgshift's RSS per idle
# session (1,000 sessions, each with its backend), CPU-µs per transaction of both proxies, and
# pgshift's CPU per transaction with a rollout running and /metrics scraped every second.
#
# Usage: benches/compare.sh [--quick] [--rounds N] [--duration SECONDS] [--only REGEX]
#                           [--out DIR] [--no-build] [--pgshift BINARY]
#   --quick      1 round of 3 s runs, a subset of the workloads, 100 idle sessions (a smoke run)
#   --rounds N   rounds of the interleaved comparison (default 3; the rollout case runs
#                max(N, 5) rounds)
#   --duration S seconds per pgbench run (default 10)
#   --only RE    only the workloads whose name matches RE (extended grep); "none" skips them
#   --skip LIST  comma-separated parts to skip: compare, rss, rollout
#   --out DIR    where runs.tsv, summary.txt and the logs go (default target/bench-compare/DATE)
#   --no-build   use target/release/pgshift as it is
#   --threads-experiment
#                also run a second pgshift with TOKIO_WORKER_THREADS=1 (target pgshift-1t) in
#                the interleaving: an experiment on the runtime, reported apart from the table
#
# Needs: PostgreSQL's server binaries (initdb, postgres, pgbench, psql), pgbouncer (installed
# with apt-get when absent and running as root), openssl, curl. Run as root, the servers run as
# the `postgres` OS user. Stops only the processes it started, by PID, and removes its temp
# dir on any exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=3
DURATION=10
QUICK=0
ONLY=""
SKIP=""
OUT=""
BUILD=1
PGSHIFT_BIN=""
THREADS_EXPERIMENT=0
IDLE_SESSIONS=1000
ROLLOUT_ROUNDS=5
SCALE=10

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --skip) SKIP=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --pgshift) PGSHIFT_BIN=$2; BUILD=0; shift ;;
        --threads-experiment) THREADS_EXPERIMENT=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    ROUNDS=1
    DURATION=3
    IDLE_SESSIONS=100
    ROLLOUT_ROUNDS=2
    [ -n "$ONLY" ] || ONLY='^(select-prepared-16|tpcb-prepared-16|connect-select-16|tls-select-prepared-16)$'
else
    [ "$ROUNDS" -ge 5 ] && ROLLOUT_ROUNDS=$ROUNDS
fi
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

# name | pgbench arguments (the same for every target) | clients | sslmode
WORKLOADS=(
    "select-prepared-1|-S -M prepared|1|disable"
    "select-prepared-16|-S -M prepared|16|disable"
    "select-prepared-64|-S -M prepared|64|disable"
    "select-simple-1|-S -M simple|1|disable"
    "select-simple-16|-S -M simple|16|disable"
    "select-simple-64|-S -M simple|64|disable"
    "tpcb-prepared-16|-M prepared|16|disable"
    "connect-select-16|-C -S -M simple|16|disable"
    "tls-select-prepared-16|-S -M prepared|16|require"
)
TARGETS=(direct pgbouncer pgshift)
[ "$THREADS_EXPERIMENT" = 1 ] && TARGETS+=(pgshift-1t)

say() { printf '%s compare: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "$*"; exit 1; }

# --- tools -----------------------------------------------------------------------------------

find_pg_bin() {
    if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return; fi
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir; return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return; }
    return 1
}
PG_BIN=$(find_pg_bin) || die "PostgreSQL server binaries not found (set PG_BIN, or apt-get install -y postgresql)"
PGBENCH=$(command -v pgbench || echo "$PG_BIN/pgbench")
PSQL=$(command -v psql || echo "$PG_BIN/psql")
[ -x "$PGBENCH" ] || die "pgbench not found"
if ! command -v pgbouncer >/dev/null; then
    [ "$(id -u)" = 0 ] || die "pgbouncer is not installed (apt-get install -y pgbouncer)"
    say "installing pgbouncer"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
fi
PGBOUNCER=$(command -v pgbouncer)
for tool in openssl curl ss; do command -v "$tool" >/dev/null || die "$tool is needed"; done

if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a postgres OS user for the servers"
    AS_PG=(runuser -u postgres --)
    OWNER=postgres
else
    AS_PG=()
    OWNER=$(id -un)
fi

if [ "$BUILD" = 1 ]; then
    say "building pgshift (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet)
fi
[ -n "$PGSHIFT_BIN" ] || PGSHIFT_BIN="$REPO/target/release/pgshift"
[ -x "$PGSHIFT_BIN" ] || die "$PGSHIFT_BIN not found (cargo build --release)"

[ -n "$OUT" ] || OUT="$REPO/target/bench-compare/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# --- processes we start, and the clean-up -----------------------------------------------------

if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2{print $4}')" -gt 2000000 ]; then
    TMP=$(mktemp -d /dev/shm/pgshift-bench.XXXXXX)
else
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgshift-bench.XXXXXX")
fi
chmod 0755 "$TMP"
[ "$(id -u)" = 0 ] && chown "$OWNER" "$TMP"

PG_PID=""
BOUNCER_PIDS=()
PGSHIFT_PIDS=()
HELPER_PIDS=()
IDLE_FDS=()

stop_pid() { # pid signal seconds
    local pid=$1 signal=$2 wait=$3 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -"$signal" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < wait * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

close_idle_sessions() {
    local fd
    for fd in "${IDLE_FDS[@]}"; do exec {fd}>&-; done
    IDLE_FDS=()
}

cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    close_idle_sessions 2>/dev/null || true
    for pid in "${HELPER_PIDS[@]}"; do stop_pid "$pid" TERM 2; done
    for pid in "${PGSHIFT_PIDS[@]}"; do stop_pid "$pid" TERM 10; done
    for pid in "${BOUNCER_PIDS[@]}"; do stop_pid "$pid" INT 5; done
    stop_pid "$PG_PID" INT 20
    wait 2>/dev/null || true
    if [ -d "$TMP" ]; then
        cp "$TMP"/*.log "$OUT"/ 2>/dev/null || true
        rm -rf "$TMP"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

USED_PORTS=" "
free_port() { # sets PORT to a port nothing listens on (nor was handed out before)
    local port
    for port in $(shuf -i 10000-32000 -n 200); do
        [[ "$USED_PORTS" == *" $port "* ]] && continue
        if [ -z "$(ss -Htan "sport = :$port")" ]; then
            USED_PORTS="$USED_PORTS$port "
            PORT=$port
            return
        fi
    done
    die "no free port"
}

wait_for_port() { # port seconds what
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -n "$(ss -Htln "sport = :$1")" ] && return 0
        sleep 0.1
    done
    die "$3 did not listen on port $1 within $2 s"
}

# CPU time (user + system, in clock ticks) a process used so far, all its threads included.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
CLK_TCK=$(getconf CLK_TCK)
# CPU time in ns of a process's live threads (schedstat: finer than clock ticks).
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ n += $1 } END { printf "%.0f", n }'; }
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# --- PostgreSQL ---------------------------------------------------------------------------------

free_port
PG_PORT=$PORT
say "temp dir $TMP; PostgreSQL on port $PG_PORT ($PG_BIN)"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
    -keyout "$TMP/server.key" -out "$TMP/server.crt" >/dev/null 2>&1
chmod 0600 "$TMP/server.key"
[ "$(id -u)" = 0 ] && chown "$OWNER" "$TMP/server.key" "$TMP/server.crt"

(cd "$TMP" && "${AS_PG[@]}" "$PG_BIN/initdb" -D "$TMP/data" -U postgres -A trust --no-sync \
    >"$TMP/initdb.log" 2>&1) || die "initdb failed: $(tail -n 5 "$TMP/initdb.log")"
cat >>"$TMP/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP'
max_connections = $((IDLE_SESSIONS + 250))
shared_buffers = 256MB
# The proxy's cost is what is measured: keep the disk out of it (the same for every target).
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = '$TMP/server.crt'
ssl_key_file = '$TMP/server.key'
EOF
(cd "$TMP" && exec "${AS_PG[@]}" "$PG_BIN/postgres" -D "$TMP/data" >"$TMP/postgres.log" 2>&1) &
for ((i = 0; i < 300; i++)); do
    [ -s "$TMP/data/postmaster.pid" ] && PG_PID=$(head -n 1 "$TMP/data/postmaster.pid") && break
    sleep 0.1
done
[ -n "$PG_PID" ] || die "postgres did not start: $(tail -n 5 "$TMP/postgres.log")"
wait_for_port "$PG_PORT" 30 postgres
for ((i = 0; i < 100; i++)); do
    "$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc "select 1" >/dev/null 2>&1 && break
    sleep 0.1
done
export PGSSLMODE=disable
"$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE bench" >/dev/null
say "pgbench -i -s $SCALE"
"$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >"$TMP/pgbench-init.log" 2>&1 \
    || die "pgbench -i failed: $(tail -n 5 "$TMP/pgbench-init.log")"

# --- PgBouncer (session mode) ---------------------------------------------------------------------

printf '"postgres" ""\n' >"$TMP/userlist.txt"
[ "$(id -u)" = 0 ] && chown "$OWNER" "$TMP/userlist.txt"

start_pgbouncer() { # name port pool_size; sets STARTED_PID
    local name=$1 port=$2 pool=$3 pid="" i
    cat >"$TMP/$name.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $TMP/userlist.txt
pool_mode = session
default_pool_size = $pool
admin_users = postgres
max_client_conn = $((IDLE_SESSIONS + 200))
pidfile = $TMP/$name.pid
logfile = $TMP/$name.log
client_tls_sslmode = prefer
client_tls_key_file = $TMP/server.key
client_tls_cert_file = $TMP/server.crt
EOF
    [ "$(id -u)" = 0 ] && chown "$OWNER" "$TMP/$name.ini"
    (cd "$TMP" && exec "${AS_PG[@]}" "$PGBOUNCER" "$TMP/$name.ini" >"$TMP/$name.stderr.log" 2>&1) &
    for ((i = 0; i < 100; i++)); do
        [ -s "$TMP/$name.pid" ] && pid=$(cat "$TMP/$name.pid") && break
        sleep 0.1
    done
    [ -n "$pid" ] || die "pgbouncer did not start: $(tail -n 5 "$TMP/$name.stderr.log")"
    BOUNCER_PIDS+=("$pid")
    wait_for_port "$port" 10 pgbouncer
    STARTED_PID=$pid
}

# --- pgshift ------------------------------------------------------------------------------------

start_pgshift() { # name port metrics_port [VAR=value ...]; sets STARTED_PID
    local name=$1 port=$2 metrics=$3 pid
    shift 3
    cat >"$TMP/$name.toml" <<EOF
[listen]
addr = "127.0.0.1:$port"
max_clients = $((IDLE_SESSIONS + 1000))
tls_cert = "$TMP/server.crt"
tls_key = "$TMP/server.key"

[admin]
socket = "$TMP/$name.sock"

[metrics]
addr = "127.0.0.1:$metrics"

# Both colors on the one cluster: only the proxy differs from a direct connection.
[blue]
host = "127.0.0.1"
port = $PG_PORT

[green]
host = "127.0.0.1"
port = $PG_PORT

[routing]
green_weight = 50.0

[rollout]
steps = [5, 10, 25, 50, 75, 100]
step_dwell = "1h"
evaluate_every = "1s"
window = "10s"
min_requests = 200
state_file = ""
decision_log = ""

[[rollout.trigger]]
metric = "error_rate"
above = 0.05
action = "pause"

[[rollout.trigger]]
metric = "latency_p95_ratio"
above = 3.0
action = "warn"

[[rollout.trigger]]
metric = "latency_p99_ms"
above = 2000
action = "warn"
EOF
    env "$@" "$PGSHIFT_BIN" run --config "$TMP/$name.toml" >"$TMP/$name.log" 2>&1 &
    pid=$!
    PGSHIFT_PIDS+=("$pid")
    wait_for_port "$port" 30 pgshift
    STARTED_PID=$pid
}

# --- one pgbench run ------------------------------------------------------------------------------

TSV="$OUT/runs.tsv"
printf 'round\tworkload\ttarget\tclients\ttps\tlatency_ms\ttransactions\tfailed\tproxy_cpu_s\tproxy_cpu_us_per_tx\tstarted\n' >"$TSV"

# run_pgbench round workload target port pid args clients sslmode
run_pgbench() {
    local round=$1 workload=$2 target=$3 port=$4 pid=$5 args=$6 clients=$7 ssl=$8
    local threads=2 before after output tps latency transactions failed cpu_s cpu_per_tx started
    [ "$clients" -lt 2 ] && threads=1
    started=$(date +%s)
    before=0
    [ -n "$pid" ] && before=$(cpu_ticks "$pid")
    # shellcheck disable=SC2086 # $args is a list of pgbench options
    output=$(PGSSLMODE=$ssl "$PGBENCH" -h 127.0.0.1 -p "$port" -U postgres -n $args \
        -c "$clients" -j "$threads" -T "$DURATION" bench 2>&1) || true
    after=0
    [ -n "$pid" ] && after=$(cpu_ticks "$pid")
    printf '%s\n' "== round $round $workload $target" "$output" >>"$OUT/pgbench.log"
    tps=$(awk '/^tps = /{print $3; exit}' <<<"$output")
    latency=$(awk '/^latency average = /{print $4; exit}' <<<"$output")
    transactions=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$output")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$output")
    if [ -z "$tps" ] || [ -z "$transactions" ]; then
        say "pgbench failed ($workload, $target): $(tail -n 3 <<<"$output" | tr '\n' ' ')"
        tps=NA; latency=NA; transactions=0
    fi
    cpu_s=NA; cpu_per_tx=NA
    if [ -n "$pid" ]; then
        cpu_s=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" 'BEGIN{printf "%.2f", t / hz}')
        [ "${transactions:-0}" -gt 0 ] && cpu_per_tx=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" \
            -v n="$transactions" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$workload" "$target" "$clients" \
        "$tps" "${latency:-NA}" "${transactions:-0}" "${failed:-0}" "$cpu_s" "$cpu_per_tx" "$started" >>"$TSV"
    say "round $round $workload $target: tps $tps, latency ${latency:-NA} ms, proxy CPU $cpu_per_tx µs/tx"
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(nproc) x $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
    echo "memory: $(awk '/^MemTotal/{printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "kernel: $(uname -sr)"
    echo "postgres: $("$PG_BIN/postgres" --version)"
    echo "pgbouncer: $("$PGBOUNCER" --version | head -n 1)"
    echo "pgshift: $("$PGSHIFT_BIN" --version) ($(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && git diff --quiet 2>/dev/null || echo '+local changes'))"
    echo "pgbench: -j 2 (1 for 1 client), -T $DURATION, scale $SCALE, rounds $ROUNDS"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"

# --- the interleaved comparison --------------------------------------------------------------------

if ! skipped compare || ! skipped rollout; then
    free_port; BOUNCER_PORT=$PORT
    free_port; PGSHIFT_PORT=$PORT
    free_port; METRICS_PORT=$PORT
    start_pgbouncer pgbouncer "$BOUNCER_PORT" 100; BOUNCER_PID=$STARTED_PID
    start_pgshift pgshift "$PGSHIFT_PORT" "$METRICS_PORT"; PGSHIFT_PID=$STARTED_PID
    say "PgBouncer $BOUNCER_PID on $BOUNCER_PORT, pgshift $PGSHIFT_PID on $PGSHIFT_PORT"
    declare -A PORT_OF=([direct]=$PG_PORT [pgbouncer]=$BOUNCER_PORT [pgshift]=$PGSHIFT_PORT)
    declare -A PID_OF=([direct]="" [pgbouncer]=$BOUNCER_PID [pgshift]=$PGSHIFT_PID)
    if [ "$THREADS_EXPERIMENT" = 1 ]; then
        free_port; PORT_OF[pgshift-1t]=$PORT
        free_port
        start_pgshift pgshift-1t "${PORT_OF[pgshift-1t]}" "$PORT" TOKIO_WORKER_THREADS=1
        PID_OF[pgshift-1t]=$STARTED_PID
        say "pgshift with TOKIO_WORKER_THREADS=1: $STARTED_PID on ${PORT_OF[pgshift-1t]}"
    fi
    # Warm-up, the same for every target: caches, PgBouncer's server connections.
    for target in "${TARGETS[@]}"; do
        PGSSLMODE=disable "$PGBENCH" -h 127.0.0.1 -p "${PORT_OF[$target]}" -U postgres -n -S -M prepared \
            -c 16 -j 2 -T 2 bench >/dev/null 2>&1 || die "warm-up against $target failed"
    done
fi

if ! skipped compare && [ "$ONLY" != none ]; then
    for ((round = 1; round <= ROUNDS; round++)); do
        for spec in "${WORKLOADS[@]}"; do
            IFS='|' read -r name args clients ssl <<<"$spec"
            [ -z "$ONLY" ] || [[ "$name" =~ $ONLY ]] || continue
            for target in "${TARGETS[@]}"; do
                run_pgbench "$round" "$name" "$target" "${PORT_OF[$target]}" "${PID_OF[$target]}" \
                    "$args" "$clients" "$ssl"
            done
        done
    done
fi

# --- CPU per transaction with a rollout running and /metrics scraped every second ---------------

ctl() { "$PGSHIFT_BIN" ctl --socket "$TMP/pgshift.sock" "$@" >>"$OUT/ctl.log" 2>&1; }

if ! skipped rollout; then
    for ((round = 1; round <= ROLLOUT_ROUNDS; round++)); do
        run_pgbench "$round" rollout-off-select-prepared-16 pgshift "$PGSHIFT_PORT" "$PGSHIFT_PID" \
            "-S -M prepared" 16 disable
        ctl rollout start || die "rollout start failed: $(tail -n 3 "$OUT/ctl.log")"
        (while :; do curl -s -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics"; sleep 1; done) &
        HELPER_PIDS+=("$!")
        run_pgbench "$round" rollout-on-select-prepared-16 pgshift "$PGSHIFT_PORT" "$PGSHIFT_PID" \
            "-S -M prepared" 16 disable
        stop_pid "${HELPER_PIDS[-1]}" TERM 2
        ctl status
        ctl weight 50 # back to manual: the next "off" run has no rollout
    done
    # The same cost measured directly, at rest: a scrape and an evaluation read cumulative
    # counters, so what they cost does not depend on the traffic; per second of a rollout it
    # is one scrape plus one evaluation (evaluate_every = 1s).
    ctl rollout start
    before=$(cpu_ns "$PGSHIFT_PID")
    for ((i = 0; i < 300; i++)); do curl -s -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics"; done
    scrape_us=$(awk -v d=$(($(cpu_ns "$PGSHIFT_PID") - before)) 'BEGIN{printf "%.1f", d / 300 / 1000}')
    before=$(cpu_ns "$PGSHIFT_PID")
    for ((i = 0; i < 100; i++)); do ctl rollout evaluate; done
    evaluate_us=$(awk -v d=$(($(cpu_ns "$PGSHIFT_PID") - before)) 'BEGIN{printf "%.1f", d / 100 / 1000}')
    ctl weight 50
    printf 'scrape_us\t%s\nevaluate_us\t%s\n' "$scrape_us" "$evaluate_us" >"$OUT/observation.tsv"
    say "at rest: $scrape_us µs of pgshift CPU per /metrics scrape, $evaluate_us µs per evaluation"
fi

# The proxies of the comparison are done: their server connections go, before the idle test.
for pid in "${PGSHIFT_PIDS[@]}"; do stop_pid "$pid" TERM 10; done
for pid in "${BOUNCER_PIDS[@]}"; do stop_pid "$pid" INT 5; done
PGSHIFT_PIDS=()
BOUNCER_PIDS=()

# --- RSS per idle session -------------------------------------------------------------------------

# A StartupMessage (protocol 3.0, user postgres, database bench, application_name idle-rss).
body=$(mktemp "$TMP/startup.XXXXXX")
printf '\x00\x03\x00\x00user\x00postgres\x00database\x00bench\x00application_name\x00idle-rss\x00\x00' >"$body"
length=$(($(wc -c <"$body") + 4))
STARTUP="$TMP/startup.bin"
printf "\\x$(printf %02x $((length >> 24 & 255)))\\x$(printf %02x $((length >> 16 & 255)))\\x$(printf %02x $((length >> 8 & 255)))\\x$(printf %02x $((length & 255)))" >"$STARTUP"
cat "$body" >>"$STARTUP"

# Sums SHOW POOLS columns (named by a regex) of database bench on PgBouncer's admin console.
pool_columns() { # port regex
    PGSSLMODE=disable "$PSQL" -h 127.0.0.1 -p "$1" -U postgres -d pgbouncer -AF' ' -c "SHOW POOLS" 2>/dev/null \
        | awk -v re="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ re) want[i] = 1; next }
                          $1 == "bench" { for (i in want) n += $i } END { print n + 0 }'
}

# Idle sessions logged in: pgshift's are backends in pg_stat_activity; PgBouncer's are its
# clients (cl_active), with or without a server connection.
logged_in() { # target port
    if [ "$1" = pgbouncer ]; then
        pool_columns "$2" '^cl_active$'
    else
        "$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
            "select count(*) from pg_stat_activity where application_name = 'idle-rss' and state = 'idle'"
    fi
}

# Server connections PgBouncer holds for database bench.
bouncer_servers() { pool_columns "$1" '^sv_(active|idle|used|tested|login)$'; }

open_idle_sessions() { # target port count
    local target=$1 port=$2 count=$3 i fd
    for ((i = 0; i < count; i++)); do
        exec {fd}<>"/dev/tcp/127.0.0.1/$port"
        cat "$STARTUP" >&"$fd"
        IDLE_FDS+=("$fd")
    done
    for ((i = 0; i < 600; i++)); do
        [ "$(logged_in "$target" "$port")" -ge "$count" ] && return 0
        sleep 0.1
    done
    die "$target: only $(logged_in "$target" "$port") of $count idle sessions logged in"
}

RSS_TSV="$OUT/rss.tsv"
printf 'target\tsessions\trss_before_kib\trss_after_kib\tbytes_per_session\tserver_connections\n' >"$RSS_TSV"

measure_idle_rss() { # target pid port
    local target=$1 pid=$2 port=$3 before after servers
    open_idle_sessions "$target" "$port" 10 # warm-up: first-use allocations are not per-session
    close_idle_sessions
    sleep 1
    before=$(rss_kib "$pid")
    open_idle_sessions "$target" "$port" "$IDLE_SESSIONS"
    sleep 2
    after=$(rss_kib "$pid")
    if [ "$target" = pgbouncer ]; then
        servers=$(bouncer_servers "$port")
    else
        servers=$(logged_in "$target" "$port")
    fi
    close_idle_sessions
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$IDLE_SESSIONS" "$before" "$after" \
        $(((after - before) * 1024 / IDLE_SESSIONS)) "$servers" >>"$RSS_TSV"
    say "$target: RSS $before KiB -> $after KiB with $IDLE_SESSIONS idle sessions ($servers server connections): $(((after - before) * 1024 / IDLE_SESSIONS)) bytes each"
}

wait_for_no_idle_backends() {
    local i
    for ((i = 0; i < 200; i++)); do
        [ "$(logged_in pgshift 0)" -eq 0 ] && return 0
        sleep 0.1
    done
}

if ! skipped rss; then
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    free_port; port=$PORT
    free_port
    start_pgshift pgshift-idle "$port" "$PORT"
    measure_idle_rss pgshift "$STARTED_PID" "$port"
    stop_pid "$STARTED_PID" TERM 10
    wait_for_no_idle_backends
    free_port; port=$PORT
    start_pgbouncer pgbouncer-idle "$port" $((IDLE_SESSIONS + 10))
    measure_idle_rss pgbouncer "$STARTED_PID" "$port"
    stop_pid "$STARTED_PID" INT 5
fi

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"

# --- the summary ----------------------------------------------------------------------------------

summarize() {
    cat "$OUT/machine.txt"
    echo
    awk -F'\t' '
        function median(list,   n, values, i, j, t) {
            n = split(list, values, " ")
            if (n == 0) return "NA"
            for (i = 2; i <= n; i++) {
                t = values[i] + 0
                for (j = i - 1; j >= 1 && values[j] + 0 > t; j--) values[j + 1] = values[j]
                values[j + 1] = t
            }
            return n % 2 ? values[(n + 1) / 2] : (values[n / 2] + values[n / 2 + 1]) / 2
        }
        NR == 1 { next }
        $5 == "NA" || $2 ~ /^rollout-/ { next }
        {
            key = $2 SUBSEP $3
            if (!($2 in seen)) { seen[$2] = 1; order[++count] = $2 }
            tps[key] = tps[key] " " $5
            lat[key] = lat[key] " " $6
            if ($10 != "NA") cpu[key] = cpu[key] " " $10
        }
        END {
            printf "%-32s %9s %9s %9s %7s %7s %7s %8s %8s %8s %8s\n", "workload (median of rounds)", \
                "direct", "pgbouncer", "pgshift", "lat d", "lat b", "lat s", "s/d", "s/b", "cpu b", "cpu s"
            printf "%-32s %9s %9s %9s %7s %7s %7s %8s %8s %8s %8s\n", "", "tps", "tps", "tps", \
                "ms", "ms", "ms", "ratio", "ratio", "µs/tx", "µs/tx"
            for (i = 1; i <= count; i++) {
                w = order[i]
                d = median(tps[w SUBSEP "direct"]); b = median(tps[w SUBSEP "pgbouncer"])
                s = median(tps[w SUBSEP "pgshift"])
                sd = (d != "NA" && d > 0 && s != "NA") ? sprintf("%.3f", s / d) : "-"
                sb = (b != "NA" && b > 0 && s != "NA") ? sprintf("%.3f", s / b) : "-"
                printf "%-32s %9s %9s %9s %7s %7s %7s %8s %8s %8s %8s\n", w, \
                    d == "NA" ? "-" : sprintf("%.0f", d), b == "NA" ? "-" : sprintf("%.0f", b), \
                    s == "NA" ? "-" : sprintf("%.0f", s), \
                    median(lat[w SUBSEP "direct"]), median(lat[w SUBSEP "pgbouncer"]), \
                    median(lat[w SUBSEP "pgshift"]), sd, sb, \
                    median(cpu[w SUBSEP "pgbouncer"]), median(cpu[w SUBSEP "pgshift"])
            }
        }' "$TSV"
    if grep -q '	pgshift-1t	' "$TSV"; then
        echo
        echo "runtime experiment: pgshift with TOKIO_WORKER_THREADS=1 (pgshift-1t), same rounds"
        awk -F'\t' '
            function median(list,   n, values, i, j, t) {
                n = split(list, values, " ")
                if (n == 0) return 0
                for (i = 2; i <= n; i++) {
                    t = values[i] + 0
                    for (j = i - 1; j >= 1 && values[j] + 0 > t; j--) values[j + 1] = values[j]
                    values[j + 1] = t
                }
                return n % 2 ? values[(n + 1) / 2] : (values[n / 2] + values[n / 2 + 1]) / 2
            }
            NR == 1 || $5 == "NA" || $2 ~ /^rollout-/ { next }
            {
                key = $2 SUBSEP $3
                if (!($2 in seen)) { seen[$2] = 1; order[++count] = $2 }
                tps[key] = tps[key] " " $5
                if ($10 != "NA") cpu[key] = cpu[key] " " $10
            }
            END {
                printf "%-32s %9s %8s %8s %8s %8s %8s\n", "workload", "1t tps", "1t/d", "1t/b", "1t/s", \
                    "cpu s", "cpu 1t"
                for (i = 1; i <= count; i++) {
                    w = order[i]
                    d = median(tps[w SUBSEP "direct"]); b = median(tps[w SUBSEP "pgbouncer"])
                    s = median(tps[w SUBSEP "pgshift"]); t = median(tps[w SUBSEP "pgshift-1t"])
                    printf "%-32s %9.0f %8.3f %8.3f %8.3f %8s %8s\n", w, t, d ? t / d : 0, \
                        b ? t / b : 0, s ? t / s : 0, median(cpu[w SUBSEP "pgshift"]), \
                        median(cpu[w SUBSEP "pgshift-1t"])
                }
            }' "$TSV"
    fi
    if [ -s "$RSS_TSV" ] && [ "$(wc -l <"$RSS_TSV")" -gt 1 ]; then
        echo
        awk -F'\t' 'NR > 1 { printf "idle RSS, %s: %d sessions, %d -> %d KiB, %d bytes per session (%d server connections held)\n", $1, $2, $3, $4, $5, $6 }' "$RSS_TSV"
    fi
    if grep -q '^[0-9]*	rollout-' "$TSV"; then
        echo
        awk -F'\t' '
            function median(list,   n, values, i, j, t) {
                n = split(list, values, " ")
                for (i = 2; i <= n; i++) {
                    t = values[i] + 0
                    for (j = i - 1; j >= 1 && values[j] + 0 > t; j--) values[j + 1] = values[j]
                    values[j + 1] = t
                }
                return n % 2 ? values[(n + 1) / 2] : (values[n / 2] + values[n / 2 + 1]) / 2
            }
            $2 ~ /^rollout-off/ && $10 != "NA" { off = off " " $10; offt = offt " " $5; n++ }
            $2 ~ /^rollout-on/ && $10 != "NA" { on = on " " $10; ont = ont " " $5 }
            $2 ~ /^rollout-/ && $10 != "NA" { round[$1] = round[$1] " " $10 }
            END {
                a = median(off); b = median(on)
                for (r in round) { split(round[r], pair, " "); if (pair[1] > 0) paired = paired " " pair[2] / pair[1] }
                printf "rollout + /metrics every 1 s (select-only prepared, 16 clients, %d rounds): pgshift %.1f -> %.1f µs/tx (%+.1f %%; median of per-round on/off ratios %+.1f %%), tps %.0f -> %.0f\n", n, a, b, (b - a) / a * 100, (median(paired) - 1) * 100, median(offt), median(ont)
                if (scrape != "") printf "the same, measured at rest: %s µs per scrape + %s µs per evaluation = %+.2f %% of pgshift CPU per second at %.0f tps x %.1f µs/tx\n", scrape, evaluate, (scrape + evaluate) / (median(offt) * a) * 100, median(offt), a
            }' scrape="$(awk '$1 == "scrape_us" {print $2}' "$OUT/observation.tsv" 2>/dev/null)" \
               evaluate="$(awk '$1 == "evaluate_us" {print $2}' "$OUT/observation.tsv" 2>/dev/null)" "$TSV"
    fi
}
summarize | tee "$OUT/summary.txt"
say "raw runs: $TSV; summary: $OUT/summary.txt"
