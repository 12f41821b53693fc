"""Resources of a distributed run: one placement group, a driver bundle plus
one bundle per worker, checked against the cluster before anything waits.

The cluster is what is up now and what its autoscaler can launch
(``launchable_node_types``). A run some node could hold asks for its group and
waits, printing every ``WAIT_EVERY`` seconds what it waits for, up to
``engine.startup_timeout`` (or ``engine.startup_stall`` seconds without the
autoscaler making progress); a run no node could ever hold fails at once,
naming what is missing (``capacity.why_not``).

Only this module, ``autoscaler`` and ``ray_engine`` import Ray.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)

from distmaml.cluster.autoscaler import read_report
from distmaml.cluster.capacity import Bundle, NodeShape, describe, holders, show, total_nodes, why_not
from distmaml.config import Config
from distmaml.errors import CANNOT_GO_ON, DistmamlError

WAIT_FIRST = 2.0
"""Seconds a placement group may take before the first line saying what the run waits for."""
WAIT_EVERY = 10.0
"""Seconds between those lines while the autoscaler adds nodes."""
KINDS = ("CPU", "GPU")
"""The resources a run's bundles ask for; the only ones compared."""
STALE_REPORT = 60.0
"""Seconds after which an autoscaler report no longer counts as news (its monitor stopped writing)."""


class EngineError(DistmamlError, RuntimeError):
    """The engine cannot run as configured; the message says what to change."""

    exit_code = CANNOT_GO_ON


def cpu_threads(cpus: float) -> int:
    """The torch threads of a process on a bundle of ``cpus`` CPUs: its whole CPUs, at least 1."""
    return max(1, int(cpus))


@dataclass(frozen=True)
class WorkerResources:
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        return cpu_threads(self.cpus)

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus}
        if self.gpus:
            b["GPU"] = self.gpus
        return b


def gpu_share(gpus: float) -> int:
    """How many workers share one GPU when each asks for ``gpus`` of one (``engine.gpus_per_worker``)."""
    return max(1, round(1 / gpus)) if 0 < gpus < 1 else 1


def connect(address: str | None, cpus_needed: float, runtime_env: dict[str, Any] | None = None) -> bool:
    """Connects to Ray unless already connected; returns True if this call started or joined Ray.

    ``local`` (the default) starts a private instance sized for the run, never
    joining a cluster already running on the machine; ``auto`` joins the
    running cluster (what ``ray submit`` needs); anything else is probed, then
    goes to ``ray.init(address=...)`` (see ``distmaml.cluster.connect``).

    ``runtime_env`` is the job's (``distmaml.run.shipping``: the user's packages):
    every actor, Ray Train worker and Tune trial of the job inherits it.
    """
    from distmaml.cluster.connect import ClusterError
    from distmaml.cluster.connect import connect as join

    if ray.is_initialized():
        return False
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        kwargs["include_dashboard"] = False
    try:
        join(address, num_cpus=cpus, **kwargs)
    except ClusterError as e:
        raise EngineError(str(e)) from None
    return True


@dataclass(frozen=True)
class ClusterShape:
    """The nodes up and the node types the autoscaler can launch (up to ``max_launches`` new nodes)."""

    nodes: list[NodeShape]
    max_launches: int


def job_ships_code() -> bool:
    """True when the connected job's runtime environment ships code (a ``working_dir`` or ``py_modules``)."""
    env = ray.get_runtime_context().runtime_env
    return bool(env.get("working_dir") or env.get("py_modules"))


def cluster_shape() -> ClusterShape:
    up = [
        NodeShape(
            f"node {n['NodeManagerAddress']}", {k: float(n["Resources"][k]) for k in KINDS if k in n["Resources"]}
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    types, max_launches = launchable_node_types()
    return ClusterShape(up + types, max_launches)


def launchable_node_types() -> tuple[list[NodeShape], int]:
    """The node types this cluster's autoscaler may launch, and how many new nodes it may add in all.

    Ray 2.60 has no public call for this, and its own autoscaler (v1 or v2,
    started by ``ray up`` or ``ray start --autoscaling-config``) publishes no
    node types in the GCS. Two places hold them, read in this order:

    - the cluster config an autoscaler reports to the GCS (KubeRay's does; Ray
      Data reads it the same way);
    - the autoscaling config file the head's autoscaler (its ``monitor.py``
      process, found by this cluster's GCS port) was started with: readable when
      the driver runs on the head, as under ``ray submit``.

    Neither (``address="local"``, a plain ``ray start``, a driver off the
    head): no node types, and the run is judged from the nodes up.
    """
    from ray._private.state import state  # what Ray Data's autoscaler reads too

    reported = state.get_cluster_config()
    if reported is not None and reported.node_group_configs:
        types = [
            NodeShape(
                f"node type {g.name}",
                {k: float(v) for k, v in g.resources.items() if k in KINDS},
                count=total_nodes(g.max_count),
                launchable=True,
            )
            for g in reported.node_group_configs
            if g.max_count != 0
        ]
        return types, sum(t.count for t in types)
    config = _autoscaling_config(ray.get_runtime_context().gcs_address)
    if not config:
        return [], 0
    return node_types(config)


def node_types(config: dict[str, Any]) -> tuple[list[NodeShape], int]:
    """The worker node types of an autoscaling config (``available_node_types``), and how many new nodes it
    may add in all (``max_workers``).

    The head's type counts when it has worker slots of its own: the local provider (a lab's machines
    listed by address) has a single type, ``local.cluster.node``, for the head and its workers. A type
    that declares no resources (that one, again) has the resources Ray finds on each machine when it
    starts: unknown until then (``NodeShape.known``).
    """
    limit = total_nodes(config.get("max_workers", -1))
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        slots = spec.get("max_workers", 0 if name == config.get("head_node_type") else limit)
        if slots == 0:
            continue
        declared = spec.get("resources") or {}
        types.append(
            NodeShape(
                f"node type {name}",
                {k: float(v) for k, v in declared.items() if k in KINDS},
                count=min(limit, total_nodes(slots)),
                launchable=True,
                known=bool(declared),
            )
        )
    return types, limit


def _autoscaling_config(gcs_address: str) -> dict[str, Any] | None:
    """The config file named by the command line of the autoscaler on this machine that serves ``gcs_address``."""
    port = gcs_address.rsplit(":", 1)[-1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") and "autoscaler" in a for a in args[:3]):
            continue
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        path = opts.get("autoscaling-config")
        if path and opts.get("gcs-address", "").rsplit(":", 1)[-1] == port:
            try:
                loaded = yaml.safe_load(Path(path).expanduser().read_text())
            except (OSError, yaml.YAMLError):
                return None
            return loaded if isinstance(loaded, dict) else None
    return None


def worker_resources(config: Config, cluster: ClusterShape | None = None) -> WorkerResources:
    """CPUs and GPUs of one worker; GPUs default to 1 where the cluster has GPU nodes or can launch them."""
    e = config.engine
    gpus = e.gpus_per_worker
    if gpus is None:
        nodes = (cluster or cluster_shape()).nodes
        has_gpus = any(n.resources.get("GPU", 0.0) > 0 for n in nodes)
        gpus = 1.0 if has_gpus and config.device != "cpu" else 0.0
    return WorkerResources(cpus=e.cpus_per_worker, gpus=gpus)


def bundles(config: Config, res: WorkerResources) -> list[Bundle]:
    """The driver's bundle, then one per worker (the fewest an elastic run goes on with), with the config keys
    that set them."""
    driver = Bundle("driver", {"CPU": config.engine.driver_cpus}, {"CPU": "engine.driver_cpus"})
    keys = {"CPU": "engine.cpus_per_worker", "GPU": "engine.gpus_per_worker"}
    return [driver] + [Bundle("worker", res.bundle(), keys) for _ in range(config.min_workers)]


def check_feasible(config: Config, res: WorkerResources, cluster: ClusterShape | None = None) -> None:
    """Fails at once when no node the cluster has or can launch could hold the run (instead of waiting)."""
    cluster = cluster or cluster_shape()
    reason = why_not(bundles(config, res), config.engine.placement, cluster.nodes, cluster.max_launches)
    if reason:
        raise EngineError(reason)


@dataclass
class Placement:
    """The placement group the workers live in, and the index of the first worker bundle."""

    group: PlacementGroup
    first_worker_bundle: int
    owned: bool

    def release(self) -> None:
        if self.owned:
            remove_placement_group(self.group)


def reserve(config: Config, res: WorkerResources) -> Placement:
    """The run's placement group: the current one inside a Tune trial, else a new one."""
    current = get_current_placement_group()
    if current is not None:
        count = current.bundle_count
        if count < config.max_workers + 1:
            raise EngineError(
                f"the trial's placement group has {count} bundles but workers = {config.workers} "
                f"needs {config.max_workers + 1} (a driver bundle and one per worker)"
            )
        return Placement(current, 1, owned=False)
    cluster = cluster_shape()
    check_feasible(config, res, cluster)
    wanted = bundles(config, res)
    group = placement_group(
        [b.resources for b in wanted], strategy=config.engine.placement, name=f"distmaml-run-{uuid.uuid4().hex[:8]}"
    )
    try:
        _wait_until_placed(group, wanted, config, cluster)
    except BaseException:
        remove_placement_group(group)
        raise
    return Placement(group, 1, owned=True)


def _wait_until_placed(group: PlacementGroup, wanted: list[Bundle], config: Config, cluster: ClusterShape) -> None:
    """Waits for ``group`` up to ``engine.startup_timeout``, saying every ``WAIT_EVERY`` s what it waits for.

    Ray places a group whole or not at all, so every bundle is pending until
    the group is ready. While the autoscaler could add nodes for it, the wait
    goes on as long as it makes progress (a node starting, a node coming up:
    ``distmaml.cluster.autoscaler``) and stops with one line after
    ``engine.startup_stall`` seconds without any.
    """
    limit, strategy = config.engine.startup_timeout, config.engine.placement
    asked = f"{describe(wanted)} ({strategy})"
    where = holders(wanted, strategy, cluster.nodes)
    ready = group.ready()
    start = time.monotonic()
    deadline, next_line = start + limit, start + WAIT_FIRST
    alive, last_progress = _alive_nodes(), start
    while True:
        done, _ = ray.wait([ready], timeout=max(0.0, min(next_line, deadline) - time.monotonic()))
        if done:
            ray.get(ready)
            return
        now = time.monotonic()
        report = read_report()
        if now >= deadline - 0.1:  # ray.wait may return a little early
            available = ray.available_resources()
            free = {k: available[k] for k in KINDS if k in available}
            raise EngineError(
                f"the run's placement group {asked} was not placed within engine.startup_timeout = {limit:g}s; "
                f"the cluster has {show(free)} available: lower workers or the resources per worker"
            )
        nodes = _alive_nodes()
        starting = report is not None and report.age < STALE_REPORT and report.starting > 0
        if report is None or starting or nodes != alive or not where or len(nodes) - 1 >= cluster.max_launches:
            # progress, or nothing to judge it by (no autoscaler; no node type could help; all launched)
            alive, last_progress = nodes, now
        elif now - last_progress >= config.engine.startup_stall:
            failures = "; ".join(report.failures) if report.failures else "it launched none"
            raise EngineError(
                f"the run's placement group {asked} waited {now - last_progress:.0f} s with no node starting, "
                f"though the autoscaler can add {where}: {failures}; see 'ray status' and the autoscaler's log "
                "on the head (/tmp/ray/session_latest/logs/monitor.*), or raise engine.startup_stall"
            )
        if now >= next_line - 0.1:
            why = f"the autoscaler can add {where}" if where else "no node type to launch: waiting for busy nodes"
            state = f"; {report.describe()}" if report is not None and where else ""
            print(
                f"distmaml: waiting {now - start:.0f} s for the run's placement group {asked}: {why}{state} "
                f"(engine.startup_timeout = {limit:g} s)",
                file=sys.stderr,
                flush=True,
            )
            next_line = now + WAIT_EVERY


def _alive_nodes() -> frozenset[str]:
    """Ids of the nodes up now."""
    return frozenset(str(n["NodeID"]) for n in ray.nodes() if n.get("Alive"))
