"""Independent computations for the tests.

``reference_meta_gradient`` is ``distmaml.baseline``: a per-task loop with
``torch.autograd.grad(create_graph=True)`` on a module clone and torch's own
batch-norm, sharing no computation with ``distmaml.core``.
``query_loss_after_adaptation`` is a plain function of the parameters for
finite differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distmaml.baseline import baseline_meta_gradient, clone_module, native_twin


def reference_meta_gradient(model, params, batch, *, lr, steps, first_order, loss):
    return baseline_meta_gradient(
        native_twin(model), params, batch, lr=lr, steps=steps, first_order=first_order, loss=loss
    )


def query_loss_after_adaptation(model, params, batch, *, lr, steps, loss):
    """Mean query loss after adaptation, as a float (first derivatives only, no graph kept)."""
    lossf = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]
    twin = native_twin(model)
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(steps):
            inner_loss = lossf(clone_module(twin, p)(sx[t]), sy[t])
            grads = torch.autograd.grad(inner_loss, list(p.values()))
            p = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(p.items(), grads)}
        with torch.no_grad():
            total += float(lossf(clone_module(twin, p)(qx[t]), qy[t]))
    return total / sx.shape[0]
