"""A rollout definition as the API, the UI and the CLI give it: target, waves and gates,
checked field by field so every entry point reports the same messages."""

from __future__ import annotations

import difflib
import re

from django.core.exceptions import ValidationError

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


def _number(value, where: str, errors: dict, *, lo: float, hi: float | None, integer: bool = False):
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok:
        errors[where] = f"must be {'an integer' if integer else 'a number'}, got {value!r}"
        return None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        errors[where] = f"must be {bound}, got {value}"
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
    for section, fields in (
        ("success", {"min_healthy_percent": (0, 100, False), "min_reachable_percent": (0, 100, False)}),
        ("failure", {"min_reports": (1, None, True), "max_failed_percent": (0, 100, False), "max_failures": (1, None, True)}),
        ("timeouts", {"delivery_seconds": (1, None, True), "download_seconds": (1, None, True),
                      "activate_seconds": (1, None, True), "trial_seconds": (1, None, True)}),
        ("health", {"max_error_rate": (0, 1, False), "max_latency_ms_p95": (0, None, False)}),
    ):
        given = raw.get(section)
        if given is None:
            continue
        if not isinstance(given, dict):
            errors[f"{where}.{section}"] = "must be an object"
            continue
        for name, value in given.items():
            if name not in fields:
                errors[f"{where}.{section}.{name}"] = f"unknown setting; use one of {', '.join(fields)}"
                continue
            lo, hi, integer = fields[name]
            if value is None and name in ("max_failures", "max_error_rate", "max_latency_ms_p95"):
                out[section][name] = None
                continue
            checked = _number(value, f"{where}.{section}.{name}", errors, lo=lo, hi=hi, integer=integer)
            if checked is not None:
                out[section][name] = checked
    if "soak_seconds" in raw:
        value = _number(raw["soak_seconds"], f"{where}.soak_seconds", errors, lo=0, hi=None, integer=True)
        if value is not None:
            out["soak_seconds"] = value
    if "rate_per_minute" in raw and raw["rate_per_minute"] is not None:
        value = _number(raw["rate_per_minute"], f"{where}.rate_per_minute", errors, lo=1, hi=None, integer=True)
        if value is not None:
            out["rate_per_minute"] = value
    if errors:
        raise ValidationError(errors)
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


def wave_describe(spec: dict) -> str:
    """A wave spec for people: "canary: 2 devices", "up to 25 % of the target", "5 more devices"."""
    if "devices" in spec:
        body = f"{len(spec['devices'])} listed devices"
    elif "percent" in spec:
        body = f"up to {spec['percent']} % of the target"
    elif spec.get("name") == "canary" and "count" in spec:
        return f"canary: {spec['count']} devices"
    else:
        body = f"{spec['count']} more devices"
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


def waves_validate(raw) -> list[dict]:
    """Check a wave plan (see wave_plan_parse for the accepted forms) and normalise each wave."""
    raw = wave_plan_parse(raw)
    if not isinstance(raw, list) or not raw:
        raise ValidationError({"waves": "must be a non-empty list of waves, e.g. [{\"devices\": [...]}, {\"percent\": 100}]"})
    errors: dict[str, str] = {}
    out = []
    last_percent = 0.0
    seen_devices: set[str] = set()
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
        spec: dict = {"name": str(wave.get("name") or "")}
        if kind == "devices":
            devices = wave["devices"]
            if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
                errors[f"{where}.devices"] = "must be a non-empty list of device ids"
                continue
            dupes = sorted(set(d for d in devices if d in seen_devices or devices.count(d) > 1))
            if dupes:
                errors[f"{where}.devices"] = f"devices listed twice: {', '.join(dupes)}"
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
            value = _number(wave["count"], f"{where}.count", errors, lo=1, hi=None, integer=True)
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
    if not isinstance(hardware, list) or not all(isinstance(h, str) for h in hardware):
        errors["target.hardware"] = "must be a list of hardware ids"
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        errors["target.devices"] = "must be a list of device ids"
    if errors:
        raise ValidationError(errors)
    if not labels and not hardware and not devices:
        raise ValidationError({"target": "is empty: give labels, hardware and/or devices (an empty target would mean the whole fleet)"})
    return {"labels": labels, "hardware": hardware, "devices": devices}
