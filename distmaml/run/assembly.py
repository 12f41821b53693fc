"""One run, assembled from its config: task family, network, algorithm, engine, callbacks.

Every entry point builds a run here and nowhere else: the CLI, a Tune trial,
the benchmark, ``distmaml evaluate`` and the tests. A Ray worker rebuilds its
part (the ``TaskRunner``) from the same config through ``runner_factory``.

The builders are named, one per piece (torchtitan's ``TrainSpec`` shape):

* ``build_family(config)`` -> ``TaskFamily``: ``FAMILIES[data.family]``, or the
  user's ``package.module:attr`` (``distmaml.run.usercode``);
* ``build_network(config)`` -> ``nn.Module``: ``NETWORKS[model.name]`` or the
  user's ``package.module:attr``, seeded by ``config.seed``, in ``config.precision``;
* ``build_algorithm(config)`` -> ``core.Algorithm``;
* ``build_runner(config)`` -> ``TaskRunner``, the ready task program an engine runs;
* ``make_engine(config)`` -> in-process or Ray engine, or the collective engine's launcher;
* ``tracking_callbacks(config, ...)`` -> ``[MlflowCallback]`` or ``[]``;
* ``assemble(config)`` -> ``Run``: all of them, and the initial meta-parameters.

Each builder also takes the user's callable instead of an import path
(``model=``, ``tasks=``: what ``distmaml.train`` passes); the Ray engine gets
them inside ``runner_factory``'s function, and the user's packages through the
job's runtime environment (``distmaml.run.shipping``).

Nothing below this module imports it (the trainer, the engine and tracking
receive what they need), and it imports ``cli`` never.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import nn

from distmaml import storage
from distmaml.config import IMAGE_FAMILIES, Config, ConfigError, config_from_dict, is_import_path
from distmaml.core.algorithm import Algorithm, InnerLoop, init_algorithm_params
from distmaml.data.errors import DataError
from distmaml.fastpath.malloc import keep_freed_memory_if_claimed
from distmaml.machine.interrupt import Interrupted
from distmaml.machine.memory import MemoryFitError
from distmaml.models import IMAGE_MODELS, build_model
from distmaml.run.checkpoint import load_checkpoint
from distmaml.run.runner import TaskRunner
from distmaml.run.trainer import Callback, Engine, NonFiniteError, Trainer
from distmaml.run.usercode import (
    FamilyFactory,
    ModelFactory,
    UserCodeError,
    UserTasks,
    build_user_model,
    check_run,
    resolve,
    resolve_loss,
)
from distmaml.storage import Location
from distmaml.tasks import SinusoidTasks, TaskFamily
from distmaml.tasks.noise import NoiseImageTasks
from distmaml.typing import Params

if TYPE_CHECKING:
    from distmaml.engine.collective import CollectiveEngine, Member
    from distmaml.engine.group import GroupEngine


# -- the task family ----------------------------------------------------------------
def _image_family(config: Config) -> TaskFamily:
    from distmaml.data.family import build_image_family  # lazily: pyarrow only for image stores

    return build_image_family(config)  # type: ignore[no-any-return]


FAMILIES: dict[str, Callable[[Config], TaskFamily]] = {
    "sinusoid": lambda c: SinusoidTasks(shots=c.data.shots, queries=c.data.queries, seed=c.seed),
    "noise": lambda c: NoiseImageTasks(
        c.data.ways, c.data.shots, c.data.queries, c.data.channels, c.data.image_size, c.seed
    ),
    **{name: _image_family for name in IMAGE_FAMILIES if name != "noise"},
}
"""``data.family`` -> builder of the task family from the config, for each of the registry
``config.FAMILIES`` (tests/test_config.py checks they name the same families)."""


def build_family(config: Config, tasks: FamilyFactory | None = None) -> TaskFamily:
    """The config's task family; an image store is opened (metadata only) or, for glyphs, generated.

    A user's family (``tasks``, else ``data.family`` as an import path) is
    checked and sets ``data.loss`` when it is unset.
    """
    if tasks is not None or is_import_path(config.data.family):
        label = f"data.family = {config.data.family!r}"
        family = UserTasks((tasks or resolve("data.family", config.data.family))(config), label)
        if config.data.loss not in (None, family.loss):
            raise UserCodeError(
                f"{label}: its loss is {family.loss!r} but data.loss = {config.data.loss!r}; drop data.loss"
            )
        config.data.loss = family.loss
        return family
    try:
        builder = FAMILIES[config.data.family]
    except KeyError:
        raise ConfigError(f"data.family = {config.data.family!r}: allowed values are {', '.join(FAMILIES)}") from None
    return builder(config)


# -- the network --------------------------------------------------------------------
def _mlp(config: Config) -> nn.Module:
    return build_model("mlp", in_features=1, out_features=1, hidden=config.model.hidden)


def _image_network(name: str, config: Config) -> nn.Module:
    """``conv4`` or ``resnet12`` on the family's images: ``data.ways`` outputs, ``model.filters`` wide."""
    if config.data.family == "noise" or is_import_path(config.data.family):  # no store: the data section says
        channels, height, width = config.data.channels, config.data.image_size, config.data.image_size
    else:
        from distmaml.data.family import image_shape

        channels, height, width = image_shape(config)  # the store's metadata (glyphs: generated if missing)
    if height != width:
        raise DataError(f"{name} needs square images; the store at data.path holds {height}x{width}")
    return build_model(
        name, out_features=config.data.ways, in_channels=channels, image_size=height, filters=config.model.filters
    )


NETWORKS: dict[str, Callable[[Config], nn.Module]] = {
    "mlp": _mlp,
    **{name: functools.partial(_image_network, name) for name in IMAGE_MODELS},
}
"""``model.name`` -> builder of the network from the config: the registry ``models.MODELS``, each name
with the config's settings it needs (tests/test_config.py checks they name the same networks)."""


def build_network(config: Config, model: ModelFactory | None = None) -> nn.Module:
    """The config's network, initialised from ``config.seed``, in its precision, on the CPU.

    A user's network (``model``, else ``model.name`` as an import path) is
    checked, and its torch batch-norm layers normalise by batch statistics
    (``usercode.build_user_model``).
    """
    if model is not None or is_import_path(config.model.name):
        factory = model or resolve("model.name", config.model.name)
        torch.manual_seed(config.seed)
        net = build_user_model(config, factory, f"model.name = {config.model.name!r}")
        return net.to(dtype=getattr(torch, config.precision))
    try:
        builder = NETWORKS[config.model.name]
    except KeyError:
        raise ConfigError(f"model.name = {config.model.name!r}: allowed values are {', '.join(NETWORKS)}") from None
    torch.manual_seed(config.seed)
    return builder(config).to(dtype=getattr(torch, config.precision))


# -- the algorithm ------------------------------------------------------------------
def build_algorithm(config: Config) -> Algorithm:
    """The config's algorithm with its inner loop (``algorithm``, ``inner.*``, ``mamlpp.*``)."""
    return Algorithm(
        name=config.algorithm,
        inner=InnerLoop(
            lr=config.inner.lr, steps=config.inner.steps, first_order=config.first_order, loss=resolve_loss(config)
        ),
        mamlpp=config.mamlpp,
        recompute=config.inner.recompute,
    )


def init_meta_params(config: Config, model: nn.Module) -> Params:
    """Initial meta-parameters: the model's plus the algorithm's own (rates, per-step batch-norm).

    The names are what ``ParamLayout`` flattens; driver and workers build the
    same dict from the same config, so they agree on the layout.
    """
    return init_algorithm_params(model, build_algorithm(config))


# -- the task program and the engine ----------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA where visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is visible; use --set device=cpu")
    return torch.device(name)


def build_runner(
    config: Config | dict[str, Any],
    device: str | None = None,
    *,
    network: nn.Module | None = None,
    family: TaskFamily | None = None,
    model: ModelFactory | None = None,
    tasks: FamilyFactory | None = None,
) -> TaskRunner:
    """The ready task program of ``config`` on ``device`` (default: ``config.device``).

    ``network`` and ``family``: pieces already built from the same config
    (the network is copied, not moved); ``model`` and ``tasks``: the user's
    builders of them (see ``build_network``, ``build_family``).

    The calling process computes with it, so where it is distmaml's own
    process it keeps the memory it frees from now on (``fastpath.malloc``).
    """
    keep_freed_memory_if_claimed()
    config = config if isinstance(config, Config) else config_from_dict(config)
    family = family if family is not None else build_family(config, tasks)
    return TaskRunner(
        copy.deepcopy(network) if network is not None else build_network(config, model),
        build_algorithm(config),
        family,
        device=resolve_device(device or config.device),
        batching=config.batching,
    )


def runner_factory(
    config: Config, model: ModelFactory | None = None, tasks: FamilyFactory | None = None
) -> Callable[[], TaskRunner]:
    """A picklable function that builds the config's ``TaskRunner`` where it is called (a Ray worker).

    The user's ``model`` and ``tasks`` callables travel inside it (cloudpickle:
    by value when defined in ``__main__`` or a notebook, else by reference to
    their module, which ``distmaml.run.shipping`` ships).
    """
    if model is None and tasks is None:
        return functools.partial(build_runner, config.to_dict())
    return functools.partial(build_runner, config.to_dict(), model=model, tasks=tasks)


def user_runtime_env(
    config: Config, model: ModelFactory | None = None, tasks: FamilyFactory | None = None
) -> dict[str, Any] | None:
    """The Ray runtime environment that ships the user's packages to every worker, or None (nothing to ship).

    With one, workers run in Ray's copy of the packages rather than in the
    driver's folder: a relative ``data.path`` is made absolute here first.
    """
    from distmaml.run.shipping import runtime_env
    from distmaml.storage import is_uri

    env = runtime_env(config, model, tasks)
    path = config.data.path
    if env is not None and path and not is_uri(path) and not Path(path).expanduser().is_absolute():
        config.data.path = str(Path(path).expanduser().resolve())
    return env


def make_engine(
    config: Config,
    address: str | None = None,
    *,
    runner: TaskRunner | None = None,
    model: ModelFactory | None = None,
    tasks: FamilyFactory | None = None,
) -> Engine | CollectiveEngine:
    """``workers: 0``: the in-process engine (on ``runner`` if given); else at ``address`` the Ray engine
    (``engine.reduce: driver``) or the collective engine's launcher (``engine.reduce: collective``).

    Either starts Ray with the runtime environment that ships the user's code
    (``user_runtime_env``) when this process has not started it yet.
    """
    if config.engine.reduce == "collective":
        from distmaml.engine.collective import CollectiveEngine

        return CollectiveEngine(config, address, runtime_env=user_runtime_env(config, model, tasks))
    if config.workers == 0:
        from distmaml.engine import InProcessEngine

        return InProcessEngine(
            runner if runner is not None else build_runner(config, model=model, tasks=tasks),
            batch_size=config.meta.batch_size,
        )
    from distmaml.engine.ray_engine import RayEngine

    env = user_runtime_env(config, model, tasks)
    return RayEngine(config, runner_factory(config, model, tasks), address, runtime_env=env)


# -- tracking -----------------------------------------------------------------------
def with_absolute_uri(config: Config) -> Config:
    """Pins a relative ``tracking.uri`` to this directory before any worker or trial sees the config."""
    if config.tracking.enabled:
        from distmaml.tracking.uri import absolute_uri

        config.tracking.uri = absolute_uri(config.tracking.uri)
    return config


def tracking_callbacks(
    config: Config, *, network: nn.Module, algorithm: Algorithm, family: TaskFamily, **kwargs: Any
) -> list[Callback]:
    """``[MlflowCallback]`` when ``tracking.enabled``, else ``[]``; ``kwargs`` go to ``MlflowCallback``."""
    if not config.tracking.enabled:
        return []
    from distmaml.tracking import MlflowCallback

    return [MlflowCallback(config, network=network, algorithm=algorithm, family=family, **kwargs)]


# -- the run ------------------------------------------------------------------------
def fail_callbacks(callbacks: Sequence[Callback], error: BaseException) -> None:
    """Ends each callback's run (MLflow) as KILLED (a scheduler's ``SystemExit``, SIGTERM/SIGINT's
    ``KeyboardInterrupt``) or FAILED."""
    status = "KILLED" if isinstance(error, (SystemExit, KeyboardInterrupt)) else "FAILED"
    for cb in callbacks:
        fail = getattr(cb, "fail", None)
        if fail is not None:
            fail(status)


@dataclass
class Run:
    """A run, assembled: its pieces, ready for a ``Trainer``."""

    config: Config
    family: TaskFamily
    network: nn.Module
    """The network on the driver (CPU), initialised from ``config.seed``."""
    algorithm: Algorithm
    params: Params
    """Initial meta-parameters (the network's and the algorithm's own)."""
    engine: Engine | CollectiveEngine
    """The driver's engine; with ``engine.reduce: collective`` the launcher of the worker group, which
    runs the trainer in its workers (``fit_in_group``)."""
    callbacks: list[Callback]
    tracking: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``MlflowCallback`` (a collective group's rank 0 builds its own)."""
    model: ModelFactory | None = None
    """The user's network builder given instead of ``model.name`` (``distmaml.train``); a collective
    group's workers build with it."""
    tasks: FamilyFactory | None = None
    """The user's task-family builder given instead of ``data.family``."""

    def trainer(
        self, run_dir: Any = None, *, progress: bool = True, resume: bool = False, callbacks: Sequence[Callback] = ()
    ) -> Trainer:
        """A trainer on the driver's engine (not for ``engine.reduce: collective``: see ``fit``)."""
        if is_collective(self.engine):
            raise TypeError("engine.reduce = 'collective' trains in its worker group: call Run.fit")
        return Trainer(
            self.config,
            cast(Engine, self.engine),
            run_dir,
            params=self.params,
            callbacks=[*self.callbacks, *callbacks],
            progress=progress,
            resume=resume,
        )

    def fit(
        self, run_dir: Any = None, *, progress: bool = True, resume: bool = False, callbacks: Sequence[Callback] = ()
    ) -> dict[str, Any]:
        """Trains to ``meta.steps`` and meta-tests; closes the engine.

        On any error each callback's run is ended as FAILED (KILLED when a
        scheduler stopped it by ``SystemExit``, or SIGTERM/SIGINT by ``KeyboardInterrupt``) and the error
        raised again.
        """
        everyone = [*self.callbacks, *callbacks]
        try:
            if is_collective(self.engine):  # the group's rank 0 runs the callbacks; they travel there
                where = storage.location(run_dir) if run_dir is not None else None
                if isinstance(where, Path):  # rank 0 writes it from its own working directory (Ray's copy of
                    where = where.absolute()  # the user's code, or elsewhere): a relative folder would land there
                program = functools.partial(
                    fit_in_group,
                    config=self.config.to_dict(),
                    run_dir=where,
                    resume=resume,
                    progress=progress,
                    tracking=self.tracking,
                    callbacks=list(callbacks),
                    model=self.model,
                    tasks=self.tasks,
                )
                try:
                    return self.engine.fit(program, where)
                except Interrupted as stop:  # name the run directory as the caller did, not rank 0's absolute path
                    if stop.checkpoint is not None and isinstance(where, Path) and run_dir is not None:
                        given = storage.location(run_dir)
                        stop.checkpoint, stop.run_dir = given / Path(stop.checkpoint).relative_to(where), given
                    raise
            return self.trainer(run_dir, progress=progress, resume=resume, callbacks=callbacks).fit()
        except BaseException as e:
            fail_callbacks(everyone, e)
            raise
        finally:
            self.close()

    def close(self) -> None:
        self.engine.close()


def assemble(
    config: Config,
    address: str | None = None,
    *,
    tracking: dict[str, Any] | None = None,
    model: ModelFactory | None = None,
    tasks: FamilyFactory | None = None,
) -> Run:
    """Builds every piece of ``config``'s run; the engine last, after the data and the network are known good.

    Args:
        config: the resolved config (``tracking.uri`` absolute, see ``with_absolute_uri``).
        address: Ray address for the Ray engine (``local``, ``auto``, ``host:port``).
        tracking: keyword arguments of ``MlflowCallback`` (a sweep's experiment, parent run, tags).
        model: the user's network builder, instead of ``model.name`` (``distmaml.train``).
        tasks: the user's task-family builder, instead of ``data.family``.

    Example:
        >>> run = assemble(load_config("sinusoid", ["workers=0", "meta.steps=100"]))
        >>> result = run.fit("runs/s")
    """
    family = build_family(config, tasks)  # a missing or unfit task store is reported here, before any worker starts
    network = build_network(config, model)
    user_model = model is not None or is_import_path(config.model.name)
    user_family = tasks is not None or is_import_path(config.data.family)
    if user_model or user_family:  # the user's code, tried once here: its faults are one line, not a dead worker
        check_run(config, network, family, user_model=user_model, user_family=user_family)
    algorithm = build_algorithm(config)
    params = init_algorithm_params(network, algorithm)
    collective = config.engine.reduce == "collective"  # its rank 0 builds the tracking callbacks
    callbacks = (
        []
        if collective
        else tracking_callbacks(config, network=network, algorithm=algorithm, family=family, **(tracking or {}))
    )
    runner = build_runner(config, network=network, family=family) if config.workers == 0 else None
    engine = make_engine(config, address, runner=runner, model=model, tasks=tasks)
    return Run(config, family, network, algorithm, params, engine, callbacks, dict(tracking or {}), model, tasks)


# -- a collective group's worker --------------------------------------------------------
def is_collective(engine: object) -> TypeGuard[CollectiveEngine]:
    """Whether ``engine`` runs the whole program in its workers (``CollectiveEngine.runs_the_program``),
    asked without importing Ray Train."""
    return getattr(engine, "runs_the_program", False) is True


SAME_ON_EVERY_WORKER = (NonFiniteError, ConfigError, MemoryFitError)
"""Errors every worker of a group raises at the same point, decided from values all share (the reduced
meta-gradient, the gathered scores, the checkpoint's config; a memory refusal, gathered at start-up by
``GroupEngine``): reported, they end the group at once instead of Ray Train restarting it
``engine.max_worker_failures`` times into the same error."""


class GroupReporter(Callback):
    """Every worker's ``ray.train.report`` at each checkpoint (rank 0's with the checkpoint file and the
    run directory's ``config.yaml`` and ``mlflow_run_id``), and the result at the end. After a meta-step
    that carried the driver's stop request (``GroupEngine.stopped``) it stops the trainer, on every
    worker alike, as a signal would (``Interrupted``)."""

    SIDE_FILES = ("config.yaml", "mlflow_run_id")
    OUTBOX = "tracking"
    """The MLflow outbox folder: a Tune trial's checkpoint carries it (``distmaml sync`` takes it there)."""

    def __init__(self, member: Member, engine: GroupEngine | None = None) -> None:
        self.member = member
        self.engine = engine
        self.run_dir: Location | None = None
        self.steps = 0

    def on_start(self, trainer: Trainer) -> None:
        self.run_dir = trainer.run_dir
        self.steps = trainer.config.meta.steps
        self.member.at(f"meta-steps from step {trainer.step}", trainer.step, trainer.last_checkpoint)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.engine is not None and self.engine.stopped:
            raise Interrupted(self.engine.stopped)

    def files(self) -> list[Location]:
        if self.run_dir is None:
            return []
        files = [f for name in self.SIDE_FILES if storage.is_file(f := storage.join(self.run_dir, name))]
        outbox = storage.join(self.run_dir, self.OUTBOX)
        return [*files, outbox] if isinstance(outbox, Path) and outbox.is_dir() else files

    def on_checkpoint(self, step: int, metrics: dict[str, float], checkpoint: Location | None) -> None:
        self.member.report({**metrics, "step": step}, checkpoint, files=self.files() if checkpoint else ())
        self.member.at("meta-test" if step == self.steps else f"meta-steps after step {step}", step, checkpoint)

    def finish(self, step: int, checkpoint: Location | None, result: dict[str, Any]) -> None:
        self.member.report({"step": step}, checkpoint, result=result, files=self.files())


def fit_in_group(
    member: Member,
    *,
    config: dict[str, Any],
    run_dir: Location | None,
    resume: bool,
    progress: bool,
    tracking: dict[str, Any],
    callbacks: list[Callback],
    model: ModelFactory | None = None,
    tasks: FamilyFactory | None = None,
) -> None:
    """The run in one worker of a collective group (``engine.collective``'s program).

    Every worker builds the same run from ``config`` and trains it on its
    ``GroupEngine``; rank 0 alone writes ``run_dir``, runs the tracking and
    the given ``callbacks`` and reports the result. A group restarted by Ray
    Train continues from ``member.restored``, with ``resume`` from
    ``run_dir``'s newest checkpoint if that is newer.
    """
    from distmaml.engine.testpoints import point

    point("startup")
    cfg = config_from_dict(config)
    family = build_family(cfg, tasks)
    network = build_network(cfg, model)
    algorithm = build_algorithm(cfg)
    params = init_algorithm_params(network, algorithm)
    device = member.device if cfg.device != "cpu" else None
    try:
        engine = member.engine(build_runner(cfg, device, network=network, family=family), cfg.meta.batch_size)
    except MemoryFitError as e:  # gathered at start-up: every worker raises the same refusal
        member.report({"step": 0}, error=e)
        return
    everyone: list[Callback] = []
    if member.lead:
        everyone = [
            *tracking_callbacks(cfg, network=network, algorithm=algorithm, family=family, **tracking),
            *callbacks,
        ]
    reporter = GroupReporter(member, engine)
    trainer = Trainer(
        cfg,
        engine,
        run_dir if member.lead else None,
        params=params,
        callbacks=[*everyone, reporter],
        progress=progress and member.lead,
        echo=member.lead,
    )
    restored = member.restored
    saved = [load_checkpoint(restored)] if restored is not None and (restored / "checkpoints").is_dir() else []
    if resume:
        if run_dir is None:
            raise ValueError("resume needs a run directory")
        saved.append(load_checkpoint(run_dir))
    try:
        if saved:  # the newest: rank 0 writes the run directory's checkpoint before reporting it to Ray Train
            trainer.restore(max(saved, key=lambda c: c.step))
        result = trainer.fit()
    except (*SAME_ON_EVERY_WORKER, Interrupted) as e:  # a stop the driver asked for: every worker alike
        fail_callbacks(everyone, e)
        member.report({"step": trainer.step}, trainer.last_checkpoint, files=reporter.files(), error=e)
        return
    except BaseException as e:
        fail_callbacks(everyone, e)
        raise
    timing = engine.timing()  # every worker: a collective call
    reporter.finish(trainer.step, trainer.last_checkpoint, {**result, "timing": timing})
