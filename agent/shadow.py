"""Shadow evaluation: before `current` is touched, run the candidate beside the model the box
runs now, on real inputs the application hands over, and refuse to activate a candidate that
disagrees with it (SHADOW_DISAGREES, with the figures). Optional per release: the health
contract's `shadow` key (signed in the release; README.md "Shadow evaluation"):

    "shadow": {"metric": "top1" | "mae",   # top-1 agreement of the output's last axis, or mean abs difference
               "min_agreement": 0.9,       # top1: refuse below this share of agreeing predictions
               "max_mae": 0.05,            # mae: refuse above this mean absolute difference
               "output": "NAME",           # the output compared (default: the first of each model)
               "min_samples": 20,          # fewer samples say too little: no verdict ...
               "required": false}          # ... unless required: then too few fails the precheck

The spool: the application drops samples into `<state_dir>/shadow/<model>/`, one `.npz` file
per sample (numpy.savez with one array per model input, by input name), writing each under a
temporary name and renaming it to `*.npz` so the agent never reads half a file. The agent keeps
the spool bounded ([shadow] spool_max_files newest files, none over spool_max_file_mb; older and
oversized ones are deleted) and reads the samples only in the evaluation child: they never leave
the box. Both models run in one child process under the precheck's limits (agent.precheck).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.precheck import PrecheckResult, child_answer, limit_resources
from agent.runtimes import RUNTIMES

METRICS = ("top1", "mae")
DEFAULTS = {"metric": "top1", "min_agreement": 0.9, "max_mae": None, "output": None, "min_samples": 20,
            "required": False}


def shadow_settings(contract: dict | None) -> dict | None:
    """The contract's `shadow` settings with their defaults, or None when it has none. ValueError
    names what is wrong (the registry refuses such a contract at upload with this message)."""
    raw = (contract or {}).get("shadow") if isinstance(contract, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("health.shadow must be an object")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"health.shadow has unknown keys: {', '.join(unknown)} (allowed: {', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **raw}
    if out["metric"] not in METRICS:
        raise ValueError(f"health.shadow.metric must be one of {', '.join(METRICS)}; got {out['metric']!r}")

    def number(name: str, lo: float, hi: float) -> None:
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise ValueError(f"health.shadow.{name} must be a number from {lo} to {hi}; got {value!r}")

    number("min_agreement", 0, 1)
    if out["metric"] == "mae":
        if out["max_mae"] is None:
            raise ValueError("health.shadow.metric \"mae\" needs max_mae")
        number("max_mae", 0, 1e9)
    if isinstance(out["min_samples"], bool) or not isinstance(out["min_samples"], int) \
            or not 1 <= out["min_samples"] <= 10_000:
        raise ValueError(f"health.shadow.min_samples must be an integer from 1 to 10000; got {out['min_samples']!r}")
    if not isinstance(out["required"], bool):
        raise ValueError("health.shadow.required must be true or false")
    if out["output"] is not None and (not isinstance(out["output"], str) or not 0 < len(out["output"]) <= 200):
        raise ValueError("health.shadow.output must be an output name")
    return out


def spool_dir(state_dir: Path, model: str) -> Path:
    return state_dir / "shadow" / model


def spool_samples(directory: Path, *, max_files: int, max_file_bytes: int) -> list[Path]:
    """The spool's samples, newest first, after trimming it to its bounds: files over
    max_file_bytes and all but the newest max_files are deleted (the app keeps adding)."""
    try:
        entries = [p for p in directory.iterdir() if p.suffix == ".npz" and p.is_file()]
    except FileNotFoundError:
        return []
    sized = []
    for path in entries:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # the app replaced it meanwhile
        if stat.st_size > max_file_bytes:
            path.unlink(missing_ok=True)
            continue
        sized.append((stat.st_mtime, path))
    sized.sort(reverse=True)
    for _, path in sized[max_files:]:
        path.unlink(missing_ok=True)
    return [path for _, path in sized[:max_files]]


@dataclass(frozen=True)
class ShadowResult:
    ok: bool
    detail: str
    figures: dict = field(default_factory=dict)
    disagrees: bool = False  # refused on the figures (SHADOW_DISAGREES), not for want of them
    interrupted: bool = False


def run_shadow(*, candidate: Path, candidate_format: str, current: Path, current_format: str, settings: dict,
               samples: list[Path], timeout: float, memory_mb: int, stop=None) -> ShadowResult:
    """Judge the candidate against the current model on `samples` (see the module doc)."""
    if len(samples) < settings["min_samples"]:
        figures = {"samples": len(samples), "min_samples": settings["min_samples"]}
        why = f"shadow evaluation needs {settings['min_samples']} samples; the spool has {len(samples)}"
        if settings["required"]:
            return ShadowResult(False, why, figures)
        return ShadowResult(True, f"{why}: not judged", {**figures, "judged": False})
    answer = child_answer("agent.shadow", {
        "candidate": str(candidate), "candidate_format": candidate_format,
        "current": str(current), "current_format": current_format,
        "samples": [str(p) for p in samples], "metric": settings["metric"], "output": settings["output"],
        "memory_mb": memory_mb, "cpu_seconds": int(timeout) + 1,
    }, timeout=timeout, memory_mb=memory_mb, stop=stop, what="shadow evaluation")
    if isinstance(answer, PrecheckResult):
        return ShadowResult(False, answer.detail, interrupted=answer.interrupted)
    if not answer.get("ok"):
        return ShadowResult(False, f"shadow evaluation failed: {answer.get('detail')}", answer)
    figures = {k: answer[k] for k in ("samples", "skipped", "metric", "agreement", "mae", "latency_ms") if k in answer}
    figures["judged"] = figures.get("samples", 0) >= settings["min_samples"]
    if not figures["judged"]:
        why = (f"only {figures.get('samples', 0)} of {len(samples)} samples fit both models "
               f"({answer.get('skipped_reason')}); {settings['min_samples']} needed")
        return ShadowResult(not settings["required"], why, figures)
    if settings["metric"] == "top1" and figures["agreement"] < settings["min_agreement"]:
        figures["min_agreement"] = settings["min_agreement"]
        return ShadowResult(False, f"the candidate agrees with the current model on {figures['agreement']:.1%} of "
                            f"{figures['samples']} real inputs (top-1), under min_agreement "
                            f"{settings['min_agreement']:.0%}", figures, disagrees=True)
    if settings["metric"] == "mae" and figures["mae"] > settings["max_mae"]:
        figures["max_mae"] = settings["max_mae"]
        return ShadowResult(False, f"the candidate's outputs differ from the current model's by {figures['mae']:.6g} "
                            f"on average over {figures['samples']} real inputs, over max_mae {settings['max_mae']}",
                            figures, disagrees=True)
    return ShadowResult(True, "shadow evaluation agrees", figures)


# --- child ------------------------------------------------------------------------------------


def _evaluate(request: dict) -> dict:
    import numpy as np

    try:
        candidate = RUNTIMES[request["candidate_format"]].load(request["candidate"])
        current = RUNTIMES[request["current_format"]].load(request["current"])
    except KeyError as exc:
        return {"ok": False, "detail": f"no runtime for format {exc}"}
    except ImportError:
        raise
    except Exception as exc:  # the runtimes raise several unrelated types
        return {"ok": False, "detail": f"a model does not load: {str(exc)[:300]}"}
    sessions = {"candidate": candidate, "current": current}
    picks = {}
    for role, session in sessions.items():
        names = session.output_names()
        wanted = request.get("output")
        if wanted is not None and wanted not in names:
            return {"ok": False, "detail": f"the {role} model has no output {wanted!r} ({names})"}
        picks[role] = names.index(wanted) if wanted is not None else 0
    inputs = {role: [name for name, _, _ in s.inputs()] for role, s in sessions.items()}
    scores, timings = [], {"candidate": [], "current": []}
    skipped, skipped_reason = 0, None
    for path in request["samples"]:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:  # a corrupt or vanished spool file
            skipped += 1
            skipped_reason = skipped_reason or f"{Path(path).name}: {str(exc)[:100]}"
            continue
        outputs = {}
        for role, session in sessions.items():
            missing = [n for n in inputs[role] if n not in arrays]
            if missing:
                skipped_reason = skipped_reason or f"{Path(path).name} lacks the {role} model's inputs {missing}"
                break
            try:
                t0 = time.perf_counter()
                result = session.run({n: arrays[n] for n in inputs[role]}, quiet=True)
                timings[role].append((time.perf_counter() - t0) * 1000)
            except Exception as exc:
                skipped_reason = skipped_reason or f"{Path(path).name}: the {role} model: {str(exc)[:100]}"
                break
            outputs[role] = np.asarray(result[picks[role]], dtype="float64")
        if len(outputs) != 2:
            skipped += 1
            continue
        a, b = outputs["candidate"], outputs["current"]
        if a.shape != b.shape:
            skipped += 1
            skipped_reason = skipped_reason or f"outputs of shapes {list(a.shape)} and {list(b.shape)}"
            continue
        if request["metric"] == "top1":
            scores.append(float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1))))
        else:
            scores.append(float(np.mean(np.abs(a - b))))
    answer = {"ok": True, "samples": len(scores), "skipped": skipped, "skipped_reason": skipped_reason,
              "metric": request["metric"],
              "latency_ms": {role: round(sorted(t)[len(t) // 2], 3) if t else None for role, t in timings.items()}}
    if scores:
        answer["agreement" if request["metric"] == "top1" else "mae"] = round(sum(scores) / len(scores), 6)
    return answer


def child_main() -> int:
    request = json.loads(sys.stdin.read())
    limit_resources(int(request["memory_mb"]), int(request["cpu_seconds"]))
    try:
        answer = _evaluate(request)
    except ImportError as exc:
        answer = {"ok": False, "detail": f"model runtime missing ({exc}): install modelfleet[runtime] on this box"}
    except MemoryError:
        answer = {"ok": False, "detail": f"the two models exceeded the {request['memory_mb']} MB memory limit"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
