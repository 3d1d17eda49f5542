"""A rollout definition as the API, the UI and the CLI give it: target, waves, gates, maintenance
windows and a start time, checked field by field so every entry point reports the same messages."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from agent.windows import MAX_WINDOW_CHARS, MAX_WINDOWS, WindowError, parse_windows
from ota.fleet.parsing import validate_labels
from registry.limits import bad_character, bad_character_message

# The maxima of a rollout definition (README.md, "Limits on input"). Beyond them a definition is
# refused at every entry (API, web wizard, CLI); the engine pauses a stored one that still breaks
# them (ota/rollouts/engine.py).
MAX_WAVES = 100
MAX_WAVE_NAME = 64  # characters
# Device ids listed explicitly: in one wave, and in the whole definition (target.devices and every
# wave). A JSON body of DATA_UPLOAD_MAX_MEMORY_SIZE (2 MB) holds about 150,000 short ids.
MAX_WAVE_DEVICES = 50_000
MAX_LISTED_DEVICES = 100_000
MAX_DEVICE_ID = 64  # ota.models.Device.id
MAX_TARGET_HARDWARE = 100
# Soak time and every phase timeout: 30 days. Beyond, a timestamp plus the duration leaves the
# datetime range (10^11 s made every engine tick raise OverflowError).
MAX_WAIT_SECONDS = 30 * 24 * 3600
# Counts of devices (count waves, failure thresholds) and the dispatch rate.
MAX_COUNT = 1_000_000
MAX_RATE_PER_MINUTE = 1_000_000
MAX_LATENCY_MS = 3_600_000
# Maintenance windows: at most MAX_WINDOWS (16) of at most MAX_WINDOW_CHARS (100) characters per
# list (agent.windows: what every agent takes), and at most MAX_LABEL_WINDOW_GROUPS label groups.
MAX_LABEL_WINDOW_GROUPS = 16
# How far ahead a rollout may be scheduled (start_at).
MAX_START_AHEAD = timedelta(days=90)
# How many ids an error message lists before "... and N more".
LISTED_IN_ERRORS = 20

DEFAULT_GATES = {
    # min_healthy_percent of the reachable devices committed, and at least min_reachable_percent
    # of the wave reachable (a device that never picks up its directive within
    # timeouts.delivery_seconds is unreachable: not counted either way).
    "success": {"min_healthy_percent": 100, "min_reachable_percent": 50},
    "failure": {"min_reports": 1, "max_failed_percent": 20, "max_failures": None},
    "soak_seconds": 0,
    "rate_per_minute": None,
    "timeouts": {"delivery_seconds": 3600, "download_seconds": 1800, "activate_seconds": 600, "trial_seconds": 900},
    # Fleet-side model health: a device whose trial figures break these counts as failed even
    # though its own (looser or unset) limits let it commit. Off unless given.
    "health": {"max_error_rate": None, "max_latency_ms_p95": None},
}


def ids_listing(ids, *, limit: int = LISTED_IN_ERRORS) -> str:
    """'a, b, c' or, past `limit` ids, the first ones and '... and N more': a refusal of a
    75,000-id list stays a short message."""
    ids = list(ids)
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown} ... and {len(ids) - limit} more"


def _number(value, where: str, errors: dict, *, lo: float, hi: float | None, integer: bool = False,
            cap: float | None = None):
    """`value` if a number (an integer) in lo..hi, else None with the message in `errors`. `cap`:
    a maximum of the limits on input (README.md), said as such when broken."""
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, float) and not math.isfinite(value):
        kind_ok = False
    if isinstance(value, bool) or not kind_ok:
        errors[where] = f"must be {'an integer' if integer else 'a number'}, got {value!r}"
        return None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        errors[where] = f"must be {bound}, got {value}"
        return None
    if cap is not None and value > cap:
        errors[where] = f"must be at most {cap} (the limit on input), got {value}"
        return None
    return value


def gates_normalise(raw, *, where: str = "gates", base: dict | None = None) -> dict:
    """Merge `raw` over `base` (defaults) and check every threshold's type and range."""
    base = base or DEFAULT_GATES
    errors: dict[str, str] = {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValidationError({where: "must be an object"})
    known = {"success", "failure", "soak_seconds", "rate_per_minute", "timeouts", "health"}
    for key in raw:
        if key not in known:
            errors[f"{where}.{key}"] = f"unknown gate setting; use one of {', '.join(sorted(known))}"
    out = {
        "success": dict(base["success"]),
        "failure": dict(base["failure"]),
        "soak_seconds": base["soak_seconds"],
        "rate_per_minute": base["rate_per_minute"],
        "timeouts": dict(base["timeouts"]),
        "health": dict(base.get("health") or DEFAULT_GATES["health"]),
    }
    wait = (1, None, True, MAX_WAIT_SECONDS)
    for section, fields in (
        ("success", {"min_healthy_percent": (0, 100, False, None), "min_reachable_percent": (0, 100, False, None)}),
        ("failure", {"min_reports": (1, None, True, MAX_COUNT), "max_failed_percent": (0, 100, False, None),
                     "max_failures": (1, None, True, MAX_COUNT)}),
        ("timeouts", {"delivery_seconds": wait, "download_seconds": wait, "activate_seconds": wait, "trial_seconds": wait}),
        ("health", {"max_error_rate": (0, 1, False, None), "max_latency_ms_p95": (0, None, False, MAX_LATENCY_MS)}),
    ):
        given = raw.get(section)
        if given is None:
            continue
        if not isinstance(given, dict):
            errors[f"{where}.{section}"] = "must be an object"
            continue
        for name, value in given.items():
            if section == "health" and name == "control":
                out["health"]["control"] = _control_normalise(value, f"{where}.health.control", errors)
                continue
            if name not in fields:
                names = [*fields, "control"] if section == "health" else fields
                errors[f"{where}.{section}.{name}"] = f"unknown setting; use one of {', '.join(names)}"
                continue
            lo, hi, integer, cap = fields[name]
            if value is None and name in ("max_failures", "max_error_rate", "max_latency_ms_p95"):
                out[section][name] = None
                continue
            checked = _number(value, f"{where}.{section}.{name}", errors, lo=lo, hi=hi, integer=integer, cap=cap)
            if checked is not None:
                out[section][name] = checked
    if "soak_seconds" in raw:
        value = _number(raw["soak_seconds"], f"{where}.soak_seconds", errors, lo=0, hi=None, integer=True,
                        cap=MAX_WAIT_SECONDS)
        if value is not None:
            out["soak_seconds"] = value
    if "rate_per_minute" in raw and raw["rate_per_minute"] is not None:
        value = _number(raw["rate_per_minute"], f"{where}.rate_per_minute", errors, lo=1, hi=None, integer=True,
                        cap=MAX_RATE_PER_MINUTE)
        if value is not None:
            out["rate_per_minute"] = value
    if errors:
        raise ValidationError(errors)
    return out


# gates.health.control: the control-group gates (ota/rollouts/comparison.py holds their defaults).
# Each entry: (lo, hi, integer); a gate given as false is switched off.
CONTROL_FIELDS = {
    "min_devices": (2, MAX_COUNT, True),
    "min_requests": (1, 1_000_000_000, True),
    "wait_seconds": (1, MAX_WAIT_SECONDS, True),
    "alpha": (0.0001, 0.5, False),
}
CONTROL_GATES = {
    "latency": {"max_p50_ratio": (1, 100, False), "max_p95_ratio": (1, 100, False)},
    "errors": {"max_increase": (0, 1, False)},
    "drift": {"max_psi": (0, 100, False), "min_outputs": (1, 1_000_000_000, True)},
}


def _control_normalise(value, where: str, errors: dict):
    """false (off), or an object of CONTROL_FIELDS and CONTROL_GATES settings, each checked."""
    if value is False:
        return False
    if not isinstance(value, dict):
        errors[where] = "must be false (off) or an object"
        return None
    out: dict = {}
    for name, given in value.items():
        if name in CONTROL_FIELDS:
            lo, hi, integer = CONTROL_FIELDS[name]
            checked = _number(given, f"{where}.{name}", errors, lo=lo, hi=hi, integer=integer)
            if checked is not None:
                out[name] = checked
        elif name in CONTROL_GATES:
            if given is False:
                out[name] = False
                continue
            if not isinstance(given, dict):
                errors[f"{where}.{name}"] = "must be false (off) or an object"
                continue
            out[name] = {}
            for key, setting in given.items():
                if key not in CONTROL_GATES[name]:
                    errors[f"{where}.{name}.{key}"] = f"unknown setting; use one of {', '.join(CONTROL_GATES[name])}"
                    continue
                lo, hi, integer = CONTROL_GATES[name][key]
                checked = _number(setting, f"{where}.{name}.{key}", errors, lo=lo, hi=hi, integer=integer)
                if checked is not None:
                    out[name][key] = checked
        else:
            errors[f"{where}.{name}"] = f"unknown setting; use one of {', '.join([*CONTROL_FIELDS, *CONTROL_GATES])}"
    return out


# --- the wave plan: one syntax for the web wizard, fleetctl and the API -----------------------

WAVE_PLAN_HELP = (
    "a wave plan is steps separated by → (or ->, ;, a new line), each one of: N% (the cumulative share "
    "of the target reached by that wave), +N (N more devices), canary N (a first wave of N devices), "
    "NAME: id, id (those devices), or NAME: N% / NAME: +N (a named wave); e.g. canary 2 → 25% → 100%"
)
_STEP_SPLIT = re.compile(r"\s*(?:→|->|;|\n)\s*")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%$")
_COUNT = re.compile(r"^\+\s*(\d+)$")
_CANARY = re.compile(r"^canary\s+(\d+)$", re.IGNORECASE)
_WORD_NUMBER = re.compile(r"^([A-Za-z][\w-]*)\s+(\d+)%?$")
_NAME = re.compile(r"^[A-Za-z][\w .-]{0,39}$")


def wave_plan_steps(text: str) -> list[str]:
    return [step for step in _STEP_SPLIT.split(text.strip()) if step]


def wave_step_parse(step: str, *, number: int) -> dict:
    """One step of a wave plan -> a wave spec ({"percent": 25}, {"count": 5}, {"name", "devices"}).
    `number` (from 1) is the wave's place in the plan, for the message of a step not understood."""
    text = step.strip()
    name, colon, body = text.partition(":")
    if colon:
        name, body = name.strip(), body.strip()
        if not _NAME.match(name):
            raise ValueError(f"wave {number}: {name!r} is not a wave name (letters, digits, ' ', '.', '_', '-')")
    else:
        name, body = "", text
    if match := _PERCENT.match(body):
        value = float(match.group(1))
        spec: dict = {"percent": int(value) if value.is_integer() else value}
    elif match := _COUNT.match(body):
        spec = {"count": int(match.group(1))}
    elif not colon and (match := _CANARY.match(body)):
        spec = {"name": "canary", "count": int(match.group(1))}
    elif body.isdigit():
        raise ValueError(
            f"wave {number}: {step.strip()!r} is ambiguous: write {body}% for a share of the target "
            f"or +{body} for {body} more devices"
        )
    elif colon and body:
        spec = {"devices": [d for d in re.split(r"[\s,]+", body) if d]}
    else:
        hint = ""
        word = _WORD_NUMBER.match(body)
        if word and difflib.get_close_matches(word.group(1).lower(), ["canary"], cutoff=0.6):
            hint = f" Did you mean 'canary {word.group(2)}'?"
        elif word:
            hint = f" Name a wave as '{word.group(1)}: +{word.group(2)}'."
        raise ValueError(f"wave {number}: {step.strip()!r} is not understood.{hint} Use N%, +N, canary N or NAME: ...")
    if name:
        spec["name"] = name
    return spec


def wave_plan_parse(plan) -> list:
    """A wave plan as text ("canary 2 → 25% → 100%") or a list whose items are steps (text) or
    wave objects, to a list of wave objects for waves_validate. ValidationError on the "waves"
    field for a step not understood, naming the step and saying what was meant where it can."""
    if isinstance(plan, str):
        plan = wave_plan_steps(plan)
        if not plan:
            raise ValidationError({"waves": f"is empty; {WAVE_PLAN_HELP}"})
    if not isinstance(plan, list):
        return plan  # waves_validate says what is wrong with it
    waves_count_check(plan)
    out, errors = [], []
    for number, item in enumerate(plan, start=1):
        if isinstance(item, str):
            try:
                out.append(wave_step_parse(item, number=number))
            except ValueError as exc:
                errors.append(str(exc))
        else:
            out.append(item)
    if errors:
        raise ValidationError({"waves": "; ".join(errors)})
    return out


def devices_count(n: int, adjective: str = "") -> str:
    """"1 device", "2 listed devices": the audit log and the UI are read by people."""
    return " ".join(filter(None, (str(n), adjective, "device" if n == 1 else "devices")))


def wave_describe(spec: dict) -> str:
    """A wave spec for people: "canary: 2 devices", "up to 25 % of the target", "5 more devices"."""
    if "devices" in spec:
        body = devices_count(len(spec["devices"]), "listed")
    elif "percent" in spec:
        body = f"up to {spec['percent']} % of the target"
    elif spec.get("name") == "canary" and "count" in spec:
        return f"canary: {devices_count(spec['count'])}"
    else:
        body = devices_count(spec["count"], "more")
    return f"{spec['name']}: {body}" if spec.get("name") else body


def gates_with_defaults(gates: dict) -> dict:
    """A wave's stored gates with every setting present: a rollout created before a setting
    existed runs with that setting's default."""
    out = {key: (dict(value) if isinstance(value, dict) else value) for key, value in DEFAULT_GATES.items()}
    for key, value in (gates or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def waves_count_check(plan: list) -> None:
    if len(plan) > MAX_WAVES:
        raise ValidationError({"waves": f"has {len(plan)} waves; at most {MAX_WAVES} are allowed"})


def wave_name_check(name, *, where: str) -> str:
    """A wave's name: a string of at most MAX_WAVE_NAME characters, no control characters."""
    if name is None:
        return ""
    if not isinstance(name, str):
        raise ValueError(f"{where} must be a string, got {type(name).__name__}")
    if len(name) > MAX_WAVE_NAME:
        raise ValueError(f"{where} is {len(name)} characters long; at most {MAX_WAVE_NAME} are allowed")
    found = bad_character(name, name=True)
    if found:
        raise ValueError(bad_character_message(where, found))
    return name


def device_list_check(devices, *, maximum: int) -> list[str]:
    """A list of device ids, in linear time (75,000 ids: milliseconds): ValueError saying what is
    wrong, naming at most LISTED_IN_ERRORS ids. Empty lists pass; the caller decides on those."""
    if not isinstance(devices, list):
        raise ValueError("must be a list of device ids")
    if len(devices) > maximum:
        raise ValueError(f"lists {len(devices)} devices; at most {maximum} are allowed")
    bad = [d for d in devices if not isinstance(d, str) or not d or len(d) > MAX_DEVICE_ID]
    if bad:
        raise ValueError(
            f"must hold device ids (strings of 1 to {MAX_DEVICE_ID} characters), not "
            f"{ids_listing([repr(d)[:MAX_DEVICE_ID + 2] for d in bad])}"
        )
    return devices


def waves_validate(raw) -> list[dict]:
    """Check a wave plan (see wave_plan_parse for the accepted forms) and normalise each wave."""
    raw = wave_plan_parse(raw)
    if not isinstance(raw, list) or not raw:
        raise ValidationError({"waves": "must be a non-empty list of waves, e.g. [{\"devices\": [...]}, {\"percent\": 100}]"})
    errors: dict[str, str] = {}
    out = []
    last_percent = 0.0
    seen_devices: set[str] = set()
    listed = sum(len(w["devices"]) for w in raw if isinstance(w, dict) and isinstance(w.get("devices"), list))
    if listed > MAX_LISTED_DEVICES:
        raise ValidationError(
            {"waves": f"list {listed} devices in all; at most {MAX_LISTED_DEVICES} are allowed (use percent or count waves)"}
        )
    for i, wave in enumerate(raw):
        where = f"waves[{i}]"
        if not isinstance(wave, dict):
            errors[where] = "must be an object with one of: devices, percent, count"
            continue
        kinds = [k for k in ("devices", "percent", "count") if k in wave]
        extra = set(wave) - {"devices", "percent", "count", "gates", "name"}
        if extra:
            errors[where] = f"unknown keys {sorted(extra)}; a wave has one of devices/percent/count, plus optional name and gates"
            continue
        if len(kinds) != 1:
            errors[where] = "must have exactly one of: devices, percent, count"
            continue
        kind = kinds[0]
        try:
            spec: dict = {"name": wave_name_check(wave.get("name"), where="the name")}
        except ValueError as exc:
            errors[f"{where}.name"] = str(exc)
            continue
        if kind == "devices":
            devices = wave["devices"]
            try:
                device_list_check(devices, maximum=MAX_WAVE_DEVICES)
            except ValueError as exc:
                errors[f"{where}.devices"] = str(exc)
                continue
            if not devices:
                errors[f"{where}.devices"] = "must be a non-empty list of device ids"
                continue
            # Counted once (a Counter), not devices.count(d) per id: that was quadratic.
            dupes = sorted(d for d, n in Counter(devices).items() if n > 1 or d in seen_devices)
            if dupes:
                errors[f"{where}.devices"] = f"devices listed twice: {ids_listing(dupes)}"
                continue
            seen_devices.update(devices)
            spec["devices"] = list(devices)
            spec["name"] = spec["name"] or ("canary" if i == 0 else f"wave {i + 1}")
        elif kind == "percent":
            value = _number(wave["percent"], f"{where}.percent", errors, lo=0, hi=100)
            if value is None:
                continue
            if value <= 0:
                errors[f"{where}.percent"] = "must be above 0"
                continue
            if value <= last_percent:
                errors[f"{where}.percent"] = (
                    f"percentages are cumulative and must increase: {value} follows {last_percent}"
                )
                continue
            last_percent = value
            spec["percent"] = value
        else:
            value = _number(wave["count"], f"{where}.count", errors, lo=1, hi=None, integer=True, cap=MAX_COUNT)
            if value is None:
                continue
            spec["count"] = value
        if "gates" in wave:
            spec["gates"] = wave["gates"]
        out.append(spec)
    if errors:
        raise ValidationError(errors)
    return out


def target_validate(raw) -> dict:
    if not isinstance(raw, dict):
        raise ValidationError({"target": "must be an object with labels, hardware and/or devices"})
    extra = set(raw) - {"labels", "hardware", "devices"}
    if extra:
        raise ValidationError({"target": f"unknown keys {sorted(extra)}; use labels, hardware, devices"})
    labels = raw.get("labels") or {}
    hardware = raw.get("hardware") or []
    devices = raw.get("devices") or []
    errors = {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        errors["target.labels"] = "must be an object of string label values"
    else:
        try:
            validate_labels(labels)  # the rule device labels are stored by: no other could match
        except ValueError as exc:
            errors["target.labels"] = str(exc)
    if not isinstance(hardware, list) or not all(isinstance(h, str) for h in hardware):
        errors["target.hardware"] = "must be a list of hardware ids"
    elif len(hardware) > MAX_TARGET_HARDWARE:
        errors["target.hardware"] = f"lists {len(hardware)} hardware ids; at most {MAX_TARGET_HARDWARE} are allowed"
    try:
        device_list_check(devices, maximum=MAX_LISTED_DEVICES)
    except ValueError as exc:
        errors["target.devices"] = str(exc)
    if errors:
        raise ValidationError(errors)
    if not labels and not hardware and not devices:
        raise ValidationError({"target": "is empty: give labels, hardware and/or devices (an empty target would mean the whole fleet)"})
    return {"labels": labels, "hardware": hardware, "devices": devices}


# --- maintenance windows and the start time -------------------------------------------------------

WINDOW_HELP = ("a window is [DAYS] HH:MM-HH:MM [ZONE], e.g. 'Mon-Fri 02:00-04:00 Europe/Berlin' "
               f"(at most {MAX_WINDOWS} windows of {MAX_WINDOW_CHARS} characters)")


def windows_validate(raw, *, where: str = "windows") -> list[str]:
    """A list of maintenance windows, parsed as every agent parses them (agent.windows), so a
    window the server accepts is one each agent understands. Returns the texts, stripped;
    ValidationError on `where` naming the first bad window. None or [] means no windows."""
    if raw is None:
        return []
    try:
        parsed = parse_windows(raw, where)
    except WindowError as exc:
        raise ValidationError({where: str(exc)}) from None
    return [w.text for w in parsed]


def label_windows_validate(raw) -> list[dict]:
    """`label_windows`: [{"labels": {...}, "windows": [...]}, ...], at most MAX_LABEL_WINDOW_GROUPS
    groups. A device whose labels include every label of a group (the first such group, in this
    order) gets that group's windows instead of the rollout's `windows`."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValidationError({"label_windows": 'must be a list of {"labels": {...}, "windows": [...]} groups'})
    if len(raw) > MAX_LABEL_WINDOW_GROUPS:
        raise ValidationError({"label_windows": f"lists {len(raw)} groups; at most {MAX_LABEL_WINDOW_GROUPS} are allowed"})
    errors: dict[str, str] = {}
    out = []
    for i, group in enumerate(raw):
        where = f"label_windows[{i}]"
        if not isinstance(group, dict) or set(group) != {"labels", "windows"}:
            errors[where] = 'must be an object with exactly "labels" and "windows"'
            continue
        labels = group["labels"]
        if not isinstance(labels, dict) or not labels:
            errors[f"{where}.labels"] = "must be a non-empty object of label values, e.g. {\"site\": \"berlin\"}"
            continue
        try:
            validate_labels(labels)
        except ValueError as exc:
            errors[f"{where}.labels"] = str(exc)
            continue
        try:
            windows = windows_validate(group["windows"], where=f"{where}.windows")
        except ValidationError as exc:
            errors.update({k: "; ".join(v) for k, v in exc.message_dict.items()})
            continue
        if not windows:
            errors[f"{where}.windows"] = f"must list at least one window; {WINDOW_HELP}"
            continue
        out.append({"labels": dict(labels), "windows": windows})
    if errors:
        raise ValidationError(errors)
    return out


def start_at_validate(raw, *, now: datetime | None = None) -> datetime | None:
    """`start_at`: an RFC 3339 time with its offset (or an aware datetime), after now and at most
    MAX_START_AHEAD ahead; None: no scheduled start."""
    if raw is None or raw == "":
        return None
    now = now or timezone.now()
    value = raw
    if isinstance(raw, str):
        try:
            value = parse_datetime(raw.strip())
        except ValueError:
            value = None
        if value is None:
            raise ValidationError({"start_at": f"{raw[:40]!r} is not a time; write RFC 3339, e.g. 2026-12-24T02:00:00Z"})
    if not isinstance(value, datetime):
        raise ValidationError({"start_at": "must be an RFC 3339 time such as 2026-12-24T02:00:00Z"})
    if timezone.is_naive(value):
        raise ValidationError({"start_at": "must say its offset from UTC (Z or +01:00), e.g. 2026-12-24T02:00:00Z"})
    if value <= now:
        raise ValidationError({"start_at": f"{value.isoformat()} is not in the future; leave start_at out to start at once"})
    if value > now + MAX_START_AHEAD:
        raise ValidationError({"start_at": f"is more than {MAX_START_AHEAD.days} days ahead"})
    return value


def device_windows(*, windows: list[str], label_windows: list[dict], labels: dict | None) -> list[str]:
    """The maintenance windows of one device: those of the first label group whose labels it has,
    else the rollout's windows (maybe none: it activates at once)."""
    labels = labels or {}
    for group in label_windows or ():
        if all(labels.get(k) == v for k, v in group["labels"].items()):
            return list(group["windows"])
    return list(windows or ())
