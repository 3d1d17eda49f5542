#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it: against PostgreSQL, real Mosquitto
# (each test starts its own from deploy/), real Redis, real agent processes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
if [[ -z "${TEST_DATABASE_URL:-}" ]]; then
    scripts/ensure_services.sh --postgres
    export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/modelfleet"
else
    scripts/ensure_services.sh
fi
export DATABASE_URL="$TEST_DATABASE_URL"
export DEBUG=false SECRET_KEY=test-only-secret-key
# In parallel (pytest-xdist): most heavy tests wait on processes (soaks, timeouts, agents), so
# workers overlap their waits. TEST_WORKERS (3: faster than 2 on the 2-core CI machine) sets how
# many; TEST_WORKERS=0, or -n / -p no:xdist among the arguments, runs as given (0: serially).
# loadgroup: any test goes to whichever worker is free, except that a module sharing a
# module-scoped fixture stays on one worker (tests/conftest.py).
parallel=(-n "${TEST_WORKERS:-3}" --dist loadgroup --no-loadscope-reorder)
for arg in "$@"; do
    case "$arg" in -n | -n* | --numprocesses* | no:xdist | -pno:xdist) parallel=() ;; esac
done
[[ "${TEST_WORKERS:-3}" == 0 ]] && parallel=()
exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
