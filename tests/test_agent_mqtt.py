"""The agent's MQTT link against a Mosquitto that requires TLS and a password: it connects with
the configured CA and credentials, and with a wrong password it keeps retrying instead of dying.

While it cannot connect it says so: each failed attempt with the broker's address (host:port,
TLS on/off) and the reason (connection refused, the broker refusing the login, a TLS handshake
error, a DNS failure, the broker hanging up), the first at once and then at most one line per
mqtt.failure_log_interval_seconds; and the recovery with the count and the outage's length."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest

from agent.config import MqttConfig
from agent.mqtt import ConnectLog, MqttLink
from tests.support.agent_harness import AgentProcess, Keys, wait_for, write_config
from tests.support.agent_tls import make_tls_files
from tests.support.mosquitto import Mosquitto
from tests.support.net import free_port


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
    broker.passwd = passwd
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


# --- the connection log -------------------------------------------------------------------------


def _agent(tmp_path, port: int, **mqtt) -> AgentProcess:
    config = write_config(tmp_path / "agent.toml", device_id="dev-tls", state_dir=tmp_path / "state", broker_port=port,
                          keys=Keys.generate(), mqtt=mqtt)
    return AgentProcess(config, tmp_path / "agent.log").start()


def _lines(agent: AgentProcess, text: str) -> list[str]:
    return [line for line in agent.log_text().splitlines() if text in line]


def _attempts(agent: AgentProcess) -> int:
    """Failed attempts so far, from the DEBUG line each one gets (the harness runs at DEBUG)."""
    return len(_lines(agent, "DEBUG fleet_agent.mqtt: connection attempt"))


def test_it_logs_a_refused_port_at_once_then_stays_quiet_until_the_broker_comes(tmp_path):
    port = free_port()  # nothing listens there (yet)
    agent = _agent(tmp_path, port)  # paho retries after 1 s, then every 2 s
    broker = None
    try:
        wait_for(lambda: _lines(agent, f"cannot connect to MQTT broker 127.0.0.1:{port} (TLS off): connection refused"),
                 15, "the first failure, at once", agent=agent)
        wait_for(lambda: _attempts(agent) >= 4, 20, "four failed attempts", agent=agent)
        # With the default interval (60 s) the retries of these seconds add no line of their own.
        warnings = _lines(agent, "WARNING fleet_agent.mqtt")
        assert len(warnings) == 1, warnings
        assert "connection refused" in warnings[0] and f"127.0.0.1:{port} (TLS off)" in warnings[0]

        broker = Mosquitto(tmp_path / "broker", port=port).start()
        recovered = wait_for(
            lambda: re.search(rf"connected to MQTT broker 127\.0\.0\.1:{port} \(TLS off\) after (\d+) failed attempts "
                              r"over (\d+) s", agent.log_text()), 20, "the recovery line", agent=agent)
        assert int(recovered[1]) >= 4 and int(recovered[2]) >= 3, recovered[0]
        assert agent.alive()
    finally:
        assert agent.stop() == 0
        if broker:
            broker.stop()


def test_it_logs_refused_credentials_rate_limited_and_the_recovery(tls_broker, tmp_path):
    broker, files = tls_broker
    started = time.monotonic()
    agent = _agent(tmp_path, broker.port, tls=True, ca_file=str(files["ca"]), username="dev-tls", password="guessed",
                   reconnect_min_seconds=1, reconnect_max_seconds=1, failure_log_interval_seconds=2)
    try:
        where = f"127.0.0.1:{broker.port} (TLS on)"
        first = wait_for(lambda: _lines(agent, f"cannot connect to MQTT broker {where}: the broker refused the connection"),
                         15, "the refusal", agent=agent)[0]
        assert "not authorised" in first and "check mqtt.username and mqtt.password" in first
        wait_for(lambda: _attempts(agent) >= 6, 20, "six refused attempts", agent=agent)
        elapsed = time.monotonic() - started
        warnings = _lines(agent, "WARNING fleet_agent.mqtt")
        attempts = _attempts(agent)
        # No flood: one line at once, then at most one per 2 s, each naming the broker and the reason;
        # the later ones count the attempts since the line before.
        assert 2 <= len(warnings) <= 2 + elapsed / 2 and len(warnings) < attempts, (warnings, attempts, elapsed)
        assert all(where in w and "not authorised" in w for w in warnings), warnings
        counted = [int(m[1]) for w in warnings if (m := re.search(r"; (\d+) failed attempts in the last \d+ s", w))]
        assert counted and 1 + sum(counted) <= attempts, (warnings, attempts)
        assert not _lines(agent, "disconnected from"), "a refused login is not a disconnection"

        # The broker learns the password (Mosquitto re-reads its password file on SIGHUP): connected.
        subprocess.run(["mosquitto_passwd", "-b", str(broker.passwd), "dev-tls", "guessed"], check=True,
                       capture_output=True)
        broker.process.send_signal(signal.SIGHUP)
        line = wait_for(lambda: _lines(agent, f"connected to MQTT broker {where} after"), 20, "the recovery",
                        agent=agent)[0]
        assert re.search(r"after \d+ failed attempts over \d+ s$", line), line
        assert agent.alive()
    finally:
        assert agent.stop() == 0


def test_it_logs_a_tls_handshake_failure(tls_broker, tmp_path):
    broker, _files = tls_broker
    stranger = make_tls_files(tmp_path / "other-ca")  # a CA that did not sign the broker's certificate
    agent = _agent(tmp_path, broker.port, tls=True, ca_file=str(stranger["ca"]), username="dev-tls",
                   password="device-secret")
    try:
        line = wait_for(lambda: _lines(agent, f"cannot connect to MQTT broker 127.0.0.1:{broker.port} (TLS on): "
                                              "TLS handshake failed"), 15, "the TLS failure", agent=agent)[0]
        assert "certificate verify failed" in line and str(stranger["ca"]) in line
    finally:
        assert agent.stop() == 0


def _link_log(caplog, cfg: MqttConfig, until: str) -> str:
    """Run a real MqttLink (real paho) until its log mentions `until`; returns what it logged."""
    caplog.set_level(logging.DEBUG, logger="fleet_agent.mqtt")
    link = MqttLink(cfg, device_id="dev-x", on_directive=lambda payload: None, presence=lambda online: b"{}")
    link.start()
    try:
        wait_for(lambda: until in caplog.text, 30, until)
    finally:
        link.stop()
    return caplog.text


def test_it_names_a_dns_failure(caplog):
    text = _link_log(caplog, MqttConfig(host="no-such-host.invalid", port=1883), "DNS lookup")
    assert "cannot connect to MQTT broker no-such-host.invalid:1883 (TLS off): DNS lookup of " in text


def test_it_names_a_broker_that_hangs_up_before_its_connack(tls_broker, caplog):
    broker, _files = tls_broker  # a TLS listener, spoken to in plain MQTT
    text = _link_log(caplog, MqttConfig(port=broker.port), "cannot connect")
    assert (f"cannot connect to MQTT broker 127.0.0.1:{broker.port} (TLS off): the broker closed the connection "
            "before answering CONNECT (a TLS listener, while mqtt.tls is off?)") in text


def test_the_connection_log_is_rate_limited():
    now = [0.0]
    records: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record):
            records.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("test.connect_log")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(Recorder())
    clog = ConnectLog("mqtt.example:8883 (TLS on)", 60, clock=lambda: now[0], logger=logger)
    for t in range(61):  # an attempt every second for a minute
        now[0] = t
        clog.failed("connection refused (nothing listening on that port?)")
    now[0] = 61.5
    clog.connected()
    assert records == [
        ("WARNING cannot connect to MQTT broker mqtt.example:8883 (TLS on): connection refused (nothing listening on "
         "that port?); retrying with backoff"),
        ("WARNING still cannot connect to MQTT broker mqtt.example:8883 (TLS on): connection refused (nothing listening "
         "on that port?); 60 failed attempts in the last 60 s (61 since the first, 60 s ago)"),
        "INFO connected to MQTT broker mqtt.example:8883 (TLS on) after 61 failed attempts over 62 s",
    ]
    records.clear()
    now[0] = 100
    clog.failed("the broker refused the connection: not authorised")  # a new outage: at once again
    now[0] = 101
    clog.failed("the broker refused the connection: not authorised")
    assert records == [("WARNING cannot connect to MQTT broker mqtt.example:8883 (TLS on): the broker refused the "
                        "connection: not authorised; retrying with backoff")]
