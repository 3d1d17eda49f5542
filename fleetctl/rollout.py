"""`fleetctl rollout ...`: create, drive and watch staged rollouts.

    fleetctl rollout create --model detector --version 2.0 --label site=berlin \\
        --wave 'canary: box-1, box-2' --wave 25% --wave 100% --min-healthy 95 --abort-policy revert --start
    fleetctl rollout create ... --window 'Mon-Fri 02:00-04:00 Europe/Berlin' --window 'Sat,Sun 22:00-06:00' \
        --label-window 'site=tokyo' 'daily 01:00-03:00 Asia/Tokyo' --start-at 2026-12-24T02:00:00Z --start
    fleetctl rollout status 7 --watch        # live per-wave progress; exit 0 when completed
    fleetctl rollout pause|resume|advance|retry|abort|rollback|approve|unschedule 7 [--reason TEXT]

Maintenance windows (--window, repeatable; --label-window LABELS WINDOW for a label group): devices
download and precheck at once and activate only while a window is open, by their own clock.
--start-at: with --start the rollout is scheduled and the server starts it then (`unschedule`
cancels that, `abort` drops it).

`status --watch` exits 0 when the rollout completes and 1, with the reason, when it stops
otherwise (paused by a gate or a person, aborted, rolled back), so a CI job can wait on it. It
rides out a server restart (connection errors and 5xx are retried for up to a minute). Other
exit codes as for every fleetctl command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fleetctl.client import ApiError
from fleetctl.common import (
    API,
    EXIT_INVALID,
    EXIT_USAGE,
    Parser,
    UsageError,
    client_from_args,
    common_options,
    eprint,
    print_json,
    print_table,
)

# The server's rollout actions (ota/rollouts/catalogue.py decides who may run them and when;
# tests/test_rollout_catalogue.py keeps this list equal to it). fleetctl is installed on CI
# runners and edge boxes without the server's code, so it cannot import the catalogue itself.
ACTIONS = {
    "approve": "approve a rollout that requires approval (operator)",
    "start": "start a created (and, if required, approved) rollout; with a start_at ahead it is scheduled and "
    "the engine starts it then",
    "unschedule": "cancel a scheduled start: the rollout is created again, without a start time (start then "
    "starts it at once)",
    "pause": "stop sending directives; devices already updating finish",
    "resume": "continue a paused rollout",
    "advance": "pass the current wave now, whatever its gates say",
    "retry": "send failed devices of the started waves a fresh directive, and devices that never picked "
    "theirs up the same one again",
    "abort": "stop the rollout; devices not yet directed are skipped",
    "rollback": "send every device this rollout touched back to its previous release",
}
COMPLETED = "completed"
# Where `status --watch` stops without success (exit 1, the reason on stderr).
STOPPED = {"paused", "aborted", "rolled_back"}


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {pair!r}: expected key=value")
        labels[key] = value
    return labels


def build_definition(args) -> dict:
    body: dict = {}
    if args.file:
        try:
            body = json.loads(Path(args.file).read_text())
        except OSError as exc:
            raise UsageError(f"--file {args.file}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"--file {args.file}: not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise UsageError(f"--file {args.file}: must hold a JSON object")
    if args.model:
        body["model"] = args.model
    if args.version:
        body["version"] = args.version
    target = dict(body.get("target") or {})
    if args.label:
        target["labels"] = parse_labels(args.label)
    if args.hardware:
        target["hardware"] = args.hardware
    if args.device:
        target["devices"] = args.device
    body["target"] = target
    if args.wave:
        body["waves"] = list(args.wave)  # steps of a wave plan; the server parses them
    gates = dict(body.get("gates") or {})
    if args.gates:
        try:
            gates.update(json.loads(args.gates))
        except json.JSONDecodeError as exc:
            raise UsageError(f"--gates: not JSON: {exc}") from None
    for flag, section, key in (
        ("min_healthy", "success", "min_healthy_percent"),
        ("min_reports", "failure", "min_reports"),
        ("max_failed_percent", "failure", "max_failed_percent"),
        ("max_failures", "failure", "max_failures"),
    ):
        value = getattr(args, flag)
        if value is not None:
            gates[section] = {**gates.get(section, {}), key: value}
    if args.soak is not None:
        gates["soak_seconds"] = args.soak
    if args.rate is not None:
        gates["rate_per_minute"] = args.rate
    body["gates"] = gates
    if args.abort_policy:
        body["abort_policy"] = args.abort_policy
    if args.requires_approval:
        body["requires_approval"] = True
    if args.follow:
        body["follow_target"] = True
    if args.name:
        body["name"] = args.name
    if args.window:
        body["windows"] = list(args.window)  # the server checks them as every agent parses them
    if args.label_window:
        groups: dict[str, dict] = {}  # --label-window 'site=a' W1 --label-window 'site=a' W2: one group
        for labels, window in args.label_window:
            group = groups.setdefault(labels, {"labels": parse_labels(labels.split(",")), "windows": []})
            group["windows"].append(window)
        body["label_windows"] = list(groups.values())
    if args.start_at:
        body["start_at"] = args.start_at
    for required in ("model", "version"):
        if not body.get(required):
            raise UsageError(f"--{required} is required (or give it in --file)")
    if not body.get("waves"):
        raise UsageError("give at least one --wave (e.g. --wave 'canary 2' --wave 25% --wave 100%), or waves in --file")
    return body


# --- display ----------------------------------------------------------------------------------


def _bar(committed: int, failed: int, in_flight: int, size: int, width: int = 30) -> str:
    if size <= 0:
        return "[" + " " * width + "]"
    c = round(width * committed / size)
    f = min(width - c, round(width * failed / size))
    i = min(width - c - f, round(width * in_flight / size))
    return "[" + "#" * c + "x" * f + ">" * i + "." * (width - c - f - i) + "]"


def render(rollout: dict) -> list[str]:
    lines = [
        f"rollout {rollout['id']}  {rollout['model']}@{rollout['version']}  {rollout['state'].upper()}"
        + (f"  ({rollout['state_reason']})" if rollout.get("state_reason") else ""),
    ]
    if rollout.get("start_at") and not rollout.get("started_at"):
        lines.append(f"  starts at {rollout['start_at']}"
                     + ("" if rollout["state"] == "scheduled" else " once started"))
    if rollout.get("windows"):
        lines.append(f"  maintenance windows: {'; '.join(rollout['windows'])}")
    for group in rollout.get("label_windows") or []:
        labels = ",".join(f"{k}={v}" for k, v in group["labels"].items())
        lines.append(f"  maintenance windows for {labels}: {'; '.join(group['windows'])}")
    for wave in rollout.get("waves", []):
        # The server's state groups (ota.models.RolloutDevice): never a copy of them here.
        committed, failed, in_flight = wave.get("committed", 0), wave.get("failed", 0), wave.get("in_flight", 0)
        spec = wave.get("spec", {})
        what = (
            f"{spec['percent']}%" if "percent" in spec else f"+{spec['count']}" if "count" in spec
            else f"{len(spec.get('devices', []))} named"
        )
        number = wave.get("number", wave["index"] + 1)
        name = wave.get("name") or f"wave {number}"
        lines.append(
            f"  {number:>2} {name[:12]:<12} {what:>8} {wave['state']:<8} "
            f"{_bar(committed, failed, in_flight, wave['size'])} "
            f"{committed}/{wave['size']} ok  {failed} failed  {in_flight} updating"
            + (f"  {wave['unreachable']} unreachable" if wave.get("unreachable") else "")
            + (f"  {wave['waiting_for_window']} waiting for a window" if wave.get("waiting_for_window") else "")
        )
    waiting = rollout.get("waiting_for_window") or {}
    if waiting.get("devices"):
        n = waiting["devices"]
        lines.append(f"  {n} {'device' if n == 1 else 'devices'} downloaded and waiting for a maintenance window: "
                     f"next opening {waiting.get('next_opening')}"
                     + (f", last {waiting['last_opening']}" if waiting.get("last_opening") != waiting.get("next_opening")
                        else ""))
    incompatible = rollout.get("incompatible") or []
    if incompatible:
        lines.append(f"  {len(incompatible)} targeted devices have no artifact for their hardware "
                     f"(e.g. {incompatible[0]['device']}: {incompatible[0]['hardware']})")
    delivery = rollout.get("delivery") or {}
    if delivery.get("delta_devices") or delivery.get("full_devices"):
        lines.append(f"  delivery: {delivery.get('delta_devices', 0)} by delta, "
                     f"{delivery.get('full_devices', 0)} in full; "
                     f"{_size(delivery.get('bytes_downloaded', 0))} downloaded, "
                     f"{_size(delivery.get('bytes_saved', 0))} saved by deltas")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _print(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


# --- commands -----------------------------------------------------------------------------------


def cmd_create(args) -> int:
    if args.watch and not args.start:
        eprint("fleetctl rollout create: --watch needs --start (a created rollout does not move until started)")
        return EXIT_USAGE
    try:
        body = build_definition(args)
    except UsageError as exc:
        eprint(f"fleetctl rollout create: {exc}")
        return EXIT_USAGE
    client = client_from_args(args)
    rollout = client.post(f"{API}/rollouts/", body)
    if args.start:
        rollout = client.post(f"{API}/rollouts/{rollout['id']}/start", {})
    print(f"created rollout {rollout['id']} ({rollout['state']})", file=sys.stderr)
    if args.watch:
        return _watch(client, rollout["id"], rollout, interval=args.interval)
    if args.json:
        print_json(rollout)
    else:
        _print(render(rollout))
    return 0


def cmd_action(args) -> int:

    body = {"reason": args.reason} if getattr(args, "reason", None) else {}
    rollout = client_from_args(args).post(f"{API}/rollouts/{args.id}/{args.rollout_command}", body)
    if args.json:
        print_json(rollout)
    else:
        _print(render(rollout))
        extra = f", {rollout['retried']} devices queued or sent their directive again" if "retried" in rollout else ""
        print(f"rollout {args.id}: {args.rollout_command} done, now {rollout['state']}{extra}", file=sys.stderr)
    return 0


# How long --watch rides out a server that cannot be reached or answers 5xx (a restart, a deploy).
WATCH_RETRY_SECONDS = 60.0


def _get_retrying(client, path: str, *, patience: float = WATCH_RETRY_SECONDS):
    """GET, retrying connection errors and 5xx with exponential backoff for up to `patience`
    seconds; a 4xx (or running out of patience) is raised as usual."""
    deadline = time.monotonic() + patience
    delay = 0.5
    while True:
        try:
            return client.get(path)
        except ApiError as exc:
            if exc.is_client_error or time.monotonic() + delay > deadline:
                raise
            eprint(f"fleetctl: {exc}; retrying in {delay:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def cmd_status(args) -> int:
    client = client_from_args(args)
    path = f"{API}/rollouts/{args.id}/"
    rollout = client.get(path)
    if not args.watch:
        if args.json:
            print_json(rollout)
        else:
            _print(render(rollout))
        return 0
    return _watch(client, args.id, rollout, interval=args.interval)


def _watch(client, rollout_id: int, rollout: dict, *, interval: float) -> int:
    """Redraw the rollout until it completes (0) or stops otherwise (1, with the reason)."""
    path = f"{API}/rollouts/{rollout_id}/"
    tty = sys.stdout.isatty()
    drawn = 0
    last = None
    scheduled = rollout["state"] == "scheduled"
    while True:
        lines = render(rollout)
        if tty:
            # Redraw in place: move up over the previous frame and clear to the end of screen.
            sys.stdout.write(("\x1b[%dF" % drawn if drawn else "") + "\x1b[J" + "\n".join(lines) + "\n")
            sys.stdout.flush()
            drawn = len(lines)
        elif lines != last:
            _print([time.strftime("%H:%M:%S ") + lines[0], *lines[1:]])
        last = lines
        state = rollout["state"]
        if state == COMPLETED:
            return 0
        scheduled = scheduled or state == "scheduled"
        if state in STOPPED or (scheduled and state == "created"):  # created again: its scheduled start failed
            # Paused (by a gate or a person) needs an operator; aborted and rolled back are over.
            eprint(f"fleetctl: rollout {rollout_id} is {state}: {rollout.get('state_reason') or 'no reason given'}")
            return EXIT_INVALID
        time.sleep(interval)
        rollout = _get_retrying(client, path)


def cmd_list(args) -> int:

    params = {k: v for k, v in (("state", args.state), ("model", args.model)) if v}
    rows = client_from_args(args).get_all(f"{API}/rollouts/", params)
    if args.json:
        print_json(rows)
        return 0
    print_table(rows, [("id", "ID"), ("model", "MODEL"), ("version", "VERSION"), ("state", "STATE"),
                       ("current_wave", "WAVE"), ("created_by", "CREATED BY"), ("created_at", "CREATED")])
    return 0


def add_parser(subparsers) -> None:
    """Register the `rollout` subcommand group on fleetctl's top-level subparsers."""

    common = common_options()
    rollout = subparsers.add_parser("rollout", help="create, drive and watch staged rollouts",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", parser_class=Parser)
    sub.required = True

    create = sub.add_parser("create", parents=[common], help="define a rollout (and --start it)")
    create.add_argument("--model")
    create.add_argument("--version", dest="version")
    create.add_argument("--label", action="append", default=[], metavar="K=V", help="target devices with this label")
    create.add_argument("--hardware", action="append", default=[], metavar="ID", help="target this hardware id")
    create.add_argument("--device", action="append", default=[], metavar="ID", help="target this device explicitly")
    create.add_argument("--wave", action="append", default=[], metavar="SPEC",
                        help="one step of the wave plan, in order: N%% (cumulative share of the target), +N (N more "
                        "devices), 'canary N', 'NAME: ID, ID' (those devices) or 'NAME: N%%' / 'NAME: +N'")
    create.add_argument("--min-healthy", type=float, metavar="PERCENT",
                        help="success gate: share of a wave committed (healthy after activation)")
    create.add_argument("--min-reports", type=int, metavar="N", help="failure gate: reports before judging")
    create.add_argument("--max-failed-percent", type=float, metavar="PERCENT", help="failure gate: share failed")
    create.add_argument("--max-failures", type=int, metavar="K", help="failure gate: count failed")
    create.add_argument("--soak", type=int, metavar="SECONDS", help="hold each passed wave this long")
    create.add_argument("--rate", type=int, metavar="N", help="at most N directives per minute")
    create.add_argument("--gates", metavar="JSON", help="gates as JSON (merged under the flags above)")
    create.add_argument("--abort-policy", choices=("pause", "abort", "revert"))
    create.add_argument("--requires-approval", action="store_true")
    create.add_argument("--follow", action="store_true",
                        help="after the last wave, keep giving the release to devices that start matching the target")
    create.add_argument("--name")
    create.add_argument("--window", action="append", default=[], metavar="WINDOW",
                        help="maintenance window, repeatable: [DAYS] HH:MM-HH:MM [ZONE], e.g. 'Mon-Fri 02:00-04:00 "
                        "Europe/Berlin' (no zone: the device's local time); devices activate only while one is open")
    create.add_argument("--label-window", nargs=2, action="append", default=[], metavar=("K=V[,K=V]", "WINDOW"),
                        help="a maintenance window for the devices with these labels (instead of --window); "
                        "repeatable, the first matching label group wins")
    create.add_argument("--start-at", metavar="TIME",
                        help="RFC 3339 time (e.g. 2026-12-24T02:00:00Z): with --start the rollout is scheduled and "
                        "starts then")
    create.add_argument("--file", metavar="JSON_FILE", help="the whole definition as JSON; flags override it")
    create.add_argument("--start", action="store_true", help="start it right away")
    create.add_argument("--watch", action="store_true",
                        help="with --start: follow it like `status --watch` (exit 0 completed, 1 stopped)")
    create.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_create)

    status = sub.add_parser("status", parents=[common], help="per-wave progress; --watch follows it live")
    status.add_argument("id", type=int)
    status.add_argument("--watch", action="store_true",
                        help="redraw until the rollout ends; exit 0 if completed, 1 (with the reason) if it is "
                        "paused, aborted or rolled back")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    listing = sub.add_parser("list", parents=[common], help="list rollouts")
    listing.add_argument("--state", help="comma-separated states, e.g. running,paused")
    listing.add_argument("--model")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    for name, summary in ACTIONS.items():
        action = sub.add_parser(name, parents=[common], help=summary)
        action.add_argument("id", type=int)
        action.add_argument("--reason", help="recorded in the audit log")
        action.add_argument("--json", action="store_true")
        action.set_defaults(func=cmd_action)
