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


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """What ``path`` imports, absolute names (``from x import y`` gives ``x`` and ``x.y``); and of those, the
    package's modules it runs: ``from x import y`` is ``x.y`` where that is a module, else ``x`` (so
    ``from distmaml import storage`` is ``distmaml.storage``, not the package, whose ``__init__`` has run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    out: set[str] = set()
    runs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            runs.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
            out.add(base)
            out.update(names)
            runs.update(n for n in names if n in MODULES)
            if any(n not in MODULES for n in names):
                runs.add(base)
    return out, {m for m in runs if m in MODULES and m != own}


_READ = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: names for m, (names, _) in _READ.items()}
EDGES = {m: edges for m, (_, edges) in _READ.items()}
"""The package's modules each one runs (the tests of layers and circles read these)."""

LAYERS = [
    (
        "entry points",
        (
            "distmaml",
            "distmaml.__main__",
            "distmaml.cli",
            "distmaml.api",
            "distmaml.oncluster",
            "distmaml.tune",
            "distmaml.bench",
            "distmaml.recipes",
        ),
    ),
    ("the run", ("distmaml.run", "distmaml.tracking")),
    ("engine", ("distmaml.engine",)),
    ("cluster", ("distmaml.cluster",)),
    ("parts", ("distmaml.data", "distmaml.models", "distmaml.tasks", "distmaml.config")),
    ("core", ("distmaml.core", "distmaml.fastpath")),
    ("machine", ("distmaml.machine",)),
    ("base", ("distmaml.storage", "distmaml.errors", "distmaml.typing")),
]
"""docs/architecture.md, "Layers", top to bottom: a module imports its own layer and those below."""


def _layer(module: str) -> int:
    best = max(
        (
            (len(prefix), i)
            for i, (_, prefixes) in enumerate(LAYERS)
            for prefix in prefixes
            if module == prefix or module.startswith(prefix + ".")
        ),
        default=None,
    )
    assert best is not None, f"{module} is in no layer of LAYERS (and of docs/architecture.md)"
    return best[1]


def test_every_module_imports_only_its_layer_and_those_below():
    upward = {
        m: sorted(f"{d} ({LAYERS[_layer(d)][0]})" for d in deps if _layer(d) < _layer(m)) for m, deps in EDGES.items()
    }
    assert {m: d for m, d in upward.items() if d} == {}


def test_no_import_circle():
    """No module reaches itself through the package's imports, lazy ones included (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(EDGES):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_circle_check_sees_a_circle():
    """The check above is not vacuous: the edges hold known imports, and a circle added to them is found."""
    assert "distmaml.run.trainer" in EDGES["distmaml.run.assembly"]
    assert "distmaml.storage" in EDGES["distmaml.run.checkpoint"]  # from distmaml import storage
    assert "distmaml" not in EDGES["distmaml.run.checkpoint"]
    saved = set(EDGES["distmaml.run.trainer"])
    EDGES["distmaml.run.trainer"].add("distmaml.run.assembly")
    try:
        with pytest.raises(AssertionError):
            test_no_import_circle()
    finally:
        EDGES["distmaml.run.trainer"] = saved


def test_at_most_ten_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_one_engine_protocol_module():
    """The contract between trainer, engines and task program is defined in ``engine/protocol.py`` alone,
    and the engines take it from there (never from the run layer's ``TaskRunner``)."""
    contract = ("Engine", "TaskProgram", "GradShard", "EvalShard", "ParamLayout")
    defined = {
        node.name: _module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name in contract
    }
    assert defined == dict.fromkeys(contract, "distmaml.engine.protocol")
    engines = [m for m in GRAPH if m.startswith("distmaml.engine.") and m != "distmaml.engine.protocol"]
    assert not [m for m in engines if any(d.startswith("distmaml.run") for d in GRAPH[m])]


def _importers(target: str) -> list[str]:
    return sorted(m for m, deps in GRAPH.items() if any(d == target or d.startswith(target + ".") for d in deps))


def test_the_graph_is_read():
    """The reader sees imports, lazy ones included (guards the tests below against reading nothing)."""
    assert len(GRAPH) > 40
    assert "distmaml.cli" in GRAPH["distmaml.__main__"]
    assert "distmaml.run.assembly" in GRAPH["distmaml.tune.trial"]  # imported inside run_trial
    assert "torch" in GRAPH["distmaml.core.program"]


def test_nothing_imports_the_cli_but_main():
    assert _importers("distmaml.cli") == ["distmaml.__main__"]


def test_the_cluster_layer_sits_below_the_engines():
    """``distmaml/cluster/`` (connect, reach, placement, capacity, autoscaler) uses nothing above or beside it."""
    above = ("engine", "run", "tune", "tracking", "core", "data", "models", "tasks", "bench")
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


@pytest.mark.parametrize(
    "layer", ["distmaml.engine", "distmaml.run.trainer", "distmaml.tracking", "distmaml.run.runner"]
)
def test_layers_below_the_assembly_do_not_import_it(layer):
    """The trainer, the engine and tracking receive what they need; only the layers above assemble."""
    bad = [m for m in GRAPH if (m == layer or m.startswith(layer + ".")) and "distmaml.run.assembly" in GRAPH[m]]
    assert not bad


def test_engine_knows_nothing_of_algorithms():
    """The engine receives a ready task program; it does not build families, networks or algorithms."""
    forbidden = ("distmaml.core", "distmaml.tasks", "distmaml.data", "distmaml.models", "distmaml.run.assembly")
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
