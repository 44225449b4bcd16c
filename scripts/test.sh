#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian and Python packages), then
# ruff, mypy --strict and pytest. Test fixtures start every server they use.
# Extra arguments go to pytest (e.g. -k range, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian packages: the AWS CLI v2 used as a real client in the tests, and Ceph (one
# monitor, one OSD, radosgw) as a production S3 backend (tests/rgw.py starts them).
DEBS=()
[ -x /usr/bin/aws ] || DEBS+=(awscli)
for pkg in ceph-mon ceph-osd radosgw; do [ -x "/usr/bin/$pkg" ] || DEBS+=("$pkg"); done
if [ ${#DEBS[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${DEBS[@]}" >/dev/null
fi

if [ ! -x .venv/bin/pytest ] || [ pyproject.toml -nt .venv/.installed-test ]; then
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,devserver,fast]'
  touch .venv/.installed-test
fi
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"; ruff check proxy tests benchmarks
echo "== mypy --strict"; mypy
echo "== pytest"; pytest -q "$@"
