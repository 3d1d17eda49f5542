"""Precheck runtimes, one per artifact `format` (the release artifact's `format`: onnx, tflite, ...).

A runtime loads a model file into a Session that declares its inputs and outputs and runs feeds;
agent.precheck's child picks the runtime by format and runs the same checks on any of them. A
runtime's Python package is imported only inside that child, never in the daemon.

`RUNTIMES` names every format this agent has a runtime for; `installed_formats()` those whose
package is importable on this box (admission refuses a release it cannot precheck here with
NO_PRECHECK_RUNTIME, unless its health contract says `"precheck": "none"`).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol


class Session(Protocol):
    """A loaded model. Types are ONNX's notation ("tensor(float)", ...; agent.precheck.ORT_DTYPES),
    dims ints for fixed sizes and None or a name for dynamic ones."""

    def inputs(self) -> list[tuple[str, str, list]]: ...

    def output_names(self) -> list[str]: ...

    def run(self, feeds: dict[str, Any], *, quiet: bool = False) -> list[Any]:
        """The outputs, in output_names() order; `quiet`: an attempt expected to fail, log nothing."""
        ...


@dataclass(frozen=True)
class Runtime:
    format: str
    package: str  # the importable module the runtime needs (from the `runtime` extra)
    module: str  # the agent module whose load(path) -> Session opens a model

    def load(self, path: str) -> Session:
        """Open the model; ImportError when the package is missing, anything else: it does not load."""
        return importlib.import_module(self.module).load(path)


RUNTIMES: dict[str, Runtime] = {
    "onnx": Runtime("onnx", "onnxruntime", "agent.runtimes.onnx"),
    "tflite": Runtime("tflite", "ai_edge_litert", "agent.runtimes.tflite"),
}
FORMATS = tuple(RUNTIMES)


@cache
def installed_formats() -> frozenset[str]:
    """Formats whose runtime package is present on this box (found, not imported)."""
    return frozenset(f for f, r in RUNTIMES.items() if importlib.util.find_spec(r.package) is not None)


def precheck_skipped(contract: dict | None) -> bool:
    """The release's health contract says to skip the precheck: its trial decides alone."""
    return isinstance(contract, dict) and contract.get("precheck") == "none"
