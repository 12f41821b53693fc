"""Independent MAML meta-gradients with plain autograd, for the tests.

Written the way the classic libraries do it: a loop over tasks, each task's
inner steps differentiated with ``torch.autograd.grad(create_graph=True)``,
and torch's own ``nn.BatchNorm2d`` (batch statistics) in place of
distmaml's batch-norm. Shares no code with ``distmaml.core``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from distmaml.core.batchnorm import MetaBatchNorm


def native_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose batch-norm layers are torch's own (batch statistics)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MetaBatchNorm):
                bn = nn.BatchNorm2d(child.weight.shape[0], eps=child.eps, track_running_stats=False)
                bn = bn.to(dtype=child.weight.dtype)
                setattr(module, child_name, bn)
    return twin


def forward_with(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Runs ``model`` with ``params`` swapped in by assignment (no torch.func)."""
    clone = copy.deepcopy(model)
    for name, value in params.items():
        *path, leaf = name.split(".")
        module = clone
        for part in path:
            module = getattr(module, part)
        del module._parameters[leaf]
        setattr(module, leaf, value)
    return clone(x)


def reference_meta_gradient(model, params, batch, *, lr, steps, first_order, loss):
    lossf = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]
    twin = native_twin(model)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    sx, sy, qx, qy = batch
    for t in range(sx.shape[0]):
        p = dict(theta)
        for _ in range(steps):
            inner_loss = lossf(forward_with(twin, p, sx[t]), sy[t])
            grads = torch.autograd.grad(inner_loss, list(p.values()), create_graph=not first_order)
            p = {k: v - lr * (g.detach() if first_order else g) for (k, v), g in zip(p.items(), grads)}
        total = total + lossf(forward_with(twin, p, qx[t]), qy[t])
    mean = total / sx.shape[0]
    grads = torch.autograd.grad(mean, list(theta.values()))
    return dict(zip(theta, grads)), mean.detach()


def query_loss_after_adaptation(model, params, batch, *, lr, steps, loss):
    """Mean query loss after adaptation, as a plain function of ``params`` (for finite differences)."""
    lossf = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]
    twin = native_twin(model)
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(steps):
            inner_loss = lossf(forward_with(twin, p, sx[t]), sy[t])
            grads = torch.autograd.grad(inner_loss, list(p.values()))
            p = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(p.items(), grads)}
        with torch.no_grad():
            total += float(lossf(forward_with(twin, p, qx[t]), qy[t]))
    return total / sx.shape[0]
