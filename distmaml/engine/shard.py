"""One shard of work: the tasks ``ids`` of a step, computed where it runs.

``TaskRunner`` is built from the resolved config in every process that
computes (the driver for the in-process engine, each actor for the Ray one).
It samples its own tasks from (seed, step, id), so no data travels, and
returns sums, so shards add up to the whole batch whatever the split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from distmaml.config import IMAGE_FAMILIES, Config, config_from_dict
from distmaml.core import InnerLoop, meta_grad
from distmaml.core.algorithm import Algorithm, MamlppOptions, init_algorithm_params
from distmaml.core.batching import BatchingChoice, candidates, describe_batching, time_candidates
from distmaml.core.evaluate import score_tasks
from distmaml.models import build_model
from distmaml.tasks import SinusoidTasks, TaskFamily
from distmaml.tasks.noise import NoiseImageTasks
from distmaml.typing import Params

log = logging.getLogger("distmaml.engine")

AUTO_TASKS = 8
"""Tasks per timed meta-step when ``batching: auto`` times the candidates (at most the shard's)."""
AUTO_STEPS = 2
"""Timed meta-steps per candidate (after one untimed)."""


class GradShard(NamedTuple):
    """Sums over a shard's tasks: flat gradient, query loss, metric; and the count."""

    grad: Tensor
    loss: float
    metric: float
    tasks: int
    seconds: float = 0.0
    """Compute time of the shard where it ran (for the benchmark's overhead share)."""


class EvalShard(NamedTuple):
    """Per-task query metric before and after adaptation, in task-id order."""

    before: Tensor
    after: Tensor


class ParamLayout:
    """Names and shapes of the meta-parameters, to flatten them into one tensor and back."""

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [tuple(params[k].shape) for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Params) -> Tensor:
        return torch.cat([tensors[k].reshape(-1) for k in self.names])

    def unflatten(self, flat: Tensor) -> Params:
        parts = torch.split(flat, self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes)}


def balanced_ranges(total: int, parts: int) -> list[range]:
    """Splits ``range(total)`` into ``parts`` contiguous ranges differing in length by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA device is visible; use --set device=cpu")
    return torch.device(name)


def build_family(config: Config) -> TaskFamily:
    data = config.data
    if data.family == "sinusoid":
        return SinusoidTasks(shots=data.shots, queries=data.queries, seed=config.seed)
    if data.family == "noise":
        return NoiseImageTasks(data.ways, data.shots, data.queries, data.channels, data.image_size, config.seed)
    if data.family in IMAGE_FAMILIES:
        from distmaml.data.family import build_image_family  # lazily: pyarrow stays out of the core

        return build_image_family(config)  # type: ignore[no-any-return]
    raise ValueError(f"data.family = {data.family!r}: no task family of that name")


def build_network(config: Config) -> torch.nn.Module:
    """The config's network, initialised from ``config.seed``, in its precision."""
    torch.manual_seed(config.seed)
    m = config.model
    if m.name == "mlp":
        model = build_model("mlp", in_features=1, out_features=1, hidden=m.hidden)
    else:
        if config.data.family == "noise":
            channels, height, width = config.data.channels, config.data.image_size, config.data.image_size
        else:
            from distmaml.data.family import image_shape

            channels, height, width = image_shape(config)  # the store's metadata (glyphs: generated if missing)
        if height != width:
            raise ValueError(f"conv4 needs square images; the store at data.path holds {height}x{width}")
        model = build_model(
            "conv4", out_features=config.data.ways, in_channels=channels, image_size=height, filters=m.filters
        )
    return model.to(dtype=getattr(torch, config.precision))


def build_algorithm(config: Config) -> Algorithm:
    """The config's algorithm with its inner loop (``algorithm``, ``inner.*``, ``mamlpp.*``)."""
    pp = config.mamlpp
    return Algorithm(
        name=config.algorithm,
        inner=InnerLoop(
            lr=config.inner.lr,
            steps=config.inner.steps,
            first_order=config.first_order,
            loss=config.loss,
        ),
        mamlpp=MamlppOptions(
            multi_step_loss=pp.multi_step_loss,
            msl_anneal_steps=pp.msl_anneal_steps,
            learned_lrs=pp.learned_lrs,
            per_step_bn=pp.per_step_bn,
            first_order_steps=pp.first_order_steps,
        ),
        recompute=config.inner.recompute,
    )


def init_meta_params(config: Config, model: torch.nn.Module) -> Params:
    """Initial meta-parameters: the model's plus the algorithm's own (rates, per-step batch-norm).

    The names are what ``ParamLayout`` flattens; driver and workers build the
    same dict from the same config, so they agree on the layout.
    """
    return init_algorithm_params(model, build_algorithm(config))


class TaskRunner:
    """Computes shards of meta-gradients and evaluations for one config."""

    def __init__(self, config: Config | dict, device: str | None = None) -> None:
        self.config = config if isinstance(config, Config) else config_from_dict(config)
        self.device = resolve_device(device or self.config.device)
        self.dtype = getattr(torch, self.config.precision)
        self.family = build_family(self.config)
        self.model = build_network(self.config).to(self.device)
        self.algorithm = build_algorithm(self.config)
        self.inner = self.algorithm.inner
        self.layout = ParamLayout(init_algorithm_params(self.model, self.algorithm))
        self.batching: BatchingChoice | None = None
        """With ``batching: auto``, the measured choice (``choose_batching``), else None."""

    def choose_batching(self, tasks: int) -> str:
        """This runner's batching: the config's, or with ``auto`` the fastest candidate on this device.

        The first call with ``auto`` times a meta-step of every candidate on
        ``min(tasks, AUTO_TASKS)`` tasks of step 0 (``tasks``: the shard size
        this runner will see), with the initial meta-parameters, logs the
        timings in one line and keeps the choice for the rest of the run.
        """
        if self.config.batching != "auto":
            return self.config.batching
        if self.batching is None:
            n = max(1, min(tasks, AUTO_TASKS))
            params = init_algorithm_params(self.model, self.algorithm)
            batch = self._tasks("train", 0, range(n))

            def run(name: str) -> None:
                meta_grad(self.model, params, batch, self.algorithm, batching=name)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # time the device's work, not the launches

            self.batching = time_candidates(run, candidates(self.model), steps=AUTO_STEPS, tasks=n)
            log.info("%s on %s", describe_batching(self.batching.as_dict()), self.device)
        return self.batching.choice

    def batching_report(self) -> dict[str, Any]:
        """For ``result.json``: the choice and, if measured, each candidate's seconds per meta-step."""
        if self.batching is None:
            return {"choice": self.config.batching, "seconds": {}, "tasks": 0}
        return self.batching.as_dict()

    def _params(self, flat: Tensor) -> Params:
        return self.layout.unflatten(flat.to(self.device, self.dtype))

    def _tasks(self, split: str, step: int, ids: Sequence[int]):  # type: ignore[no-untyped-def]
        return self.family.sample(split, step, ids).to(self.device, self.dtype)

    def meta_grad(self, flat: Tensor, step: int, ids: Sequence[int]) -> GradShard:
        """Summed meta-gradient of tasks ``ids`` of meta-train step ``step``, as one flat CPU tensor."""
        s = meta_grad(
            self.model,
            self._params(flat),
            self._tasks("train", step, ids),
            self.algorithm,
            batching=self.choose_batching(len(ids)),
            step=step,
        )
        grad = self.layout.flatten(s.grads).cpu()  # the CPU waits for the device here
        return GradShard(grad, float(s.loss), float(s.metric), s.tasks)

    def evaluate(self, flat: Tensor, split: str, ids: Sequence[int], steps: int) -> EvalShard:
        """Scores tasks ``ids`` of ``split`` (step 0: a fixed held-out set) after ``steps`` inner steps."""
        scores = score_tasks(
            self.model,
            self._params(flat),
            self._tasks(split, 0, ids),
            self.algorithm,
            steps,
            batching=self.batching.choice if self.batching is not None else self.config.batching,
        )
        return EvalShard(scores.before.cpu(), scores.after.cpu())
