"""`fleet-agent`: run the daemon, inspect state, verify envelopes offline, roll back locally, enroll.

Exit codes: 0 ok, 1 refused / failed (verify, rollback), 2 bad config or usage, 3 another agent
already owns the state directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from agent.config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, ConfigError, load_config

EXIT_OK, EXIT_REFUSED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3


def _load(args) -> object:
    return load_config(args.config)


def cmd_run(args) -> int:
    cfg = _load(args)
    logging.basicConfig(
        level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from agent.daemon import Agent, AgentLocked
    from agent.mqtt import MqttLink

    try:
        return Agent(cfg, link_factory=MqttLink).run()
    except AgentLocked as exc:
        print(f"fleet-agent: {exc}", file=sys.stderr)
        return EXIT_LOCKED


def cmd_status(args) -> int:
    from agent.status import status

    print(json.dumps(status(_load(args)), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_verify(args) -> int:
    from agent.protocol import ProtocolError, verify_directive, verify_release
    from agent.signing import DIRECTIVE_PAYLOAD_TYPE, RELEASE_PAYLOAD_TYPE, Keyring, VerificationError

    cfg = _load(args)
    try:
        envelope = json.loads(Path(args.envelope).read_bytes())
    except OSError as exc:
        print(f"fleet-agent verify: cannot read {args.envelope}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"REFUSED MALFORMED: {args.envelope} is not JSON: {exc}")
        return EXIT_REFUSED
    release_keys = Keyring.from_pems(*cfg.keys.release, threshold=cfg.keys.release_threshold)
    rollout_keys = Keyring.from_pems(*cfg.keys.rollout)
    kind = envelope.get("payloadType") if isinstance(envelope, dict) else None
    try:
        if kind == DIRECTIVE_PAYLOAD_TYPE:
            directive = verify_directive(envelope, rollout_keys)
            summary = {
                "type": "directive", "device_id": directive.device_id, "seq": directive.seq,
                "expires": directive.expires.isoformat(), "model": directive.model,
                "artifact": directive.artifact.sha256, "for_this_device": directive.device_id == cfg.device_id,
            }
            if directive.release is not None:
                summary["version"] = verify_release(directive.release, release_keys).version
            else:  # lean: the release is fetched by reference (agent.releases); verify that file on its own
                summary["release_ref"] = {"sha256": directive.release_ref.sha256, "url": directive.release_ref.url}
        elif kind == RELEASE_PAYLOAD_TYPE:
            release = verify_release(envelope, release_keys)
            summary = {
                "type": "release", "model": release.model, "version": release.version, "counter": release.counter,
                "artifacts": {a.hardware: a.sha256 for a in release.artifacts},
                "has_artifact_for_this_device": release.artifact_for(cfg.hardware) is not None,
            }
        else:
            print(f"REFUSED WRONG_PAYLOAD_TYPE: payloadType {kind!r} is neither a release nor a directive")
            return EXIT_REFUSED
    except (VerificationError, ProtocolError) as exc:
        print(f"REFUSED {exc.code}: {exc}")
        return EXIT_REFUSED
    print("OK " + json.dumps(summary, sort_keys=True))
    return EXIT_OK


def cmd_rollback(args) -> int:
    from agent.daemon import Agent, AgentLocked, lock_state_dir

    cfg = _load(args)
    try:
        lock = lock_state_dir(cfg.state_dir)
    except AgentLocked:
        return _rollback_via_daemon(cfg, args.model, args.wait)
    try:
        agent = Agent(cfg)
        agent.adopt_identity()
        try:
            agent.start_local_rollback(args.model)
        except ValueError as exc:
            print(f"fleet-agent rollback: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        agent.drive()
        outcome = agent.journal.data.get("last_outcome") or {}
    finally:
        lock.close()
    return _print_rollback(outcome, args.model, cfg)


def _rollback_via_daemon(cfg, model: str, wait: float) -> int:
    """The daemon owns the state: hand it a request file and wait for its answer."""
    from agent.journal import atomic_write_json

    requests = cfg.state_dir / "requests"
    requests.mkdir(exist_ok=True)
    request = requests / f"rollback-{int(time.time() * 1000)}.json"
    atomic_write_json(request, {"model": model})
    done = request.with_suffix(".done")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not done.exists():
        time.sleep(0.2)
    if not done.exists():
        print(f"fleet-agent rollback: the running agent did not pick up the request within {wait:g}s "
              f"(it may be busy with an update); the request stays queued", file=sys.stderr)
        return EXIT_REFUSED
    answer = json.loads(done.read_text())
    done.unlink(missing_ok=True)
    if not answer.get("ok"):
        print(f"fleet-agent rollback: {answer.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    from agent.journal import Journal

    while time.monotonic() < deadline:
        data = Journal.load(cfg.state_dir / "journal.json")
        if not data.get("update"):
            return _print_rollback(data.get("last_outcome") or {}, model, cfg)
        time.sleep(0.2)
    print("fleet-agent rollback: accepted; still in progress", file=sys.stderr)
    return EXIT_OK


def _print_rollback(outcome: dict, model: str, cfg) -> int:
    from agent.journal import Journal

    data = Journal.load(cfg.state_dir / "journal.json")
    active = (data["models"].get(model) or {}).get("current")
    if outcome.get("state") == "rolled_back":
        print(f"rolled back {model}: active {active}")
        return EXIT_OK
    print(f"fleet-agent rollback: {outcome.get('error_code')}: {outcome.get('detail')}", file=sys.stderr)
    return EXIT_REFUSED


def cmd_enroll(args) -> int:
    from agent.enroll import enroll_command  # written with the rollout service; imported lazily

    return enroll_command(args)


def _label(value: str) -> str:
    if "=" not in value or not value.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"label {value!r} must look like key=value")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-agent", description="modelfleet device agent")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", default=DEFAULT_CONFIG_PATH, help=f"agent TOML config (default {DEFAULT_CONFIG_PATH})")
        return p

    p = with_config(sub.add_parser("run", help="run the agent daemon"))
    p.set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("status", help="active models, update state, last seq, pending outbox (JSON)"))
    p.set_defaults(func=cmd_status)
    p = with_config(sub.add_parser("verify", help="check a release or directive envelope offline"))
    p.add_argument("envelope", help="path to a DSSE envelope JSON file")
    p.set_defaults(func=cmd_verify)
    p = with_config(sub.add_parser("rollback", help="switch MODEL back to its previous version (re-verified)"))
    p.add_argument("model")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a running agent (default 60)")
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("enroll", help="register this device with the server and write its config")
    p.add_argument("--server", required=True, help="server URL, e.g. https://fleet.example.com")
    p.add_argument("--token", required=True, help="one-time enrollment token")
    p.add_argument("--hardware", required=True, help="hardware id, e.g. jetson-orin")
    p.add_argument("--label", action="append", default=[], type=_label, help="k=v label (repeatable)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"state directory (default {DEFAULT_STATE_DIR})")
    p.add_argument("--name", default=None, help="device name (default: hostname)")
    p.add_argument("--force", action="store_true",
                   help="enroll again over an existing agent.toml as a new device, keeping the installed models")
    p.set_defaults(func=cmd_enroll)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fleet-agent: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
