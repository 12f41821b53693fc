"""The Ray engine: a pool of worker actors shares each meta-batch.

Per meta-step the driver sends the flat parameters (inside each call when
they are small, else through the object store once: ``params_arg``), gives
each actor a balanced range of the step's task ids, and adds the flat
gradient sums that come back, in worker order (so the result does not depend
on which shard finishes first). An actor that dies is replaced in its bundle
and its shard re-run: the step's result is unchanged.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from distmaml.cluster.placement import (
    EngineError,
    Placement,
    WorkerResources,
    connect,
    cpu_threads,
    gpu_share,
    job_ships_code,
    reserve,
    worker_resources,
)
from distmaml.config import Config
from distmaml.engine.failures import STARTUP, death_reason, failure_places
from distmaml.engine.protocol import EvalShard, GradShard, TaskProgram, to_wire
from distmaml.engine.shard import balanced_ranges, common_batching
from distmaml.engine.worker import ShardWorker
from distmaml.errors import DistmamlError

log = logging.getLogger("distmaml.engine")

_RemoteWorker = ray.remote(ShardWorker)

INLINE_BYTES = 64 * 1024
"""Parameters up to this size travel inside each call (Ray inlines a call's arguments of under 100 KiB);
larger ones are put into the object store once per step and every worker reads them there. A put and
each worker's fetch through its node cost more than a small copy per call: 1,761 float32 parameters
(the sinusoid MLP) to 2 actors took 3.0 ms per step through ``ray.put`` and 1.6 ms inline
(benchmarks/2026-12-05-params-inline.md)."""


def params_arg(flat: Tensor) -> Any:
    """The flat parameters as a worker call's argument: the raw buffer itself when it is at most
    ``INLINE_BYTES``, else an object store reference made once for all the workers."""
    wire = to_wire(flat)
    return wire if wire.nbytes <= INLINE_BYTES else ray.put(wire)  # a raw buffer, not a pickle


def _uploaded(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` with its local ``working_dir`` uploaded to the cluster, as ``ray.init`` does for a job's.

    An actor's runtime environment may only name a URI, not a local folder;
    Ray 2.60 has no public call for the upload that ``ray.init`` performs.
    """
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    return upload_working_dir_if_needed(dict(env), include_gitignore=True, scratch_dir=tempfile.gettempdir())


class WorkerFailure(EngineError):
    """More workers died than ``engine.max_worker_failures`` allows."""


class RayEngine:
    """``workers`` actors, each with ``engine.cpus_per_worker`` CPUs (torch threads) or one GPU.

    ``build_runner`` is a picklable function that builds the run's task
    program in each actor (``assembly.runner_factory``); of the config the
    engine reads only ``workers`` and ``engine.*``.
    """

    def __init__(
        self,
        config: Config,
        build_runner: Callable[[], TaskProgram],
        address: str | None = None,
        *,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        if config.elastic or config.max_workers < 1:
            raise EngineError(f"workers = {config.workers}: the Ray engine needs a fixed number of workers, 1 or more")
        self.config = config
        self.workers = config.max_workers
        self._build_runner = build_runner
        cpus = self.workers * config.engine.cpus_per_worker + config.engine.driver_cpus
        self._started_ray = connect(address, cpus, runtime_env)
        # The driver's share of the step (the sum of the shards, the outer step) runs on its own bundle's
        # CPUs, as each worker's on its own. With torch's default threads (one per core) every small op of
        # it woke an OpenMP thread that then spun on cores the workers were computing on: the README's
        # main job (2 workers on 2 cores) took 82-169 s instead of 55-59 s. Restored by close().
        self._caller_threads: int | None = torch.get_num_threads()
        torch.set_num_threads(cpu_threads(config.engine.driver_cpus))
        # Ray started by someone else (a test, a notebook's ray.init) without the user's code: the
        # actors carry it themselves. A job that ships code already (a Tune trial) passes it on.
        self._actor_env = (
            _uploaded(runtime_env) if runtime_env and not self._started_ray and not job_ships_code() else None
        )
        self.replacements = 0
        self.events: list[dict[str, Any]] = []
        """Each lost worker: its index, ``during`` (start-up, meta-step N, ...), the error, ``why`` (Ray's
        reason) and ``seconds``, from the loss noticed to its replacement's first answer."""
        self._lost: dict[int, float] = {}
        self.last_timing: dict[str, float] = {}
        try:
            self.resources: WorkerResources = worker_resources(config)
            self.placement: Placement = reserve(config, self.resources)
            self.actors = [self._start(i) for i in range(self.workers)]
            # Surfaces start-up errors now; each worker has timed its batching candidates by then. A worker
            # lost while it starts (a spot node reclaimed, an OOM kill while timing) is replaced like one
            # lost mid-step: its replacement starts over and is asked again.
            everyone = [range(i, i + 1) for i in range(self.workers)]
            described = self._run(everyone, lambda a, r: a.describe.remote(), STARTUP)
            self._batching = [d["batching"] for d in described]
            for i, d in enumerate(described):
                log.info("worker %d: %s", i, d["batching_line"])
            self._common = common_batching(self._batching)
            if self._common is not None:
                self._run(everyone, lambda a, r: a.use_batching.remote(self._common), STARTUP)
        except RayTaskError as e:  # a worker's own one line (not even one task fits its memory) stays one line
            self.close()
            if isinstance(e.cause, DistmamlError):
                raise e.cause from None
            raise
        except BaseException:
            self.close()
            raise

    # -- actors -----------------------------------------------------------------
    def _start(self, index: int, tasks: int | None = None) -> Any:
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement.group,
            placement_group_bundle_index=self.placement.first_worker_bundle + index,
        )
        return _RemoteWorker.options(
            num_cpus=self.resources.cpus,  # needed inside a placement group, GPU or not
            num_gpus=self.resources.gpus,
            scheduling_strategy=strategy,
            max_restarts=0,
            **({"runtime_env": self._actor_env} if self._actor_env else {}),
        ).remote(
            self._build_runner,
            self.resources.threads,
            self._shard_size(index) if tasks is None else tasks,
            (self._on_same_node(index), gpu_share(self.resources.gpus)),
        )

    def _on_same_node(self, index: int) -> int:
        """How many of the run's worker bundles share worker ``index``'s node (itself included)."""
        nodes = ray.util.placement_group_table(self.placement.group).get("bundles_to_node_id") or {}
        first = self.placement.first_worker_bundle
        mine = nodes.get(first + index)
        if mine is None:
            return 1
        return sum(nodes.get(first + i) == mine for i in range(self.workers))

    def _shard_size(self, index: int) -> int:
        """Tasks to prepare worker ``index`` for: ``batching: compiled`` compiles for exactly its shard's
        count; ``auto`` times the largest shard's count on every worker, so that their timings compare."""
        sizes = [len(r) for r in balanced_ranges(self.config.meta.batch_size, self.workers)]
        return sizes[index] if self.config.batching == "compiled" else max(sizes)

    def _start_worker(self, index: int) -> Any:
        common = getattr(self, "_common", None)
        if common is None:  # lost during start-up: the replacement times (or compiles) as the others did
            return self._start(index)
        # A replacement computes as the others do, without timing what is chosen already (seconds of a
        # replacement's start); ``compiled`` still compiles its shard's graph up front.
        actor = self._start(index, None if self.config.batching == "compiled" else 0)
        actor.use_batching.remote(common)  # runs before any shard: one actor's calls run in order
        return actor

    def _replace(self, index: int, error: RayActorError, what: str) -> None:
        if error.actor_init_failed:  # its constructor raised: an error in the program, not a lost worker
            raise error
        self.replacements += 1
        why = death_reason(error)
        self.events.append({"worker": index, "during": what, "error": type(error).__name__, "why": why})
        self._lost[index] = time.perf_counter()
        limit = self.config.engine.max_worker_failures
        if self.replacements > limit:
            raise WorkerFailure(
                f"worker {index} died during {what} ({why}): {self.replacements} worker failures exceed "
                f"engine.max_worker_failures = {limit} (during {failure_places(self.events)}); the run stops"
            )
        log.warning(
            "worker %d died during %s (%s); starting a replacement (%d of %d allowed)",
            index,
            what,
            why,
            self.replacements,
            limit,
        )
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[index] = self._start_worker(index)

    def _run(self, ranges: Sequence[range], submit: Callable[[Any, range], Any], what: str) -> list[Any]:
        """Runs one call per non-empty range; a dead actor is replaced and its range re-run."""
        pending = {i: submit(self.actors[i], r) for i, r in enumerate(ranges) if len(r)}
        results: dict[int, Any] = {}
        while pending:
            for i in sorted(pending):
                try:
                    results[i] = ray.get(pending.pop(i))
                    if i in self._lost:  # a replacement's first answer: how long the loss cost
                        lost = self._lost.pop(i)
                        event = next(e for e in reversed(self.events) if e["worker"] == i)
                        event["seconds"] = round(time.perf_counter() - lost, 3)
                except RayActorError as e:
                    self._replace(i, e, what)
                    pending[i] = submit(self.actors[i], ranges[i])
                except RayTaskError as e:
                    raise e.as_instanceof_cause() from None
        return [results[i] for i in sorted(results)]

    # -- the engine interface -----------------------------------------------------
    def meta_batch(self, flat: Tensor, step: int, batch_size: int) -> GradShard:
        t0 = time.perf_counter()
        ref = params_arg(flat)
        shards: list[GradShard] = self._run(
            balanced_ranges(batch_size, self.workers),
            lambda a, r: a.meta_grad.remote(ref, step, r.start, r.stop),
            f"meta-step {step}",
        )
        grad = shards[0].grad.clone()
        for s in shards[1:]:
            grad += s.grad
        compute = max(s.seconds for s in shards)
        self.last_timing = {"wall": time.perf_counter() - t0, "compute": compute}
        return GradShard(
            grad, sum(s.loss for s in shards), sum(s.metric for s in shards), sum(s.tasks for s in shards), compute
        )

    def evaluate(self, flat: Tensor, split: str, tasks: int, steps: int) -> EvalShard:
        ref = params_arg(flat)
        shards: list[EvalShard] = self._run(
            balanced_ranges(tasks, self.workers),
            lambda a, r: a.evaluate.remote(ref, split, r.start, r.stop, steps),
            f"{split} evaluation",
        )
        return EvalShard(torch.cat([s.before for s in shards]), torch.cat([s.after for s in shards]))

    def batching(self) -> dict[str, Any]:
        """The batching every worker uses, and each worker's own timings from start-up."""
        return {"choice": self._common or self._batching[0]["choice"], "workers": self._batching}

    def describe(self) -> list[dict[str, Any]]:
        """Per worker: pid, node id, GPU ids, device, threads."""
        return list(ray.get([a.describe.remote() for a in self.actors]))

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        placement = getattr(self, "placement", None)
        if placement is not None:
            placement.release()
            self.placement = None  # type: ignore[assignment]
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
        threads = getattr(self, "_caller_threads", None)
        if threads is not None:
            torch.set_num_threads(threads)
            self._caller_threads = None
