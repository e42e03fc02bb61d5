#!/usr/bin/env bash
# Ensures the Python virtualenv the tests use for independent Avro encodings: fastavro from
# PyPI (another implementation of the Avro spec, with its own single-object fingerprinting),
# in $METERFLOW_CACHE/py-venv (default ~/.cache/meterflow/py-venv), fastavro==$METERFLOW_FASTAVRO_VERSION
# (default 1.12.1). Prints the venv's python on success. `make test` runs it before the Rust
# tests; tests that need it fail (never skip) with "run deploy/local/pyenv.sh" when it is missing.
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FASTAVRO_VERSION="${METERFLOW_FASTAVRO_VERSION:-1.12.1}"
VENV="$MF_CACHE/py-venv"

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

ready() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c "import fastavro, sys; sys.exit(0 if fastavro.__version__ == '$FASTAVRO_VERSION' else 1)" 2>/dev/null
}

if ! ready; then
    mkdir -p "$MF_CACHE"
    exec 8>"$MF_CACHE/py-venv.lock"
    flock 8
    if ! ready; then
        if ! py="$(find_python)"; then
            log "no python3 >= 3.9: installing python3 python3-venv"
            apt_install python3 python3-venv python3-pip || die "pyenv: cannot install python3"
            py="$(find_python)" || die "pyenv: no python3 >= 3.9 even after installing it"
        fi
        log "creating $VENV with fastavro==$FASTAVRO_VERSION"
        rm -rf "$VENV"
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            log "python venv module missing: installing python3-venv"
            apt_install python3-venv || die "pyenv: cannot install python3-venv"
            "$py" -m venv "$VENV" || die "pyenv: cannot create a virtualenv with $py"
        fi
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "fastavro==$FASTAVRO_VERSION" ||
            die "pyenv: pip install fastavro==$FASTAVRO_VERSION failed (network? package index?)"
        ready || die "pyenv: fastavro installed but 'import fastavro' fails"
    fi
    exec 8>&-
fi
echo "$VENV/bin/python"
