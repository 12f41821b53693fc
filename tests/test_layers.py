"""Dependencies point down (docs/architecture.md "Layers"), read from the import graph of distmaml/ with ``ast``.

Every import counts, also the lazy ones inside functions: a module that
imports another only when called still depends on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distmaml"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (``from x import y`` gives ``x`` and ``x.y``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _importers(target: str) -> list[str]:
    return sorted(m for m, deps in GRAPH.items() if any(d == target or d.startswith(target + ".") for d in deps))


def test_the_graph_is_read():
    """The reader sees imports, lazy ones included (guards the tests below against reading nothing)."""
    assert len(GRAPH) > 40
    assert "distmaml.cli" in GRAPH["distmaml.__main__"]
    assert "distmaml.assembly" in GRAPH["distmaml.tune.trial"]  # imported inside run_trial
    assert "torch" in GRAPH["distmaml.core.program"]


def test_nothing_imports_the_cli_but_main():
    assert _importers("distmaml.cli") == ["distmaml.__main__"]


def test_the_cluster_layer_sits_below_the_engines():
    """``distmaml/cluster/`` (connect, reach, placement, capacity, autoscaler) uses nothing above or beside it."""
    above = ("engine", "assembly", "trainer", "runner", "tune", "tracking", "core", "data", "models", "tasks", "bench")
    cluster = [m for m in GRAPH if m.startswith("distmaml.cluster")]
    assert len(cluster) >= 6
    bad = {
        m: sorted(d for d in GRAPH[m] if any(d == f"distmaml.{a}" or d.startswith(f"distmaml.{a}.") for a in above))
        for m in cluster
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_runtime_never_imports_the_benchmark_harness():
    """``distmaml/bench/`` sits on top: only the CLI's ``distmaml bench`` reaches into it."""
    outside = [m for m in _importers("distmaml.bench") if not m.startswith("distmaml.bench")]
    assert outside == ["distmaml.cli"]
    assert {m for m in GRAPH if m.startswith("distmaml.bench")} >= {"distmaml.bench", "distmaml.bench.engines"}


def test_tracking_does_not_import_the_engine():
    bad = {
        m: sorted(d for d in GRAPH[m] if d.startswith("distmaml.engine"))
        for m in GRAPH
        if m.startswith("distmaml.tracking")
    }
    assert not any(bad.values()), bad


@pytest.mark.parametrize("layer", ["distmaml.engine", "distmaml.trainer", "distmaml.tracking", "distmaml.runner"])
def test_layers_below_the_assembly_do_not_import_it(layer):
    """The trainer, the engine and tracking receive what they need; only the layers above assemble."""
    bad = [m for m in GRAPH if (m == layer or m.startswith(layer + ".")) and "distmaml.assembly" in GRAPH[m]]
    assert not bad


def test_engine_knows_nothing_of_algorithms():
    """The engine receives a ready task program; it does not build families, networks or algorithms."""
    forbidden = ("distmaml.core", "distmaml.tasks", "distmaml.data", "distmaml.models", "distmaml.assembly")
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith(forbidden)) for m in GRAPH if m.startswith("distmaml.engine")}
    assert not any(bad.values()), bad


def test_core_imports_torch_and_itself_only():
    allowed = ("torch", "distmaml.core", "distmaml.typing", "__future__")
    stdlib = {"collections", "collections.abc", "contextlib", "copy", "dataclasses", "typing", "warnings", "math"}
    stdlib |= {"statistics", "time"}  # core.batching times its candidates
    stdlib |= {"weakref"}  # core.compiled keeps compiled graphs with their network, not past it
    bad = {
        m: sorted(
            d for d in GRAPH[m] if not d.startswith(allowed) and d.split(".")[0] not in stdlib and d not in stdlib
        )
        for m in GRAPH
        if m.startswith("distmaml.core")
    }
    assert not any(bad.values()), bad
