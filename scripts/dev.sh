#!/usr/bin/env bash
# Start cmek-proxy in dev mode: a local key, a disk-backed S3 backend, the proxy in front.
# Creates .venv and installs the package on first use. Extra arguments go to `cmek-proxy dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/cmek-proxy ] || [ pyproject.toml -nt .venv/.installed ]; then
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[devserver]'
  touch .venv/.installed
fi
exec .venv/bin/cmek-proxy dev "$@"
