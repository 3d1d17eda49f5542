"""Model metrics on the box: the application's StatsD lines, folded per model and release into
DDSketch windows, reported with telemetry and judged by the trial (agent/metrics/)."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys

import pytest

from agent.metrics.aggregate import Window
from agent.metrics.book import MetricsBook
from agent.metrics.statsd import Rejected, Sample, parse_datagram, parse_line
from tests.support.agent_harness import REPO, Artifact, linear_contract, release_envelope, wait_for
from tests.support.net import free_port
from tests.support.onnx_models import linear_model


def test_it_parses_the_statsd_lines_apps_send():
    assert parse_line("inference.latency_ms:12.5|ms|#model:detector,site:x") == Sample(
        "latency_ms", 12.5, "timing", 1.0, "detector")
    assert parse_line("inference.requests:1|c|@0.25") == Sample("requests", 1.0, "counter", 0.25, None)
    assert parse_line("inference.output.person:1|c") == Sample("output.person", 1.0, "counter")
    assert [type(x) for x in parse_datagram(b"inference.requests:1|c\ninference.errors:1|c\n\n")] == [Sample, Sample]
    bad = {
        "inference.latency_ms:12": "not name:value|type",
        "cpu.load:1|g": "name does not start with 'inference.'",
        "inference.latency_ms:fast|ms": "is not a number",
        "inference.latency_ms:nan|ms": "value is not finite",
        "inference.requests:1|x": "unknown type",
        "inference.requests:1|c|@2": "sample rate must be in (0, 1]",
        "inference.:1|c": "bad metric name",
    }
    for line, reason in bad.items():
        result = parse_line(line)
        assert isinstance(result, Rejected) and reason in result.reason, (line, result)


def test_it_keeps_quantiles_within_one_percent_through_json_and_merges():
    rng = random.Random(1)
    values = [rng.lognormvariate(3, 0.6) for _ in range(20_000)]
    halves = [Window(), Window()]
    for i, v in enumerate(values):
        halves[i % 2].add("latency_ms", v, "timing")
        halves[i % 2].add("requests", 1, "counter")
    # What the server does with two devices' (or two windows') reports: decode and merge.
    merged = Window.from_json(json.loads(json.dumps(halves[0].to_json())))
    merged.merge(Window.from_json(json.loads(json.dumps(halves[1].to_json()))))
    exact = sorted(values)
    for q in (0.5, 0.95, 0.99):
        true = exact[int(q * (len(exact) - 1))]
        assert abs(merged.latency_ms.get_quantile_value(q) - true) / true < 0.02, q
    assert merged.requests == 20_000
    # The sketch is bounded whatever the traffic: a few hundred buckets, not 20,000 values.
    assert len(halves[0].to_json()["latency_ms"]["bins"]) < 400


def test_it_attributes_samples_to_a_model_and_its_running_release():
    running = {"detector": "a" * 64}
    book = MetricsBook(releases=lambda: dict(running))
    book.feed(b"inference.requests:1|c\ninference.latency_ms:10|ms")
    running["counter"] = "b" * 64
    book.feed(b"inference.requests:1|c")  # untagged with two models: whose is it?
    book.feed(b"inference.requests:1|c|#model:counter\ninference.requests:1|c|#model:ghost")
    book.feed(b"garbage")
    window = book.take_window()
    assert [(m["model"], m["release"], m["requests"]) for m in window["models"]] == [
        ("counter", "b" * 64, 1), ("detector", "a" * 64, 1)]
    assert window["stats"] == {"samples": 3, "rejected": 1, "unattributed": 2, "ignored": 0}
    assert window["models"][1]["summary"]["latency_ms_p50"] == pytest.approx(10, rel=0.02)
    # A release change starts a new entry: the old release's figures never count for the new one.
    running["detector"] = "c" * 64
    book.feed(b"inference.requests:1|c|#model:detector")
    assert [m["release"] for m in book.take_window()["models"]] == ["c" * 64]


@pytest.fixture
def app_port():
    return free_port()


def start_app(state_dir, port, behaviours):
    return subprocess.Popen([sys.executable, "-m", "tests.support.statsd_app", str(state_dir), "detector", str(port),
                             json.dumps(behaviours)], cwd=REPO)


def test_it_judges_the_trial_on_the_apps_metrics_and_reports_them(rig, app_port):
    """A release 4x slower than the limit passes the precheck yet fails its trial on what the app
    reports; v1 commits on the same figures; telemetry carries the windows as mergeable sketches."""
    v1 = Artifact(linear_model(scale=2.0, bias=1.0))
    slow = Artifact(linear_model(scale=3.0, bias=0.5))
    rel1 = release_envelope(rig.keys, model="detector", version="1.0", counter=1, artifacts=[v1.entry()],
                            health=linear_contract(scale=2.0, bias=1.0))
    rel2 = release_envelope(rig.keys, model="detector", version="2.0", counter=2, artifacts=[slow.entry()],
                            health=linear_contract(scale=3.0, bias=0.5))
    state = rig.tmp / "dev-1" / "state"
    rig.config("dev-1", telemetry_interval=0.5, update={"trial_seconds": 3, "max_latency_ms_p95": 30,
                                                         "health_command": ""},
               metrics={"statsd_listen": f"127.0.0.1:{app_port}", "min_trial_requests": 20})
    agent = rig.agent("dev-1").start()
    app = start_app(state, app_port, {slow.sha256: {"latency_ms": 120}})
    try:
        rig.publish_directive("dev-1", rig.directive("dev-1", 1, "detector", rel1, v1))
        first = rig.subscriber.wait_outcome("dev-1", 1, agent=agent)
        assert first["state"] == "committed", first
        judged = first["health"]["app_metrics"]
        assert judged["judged"] and judged["requests"] >= 20 and judged["latency_ms_p95"] < 30

        rig.publish_directive("dev-1", rig.directive("dev-1", 2, "detector", rel2, slow))
        second = rig.subscriber.wait_outcome("dev-1", 2, agent=agent)
        assert second["state"] == "rolled_back" and second["error_code"] == "TRIAL_FAILED", second
        assert "the application's metrics: p95 latency" in second["detail"]
        assert second["active_sha256"] == v1.sha256

        def windows():
            return [w for t in rig.subscriber.telemetry if t["device"] == "dev-1"
                    for w in (t.get("model_metrics") or {}).get("models", [])]
        def back_on_v1_after_slow():
            releases = [w["release"] for w in windows()]
            return slow.sha256 in releases and v1.sha256 in releases[releases.index(slow.sha256):]
        wait_for(back_on_v1_after_slow, 20, "telemetry with the slow release's figures, then v1's again", agent=agent)
        by_release: dict[str, Window] = {}
        for w in windows():
            by_release.setdefault(w["release"], Window()).merge(Window.from_json(w))
        assert by_release[v1.sha256].latency_ms.get_quantile_value(0.5) == pytest.approx(10, rel=0.15)
        assert by_release[slow.sha256].latency_ms.get_quantile_value(0.5) == pytest.approx(120, rel=0.15)
        assert set(by_release[v1.sha256].outputs) == {"person", "car"}
    finally:
        app.kill()
        app.wait()


def test_it_goes_on_without_metrics_when_the_port_is_taken(rig, app_port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", app_port))
        v1 = Artifact(linear_model(scale=2.0, bias=1.0))
        rel1 = release_envelope(rig.keys, model="detector", version="1.0", counter=1, artifacts=[v1.entry()],
                                health=linear_contract(scale=2.0, bias=1.0))
        rig.config("dev-1", metrics={"statsd_listen": f"127.0.0.1:{app_port}"})
        agent = rig.agent("dev-1").start()
        rig.publish_directive("dev-1", rig.directive("dev-1", 1, "detector", rel1, v1))
        assert rig.subscriber.wait_outcome("dev-1", 1, agent=agent)["state"] == "committed"
        wait_for(lambda: "model metrics off: cannot listen for StatsD" in agent.log_text(), 10,
                 "the agent to say why metrics are off", agent=agent)


def test_it_keeps_a_window_within_one_telemetry_message():
    book = MetricsBook(releases=lambda: {"detector": "a" * 64})
    rng = random.Random(3)
    lines = [f"inference.output.score{i}:{rng.lognormvariate(0, 2):.6f}|h" for i in range(64) for _ in range(200)]
    for start in range(0, len(lines), 50):
        book.feed("\n".join(lines[start:start + 50]).encode())
    book.feed(b"inference.latency_ms:12|ms\ninference.requests:1|c")
    window = book.take_window()
    assert window["truncated"] == "output_values" and window["models"][0]["output_values"] == {}
    assert len(json.dumps(window)) < 48 * 1024 and window["models"][0]["requests"] == 1
