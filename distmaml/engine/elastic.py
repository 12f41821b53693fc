"""Elastic worker counts and worker failures of the collective engine: Ray Train's own handling, configured.

``workers: [min, max]`` becomes Ray Train's elastic ``ScalingConfig(num_workers=(min, max))``:
the group starts with as many workers as the cluster has room for, up to max.
When a worker dies (its process killed, its node lost) Ray Train stops the
whole group and starts a new one, from the latest checkpoint rank 0 reported,
with as many workers as the cluster then holds (at least min); while the group
runs, Ray Train looks for room for more every ``engine.resize_interval`` seconds
and restarts it larger from the latest checkpoint when it finds some. Ray
Train counts the live nodes' total resources (``ray.nodes()``, as its
autoscaling coordinator saw them at its last 20 s refresh), not their free
ones: room appears when a node joins, and a node whose resources another job
holds counts as room too (the group then waits ``engine.regroup_timeout`` for
a worker that cannot start, and Ray Train tries the same count again).

A restart changes nothing of the result: the tasks of step s are a pure
function of (seed, s, task id), every worker's shard is a range of task ids and
returns sums, and the checkpoint holds the parameters, the optimizer, the
learning-rate schedule and the step. A group of any size recomputes the steps
since that checkpoint and goes on where an undisturbed run would be (in float64
to rounding: the sums are added in another order).

What a restart costs, measured on one 2-core machine (``ray.cluster_utils.Cluster``,
tiny sinusoid runs): see docs/engines.md. Two waits dominate it:
starting the new group's processes (torch, the run's pieces: seconds, more on
a busy machine), and, after a lost node, Ray's view of the cluster's free
resources, refreshed every 20 s, which can still count that node, so the new
group may first wait for workers that cannot start; ``engine.regroup_timeout``
bounds that wait (Ray Train's default is 60 s), after which Ray Train tries
again with the workers it then sees.

Every restart after a worker death counts against ``engine.max_worker_failures``
(Ray Train's ``FailureConfig.max_failures``; a lost node is such a death, a
node drained for preemption is not); one more stops the run with
``GroupFailure``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from distmaml import storage
from distmaml.cluster.placement import EngineError
from distmaml.config import Config
from distmaml.engine.failures import death_reason
from distmaml.machine.environ import environ
from distmaml.storage import Location

REGROUP_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's wait for a (re)starting group's workers; propagated from the driver to its controller."""

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_SECONDS = 0.5
"""How often Ray Train's controller polls the group's workers (Ray's default: 2 s). It learns that the group
has started its loop, has finished, or has lost a worker only at a poll, one call to each worker: 2 s made a
5-step run on 2 workers 4-5 s longer (benchmarks/2026-12-05-collective-group.md)."""


class GroupFailure(EngineError):
    """The collective group lost workers more often than ``engine.max_worker_failures`` allows."""


def scaling(config: Config) -> dict[str, Any]:
    """The worker-count arguments of Ray Train's ``ScalingConfig``: fixed, or elastic between min and max."""
    workers: int | tuple[int, int] = (config.min_workers, config.max_workers) if config.elastic else config.max_workers
    return {"num_workers": workers, "elastic_resize_monitor_interval_s": config.engine.resize_interval}


@contextlib.contextmanager
def group_settings(config: Config) -> Iterator[None]:
    """Within: Ray Train waits ``engine.regroup_timeout`` seconds for a (re)starting group's workers and
    polls them every ``POLL_SECONDS``.

    Ray Train reads both from the driver's environment when ``fit`` starts; a
    value the user exported wins.
    """
    settings = {REGROUP_TIMEOUT_ENV: str(config.engine.regroup_timeout), POLL_ENV: str(POLL_SECONDS)}
    with environ({k: v for k, v in settings.items() if k not in os.environ}):
        yield


def _death(errors: dict[int, BaseException]) -> str | None:
    """Which worker died and why, in a few words; None when no worker died (an error in the program)."""
    from ray.exceptions import RayActorError

    for rank in sorted(errors):
        error = getattr(errors[rank], "health_check_failure", errors[rank])
        if isinstance(error, RayActorError):
            return f"rank {rank}: {death_reason(error)}"
    return None


def lost_while_launching(error: BaseException) -> bool:
    """Whether ``error`` is Ray Train's controller error for a worker that died while the controller
    launched the group's training loop (Ray Train waits for each worker's reply there, outside the
    checks that make a death a retried worker-group failure: it gives up at once)."""
    from ray.exceptions import RayActorError

    return isinstance(getattr(error, "controller_failure", None), RayActorError)


def group_failure(
    error: BaseException, config: Config, where: Location | None = None, places: str = ""
) -> GroupFailure | None:
    """``GroupFailure`` for Ray Train's error after a worker died once more than the config allows, else None.

    An error the program raised (not a death) is left as it is: a bug keeps its
    traceback. ``where``: the run directory, named so the user can resume from
    its last checkpoint. ``places``: where the group was at each loss (``start-up x4``).
    """
    from ray.train import WorkerGroupError

    if lost_while_launching(error):
        death: str | None = f"a worker, while the group launched: {death_reason(error.controller_failure)}"  # type: ignore[attr-defined]
    elif isinstance(error, WorkerGroupError):
        death = _death(dict(error.worker_failures))
    else:
        return None
    if death is None:
        return None
    limit = config.engine.max_worker_failures
    cause = f" (last: {death[:200]}; losses during {places})" if places else f" (last: {death[:200]})"
    resume = ""
    if where is not None and storage.listdir(storage.join(where, "checkpoints")):
        resume = f"; its last checkpoint is in {where}, --resume {where} continues it"
    elif where is not None:  # lost before its first checkpoint (while starting, say): nothing to resume
        resume = f"; nothing was checkpointed in {where} yet"
    return GroupFailure(
        f"the worker group failed {limit + 1} times{cause}, more than engine.max_worker_failures = {limit} "
        f"allows; the run stops{resume}"
    )
