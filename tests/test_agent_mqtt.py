"""The agent's MQTT link against a Mosquitto that requires TLS and a password: it connects with
the configured CA and credentials, and with a wrong password it keeps retrying instead of dying."""

from __future__ import annotations

import json
import subprocess
import threading

import paho.mqtt.client as paho
import pytest

from tests.support.agent_harness import AgentProcess, Keys, wait_for, write_config
from tests.support.agent_tls import make_tls_files
from tests.support.mosquitto import Mosquitto


@pytest.fixture
def tls_broker(tmp_path):
    files = make_tls_files(tmp_path / "tls")
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user, password in (("dev-tls", "device-secret"), ("watcher", "watcher-secret")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    broker = Mosquitto(tmp_path / "broker", config=(
        f"cafile {files['ca']}\ncertfile {files['cert']}\nkeyfile {files['key']}\n"
        f"allow_anonymous false\npassword_file {passwd}\n"
        # as root, Mosquitto would drop to its own user and could not read files under tmp_path
        "user root\n"
    )).start()
    yield broker, files
    broker.stop()


def _watch_presence(broker, ca: str) -> tuple[paho.Client, dict]:
    seen: dict = {}
    ready = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="watcher")
    client.username_pw_set("watcher", "watcher-secret")
    client.tls_set(ca_certs=ca)
    client.on_connect = lambda c, *a: c.subscribe("fleet/devices/+/presence", qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: seen.update({m.topic: json.loads(m.payload)})
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    assert ready.wait(10)
    return client, seen


@pytest.mark.parametrize("password, connects", [("device-secret", True), ("wrong", False)])
def test_it_connects_over_tls_with_credentials(tls_broker, tmp_path, password, connects):
    broker, files = tls_broker
    watcher, seen = _watch_presence(broker, str(files["ca"]))
    config = write_config(
        tmp_path / "agent.toml", device_id="dev-tls", state_dir=tmp_path / "state", broker_port=broker.port,
        keys=Keys.generate(), mqtt={"tls": True, "ca_file": str(files["ca"]), "username": "dev-tls", "password": password},
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        if connects:
            wait_for(lambda: seen.get("fleet/devices/dev-tls/presence", {}).get("online") is True, 15,
                     "presence over TLS", agent=agent)
        else:
            wait_for(lambda: "refused" in agent.log_text() or "Not authorized" in agent.log_text(), 15,
                     "the refusal in the log", agent=agent)
            assert agent.alive(), "a refused login must not kill the agent"
            assert "fleet/devices/dev-tls/presence" not in seen
    finally:
        assert agent.stop() == 0
        watcher.disconnect()
        watcher.loop_stop()
