#!/usr/bin/env bash
# `make run`: the whole platform on local defaults, in the foreground.
#
# Installs what is missing, prepares DATA_DIR (SQLite, artifacts, keys, secret key), migrates,
# collects static files, creates the signing keys and an admin login, then runs every process
# (web, Celery worker and beat, MQTT ingest, Mosquitto, and Redis when none is reachable) under
# supervisord from deploy/supervisord.conf: a process that dies is restarted and said so loudly;
# one that cannot be kept running stops everything and make run exits 1. Ctrl-C or SIGTERM stops
# every process it started.
#
# Ports and places come from the environment: WEB_PORT (8000), MQTT_PORT (1883, or a free port
# when 1883 is taken and MQTT_PORT was not set), REDIS_URL, DATA_DIR (var/). The web and MQTT
# ports are kept in DATA_DIR/run.env and used again on the next start, because enrolled devices
# have them in agent.toml; when a kept port is now taken, make run stops and says what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# KEY=value lines for make run and every process it starts (what honcho used to read).
if [[ -f .env ]]; then set -a; . ./.env; set +a; fi

say() { printf 'run: %s\n' "$*" >&2; }
die() { printf 'run: error: %s\n' "$*" >&2; exit 1; }
listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

scripts/bootstrap.sh
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH:/usr/sbin:/usr/local/sbin"

export DATA_DIR="${DATA_DIR:-$ROOT/var}"
mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
mkdir -p "$DATA_DIR/mosquitto" "$DATA_DIR/redis" "$DATA_DIR/tmp" "$DATA_DIR/log" "$DATA_DIR/supervisor"

export DEBUG="${DEBUG:-false}"
if [[ -z "${SECRET_KEY:-}" && -z "${SECRET_KEY_FILE:-}" ]]; then
    if [[ ! -s "$DATA_DIR/secret_key" ]]; then
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(50))' >"$DATA_DIR/secret_key")
        say "generated a SECRET_KEY in $DATA_DIR/secret_key"
    fi
    export SECRET_KEY_FILE="$DATA_DIR/secret_key"
fi

# --- ports -----------------------------------------------------------------------------------
# Devices keep the broker address and the server URL they were enrolled with (agent.toml), so a
# port chosen once is kept in DATA_DIR/run.env and used again: a WEB_PORT or MQTT_PORT set in the
# environment wins (and is kept from then on), else the kept port, else the default.
RUN_ENV="$DATA_DIR/run.env"
kept() { [[ -f "$RUN_ENV" ]] && sed -n "s/^$1=\([0-9][0-9]*\)\$/\1/p" "$RUN_ENV" | tail -1; return 0; }
free_port() {
    # A free port below the kernel's ephemeral range, which no outgoing connection takes later.
    "$PY" -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(500):
    port = random.randrange(10000, max(10001, low))
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break'
}
# choose_port NAME DEFAULT PICK WHERE: sets and exports NAME. PICK=true: with nothing kept yet and
# DEFAULT taken, take a free port. WHERE: the agent.toml setting of enrolled devices that holds it.
choose_port() {
    local name=$1 default=$2 pick=$3 where=$4 from_env=${!1:-} kept_port
    kept_port=$(kept "$name")
    if [[ -n "$from_env" ]]; then
        listening 127.0.0.1 "$from_env" && die "$name $from_env is already in use; pick a free port or unset $name"
        if [[ -n "$kept_port" && "$kept_port" != "$from_env" ]]; then
            say "$name=$from_env from the environment replaces port $kept_port kept in $RUN_ENV;" \
                "devices enrolled until now still have $kept_port ($where)"
        fi
        printf -v "$name" %s "$from_env"
    elif [[ -n "$kept_port" ]]; then
        if listening 127.0.0.1 "$kept_port"; then
            die "port $kept_port is this installation's $name (kept in $RUN_ENV since an earlier run:" \
                "devices enrolled until now have it as $where), but another program is listening there." \
                "Stop that program (\`ss -ltnp 'sport = :$kept_port'\` names it) and run make run again;" \
                "or set $name to another port to move, and then change $where on those devices" \
                "(or enrol them again)."
        fi
        printf -v "$name" %s "$kept_port"
    elif listening 127.0.0.1 "$default"; then
        $pick || die "port $default is already in use; set $name to a free port"
        printf -v "$name" %s "$(free_port)"
        say "port $default is taken (another program is listening there); using $name=${!name}," \
            "kept in $RUN_ENV for the next runs"
    else
        printf -v "$name" %s "$default"
    fi
    export "${name?}"
}
choose_port WEB_PORT 8000 false "[server] url in agent.toml"
choose_port MQTT_PORT 1883 true "[mqtt] port in agent.toml"
export MQTT_HOST=127.0.0.1

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
read -r REDIS_HOST REDIS_PORT < <("$PY" -c '
import sys; from urllib.parse import urlsplit
u = urlsplit(sys.argv[1]); print(u.hostname or "127.0.0.1", u.port or 6379)' "$REDIS_URL")
processes=(mqtt web worker beat ingest)
RUN_REDIS=false
if listening "$REDIS_HOST" "$REDIS_PORT"; then
    say "using the Redis at $REDIS_URL"
elif [[ "$REDIS_HOST" == 127.0.0.1 || "$REDIS_HOST" == localhost ]]; then
    say "no Redis at $REDIS_HOST:$REDIS_PORT; starting one"
    processes=(redis "${processes[@]}")
    RUN_REDIS=true
else
    die "REDIS_URL $REDIS_URL is not reachable"
fi
export REDIS_PORT RUN_REDIS

# --- Mosquitto configuration -----------------------------------------------------------------
# The project's broker policy (deploy/mosquitto/mosquitto.conf: dynamic security, no anonymous
# clients) with the listener, persistence and plugin file moved into DATA_DIR. Without that
# file, a plain anonymous local listener.
export MOSQUITTO_CONF="$DATA_DIR/mosquitto/mosquitto.conf"
export MOSQUITTO="${MOSQUITTO:-$(command -v mosquitto || true)}"
[[ -n "$MOSQUITTO" ]] || die "mosquitto is not installed (scripts/bootstrap.sh installs it as root)"
dynsec_json="$DATA_DIR/mosquitto/dynamic-security.json"
{
    echo "# generated by scripts/run.sh from deploy/mosquitto/; edit that instead"
    echo "listener $MQTT_PORT 127.0.0.1"
    echo "persistence true"
    echo "persistence_location $DATA_DIR/mosquitto/"
    echo "log_dest stdout"
    # Run as whoever runs us: as root Mosquitto would otherwise switch to user mosquitto,
    # which cannot write the persistence directory under DATA_DIR.
    echo "user $(id -un)"
    if [[ -f deploy/mosquitto/mosquitto.conf ]]; then
        plugin=$(sed -n 's/^plugin //p' deploy/mosquitto/mosquitto.conf | head -1)
        if [[ -n "$plugin" && ! -f "$plugin" ]]; then
            plugin=$(find /usr/lib /usr/local/lib -name "$(basename "$plugin")" 2>/dev/null | head -1)
            [[ -n "$plugin" ]] || die "the Mosquitto dynamic-security plugin is not installed"
        fi
        sed -E -e '/^(listener|port|persistence|persistence_location|log_dest|log_type|user|pid_file)( |$)/d' \
            -e "s#^plugin_opt_config_file .*#plugin_opt_config_file $dynsec_json#" \
            -e "s#^plugin .*#plugin $plugin#" deploy/mosquitto/mosquitto.conf
    else
        echo "allow_anonymous true"
    fi
} >"$MOSQUITTO_CONF"

if [[ -f deploy/mosquitto/mosquitto.conf ]]; then
    export MQTT_BROKER_AUTH=dynsec MQTT_USERNAME="${MQTT_USERNAME:-modelfleet-server}"
    if [[ -z "${MQTT_PASSWORD:-}" && -z "${MQTT_PASSWORD_FILE:-}" ]]; then
        export MQTT_PASSWORD_FILE="$DATA_DIR/mosquitto/service-password"
    fi
    lost_password=false
    [[ -n "${MQTT_PASSWORD_FILE:-}" && ! -s "$MQTT_PASSWORD_FILE" ]] && lost_password=true
    if [[ ! -s "$dynsec_json" ]] || $lost_password; then
        # First run (or the service password is gone): a dynamic-security file holding only the
        # server's service account. Devices enrolled before must enrol again.
        if $lost_password; then
            (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' >"$MQTT_PASSWORD_FILE")
        fi
        DJANGO_SETTINGS_MODULE=config.settings "$PY" -c '
import django; django.setup()
from django.conf import settings
from ota.fleet.broker import write_initial_config
import sys
write_initial_config(sys.argv[1], service_username=settings.MQTT_USERNAME,
                     service_password=settings.MQTT_PASSWORD, topic_root=settings.MQTT_TOPIC_ROOT)' "$dynsec_json"
        say "created the broker's service account ${MQTT_USERNAME} in $dynsec_json"
    fi
else
    export MQTT_BROKER_AUTH=none
fi

# --- database, static files, keys, login -------------------------------------------------------
say "migrating the database"
"$PY" manage.py migrate --noinput -v 0
"$PY" manage.py collectstatic --noinput -v 0
login=$("$PY" manage.py bootstrap_dev)
admin_user=$(sed -n 's/^username: //p' <<<"$login")
admin_password=$(sed -n 's/^password: //p' <<<"$login")

# The ports kept for the next start, and what a second shell needs to reach this installation.
{
    echo "# Written by scripts/run.sh (make run) at every start: the settings its processes run with."
    echo "# WEB_PORT and MQTT_PORT are kept: the next make run uses them again (devices have them)."
    echo "# manage.py finds DATA_DIR/secret_key by itself; for commands that talk to the broker"
    echo "# (simulate_fleet) from another shell:  set -a; . $RUN_ENV; set +a"
    printf '%s=%q\n' DATA_DIR "$DATA_DIR" WEB_PORT "$WEB_PORT" MQTT_HOST "$MQTT_HOST" MQTT_PORT "$MQTT_PORT" \
        MQTT_BROKER_AUTH "$MQTT_BROKER_AUTH" REDIS_URL "$REDIS_URL"
    if [[ -n "${MQTT_USERNAME:-}" ]]; then printf '%s=%q\n' MQTT_USERNAME "$MQTT_USERNAME"; fi
    if [[ -n "${MQTT_PASSWORD_FILE:-}" ]]; then printf '%s=%q\n' MQTT_PASSWORD_FILE "$MQTT_PASSWORD_FILE"; fi
} >"$RUN_ENV.tmp"
mv "$RUN_ENV.tmp" "$RUN_ENV"

# --- run ---------------------------------------------------------------------------------------
export PY RUN_USER="$(id -un)" LOG_LEVEL="${LOG_LEVEL:-INFO}" PYTHONUNBUFFERED=1
export WEB_WORKERS="${WEB_WORKERS:-2}" CELERY_CONCURRENCY="${CELERY_CONCURRENCY:-2}"
export RUN_START_RETRIES="${RUN_START_RETRIES:-5}"
failed_file="$DATA_DIR/supervisor/failed"  # written by scripts/run_console.py when it gives up
rm -f "$failed_file"
# The console listener (scripts/run_console.py) writes every process's lines into this FIFO and
# cat copies them to our stdout, so they share one file offset with our own messages whatever
# stdout is (a terminal, a pipe, a file, a socket). fd 3 keeps a writer open: cat sees no end of
# file while the listener restarts, only once we close it at the end.
export RUN_CONSOLE="$DATA_DIR/supervisor/console"
rm -f "$RUN_CONSOLE"
mkfifo -m 600 "$RUN_CONSOLE"
cat "$RUN_CONSOLE" &
console_pid=$!
exec 3>"$RUN_CONSOLE"
say "starting under supervisord: ${processes[*]} (logs in $DATA_DIR/log/)"
supervisord -c deploy/supervisord.conf 3>&- &
supervisor_pid=$!
stopping=false
stop() { stopping=true; kill -TERM "$supervisor_pid" 2>/dev/null || true; }
trap stop TERM INT HUP

# The banner comes once the web process answers, so the login is the last thing on screen.
"$PY" - "$WEB_PORT" "$supervisor_pid" <<'EOF' &
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
waiter=$!
if wait "$waiter"; then
    cat >&2 <<EOF

================================================================================
 modelfleet is running. Ctrl-C stops every process.
   web UI:    http://127.0.0.1:$WEB_PORT/
   admin:     http://127.0.0.1:$WEB_PORT/admin/
   API docs:  http://127.0.0.1:$WEB_PORT/api/docs/
   MQTT:      127.0.0.1:$MQTT_PORT
   Redis:     $REDIS_URL
   data:      $DATA_DIR  (logs in log/, settings for another shell in run.env)
   admin login:  username: $admin_user  password: $admin_password
================================================================================

EOF
elif ! $stopping && kill -0 "$supervisor_pid" 2>/dev/null; then
    say "the web server did not answer on port $WEB_PORT; see the log above"
fi

# `wait` returns early when a trapped signal arrives; keep waiting until supervisord has stopped all.
while kill -0 "$supervisor_pid" 2>/dev/null; do
    wait "$supervisor_pid" || true
done
exec 3>&-
wait "$console_pid" || true  # the console's last lines
if [[ -s "$failed_file" ]]; then
    die "$(cat "$failed_file")"
fi
if ! $stopping; then
    # A signal sent to supervisord itself (kill, a service manager, Ctrl-C where our trap could not
    # be set because SIGINT was ignored when we started) is a stop too; anything else is not.
    asked=$(awk -v start="supervisord started with pid $supervisor_pid" \
        'index($0, start) { found = 1 } found && /received SIG[A-Z]+ indicating exit request/ { print $3 }' \
        "$DATA_DIR/log/supervisord.log" 2>/dev/null | tail -1)
    [[ -n "$asked" ]] || die "supervisord stopped on its own; its log: $DATA_DIR/log/supervisord.log"
fi
