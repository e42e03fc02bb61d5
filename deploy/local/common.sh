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

# ---------------------------------------------------------------------------------------------
# Component life cycle shared by services.sh and cluster.sh. Each script defines the hooks
# comp_ports, comp_write_config DIR, comp_command (sets CMD), comp_ready PID, comp_describe.

# Refuses a port somebody else holds, writes the config, starts the component in its own
# session and waits until comp_ready says yes (stopping it again when it never does).
launch_component() {
    local comp="$1" dir logf pidfile pid
    dir="$(comp_dir "$comp")"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd -P)"
    logf="$(comp_log "$comp")"
    pidfile="$(comp_pidfile "$comp")"

    # Somebody else on our port: refuse early, with the culprit named.
    local port holders
    for port in $(comp_ports "$comp"); do
        if port_in_use "$port"; then
            holders="$(listeners_on "$port" | while read -r p; do describe_pid "$p"; echo; done)"
            printf '[meterflow] %s: 127.0.0.1:%s is already in use by %s\n' "$comp" "$port" "${holders:-another process}" >>"$logf"
            fail_with_log "$comp" "port $port is already in use by ${holders:-another process} (not started by this script); stop it or free the port"
        fi
    done

    comp_write_config "$comp" "$dir"
    comp_command "$comp"
    printf '\n[meterflow] ==== %s starting at %s: %s\n' "$comp" "$(date -u +%FT%TZ)" "${CMD[*]}" >>"$logf"
    # setsid: its own session, so a Ctrl-C in the terminal that ran `make up` does not reach it.
    (cd "$dir" && exec setsid "${CMD[@]}" >>"$logf" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" >"$pidfile"
    log "$comp: started (pid $pid), waiting up to ${MF_READY_TIMEOUT}s for it to be ready; log: $logf"

    local start
    start="$(now_s)"
    while true; do
        # (Not pid_is_ours here: until the subshell has exec'd, the pid is still a bash.)
        if ! kill -0 "$pid" 2>/dev/null || [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]]; then
            wait "$pid" 2>/dev/null || true
            rm -f "$pidfile"
            fail_with_log "$comp" "exited during start-up"
        fi
        if comp_ready "$comp" "$pid"; then
            break
        fi
        if (($(now_s) - start >= MF_READY_TIMEOUT)); then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$pid" 2>/dev/null || true
            rm -f "$pidfile"
            fail_with_log "$comp" "not ready after ${MF_READY_TIMEOUT}s (stopped it again)"
        fi
        sleep 0.5
    done
    log "$comp: ready in $(($(now_s) - start))s ($(comp_describe "$comp"))"
}

# signal_and_wait PID SIGNAL GRACE LABEL PREDICATE...: sends SIGNAL, waits while PREDICATE
# (a command, e.g. `pid_is_ours COMP PID`) holds, and sends SIGKILL after GRACE seconds.
signal_and_wait() {
    local pid="$1" signal="$2" grace="$3" label="$4" start
    shift 4
    kill "-$signal" "$pid" 2>/dev/null || true
    start="$(now_s)"
    while "$@"; do
        if (($(now_s) - start >= grace)); then
            warn "$label: pid $pid still running ${grace}s after SIG$signal, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
}

# SIGTERM, then SIGKILL after 30 s; a second argument KILL sends SIGKILL at once (a crash).
stop_component() {
    local comp="$1" signal="${2:-TERM}" pid pidfile start
    pidfile="$(comp_pidfile "$comp")"
    if ! pid="$(running_pid "$comp")"; then
        log "$comp: not running (nothing to stop)"
        return 0
    fi
    log "$comp: stopping (pid $pid, SIG$signal)"
    signal_and_wait "$pid" "$signal" 30 "$comp" pid_is_ours "$comp" "$pid"
    rm -f "$pidfile"
    # The ports must be free again before a quick restart.
    local port
    for port in $(comp_ports "$comp"); do
        start="$(now_s)"
        while pid_listens_on "$pid" "$port" && (($(now_s) - start < 10)); do sleep 0.2; done
    done
    log "$comp: stopped"
}

status_component() {
    local comp="$1" pid
    if pid="$(running_pid "$comp")"; then
        if comp_ready "$comp" "$pid"; then
            printf '%-11s running  pid %-7s %s; log %s\n' "$comp" "$pid" "$(comp_describe "$comp")" "$(comp_log "$comp")"
            return 0
        fi
        printf '%-11s UNHEALTHY pid %-7s (process up but not answering) %s; log %s\n' "$comp" "$pid" "$(comp_describe "$comp")" "$(comp_log "$comp")"
        return 3
    fi
    local note="" port
    for port in $(comp_ports "$comp"); do
        if port_in_use "$port"; then
            note="; port $port is held by another process ($(listeners_on "$port" | head -n1 | { read -r p && describe_pid "$p"; } || true))"
        fi
    done
    printf '%-11s stopped%s\n' "$comp" "$note"
    return 3
}

# ---------------------------------------------------------------------------------------------
# A cached Python virtualenv with one pinned PyPI package: ensure_py_venv DIR PACKAGE VERSION
# MODULE [NOTE]. Serialised by a lock (parallel test runs); never skips: a failed install dies
# with what to fix. Used by pyenv.sh (fastavro) and check-ddl-current.sh (chdb-core).
find_python() {
    local p
    for p in python3 python; do
        if have "$p" && "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
            command -v "$p"
            return 0
        fi
    done
    return 1
}

ensure_py_venv() {
    local venv="$1" package="$2" version="$3" module="$4" note="${5:-}" py
    local check="import $module, sys; sys.exit(0 if $module.__version__ == '$version' else 1)"
    [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$check" 2>/dev/null && return 0
    mkdir -p "$MF_CACHE"
    exec 8>"$venv.lock"
    flock 8
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$check" 2>/dev/null; then
        exec 8>&-
        return 0
    fi
    if ! py="$(find_python)"; then
        log "no python3 >= 3.9: installing python3 python3-venv"
        apt_install python3 python3-venv python3-pip || die "cannot install python3"
        py="$(find_python)" || die "no python3 >= 3.9 even after installing it"
    fi
    log "creating $venv with $package==$version${note:+ ($note)}"
    rm -rf "$venv"
    if ! "$py" -m venv "$venv" 2>/dev/null; then
        log "python venv module missing: installing python3-venv"
        apt_install python3-venv || die "cannot install python3-venv"
        "$py" -m venv "$venv" || die "cannot create a virtualenv with $py"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$package==$version" ||
        die "pip install $package==$version failed; this does not skip: fix the install (network? package index?) and re-run"
    "$venv/bin/python" -c "$check" || die "$package installed but 'import $module' fails or has another version"
    exec 8>&-
}
