"""deploy/: the production recipe (README.md "Production").

* The systemd units (web, worker, beat, ingest, modelfleet.target) pass `systemd-analyze verify`
  and are hardened like the agent's; every variable they use and every setting the server reads
  is in deploy/modelfleet.env.example, which Django's deployment checks accept.
* SECURE_PROXY_SSL_HEADER (behind nginx) refuses what is not a header name.
* Mosquitto's production.conf keeps mosquitto.conf's policy.
* End to end, without systemd: the units' own command lines with a test installation's env file,
  Mosquitto from production.conf with a test CA, nginx from deploy/nginx/modelfleet.conf; the web
  answers through nginx over HTTPS, a login works behind the proxy, fleetctl pushes through it, a
  device enrolls with MQTT_PUBLIC_TLS, connects to the TLS listener with its mqtt.ca_file, gets a
  directive, downloads the artifact over HTTPS with its server.ca_file and commits.
"""

from __future__ import annotations

import http.client
import http.cookies
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from pathlib import Path

import pytest

from tests.support.agent_harness import HEALTH_OK, toml_value
from tests.support.agent_tls import make_tls_files
from tests.support.deploy import (
    DEPLOY,
    ENV_EXAMPLE,
    INSTALL_ROOT,
    NGINX,
    REPO,
    SERVICES,
    SYSTEMD_PATH,
    UNIT_DIR,
    Processes,
    documented_variables,
    env_file_with,
    mosquitto_production_config,
    nginx_config,
    parse_env_file,
    read_unit,
    service_process,
    service_unit,
    unit_value,
    unit_values,
    unit_variables,
)
from tests.support.net import free_port
from tests.support.onnx_models import linear_model
from tests.support.waiting import wait_for

MANAGE = DEPLOY / "modelfleet-manage"
VENV_BIN = REPO / ".venv" / "bin"
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# README.md "Production", step 6: the broker's first dynamic-security file, from the env file.
DYNSEC_SNIPPET = (
    "import json\n"
    "from django.conf import settings as s\n"
    "from ota.fleet.broker import initial_config\n"
    "print(json.dumps(initial_config(service_username=s.MQTT_USERNAME, service_password=s.MQTT_PASSWORD,"
    " topic_root=s.MQTT_TOPIC_ROOT)))"
)
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="needs systemd-analyze (scripts/bootstrap.sh --test installs it)",
)


def settings_names() -> set[str]:
    """Every environment variable the server reads (config/settings.py, config/celery.py)."""
    names = set()
    for path in (REPO / "config" / "settings.py", REPO / "config" / "celery.py"):
        names.update(re.findall(r"env_[a-z_]+\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", path.read_text()))
    return names


# --- the units ------------------------------------------------------------------------------------


@needs_systemd_analyze
def test_every_unit_passes_systemd_analyze_and_is_hardened_like_the_agent(tmp_path):
    units = sorted(UNIT_DIR.glob("modelfleet*"))
    tmp_path = tmp_path / "units"
    tmp_path.mkdir()
    assert [u.name for u in units] == [
        "modelfleet-beat.service",
        "modelfleet-ingest.service",
        "modelfleet-web.service",
        "modelfleet-worker.service",
        "modelfleet.target",
    ]
    for unit in units:
        # verify insists that every ExecStart binary exists: this checkout's venv stands in for /opt's.
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALL_ROOT, str(REPO)))
    verify = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    for name in SERVICES:
        unit = tmp_path / f"modelfleet-{name}.service"
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout + security.stderr)
        assert exposure, security.stdout[-2000:] + security.stderr[-2000:]
        # deploy/systemd/fleet-agent.service scores 1.9.
        assert float(exposure.group(1)) <= 2.0, (name, security.stdout[-3000:])


def test_the_units_run_the_checkout_as_modelfleet_restart_and_form_one_target():
    target = read_unit(UNIT_DIR / "modelfleet.target")
    assert set(" ".join(unit_values(target, "Unit", "Wants")).split()) == {
        f"modelfleet-{n}.service" for n in SERVICES
    }
    assert unit_value(target, "Install", "WantedBy") == "multi-user.target"
    sandboxes = set()
    for name in SERVICES:
        unit = service_unit(name)
        s = dict(unit["Service"])
        assert s["User"] == s["Group"] == "modelfleet"
        assert s["WorkingDirectory"] == INSTALL_ROOT
        assert s["EnvironmentFile"] == "/etc/modelfleet/modelfleet.env"
        assert f"PYTHONPATH={INSTALL_ROOT}" in s["Environment"].split()
        assert s["ExecStart"].startswith(f"{INSTALL_ROOT}/.venv/bin/")
        assert s["Restart"] == "always" and s["RestartSec"]
        assert unit_value(unit, "Unit", "PartOf") == "modelfleet.target"
        after = unit_value(unit, "Unit", "After").split()
        assert {
            "network-online.target",
            "postgresql.service",
            "redis-server.service",
            "mosquitto.service",
        } <= set(after)
        assert (
            s["ProtectSystem"] == "strict"
            and s["NoNewPrivileges"] == "yes"
            and s["CapabilityBoundingSet"] == ""
        )
        # The one writable place is the state directory, which is DATA_DIR.
        assert "ReadWritePaths" not in s and s["StateDirectory"] == "modelfleet"
        sandboxes.add(
            tuple(
                kv
                for kv in unit["Service"]
                if kv[0] not in {"Type", "ExecStart", "ExecReload", "TimeoutStopSec"}
            )
        )
    assert len(sandboxes) == 1, "the units differ in more than their command lines"
    assert parse_env_file(ENV_EXAMPLE.read_text())["DATA_DIR"] == "/var/lib/modelfleet"
    web = dict(service_unit("web")["Service"])
    assert "--bind 127.0.0.1:${WEB_PORT}" in web["ExecStart"], "gunicorn must listen on the loopback only"


# --- the env file ------------------------------------------------------------------------------------


def test_the_env_example_sets_every_variable_of_the_units_and_shows_every_setting():
    text = ENV_EXAMPLE.read_text()
    documented = documented_variables(text)
    for name in SERVICES:
        for variable in unit_variables(service_unit(name)):
            assert documented.get(variable), (
                f"modelfleet-{name}.service uses ${variable}, not set in {ENV_EXAMPLE.name}"
            )
    missing = {
        name for name in settings_names() if name not in documented and f"{name}_FILE" not in documented
    }
    # WEB_PORT is both; DJANGO_SETTINGS_MODULE comes from the units.
    assert not missing, f"settings the env example does not show: {sorted(missing)}"
    required_in_production = {
        "DEBUG",
        "DATA_DIR",
        "SECRET_KEY_FILE",
        "ALLOWED_HOSTS",
        "CSRF_TRUSTED_ORIGINS",
        "PUBLIC_URL",
        "SECURE_PROXY_SSL_HEADER",
        "DATABASE_URL",
        "REDIS_URL",
        "MQTT_HOST",
        "MQTT_PORT",
        "MQTT_TLS",
        "MQTT_USERNAME",
        "MQTT_PASSWORD_FILE",
        "MQTT_BROKER_AUTH",
        "MQTT_PUBLIC_HOST",
        "MQTT_PUBLIC_PORT",
        "MQTT_PUBLIC_TLS",
        "ARTIFACT_STORAGE",
        "ARTIFACT_DIR",
        "UPLOAD_TEMP_DIR",
        "KEYS_DIR",
    }
    unset = {name for name in required_in_production if not documented.get(name)}
    assert not unset, f"production settings shown only commented out: {sorted(unset)}"
    env = parse_env_file(text)
    assert env["DEBUG"] == "false" and env["PUBLIC_URL"].startswith("https://")
    assert env["MQTT_PUBLIC_TLS"] == "true" and env["MQTT_PUBLIC_PORT"] == "8883"
    assert env["DATABASE_URL"].startswith("postgres://")


def test_systemd_and_the_shell_read_the_env_example_alike():
    # systemd reads it (EnvironmentFile=), and so does deploy/modelfleet-manage (`. file`).
    shell = subprocess.run(
        ["sh", "-c", 'set -a; . "$1"; set +a; env -0', "sh", str(ENV_EXAMPLE)],
        env={},
        capture_output=True,
        timeout=30,
        check=True,
    )
    from_shell = dict(item.split("=", 1) for item in shell.stdout.decode().split("\0") if "=" in item)
    for key, value in parse_env_file(ENV_EXAMPLE.read_text()).items():
        assert from_shell.get(key) == value, key


def _settings_probe(tmp_path: Path, env_text: str, code: str) -> subprocess.CompletedProcess:
    env_file = tmp_path / "modelfleet.env"
    env_file.write_text(env_text)
    env = {
        "PATH": SYSTEMD_PATH,
        "HOME": str(tmp_path),
        **parse_env_file(env_text),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [str(VENV_BIN / "python"), "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _example_with_local_paths(tmp_path: Path, **values: str) -> str:
    secret = tmp_path / "secret_key"
    secret.write_text(secrets.token_urlsafe(50))
    (tmp_path / "mqtt-password").write_text("service-password")
    return env_file_with(
        ENV_EXAMPLE.read_text(),
        DATA_DIR=str(tmp_path / "data"),
        SECRET_KEY_FILE=str(secret),
        MQTT_PASSWORD_FILE=str(tmp_path / "mqtt-password"),
        ARTIFACT_DIR=str(tmp_path / "data" / "artifacts"),
        UPLOAD_TEMP_DIR=str(tmp_path / "data" / "tmp"),
        KEYS_DIR=str(tmp_path / "keys"),
        **values,
    )


def test_the_env_example_passes_djangos_deployment_checks_but_what_nginx_does(tmp_path):
    probe = _settings_probe(
        tmp_path,
        _example_with_local_paths(tmp_path),
        (
            "import django, json; django.setup()\n"
            "from django.conf import settings as s\n"
            "from django.core.management import call_command\n"
            "call_command('check', deploy=True, fail_level='ERROR')\n"
            "print(json.dumps([s.SECURE_PROXY_SSL_HEADER, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE,"
            " s.DATABASES['default']['HOST'], s.MQTT_PUBLIC_TLS, s.MQTT_PASSWORD]))\n"
        ),
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    warnings = set(re.findall(r"\(([a-z_.]+\.[WE]\d+)\)", probe.stderr + probe.stdout))
    # HSTS (W004) and the redirect to https (W008) are nginx's: deploy/nginx/modelfleet.conf.
    assert warnings == {"security.W004", "security.W008"}, probe.stderr[-3000:]
    nginx = (DEPLOY / "nginx" / "modelfleet.conf").read_text()
    assert "Strict-Transport-Security" in nginx and "return 301 https://$host$request_uri;" in nginx
    header, session_secure, csrf_secure, db_host, public_tls, password = json.loads(
        probe.stdout.splitlines()[-1]
    )
    assert header == ["HTTP_X_FORWARDED_PROTO", "https"] and session_secure and csrf_secure
    assert db_host == "/var/run/postgresql" and public_tls is True and password == "service-password"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("X-Forwarded-Proto", "('HTTP_X_FORWARDED_PROTO', 'https')"),
        ("", "None"),
        (
            "X_Forwarded_Proto",
            "ConfigError: SECURE_PROXY_SSL_HEADER='X_Forwarded_Proto' is not an HTTP header name",
        ),
        (
            "X-Forwarded-Proto: https",
            "ConfigError: SECURE_PROXY_SSL_HEADER='X-Forwarded-Proto: https' is not an HTTP",
        ),
    ],
    ids=["header", "unset", "underscores", "with-value"],
)
def test_secure_proxy_ssl_header_takes_a_header_name_and_refuses_anything_else(tmp_path, value, expected):
    env_text = _example_with_local_paths(tmp_path, SECURE_PROXY_SSL_HEADER=value)
    probe = _settings_probe(
        tmp_path,
        env_text,
        (
            "import django; django.setup()\n"
            "from django.conf import settings\n"
            "print(getattr(settings, 'SECURE_PROXY_SSL_HEADER', None))\n"
        ),
    )
    if expected.startswith("ConfigError"):
        assert probe.returncode != 0 and expected in probe.stderr, probe.stderr[-2000:]
    else:
        assert probe.returncode == 0 and probe.stdout.strip() == expected, probe.stderr[-2000:]


# --- the broker --------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_modelfleet_manage_runs_manage_py_as_the_service_user_with_the_env_file():
    # A stand-in checkout whose "python" reports how it was started (the real venv's interpreter
    # may not be executable by another user on a test machine), outside pytest's private tmp dir.
    outside = Path(tempfile.mkdtemp(prefix="modelfleet-manage-"))
    try:
        root = outside / "checkout"
        (root / ".venv" / "bin").mkdir(parents=True)
        fake = root / ".venv" / "bin" / "python"
        fake.write_text(
            "#!/bin/sh\n"
            'echo "$(id -un)|$(pwd)|$PYTHONPATH|$DJANGO_SETTINGS_MODULE|$MQTT_PUBLIC_PORT|$SECRET_KEY_FILE|$*"\n'
        )
        for path in (outside, root, root / ".venv", root / ".venv" / "bin", fake):
            path.chmod(0o755)
        env_file = outside / "modelfleet.env"
        env_file.write_text(ENV_EXAMPLE.read_text())
        result = subprocess.run(
            [str(MANAGE), "migrate", "--noinput"],
            env={
                "PATH": SYSTEMD_PATH,
                "MODELFLEET_ENV": str(env_file),
                "MODELFLEET_ROOT": str(root),
                "MODELFLEET_USER": "nobody",
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(outside)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split("|") == [
        "nobody",
        str(root),
        str(root),
        "config.settings",
        "8883",
        "/etc/modelfleet/secret_key",
        f"{root}/manage.py migrate --noinput",
    ]
    missing = subprocess.run(
        [str(MANAGE), "check"],
        env={"PATH": SYSTEMD_PATH, "MODELFLEET_ENV": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 2 and "cannot read /nonexistent" in missing.stderr


def test_the_readme_production_steps_name_what_the_tests_run():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Production\n", 1)[1].split("\n## ", 1)[0]
    for line in DYNSEC_SNIPPET.splitlines():
        assert line in section, f"README.md Production: the broker's service-account step lacks {line!r}"
    for path in re.findall(r"/opt/modelfleet/(deploy/[\w./*-]+)", section):
        assert list(REPO.glob(path)), f"README.md Production names {path}, which does not exist"
    for unit in SERVICES:
        assert (UNIT_DIR / f"modelfleet-{unit}.service").exists()


def test_the_production_broker_includes_the_policy_and_exposes_only_tls():
    def directives(path: Path) -> list[str]:
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]

    policy = directives(DEPLOY / "mosquitto" / "mosquitto.conf")
    production = directives(DEPLOY / "mosquitto" / "production.conf")
    # The policy has no listener: each place that runs the broker brings its own.
    assert not [line for line in policy if line.split()[0] in {"listener", "port", "bind_address"}]
    assert {"allow_anonymous false", "per_listener_settings false"} <= set(policy)
    # production.conf brings the listeners and the policy, and nothing of the policy's own.
    assert production[0] == "include_dir /etc/mosquitto/conf.d"
    assert {line.split()[0] for line in production} == {
        "include_dir",
        "pid_file",
        "log_dest",
        "listener",
        "certfile",
        "keyfile",
        "tls_version",
    }
    listeners = [line for line in production if line.startswith("listener ")]
    assert listeners == ["listener 1883 127.0.0.1", "listener 8883"]
    tls_part = production[production.index("listener 8883") :]
    assert {line.split()[0] for line in tls_part} == {"listener", "certfile", "keyfile", "tls_version"}
    env = parse_env_file(ENV_EXAMPLE.read_text())
    assert (env["MQTT_HOST"], env["MQTT_PORT"], env["MQTT_TLS"]) == ("127.0.0.1", "1883", "false")


# --- end to end --------------------------------------------------------------------------------------


def _database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return (
        f"postgres://{db.get('USER') or 'postgres'}{password}@{db.get('HOST') or '127.0.0.1'}:"
        f"{db.get('PORT') or 5432}/{db['NAME']}"
    )


def _wait_listening(port: int, proc, what: str, logs) -> None:
    def up():
        assert proc.alive(), f"{what} exited\n{logs()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout=30, what=f"{what} on port {port}", interval=0.1, diagnostics=logs)


class Https:
    """Requests to nginx over TLS, trusting only the test CA."""

    def __init__(self, port: int, ca: Path):
        self.port = port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict | None = None,
        token: str | None = None,
    ):
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=60)
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        for raw in response.headers.get_all("Set-Cookie") or []:
            cookie = http.cookies.SimpleCookie(raw)
            for name, morsel in cookie.items():
                assert morsel["secure"], f"cookie {name} without Secure behind https: {raw}"
                self.cookies[name] = morsel.value
        conn.close()
        return response, data

    def json(self, method: str, path: str, payload=None, *, token: str, expect: int = 200):
        body = json.dumps(payload).encode() if payload is not None else None
        response, data = self.request(
            method, path, body=body, token=token, headers={"Content-Type": "application/json"} if body else {}
        )
        assert response.status == expect, (method, path, response.status, data[:2000])
        return json.loads(data) if data else None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not Path(NGINX).exists(), reason="needs nginx (scripts/bootstrap.sh --test installs it)")
def test_the_units_serve_a_device_over_tls_behind_nginx(tmp_path):
    started = time.monotonic()
    tls = make_tls_files(tmp_path / "tls")
    etc, data, broker_dir, nginx_dir = (tmp_path / d for d in ("etc", "data", "mosquitto", "nginx"))
    for directory in (etc, data, broker_dir, nginx_dir / "www"):
        directory.mkdir(parents=True)
    web_port, https_port, http_port, mqtt_port, mqtts_port = (free_port() for _ in range(5))
    (etc / "secret_key").write_text(secrets.token_urlsafe(50))
    (etc / "mqtt-password").write_text(secrets.token_urlsafe(24))
    queue = f"deploy-{os.getpid()}-{secrets.token_hex(4)}"
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/4")
    public = f"https://localhost:{https_port}"
    env_file = etc / "modelfleet.env"
    env_file.write_text(
        env_file_with(
            ENV_EXAMPLE.read_text(),
            DATA_DIR=str(data),
            SECRET_KEY_FILE=str(etc / "secret_key"),
            ALLOWED_HOSTS="localhost",
            CSRF_TRUSTED_ORIGINS=public,
            PUBLIC_URL=public,
            WEB_PORT=str(web_port),
            WEB_WORKERS="2",
            CELERY_CONCURRENCY="1",
            DATABASE_URL=_database_url(),
            REDIS_URL=redis_url,
            CELERY_TASK_DEFAULT_QUEUE=queue,
            ROLLOUT_TICK_SECONDS="1",
            MQTT_PORT=str(mqtt_port),
            MQTT_PASSWORD_FILE=str(etc / "mqtt-password"),
            MQTT_PUBLIC_HOST="localhost",
            MQTT_PUBLIC_PORT=str(mqtts_port),
            ARTIFACT_DIR=str(data / "artifacts"),
            UPLOAD_TEMP_DIR=str(data / "tmp"),
            KEYS_DIR=str(etc / "keys"),
        )
    )
    procs = Processes(tmp_path)
    logs = procs.logs
    agent_env = {"PATH": SYSTEMD_PATH, "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    def manage(*args: str, extra_env: dict | None = None) -> str:
        # README.md "Production": deploy/modelfleet-manage, here as the user running the test.
        env = {
            "PATH": SYSTEMD_PATH,
            "MODELFLEET_ENV": str(env_file),
            "MODELFLEET_USER": _whoami(),
            **(extra_env or {}),
        }
        result = subprocess.run(
            [str(MANAGE), *args], env=env, capture_output=True, text=True, timeout=180, check=False
        )
        assert result.returncode == 0, (
            f"modelfleet-manage {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        )
        return result.stdout

    try:
        # --- the README's one-time steps ---
        manage("migrate", "--noinput", "-v", "0")
        manage("collectstatic", "--noinput", "-v", "0")
        assert "release key:" in manage("keys", "init")
        manage(
            "createsuperuser",
            "--noinput",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
            extra_env={"DJANGO_SUPERUSER_PASSWORD": "admin-password-for-deploy"},
        )
        token = (
            manage("tokens", "create", "--name", "deploy-test", "--scope", "admin").strip().splitlines()[-1]
        )
        enrollment = manage("enrollment", "create", "--max-uses", "1").strip().splitlines()[-1]
        (broker_dir / "dynamic-security.json").write_text(manage("shell", "-v", "0", "-c", DYNSEC_SNIPPET))

        # --- Mosquitto: production.conf including the policy, with the test CA's certificate ---
        broker_conf = mosquitto_production_config(
            plain_port=mqtt_port, tls_port=mqtts_port, tls=tls, workdir=broker_dir, plugin=DYNSEC_PLUGIN
        )
        broker = procs.spawn("mosquitto", [MOSQUITTO, "-c", str(broker_conf)], env=agent_env)
        _wait_listening(mqtts_port, broker, "mosquitto (TLS)", logs)
        _wait_listening(mqtt_port, broker, "mosquitto (loopback)", logs)

        # --- the four units' command lines ---
        units = {}
        for name in SERVICES:
            argv, env, cwd = service_process(name, env_file)
            units[name] = procs.spawn(name, argv, env=env, cwd=cwd)
        _wait_listening(web_port, units["web"], "gunicorn", logs)
        for name, line in (
            ("worker", "ready"),
            ("beat", "beat: Starting"),
            ("ingest", "ingest: subscribed to"),
        ):
            wait_for(
                lambda n=name, l=line: units[n].alive() and l in units[n].log(),
                timeout=60,
                what=f"{name} to come up ({line!r})",
                interval=0.2,
                diagnostics=logs,
            )

        # --- nginx from deploy/nginx/modelfleet.conf ---
        (nginx_dir / "nginx.conf").write_text(
            nginx_config(
                https_port=https_port, http_port=http_port, web_port=web_port, tls=tls, workdir=nginx_dir
            )
        )
        nginx = procs.spawn(
            "nginx",
            [
                NGINX,
                "-p",
                str(nginx_dir),
                "-c",
                str(nginx_dir / "nginx.conf"),
                "-e",
                str(nginx_dir / "error.log"),
            ],
            env=agent_env,
        )
        _wait_listening(https_port, nginx, "nginx", logs)
        https = Https(https_port, tls["ca"])
        print(f"platform up after {time.monotonic() - started:.1f}s")

        response, body = https.request("GET", "/healthz")
        assert response.status == 200 and json.loads(body) == {"ok": True}
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        plain.request("GET", "/api/v1/keys/", headers={"Host": "localhost"})
        redirect = plain.getresponse()
        assert (redirect.status, redirect.headers["Location"]) == (301, "https://localhost/api/v1/keys/")
        # A body over client_max_body_size: refused by nginx before it is sent, as JSON like the API's.
        big = http.client.HTTPSConnection("localhost", https_port, context=https.context, timeout=10)
        big.putrequest("POST", "/api/v1/models/m/versions/1/artifacts/")
        big.putheader("Content-Length", str(5 * 1024**3))
        big.endheaders()
        refused = big.getresponse()
        assert refused.status == 413 and json.loads(refused.read())["error"]["code"] == "request_too_large"

        # The web UI behind the proxy: the CSRF check passes over https, cookies are Secure.
        response, page = https.request("GET", "/login/")
        csrf = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()
        form = urllib.parse.urlencode(
            {"csrfmiddlewaretoken": csrf, "username": "admin", "password": "admin-password-for-deploy"}
        ).encode()
        response, page = https.request(
            "POST",
            "/login/",
            body=form,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Referer": f"{public}/login/",
                "Origin": public,
            },
        )
        assert response.status == 302, page[:3000]
        assert "sessionid" in https.cookies
        response, page = https.request("GET", "/")
        assert response.status == 200 and b"admin" in page

        # --- CI: fleetctl through nginx, trusting the CA with SSL_CERT_FILE ---
        https.json(
            "POST",
            "/api/v1/hardware/",
            {"id": "rpi4", "max_artifact_bytes": 50_000_000},
            token=token,
            expect=201,
        )
        model_file = tmp_path / "detector.onnx"
        model_file.write_bytes(linear_model(scale=2.0, bias=1.0))
        blob = tmp_path / "blob.bin"
        blob.write_bytes(os.urandom(3 * 1024 * 1024))  # over nginx's default 1 MB body limit
        fleetctl_env = {
            **agent_env,
            "FLEET_URL": public,
            "FLEET_TOKEN": token,
            "SSL_CERT_FILE": str(tls["ca"]),
        }
        for args in (
            ["--model", "detector", "--version", "1.0", "--artifact", f"rpi4={model_file}", "--release"],
            ["--model", "blob", "--version", "1", "--artifact", f"rpi4={blob}", "--format", "other"],
        ):
            push = subprocess.run(
                [str(VENV_BIN / "fleetctl"), "push", "--create-model", "-q", *args],
                env=fleetctl_env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert push.returncode == 0, f"{push.stdout}\n{push.stderr}\n{logs()}"
        sha = https.json("GET", "/api/v1/models/detector/versions/1.0/", token=token)["artifacts"][0][
            "sha256"
        ]

        # --- a device enrolls through nginx and is told to use the broker's TLS listener ---
        box = tmp_path / "box"
        enroll = subprocess.run(
            [
                str(VENV_BIN / "fleet-agent"),
                "enroll",
                "--server",
                public,
                "--token",
                enrollment,
                "--hardware",
                "rpi4",
                "--state-dir",
                str(box),
            ],
            env={**agent_env, "SSL_CERT_FILE": str(tls["ca"])},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert enroll.returncode == 0, enroll.stdout + enroll.stderr
        config = box / "agent.toml"
        enrolled = tomllib.loads(config.read_text())
        device_id = enrolled["device_id"]
        assert enrolled["mqtt"]["tls"] is True and enrolled["mqtt"]["port"] == mqtts_port
        assert enrolled["mqtt"]["host"] == "localhost" and enrolled["server"]["url"] == public
        # What the README tells the engineer to add: the CA for both, and (test pacing) a short trial.
        text = config.read_text()
        text = text.replace("[mqtt]\n", f"[mqtt]\nca_file = {toml_value(str(tls['ca']))}\n", 1)
        text = text.replace("[server]\n", f"[server]\nca_file = {toml_value(str(tls['ca']))}\n", 1)
        text += "\n[update]\n" + "".join(
            f"{k} = {toml_value(v)}\n"
            for k, v in {
                "disk_reserve_mb": 1,
                "trial_seconds": 1,
                "health_interval_seconds": 0.4,
                "health_command": HEALTH_OK,
            }.items()
        )
        config.write_text(text)

        # The TLS listener presents a certificate only the CA vouches for: no ca_file, no connection.
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            socket.create_connection(("127.0.0.1", mqtts_port), timeout=5) as sock,
        ):
            ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")

        agent = procs.spawn(
            "agent",
            [str(VENV_BIN / "fleet-agent"), "run", "--config", str(config)],
            env={**agent_env, "PYTHONUNBUFFERED": "1"},
        )
        wait_for(
            lambda: https.json("GET", f"/api/v1/devices/{device_id}/", token=token)["online"],
            timeout=60,
            what="the device online (over the TLS listener)",
            interval=0.3,
            diagnostics=logs,
        )

        # --- a rollout: the worker publishes the directive on the loopback listener, the device gets it
        # over TLS, downloads over HTTPS through nginx with server.ca_file, commits; ingest records it ---
        rollout = https.json(
            "POST",
            "/api/v1/rollouts/",
            {
                "model": "detector",
                "version": "1.0",
                "target": {"devices": [device_id]},
                "waves": "100%",
            },
            token=token,
            expect=201,
        )
        https.json("POST", f"/api/v1/rollouts/{rollout['id']}/start", {}, token=token)
        wait_for(
            lambda: (
                https.json("GET", f"/api/v1/rollouts/{rollout['id']}/", token=token)["state"] == "completed"
            ),
            timeout=90,
            what="the rollout completed",
            interval=0.5,
            diagnostics=logs,
        )
        device = https.json("GET", f"/api/v1/devices/{device_id}/", token=token)
        assert [(m["model"], m["active_version"], m["active_sha256"]) for m in device["models"]] == [
            ("detector", "1.0", sha)
        ], device["models"]
        access = (nginx_dir / "access.log").read_text()
        assert re.search(
            r'"GET /api/v1/models/detector/versions/1\.0/artifacts/rpi4/download HTTP/1\.1" 20[06]', access
        ), access[-3000:]
        assert agent.alive()

        # A broker on another host: the server over TLS, trusting the CA through SSL_CERT_FILE.
        argv, env, cwd = service_process(
            "ingest",
            env_file,
            extra_env={
                "MQTT_HOST": "localhost",
                "MQTT_PORT": str(mqtts_port),
                "MQTT_TLS": "true",
                "SSL_CERT_FILE": str(tls["ca"]),
                "MQTT_INGEST_CLIENT_ID": "modelfleet-ingest-tls",
            },
        )
        remote = procs.spawn("ingest-tls", argv, env=env, cwd=cwd)
        wait_for(
            lambda: "ingest: subscribed to" in remote.log(),
            timeout=60,
            what="ingest over TLS",
            interval=0.2,
            diagnostics=logs,
        )
        for name, proc in units.items():
            assert proc.alive(), f"{name} died\n{logs()}"
        print(f"whole recipe in {time.monotonic() - started:.1f}s")
    except BaseException:
        print(logs(), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        _forget_queue(redis_url, queue)


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _forget_queue(redis_url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{queue}*"))
    if keys:
        client.delete(*keys)
