"""End-to-end harness for the device agent: test keys, signed releases and directives, a real
HTTP artifact server with Range support (and the ability to cut connections and throttle), an
MQTT subscriber that records what devices publish, and `fleet-agent run` subprocesses."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

from agent import signing
from agent.protocol import build_directive_payload, build_release_payload, utcnow
from tests.support import waiting

REPO = Path(__file__).resolve().parents[2]

# A health command that proves what the app would load: the sha of the app-facing file.
# The events one successful update produces, in order (the outcome last).
PROGRESS = ["received", "downloading", "verifying", "prechecking", "activating", "trial", "committed"]

HEALTH_OK = (
    'printf \'{"model_sha256":"%s","error_rate":0.01,"latency_ms_p95":4.5}\' '
    '"$(sha256sum "$FLEET_AGENT_MODEL_PATH" | cut -d" " -f1)"'
)
HEALTH_FAILS = "echo 'inference server is down' >&2; exit 3"
HEALTH_OTHER_SHA = 'printf \'{"model_sha256":"%s","error_rate":0.0}\' "$(printf x | sha256sum | cut -d" " -f1)"'


# --- keys and signed documents ------------------------------------------------------------------


@dataclass
class Keys:
    release: object
    rollout: object

    @classmethod
    def generate(cls) -> Keys:
        load = signing.load_private_key_pem
        return cls(load(signing.generate_private_key_pem()), load(signing.generate_private_key_pem()))

    @property
    def release_pem(self) -> str:
        return signing.public_key_pem(self.release.public_key())

    @property
    def rollout_pem(self) -> str:
        return signing.public_key_pem(self.rollout.public_key())


def other_key():
    return signing.load_private_key_pem(signing.generate_private_key_pem())


@dataclass
class Artifact:
    data: bytes
    file_name: str = "model.onnx"
    hardware: str = "test-hw"

    @property
    def sha256(self) -> str:
        return sha256(self.data).hexdigest()

    def entry(self, **override) -> dict:
        entry = {
            "hardware": self.hardware,
            "format": "onnx",
            "file_name": self.file_name,
            "length": len(self.data),
            "sha256": self.sha256,
            "runtime": {"onnxruntime": ">=1.16"},
        }
        entry.update(override)
        return entry


def linear_contract(*, scale: float, bias: float, features: int = 4, latency_budget_ms: float = 1000.0) -> dict:
    x = np.arange(2 * features, dtype=np.float32).reshape(2, features) / 3
    y = x * np.float32(scale) + np.float32(bias)
    return {
        "inputs": {"x": {"dtype": "float32", "shape": [2, features], "data": x.ravel().tolist()}},
        "outputs": {"y": {"dtype": "float32", "shape": [2, features], "data": y.ravel().tolist()}},
        "atol": 1e-5,
        "rtol": 1e-4,
        "latency_budget_ms": latency_budget_ms,
    }


def release_envelope(
    keys: Keys,
    *,
    model: str,
    version: str,
    counter: int,
    artifacts: list[dict],
    rollback_floor: int = 0,
    health: dict | None = None,
    expires_in: timedelta | None = timedelta(days=365),
    key=None,
) -> dict:
    now = utcnow()
    payload = build_release_payload(
        model=model,
        version=version,
        counter=counter,
        rollback_floor=rollback_floor,
        created=now,
        expires=now + expires_in if expires_in is not None else None,
        artifacts=artifacts,
        health=health,
        provenance={"git_sha": "0" * 40, "ci_run": "test"},
    )
    return signing.sign_envelope(payload, signing.RELEASE_PAYLOAD_TYPE, key or keys.release)


def directive_envelope(
    keys: Keys,
    *,
    device_id: str,
    seq: int,
    model: str,
    release: dict,
    artifact: dict,
    url: str,
    expires_in: timedelta = timedelta(hours=1),
    issued_ago: timedelta = timedelta(0),
    rollout_id: str | None = "r-1",
    key=None,
    retry_denied: bool = False,
    windows: list[str] | None = None,
    release_ref: dict | None = None,
) -> bytes:
    now = utcnow()
    payload = build_directive_payload(
        device_id=device_id,
        seq=seq,
        issued=now - issued_ago,
        expires=now + expires_in,
        rollout_id=rollout_id,
        model=model,
        release_envelope=release,
        artifact={"hardware": artifact["hardware"], "sha256": artifact["sha256"], "length": artifact["length"], "url": url},
        **({"retry_denied": True} if retry_denied else {}),
        **({"windows": windows} if windows else {}),
        **({"release_ref": release_ref} if release_ref else {}),
    )
    envelope = signing.sign_envelope(payload, signing.DIRECTIVE_PAYLOAD_TYPE, key or keys.rollout)
    return json.dumps(envelope).encode()


# --- HTTP artifact server -----------------------------------------------------------------------


class ArtifactServer:
    """Serves bytes (or files, via sendfile) with Range support. Test controls:
    `cuts` (absolute offsets where the next transfer crossing them is cut, each used once),
    `rate` (bytes/s throttle), `rates` (path -> bytes/s, for that path only, over `rate`),
    `redirects` (path -> URL for a 302), byte and request accounting."""

    CHUNK = 64 * 1024

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.files: dict[str, bytes | Path] = {}
        self.redirects: dict[str, str] = {}
        self.unannounced: set[str] = set()  # paths served without Content-Length (close-delimited)
        self.ignore_range = False  # answer Range requests with the whole file (200), like some proxies
        self.fail_next: list[int] = []  # statuses to answer the next requests with (e.g. 503)
        self.cuts: list[int] = []
        self.rate: float | None = None
        self.rates: dict[str, float] = {}
        self.bytes_served = 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.requests.append(
                        {"path": path, "authorization": self.headers.get("Authorization"),
                         "range": self.headers.get("Range"), "host": self.headers.get("Host")}
                    )
                with server.lock:
                    status = server.fail_next.pop(0) if server.fail_next else None
                if status:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                source = server.files.get(path)
                if source is None:
                    body = b'{"error":"not found"}'
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                size = source.stat().st_size if isinstance(source, Path) else len(source)
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-") and not server.ignore_range:
                    start = int(rng[6:-1])
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                if path in server.unannounced:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(size - start))
                self.end_headers()
                rate = server.rates.get(path, server.rate)
                if isinstance(source, Path) and not server.cuts and not rate:
                    self.wfile.flush()
                    with open(source, "rb") as f:
                        sent = self.connection.sendfile(f, offset=start, count=size - start)
                    with server.lock:
                        server.bytes_served += sent
                    return
                data = source.read_bytes() if isinstance(source, Path) else source
                pos = start
                while pos < size:
                    end = min(size, pos + server.CHUNK)
                    with server.lock:
                        cut = next((c for c in sorted(server.cuts) if pos < c <= end), None)
                        if cut is not None:
                            server.cuts.remove(cut)
                            end = cut
                    try:
                        self.wfile.write(data[pos:end])
                        self.wfile.flush()
                    except OSError:
                        return
                    with server.lock:
                        server.bytes_served += end - pos
                    pos = end
                    if cut is not None:
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                    if rate:
                        time.sleep(server.CHUNK / rate)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> ArtifactServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def add(self, path: str, data: bytes | Path) -> str:
        self.files[path] = data
        return self.url(path)


# --- MQTT -------------------------------------------------------------------------------------


class Subscriber:
    """Records every event, presence and telemetry message a device publishes."""

    def __init__(self, port: int, root: str = "fleet"):
        self.port = port
        self.root = root
        self.events: list[dict] = []
        self.presence: dict[str, dict] = {}
        self.telemetry: list[dict] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}-{id(self)}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.subscribed.clear()
        client.subscribe([(f"{self.root}/devices/+/{kind}", 1) for kind in ("events", "presence", "telemetry")])

    def _on_message(self, client, userdata, message):
        parts = message.topic.split("/")
        device, kind = parts[-2], parts[-1]
        try:
            data = json.loads(message.payload) if message.payload else None
        except ValueError:
            return
        with self.lock:
            if kind == "events":
                self.events.append(data)
            elif kind == "presence":
                self.presence[device] = data
            else:
                self.telemetry.append({"device": device, **data})

    def start(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber got no SUBACK"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def events_for(self, device: str, seq: int | None = None) -> list[dict]:
        """Distinct events (by event_no, as the server de-duplicates) in event_no order."""
        with self.lock:
            chosen = {e["event_no"]: e for e in self.events if e.get("device_id") == device and (seq is None or e["seq"] == seq)}
        return [chosen[n] for n in sorted(chosen)]

    def outcomes(self, device: str, seq: int) -> list[dict]:
        return [e for e in self.events_for(device, seq) if e["state"] in ("committed", "failed", "rolled_back", "rejected")]

    def wait_outcome(self, device: str, seq: int, timeout: float = 60, agent=None) -> dict:
        wait_for(lambda: self.outcomes(device, seq), timeout, f"an outcome for {device} seq {seq}", agent=agent)
        return self.outcomes(device, seq)[0]


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def directive_topic(device: str, model: str, root: str = "fleet") -> str:
    return f"{root}/devices/{device}/models/{model}/directive"


def directive_model(payload: bytes, default: str = "unreadable") -> str:
    """The model a signed directive names (the topic it belongs on); `default` for a payload
    that is not a readable envelope (refusal tests publish those too)."""
    try:
        return json.loads(base64.b64decode(json.loads(payload)["payload"]))["model"]
    except Exception:  # forged, truncated or oversized test payloads
        return default


# --- agent processes ------------------------------------------------------------------------------


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(
    path: Path,
    *,
    device_id: str,
    state_dir: Path,
    broker_port: int,
    keys: Keys,
    hardware: str = "test-hw",
    token: str = "mfd_test_token",
    server_url: str = "http://127.0.0.1:9",
    update: dict | None = None,
    telemetry_interval: float = 60,
    mqtt: dict | None = None,
    metrics: dict | None = None,
    release_pems: list[str] | None = None,
    release_threshold: int = 1,
    keys_extra: dict | None = None,
) -> Path:
    upd = {
        "disk_reserve_mb": 1,
        "health_command": HEALTH_OK,
        "trial_seconds": 1,
        "health_interval_seconds": 0.4,
        "max_trial_restarts": 3,
        "precheck_timeout_seconds": 30,
        "download_backoff_seconds": 0.05,
        "download_backoff_max_seconds": 0.5,
        "download_timeout_seconds": 5,
        **(update or {}),
    }
    mq = {"host": "127.0.0.1", "port": broker_port, "topic_root": "fleet", "keepalive": 10,
          "reconnect_min_seconds": 1, "reconnect_max_seconds": 2, **(mqtt or {})}
    lines = [
        f"device_id = {toml_value(device_id)}",
        f"hardware = {toml_value(hardware)}",
        f"state_dir = {toml_value(str(state_dir))}",
        "log_level = \"DEBUG\"",
        "[mqtt]",
        *(f"{k} = {toml_value(v)}" for k, v in mq.items()),
        "[server]",
        f"url = {toml_value(server_url)}",
        f"token = {toml_value(token)}",
        "[keys]",
        f"release = {toml_value(release_pems or [keys.release_pem])}",
        f"rollout = {toml_value([keys.rollout_pem])}",
        f"release_threshold = {toml_value(release_threshold)}",
        *(f"{k} = {toml_value(v)}" for k, v in (keys_extra or {}).items()),  # root, max_staleness_seconds
        "[update]",
        *(f"{k} = {toml_value(v)}" for k, v in upd.items()),
        "[telemetry]",
        f"interval_seconds = {toml_value(telemetry_interval)}",
        # No StatsD listener unless a test asks: many agents share this machine's 8125.
        "[metrics]",
        *(f"{k} = {toml_value(v)}" for k, v in (metrics or {"statsd_listen": ""}).items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    def __init__(self, config: Path, log_path: Path, env: dict | None = None):
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def ready(self) -> bool:
        """The latest start has finished booting (its signal handlers are installed)."""
        return self.alive() and f", pid {self.pid}\n" in self.log_text()

    def start(self, env: dict | None = None) -> AgentProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        full_env.pop("DJANGO_SETTINGS_MODULE", None)
        log = open(self.log_path, "ab")
        self.starts += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(predicate, timeout: float, what: str, *, interval: float = 0.05, agent: AgentProcess | None = None):
    """`tests.support.waiting.wait_for` for agent tests: returns the predicate's truthy value; on a
    timeout, the message ends with the last 4000 characters of `agent`'s log when one is given."""
    diagnostics = (lambda: "--- agent log ---\n" + agent.log_text()[-4000:]) if agent else None
    return waiting.wait_for(predicate, timeout=timeout, what=what, interval=interval, diagnostics=diagnostics)


# --- state inspection -----------------------------------------------------------------------------


def journal(state_dir: Path) -> dict:
    return json.loads((state_dir / "journal.json").read_text())


def active_file(state_dir: Path, model: str) -> Path | None:
    current = state_dir / "models" / model / "current"
    if not current.exists():
        return None
    files = list(current.iterdir())
    assert len(files) == 1, files
    return files[0]


def active_fingerprint(state_dir: Path, model: str) -> tuple[str, str, int]:
    """(link target, sha256 of the app-facing bytes, mtime_ns) of a model's current file."""
    path = active_file(state_dir, model)
    link = os.readlink(state_dir / "models" / model / "current")
    return link, sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def clone_state(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    for leftover in (dest / "outbox").glob("*.json"):
        leftover.unlink()
    shutil.rmtree(dest / "outbox" / "acked", ignore_errors=True)  # the template's events, not the clone's
    (dest / "lock").unlink(missing_ok=True)
    return dest


@dataclass
class Rig:
    """One broker, one artifact server, one key pair, one subscriber: shared by many agents."""

    broker: object
    server: ArtifactServer
    keys: Keys
    subscriber: Subscriber
    tmp: Path
    agents: list[AgentProcess] = field(default_factory=list)

    def config(self, device_id: str, state_dir: Path | None = None, **kwargs) -> Path:
        state_dir = state_dir or self.tmp / device_id / "state"
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        return write_config(
            self.tmp / device_id / "agent.toml", device_id=device_id, state_dir=state_dir,
            broker_port=self.broker.port, keys=self.keys, **kwargs,
        )

    def agent(self, device_id: str, env: dict | None = None) -> AgentProcess:
        agent = AgentProcess(self.tmp / device_id / "agent.toml", self.tmp / device_id / "agent.log", env=env)
        self.agents.append(agent)
        return agent

    def publish_directive(self, device_id: str, payload: bytes, *, model: str | None = None) -> None:
        publish_retained(self.broker.port, directive_topic(device_id, model or directive_model(payload)), payload)

    def directive(self, device_id: str, seq: int, model: str, release: dict, artifact: Artifact | dict,
                  url: str | None = None, **kwargs) -> bytes:
        entry = artifact.entry() if isinstance(artifact, Artifact) else artifact
        if url is None:
            url = self.server.add(f"/artifacts/{entry['sha256']}", artifact.data)
        return directive_envelope(self.keys, device_id=device_id, seq=seq, model=model, release=release,
                                  artifact=entry, url=url, **kwargs)

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
