"""`make run`: the whole platform comes up on local defaults, prints a working admin login, and
stops every process it started on SIGTERM. Runs the real Makefile target as a subprocess."""

from __future__ import annotations

import http.cookiejar
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[1]
LOGIN_RE = re.compile(r"admin login:\s+username: (\S+)\s+password: (\S+)")


class Output:
    """Collects a process's merged output on a thread so the pipe never fills up."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, process: subprocess.Popen, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.text)
            if match:
                return match
            if process.poll() is not None:
                self.thread.join(5)
                pytest.fail(f"make run exited with {process.returncode}:\n{self.text[-5000:]}")
            time.sleep(0.2)
        pytest.fail(f"no admin login printed within {timeout} s:\n{self.text[-5000:]}")


def _opener():
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)), jar


def _get(opener, url: str) -> tuple[int, str]:
    with opener.open(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8", "replace")


def listen_port() -> int:
    """A free port below the kernel's ephemeral range: a port from bind(0) can be taken by any
    outgoing connection on this busy machine before gunicorn or Mosquitto binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


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


def _sigterm(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)


def _ctrl_c(process: subprocess.Popen) -> None:
    # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    os.killpg(process.pid, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [_sigterm, _ctrl_c], ids=["sigterm", "ctrl-c"])
def test_it_runs_the_platform_and_stops_everything_on_signal(run_env, stop):
    process = subprocess.Popen(
        ["make", "run"], cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    output = Output(process.stdout)
    try:
        username, password = output.wait_for(LOGIN_RE, process, timeout=120).groups()
        base = f"http://127.0.0.1:{run_env['WEB_PORT']}"
        assert f"admin:     {base}/admin/" in output.text
        assert f"API docs:  {base}/api/docs/" in output.text

        opener, jar = _opener()
        assert _get(opener, f"{base}/healthz") == (200, '{"ok": true}')
        status, docs = _get(opener, f"{base}/api/docs/")
        assert status == 200 and "swagger" in docs.lower()
        # DEBUG is off: static files come from collectstatic through WhiteNoise.
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

        # Every process the run started, recorded before the stop.
        children = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children if child.is_running())
        expected_processes = ["gunicorn", "celery -A config worker", "celery -A config beat", "mosquitto", "redis-server"]
        if (ROOT / "ota" / "management" / "commands" / "mqtt_ingest.py").exists():
            expected_processes.append("manage.py mqtt_ingest")
        for expected in expected_processes:
            assert expected in names, f"{expected!r} not running; processes: {names}"

        stop(process)
        process.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"still running after {stop.__name__}: {[p.cmdline() for p in alive]}"
        for port in (run_env["WEB_PORT"], run_env["MQTT_PORT"]):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", int(port)), timeout=2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
