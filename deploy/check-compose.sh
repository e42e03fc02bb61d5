#!/usr/bin/env bash
# Checks the container deployment without a Docker engine:
#   1. tools/tests/deployment.rs (cargo test): every METERFLOW_* variable compose or the
#      Dockerfile sets is read by the service it is set on, every flag of a compose service is
#      set there or documented, topic defaults, and the dashboards' metric names exist, all
#      asked of clap and of the metrics modules; then deploy/check_compose.py:
#      compose/Prometheus/Grafana YAML parses, mounted and COPY'd paths exist, ports match the
#      local setup, dashboards are in sync with deploy/grafana/build_dashboards.py and use only
#      SQL/macros that exist;
#   2. deploy/grafana/check_sql.py --chdb: every ClickHouse panel query runs and returns rows
#      on *current* ClickHouse (chdb-core, the same virtualenv as deploy/local/check-ddl-current.sh);
#   3. deploy/grafana/check_sql.py --http: the same on the local ClickHouse (18.16), when it runs.
#      (tests/e2e/dashboards.rs runs every panel, SQL and PromQL, on real pipeline output.)
#
# usage: deploy/check-compose.sh [--static]    --static: only step 1 (no chdb, no server)
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/local/common.sh"

STATIC=0
case "${1:-}" in
    --static) STATIC=1 ;;
    "") ;;
    *) die "usage: deploy/check-compose.sh [--static]" ;;
esac

# python3 with PyYAML: the system one if it has it, else a small cached virtualenv.
yaml_python() {
    local venv="$MF_CACHE/check-compose-venv"
    if python3 -c 'import yaml' 2>/dev/null; then
        command -v python3
        return 0
    fi
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
        printf '%s\n' "$venv/bin/python"
        return 0
    fi
    have python3 || apt_install python3 python3-venv >&2 || die "check-compose: cannot install python3"
    log "check-compose: installing PyYAML into $venv" >&2
    mkdir -p "$MF_CACHE"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { apt_install python3-venv >&2 && python3 -m venv "$venv" >&2; } ||
        die "check-compose: cannot create a virtualenv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check pyyaml >&2 ||
        die "check-compose: pip install pyyaml failed"
    printf '%s\n' "$venv/bin/python"
}

(cd "$MF_REPO" && "${CARGO:-cargo}" test --quiet -p meterflow-tools --test deployment) ||
    die "check-compose: tools/tests/deployment.rs failed (above)"
PY="$(yaml_python)"
"$PY" "$MF_REPO/deploy/check_compose.py"
[[ "$STATIC" == 1 ]] && exit 0

# Current ClickHouse: chdb-core, installed by deploy/local/check-ddl-current.sh (which also
# checks the DDL on it) into $METERFLOW_CACHE/chdb-venv.
CHDB_PY="${METERFLOW_CHDB_PYTHON:-$MF_CACHE/chdb-venv/bin/python}"
if ! { [[ -x "$CHDB_PY" ]] && "$CHDB_PY" -c 'import chdb' 2>/dev/null; }; then
    log "check-compose: no chdb-core yet; deploy/local/check-ddl-current.sh installs it"
    "$MF_REPO/deploy/local/check-ddl-current.sh" >&2
fi
[[ -x "$CHDB_PY" ]] && "$CHDB_PY" -c 'import chdb' 2>/dev/null ||
    die "check-compose: $CHDB_PY cannot import chdb; this check does not skip"
"$CHDB_PY" "$MF_REPO/deploy/grafana/check_sql.py" --chdb

# The local server (18.16), if it runs: `make up` starts it.
CH_URL="${METERFLOW_CLICKHOUSE_URL:-http://$MF_HOST:$CLICKHOUSE_HTTP_PORT}"
if [[ "$(curl -fsS --max-time 5 "$CH_URL/?query=SELECT%201" 2>/dev/null)" == 1 ]]; then
    "$PY" "$MF_REPO/deploy/grafana/check_sql.py" --http "$CH_URL"
else
    log "check-compose: ClickHouse at $CH_URL is not running; the dashboard SQL ran on current ClickHouse only (make up, then re-run for 18.16)"
fi
log "check-compose: OK"
