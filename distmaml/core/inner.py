"""The inner loop: a few gradient steps on one task's support set.

A pure function of (model, params, support set): no state, no devices, no Ray,
so the same code runs in a loop over tasks, under ``vmap`` or in an actor.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.func import functional_call, grad

from distmaml.core.losses import LOSSES, loss_fn
from distmaml.typing import Params


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


def support_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """Loss of ``model`` with ``params`` on one task's examples ``x_K...``."""
    return loss_fn(loss)(functional_call(model, params, (x,)), y)


def adapt(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    inner: InnerLoop,
    steps: int | None = None,
    create_graph: bool | None = None,
) -> Params:
    """Adapts ``params`` to one task: ``steps`` plain gradient steps on its support set.

    Args:
        model: the network; only its structure is used (``functional_call``).
        params: starting parameters, name -> tensor (the meta-parameters).
        support_x: the task's support inputs ``x_K...`` (no task dimension).
        support_y: the task's support targets.
        inner: learning rate, loss, order.
        steps: overrides ``inner.steps`` (meta-test uses ``inner.test_steps``).
        create_graph: overrides ``not inner.first_order``; False gives
            first-order adaptation (constant inner gradients).

    Returns:
        The adapted parameters. When ``create_graph`` is true they stay a
        differentiable function of ``params`` to second order.

    Example:
        >>> adapted = adapt(model, dict(model.named_parameters()), x, y,
        ...                 InnerLoop(lr=0.01, steps=1, loss="mse"))
    """
    n_steps = inner.steps if steps is None else steps
    second_order = (not inner.first_order) if create_graph is None else create_graph

    def loss_of(p: Params) -> Tensor:
        return support_loss(model, p, support_x, support_y, inner.loss)

    p = params
    for _ in range(n_steps):
        # First order: differentiate at detached parameters, so the inner
        # backward is not recorded by any outer transform (no graph kept).
        at = p if second_order else {k: v.detach() for k, v in p.items()}
        g = grad(loss_of)(at)
        p = {k: v - inner.lr * g[k] for k, v in p.items()}
    return p
