# shellcheck shell=bash
# Shared settings and helpers for deploy/local/*.sh. Sourced, never run.
#
# Everything is overridable from the environment:
#   METERFLOW_STATE           state dir (data, logs, pid files, generated configs); default <repo>/.state
#   METERFLOW_CACHE           install cache outside the repo (the broker binary, python venvs);
#                             default $HOME/.cache/meterflow
#   METERFLOW_BROKER_STORAGE  sqlite (durable, default) | memory (fast, lost on restart)
#   METERFLOW_READY_TIMEOUT   seconds each service gets to become ready (default 60)
#   METERFLOW_PROMETHEUS      1 (default) to let `up` start Prometheus, 0 to skip it
#   METERFLOW_BROKER_PORT, METERFLOW_CLICKHOUSE_HTTP_PORT, METERFLOW_CLICKHOUSE_TCP_PORT,
#   METERFLOW_PROMETHEUS_PORT  ports (defaults 9092, 8123, 9000, 9090)

MF_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MF_STATE="${METERFLOW_STATE:-$MF_REPO/.state}"
MF_CACHE="${METERFLOW_CACHE:-$HOME/.cache/meterflow}"
MF_READY_TIMEOUT="${METERFLOW_READY_TIMEOUT:-60}"
MF_BROKER_STORAGE="${METERFLOW_BROKER_STORAGE:-sqlite}"

NISSHI_VERSION="0.8.1"
NISSHI_ROOT="$MF_CACHE/nisshi-$NISSHI_VERSION"
NISSHI_BIN="$NISSHI_ROOT/bin/nisshi"
NISSHI_BUILD_LOG="$MF_CACHE/nisshi-build.log"
NISSHI_LOCK="$MF_CACHE/nisshi-$NISSHI_VERSION.lock"

# Loopback only. The ports can be moved (e.g. to run a second stack beside the usual one);
# point clients at them with METERFLOW_KAFKA_BROKERS / METERFLOW_CLICKHOUSE_URL.
MF_HOST=127.0.0.1
BROKER_PORT="${METERFLOW_BROKER_PORT:-9092}"
CLICKHOUSE_HTTP_PORT="${METERFLOW_CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_TCP_PORT="${METERFLOW_CLICKHOUSE_TCP_PORT:-9000}"
# Passwords of the local ClickHouse users (loopback only; see services.sh, users.xml).
CH_WRITER_PASSWORD="${METERFLOW_CH_WRITER_PASSWORD:-meterflow-writer}"
CH_ANALYST_PASSWORD="${METERFLOW_CH_ANALYST_PASSWORD:-meterflow-analyst}"
PROMETHEUS_PORT="${METERFLOW_PROMETHEUS_PORT:-9090}"

MF_COMPONENTS=(broker clickhouse prometheus)

log() { printf '[meterflow] %s\n' "$*"; }
warn() { printf '[meterflow] WARNING: %s\n' "$*" >&2; }
die() {
    printf '[meterflow] ERROR: %s\n' "$*" >&2
    exit 1
}

# The state subdirectory of a component; the process runs with it as its working directory.
comp_dir() { printf '%s/%s' "$MF_STATE" "$1"; }
comp_log() { printf '%s/%s/%s.log' "$MF_STATE" "$1" "$1"; }
comp_pidfile() { printf '%s/%s/%s.pid' "$MF_STATE" "$1" "$1"; }

# The name that must appear in a process's command line for it to be ours.
comp_program() {
    case "$1" in
        broker) printf 'nisshi' ;;
        clickhouse) printf 'clickhouse' ;;
        prometheus) printf 'prometheus' ;;
        *) die "unknown component '$1' (known: ${MF_COMPONENTS[*]})" ;;
    esac
}

# Is PID a live process running COMPONENT's program from COMPONENT's state dir? Guards against
# pid reuse: a stale pid file never makes us signal somebody else's process.
pid_is_ours() {
    local comp="$1" pid="$2" cmdline cwd dir
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -d "/proc/$pid" ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$(comp_program "$comp")"* ]] || return 1
    dir="$(cd "$(comp_dir "$comp")" 2>/dev/null && pwd -P)" || return 1
    cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
    # Ours if it runs in the component's state dir or names a file in it (its config).
    [[ "$cwd" == "$dir" || "$cmdline" == *"$dir/"* ]] || return 1
    # A zombie has exited already.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]] || return 1
    return 0
}

# The port that identifies a running component (its first one).
comp_main_port() {
    case "$1" in
        broker) echo "$BROKER_PORT" ;;
        clickhouse) echo "$CLICKHOUSE_HTTP_PORT" ;;
        prometheus) echo "$PROMETHEUS_PORT" ;;
    esac
}

# Prints the pid of COMPONENT if it is running (started by us), else returns 1. Removes a
# stale pid file. A process of ours that lost its pid file (same program, same state dir,
# listening on the component's port) is adopted.
running_pid() {
    local comp="$1" pidfile pid
    pidfile="$(comp_pidfile "$comp")"
    if [[ -f "$pidfile" ]]; then
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if pid_is_ours "$comp" "$pid"; then
            printf '%s' "$pid"
            return 0
        fi
        rm -f "$pidfile"
    fi
    for pid in $(listeners_on "$(comp_main_port "$comp")"); do
        if pid_is_ours "$comp" "$pid"; then
            echo "$pid" >"$pidfile"
            printf '%s' "$pid"
            return 0
        fi
    done
    return 1
}

# Pids listening on 127.0.0.1:PORT (or any address), one per line; empty if none.
listeners_on() {
    local port="$1"
    ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
}

port_in_use() {
    local port="$1"
    [[ -n "$(ss -ltnH "sport = :$port" 2>/dev/null)" ]]
}

# Does PID (or one of its threads' process) listen on PORT?
pid_listens_on() {
    local pid="$1" port="$2"
    listeners_on "$port" | grep -qx "$pid"
}

describe_pid() {
    local pid="$1"
    if [[ -r "/proc/$pid/cmdline" ]]; then
        printf 'pid %s: %s' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-160)"
    else
        printf 'pid %s' "$pid"
    fi
}

# Fails with a pointer to LOG, its last lines and an optional hint.
fail_with_log() {
    local comp="$1" msg="$2" logf
    logf="$(comp_log "$comp")"
    {
        printf '[meterflow] ERROR: %s: %s\n' "$comp" "$msg"
        printf '[meterflow] ERROR: read the log: %s\n' "$logf"
        if [[ -s "$logf" ]]; then
            printf '[meterflow] ---- last lines of %s ----\n' "$logf"
            tail -n 15 "$logf" | sed 's/^/    /'
            printf '[meterflow] ----\n'
        fi
        if [[ "$comp" == clickhouse ]]; then
            printf '[meterflow] ERROR: and ClickHouse'"'"'s own error log: %s/clickhouse-server.err.log\n' "$(comp_dir clickhouse)"
            if [[ -s "$(comp_dir clickhouse)/clickhouse-server.err.log" ]]; then
                grep -v '^[0-9]*\. ' "$(comp_dir clickhouse)/clickhouse-server.err.log" | tail -n 5 | cut -c1-300 | sed 's/^/    /'
            fi
        fi
    } >&2
    exit 1
}

now_s() { date +%s; }

have() { command -v "$1" >/dev/null 2>&1; }

# apt-get install PACKAGES without letting their maintainer scripts start system-wide services
# (Debian's clickhouse-server and prometheus would otherwise grab 8123/9000/9090 with /etc's
# configs).
apt_install() {
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    local rc=0
    {
        log "apt-get update && apt-get install -y $*"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
    } || rc=$?
    [[ "$created_policy" == 0 ]] || rm -f /usr/sbin/policy-rc.d
    return "$rc"
}
