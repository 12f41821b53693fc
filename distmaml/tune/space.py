"""Search-space files (``tune_spaces/*.yaml``): parsed and checked before any trial starts.

A file names a base recipe, the metric and its mode, the search algorithm and
scheduler, the trial budget, the resources of one trial, and the space over
dotted config keys::

    name: sinusoid-sweep            # MLflow experiment and Tune run name (default: file name)
    base: sinusoid                  # built-in recipe or YAML path
    set: {meta.steps: 200}          # fixed overrides of the base
    metric: val_mse                 # val_mse (regression) or val_accuracy (classification)
    mode: min
    search: random                  # random | grid (Tune's generator) | optuna (TPE)
    scheduler: {name: asha, grace_period: 50, reduction_factor: 2}   # or: fifo
    num_samples: 8                  # trials (with grid entries: repeats of the grid)
    max_concurrent: 2
    max_failures: 1                 # restarts of a crashed trial from its checkpoint
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0, driver_cpus: 1}
    space:
      inner.lr: {loguniform: [0.001, 0.1]}
      inner.steps: {randint: [1, 5]}     # inclusive: 1, 2, 3, 4 or 5
      data.shots: {choice: [5, 10, 20]}
      meta.lr: {grid: [0.001, 0.0003]}

Every mistake is one line naming the file, the entry and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distmaml.cluster.capacity import Bundle, NodeShape, why_not
from distmaml.config import Config, ConfigError, apply_override, config_from_dict, load_recipe, set_dotted
from distmaml.run.usercode import resolve_loss

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha")
_TOP_KEYS = (
    "name",
    "base",
    "set",
    "metric",
    "mode",
    "search",
    "scheduler",
    "num_samples",
    "max_concurrent",
    "max_failures",
    "resources",
    "space",
)
_RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "driver_cpus", "driver_gpus")
RESOURCE_KEYS = {
    "workers": "workers",
    "engine.cpus_per_worker": "cpus_per_worker",
    "engine.gpus_per_worker": "gpus_per_worker",
    "engine.driver_cpus": "driver_cpus",
}
"""Config keys that set a trial's placement-group bundles, and the ``resources`` entry of each."""


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``kind`` in DISTRIBUTIONS, ``args`` its bounds or values."""

    key: str
    kind: str
    args: tuple[Any, ...]

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def representatives(self) -> tuple[Any, ...]:
        """Values that validation tries on the base config: both bounds, or every listed value."""
        return self.args

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # inclusive here, exclusive in Tune
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))


@dataclass(frozen=True)
class Resources:
    """What one trial reserves: a driver bundle and one bundle per worker actor.

    The same numbers are the trial's config keys (``RESOURCE_KEYS``): its
    engine places its actors in exactly these bundles, so the two must agree.
    """

    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 1.0
    driver_gpus: float = 0.0

    def bundles(self) -> list[dict[str, float]]:
        def bundle(cpu: float, gpu: float) -> dict[str, float]:
            return {"CPU": cpu, "GPU": gpu} if gpu > 0 else {"CPU": cpu}

        driver = bundle(self.driver_cpus, self.driver_gpus)
        return [driver] + [bundle(self.cpus_per_worker, self.gpus_per_worker) for _ in range(self.workers)]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles():
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated search-space file."""

    path: Path
    name: str
    base: str
    fixed: dict[str, Any]
    metric: str
    mode: str
    search: str
    scheduler: str
    grace_period: int
    reduction_factor: float
    num_samples: int
    max_concurrent: int | None
    max_failures: int
    resources: Resources
    dimensions: tuple[Dimension, ...]
    base_data: dict[str, Any] = field(repr=False)
    """The base recipe with ``set``, ``workers`` and ``engine`` resources applied, as a nested mapping."""

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def base_config(self) -> Config:
        return config_from_dict(copy.deepcopy(self.base_data))

    def trial_data(self, values: dict[str, Any]) -> dict[str, Any]:
        """The nested config mapping of a trial: the base with the searched ``values`` set."""
        data = copy.deepcopy(self.base_data)
        for key, value in values.items():
            set_dotted(data, key, value)
        return data

    def param_space(self) -> dict[str, Any]:
        return {d.key: d.to_tune() for d in self.dimensions}


class SpaceError(ConfigError):
    """A bad search-space file; one line naming the file, the entry and the fix."""


def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpaceError(f"{where} = {v!r}: must be a finite number")
    return float(v)


def _dimension(where: str, key: str, entry: Any) -> Dimension:
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise SpaceError(
            f"{where}: expected one distribution, e.g. {{loguniform: [0.001, 0.1]}}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    ((kind, args),) = entry.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{where}.{kind} = {args!r}: must be a non-empty list of values")
        return Dimension(key, kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise SpaceError(f"{where}.{kind} = {args!r}: must be [low, high]")
    low, high = (_number(f"{where}.{kind}", a) for a in args)
    if low > high:
        raise SpaceError(f"{where}.{kind} = {args!r}: low {args[0]} is above high {args[1]}; swap them")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}.loguniform = {args!r}: bounds must be positive (a log scale); use uniform")
    if kind == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise SpaceError(f"{where}.randint = {args!r}: bounds must be integers (both included)")
        return Dimension(key, kind, (int(args[0]), int(args[1])))
    return Dimension(key, kind, (low, high))


def _resources(where: str, raw: Any) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: resources must be a mapping with keys {', '.join(_RESOURCE_KEYS)}")
    unknown = sorted(set(raw) - set(_RESOURCE_KEYS))
    if unknown:
        raise SpaceError(f"{where}: unknown key resources.{unknown[0]}; allowed: {', '.join(_RESOURCE_KEYS)}")
    workers = raw.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise SpaceError(f"{where}: resources.workers = {workers!r}: must be an integer, 0 or more")
    values = {k: _number(f"{where}: resources.{k}", raw[k]) for k in _RESOURCE_KEYS[1:] if k in raw}
    for k, v in values.items():
        if v < 0:
            raise SpaceError(f"{where}: resources.{k} = {v}: must not be negative")
    if values.get("driver_cpus", 1.0) <= 0:
        raise SpaceError(f"{where}: resources.driver_cpus must be greater than 0 (the trial's driver process)")
    if workers and values.get("cpus_per_worker", 1.0) <= 0:
        raise SpaceError(f"{where}: resources.cpus_per_worker must be greater than 0 (fractions such as 0.25 are fine)")
    return Resources(workers=workers, **values)


def load_space(path: str | Path) -> SweepSpec:
    """Parses and validates a search-space file; raises ``SpaceError`` with one line on any mistake.

    Example:
        >>> spec = load_space("tune_spaces/sinusoid.yaml")
        >>> spec.keys
        ['inner.lr', 'inner.steps', 'data.shots']
    """
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"--space {path}: no such file; the shipped spaces are in tune_spaces/")
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: must hold a mapping with keys {', '.join(_TOP_KEYS)}")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise SpaceError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(_TOP_KEYS)}")
    for required in ("base", "metric", "space"):
        if required not in raw:
            raise SpaceError(f"{where}: missing {required!r} (see tune_spaces/sinusoid.yaml for a complete file)")

    base = str(raw["base"])
    base_path = path.parent / base
    try:
        base_data = load_recipe(str(base_path) if base.endswith((".yaml", ".yml")) and base_path.is_file() else base)
    except ConfigError as e:
        raise SpaceError(f"{where}: base: {e}") from None
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{where}: set must be a mapping of dotted config keys to values")
    for key, value in fixed.items():
        set_dotted(base_data, str(key), value)
    resources = _resources(where, _with_fixed_resources(where, raw.get("resources"), fixed))
    _apply_resources(base_data, resources)
    try:
        base_config = config_from_dict(copy.deepcopy(base_data))
    except ConfigError as e:
        raise SpaceError(f"{where}: base + set: {e}") from None

    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise SpaceError(
            f"{where}: space must map dotted config keys to distributions, e.g. inner.lr: {{loguniform: [0.001, 0.1]}}"
        )
    dims = tuple(_dimension(f"{where}: space.{k}", str(k), v) for k, v in space.items())
    for dim in dims:
        if dim.key in RESOURCE_KEYS:
            raise SpaceError(
                f"{where}: space.{dim.key}: a trial's resources are not searched (every trial reserves the same "
                f"bundles); set resources.{RESOURCE_KEYS[dim.key]} instead, or run one sweep per value"
            )
    for dim in dims:
        for value in dim.representatives():
            data = copy.deepcopy(base_data)
            set_dotted(data, dim.key, value)
            try:
                config_from_dict(data)
            except ConfigError as e:
                raise SpaceError(f"{where}: space.{dim.key}: {e}") from None

    metric_name = "mse" if resolve_loss(base_config) == "mse" else "accuracy"
    metric = raw["metric"]
    allowed_metric = f"val_{metric_name}"
    if metric != allowed_metric:
        raise SpaceError(f"{where}: metric = {metric!r}: trials of this base report {allowed_metric!r}; use it")
    mode = raw.get("mode", "min" if metric_name == "mse" else "max")
    if mode not in ("min", "max"):
        raise SpaceError(f"{where}: mode = {mode!r}: allowed values are min, max")
    search = raw.get("search", "random")
    if search not in SEARCHERS:
        raise SpaceError(f"{where}: search = {search!r}: allowed values are {', '.join(SEARCHERS)}")
    grid_keys = [d.key for d in dims if d.kind == "grid"]
    if search == "optuna" and grid_keys:
        raise SpaceError(
            f"{where}: space.{grid_keys[0]} is a grid, which Optuna cannot sample; use choice, or search: grid"
        )
    if search == "grid" and len(grid_keys) != len(dims):
        other = next(d.key for d in dims if d.kind != "grid")
        raise SpaceError(
            f"{where}: search = 'grid' but space.{other} is not a grid entry; make it {{grid: [...]}} or use search: random"
        )

    sched = raw.get("scheduler", "fifo")
    sched_opts: dict[str, Any] = {}
    if isinstance(sched, dict):
        sched_opts = dict(sched)
        sched = sched_opts.pop("name", None)
    if sched not in SCHEDULERS:
        raise SpaceError(f"{where}: scheduler = {sched!r}: allowed values are {', '.join(SCHEDULERS)}")
    extra = sorted(set(sched_opts) - {"grace_period", "reduction_factor"})
    if extra or (sched == "fifo" and sched_opts):
        bad = (extra or sorted(sched_opts))[0]
        raise SpaceError(
            f"{where}: scheduler.{bad}: not an option of {sched}; asha takes grace_period and reduction_factor"
        )
    grace = sched_opts.get("grace_period", base_config.meta.val_every or base_config.meta.steps)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        raise SpaceError(
            f"{where}: scheduler.grace_period = {grace!r}: must be a whole number of meta-steps, at least 1"
        )
    rf = _number(f"{where}: scheduler.reduction_factor", sched_opts.get("reduction_factor", 2))
    if rf <= 1:
        raise SpaceError(f"{where}: scheduler.reduction_factor = {rf}: must be above 1")

    def count(key: str, default: int | None, low: int) -> int | None:
        v = raw.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise SpaceError(f"{where}: {key} = {v!r}: must be an integer, at least {low}")
        return v

    num_samples = count("num_samples", 1, 1)
    max_failures = count("max_failures", 1, 0)
    assert num_samples is not None and max_failures is not None
    return SweepSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        base=base,
        fixed=dict(fixed),
        metric=metric,
        mode=mode,
        search=search,
        scheduler=sched,
        grace_period=grace,
        reduction_factor=rf,
        num_samples=num_samples,
        max_concurrent=count("max_concurrent", None, 1),
        max_failures=max_failures,
        resources=resources,
        dimensions=dims,
        base_data=base_data,
    )


def _with_fixed_resources(where: str, raw: Any, fixed: dict[str, Any]) -> Any:
    """``resources`` with the resource keys that ``set`` names (``workers``, ``engine.*``) filled in.

    A key given in both places must agree: the trial's bundles and its config are one thing.
    """
    named = {RESOURCE_KEYS[str(k)]: (str(k), v) for k, v in fixed.items() if str(k) in RESOURCE_KEYS}
    if not named or not (raw is None or isinstance(raw, dict)):
        return raw
    merged = dict(raw or {})
    for entry, (key, value) in named.items():
        if entry in merged and merged[entry] != value:
            raise SpaceError(
                f"{where}: set.{key} = {value!r} disagrees with resources.{entry} = {merged[entry]!r}; give it once"
            )
        merged[entry] = value
    return merged


def resources_of(config: Config, driver_gpus: float = 0.0) -> Resources:
    """The bundles a trial of ``config`` needs: its ``workers`` and ``engine`` amounts (GPUs unset: none)."""
    e = config.engine
    return Resources(
        workers=config.max_workers,
        cpus_per_worker=e.cpus_per_worker,
        gpus_per_worker=e.gpus_per_worker or 0.0,
        driver_cpus=e.driver_cpus,
        driver_gpus=driver_gpus,
    )


def _apply_resources(data: dict[str, Any], resources: Resources) -> None:
    """Sets ``workers`` and the ``engine`` amounts so that the trial's actors ask for exactly their bundles."""
    data["workers"] = resources.workers
    engine = data.setdefault("engine", {})
    engine["cpus_per_worker"] = resources.cpus_per_worker
    engine["gpus_per_worker"] = resources.gpus_per_worker
    engine["driver_cpus"] = resources.driver_cpus


def with_overrides(
    spec: SweepSpec,
    num_samples: int | None = None,
    overrides: list[str] | None = None,
    resources: Resources | None = None,
) -> SweepSpec:
    """The spec with a new trial budget, extra fixed ``--set`` overrides and other resources (checked again).

    ``--set`` comes last and wins: ``workers`` and the ``engine`` amounts it
    names change every trial's config and its placement-group bundles alike.
    """
    data = copy.deepcopy(spec.base_data)
    if resources is not None:
        _apply_resources(data, resources)
    for assignment in overrides or []:
        apply_override(data, assignment)
        key = assignment.partition("=")[0].strip()
        if any(d.key == key for d in spec.dimensions):
            raise SpaceError(f"--set {assignment}: {key} is searched by {spec.path}; drop it from --set or the space")
    final = resources_of(config_from_dict(copy.deepcopy(data)), (resources or spec.resources).driver_gpus)
    _apply_resources(data, final)  # an unset engine.gpus_per_worker becomes the 0 the bundles hold
    for dim in spec.dimensions:
        for value in dim.representatives():
            trial = copy.deepcopy(data)
            set_dotted(trial, dim.key, value)
            config_from_dict(trial)
    if num_samples is not None and num_samples < 1:
        raise SpaceError(f"--trials {num_samples}: must be at least 1")
    return dataclasses.replace(spec, base_data=data, num_samples=num_samples or spec.num_samples, resources=final)


def trial_bundles(resources: Resources) -> list[Bundle]:
    """A trial's bundles for ``capacity.why_not``, naming the ``resources`` entries that set them."""
    keys = {"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker"}
    driver = Bundle("driver", resources.bundles()[0], {"CPU": "resources.driver_cpus", "GPU": "resources.driver_gpus"})
    return [driver] + [Bundle("worker", b, keys) for b in resources.bundles()[1:]]


def check_resources(spec: SweepSpec, nodes: list[NodeShape], max_launches: int = 0) -> None:
    """Refuses a trial no node the cluster has or can launch could ever hold, before any trial waits.

    ``nodes`` are the nodes up and the node types the autoscaler may launch (up
    to ``max_launches`` new nodes), as ``distmaml.cluster.placement.cluster_shape``
    reads them: on a cluster whose head offers no CPUs, trials wait for worker
    nodes instead of being refused.
    """
    strategy = spec.base_config().engine.placement
    reason = why_not(trial_bundles(spec.resources), strategy, nodes, max_launches)
    if reason:
        raise SpaceError(f"{spec.path}: resources of one trial: {reason}")
