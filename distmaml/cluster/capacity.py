"""Could the cluster ever hold a run's bundles? Pure arithmetic on node shapes, no Ray.

A cluster is a list of ``NodeShape``: the nodes that are up (one each) and the
node types its autoscaler may launch (up to ``count`` each, and up to
``max_launches`` new nodes in all). ``why_not`` answers, before anything waits,
whether no such cluster could ever place the bundles under the placement
strategy, and says which bundle and resource are missing; ``holders`` names the
node type that can hold bundles still waiting, for the line printed while the
autoscaler adds nodes.

Only necessary conditions are checked (each bundle fits some node; the totals;
one node for STRICT_PACK; enough nodes for STRICT_SPREAD): a request that
passes may still wait for ``engine.startup_timeout`` in a rare packing, but a
request refused here could never have run.

Example:
    >>> gpu = NodeShape("node type gpu_worker", {"CPU": 2, "GPU": 1}, count=4, launchable=True)
    >>> worker = Bundle("worker", {"CPU": 64.0, "GPU": 1.0}, {"CPU": "engine.cpus_per_worker"})
    >>> print(why_not([worker], "PACK", [gpu], max_launches=4))  # doctest: +ELLIPSIS
    the worker bundle {'CPU': 64, 'GPU': 1} fits no node ...: the largest, node type gpu_worker, offers CPU 2; ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

EPS = 1e-9


@dataclass(frozen=True)
class NodeShape:
    name: str
    """``node 10.0.0.5`` for a node up, ``node type gpu_worker`` for one the autoscaler can launch."""
    resources: dict[str, float]
    count: int = 1
    """How many nodes of this shape the cluster has or may launch."""
    launchable: bool = False
    known: bool = True
    """False for a node type whose resources Ray learns only when such a node starts (the local
    provider's machines): no run can be judged impossible against it."""


@dataclass(frozen=True)
class Bundle:
    role: str
    """``driver`` or ``worker``: named in messages."""
    resources: dict[str, float]
    settings: dict[str, str] = field(default_factory=dict)
    """The config key that sets each resource, for the fix a message suggests."""


def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(v <= node.get(k, 0.0) + EPS for k, v in bundle.items() if v > 0)


def show(resources: dict[str, float]) -> str:
    """``{'CPU': 2, 'GPU': 1}``: whole numbers without ``.0``."""
    return "{" + ", ".join(f"{k!r}: {v:g}" for k, v in resources.items() if v > 0) + "}"


def describe(bundles: Sequence[Bundle]) -> str:
    """``{'CPU': 1} + 2 x {'CPU': 1, 'GPU': 1}``: the bundles, equal ones counted."""
    parts: list[tuple[str, int]] = []
    for b in bundles:
        text = show(b.resources)
        if parts and parts[-1][0] == text:
            parts[-1] = (text, parts[-1][1] + 1)
        else:
            parts.append((text, 1))
    return " + ".join(text if n == 1 else f"{n} x {text}" for text, n in parts)


def _fix(bundle: Bundle, resource: str, most: float) -> str:
    key = bundle.settings.get(resource, f"the {resource} of the {bundle.role} bundle")
    return f"lower {key} to {most:g}"


def _terms(bundles: Sequence[Bundle], resource: str) -> str:
    """``driver 1 + 2 workers x 1``: what each bundle asks of ``resource``, equal ones counted."""
    out: list[tuple[str, float, int]] = []
    for b in bundles:
        v = b.resources.get(resource, 0.0)
        if v <= 0:
            continue
        if out and out[-1][:2] == (b.role, v):
            out[-1] = (b.role, v, out[-1][2] + 1)
        else:
            out.append((b.role, v, 1))
    return " + ".join(f"{role} {v:g}" if n == 1 else f"{n} {role}s x {v:g}" for role, v, n in out)


def _most(shapes: Sequence[NodeShape], resource: str, max_launches: int) -> float:
    """The most of ``resource`` the cluster could ever offer: nodes up plus the best launches allowed."""
    up = sum(s.resources.get(resource, 0.0) * s.count for s in shapes if not s.launchable)
    left, launched = max_launches, 0.0
    for s in sorted((s for s in shapes if s.launchable), key=lambda s: -s.resources.get(resource, 0.0)):
        n = min(s.count, left)
        launched += n * s.resources.get(resource, 0.0)
        left -= n
    return up + launched


def _nodes_that_fit(bundle: dict[str, float], shapes: Sequence[NodeShape], max_launches: int) -> int:
    up = sum(s.count for s in shapes if not s.launchable and fits(bundle, s.resources))
    return up + min(max_launches, sum(s.count for s in shapes if s.launchable and fits(bundle, s.resources)))


def why_not(bundles: Sequence[Bundle], strategy: str, shapes: Sequence[NodeShape], max_launches: int) -> str | None:
    """Why no node the cluster has or can launch could ever place ``bundles``; None if it might (always,
    when the autoscaler can launch nodes of a shape it does not know yet)."""
    if any(not s.known for s in shapes):
        return None
    where = "the Ray cluster has or can launch" if any(s.launchable for s in shapes) else "the Ray cluster has"
    for b in {show(b.resources): b for b in bundles}.values():
        if any(fits(b.resources, s.resources) for s in shapes):
            continue
        for r, v in b.resources.items():
            best = max(shapes, key=lambda s: s.resources.get(r, 0.0), default=None)
            have = best.resources.get(r, 0.0) if best else 0.0
            if v > have + EPS:
                offers = f"the largest, {best.name}, offers {r} {have:g}" if best and have else f"no node offers {r}"
                return f"the {b.role} bundle {show(b.resources)} fits no node {where}: {offers}; {_fix(b, r, have)}"
        return f"the {b.role} bundle {show(b.resources)} fits no node {where}: no node has all of it at once"
    need: dict[str, float] = {}
    for b in bundles:
        for r, v in b.resources.items():
            need[r] = need.get(r, 0.0) + v
    for r, v in need.items():
        most = _most(shapes, r, max_launches)
        if v > most + EPS:
            keys = sorted({b.settings[r] for b in bundles if r in b.settings})
            return (
                f"the run needs {v:g} {r}s ({_terms(bundles, r)}) but {where} at most {most:g}; "
                f"lower workers or {' or '.join(keys)}, or add nodes"
            )
    if strategy == "STRICT_PACK" and not any(fits(need, s.resources) for s in shapes):
        return (
            f"engine.placement = STRICT_PACK puts all {len(bundles)} bundles ({show(need)}) on one node, "
            f"and no node {where} is that large; use PACK or lower workers"
        )
    if strategy == "STRICT_SPREAD":
        smallest = min((b.resources for b in bundles), key=lambda r: sum(r.values()))
        nodes = _nodes_that_fit(smallest, shapes, max_launches)
        if nodes < len(bundles):
            return (
                f"engine.placement = STRICT_SPREAD puts each of the {len(bundles)} bundles on a node of its own, "
                f"but {where} at most {nodes} that can hold one; use PACK or SPREAD, or lower workers"
            )
    return None


def nodes_needed(bundles: Sequence[Bundle], strategy: str, node: dict[str, float]) -> int | None:
    """How many nodes of shape ``node`` hold ``bundles`` (first fit, largest first); None if they cannot."""
    if not all(fits(b.resources, node) for b in bundles):
        return None
    if strategy == "STRICT_SPREAD":
        return len(bundles)
    kinds = sorted({k for b in bundles for k in b.resources})
    free: list[dict[str, float]] = []
    for b in sorted(bundles, key=lambda b: [-b.resources.get(k, 0.0) for k in kinds]):
        slot = next((f for f in free if fits(b.resources, f)), None)
        if slot is None:
            if strategy == "STRICT_PACK" and free:
                return None
            slot = dict(node)
            free.append(slot)
        for r, v in b.resources.items():
            slot[r] = slot.get(r, 0.0) - v
    return len(free)


def holders(bundles: Sequence[Bundle], strategy: str, shapes: Sequence[NodeShape]) -> str:
    """Which node type the autoscaler can add to hold ``bundles``: ``2 nodes of type gpu_worker {...}``."""
    options = []
    for s in shapes:
        if s.launchable and (n := nodes_needed(bundles, strategy, s.resources)) is not None and n <= s.count:
            options.append((n, s.name, s))
    if options:
        n, _, s = min(options)
        kind = s.name.removeprefix("node type ")
        return f"{n} node{'s' if n > 1 else ''} of type {kind} {show(s.resources)}"
    some = sorted(s.name.removeprefix("node type ") for s in shapes if s.launchable)
    return f"nodes of types {', '.join(some)}" if some else ""


def total_nodes(max_workers: float) -> int:
    """An autoscaler's ``max_workers`` (-1: unbounded) as a count for ``why_not``."""
    return 10**6 if max_workers < 0 or math.isinf(max_workers) else int(max_workers)
