"""The real server processes for end-to-end tests: Celery workers, Celery beat, `mqtt_ingest`,
and a service-account subscriber that records every directive the broker carries.

Use from a `transaction=True` test (the processes share the test database, so data must be
committed) together with `live_server` and `secure_broker`:

    @pytest.fixture
    def platform(live_server, secure_broker, tmp_path):
        with Platform(tmp_path, broker=secure_broker, live_server_url=live_server.url) as p:
            p.start_worker(); p.start_beat(); p.start_ingest()
            yield p

Every process gets the same environment: the test database, a Celery queue of its own on the
Redis db (so runs sharing a db never take each other's tasks), the broker's service account, the
test's signing keys, and a short rollout tick. `kill_worker()` SIGKILLs a worker; logs of
every process are kept under tmp_path/platform/ and shown by `logs()` when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.support import waiting

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
# Every Platform flushes its Redis db and its workers take whatever task lands there: two test
# runs sharing a db (engineers running suites side by side) eat and flush each other's tasks.
# TEST_REDIS_URL gives each run its own db.
DEFAULT_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/4")


def _django_env(settings) -> dict[str, str]:
    from django.db import connection

    db = connection.settings_dict
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or "5432"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    if db["ENGINE"].endswith("postgresql"):
        url = f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"
    else:
        url = f"sqlite:///{db['NAME']}"
    return {
        "DATABASE_URL": url,
        "SECRET_KEY": settings.SECRET_KEY,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "RELEASE_KEY_PATH": str(settings.RELEASE_KEY_PATH),
        "ROLLOUT_KEY_PATH": str(settings.ROLLOUT_KEY_PATH),
        "PUBLIC_URL": settings.PUBLIC_URL,
        "PYTHONUNBUFFERED": "1",
    }


def point_celery_at(redis_url: str = DEFAULT_REDIS_URL, queue: str | None = None) -> None:
    """Make tasks enqueued by the test process itself (API calls in the live server thread,
    on_commit wake-ups) go to this Redis db (and this queue) instead of the shared default."""
    from kombu import pools as kombu_pools

    from config.celery import app

    app.conf.broker_url = redis_url
    if queue is not None:
        app.conf.task_default_queue = queue
    app.conf.task_always_eager = False
    # Pooled connections made before the switch would still talk to the old URL. kombu keeps its
    # pools in global registries keyed by connection URL, so closing one pool alone would leave a
    # closed pool behind for the next switch back to that URL ("Acquire on closed pool").
    kombu_pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


class Platform:
    def __init__(self, workdir: Path, *, broker, live_server_url: str | None = None,
                 redis_url: str = DEFAULT_REDIS_URL, tick_seconds: int = 1, extra_env: dict | None = None):
        from django.conf import settings

        self.workdir = Path(workdir) / "platform"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.redis_url = redis_url
        # A queue of its own: a worker of another run on the same Redis db (a benchmark, another
        # engineer's suite) would otherwise take this run's tasks and run them against its own
        # database. It took every evaluation a worker enqueued while busy with the beat tick (the
        # foreign worker was the only one waiting), and a rollout stood still for minutes.
        self.queue = f"platform-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.procs: list[Proc] = []
        self.env = {
            **os.environ,
            **_django_env(settings),
            # Directives carry artifact URLs built from PUBLIC_URL: point them at the live server.
            **({"PUBLIC_URL": live_server_url.rstrip("/")} if live_server_url else {}),
            **broker.env,
            "CELERY_BROKER_URL": redis_url,
            "REDIS_URL": redis_url,
            "CELERY_TASK_DEFAULT_QUEUE": self.queue,
            "ROLLOUT_TICK_SECONDS": str(tick_seconds),
            **(extra_env or {}),
        }
        self._counter = 0

    # --- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Platform:
        self.flush_redis()
        self._point_celery_here()
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.stop_all()
        self.flush_redis()
        if exc_type is not None:
            print(self.logs(), file=sys.stderr)

    def flush_redis(self) -> None:
        """Drop this platform's queue (never the whole db: other runs may share it)."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"*{self.queue}*"))
        if keys:
            client.delete(*keys)

    def _point_celery_here(self) -> None:
        point_celery_at(self.redis_url, self.queue)

    def _spawn(self, name: str, args: list[str]) -> Proc:
        self._counter += 1
        log_path = self.workdir / f"{self._counter:02d}-{name}.log"
        handle = open(log_path, "wb")
        popen = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc = Proc(name=name, popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str = "worker", *, pool: str = "solo", concurrency: int = 1) -> Proc:
        proc = self._spawn(
            name,
            [PYTHON, "-m", "celery", "-A", "config", "worker", "-P", pool, "-c", str(concurrency),
             "-n", f"{name}-{self._counter}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
        )
        self.wait_for_log(proc, "ready", timeout=60)
        return proc

    def start_beat(self) -> Proc:
        return self._spawn(
            "beat",
            [PYTHON, "-m", "celery", "-A", "config", "beat", "-l", "INFO",
             "-s", str(self.workdir / "beat-schedule")],
        )

    def start_ingest(self, name: str = "ingest", *extra_args: str) -> Proc:
        return self._spawn(name, [PYTHON, "manage.py", "mqtt_ingest", *extra_args])

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        if proc.alive():
            os.killpg(proc.popen.pid, sig)
            proc.popen.wait(30)

    def kill_worker(self, proc: Proc) -> None:
        """SIGKILL: no warm shutdown, tasks in hand are lost (and redelivered: acks_late)."""
        self.kill(proc, signal.SIGKILL)

    def stop(self, proc: Proc) -> None:
        if proc.alive():
            os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill(proc)

    def stop_all(self) -> None:
        """SIGTERM every process group at once, then wait for each (SIGKILL past 15 s)."""
        alive = [proc for proc in reversed(self.procs) if proc.alive()]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in alive:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)

    # --- diagnostics ---------------------------------------------------------------------------

    def wait_for_log(self, proc: Proc, text: str, timeout: float = 30) -> None:
        """Wait until `proc`'s log contains `text`; RuntimeError at once if it exits first. Either
        failure shows the last 4000 characters of its log."""

        def logged() -> bool:
            if text in proc.log_path.read_text(errors="replace"):
                return True
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log_path.read_text(errors='replace')[-4000:]}")
            return False

        waiting.wait_for(logged, timeout=timeout, what=f"{proc.name} to log {text!r}", interval=0.1,
                         diagnostics=lambda: proc.log_path.read_text(errors="replace")[-4000:])

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for proc in self.procs:
            text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
            parts.append(f"===== {proc.name} (pid {proc.popen.pid}, rc {proc.popen.poll()}) =====\n{text[-tail:]}")
        return "\n".join(parts)

    def peak_rss_kb(self) -> dict[str, int]:
        """Peak resident memory of each live process and its children (VmHWM from /proc)."""
        import psutil

        out = {}
        for proc in self.procs:
            if not proc.alive():
                continue
            total = 0
            try:
                root = psutil.Process(proc.popen.pid)
                for p in [root, *root.children(recursive=True)]:
                    total = max(total, _vm_hwm_kb(p.pid))
            except psutil.NoSuchProcess:
                continue
            out[proc.name] = total
        return out


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class DirectiveRecorder:
    """Subscribes with the service account to every device's directive topic and keeps each
    message as it arrives: what the fleet was told, independent of what the database says."""

    def __init__(self, broker, *, topic_root: str = "fleet"):
        from ota.transport.mqtt import BrokerSettings

        self.settings = BrokerSettings(
            host=broker.host if hasattr(broker, "host") else "127.0.0.1",
            port=broker.port,
            username=getattr(broker, "username", ""),
            password=getattr(broker, "password", ""),
            topic_root=topic_root,
        )
        self.topic_root = topic_root
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self.client = None

    def start(self) -> DirectiveRecorder:
        from ota.transport.mqtt import connect_blocking, new_client

        subscribed = threading.Event()
        self.client = new_client(self.settings, client_id="directive-recorder")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        connect_blocking(self.client, self.settings)
        self.client.subscribe(f"{self.topic_root}/devices/+/models/+/directive", qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("directive recorder: no SUBACK")
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def __enter__(self) -> DirectiveRecorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _on_message(self, _client, _userdata, message) -> None:
        import base64

        from agent.protocol import Topics

        device_id, _kind = Topics(self.topic_root).parse(message.topic)
        record = {"device": device_id, "retained": bool(message.retain), "raw": message.payload}
        if message.payload:
            envelope = json.loads(message.payload)
            body = json.loads(base64.b64decode(envelope["payload"]))
            record.update(seq=body["seq"], rollout_id=body["rollout_id"], body=body, envelope=envelope,
                          sha256=body["artifact"]["sha256"], version=_release_version(body))
        with self._lock:
            self.messages.append(record)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.messages)

    def live(self) -> list[dict]:
        """Messages published while subscribed (not retained copies replayed at subscribe time)."""
        return [m for m in self.snapshot() if not m["retained"] and m["raw"]]

    def devices(self) -> set[str]:
        return {m["device"] for m in self.live()}

    def by_device(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = defaultdict(list)
        for m in self.live():
            out[m["device"]].append(m)
        return dict(out)

    def wait_for(self, predicate, timeout: float = 30, what: str = "directives") -> None:
        """`tests.support.waiting.wait_for` on `predicate(self)`; a timeout says how many live
        directives were seen."""
        waiting.wait_for(lambda: predicate(self), timeout=timeout, what=what,
                         diagnostics=lambda: f"have {len(self.live())} messages")


def _release_version(body: dict) -> str:
    """The release version a directive body names: from its envelope, or from the URL of a lean
    directive's release_ref (.../versions/<version>/release-envelope)."""
    import base64
    from urllib.parse import unquote

    if body.get("release") is not None:
        return json.loads(base64.b64decode(body["release"]["payload"]))["version"]
    return unquote(body["release_ref"]["url"].rsplit("/versions/", 1)[1].split("/", 1)[0])


class ProtocolResponder:
    """Stand-in devices for engine tests, each with its own broker credentials (created through
    the dynamic-security admin like enrollment does) and its own MQTT connection, confined by the
    broker ACL to its own subtree. For every directive it receives, a device publishes the update
    events a healthy agent would (received … trial, committed), through real ingest.
    `behaviour(device_id, body)` may return "fail" (precheck failure), "silent" (never answers)
    or "ok". `go_offline(ids)` / `come_online(ids)` drop and restore connections.
    """

    STEPS = ("received", "downloading", "verifying", "prechecking", "activating", "trial")

    def __init__(self, broker, device_ids, *, behaviour=None, step_delay: float = 0.02, trial_seconds: float = 0.3,
                 topic_root: str = "fleet"):
        self.broker = broker
        self.device_ids = list(device_ids)
        self.topic_root = topic_root
        self.behaviour = behaviour or (lambda device_id, body: "ok")
        self.step_delay = step_delay
        self.trial_seconds = trial_seconds
        self.event_no: dict[str, int] = defaultdict(int)
        self.handled: set[tuple[str, int]] = set()
        self.passwords: dict[str, str] = {}
        self.clients: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> ProtocolResponder:
        import secrets

        from django.conf import settings

        from ota.fleet.broker import BrokerAdmin

        with BrokerAdmin() as admin:
            for device_id in self.device_ids:
                self.passwords[device_id] = secrets.token_urlsafe(16)
                admin.device_add(device_id=device_id, password=self.passwords[device_id],
                                 topic_root=settings.MQTT_TOPIC_ROOT)
        self.come_online(self.device_ids)
        return self

    def come_online(self, device_ids) -> None:
        from agent.protocol import client_id
        from ota.transport.mqtt import BrokerSettings, connect_blocking, new_client

        for device_id in device_ids:
            creds = BrokerSettings(host="127.0.0.1", port=self.broker.port, username=device_id,
                                   password=self.passwords[device_id], topic_root=self.topic_root)
            subscribed = threading.Event()
            client = new_client(creds, client_id=client_id(device_id))  # the broker pins it
            client.on_message = self._on_message
            client.on_subscribe = lambda *args, ev=subscribed: ev.set()
            connect_blocking(client, creds)
            client.subscribe(f"{self.topic_root}/devices/{device_id}/models/+/directive", qos=1)
            if not subscribed.wait(10):
                raise TimeoutError(f"responder {device_id}: no SUBACK")
            self.clients[device_id] = client

    def go_offline(self, device_ids) -> None:
        for device_id in device_ids:
            client = self.clients.pop(device_id, None)
            if client is not None:
                client.disconnect()
                client.loop_stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.go_offline(list(self.clients))

    def __enter__(self) -> ProtocolResponder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _on_message(self, _client, _userdata, message) -> None:
        import base64

        if not message.payload:
            return
        body = json.loads(base64.b64decode(json.loads(message.payload)["payload"]))
        key = (body["device_id"], body["seq"])
        with self._lock:
            if key in self.handled:  # a retained copy or a re-publish: an agent ignores equal seqs
                return
            self.handled.add(key)
        t = threading.Thread(target=self._run_update, args=(body,), daemon=True)
        self._threads.append(t)
        t.start()

    def _publish(self, body: dict, state: str, error_code: str | None = None, active: str | None = None) -> None:
        from agent.protocol import Event

        device_id = body["device_id"]
        with self._lock:
            self.event_no[device_id] += 1
            n = self.event_no[device_id]
        event = Event(device_id=device_id, event_no=n, seq=body["seq"], model=body["model"], state=state,
                      error_code=error_code, sha256=body["artifact"]["sha256"], active_sha256=active,
                      rollout_id=body["rollout_id"])
        client = self.clients.get(device_id)
        if client is not None:
            client.publish(f"{self.topic_root}/devices/{device_id}/events", event.to_payload(), qos=1)

    def _run_update(self, body: dict) -> None:
        mode = self.behaviour(body["device_id"], body)
        if mode == "silent":
            return
        for state in self.STEPS:
            if self._stop.wait(self.step_delay):
                return
            if mode == "fail" and state == "activating":
                self._publish(body, "failed", "PRECHECK_FAILED")
                return
            self._publish(body, state)
        if self._stop.wait(self.trial_seconds):
            return
        self._publish(body, "committed", active=body["artifact"]["sha256"])
