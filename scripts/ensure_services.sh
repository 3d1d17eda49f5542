#!/usr/bin/env bash
# Starts the local Redis and (for tests) PostgreSQL when they are installed but not running.
set -euo pipefail
want_pg=false
[[ "${1:-}" == "--postgres" ]] && want_pg=true

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "services: starting redis-server on 127.0.0.1:6379"
    mkdir -p /tmp/modelfleet-redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /tmp/modelfleet-redis --logfile /tmp/modelfleet-redis/redis.log
fi

if $want_pg; then
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        echo "services: starting PostgreSQL"
        version=$(ls /etc/postgresql | sort -V | tail -1)
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
        for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    fi
    # Password-less TCP login for the test role, whatever pg_hba says.
    if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
        echo "services: PostgreSQL at 127.0.0.1:5432 refuses user postgres without a password;" \
             "set TEST_DATABASE_URL to a database the tests may use" >&2
        exit 1
    fi
fi
