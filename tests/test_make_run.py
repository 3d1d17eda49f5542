"""`make run`: the whole platform comes up on local defaults, prints a working admin login, and
stops every process it started on Ctrl-C (and on SIGTERM: tests/test_quickstart.py); a process that dies is restarted while make run goes
on; the MQTT port it picked is kept across runs; `manage.py` works from a second shell with no
settings in its environment. Runs the real Makefile target as a subprocess."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.makerun import (
    LOGIN_RE,
    MQTT_LINE_RE,
    PYTHON,
    ROOT,
    MakeRun,
    Output,
    PortTaken,
    listen_port,
    second_shell,
)
from tests.support.net import reserve


def _opener():
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)), jar


def _get(opener, url: str) -> tuple[int, str]:
    with opener.open(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8", "replace")


@pytest.fixture
def run_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "SECRET_KEY", "MQTT_", "REDIS_"))}
    env.update(
        DATA_DIR=str(tmp_path / "data"),
        WEB_PORT=str(listen_port()),
        MQTT_PORT=str(listen_port()),
        # A port nobody listens on: run.sh must start (and later stop) its own Redis.
        REDIS_URL=f"redis://127.0.0.1:{listen_port()}/0",
        WEB_WORKERS="1",
        CELERY_CONCURRENCY="1",
    )
    env.pop("DEBUG", None)
    return env


def check_serving(run, run_env) -> None:
    """What a newcomer sees from `make run`: the printed URLs and admin login, /healthz, the API
    docs, static files through WhiteNoise (DEBUG off: from collectstatic), the admin login with
    the printed credentials, and every process of the platform running."""
    username, password = run.login()
    base = f"http://127.0.0.1:{run_env['WEB_PORT']}"
    assert f"admin:     {base}/admin/" in run.text
    assert f"API docs:  {base}/api/docs/" in run.text

    opener, jar = _opener()
    assert _get(opener, f"{base}/healthz") == (200, '{"ok": true}')
    status, docs = _get(opener, f"{base}/api/docs/")
    assert status == 200 and "swagger" in docs.lower()
    assert _get(opener, f"{base}/static/admin/css/base.css")[0] == 200

    status, page = _get(opener, f"{base}/admin/login/?next=/admin/")
    assert status == 200
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf, "next": "/admin/"}
    ).encode()
    request = urllib.request.Request(f"{base}/admin/login/?next=/admin/", data=form, headers={"Referer": base})
    with opener.open(request, timeout=10) as response:
        landed = response.geturl()
        body = response.read().decode()
    assert landed == f"{base}/admin/", body[:500]
    assert "Site administration" in body
    assert any(cookie.name == "sessionid" for cookie in jar)

    names = " ".join(" ".join(child.cmdline()) for child in run.processes())
    for expected in ["gunicorn", "celery -A config worker", "celery -A config beat", "mosquitto", "redis-server",
                     "manage.py mqtt_ingest"]:
        assert expected in names, f"{expected!r} not running; processes: {names}"


@pytest.mark.django_db
def test_it_keeps_one_working_admin_login_across_runs(settings, tmp_path):
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from registry.devsetup import dev_admin_ensure

    settings.DATA_DIR = tmp_path
    settings.KEYS_DIR = tmp_path / "keys"
    settings.RELEASE_KEY_PATH = tmp_path / "keys" / "release.pem"
    settings.ROLLOUT_KEY_PATH = tmp_path / "keys" / "rollout.pem"

    first = _bootstrap(call_command)
    second = _bootstrap(call_command)
    assert first == second
    username, password = first
    assert username == "admin" and len(password) >= 16
    user = User.objects.get(username="admin")
    assert user.is_superuser and user.is_staff and user.check_password(password)
    assert (tmp_path / "admin-password").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "release.pem").exists() and (tmp_path / "keys" / "rollout.pem").exists()

    # Someone changed the password or dropped the flags: the next run restores the printed login.
    user.set_password("something-else")
    user.is_superuser = False
    user.save()
    assert _bootstrap(call_command) == first
    user.refresh_from_db()
    assert user.is_superuser and user.check_password(password)

    renewed = dev_admin_ensure(new_password=True)
    assert renewed.password != password and renewed.reset
    assert _bootstrap(call_command) == ("admin", renewed.password)


def _bootstrap(call_command) -> tuple[str, str]:
    import io

    out = io.StringIO()
    call_command("bootstrap_dev", stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    return re.search(r"username: (\S+)", text).group(1), re.search(r"password: (\S+)", text).group(1)


# --- supervision, kept ports, a second shell ---------------------------------------------------

def _broker_accepts(port: int, password: str) -> bool:
    from tests.support.broker_auth import MqttProbe

    probe = MqttProbe(port, "modelfleet-server", password)
    try:
        return probe.connect(timeout=5)
    except (OSError, TimeoutError):
        return False
    finally:
        probe.close()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_it_restarts_what_dies_keeps_its_mqtt_port_and_serves_a_second_shell(run_env):
    del run_env["MQTT_PORT"]  # make run chooses: 1883 is taken, so a free port, kept
    data_dir = Path(run_env["DATA_DIR"])
    base = f"http://127.0.0.1:{run_env['WEB_PORT']}"
    with PortTaken(1883):
        with MakeRun(run_env) as run:
            check_serving(run, run_env)
            mqtt_port = int(MQTT_LINE_RE.search(run.text).group(1))
            reserve(mqtt_port)  # make run picked it and must find it free again below
            assert mqtt_port != 1883
            assert f"MQTT_PORT={mqtt_port}\n" in (data_dir / "run.env").read_text()

            # A second shell with no SECRET_KEY, DATABASE_URL or MQTT_* set: manage.py finds make
            # run's database and secret key through DATA_DIR.
            created = subprocess.run(
                [PYTHON, "manage.py", "tokens", "create", "--name", "second-shell", "--scope", "read"],
                cwd=ROOT, env=second_shell(run_env), capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert created.returncode == 0, created.stderr[-3000:]
            token = created.stdout.strip().splitlines()[-1]
            request = urllib.request.Request(f"{base}/api/v1/models/",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200

            # kill -9 the broker and the Celery worker: both come back, make run goes on. Only once
            # supervisord counts them as running (startsecs): a death before that is a failed
            # start, reported (and retried) as such.
            run.until(lambda: re.search(r"mqtt started \(pid", run.text) and re.search(r"worker started \(pid", run.text),
                      "supervisord to count the broker and the worker as running")
            broker, worker = run.program("mosquitto"), run.program("celery -A config worker")
            pool = [p.pid for p in worker.children()]
            ready_before = run.text.count("ready.")
            os.kill(broker.pid, signal.SIGKILL)
            os.kill(worker.pid, signal.SIGKILL)
            run.until(lambda: f"*** mqtt (pid {broker.pid}) DIED" in run.text
                      and f"*** worker (pid {worker.pid}) DIED" in run.text, "the deaths to be reported")
            run.until(lambda: "mqtt is running again" in run.text and "worker is running again" in run.text,
                      "both to be running again")
            assert run.program("mosquitto").pid != broker.pid
            assert run.program("celery -A config worker").pid != worker.pid
            run.until(lambda: run.text.count("ready.") > ready_before, "the new worker to be ready")
            password = (data_dir / "mosquitto" / "service-password").read_text().strip()
            run.until(lambda: _broker_accepts(mqtt_port, password), "the new broker to accept the server")
            assert _healthy(base)
            left = [p for p in pool if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
            assert not left, "the dead worker's pool processes were left behind"
            assert run.process.poll() is None
            # Ctrl-C: everything stops and the ports are free (SIGTERM, as a service manager stops
            # it, ends tests/test_quickstart.py's runs, which check the same of every process).
            run.stop(ctrl_c=True)
            for port in (run_env["WEB_PORT"], mqtt_port):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", int(port)), timeout=2)

        # Started again with 1883 still taken: the same MQTT port, which devices have in agent.toml.
        with MakeRun(run_env) as again:
            again.login()
            assert int(MQTT_LINE_RE.search(again.text).group(1)) == mqtt_port
            # supervisord itself killed: its programs go too (nothing left holding the kept
            # ports), and make run fails instead of pretending all is well.
            programs = [p for p in again.processes() if "supervisord" in " ".join(p.parent().cmdline())]
            assert len(programs) >= 6, programs
            os.kill(again.program("mosquitto").parent().pid, signal.SIGKILL)
            again.process.wait(timeout=60)
            assert again.process.returncode != 0
            _gone, alive = psutil.wait_procs(programs, timeout=30)
            assert not alive, [p.cmdline() for p in alive]
            again.output.thread.join(5)
            assert "run: error: supervisord stopped on its own" in again.text

    # The kept port is now taken by another program: make run refuses, naming it, instead of
    # moving the broker away from the devices.
    with PortTaken(mqtt_port):
        refused = subprocess.run(["make", "run"], cwd=ROOT, env=run_env, capture_output=True, text=True,
                                 timeout=120, check=False)
    assert refused.returncode != 0
    assert f"port {mqtt_port} is this installation's MQTT_PORT" in refused.stderr, refused.stderr[-3000:]
    assert "set MQTT_PORT to another port" in refused.stderr
    assert "supervisord" not in refused.stderr


@pytest.mark.slow
def test_it_stops_everything_and_fails_when_a_process_cannot_be_kept_running(run_env):
    run_env.update(WEB_WORKERS="zero", RUN_START_RETRIES="1")  # gunicorn refuses to start, every time
    with MakeRun(run_env) as run:
        run.process.wait(timeout=120)
        run.output.thread.join(5)
        assert run.process.returncode != 0
        assert "*** web did not stay up (exit status 2; not expected); retry 1 of 1 in 1 s" in run.text
        failed = "run: error: web could not be kept running: 2 starts in a row failed"
        assert failed in run.text, run.text[-3000:]
        assert "admin login" not in run.text
    for port in (run_env["MQTT_PORT"], run_env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0]):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=2)


@pytest.mark.slow
def test_it_serves_pages_from_runserver_without_collectstatic(tmp_path):
    """`manage.py runserver` from a second shell, DEBUG off, nothing collected: pages and their
    static files still load (a missing manifest entry used to be a 500)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "secret_key").write_text("a-key-make-run-would-have-generated\n")
    env = second_shell({"DATA_DIR": str(data_dir)})
    migrated = subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    port = listen_port()
    server = subprocess.Popen([PYTHON, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(server.stdout)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(base):
            assert server.poll() is None and time.monotonic() < deadline, output.text[-3000:]
            time.sleep(0.2)
        assert not (data_dir / "static" / "staticfiles.json").exists()
        opener, _jar = _opener()
        for page in ("/api/docs/", "/login/", "/admin/login/"):
            status, html = _get(opener, base + page)
            assert status == 200, (page, output.text[-3000:])
            assets = re.findall(r'"(/static/[^"]+\.(?:css|js))"', html)
            assert assets, page
            for asset in assets:
                assert _get(opener, base + asset)[0] == 200, asset
    finally:
        server.terminate()
        server.wait(30)


def _settings_probe(data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SECRET_KEY", "DATABASE_URL", "DEBUG"))}
    clean.update(DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="config.settings", **env)
    probe = "import django; django.setup()\nfrom django.conf import settings\nprint(settings.SECRET_KEY)\n"
    return subprocess.run([PYTHON, "-c", probe], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=60, check=False)


def test_it_uses_the_secret_key_make_run_generated_when_none_is_set(tmp_path):
    (tmp_path / "secret_key").write_text("generated-by-make-run\n")
    result = _settings_probe(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "generated-by-make-run"
    # SECRET_KEY / SECRET_KEY_FILE still win.
    assert _settings_probe(tmp_path, SECRET_KEY="from-env").stdout.strip() == "from-env"


def test_it_refuses_production_without_any_secret_key_saying_what_to_set(tmp_path):
    result = _settings_probe(tmp_path)
    assert result.returncode != 0
    assert "SECRET_KEY (or SECRET_KEY_FILE) is required unless DEBUG=true" in result.stderr
    assert f"{tmp_path / 'secret_key'}" in result.stderr


def test_it_logs_routine_ticks_at_debug_and_what_happened_at_info():
    """The 5-second rollout tick no longer fills the log: beat's "Sending due task" and a
    worker's receipt and result of a tick that did nothing go to DEBUG; a tick that re-published
    directives and an evaluation that did something stay at INFO."""
    import logging

    from config.tick_logging import quiet_routine_ticks

    quiet_routine_ticks()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    trace_text = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
    received_text = "Task %(name)s[%(id)s] received"

    def task(name, return_value=None, kwargs="{}"):
        return {"name": name, "id": "x", "runtime": 0.01, "return_value": return_value, "args": "()",
                "kwargs": kwargs}

    handler = Keep()
    loggers = [logging.getLogger(n) for n in ("celery.beat", "celery.worker.strategy", "celery.app.trace")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
        beat, strategy, trace = loggers
        beat.info("Scheduler: Sending due task %s (%s)", "rollout-tick", "ota.tasks.rollout_tick")
        strategy.info(received_text, task("ota.tasks.rollout_tick"))
        trace.info(trace_text, task("ota.tasks.rollout_tick", "{'republished': 0, 'evaluated': [3]}"))
        strategy.info(received_text, task("ota.tasks.evaluate_rollout", kwargs="{'catch_up': True}"))
        trace.info(trace_text, task("ota.tasks.evaluate_rollout", "'idle'", kwargs="{'catch_up': True}"))
        assert records == [], [r.getMessage() for r in records]

        trace.info(trace_text, task("ota.tasks.rollout_tick", "{'republished': 4, 'evaluated': []}"))
        trace.info(trace_text, task("ota.tasks.evaluate_rollout", "'advanced'"))
        trace.info(trace_text, task("ota.tasks.evaluate_rollout", "'gate-tripped'",
                                    kwargs="{'catch_up': True}"))
        strategy.info(received_text, task("ota.tasks.apply_device_events"))
        assert [r.levelno for r in records] == [logging.INFO] * 4
        assert "'republished': 4" in records[0].getMessage() and "'gate-tripped'" in records[2].getMessage()

        records.clear()
        for lg in loggers:
            lg.setLevel(logging.DEBUG)
        beat.info("Scheduler: Sending due task %s (%s)", "rollout-tick", "ota.tasks.rollout_tick")
        assert [(r.levelname, r.getMessage()) for r in records] == [
            ("DEBUG", "Scheduler: Sending due task rollout-tick (ota.tasks.rollout_tick)")]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
