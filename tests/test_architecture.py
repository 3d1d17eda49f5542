"""The architecture as code: the import contracts in pyproject.toml hold, and no module of the
project takes part in an import cycle (lazy imports inside functions count: they are cycles too,
only hidden until the function runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "web", "ota", "registry", "agent", "fleetctl")


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(m for m in graph.modules if m.split(".")[0] in PACKAGES)
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m) if n.split(".")[0] in PACKAGES)
             for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_it_finds_a_cycle_when_there_is_one():
    # The detector itself must be able to fail: two modules importing each other.
    graph = grimp.ImportGraph()
    for name in ("ota.a", "ota.b", "ota.c"):
        graph.add_module(name)
    graph.add_import(importer="ota.a", imported="ota.b")
    graph.add_import(importer="ota.b", imported="ota.a")
    graph.add_import(importer="ota.c", imported="ota.a")
    assert import_cycles(graph) == [["ota.a", "ota.b"]]


def test_it_has_no_import_cycle_anywhere():
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_it_keeps_the_import_contracts():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def string_literals(path: Path) -> list[str]:
    import ast

    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def product_files(*packages: str):
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


@pytest.mark.parametrize(
    "literal, home",
    [
        # One audit writer: registry.audit (and every reader goes through it too).
        ("AuditEntry.objects.create", "registry/audit.py"),
        # One bulk UPDATE ... FROM (VALUES ...): ota.db.bulk_set.
        ("FROM (VALUES", "ota/db.py"),
    ],
)
def test_it_writes_each_mechanism_in_one_place(literal, home):
    found = [str(p.relative_to(REPO)) for p in product_files(*PACKAGES) if literal in p.read_text()]
    assert found == [home]


@pytest.mark.parametrize("state", ["timed_out", "unhealthy", "revert_failed"])
def test_it_names_rollout_device_states_only_in_their_model(state):
    # State groups live on ota.models.RolloutDevice; a second list elsewhere drifts (it did).
    found = [str(p.relative_to(REPO)) for p in product_files("ota", "web", "fleetctl", "registry")
             if state in string_literals(p)]
    assert found == ["ota/models/rollouts.py"]


def test_it_builds_the_artifact_download_url_in_one_place():
    def spells_it(path: Path) -> bool:
        literals = string_literals(path)
        return any("/download" in s for s in literals) and any("artifacts/" in s for s in literals)

    found = [str(p.relative_to(REPO)) for p in product_files(*PACKAGES) if spells_it(p)]
    assert found == ["registry/urls.py"]
