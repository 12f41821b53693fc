"""Resources of a distributed run: one placement group, a driver bundle plus
one bundle per worker, checked against the cluster before anything waits.

Only this module and ``ray_engine`` import Ray.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)

from distmaml.config import Config
from distmaml.errors import CANNOT_GO_ON, DistmamlError


class EngineError(DistmamlError, RuntimeError):
    """The engine cannot run as configured; the message says what to change."""

    exit_code = CANNOT_GO_ON


@dataclass(frozen=True)
class WorkerResources:
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus}
        if self.gpus:
            b["GPU"] = self.gpus
        return b


def connect(address: str | None, cpus_needed: float) -> bool:
    """Connects to Ray unless already connected; returns True if this call started or joined Ray.

    ``local`` (the default) starts a private instance sized for the run, never
    joining a cluster already running on the machine; ``auto`` joins the
    running cluster (what ``ray submit`` needs); anything else is probed, then
    goes to ``ray.init(address=...)`` (see ``distmaml.raycluster``).
    """
    from distmaml.raycluster import ClusterError
    from distmaml.raycluster import connect as join

    if ray.is_initialized():
        return False
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        kwargs["include_dashboard"] = False
    try:
        join(address, num_cpus=cpus, **kwargs)
    except ClusterError as e:
        raise EngineError(str(e)) from None
    return True


def worker_resources(config: Config) -> WorkerResources:
    """CPUs and GPUs of one worker; GPUs default to 1 where the cluster has them."""
    e = config.engine
    gpus = e.gpus_per_worker
    if gpus is None:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        gpus = 1.0 if has_gpus and config.device != "cpu" else 0.0
    return WorkerResources(cpus=e.cpus_per_worker, gpus=gpus)


def check_feasible(config: Config, res: WorkerResources) -> None:
    """Fails at once when the cluster could never hold the run (instead of waiting forever)."""
    total = ray.cluster_resources()
    w = config.workers
    asks = {"GPU": w * res.gpus, "CPU": w * res.cpus}
    for kind, need in asks.items():
        have = total.get(kind, 0.0)
        if need > have + 1e-9:
            per = "engine.gpus_per_worker" if kind == "GPU" else "engine.cpus_per_worker"
            raise EngineError(
                f"workers = {w} with {per} = {res.gpus if kind == 'GPU' else res.cpus} needs {need:g} {kind}s "
                f"but the Ray cluster has {have:g}; lower workers or {per}, or add nodes"
            )


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
        bundles = current.bundle_count
        if bundles < config.workers + 1:
            raise EngineError(
                f"the trial's placement group has {bundles} bundles but workers = {config.workers} "
                f"needs {config.workers + 1} (a driver bundle and one per worker)"
            )
        return Placement(current, 1, owned=False)
    check_feasible(config, res)
    wanted = [{"CPU": config.engine.driver_cpus}] + [res.bundle() for _ in range(config.workers)]
    group = placement_group(wanted, strategy=config.engine.placement, name=f"distmaml-run-{uuid.uuid4().hex[:8]}")
    try:
        ray.get(group.ready(), timeout=config.engine.startup_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise EngineError(
            f"the run's placement group {wanted} ({config.engine.placement}) was not placed within "
            f"engine.startup_timeout = {config.engine.startup_timeout:g}s; the cluster has "
            f"{ray.available_resources()} available: lower workers or the resources per worker"
        ) from None
    return Placement(group, 1, owned=True)
