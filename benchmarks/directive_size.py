"""Bytes per device the broker holds for one model's retained directive: whole envelope inside
(as before) against a lean directive (a release_ref: sha256, length and URL of the envelope).

For two releases, one with a small health contract (a 2x4 linear model's golden values) and one
with a large one (an 80x80 grey image as its golden input: near the registry's 24 KiB cap on a
health contract, registry.health.HEALTH_MAX_BYTES), it signs a real directive for each of --devices devices both ways
(agent.protocol.build_directive_payload, Ed25519 as the server signs them), publishes them
retained with QoS 1 to a fresh Mosquitto per case (the broker devices use, with this repository's
limits), and measures the broker's resident memory before and after (psutil), next to the
physical floor: the retained bytes themselves (topic + payload).

    .venv/bin/python benchmarks/directive_size.py [--devices 5000]

Writes benchmarks/results/directive_size.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "directive_size.json"


def releases(keys) -> dict[str, dict]:
    """name -> a signed release envelope (small and large health contract)."""
    import numpy as np

    from agent.protocol import build_release_payload
    from agent.signing import RELEASE_PAYLOAD_TYPE, sign_envelope

    now = datetime.now(UTC)
    artifact = {"hardware": "rpi4", "format": "onnx", "file_name": "model.onnx", "length": 4_000_000,
                "sha256": "ab" * 32, "runtime": {"onnxruntime": ">=1.16"}}
    x = (np.arange(8, dtype=np.float32) / 3).tolist()
    small = {"inputs": {"x": {"dtype": "float32", "shape": [2, 4], "data": x}},
             "outputs": {"y": {"dtype": "float32", "shape": [2, 4], "data": x}}, "atol": 1e-5}
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, size=80 * 80).tolist()  # integers: short JSON, as real image inputs
    large = {"inputs": {"image": {"dtype": "uint8", "shape": [1, 80, 80], "data": pixels}},
             "outputs": {"logits": {"dtype": "float32", "shape": [1, 10], "data": [0.1] * 10}}, "atol": 1e-3}
    out = {}
    from agent.precheck import CONTRACT_MAX_BYTES
    from agent.protocol import encode_json

    assert len(encode_json(large)) <= CONTRACT_MAX_BYTES, len(encode_json(large))
    for name, health in (("small_contract", small), ("large_contract", large)):
        payload = build_release_payload(model="detector", version="2.0", counter=2, rollback_floor=0, created=now,
                                        expires=now + timedelta(days=365), artifacts=[artifact], health=health,
                                        provenance={"git_sha": "0" * 40})
        out[name] = sign_envelope(payload, RELEASE_PAYLOAD_TYPE, keys["release"])
    return out


def directives(envelope: dict, keys, n: int, *, lean: bool) -> list[tuple[str, bytes]]:
    from agent.protocol import Topics, build_directive_payload, encode_json, release_bytes
    from agent.signing import DIRECTIVE_PAYLOAD_TYPE, sign_envelope

    now = datetime.now(UTC)
    data = release_bytes(envelope)
    ref = {"sha256": sha256(data).hexdigest(), "length": len(data),
           "url": "https://fleet.example.com/api/v1/models/detector/versions/2.0/release-envelope"}
    topics = Topics()
    out = []
    for i in range(n):
        device = f"dev-{i:016x}"
        payload = build_directive_payload(
            device_id=device, seq=7, issued=now, expires=now + timedelta(days=30), rollout_id="42", model="detector",
            artifact={"hardware": "rpi4", "sha256": "ab" * 32, "length": 4_000_000,
                      "url": "https://fleet.example.com/api/v1/models/detector/versions/2.0/artifacts/rpi4/download"},
            **({"release_ref": ref} if lean else {"release_envelope": envelope}),
        )
        out.append((topics.directive(device, "detector"), encode_json(sign_envelope(payload, DIRECTIVE_PAYLOAD_TYPE,
                                                                                     keys["rollout"]))))
    return out


def broker_bytes(messages: list[tuple[str, bytes]], workdir: Path) -> dict:
    """Start a Mosquitto, publish `messages` retained (QoS 1), return its RSS growth."""
    import paho.mqtt.client as paho
    import psutil

    from tests.support.mosquitto import Mosquitto

    broker = Mosquitto(workdir).start()
    try:
        proc = psutil.Process(broker.process.pid)
        time.sleep(0.5)
        before = proc.memory_info().rss
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-directive-size")
        client.max_inflight_messages_set(200)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        started = time.perf_counter()
        infos = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(60)
        seconds = time.perf_counter() - started
        client.disconnect()
        client.loop_stop()
        time.sleep(0.5)
        after = proc.memory_info().rss
    finally:
        broker.stop()
    return {"rss_growth_bytes": after - before, "publish_seconds": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5000)
    args = parser.parse_args()

    from agent.signing import generate_private_key_pem, load_private_key_pem

    keys = {role: load_private_key_pem(generate_private_key_pem()) for role in ("release", "rollout")}
    report = {"benchmark": "directive_size", "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": platform.node(), "devices": args.devices, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench-directive-size-") as tmp:
        for name, envelope in releases(keys).items():
            case = {}
            for kind in ("full", "lean"):
                messages = directives(envelope, keys, args.devices, lean=kind == "lean")
                retained = sum(len(t) + len(p) for t, p in messages) / len(messages)
                measured = broker_bytes(messages, Path(tmp) / f"{name}-{kind}")
                case[kind] = {
                    "directive_bytes": len(messages[0][1]),
                    "retained_bytes_per_device": round(retained),  # the floor: topic + payload
                    "broker_rss_bytes_per_device": round(measured["rss_growth_bytes"] / args.devices),
                    "publish_seconds": measured["publish_seconds"],
                }
                print(f"{name:15s} {kind:4s}  directive {case[kind]['directive_bytes']:6d} B  "
                      f"retained {case[kind]['retained_bytes_per_device']:6d} B/device  broker RSS "
                      f"{case[kind]['broker_rss_bytes_per_device']:6d} B/device  ({args.devices} devices, "
                      f"{measured['publish_seconds']} s)", flush=True)
            case["broker_rss_ratio_lean_to_full"] = round(
                case["lean"]["broker_rss_bytes_per_device"] / max(1, case["full"]["broker_rss_bytes_per_device"]), 3)
            report["cases"][name] = case
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
