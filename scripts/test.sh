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
exec .venv/bin/python -m pytest "$@"
