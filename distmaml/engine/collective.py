"""The collective engine (``engine.reduce: collective``): the meta-step loop inside a Ray Train worker group.

The driver starts a ``TorchTrainer`` of ``workers`` workers (torch.distributed:
gloo on CPUs, NCCL on GPUs) and waits. Each worker runs the whole run's
program (``assembly.fit_in_group``): it builds the task program, the
meta-parameters and a ``Trainer`` on a ``GroupEngine``, computes its balanced
range of every step's task ids, all-reduces one flat buffer with the others and
takes the same outer step; nothing passes through the driver per step.

Rank 0 alone writes the run directory (checkpoints, ``result.json``) and runs
the callbacks (MLflow). At each checkpoint every worker calls
``ray.train.report`` (a barrier: all workers must call it equally often), rank 0
with a ``ray.train.Checkpoint`` holding the step's checkpoint file in a
run-directory layout (``checkpoints/step_N.pt``); Ray Train keeps those under
``RUN_DIR/train`` (a folder or the run's storage URI). A group that Ray Train
restarts after a failure (``engine.max_worker_failures``) continues from the
latest (``ray.train.get_checkpoint``). The last report carries the result,
which ``CollectiveEngine.fit`` returns on the driver.

With workers on several nodes the run directory must be one every worker can
reach: a storage URI (``s3://...``) or a shared folder.

A small actor, ``GroupControl``, links the driver and its group: Ray Train's
controller tells it of each restart after a worker died (``result.json``'s
``worker_replacements``, and the places of the losses in the line that stops
a run after too many), rank 0 tells it where the group is (start-up, the last
checkpoint, meta-test), and a SIGTERM or SIGINT on the driver (``distmaml.machine.interrupt``)
asks the group through it to stop after its current meta-step: rank 0 sees the
request, it travels in that step's all-reduced buffer to every worker
(``GroupEngine.stopped``), all stop after the same step, rank 0 checkpoints it,
and the driver raises ``Interrupted`` as the driver's engine does.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmaml import storage
from distmaml.cluster.placement import (
    EngineError,
    WorkerResources,
    check_feasible,
    connect,
    gpu_share,
    worker_resources,
)
from distmaml.config import Config
from distmaml.engine import elastic
from distmaml.engine.failures import STARTUP, failure_places
from distmaml.engine.group import GroupEngine
from distmaml.engine.protocol import TaskProgram
from distmaml.engine.shm import NODE_SUM, node_sum_setting
from distmaml.engine.testpoints import point
from distmaml.errors import DistmamlError
from distmaml.fastpath import malloc
from distmaml.machine import interrupt, memory
from distmaml.storage import Location, write_json

log = logging.getLogger("distmaml.engine")

TRAIN_FOLDER = "train"
"""Ray Train's own folder inside the run directory (its reported checkpoints and state)."""
RESULT_FILE = "result.json"
ERROR_FILE = "error.pickle"
STOP_WAIT = 60.0
"""Seconds the driver waits, after SIGTERM or SIGINT, for its group to stop after the step in flight
before it ends the group at once (its last checkpoint is then the last one rank 0 wrote)."""
WATCH_INTERVAL = 0.25
"""Seconds between rank 0's looks at ``GroupControl`` for a stop request."""


class GroupControl:
    """Between the driver and its worker group (a Ray actor without CPUs, one per ``fit``)."""

    def __init__(self) -> None:
        self.decisions: list[tuple[str, str]] = []
        """Ray Train's decision after each worker death (RETRY: a restart, RAISE: the run stops), with
        where the group was then."""
        self.phase = STARTUP
        self.step: int | None = None
        self.checkpoint: str | None = None
        self.stop = 0

    def failed(self, decision: str) -> None:
        self.decisions.append((decision, self.phase))

    def relaunched(self) -> int:
        """A worker died while Ray Train launched the group (its reply to "run the loop" lost): Ray Train
        gives up on such a loss (a controller error, never retried), the driver launches the group again.
        Counts it as the restart it is, in place of the RAISE Ray Train's callback may have told; returns
        the restarts so far."""
        if self.decisions and self.decisions[-1][0] == "RAISE":
            self.decisions.pop()
        self.decisions.append(("RETRY", self.phase))
        return sum(d == "RETRY" for d, _ in self.decisions)

    def at(self, phase: str, step: int | None = None, checkpoint: str | None = None) -> None:
        """Where rank 0 is; with ``checkpoint``: the latest it wrote, holding ``step``."""
        self.phase = phase
        if checkpoint is not None:
            self.step, self.checkpoint = step, checkpoint

    def request_stop(self, signum: int) -> None:
        self.stop = signum

    def stop_requested(self) -> int:
        return self.stop

    def state(self) -> dict[str, Any]:
        return {
            "replacements": sum(d == "RETRY" for d, _ in self.decisions),
            "places": failure_places({"during": place} for _, place in self.decisions),
            "phase": self.phase,
            "step": self.step,
            "checkpoint": self.checkpoint,
        }


@dataclass
class Member:
    """One worker of the group, as the run's program sees it (built by ``CollectiveEngine``'s workers)."""

    rank: int
    world: int
    restored: Path | None
    """A local run-directory layout (``checkpoints/step_N.pt``) of the checkpoint Ray Train restarts
    the group from, or None on a first start."""
    device: str | None = None
    """This worker's GPU (``cuda:K``, Ray Train's choice among the node's) where it has one, else None."""
    control: Any = None
    """The driver's ``GroupControl`` (None: a group started without one)."""
    replacements: int = 0
    """Restarts of the group after a worker died, before this one started."""

    @property
    def lead(self) -> bool:
        """Rank 0: writes the run directory, runs the callbacks, reports checkpoints."""
        return self.rank == 0

    def engine(self, runner: TaskProgram, batch_size: int) -> GroupEngine:
        """This worker's engine on ``runner`` (times ``batching: auto`` on its shard; a collective call).
        On rank 0 a thread watches ``GroupControl`` for a stop request and hands it to the engine."""
        engine = GroupEngine(runner, self.rank, self.world, batch_size=batch_size)
        engine.replacements = self.replacements
        if self.lead and self.control is not None:
            threading.Thread(target=_watch, args=(self.control, engine), daemon=True).start()
        return engine

    def at(self, phase: str, step: int | None = None, checkpoint: Location | None = None) -> None:
        """Rank 0 tells the driver where the group is (named in the line of a run that failed too often)."""
        if self.lead and self.control is not None:
            self.control.at.remote(phase, step, None if checkpoint is None else str(checkpoint))

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint: Location | None = None,
        result: dict[str, Any] | None = None,
        files: Sequence[Location] = (),
        error: BaseException | None = None,
    ) -> None:
        """``ray.train.report`` on every worker (a barrier); rank 0 attaches ``checkpoint`` (a step file),
        ``result`` and ``files`` of its run directory (``config.yaml``, ``mlflow_run_id``) as a
        ``ray.train.Checkpoint`` in a run-directory layout, and ``error``: an error every worker raised
        alike, which ``CollectiveEngine.fit`` raises on the driver (the group ends without a restart)."""
        import ray.train

        if not self.lead or (checkpoint is None and result is None and error is None):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="distmaml-report-") as tmp:
            folder = Path(tmp)
            if checkpoint is not None:
                (folder / "checkpoints").mkdir()
                _copy(checkpoint, folder / "checkpoints" / storage.name(checkpoint))
            for file in files:
                _copy(file, folder / storage.name(file))
            if result is not None:
                write_json(folder / RESULT_FILE, result)
            if error is not None:
                (folder / ERROR_FILE).write_bytes(pickle.dumps(error))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _copy(source: Location, dest: Path) -> None:
    """A local file is linked (free) or copied, a local folder copied; a URI is downloaded."""
    if isinstance(source, os.PathLike) and os.path.isdir(source):  # the run's MLflow outbox (tracking/)
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("lock", "*.tmp"))
    elif isinstance(source, os.PathLike):
        try:
            os.link(source, dest)  # the checkpoint file is never rewritten in place: writes are atomic renames
        except OSError:
            shutil.copy2(source, dest)
    else:
        dest.write_bytes(storage.read_bytes(source))


def control_state(control: Any) -> dict[str, Any]:
    """``GroupControl.state()``, or an empty start's if the actor does not answer (lost, restarting)."""
    import ray

    try:
        return ray.get(control.state.remote(), timeout=30)  # type: ignore[no-any-return]
    except Exception:
        return GroupControl().state()


def _watch(control: Any, engine: GroupEngine) -> None:
    """Rank 0's watcher: the driver's stop request into ``engine.stop_request`` (every worker gets it with
    the next meta-step's sum)."""
    import ray

    while True:
        try:
            signum = ray.get(control.stop_requested.remote(), timeout=30)
        except Exception:  # the driver and its actor are gone: Ray ends the group itself
            return
        if signum:
            engine.stop_request = signum
            point("stop_seen")  # a test that stopped the driver learns that the group has the request
            return
        time.sleep(WATCH_INTERVAL)


Program = Callable[[Member], None]
"""The run's program in each worker: trains, and ends with ``member.report(..., result=...)``."""


def _quiet_reports() -> None:
    """Drops Ray Train's INFO line per ``ray.train.report`` ("Reporting training result ...", its logger is
    named by its module's file): each would reach the driver's console from every worker."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: pins threads, finds the restart checkpoint, runs the program."""
    import ray.train

    torch.set_num_threads(max(1, loop_config["threads"]))
    malloc.claim()  # a worker process of distmaml's group: its runner keeps the memory it frees
    os.environ[NODE_SUM] = loop_config["node_sum"]  # the driver's setting, whatever the workers inherited
    _quiet_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    memory.share(context.get_local_world_size(), loop_config.get("gpu_share", 1))  # the node's workers split it
    program: Program = loop_config["program"]
    control = loop_config.get("control")
    replacements = 0
    if control is not None:
        import ray

        replacements = control_state(control)["replacements"]
        if rank == 0:
            control.at.remote(STARTUP)
    device = None
    if torch.cuda.is_available():
        import ray.train.torch

        device = str(ray.train.torch.get_device())  # workers sharing a node see its GPUs, each uses its own
    restored = ray.train.get_checkpoint()
    if restored is None:
        program(Member(rank, world, None, device, control, replacements))
        return
    with restored.as_directory() as folder:
        program(Member(rank, world, Path(folder), device, control, replacements))


class CollectiveEngine:
    """The driver's side of ``engine.reduce: collective``: starts the worker group, returns its result.

    ``workers`` Ray Train workers, each with ``engine.cpus_per_worker`` CPUs
    (torch threads) or ``engine.gpus_per_worker`` GPUs, placed by
    ``engine.placement``; Ray Train restarts the group from its latest
    checkpoint up to ``engine.max_worker_failures`` times.

    Example:
        >>> engine = CollectiveEngine(config, "local")
        >>> result = engine.fit(functools.partial(fit_in_group, ...), "runs/a")
    """

    runs_the_program = True
    """The whole run (trainer, callbacks, checkpoints) runs in the group's workers, not in the driver: what
    ``assembly.is_collective`` asks (the driver's engines compute shards for a trainer in the driver)."""

    replacements = 0

    def __init__(
        self, config: Config, address: str | None = None, *, runtime_env: dict[str, Any] | None = None
    ) -> None:
        if config.min_workers < 1:
            raise EngineError(f"workers = {config.workers}: the collective engine needs at least 1 worker")
        self.config = config
        self.workers = config.max_workers
        self.node_sum = node_sum_setting()  # a wrong value is said here, before anything starts
        self.callbacks: list[Any] = []
        """Ray Train ``UserCallback``s of the group (a Tune trial adds Tune's report callback)."""
        self.timing: dict[str, Any] = {}
        """After ``fit``: steps, compute (slowest worker's shard, summed over steps) and wall seconds, and
        how the workers summed (``GroupEngine.node_sum``)."""
        cpus = config.max_workers * config.engine.cpus_per_worker + config.engine.driver_cpus
        self._started_ray = connect(address, cpus, runtime_env)  # the job's: Ray Train's workers inherit it
        try:
            self.resources: WorkerResources = worker_resources(config)
            check_feasible(config, self.resources)
        except BaseException:
            self.close()
            raise

    def run_config(self, run_dir: Location | None, control: Any = None, restarts: int = 0) -> Any:
        """Ray Train's ``RunConfig``: its folder inside the run directory, failure handling, callbacks
        (with ``control``: one that tells it of each restart). ``restarts``: those this run has had
        already (in earlier launches of the group), which count against ``engine.max_worker_failures``."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

        common: dict[str, Any] = {
            "failure_config": FailureConfig(max_failures=max(0, self.config.engine.max_worker_failures - restarts)),
            "checkpoint_config": CheckpointConfig(num_to_keep=self.config.meta.keep_checkpoints + 1),  # +1: result
            "callbacks": [*self.callbacks, *_failure_counter(control)],
            "logging_config": LoggingConfig(log_level="WARNING"),  # not two lines per checkpoint on the console
        }
        if run_dir is None:  # Ray Train's default storage, a fresh name (the same for each launch of a fit)
            if restarts == 0 or not hasattr(self, "_anonymous"):
                self._anonymous = f"distmaml-{uuid.uuid4().hex[:8]}"
            return RunConfig(name=self._anonymous, **common)
        if storage.is_uri(run_dir):
            filesystem, path = storage.resolve(str(run_dir))
            where: dict[str, Any] = {"storage_path": path, "storage_filesystem": filesystem}
        else:
            where = {"storage_path": str(Path(run_dir).absolute())}
        return RunConfig(name=TRAIN_FOLDER, **where, **common)

    def fit(self, program: Program, run_dir: Location | None) -> dict[str, Any]:
        """Runs ``program`` in every worker of a new group; returns the result rank 0 reported last."""
        import ray
        from ray.train import ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        gpus = self.resources.gpus > 0
        trainer_class = _stoppable(_lean(TorchTrainer))
        # restarted if Ray's memory monitor or a lost node ends it (it starts afresh: its counts are lost)
        control: Any = ray.remote(num_cpus=0, max_restarts=-1)(GroupControl).remote()
        loop_config = {
            "program": program,
            "threads": self.resources.threads,
            "node_sum": self.node_sum,
            "gpu_share": gpu_share(self.resources.gpus),
        }

        def launch(restarts: int) -> Any:
            return trainer_class(
                _worker_main,
                train_loop_config={**loop_config, "control": control},
                torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
                scaling_config=ScalingConfig(
                    **elastic.scaling(self.config),
                    use_gpu=gpus,
                    resources_per_worker=self.resources.bundle(),
                    placement_strategy=self.config.engine.placement,
                ),
                run_config=self.run_config(run_dir, control, restarts),
            )

        try:
            restarts = 0
            while True:
                try:
                    outcome = self._fit(launch(restarts), control, run_dir)
                    break
                except _Relaunch as again:  # from its last checkpoint: Ray Train restores it from run_dir
                    restarts = again.restarts
        finally:
            try:
                self.replacements = control_state(control)["replacements"]
            finally:
                ray.kill(control)
        if outcome.error is not None:
            raise outcome.error
        result: dict[str, Any] | None = None
        if outcome.checkpoint is not None:
            with outcome.checkpoint.as_directory() as folder:
                path, error = Path(folder) / RESULT_FILE, Path(folder) / ERROR_FILE
                if error.is_file():  # written by this run's own rank 0
                    raise pickle.loads(error.read_bytes())
                result = json.loads(path.read_text()) if path.is_file() else None
        if result is None:  # Ray Train aborted the group (Ctrl-C) after its last checkpoint, before the end
            where = f"; continue it with distmaml train --resume {run_dir}" if run_dir is not None else ""
            step = (outcome.metrics or {}).get("step", 0)
            raise EngineError(
                f"the worker group stopped before the end of the run (last checkpoint: step {step}){where}"
            )
        self.timing = result.pop("timing", {})
        return result

    def _fit(self, trainer: Any, control: Any, run_dir: Location | None) -> Any:
        """``trainer.fit()``; after SIGTERM or SIGINT, the outcome of the group that stopped (``_stop``)."""

        try:
            with elastic.group_settings(self.config):
                return trainer.fit()
        except KeyboardInterrupt as e:
            stop = interrupt.stop_request(e)
            if stop is None or trainer.controller is None:
                raise
            return self._stop(trainer.controller, control, stop, run_dir)
        except Exception as e:
            if elastic.lost_while_launching(e):
                import ray

                restarts = ray.get(control.relaunched.remote())
                if restarts <= self.config.engine.max_worker_failures:
                    log.warning("a worker died while the group was launched; the group starts again")
                    raise _Relaunch(restarts) from None
            places = control_state(control)["places"]
            user = _user_error(e) or elastic.group_failure(e, self.config, run_dir, places)
            if user is not None:
                raise user from None
            raise

    def _stop(self, controller: Any, control: Any, stop: interrupt.Interrupted, run_dir: Location | None) -> Any:
        """Asks the group to stop after its current meta-step and returns Ray Train's outcome once it has
        (rank 0 reports the ``Interrupted`` with the step it saved). A group still starting, or one that
        has not stopped within ``STOP_WAIT`` seconds, is ended at once; ``stop`` then names the last
        checkpoint rank 0 wrote, if any."""
        import ray
        from ray.exceptions import RayActorError

        control.request_stop.remote(stop.signum)
        if control_state(control)["phase"] != STARTUP:
            deadline = time.monotonic() + STOP_WAIT
            while time.monotonic() < deadline:
                try:
                    if ray.get(controller.get_state.remote()).is_terminal():
                        return ray.get(controller.get_result.remote())
                except RayActorError:
                    break
                time.sleep(0.2)
        try:
            ray.get(controller.abort.remote())  # ends the worker group, then the controller itself
        except RayActorError:
            pass
        state = control_state(control)
        if state["checkpoint"] is not None:
            stop.step, stop.checkpoint = state["step"], storage.location(state["checkpoint"])
            stop.run_dir = run_dir
        raise stop

    def close(self) -> None:
        if self._started_ray:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            self._started_ray = False


class _Relaunch(Exception):
    """The group is to be launched again after a worker died while Ray Train launched it."""

    def __init__(self, restarts: int) -> None:
        super().__init__(restarts)
        self.restarts = restarts


def _stoppable(trainer_class: type) -> type:
    """``trainer_class`` that keeps the controller's handle (``.controller``) and, where
    ``distmaml.machine.interrupt`` handles SIGTERM and SIGINT (``distmaml train``), keeps those handlers instead
    of Ray Train's SIGINT handler (which aborts the group without a checkpoint of the last step)."""

    class Trainer(trainer_class):  # type: ignore[misc, valid-type]
        controller: Any = None

        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller
            if interrupt.installed():
                interrupt.reinstall()
            else:
                super()._register_sigint_handler(controller)

    return Trainer


def _failure_counter(control: Any) -> list[Any]:
    """A Ray Train controller callback that tells ``control`` of each decision after a worker died
    (none without ``control``, or on a Ray version without the hook)."""
    if control is None:
        return []
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:
        return []

    class CountFailures(ControllerCallback):  # type: ignore[misc]
        def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
            control.failed.remote(str(getattr(failure_decision, "value", failure_decision)))

    return [CountFailures()]


def _lean(trainer_class: type) -> type:
    """``trainer_class`` without two Ray Train helpers, each an actor (a Python process that imports Ray
    Train: about 1.3 s of CPU, taken from the workers as they start):

    - ``DatasetsCallback`` starts a ``DatasetManager`` actor for every group to hand out shards of Ray
      Datasets; distmaml's workers read their tasks themselves and pass no datasets.
    - ``PlacementGroupCleanerCallback`` starts a detached ``PlacementGroupCleaner`` that asks Ray's State
      API every second whether the controller is alive, to remove the group's placement group after a
      controller crash. It asks without the cluster's address, so Ray looks for "the" instance on the
      machine: where two run (another run's local Ray, a ``ray start`` cluster) it fails ("Found multiple
      active Ray instances", a traceback on the driver's console, seen in CI) or asks the other one, where
      the controller is not found and so counts as dead: it would remove a living group's placement group.
      Where the State API does not answer (an install without ``ray[default]``) it only warns every
      second. The placement group belongs to the driver's job: Ray removes it when the driver ends.

    Ray versions without one of these callbacks keep what they have; without the hook, ``trainer_class``."""
    unused: list[type] = []
    for module, name in (
        ("ray.train.v2._internal.callbacks", "DatasetsCallback"),
        ("ray.train.v2._internal.callbacks.placement_group_callback", "PlacementGroupCleanerCallback"),
    ):
        try:
            unused.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    if not unused:
        return trainer_class
    dropped = tuple(unused)

    class Trainer(trainer_class):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]

    return Trainer


def _user_error(error: BaseException) -> BaseException | None:
    """The first worker's ``DistmamlError`` (a setting to change, said in one line) inside Ray Train's error."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause: BaseException | None = failures[rank]
        while cause is not None:
            if isinstance(cause, DistmamlError):
                return cause
            cause = getattr(cause, "cause", None) or cause.__cause__
    return None
