"""The control-group gates: does a wave's new release behave worse than the previous release on
comparable devices over the same hours? Pure figures and decisions, no database (the groups are
gathered by ota/rollouts/control_group.py).

The device is the unit of comparison. Requests within one box are not independent (one box's
camera, load and temperature shape all its requests), so a test over pooled requests would call
a 3-device canary significantly worse on noise alone; tests over per-device figures do not, and
still catch a real regression once enough devices report. Three gates, each switchable:
  latency  p50 or p95 of the merged sketches, new / control, over its limit, AND a one-sided
           Welch test that per-device log p50 is higher on the new release (alpha)
  errors   one-sided Welch test that the per-device error rate on the new release exceeds the
           control's by more than max_increase (alpha)
  drift    population stability index of the output label shares, and of each numeric output
           (over the control's deciles), over max_psi
Each test is paired with an effect size (a ratio, a margin, a PSI) that must be exceeded too, so
alpha defaults to 0.05: noise rarely clears the effect size, and a real regression on a
3-device canary still reaches significance. Each gate needs min_devices devices with
min_requests requests in both groups; before that the verdict is "wait" (the engine fails the
wave after wait_seconds)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from scipy import stats

from agent.metrics.aggregate import (
    bucket_counts,
    empty_sketch_json,
    quantile,
    sketch_from_json,
    sketch_json_merge,
    window_json_merge,
)

DEFAULTS = {
    "min_devices": 3,
    "min_requests": 100,
    "wait_seconds": 3600,
    "alpha": 0.05,
    "latency": {"max_p50_ratio": 1.2, "max_p95_ratio": 1.25},
    "errors": {"max_increase": 0.01},
    "drift": {"max_psi": 0.2, "min_outputs": 200},
}
PSI_FLOOR = 1e-4  # a label one group never produced still has a share, so ln() stays finite


@dataclass(frozen=True)
class DeviceFigures:
    """One device's figures for the release it is in the group for, merged over the gate's hours."""

    device_id: str
    requests: float
    errors: float
    latency_ms: dict = field(default_factory=dict)  # sketch JSON (agent.metrics.aggregate)
    outputs: dict = field(default_factory=dict)
    output_values: dict = field(default_factory=dict)  # numeric output name -> sketch JSON

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def latency_p50(self) -> float | None:
        return quantile(sketch_from_json(self.latency_ms), 0.5) if self.latency_ms.get("count") else None


@dataclass
class Verdict:
    state: str  # pass, wait, fail or off
    reasons: list[str]
    figures: dict

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


def settings_with_defaults(control: dict | bool | None) -> dict | None:
    """gates.health.control as the engine uses it: None when switched off (false)."""
    if control is False:
        return None
    given = control if isinstance(control, dict) else {}
    out = {**DEFAULTS, **{k: v for k, v in given.items() if k not in ("latency", "errors", "drift")}}
    for gate in ("latency", "errors", "drift"):
        value = given.get(gate, {})
        out[gate] = None if value is False else {**DEFAULTS[gate], **(value or {})}
    return out


def _welch_greater(new: list[float], control: list[float]) -> tuple[float | None, float]:
    """(t statistic, p-value) of "new's mean is greater than control's" (Welch's t-test). Two
    groups without any spread cannot be tested: their means decide alone (t None, p 0 or 1)."""
    if len(new) < 2 or len(control) < 2:
        return None, 1.0
    with warnings.catch_warnings():
        # Near-identical figures (every box at 0 errors, say) make scipy warn of lost precision;
        # a NaN is what it can then return, and is handled below.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(new, control, equal_var=False, alternative="greater")
    p, t = float(result.pvalue), float(result.statistic)
    if math.isnan(p):
        return None, 0.0 if sum(new) / len(new) > sum(control) / len(control) else 1.0
    # Groups without spread give an infinite t, which JSON (the audit log) cannot hold.
    return (round(t, 4) if math.isfinite(t) else None), p


def _merged(group: list[DeviceFigures]) -> tuple[dict, dict, float, dict]:
    latency, outputs, requests, values = empty_sketch_json(), {}, 0.0, {}
    for d in group:
        sketch_json_merge(latency, d.latency_ms)
        for label, count in d.outputs.items():
            outputs[label] = outputs.get(label, 0) + count
        for name, sketch in d.output_values.items():
            sketch_json_merge(values.setdefault(name, empty_sketch_json()), sketch)
        requests += d.requests
    return latency, outputs, requests, values


def numeric_psi(new: dict, control: dict) -> float:
    """PSI of a numeric output (two merged sketches): the control's deciles cut both into ten
    intervals, and the shares of each group in them are compared as label shares are."""
    control_sketch = sketch_from_json(control)
    edges = sorted({quantile(control_sketch, q / 10) for q in range(1, 10)} - {None})
    as_table = {str(i): c for i, c in enumerate(bucket_counts(new, edges))}
    return psi(as_table, {str(i): c for i, c in enumerate(bucket_counts(control, edges))})


def psi(new: dict[str, float], control: dict[str, float]) -> float:
    """Population stability index of two label-count tables: sum of (p - q) ln(p / q) over labels."""
    labels = set(new) | set(control)
    n_total, c_total = sum(new.values()), sum(control.values())
    value = 0.0
    for label in labels:
        p = max(new.get(label, 0) / n_total, PSI_FLOOR)
        q = max(control.get(label, 0) / c_total, PSI_FLOOR)
        value += (p - q) * math.log(p / q)
    return value


def compare_groups(new: list[DeviceFigures], control: list[DeviceFigures], settings: dict) -> Verdict:
    """The control-group verdict for one wave: fail if any gate trips, wait while a gate lacks its
    samples, else pass. `settings`: settings_with_defaults' result."""
    min_requests = settings["min_requests"]
    new_ok = [d for d in new if d.requests >= min_requests]
    control_ok = [d for d in control if d.requests >= min_requests]
    need = settings["min_devices"]
    figures: dict = {
        "new_devices": len(new_ok), "control_devices": len(control_ok), "min_devices": need,
        "min_requests": min_requests, "alpha": settings["alpha"],
    }
    if len(new_ok) < need or len(control_ok) < need:
        return Verdict("wait", [
            f"{len(new_ok)} devices on the new release and {len(control_ok)} in the control group have "
            f"{min_requests}+ requests; {need} of each needed"], figures)
    alpha = settings["alpha"]
    new_latency, new_outputs, new_requests, new_values = _merged(new_ok)
    control_latency, control_outputs, control_requests, control_values = _merged(control_ok)
    figures.update(new_requests=new_requests, control_requests=control_requests)
    tripped, waiting, passed = [], [], []

    latency = settings.get("latency")
    if latency is not None and new_latency["count"] and control_latency["count"]:
        new_sketch, control_sketch = sketch_from_json(new_latency), sketch_from_json(control_latency)
        fig = {}
        for q, key in ((0.5, "p50"), (0.95, "p95")):
            n, c = quantile(new_sketch, q), quantile(control_sketch, q)
            fig[key] = {"new": n, "control": c, "ratio": round(n / c, 3) if c else None,
                        "max_ratio": latency[f"max_{key}_ratio"]}
        new_logs = [math.log(v) for v in (d.latency_p50() for d in new_ok) if v and v > 0]
        control_logs = [math.log(v) for v in (d.latency_p50() for d in control_ok) if v and v > 0]
        t, p = _welch_greater(new_logs, control_logs)
        fig["t_statistic"], fig["p_value"] = t, round(p, 6)
        figures["latency"] = fig
        over = [k for k in ("p50", "p95") if fig[k]["ratio"] is not None and fig[k]["ratio"] > fig[k]["max_ratio"]]
        if over and p < alpha:
            tripped.append("latency " + ", ".join(
                f"{k} {fig[k]['new']} ms vs {fig[k]['control']} ms (x{fig[k]['ratio']} > x{fig[k]['max_ratio']})"
                for k in over) + f", per-device p50 higher with p={p:.2g} < {alpha}")
        else:
            passed.append("latency")
    elif latency is not None:
        figures["latency"] = {"off": "no latencies reported"}

    errors = settings.get("errors")
    if errors is not None:
        margin = errors["max_increase"]
        new_rates = [d.error_rate for d in new_ok]
        control_rates = [d.error_rate for d in control_ok]
        # H1: new - control > margin, tested as (new - margin) > control.
        t, p = _welch_greater([r - margin for r in new_rates], control_rates)
        new_mean, control_mean = sum(new_rates) / len(new_rates), sum(control_rates) / len(control_rates)
        figures["errors"] = {"new": round(new_mean, 6), "control": round(control_mean, 6),
                             "difference": round(new_mean - control_mean, 6), "max_increase": margin,
                             "t_statistic": t, "p_value": round(p, 6)}
        if p < alpha:
            tripped.append(f"error rate {new_mean:.4f} vs {control_mean:.4f} (+{new_mean - control_mean:.4f} > "
                           f"+{margin}, p={p:.2g} < {alpha})")
        else:
            passed.append("errors")

    drift = settings.get("drift")
    if drift is not None:
        n_total, c_total = sum(new_outputs.values()), sum(control_outputs.values())
        numeric = sorted(set(new_values) & set(control_values))
        fig: dict = {"max_psi": drift["max_psi"], "min_outputs": drift["min_outputs"]}
        judged = False
        if new_outputs or control_outputs:
            if n_total < drift["min_outputs"] or c_total < drift["min_outputs"]:
                fig.update(new_outputs=n_total, control_outputs=c_total)
                waiting.append(f"output drift: {n_total:g} and {c_total:g} outputs, {drift['min_outputs']} of each needed")
            else:
                value = psi(new_outputs, control_outputs)
                judged = True
                fig.update(psi=round(value, 4),
                           new_shares={k: round(v / n_total, 4) for k, v in sorted(new_outputs.items())},
                           control_shares={k: round(v / c_total, 4) for k, v in sorted(control_outputs.items())})
                if value > drift["max_psi"]:
                    tripped.append(f"outputs drifted: PSI {value:.3f} > {drift['max_psi']}")
        for name in numeric:
            n_count, c_count = new_values[name].get("count", 0), control_values[name].get("count", 0)
            if n_count < drift["min_outputs"] or c_count < drift["min_outputs"]:
                waiting.append(f"output {name}: {n_count:g} and {c_count:g} values, {drift['min_outputs']} of each needed")
                continue
            value = numeric_psi(new_values[name], control_values[name])
            judged = True
            n_sketch, c_sketch = sketch_from_json(new_values[name]), sketch_from_json(control_values[name])
            fig.setdefault("values", {})[name] = {
                "psi": round(value, 4), "new_p50": quantile(n_sketch, 0.5), "control_p50": quantile(c_sketch, 0.5)}
            if value > drift["max_psi"]:
                tripped.append(f"output {name} drifted: PSI {value:.3f} > {drift['max_psi']}")
        if not (new_outputs or control_outputs or numeric):
            figures["drift"] = {"off": "no outputs reported"}
        else:
            figures["drift"] = fig
            if judged and not any("drifted" in t for t in tripped):
                passed.append("drift")

    if tripped:
        return Verdict("fail", tripped, figures)
    if waiting:
        return Verdict("wait", waiting, figures)
    return Verdict("pass", [f"no worse than the control group ({', '.join(passed) or 'nothing to compare'})"], figures)


def window_of(device_id: str, windows: list[dict]) -> DeviceFigures:
    """One device's DeviceFigures from Window JSON forms (its hourly rows, say)."""
    total: dict = {}
    for w in windows:
        window_json_merge(total, w)
    return DeviceFigures(device_id=device_id, requests=total.get("requests", 0), errors=total.get("errors", 0),
                         latency_ms=total.get("latency_ms") or {}, outputs=total.get("outputs") or {},
                         output_values=total.get("output_values") or {})
