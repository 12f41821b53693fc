"""The algorithm family as options of one inner/outer loop, and its meta-parameters.

``maml`` (second order), ``fomaml`` (first order), ``anil`` (only the head
adapts), ``metasgd`` (learned per-element inner rates) and ``mamlpp`` (MAML++,
Antoniou et al., 2019) differ only in which parameters adapt, with which rate,
through which batch-norm weights, with which loss weights and derivative
order. ``core.program`` runs all of them.

Every meta-learned tensor lives in one name -> tensor dict, so the engine
flattens and moves them without knowing the algorithm:

* model parameters under their module names (``net.0.weight``);
* Meta-SGD rates ``lrs.<param>``, shaped like the parameter;
* MAML++ per-step rates ``mamlpp.lr.<param>.<step>`` (scalars, one per
  parameter tensor and inner step: the paper's "per layer per step");
* MAML++ per-step batch-norm ``mamlpp.bn.<param>.<step>``, which *replace*
  the model's own batch-norm weight and bias (those are then not meta-learned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distmaml.core.batchnorm import MetaBatchNorm
from distmaml.core.losses import LOSSES
from distmaml.typing import Params

ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "mamlpp")

METASGD_PREFIX = "lrs."
MAMLPP_LR_PREFIX = "mamlpp.lr."
MAMLPP_BN_PREFIX = "mamlpp.bn."

LEARNED_STEP_RATES = ("metasgd", "mamlpp")
"""Algorithms whose inner rates are meta-learned for the training steps; they evaluate with those steps."""


@dataclass(frozen=True, kw_only=True)
class InnerLoop:
    """How a task is adapted.

    Attributes:
        lr: inner (task) learning rate, alpha in the MAML paper.
        steps: gradient steps on the support set during meta-training.
        first_order: treat the inner gradients as constants (FOMAML). The
            inner backward then runs on detached parameters, so no
            second-order graph is built at all: cheaper, not only detached.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression).
    """

    lr: float
    steps: int
    first_order: bool = False
    loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"inner.lr = {self.lr}: must be a positive number")
        if self.steps < 0:
            raise ValueError(f"inner.steps = {self.steps}: must be 0 or more")
        if self.loss not in LOSSES:
            raise ValueError(f"loss = {self.loss!r}: allowed values are {sorted(LOSSES)}")


@dataclass(frozen=True, kw_only=True)
class MamlppOptions:
    """MAML++'s parts, each switchable (Antoniou et al., 2019, section 4).

    Attributes:
        multi_step_loss: query loss after every inner step, weighted; the
            weights move towards the last step over ``msl_anneal_steps``
            meta-steps, after which only the last step's loss counts.
        msl_anneal_steps: meta-steps of multi-step loss (paper: 10 epochs of 500).
        learned_lrs: a learned inner rate per parameter tensor and inner step.
        per_step_bn: separate batch-norm weight and bias for each inner step
            (no effect on networks without batch-norm).
        first_order_steps: derivative-order annealing: first order for the
            first this many meta-steps, then second order (0: always second).
    """

    multi_step_loss: bool = True
    msl_anneal_steps: int = 5000
    learned_lrs: bool = True
    per_step_bn: bool = True
    first_order_steps: int = 0


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """One member of the family, with its inner loop.

    Attributes:
        name: one of ``ALGORITHMS``.
        inner: learning rate (the initial rate for learned ones), steps at
            training time (the number of per-step parameter slots), order, loss.
        mamlpp: MAML++ options; ignored by the other algorithms.
        recompute: gradient checkpointing of the inner steps: keep only each
            step's parameters and recompute a step's graph during the
            backward pass (memory of one step instead of all; about one more
            inner loop of compute). Same meta-gradient.
    """

    name: str = "maml"
    inner: InnerLoop
    mamlpp: MamlppOptions = field(default_factory=MamlppOptions)
    recompute: bool = False

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"algorithm = {self.name!r}: allowed values are {', '.join(ALGORITHMS)}")

    @property
    def learned_step_lrs(self) -> bool:
        return self.name == "mamlpp" and self.mamlpp.learned_lrs

    @property
    def per_step_bn(self) -> bool:
        return self.name == "mamlpp" and self.mamlpp.per_step_bn

    def first_order_at(self, meta_step: int) -> bool:
        """Whether inner gradients are constants at meta-step ``meta_step``."""
        if self.inner.first_order or self.name == "fomaml":
            return True
        return self.name == "mamlpp" and meta_step < self.mamlpp.first_order_steps

    def loss_weights(self, meta_step: int, steps: int) -> list[float]:
        """Weight of the query loss after each of ``steps`` inner steps at ``meta_step``."""
        last_only = [0.0] * (steps - 1) + [1.0]
        if self.name != "mamlpp" or not self.mamlpp.multi_step_loss or meta_step >= self.mamlpp.msl_anneal_steps:
            return last_only
        return multi_step_weights(steps, meta_step, self.mamlpp.msl_anneal_steps)


def as_algorithm(spec: InnerLoop | Algorithm) -> Algorithm:
    """An ``InnerLoop`` alone means MAML (first order if it says so)."""
    if isinstance(spec, Algorithm):
        return spec
    return Algorithm(name="fomaml" if spec.first_order else "maml", inner=spec)


def multi_step_weights(steps: int, meta_step: int, anneal_steps: int) -> list[float]:
    """The paper's annealed multi-step loss weights (they sum to 1).

    All steps start at ``1/steps``; every meta-step the earlier steps lose
    ``1/(steps * anneal_steps)`` down to a floor of ``0.03/steps`` and the last
    step gains what they lose, capped so the sum stays 1.
    """
    if steps == 1:
        return [1.0]
    base = 1.0 / steps
    decay = base / anneal_steps
    floor = 0.03 / steps
    early = max(base - meta_step * decay, floor)
    last = min(base + meta_step * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [last]


def head_prefix(model: nn.Module) -> str:
    """ANIL's head: the last submodule that owns parameters (MLP ``net.N``, Conv4 ``head``)."""
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners or owners[-1] == "":
        raise ValueError(f"ANIL needs a head submodule; {type(model).__name__} has none with its own parameters")
    return owners[-1]


def batchnorm_names(model: nn.Module) -> list[str]:
    """Parameter names of the model's batch-norm layers (weight and bias of each)."""
    return [
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, MetaBatchNorm) for p in ("weight", "bias")
    ]


def adapted_names(model: nn.Module, algorithm: Algorithm) -> list[str]:
    """Model parameters the inner loop changes (the rest are meta-learned only)."""
    names = [k for k, _ in model.named_parameters()]
    if algorithm.name == "anil":
        prefix = head_prefix(model) + "."
        return [k for k in names if k.startswith(prefix)]
    if algorithm.per_step_bn:
        bn = set(batchnorm_names(model))
        return [k for k in names if k not in bn]
    return names


def init_algorithm_params(model: nn.Module, algorithm: Algorithm, params: Params | None = None) -> Params:
    """The algorithm's initial meta-parameters: model ``params`` (default: the model's own) plus its own.

    Example:
        >>> algo = Algorithm(name="metasgd", inner=InnerLoop(lr=0.01, steps=1, loss="mse"))
        >>> theta = init_algorithm_params(sinusoid_mlp(), algo)
        >>> theta["lrs.net.0.weight"].shape == theta["net.0.weight"].shape
        True
    """
    base = {k: v.detach().clone() for k, v in (params or dict(model.named_parameters())).items()}
    lr, steps = algorithm.inner.lr, algorithm.inner.steps
    adapted = adapted_names(model, algorithm)
    out: Params = {}
    replaced = set(batchnorm_names(model)) if algorithm.per_step_bn else set()
    for k, v in base.items():
        if k in replaced:
            for i in range(steps):
                out[f"{MAMLPP_BN_PREFIX}{k}.{i}"] = v.clone()
        else:
            out[k] = v
    if algorithm.name == "metasgd":
        for k in adapted:
            out[METASGD_PREFIX + k] = torch.full_like(base[k], lr)
    if algorithm.learned_step_lrs:
        for k in adapted:
            for i in range(steps):
                out[f"{MAMLPP_LR_PREFIX}{k}.{i}"] = torch.full((), lr, dtype=base[k].dtype, device=base[k].device)
    return out


def network_params(model: nn.Module, algorithm: Algorithm, params: Params, step: int = 0) -> Params:
    """The model's own parameters in the meta-parameters ``params``, as inner step ``step`` sees them.

    MAML++'s per-step batch-norm (``mamlpp.bn.<p>.<i>``) stands in for the
    model's batch-norm weight and bias; the other entries are the model's own.
    """
    slot = step_slot(step, algorithm.inner.steps)
    replaced = set(batchnorm_names(model)) if algorithm.per_step_bn else set()
    return {k: params[f"{MAMLPP_BN_PREFIX}{k}.{slot}" if k in replaced else k] for k, _ in model.named_parameters()}


def step_slot(i: int, train_steps: int) -> int:
    """Which per-step parameters inner step ``i`` uses: its own, or past training's steps the last ones."""
    return min(i, train_steps - 1)
