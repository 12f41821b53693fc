"""One run, assembled from its config: task family, network, algorithm, engine, callbacks.

Every entry point builds a run here and nowhere else: the CLI, a Tune trial,
the benchmark, ``distmaml evaluate`` and the tests. A Ray worker rebuilds its
part (the ``TaskRunner``) from the same config through ``runner_factory``.

The builders are named, one per piece (torchtitan's ``TrainSpec`` shape):

* ``build_family(config)`` -> ``TaskFamily``: ``FAMILIES[data.family]``;
* ``build_network(config)`` -> ``nn.Module``: ``NETWORKS[model.name]``, seeded
  by ``config.seed``, in ``config.precision``;
* ``build_algorithm(config)`` -> ``core.Algorithm``;
* ``build_runner(config)`` -> ``TaskRunner``, the ready task program an engine runs;
* ``make_engine(config)`` -> in-process or Ray engine;
* ``tracking_callbacks(config, ...)`` -> ``[MlflowCallback]`` or ``[]``;
* ``assemble(config)`` -> ``Run``: all of them, and the initial meta-parameters.

Nothing below this module imports it (the trainer, the engine and tracking
receive what they need), and it imports ``cli`` never.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distmaml.config import IMAGE_FAMILIES, Config, ConfigError, config_from_dict
from distmaml.core.algorithm import Algorithm, InnerLoop, init_algorithm_params
from distmaml.data.errors import DataError
from distmaml.models import build_model
from distmaml.runner import TaskRunner
from distmaml.tasks import SinusoidTasks, TaskFamily
from distmaml.tasks.noise import NoiseImageTasks
from distmaml.trainer import Callback, Engine, Trainer
from distmaml.typing import Params


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
"""``data.family`` -> builder of the task family from the config."""


def build_family(config: Config) -> TaskFamily:
    """The config's task family; an image store is opened (metadata only) or, for glyphs, generated."""
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
    if config.data.family == "noise":
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
    "conv4": functools.partial(_image_network, "conv4"),
    "resnet12": functools.partial(_image_network, "resnet12"),
}
"""``model.name`` -> builder of the network from the config."""


def build_network(config: Config) -> nn.Module:
    """The config's network, initialised from ``config.seed``, in its precision, on the CPU."""
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
        inner=InnerLoop(lr=config.inner.lr, steps=config.inner.steps, first_order=config.first_order, loss=config.loss),
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
) -> TaskRunner:
    """The ready task program of ``config`` on ``device`` (default: ``config.device``).

    ``network`` and ``family``: pieces already built from the same config
    (the network is copied, not moved).
    """
    config = config if isinstance(config, Config) else config_from_dict(config)
    return TaskRunner(
        copy.deepcopy(network) if network is not None else build_network(config),
        build_algorithm(config),
        family if family is not None else build_family(config),
        device=resolve_device(device or config.device),
        batching=config.batching,
    )


def runner_factory(config: Config) -> Callable[[], TaskRunner]:
    """A picklable function that builds the config's ``TaskRunner`` where it is called (a Ray worker)."""
    return functools.partial(build_runner, config.to_dict())


def make_engine(config: Config, address: str | None = None, *, runner: TaskRunner | None = None) -> Engine:
    """``workers: 0``: the in-process engine (on ``runner`` if given); else the Ray engine at ``address``."""
    if config.workers == 0:
        from distmaml.engine import InProcessEngine

        return InProcessEngine(runner if runner is not None else build_runner(config))
    from distmaml.engine.ray_engine import RayEngine

    return RayEngine(config, runner_factory(config), address)


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
    engine: Engine
    callbacks: list[Callback]

    def trainer(
        self, run_dir: Any = None, *, progress: bool = True, resume: bool = False, callbacks: Sequence[Callback] = ()
    ) -> Trainer:
        return Trainer(
            self.config,
            self.engine,
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
            return self.trainer(run_dir, progress=progress, resume=resume, callbacks=callbacks).fit()
        except BaseException as e:
            status = "KILLED" if isinstance(e, (SystemExit, KeyboardInterrupt)) else "FAILED"
            for cb in everyone:
                fail = getattr(cb, "fail", None)
                if fail is not None:
                    fail(status)
            raise
        finally:
            self.close()

    def close(self) -> None:
        self.engine.close()


def assemble(config: Config, address: str | None = None, *, tracking: dict[str, Any] | None = None) -> Run:
    """Builds every piece of ``config``'s run; the engine last, after the data and the network are known good.

    Args:
        config: the resolved config (``tracking.uri`` absolute, see ``with_absolute_uri``).
        address: Ray address for the Ray engine (``local``, ``auto``, ``host:port``).
        tracking: keyword arguments of ``MlflowCallback`` (a sweep's experiment, parent run, tags).

    Example:
        >>> run = assemble(load_config("sinusoid", ["workers=0", "meta.steps=100"]))
        >>> result = run.fit("runs/s")
    """
    family = build_family(config)  # a missing or unfit task store is reported here, before any worker starts
    network = build_network(config)
    algorithm = build_algorithm(config)
    params = init_algorithm_params(network, algorithm)
    callbacks = tracking_callbacks(config, network=network, algorithm=algorithm, family=family, **(tracking or {}))
    runner = build_runner(config, network=network, family=family) if config.workers == 0 else None
    engine = make_engine(config, address, runner=runner)
    return Run(config, family, network, algorithm, params, engine, callbacks)
