#!/usr/bin/env bash
# Installs what the local services need, idempotently. Nothing goes into the repo:
#   broker      nisshi (Kafka-API broker) built with `cargo +nightly install` (it needs rustc
#               >= 1.96) into $METERFLOW_CACHE/nisshi-0.8.1/bin/nisshi (~25 min on 2 cores the first time;
#               a lock file makes concurrent callers wait for one build instead of starting two)
#   clickhouse  Debian's clickhouse-server + clickhouse-client (apt)
#   prometheus  Debian's prometheus (apt)
#   zookeeper   Debian's zookeeper 3.8 and a Java runtime (apt), for the local ClickHouse cluster
#               (deploy/local/cluster.sh); not part of `all`
#   chromium    Debian's chromium (apt): the headless browser of the customer-page test
#               (tests/e2e/usage_api.rs); `make test` installs it; not part of `all`
#
# usage: install.sh [all|broker|clickhouse|prometheus|zookeeper|chromium]...
#        install.sh broker --background   start the broker build detached (for CI) and return
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_clickhouse() {
    if have clickhouse-server && have clickhouse-client; then
        return 0
    fi
    log "clickhouse: installing clickhouse-server clickhouse-client"
    apt_install clickhouse-server clickhouse-client || die "clickhouse: apt-get install failed"
    have clickhouse-server || die "clickhouse: clickhouse-server still not on PATH after install"
}

install_prometheus() {
    if have prometheus; then
        return 0
    fi
    log "prometheus: installing prometheus"
    apt_install --no-install-recommends prometheus || die "prometheus: apt-get install failed"
    have prometheus || die "prometheus: still not on PATH after install"
}

# Only the jars are used: cluster.sh runs the server from its generated zoo.cfg, never as a
# system service (the package installs none; `zookeeperd` would).
install_zookeeper() {
    if [[ -f /usr/share/java/zookeeper.jar ]] && have java; then
        return 0
    fi
    log "zookeeper: installing zookeeper (and a Java runtime)"
    apt_install --no-install-recommends zookeeper || die "zookeeper: apt-get install failed"
    [[ -f /usr/share/java/zookeeper.jar ]] || die "zookeeper: /usr/share/java/zookeeper.jar missing after install"
}

install_chromium() {
    if have chromium; then
        return 0
    fi
    log "chromium: installing chromium (headless browser for the customer-page test)"
    apt_install --no-install-recommends chromium || die "chromium: apt-get install failed"
    have chromium || die "chromium: still not on PATH after install"
}

ensure_build_tools() {
    local missing=()
    have cc || missing+=(build-essential)
    have cmake || missing+=(cmake)
    have pkg-config || missing+=(pkg-config)
    if ((${#missing[@]})); then
        log "broker: installing build tools: ${missing[*]}"
        apt_install "${missing[@]}" || die "broker: could not install ${missing[*]}"
    fi
    have rustup || die "broker: rustup is not installed; the broker is built with a nightly Rust toolchain"
    if ! rustup toolchain list | grep -q '^nightly'; then
        log "broker: installing the nightly Rust toolchain (nisshi $NISSHI_VERSION needs rustc >= 1.96)"
        rustup toolchain install nightly --profile minimal
    fi
}

# A `cargo install nisshi` into our root started by somebody else without our lock (e.g. by
# hand). Detection only, never signalled.
foreign_build_pid() {
    pgrep -f "cargo.* install nisshi@$NISSHI_VERSION .*--root $NISSHI_ROOT" 2>/dev/null | head -n1
}

# Waits for PID to exit, printing progress from the build log every 30 s.
watch_build() {
    local pid="$1" start
    start="$(now_s)"
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        if (($(($(now_s) - start)) % 30 < 5)); then
            log "broker: still building ($(($(now_s) - start))s, $(grep -c Compiling "$NISSHI_BUILD_LOG" 2>/dev/null || echo 0) crates compiled; log: $NISSHI_BUILD_LOG)"
        fi
    done
}

build_broker_locked() {
    # Called with the lock held.
    if [[ -x "$NISSHI_BIN" ]]; then
        return 0
    fi
    local other
    other="$(foreign_build_pid || true)"
    if [[ -n "$other" ]]; then
        log "broker: a build is already running (pid $other), waiting for it; log: $NISSHI_BUILD_LOG"
        watch_build "$other"
        [[ -x "$NISSHI_BIN" ]] && return 0
        warn "broker: that build finished without producing $NISSHI_BIN; building again"
    fi
    ensure_build_tools
    log "broker: building nisshi $NISSHI_VERSION with cargo +nightly install into $NISSHI_ROOT"
    log "broker: this takes ~25 min on 2 cores the first time; progress in $NISSHI_BUILD_LOG"
    local start rc=0
    start="$(now_s)"
    mkdir -p "$NISSHI_ROOT"
    # Its own target dir under the cache: cargo install's default temp dir would be lost on
    # failure, this one lets a retry resume.
    (
        export CARGO_TARGET_DIR="$MF_CACHE/nisshi-$NISSHI_VERSION-target"
        exec cargo +nightly install "nisshi@$NISSHI_VERSION" --locked --no-default-features \
            --features libsql,dynostore --root "$NISSHI_ROOT"
    ) >"$NISSHI_BUILD_LOG" 2>&1 </dev/null &
    local pid=$!
    watch_build "$pid"
    wait "$pid" || rc=$?
    if [[ "$rc" != 0 || ! -x "$NISSHI_BIN" ]]; then
        tail -n 30 "$NISSHI_BUILD_LOG" | sed 's/^/    /' >&2
        die "broker: building nisshi failed (exit $rc); read the log: $NISSHI_BUILD_LOG"
    fi
    rm -rf "$MF_CACHE/nisshi-$NISSHI_VERSION-target"
    log "broker: built $NISSHI_BIN in $(($(now_s) - start))s"
}

install_broker() {
    if [[ -x "$NISSHI_BIN" ]]; then
        return 0
    fi
    mkdir -p "$MF_CACHE"
    exec 9>"$NISSHI_LOCK"
    if ! flock -n 9; then
        log "broker: another process is building nisshi (lock $NISSHI_LOCK); waiting for it; log: $NISSHI_BUILD_LOG"
        local start
        start="$(now_s)"
        while ! flock -n 9; do
            sleep 5
            if (($(($(now_s) - start)) % 30 < 5)); then
                log "broker: waiting for the other build ($(($(now_s) - start))s, $(grep -c Compiling "$NISSHI_BUILD_LOG" 2>/dev/null || echo 0) crates compiled; log: $NISSHI_BUILD_LOG)"
            fi
        done
    fi
    build_broker_locked
    exec 9>&-
}

# What the scripts themselves use: ss (iproute2), curl, flock and setsid (util-linux).
ensure_base_tools() {
    local missing=()
    have ss || missing+=(iproute2)
    have curl || missing+=(curl)
    { have flock && have setsid; } || missing+=(util-linux)
    if ((${#missing[@]})); then
        log "installing tools the local-services scripts need: ${missing[*]}"
        apt_install "${missing[@]}" || die "could not install ${missing[*]}"
    fi
}

main() {
    local background=0 comps=()
    for a in "$@"; do
        case "$a" in
            --background) background=1 ;;
            all) comps+=("${MF_COMPONENTS[@]}") ;;
            broker | clickhouse | prometheus | zookeeper | chromium) comps+=("$a") ;;
            *) die "usage: install.sh [all|broker|clickhouse|prometheus|zookeeper|chromium]... [--background]" ;;
        esac
    done
    ((${#comps[@]})) || comps=("${MF_COMPONENTS[@]}")
    if [[ "$background" == 1 ]]; then
        # Detached: used by .ci/run to overlap the broker build with the workspace build. A later
        # `install.sh broker` waits on the same lock.
        mkdir -p "$MF_CACHE"
        nohup "${BASH_SOURCE[0]}" "${comps[@]}" >"$MF_CACHE/install-background.log" 2>&1 </dev/null &
        log "installing ${comps[*]} in the background (pid $!, log: $MF_CACHE/install-background.log)"
        return 0
    fi
    ensure_base_tools
    for c in "${comps[@]}"; do
        "install_$c"
    done
}

main "$@"
