"""Independent computations for the tests.

``reference_meta_gradient`` is ``distmaml.bench.baseline``: a per-task loop with
``torch.autograd.grad(create_graph=True)`` on a module clone and torch's own
batch-norm, sharing no computation with ``distmaml.core``.
``query_loss_after_adaptation`` is a plain function of the parameters for
finite differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distmaml.bench.baseline import baseline_meta_gradient, clone_module, native_twin


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


def _algorithm(model, meta, *, name, lr, train_steps, head, bn):
    """(adapted names, rate(name, step), full(adapted, step) -> every model parameter) of an algorithm,
    reading rates and per-step batch-norm from ``meta`` in distmaml's naming (the last slot past training)."""
    model_names = [k for k, _ in model.named_parameters()]
    if name == "anil":
        adapted = [k for k in model_names if k.startswith(head + ".")]
    else:
        adapted = [k for k in model_names if k not in bn]
    frozen = [k for k in model_names if k not in adapted and k not in bn]

    def rate(k, i):
        if name == "metasgd":
            return meta["lrs." + k]
        if f"mamlpp.lr.{k}.0" in meta:
            return meta[f"mamlpp.lr.{k}.{min(i, train_steps - 1)}"]
        return lr

    def full(p, i):
        out = {k: meta[k] for k in frozen}
        out.update(p)
        for k in bn:
            out[k] = meta[f"mamlpp.bn.{k}.{min(i, train_steps - 1)}"]
        return out

    return adapted, rate, full


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
    adapted, rate, full = _algorithm(model, leaves, name=name, lr=lr, train_steps=steps, head=head, bn=bn)

    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        p = {k: leaves[k] for k in adapted}
        for i in range(len(weights)):
            inner_loss = lossf(clone_module(twin, full(p, i))(sx[t]), sy[t])
            grads = torch.autograd.grad(inner_loss, list(p.values()), create_graph=not first_order)
            p = {k: v - rate(k, i) * (g.detach() if first_order else g) for (k, v), g in zip(p.items(), grads)}
            if weights[i]:
                total = total + weights[i] * lossf(clone_module(twin, full(p, i))(qx[t]), qy[t])
    mean = total / sx.shape[0]
    grads = torch.autograd.grad(mean, list(leaves.values()), allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return out, mean.detach()


def forward_with(model, params, x):
    """``model(x)`` with ``params`` (some or all of its parameters) swapped in, differentiably."""
    return clone_module(model, params)(x)


def reference_adaptation(model, meta, sx, sy, x, *, name, lr, steps, train_steps, loss, head=None, bn=()):
    """Evaluation's adaptation of one task with plain autograd: outputs on ``x`` before and after.

    ``steps`` graph-free inner steps of any algorithm of the family (rates
    ``lrs.<p>`` or ``mamlpp.lr.<p>.<i>``, per-step batch-norm ``mamlpp.bn``,
    the last training step's slot past ``train_steps``); shares no code with
    ``distmaml.core``.
    """
    lossf = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]
    twin = native_twin(model)
    meta = {k: v.detach() for k, v in meta.items()}
    adapted, rate, full = _algorithm(model, meta, name=name, lr=lr, train_steps=train_steps, head=head, bn=bn)
    p = {k: meta[k].clone() for k in adapted}
    with torch.no_grad():
        before = clone_module(twin, full(p, 0))(x)
    for i in range(steps):
        leaves = {k: v.requires_grad_(True) for k, v in p.items()}
        grads = torch.autograd.grad(lossf(clone_module(twin, full(leaves, i))(sx), sy), list(leaves.values()))
        p = {k: (v - rate(k, i) * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    with torch.no_grad():
        after = clone_module(twin, full(p, max(steps - 1, 0)))(x)
    return before, after


def reference_scores(model, meta, batch, **kw):
    """Per-task query metric (MSE or accuracy) before and after ``reference_adaptation``, shape ``[T]``."""
    loss = kw["loss"]
    befores, afters = [], []
    for t in range(batch.support_x.shape[0]):
        b, a = reference_adaptation(model, meta, batch.support_x[t], batch.support_y[t], batch.query_x[t], **kw)
        for out, acc in ((b, befores), (a, afters)):
            if loss == "mse":
                acc.append(F.mse_loss(out, batch.query_y[t]))
            else:
                acc.append((out.argmax(-1) == batch.query_y[t]).to(out.dtype).mean())
    return torch.stack(befores), torch.stack(afters)
