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


def reference_algorithm_gradient(
    model, meta, batch, *, name, lr, steps, first_order, loss, weights, head=None, bn=(), steps_per_slot=None
):
    """Meta-gradient of any algorithm of the family with plain autograd, a loop over tasks.

    ``meta`` uses distmaml's naming (``lrs.<p>``, ``mamlpp.lr.<p>.<i>``,
    ``mamlpp.bn.<p>.<i>``) because that is the contract under test; the
    computation shares no code with ``distmaml.core``. ``head``: ANIL's head
    prefix; ``bn``: names of batch-norm parameters replaced per step;
    ``weights``: query-loss weight after each inner step. Returns the
    gradient of the mean weighted loss for every entry of ``meta`` (zeros
    where unused) and the mean weighted loss.
    """
    lossf = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]
    twin = native_twin(model)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    model_names = [k for k, _ in model.named_parameters()]
    if name == "anil":
        adapted = [k for k in model_names if k.startswith(head + ".")]
    else:
        adapted = [k for k in model_names if k not in bn]
    frozen = [k for k in model_names if k not in adapted and k not in bn]

    def rate(k, i):
        if name == "metasgd":
            return leaves["lrs." + k]
        if f"mamlpp.lr.{k}.0" in leaves:
            return leaves[f"mamlpp.lr.{k}.{min(i, steps - 1)}"]
        return lr

    def full(p, i):
        out = {k: leaves[k] for k in frozen}
        out.update(p)
        for k in bn:
            out[k] = leaves[f"mamlpp.bn.{k}.{min(i, steps - 1)}"]
        return out

    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        p = {k: leaves[k] for k in adapted}
        for i in range(len(weights)):
            inner_loss = lossf(forward_with(twin, full(p, i), sx[t]), sy[t])
            grads = torch.autograd.grad(inner_loss, list(p.values()), create_graph=not first_order)
            p = {k: v - rate(k, i) * (g.detach() if first_order else g) for (k, v), g in zip(p.items(), grads)}
            if weights[i]:
                total = total + weights[i] * lossf(forward_with(twin, full(p, i), qx[t]), qy[t])
    mean = total / sx.shape[0]
    grads = torch.autograd.grad(mean, list(leaves.values()), allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return out, mean.detach()
