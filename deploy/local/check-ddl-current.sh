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

[[ -d "$MIGRATIONS" ]] || die "check-ddl-current: no migrations dir $MIGRATIONS"
ensure_py_venv "$VENV" chdb-core "$CHDB_VERSION" chdb "ClickHouse in-process; ~100 MB download, once"
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
