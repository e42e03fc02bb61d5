#!/usr/bin/env bash
# Applies every migration in schemas/clickhouse (or $1) to current ClickHouse, run in-process
# by the chdb-core Python package (pip), and fails on any error. The local server is ClickHouse 18.16; this is
# the check that the same DDL also works on a current release (no syntax or behaviour that new
# versions dropped). Never skips: if chdb-core cannot be installed, it fails.
#
# The virtualenv is cached in $METERFLOW_CACHE/chdb-venv (chdb-core==$METERFLOW_CHDB_VERSION,
# default 26.9.0).
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CHDB_VERSION="${METERFLOW_CHDB_VERSION:-26.9.0}"
VENV="$MF_CACHE/chdb-venv"
MIGRATIONS="${1:-${METERFLOW_MIGRATIONS_DIR:-$MF_REPO/schemas/clickhouse}}"

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

ensure_venv() {
    if [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c "import chdb, sys; sys.exit(0 if chdb.__version__ == '$CHDB_VERSION' else 1)" 2>/dev/null; then
        return 0
    fi
    mkdir -p "$MF_CACHE"
    exec 8>"$MF_CACHE/chdb-venv.lock"
    flock 8
    if [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c "import chdb, sys; sys.exit(0 if chdb.__version__ == '$CHDB_VERSION' else 1)" 2>/dev/null; then
        return 0
    fi
    local py
    if ! py="$(find_python)"; then
        log "no python3 >= 3.9: installing python3 python3-venv"
        apt_install python3 python3-venv python3-pip || die "check-ddl-current: cannot install python3"
        py="$(find_python)" || die "check-ddl-current: no python3 >= 3.9 even after installing it"
    fi
    log "creating $VENV with chdb-core==$CHDB_VERSION (ClickHouse in-process; ~100 MB download, once)"
    rm -rf "$VENV"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then
        log "python venv module missing: installing python3-venv"
        apt_install python3-venv || die "check-ddl-current: cannot install python3-venv"
        "$py" -m venv "$VENV" || die "check-ddl-current: cannot create a virtualenv with $py"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "chdb-core==$CHDB_VERSION" ||
        die "check-ddl-current: pip install chdb-core==$CHDB_VERSION failed; this check does not skip: fix the install (network? package index?) and re-run"
    "$VENV/bin/python" -c 'import chdb' || die "check-ddl-current: chdb-core installed but 'import chdb' fails"
    exec 8>&-
}

[[ -d "$MIGRATIONS" ]] || die "check-ddl-current: no migrations dir $MIGRATIONS"
ensure_venv
log "check-ddl-current: applying $MIGRATIONS to current ClickHouse (chdb-core $CHDB_VERSION)"
"$VENV/bin/python" "$MF_REPO/deploy/local/check_ddl_current.py" "$MIGRATIONS"

# The cluster form (meterflow-admin migrate --cluster), derived from the same files: created on
# current ClickHouse with an in-memory Keeper (what chdb cannot check is listed in
# check_ddl_current.py; tests/e2e/cluster.rs runs it on a real 18.16 cluster).
CLUSTER_DDL="$(mktemp "${TMPDIR:-/tmp}/meterflow-cluster-ddl.XXXXXX")"
trap 'rm -f "$CLUSTER_DDL"' EXIT
log "check-ddl-current: the cluster form of $MIGRATIONS (meterflow-admin cluster-ddl)"
(cd "$MF_REPO" && cargo run --quiet -p meterflow-admin -- cluster-ddl --cluster meterflow \
    --database meterflow_ddl_cluster --migrations-dir "$MIGRATIONS") >"$CLUSTER_DDL" ||
    die "check-ddl-current: meterflow-admin cluster-ddl failed"
"$VENV/bin/python" "$MF_REPO/deploy/local/check_ddl_current.py" --cluster-ddl "$CLUSTER_DDL" meterflow meterflow_ddl_cluster
log "check-ddl-current: OK"
