#!/usr/bin/env bash
# Installs what the platform needs when it is absent: system services from Debian (as root)
# and the Python environment in .venv. Safe to run again; does nothing when all is present.
#   scripts/bootstrap.sh            server runtime (make run)
#   scripts/bootstrap.sh --test     plus PostgreSQL, Chromium and the test extras (make test)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=false
[[ "${1:-}" == "--test" ]] && want_test=true

need=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if $want_test; then
    command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    # tests/test_deploy.py: the shipped nginx config in front of the server, systemd-analyze on the units.
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
fi
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing system packages: ${need[*]}; run as root or install them with apt-get" >&2
        exit 1
    fi
    echo "bootstrap: installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
extras="server,runtime"
$want_test && extras="server,runtime,test"
# A venv made by `make test` already holds everything `make run` needs: keep it in step as such.
[[ -f .venv/.installed-server,runtime,test ]] && extras="server,runtime,test"
stamp=".venv/.installed-$extras"
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv"
    "$PYTHON" -m venv .venv
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "bootstrap: installing Python packages ($extras)"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[$extras]"
    touch "$stamp"
fi
