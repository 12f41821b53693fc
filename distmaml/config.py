"""Typed, validated run configuration.

A config is built from a built-in recipe (``distmaml/recipes/NAME.yaml``) or a
YAML file, then dotted overrides (``--set inner.lr=0.4``). Every value is
checked when the config is made; a bad one raises ``ConfigError`` with one
line that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distmaml.core.algorithm import ALGORITHMS, LEARNED_STEP_RATES, MamlppOptions
from distmaml.core.batching import ALLOWED_BATCHINGS, COMPILED
from distmaml.errors import DistmamlError
from distmaml.models.registry import IMAGE_MODELS, MODELS

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(DistmamlError, ValueError):
    """A bad configuration value; the message is one line that says what to change."""


def _check(key: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {allowed}")


def _positive(key: str, value: float) -> None:
    _check(key, value, value > 0, "must be greater than 0")


def _at_least(key: str, value: int, low: int) -> None:
    _check(key, value, value >= low, f"must be at least {low}")


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    _check(key, value, value in allowed, f"allowed values are {', '.join(allowed)}")


IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_<][\w<>]*(\.[A-Za-z_<][\w<>]*)*")
"""``package.module:attr`` (uvicorn's and entry points' convention); ``attr`` may be dotted
(``Class.method``); ``<locals>`` and ``<lambda>`` appear where ``distmaml.train`` records a callable."""


def is_import_path(name: str) -> bool:
    """True for ``package.module:attr``: a user's model or task family rather than a built-in name."""
    return IMPORT_PATH.fullmatch(name) is not None


def _builtin_or_path(key: str, value: str, builtins: tuple[str, ...]) -> None:
    ok = value in builtins or is_import_path(value)
    _check(key, value, ok, f"allowed values are {', '.join(builtins)}, or your own as package.module:attr")


@dataclass(kw_only=True)
class MetaConfig:
    steps: int = 10000
    """Outer (meta) steps."""
    batch_size: int = 25
    """Tasks per meta-batch (T)."""
    lr: float = 1e-3
    """Outer learning rate (Adam)."""
    val_every: int = 500
    """Validate every this many meta-steps (0: only at the end)."""
    val_tasks: int = 100
    """Meta-validation tasks per validation."""
    test_tasks: int = 600
    """Meta-test tasks at the end of the run and in ``distmaml evaluate``."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many meta-steps (and always at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""

    def validate(self) -> None:
        _at_least("meta.steps", self.steps, 1)
        _at_least("meta.batch_size", self.batch_size, 1)
        _positive("meta.lr", self.lr)
        _at_least("meta.val_every", self.val_every, 0)
        _at_least("meta.val_tasks", self.val_tasks, 1)
        _at_least("meta.test_tasks", self.test_tasks, 1)
        _at_least("meta.checkpoint_every", self.checkpoint_every, 1)
        _at_least("meta.keep_checkpoints", self.keep_checkpoints, 1)


@dataclass(kw_only=True)
class InnerConfig:
    lr: float = 0.01
    """Inner (task) learning rate, alpha."""
    steps: int = 1
    """Inner gradient steps during meta-training."""
    test_steps: int | None = None
    """Inner gradient steps at meta-validation and meta-test time. None (the default): the
    algorithm's own, resolved when the config is made: ``inner.steps`` for algorithms whose rates
    are learned for those steps (metasgd, mamlpp), else ``MAML_TEST_STEPS``."""
    first_order: bool = False
    """First-order MAML: inner gradients treated as constants."""
    recompute: bool = False
    """Gradient checkpointing of the inner steps: recompute each step's graph in the backward
    pass instead of storing all of them (memory flat in ``inner.steps``; same meta-gradient)."""

    def validate(self) -> None:
        _positive("inner.lr", self.lr)
        _at_least("inner.steps", self.steps, 1)
        if self.test_steps is not None:
            _at_least("inner.test_steps", self.test_steps, 0)


LOSS_NAMES = ("mse", "cross_entropy")


@dataclass(frozen=True)
class BuiltinFamily:
    loss: str
    """What ``data.loss`` resolves to."""
    images: bool
    """Whether its tasks are images (for ``conv4`` or ``resnet12``) rather than vectors (for ``mlp``)."""


FAMILIES = {
    "sinusoid": BuiltinFamily("mse", images=False),
    "glyphs": BuiltinFamily("cross_entropy", images=True),
    "store": BuiltinFamily("cross_entropy", images=True),
    "noise": BuiltinFamily("cross_entropy", images=True),
}
"""The registry of built-in task families, ``data.family`` -> what config checks of it; the run's
assembly has a builder for each (``distmaml.run.assembly.FAMILIES``, tests/test_config.py)."""
DATA_FAMILIES = tuple(FAMILIES)
IMAGE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.images)
BUILTIN_LOSS = {name: family.loss for name, family in FAMILIES.items()}
"""The loss of each built-in family (``data.loss`` resolves to it)."""


@dataclass(kw_only=True)
class DataConfig:
    family: str = "sinusoid"
    """Task family: ``sinusoid`` (synthetic regression), ``glyphs`` (generated glyph images, prepared
    on first use), ``store`` (the task store that ``distmaml prepare`` wrote at ``data.path``),
    ``noise`` (random images, for benchmarks), or your own as ``package.module:attr``:
    ``attr(config)`` returns an object with ``loss`` and ``sample(split, step, task_ids)``."""
    loss: str | None = None
    """``mse`` or ``cross_entropy``; None (the default): the family's own, resolved when the config
    is made for the built-in families and when the run is assembled for your own (its ``loss``)."""
    ways: int = 5
    """Classes per task (N); classification only."""
    shots: int = 10
    """Support examples per class (K), or per task for regression."""
    queries: int = 10
    """Query examples per class (Q), or per task for regression."""
    path: str | None = None
    """Task store folder for image families (``glyphs``: default ``~/.cache/distmaml/glyphs-v1``)."""
    image_size: int = 28
    """Side of the square images of the ``noise`` family (stores carry their own shape)."""
    channels: int = 1
    """Channels of the ``noise`` family's images."""
    prepare: str | None = None
    """The ``distmaml prepare KIND ...`` command that writes this recipe's store at ``data.path``
    (recipes state it; ``distmaml recipes`` lists it). Documentation only: a run never calls it."""

    def validate(self) -> None:
        _builtin_or_path("data.family", self.family, DATA_FAMILIES)
        if self.loss is not None:
            _one_of("data.loss", self.loss, LOSS_NAMES)
        _at_least("data.ways", self.ways, 2)
        _at_least("data.shots", self.shots, 1)
        _at_least("data.queries", self.queries, 1)
        _check(
            "data.image_size", self.image_size, self.image_size >= 16, "must be at least 16 (conv4 halves it 4 times)"
        )
        _at_least("data.channels", self.channels, 1)
        if self.prepare is not None:
            ok = self.prepare.split()[:2] == ["distmaml", "prepare"] and len(self.prepare.split()) > 2
            _check("data.prepare", self.prepare, ok, "must be a command `distmaml prepare KIND ...`, or null")

    @property
    def dataset(self) -> str:
        """The data set's name: the folder of a ``store`` family's ``data.path``, else ``data.family``."""
        if self.family == "store" and self.path:
            return self.path.rstrip("/").rsplit("/", 1)[-1]
        return self.family


METRICS = ("accuracy", "mse")


@dataclass(kw_only=True)
class ReferenceConfig:
    """The published figure a recipe should reproduce, in ``result.json``'s units.

    All keys null (the default): no reference. Set, ``mean`` and ``source`` are required;
    ``distmaml evaluate`` and the end of ``distmaml train`` print it beside the run's own
    meta-test and write it into ``eval.json`` / ``result.json`` as ``reference``.
    """

    metric: str | None = None
    """``accuracy`` or ``mse``: the run's meta-test metric (accuracy for classification)."""
    mean: float | None = None
    """The published mean; an accuracy as a fraction (98.7% is 0.987), as ``meta_test.mean``."""
    ci95: float | None = None
    """Its published 95% interval, same units (0.004 for ± 0.4%); null where the paper gives none."""
    source: str | None = None
    """Where the figure comes from: authors, year, table (and who quotes it, if not the paper)."""

    @property
    def given(self) -> bool:
        """A reference is set (any of its keys)."""
        return any(v is not None for v in (self.metric, self.mean, self.ci95, self.source))

    def validate(self) -> None:
        if not self.given:
            return
        for key in ("metric", "mean", "source"):
            if getattr(self, key) is None:
                raise ConfigError(
                    f"reference.{key} is missing: a reference gives metric, mean and source (and ci95 where the "
                    "paper does); set it, or leave the whole reference section out"
                )
        assert self.metric is not None and self.mean is not None and self.source is not None
        _one_of("reference.metric", self.metric, METRICS)
        if self.metric == "accuracy":
            hint = f" ({self.mean}% is {self.mean / 100:g})" if 1 < self.mean <= 100 else ""
            _check("reference.mean", self.mean, 0 <= self.mean <= 1, f"an accuracy is a fraction from 0 to 1{hint}")
        else:
            _check("reference.mean", self.mean, self.mean >= 0, "an MSE is 0 or more")
        if self.ci95 is not None:
            _check("reference.ci95", self.ci95, self.ci95 >= 0, "must be 0 or more")
            if self.metric == "accuracy":
                hint = f" (± {self.ci95}% is {self.ci95 / 100:g})" if self.ci95 > 1 else ""
                _check("reference.ci95", self.ci95, self.ci95 <= 1, f"an accuracy's interval is a fraction{hint}")
        _check("reference.source", self.source, bool(self.source.strip()), "must name the paper and table")

    def summary(self) -> dict[str, Any] | None:
        """``{"metric", "mean", "ci95", "source"}`` for ``result.json``, or None without a reference."""
        if not self.given:
            return None
        return {"metric": self.metric, "mean": self.mean, "ci95": self.ci95, "source": self.source}


MODEL_NAMES = tuple(MODELS)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "mlp"
    """``mlp`` (1 input, 1 output), ``conv4``, ``resnet12`` (the few-shot ResNet-12,
    ``models.resnet12``) or your own as ``package.module:attr``: ``attr(config)`` returns a
    ``torch.nn.Module``."""
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    """Hidden widths of the MLP."""
    filters: int = 64
    """Filters per block of conv4 (64 Omniglot, 32 miniImageNet); resnet12: the first block's, the
    others 2.5x, 5x and 10x it (64: the papers' 64-160-320-640)."""

    def validate(self) -> None:
        _builtin_or_path("model.name", self.name, MODEL_NAMES)
        for width in self.hidden:
            _check("model.hidden", self.hidden, width >= 1, "every width must be at least 1")
        _at_least("model.filters", self.filters, 1)


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log the run to MLflow."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; relative paths are made absolute before workers see them."""
    experiment: str = "distmaml"
    """MLflow experiment of ``distmaml train`` runs (a sweep uses its own name)."""
    log_every: int = 100
    """Per-step metrics are buffered and sent in one batch every this many meta-steps."""
    log_model: bool = True
    """Log the final network with ``mlflow.pytorch.log_model`` (pickle format)."""

    def validate(self) -> None:
        _check("tracking.uri", self.uri, bool(self.uri.strip()), "must not be empty")
        _check("tracking.experiment", self.experiment, bool(self.experiment.strip()), "must not be empty")
        _at_least("tracking.log_every", self.log_every, 1)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
REDUCES = ("driver", "collective")


@dataclass(kw_only=True)
class EngineConfig:
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker actor; its torch threads are pinned to this number (at least 1)."""
    gpus_per_worker: float | None = None
    """GPUs per worker; None: 1 where the cluster has GPUs and ``device`` is not ``cpu``, else 0."""
    driver_cpus: float = 1.0
    """CPUs of the driver's bundle in the run's placement group; while the Ray engine's workers compute,
    the driver's torch threads are pinned to this number (at least 1)."""
    placement: str = "PACK"
    """Placement-group strategy: PACK (fewest nodes) or SPREAD (one worker per node where possible)."""
    max_worker_failures: int = 3
    """Worker deaths tolerated in a run; each dead worker is replaced and its shard re-run (``engine.reduce:
    collective``: the group restarts from its latest checkpoint; a lost node counts as a death)."""
    resize_interval: float = 60.0
    """Elastic ``workers: [min, max]``: seconds between a running group's looks for room for more workers
    (it then restarts larger from its latest checkpoint)."""
    regroup_timeout: float = 30.0
    """Collective engine: seconds a (re)starting group waits for its workers before Ray Train tries again
    with the workers it then finds (after a node is lost, Ray may count it for up to 20 s more)."""
    startup_timeout: float = 1800.0
    """Seconds to wait for the placement group before failing with the resources asked and available: the
    outer limit, long enough for a cloud GPU node to boot and run ``setup_commands`` (often 5-15 minutes)."""
    startup_stall: float = 300.0
    """Seconds the wait goes on while the autoscaler could add nodes but none is launching or starting (its
    launches fail, or it launches nothing), before the run fails with one line; see ``distmaml.cluster.autoscaler``."""
    reduce: str = "driver"
    """Who adds the workers' gradients: ``driver`` (worker actors send their sums to the driver, which
    steps and sends the parameters back) or ``collective`` (a Ray Train worker group all-reduces with
    torch.distributed and every worker takes the same step; nothing passes through the driver per step)."""

    def validate(self) -> None:
        _positive("engine.cpus_per_worker", self.cpus_per_worker)
        if self.gpus_per_worker is not None:
            _check("engine.gpus_per_worker", self.gpus_per_worker, self.gpus_per_worker >= 0, "must be 0 or more")
        _positive("engine.driver_cpus", self.driver_cpus)
        _one_of("engine.placement", self.placement, PLACEMENT_STRATEGIES)
        _at_least("engine.max_worker_failures", self.max_worker_failures, 0)
        _check("engine.resize_interval", self.resize_interval, self.resize_interval >= 0, "must be 0 or more")
        _positive("engine.regroup_timeout", self.regroup_timeout)
        _positive("engine.startup_timeout", self.startup_timeout)
        _positive("engine.startup_stall", self.startup_stall)
        _one_of("engine.reduce", self.reduce, REDUCES)


MAML_TEST_STEPS = 10
"""``inner.test_steps`` of algorithms with a fixed inner rate when the config leaves it unset:
the MAML paper's sinusoid evaluation (its image recipes set their own, 3 to 10)."""


@dataclass(frozen=True, kw_only=True)
class MamlppConfig(MamlppOptions):
    """MAML++ (Antoniou et al., 2019): each part switchable; read only when ``algorithm: mamlpp``.

    The inner loop's options and their defaults are ``core.algorithm.MamlppOptions``
    (``multi_step_loss``, ``msl_anneal_steps``, ``learned_lrs``, ``per_step_bn``,
    ``first_order_steps``); this section adds the outer loop's schedule.
    """

    cosine_lr: bool = True
    """Cosine annealing of meta.lr to min_lr over meta.steps."""
    min_lr: float = 1e-5
    """Final meta learning rate of the cosine schedule."""

    def validate(self) -> None:
        _at_least("mamlpp.msl_anneal_steps", self.msl_anneal_steps, 1)
        _at_least("mamlpp.first_order_steps", self.first_order_steps, 0)
        _check("mamlpp.min_lr", self.min_lr, self.min_lr >= 0, "must be 0 or more")


@dataclass(kw_only=True)
class Config:
    seed: int = 0
    """Seed of tasks and initialisation; tasks are a pure function of (seed, step, id)."""
    precision: str = "float32"
    """``float32`` or ``float64``."""
    algorithm: str = "maml"
    """``maml`` (second order), ``fomaml`` (first order), ``anil`` (adapt the head only),
    ``metasgd`` (learned per-element inner rates) or ``mamlpp`` (MAML++, see the ``mamlpp`` section)."""
    device: str = "auto"
    """``auto`` (CUDA where present), ``cpu`` or ``cuda``."""
    batching: str = "auto"
    """How the core computes a shard's tasks: ``auto`` (each worker times the candidates on its
    device at start-up and keeps the fastest), ``loop``, ``loop_channels_last`` (2-d conv nets), ``vmap`` or
    ``batched`` (``core.batching``); or ``compiled``: the meta-gradient compiled by inductor
    at start-up (tens of seconds to minutes, once per shard size; then several times faster per
    meta-step on small networks; never chosen by ``auto``)."""
    workers: int | list[int] = 0
    """Worker actors (Ray); 0 computes in the driver process (debugging, benchmarks). ``[min, max]``
    (``engine.reduce: collective`` only): an elastic group of as many workers as the cluster has room
    for, from min to max; it restarts from its latest checkpoint with fewer when a node is lost, and
    with more when one joins (``engine.resize_interval``)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    mamlpp: MamlppConfig = field(default_factory=MamlppConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self) -> None:
        _one_of("precision", self.precision, ("float32", "float64"))
        _one_of("algorithm", self.algorithm, ALGORITHMS)
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        _one_of("batching", self.batching, ALLOWED_BATCHINGS)
        if self.batching == COMPILED and self.inner.recompute:
            raise ConfigError(
                "batching = 'compiled' with inner.recompute = true: a compiled graph does not keep the "
                "recomputation; set batching=loop (or vmap) to recompute, or inner.recompute=false"
            )
        self._check_workers()
        sections = (
            self.meta,
            self.inner,
            self.data,
            self.model,
            self.engine,
            self.mamlpp,
            self.tracking,
            self.reference,
        )
        for section in sections:
            section.validate()
        if self.inner.test_steps is None:  # the algorithm's default, written into the resolved config
            learned = self.algorithm in LEARNED_STEP_RATES
            self.inner.test_steps = self.inner.steps if learned else MAML_TEST_STEPS
        if self.algorithm == "mamlpp" and self.mamlpp.cosine_lr and self.mamlpp.min_lr >= self.meta.lr:
            raise ConfigError(
                f"mamlpp.min_lr = {self.mamlpp.min_lr} is not below meta.lr = {self.meta.lr}: "
                "the cosine schedule anneals down to it; lower mamlpp.min_lr or set mamlpp.cosine_lr=false"
            )
        image = self.data.family in IMAGE_FAMILIES
        builtin = not (is_import_path(self.data.family) or is_import_path(self.model.name))
        if builtin and image != (self.model.name in IMAGE_MODELS):  # a user's model or family: its own business
            need = " or model.name=".join(IMAGE_MODELS) if image else "mlp"
            raise ConfigError(
                f"model.name = {self.model.name!r} does not fit data.family = {self.data.family!r}; use model.name={need}"
            )
        builtin_loss = BUILTIN_LOSS.get(self.data.family)
        if builtin_loss is not None:
            if self.data.loss not in (None, builtin_loss):
                raise ConfigError(
                    f"data.loss = {self.data.loss!r}: data.family = {self.data.family!r} has loss {builtin_loss!r}; "
                    "drop data.loss"
                )
            self.data.loss = builtin_loss
            want = "accuracy" if builtin_loss == "cross_entropy" else "mse"
            if self.reference.given and self.reference.metric != want:
                raise ConfigError(
                    f"reference.metric = {self.reference.metric!r}: data.family = {self.data.family!r} is meta-tested "
                    f"by {want}; set reference.metric={want}"
                )
        if self.engine.reduce == "collective" and self.max_workers < 1:
            raise ConfigError(
                "engine.reduce = 'collective' needs workers of its own; set workers to 1 or more "
                "(workers = 0 computes in the driver process)"
            )
        if self.elastic and self.engine.reduce != "collective":
            raise ConfigError(
                f"workers = {self.workers}: a range of workers needs engine.reduce=collective (the driver's "
                "engine keeps a fixed pool); set engine.reduce=collective or give one number"
            )
        if self.max_workers > self.meta.batch_size:
            raise ConfigError(
                f"workers = {self.workers} exceeds meta.batch_size = {self.meta.batch_size}: "
                "some workers would get no task; lower workers or raise meta.batch_size"
            )

    def _check_workers(self) -> None:
        if isinstance(self.workers, int):
            _at_least("workers", self.workers, 0)
            return
        ok = len(self.workers) == 2 and 1 <= self.workers[0] <= self.workers[1]
        _check("workers", self.workers, ok, "an elastic range is [min, max] with 1 <= min <= max, e.g. workers=[2,4]")

    @property
    def elastic(self) -> bool:
        """``workers`` is a range ``[min, max]``."""
        return isinstance(self.workers, list)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run goes on with (``workers`` when it is one number)."""
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        """The most workers the run starts (``workers`` when it is one number)."""
        return self.workers[1] if isinstance(self.workers, list) else self.workers

    @property
    def loss(self) -> str:
        """``data.loss``, once resolved: a built-in family's when the config is made, a user's family's by
        ``distmaml.run.usercode.resolve_loss`` (which builds the family to ask it)."""
        if self.data.loss is None:
            raise ConfigError(
                f"data.loss: not resolved for data.family = {self.data.family!r}; "
                "distmaml.run.usercode.resolve_loss(config) sets it"
            )
        return self.data.loss

    @property
    def test_steps(self) -> int:
        """``inner.test_steps``, resolved (never None once the config is made)."""
        assert self.inner.test_steps is not None
        return self.inner.test_steps

    @property
    def first_order(self) -> bool:
        return self.inner.first_order or self.algorithm == "fomaml"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as MLflow params and ``--set`` use them."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_KINDS: dict[Any, str] = {int: "an integer", float: "a number", str: "a string", list[int]: "[min, max]"}
"""How a message names a type of a field that takes one of several."""

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?\d+[eE][-+]?\d+$")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks ``value`` against the field's type; ints pass as floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        choices = [a for a in options if a is not type(None)]
        if len(choices) > 1:  # int | list[int]: by the value's shape
            lists = [a for a in choices if typing.get_origin(a) is list]
            if isinstance(value, list) and lists:
                return _coerce(key, value, lists[0])
            scalars = [a for a in choices if typing.get_origin(a) is not list]
            try:
                _check(key, value, not isinstance(value, list) and bool(scalars), "")
                return _coerce(key, value, scalars[0])
            except ConfigError:
                names = " or ".join(_KINDS.get(a, str(a)) for a in choices)
                raise ConfigError(f"{key} = {value!r}: must be {names}") from None
        annotation = choices[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        _check(key, value, isinstance(value, list), f"must be a list of {item.__name__}")
        return [_coerce(key, v, item) for v in value]
    if annotation is bool:
        _check(key, value, isinstance(value, bool), "must be true or false")
    elif annotation is int:
        _check(key, value, isinstance(value, int) and not isinstance(value, bool), "must be an integer")
    elif annotation is float:
        if isinstance(value, str) and _FLOAT_WITHOUT_DOT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(key, value, ok, "must be a number")
        return float(value)
    elif annotation is str:
        _check(key, value, isinstance(value, str), "must be a string")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} = {data!r}: must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean {prefix}{close[0]}?"
                if close
                else f"; known keys: {', '.join(prefix + n for n in names)}"
            )
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(typing.cast(type, annotation), value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, annotation)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a ``Config`` from a nested mapping."""
    config = _build(Config, data, "")
    assert isinstance(config, Config)
    return config


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The mapping in a built-in recipe (by name) or a YAML file (by path)."""
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.exists()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"--config {name_or_path!r}: no such recipe or file; recipes: {', '.join(recipe_names())}"
            )
    if not path.is_file():
        raise ConfigError(f"--config {name_or_path!r}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {str(path)!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r}: must hold a mapping of keys to values")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Applies one ``key.sub=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, for example --set inner.lr=0.4")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    try:
        set_dotted(data, key, value)
    except ConfigError as e:
        raise ConfigError(f"--set {assignment!r}: {e}") from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key`` ``a.b.c``, in place, making sections as needed.

    The one setter of dotted keys (``--set``, sweep spaces, sampled trial
    values); numpy scalars from samplers become Python numbers.
    """
    node = data
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part!r} is not a section")
        node = child
    node[leaf] = value.item() if hasattr(value, "item") else value


def load_config(name_or_path: str = "sinusoid", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Recipe or YAML file, then ``--set`` overrides, validated.

    Example:
        >>> cfg = load_config("sinusoid", ["inner.lr=0.02", "meta.steps=100"])
    """
    data = load_recipe(name_or_path)
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
