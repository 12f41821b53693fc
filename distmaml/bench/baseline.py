"""MAML written the way the classic libraries write it, for comparison.

A Python loop over tasks; each task clones the module (parameters as
differentiable copies of the meta-parameters), takes its inner steps with
``torch.autograd.grad(create_graph=True)`` and writes the updated tensors back
into the clone; the query loss is backpropagated task by task. Batch-norm is
torch's own ``nn.BatchNorm2d`` with batch statistics.

It shares no computation with ``distmaml.core``: the tests use it as the
independent reference for the core's meta-gradient, and ``distmaml bench``
as the baseline the core is timed against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distmaml.core.batchnorm import MetaBatchNorm
from distmaml.typing import Params, TaskBatch

_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def native_twin(model: nn.Module, *, classic_order: bool = True) -> nn.Module:
    """A copy of ``model`` as the classic code writes it: torch's ``nn.BatchNorm2d``
    (batch statistics), and with ``classic_order`` each block's ReLU before its
    max-pool (distmaml's conv4 pools first, which computes the same function,
    see ``models.conv4``)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MetaBatchNorm):
                bn = nn.BatchNorm2d(child.weight.shape[0], eps=child.eps, track_running_stats=False)
                bn.load_state_dict({"weight": child.weight.detach(), "bias": child.bias.detach()})
                setattr(module, name, bn.to(dtype=child.weight.dtype))
        if classic_order and isinstance(module, nn.Sequential):
            layers = list(module)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
                    layers[i], layers[i + 1] = layers[i + 1], layers[i]
            for i, layer in enumerate(layers):
                module[i] = layer
    return twin


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = value  # type: ignore[assignment]  # a non-leaf tensor in place of the parameter


def clone_module(model: nn.Module, params: Params) -> nn.Module:
    """``model``'s structure with ``params`` installed as (differentiable) tensors."""
    clone = copy.deepcopy(model)
    for name, value in params.items():
        _set_tensor(clone, name, value)
    return clone


def baseline_meta_gradient(
    model: nn.Module, params: Params, batch: TaskBatch, *, lr: float, steps: int, first_order: bool, loss: str
) -> tuple[Params, Tensor]:
    """Mean over tasks of the query-loss gradient after adaptation, and the mean query loss.

    ``model`` should use torch's batch-norm (see ``native_twin``).
    """
    lossf = _LOSSES[loss]
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    n = batch.num_tasks
    total = torch.zeros((), dtype=next(iter(theta.values())).dtype)
    for t in range(n):
        learner = clone_module(model, {k: v.clone() for k, v in theta.items()})
        for _ in range(steps):
            current = dict(_named_tensors(learner))
            inner = lossf(learner(batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(inner, list(current.values()), create_graph=not first_order)
            for (k, v), g in zip(current.items(), grads):
                _set_tensor(learner, k, v - lr * (g.detach() if first_order else g))
        query = lossf(learner(batch.query_x[t]), batch.query_y[t]) / n
        query.backward()  # frees this task's graph before the next task
        total += query.detach()
    return {k: v.grad for k, v in theta.items()}, total  # type: ignore[misc]


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every tensor in ``_parameters`` of every submodule, Parameter or not, by dotted name."""
    for prefix, sub in module.named_modules():
        for name, value in sub._parameters.items():
            if value is not None:
                yield (f"{prefix}.{name}" if prefix else name), value
