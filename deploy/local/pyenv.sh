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

ensure_py_venv "$VENV" fastavro "$FASTAVRO_VERSION" fastavro
echo "$VENV/bin/python"
