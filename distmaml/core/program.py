"""One task's inner and outer loop for every algorithm, as pure functions.

``TaskProgram(model, algorithm, meta_step)`` splits the meta-parameters into
``theta`` (what the inner loop adapts) and ``context`` (everything else: the
ANIL body's features, Meta-SGD or MAML++ rates, per-step batch-norm, frozen
weights) and gives:

* ``objective(P, sx, sy, qx, qy) -> (weighted query loss, (last query loss, metric))``,
  differentiated by ``torch.func.grad`` for the meta-gradient;
* ``recomputed_grad(...)``: the same gradient with gradient checkpointing of
  the inner steps: the forward pass keeps each step's parameters only, the
  backward pass re-runs one step at a time under ``torch.func.vjp``. Memory
  of one step's double-backward graph instead of all of them (on the
  per-task loop by plain autograd: a third of the memory on ResNet-12);
* ``scores(...)``: query metric before and after adaptation, for evaluation.

With ``batched=True`` the same functions take every task at once (task
dimension first) and return sums over tasks (``scores``: per-task values).

The inner step is ``inner_step``: gradient descent on the support loss,
``theta - rate * grad``. What tells the algorithms apart are two small
strategies, chosen once per program from the ``Algorithm``:

* the rates (``inner_rates``): one fixed rate (MAML, FOMAML, ANIL), a learned
  rate per element (Meta-SGD, ``metasgd_rate``) or per tensor and step (MAML++,
  ``per_step_rate``);
* the network the steps run (``WholeNetwork``, or ANIL's ``HeadOnly``: the
  body's features computed once per task, then only the head), with MAML++'s
  per-step batch-norm weights standing in for the model's own.

Inner step ``i`` (0-based) computes the support loss with per-step slot ``i``
and the query loss after it with slot ``i`` too (as the MAML++ code does);
past the training steps, slots are the last one's.

This is the only inner loop: meta-training (``objective``), validation and
meta-test (``scores``), the plots (``predictions``) and the library's
``distmaml.meta_gradient`` all adapt through ``step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from distmaml.core.algorithm import (
    MAMLPP_BN_PREFIX,
    MAMLPP_LR_PREFIX,
    METASGD_PREFIX,
    Algorithm,
    adapted_names,
    batchnorm_names,
    head_prefix,
    step_slot,
)
from distmaml.core.losses import loss_fn, metric, task_losses, task_metrics
from distmaml.typing import Params


class _StopForward(Exception):
    """Raised by the ANIL hook once the head's input is known: the head itself need not run."""

    def __init__(self, features: Tensor) -> None:
        self.features = features


def _detached(p: Params) -> Params:
    return {k: v.detach() for k, v in p.items()}


def autograd_grad(value: Tensor, at: Params, *, create_graph: bool = False) -> Params:
    """Gradient of ``value`` with respect to ``at`` (tensors that require grad), as ``torch.func.grad`` gives it."""
    out = torch.autograd.grad(value, list(at.values()), create_graph=create_graph, allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(at.items(), out)}


def _leaves(p: Params) -> Params:
    """Detached copies that require grad: the inputs of a graph rebuilt on its own."""
    return {k: v.detach().requires_grad_() for k, v in p.items()}


def _add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def inner_step(theta: Params, grads: Params, rate: Callable[[str], Tensor | float]) -> Params:
    """One inner step: gradient descent on the support loss, ``theta[k] - rate(k) * grads[k]`` for every
    adapted tensor ``k``. Second order when ``grads`` carry their graph; first order when they are constants."""
    return {k: v - rate(k) * grads[k] for k, v in theta.items()}


Rates = Callable[[str, int, Params], "Tensor | float"]
"""The inner rate of adapted tensor ``name`` at per-step slot ``slot``, read from the context if learned."""


def fixed_rate(lr: float) -> Rates:
    """MAML, FOMAML, ANIL: one rate, ``inner.lr``."""
    return lambda name, slot, ctx: lr


def metasgd_rate(name: str, slot: int, ctx: Params) -> Tensor:
    """Meta-SGD: a learned rate per element of each adapted tensor (``lrs.<param>``), the same at every step."""
    return ctx[METASGD_PREFIX + name]


def per_step_rate(name: str, slot: int, ctx: Params) -> Tensor:
    """MAML++: a learned scalar rate per adapted tensor and inner step (``mamlpp.lr.<param>.<step>``)."""
    return ctx[f"{MAMLPP_LR_PREFIX}{name}.{slot}"]


def inner_rates(algorithm: Algorithm) -> Rates:
    if algorithm.name == "metasgd":
        return metasgd_rate
    if algorithm.learned_step_lrs:
        return per_step_rate
    return fixed_rate(algorithm.inner.lr)


class WholeNetwork:
    """The steps run the whole network: the adapted tensors, the frozen ones from the context, and MAML++'s
    per-step batch-norm (``mamlpp.bn.<param>.<slot>``) in place of the model's own batch-norm weights."""

    context_is_phi = True
    """The context is phi itself: its adjoint is phi's (``TaskProgram.recomputed_grad``)."""

    def __init__(self, model: nn.Module, adapted: list[str], bn: list[str]) -> None:
        self.module = model
        self.bn = bn
        self.frozen = [k for k, _ in model.named_parameters() if k not in adapted and k not in bn]
        self.shared = {*self.frozen, *bn}
        """Parameters that are the same for every task (batched: not copied per task)."""

    def context(self, phi: Params, sx: Tensor, qx: Tensor, layout: Callable[[Tensor], Tensor]) -> Params:
        return phi

    def call(
        self, slot: int, theta: Params, ctx: Params, which: str, x: Tensor, layout: Callable[[Tensor], Tensor]
    ) -> tuple[Params, Tensor]:
        """The module's parameters at ``slot`` and its input, for ``functional_call``."""
        params = {k: ctx[k] for k in self.frozen}
        params.update(theta)
        for k in self.bn:
            params[k] = ctx[f"{MAMLPP_BN_PREFIX}{k}.{slot}"]
        return params, layout(x)


class HeadOnly:
    """ANIL: only the head adapts. The body's features of the support and query inputs are computed once
    per task (the context) and the steps run the head alone on them."""

    context_is_phi = False
    """The context is the body's features: their adjoint is pulled back through the body to phi."""

    def __init__(self, model: nn.Module, batched: bool) -> None:
        self.model, self.batched = model, batched
        self.head = head_prefix(model)
        self.module = model.get_submodule(self.head)
        self.shared: set[str] = set()  # the head's parameters are all adapted: one copy per task

    def context(self, phi: Params, sx: Tensor, qx: Tensor, layout: Callable[[Tensor], Tensor]) -> Params:
        return {"features.s": self._features(phi, sx, layout), "features.q": self._features(phi, qx, layout)}

    def call(
        self, slot: int, theta: Params, ctx: Params, which: str, x: Tensor, layout: Callable[[Tensor], Tensor]
    ) -> tuple[Params, Tensor]:
        """The head's parameters and the features of ``which`` (``s``: support, ``q``: query) of the context."""
        prefix = self.head + "."
        return {k[len(prefix) :]: v for k, v in theta.items()}, ctx[f"features.{which}"]

    def _features(self, phi: Params, x: Tensor, layout: Callable[[Tensor], Tensor]) -> Tensor:
        if self.batched:  # the body is shared, batch-norm statistics are per task
            return torch.stack([self._features_of_task(phi, x[t], layout) for t in range(x.shape[0])])
        return self._features_of_task(phi, x, layout)

    def _features_of_task(self, phi: Params, x: Tensor, layout: Callable[[Tensor], Tensor]) -> Tensor:
        def stop(_module: nn.Module, args: tuple[Any, ...]) -> None:
            raise _StopForward(args[0])

        handle = self.module.register_forward_pre_hook(stop)
        try:
            functional_call(self.model, phi, (layout(x),))
        except _StopForward as e:
            return e.features
        finally:
            handle.remove()
        raise RuntimeError(f"ANIL head {self.head!r} was not called by {type(self.model).__name__}.forward")


class TaskProgram:
    """The loops of ``algorithm`` at meta-step ``meta_step`` for one task (no task dimension)."""

    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        meta_step: int = 0,
        *,
        autograd: bool = False,
        channels_last: bool = False,
        batched: bool = False,
    ) -> None:
        self.model = model
        # autograd: inner gradients by torch.autograd.grad on tensors that
        # require grad, for a caller that differentiates the objective with
        # torch.autograd too (the per-task loop). Same values as torch.func's
        # grad, without its per-op transform layer: on the 4-conv net that
        # layer cost about 10% of the meta-step. Under vmap, torch.func it is.
        self.autograd = autograd
        # channels_last: image inputs (4-d) enter the network in NHWC layout,
        # and every layer keeps it (see core.batching). Not under vmap, whose
        # batched tensors have no layout of their own.
        self.channels_last = channels_last
        # batched: every task at once, task dimension first (batching "batched").
        # The adapted parameters get one copy per task (theta.expand), each
        # forward pass is vmap'ed over tasks, and losses are summed over tasks,
        # so plain autograd on the sum gives each copy its own task's gradient:
        # vmap without torch.func's grad transform. Needs autograd=True.
        self.batched = batched
        self.algorithm = algorithm
        self.lossf = loss_fn(algorithm.inner.loss)
        self.train_steps = algorithm.inner.steps
        self.first_order = algorithm.first_order_at(meta_step)
        self.weights: list[float | Tensor] = list(algorithm.loss_weights(meta_step, self.train_steps))
        """Query-loss weight of each inner step; 0.0 skips that step's query. A compiled graph
        (``core.compiled``) puts tensors in place of the non-zero ones, so that MAML++'s annealed
        weights, which change every meta-step, are inputs of one graph rather than constants of many."""
        self.adapted = adapted_names(model, algorithm)
        bn = batchnorm_names(model) if algorithm.per_step_bn else []
        self.per_step = bool(bn) or algorithm.learned_step_lrs
        """Whether the algorithm has parameters per inner step (MAML++): slots past training are the last one's."""
        self.rate = inner_rates(algorithm)
        self.network: WholeNetwork | HeadOnly = (
            HeadOnly(model, batched) if algorithm.name == "anil" else WholeNetwork(model, self.adapted, bn)
        )

    # -- the pieces -----------------------------------------------------------
    def split(self, params: Params) -> tuple[Params, Params]:
        """(theta: adapted parameters, phi: every other meta-parameter)."""
        theta = {k: params[k] for k in self.adapted}
        phi = {k: v for k, v in params.items() if k not in theta}
        return theta, phi

    def _layout(self, x: Tensor) -> Tensor:
        # .to, not .contiguous: with one input channel NCHW strides already
        # count as channels-last, and only .to sets the strides that make the
        # convolution produce NHWC.
        return x.to(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def context(self, phi: Params, sx: Tensor, qx: Tensor) -> Params:
        """What the steps read besides theta: ANIL's body features (computed once), else phi itself."""
        return self.network.context(phi, sx, qx, self._layout)

    def _slot(self, i: int) -> int:
        return step_slot(i, self.train_steps) if self.per_step else i

    def forward(self, slot: int, theta: Params, ctx: Params, which: str, x: Tensor) -> Tensor:
        module = self.network.module
        params, x = self.network.call(slot, theta, ctx, which, x, self._layout)
        if not self.batched:
            return functional_call(module, params, (x,))
        per_task = {k: None if k in self.network.shared else 0 for k in params}  # theta: one copy per task
        return vmap(lambda p, xt: functional_call(module, p, (xt,)), in_dims=(per_task, 0))(params, x)

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The task's loss; batched, each task's (a vector over tasks)."""
        return task_losses(self.algorithm.inner.loss, out, y) if self.batched else self.lossf(out, y)

    def step(self, i: int, theta: Params, ctx: Params, sx: Tensor, sy: Tensor, first_order: bool) -> Params:
        """Inner step ``i`` (``inner_step``) on the support set: the gradient of the support loss, a constant
        if ``first_order``, and the algorithm's rates at ``i``'s slot."""
        slot = self._slot(i)
        at, at_ctx = (_detached(theta), _detached(ctx)) if first_order else (theta, ctx)

        def support(th: Params) -> Tensor:
            loss = self._loss(self.forward(slot, th, at_ctx, "s", sx), sy)
            return loss.sum() if self.batched else loss  # batched: a task's copy of theta sees its own term

        if self.autograd:
            if first_order:  # detached copies become leaves of their own small graph
                at = {k: v.requires_grad_() for k, v in at.items()}
            with torch.enable_grad():
                g = autograd_grad(support(at), at, create_graph=not first_order)
        else:
            g = grad(support)(at)
        return inner_step(theta, g, lambda k: self.rate(k, slot, ctx))

    def query(self, i: int, theta: Params, ctx: Params, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        """Query loss and metric after inner step ``i`` (``i = -1``: before adaptation)."""
        out = self.forward(self._slot(max(i, 0)), theta, ctx, "q", qx)
        loss = self._loss(out, qy)
        if self.batched:
            return loss, task_metrics(self.algorithm.inner.loss, out, qy, loss)
        return loss, metric(self.algorithm.inner.loss, out, qy, loss)

    def _per_task(self, theta: Params, tasks: int) -> Params:
        """Batched: a copy of theta per task (a broadcast view: no memory until adapted)."""
        return {k: v.expand(tasks, *v.shape) for k, v in theta.items()} if self.batched else theta

    # -- meta-gradient ----------------------------------------------------------
    def objective(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):  # type: ignore[no-untyped-def]
        """Weighted query losses of one task, differentiable to second order; aux: last loss, metric."""
        theta, phi = self.split(params)
        ctx = self.context(phi, sx, qx)
        theta = self._per_task(theta, sx.shape[0])
        total: Tensor | None = None
        for i, w in enumerate(self.weights):
            theta = self.step(i, theta, ctx, sx, sy, self.first_order)
            if isinstance(w, Tensor) or w:
                loss, met = self.query(i, theta, ctx, qx, qy)
                if self.batched:  # sums over tasks, as the loop adds them up
                    loss, met = loss.sum(), met.sum()
                term = loss if isinstance(w, float) and w == 1.0 else w * loss
                total = term if total is None else total + term
        assert total is not None  # the last step's weight is never 0
        return total, (loss.detach(), met)

    def autograd_grad_and_value(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):  # type: ignore[no-untyped-def]
        """``grad_and_value(objective, has_aux=True)`` by plain autograd (``autograd=True``; ``params`` require grad)."""
        with torch.enable_grad():
            value, aux = self.objective(params, sx, sy, qx, qy)
            return autograd_grad(value, params), (value.detach(), aux)

    def recomputed_grad(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):  # type: ignore[no-untyped-def]
        """``grad_and_value(objective, has_aux=True)`` by reverse-mode with recomputation.

        The forward pass keeps each step's parameters only; the backward pass
        rebuilds one step's graph at a time and pulls the adjoint through it
        (``_pullback``): by plain autograd with ``autograd=True`` (the per-task
        loop), else by ``torch.func.vjp``, which needs ``params`` outside any
        ``grad`` transform (``vmap`` is fine). Under ``torch.func``'s nested
        ``vjp``/``grad`` a recomputed ResNet-12 step held about 2.8x the memory
        of the same step in the plain loop, so checkpointing only paid off from
        about 4 inner steps; plain autograd holds what the loop holds.
        """
        theta0, phi = _detached(self.split(params)[0]), _detached(self.split(params)[1])
        with torch.no_grad():
            ctx = _detached(self.context(phi, sx, qx))
        thetas = [theta0]
        for i in range(len(self.weights)):
            with torch.enable_grad():
                start = _leaves(thetas[-1]) if self.autograd else thetas[-1]
                thetas.append(_detached(self.step(i, start, ctx, sx, sy, self.first_order)))
        adj_theta = {k: torch.zeros_like(v) for k, v in theta0.items()}
        adj_ctx = {k: torch.zeros_like(v) for k, v in ctx.items()}
        total = torch.zeros((), dtype=sx.dtype, device=sx.device)
        last: tuple[Tensor, Tensor] | None = None
        for i in reversed(range(len(self.weights))):
            w = self.weights[i]
            if w:

                def weighted_query(th: Params, c: Params, i: int = i, w: float | Tensor = w):  # type: ignore[no-untyped-def]
                    loss, met = self.query(i, th, c, qx, qy)
                    return w * loss, (loss, met)

                g_th, g_ctx, (loss_i, met_i) = self._query_grad(weighted_query, thetas[i + 1], ctx)
                adj_theta, adj_ctx = _add(adj_theta, g_th), _add(adj_ctx, g_ctx)
                total = total + w * loss_i
                if last is None:
                    last = (loss_i, met_i)

            def one_step(th: Params, c: Params, i: int = i) -> Params:
                return self.step(i, th, c, sx, sy, self.first_order)

            adj_theta, d_ctx = self._pullback(one_step, (thetas[i], ctx), adj_theta)
            adj_ctx = _add(adj_ctx, d_ctx)
        adj_phi = adj_ctx
        if not self.network.context_is_phi:
            (adj_phi,) = self._pullback(lambda p: self.context(p, sx, qx), (phi,), adj_ctx)
        assert last is not None
        return {**adj_theta, **adj_phi}, (total, last)

    def _query_grad(self, fn: Any, theta: Params, ctx: Params) -> tuple[Params, Params, Any]:
        """Gradients in theta and ctx of ``fn(theta, ctx) -> (value, aux)``, detached, and ``aux`` (detached)."""
        if self.autograd:
            th, c = _leaves(theta), _leaves(ctx)
            with torch.enable_grad():
                value, aux = fn(th, c)
                g = autograd_grad(value, {**th, **c})
            return {k: g[k] for k in th}, {k: g[k] for k in c}, tuple(a.detach() for a in aux)
        (g_th, g_ctx), aux = grad(fn, argnums=(0, 1), has_aux=True)(theta, ctx)
        return _detached(g_th), _detached(g_ctx), tuple(a.detach() for a in aux)

    def _pullback(self, fn: Any, inputs: tuple[Params, ...], adjoint: Params) -> tuple[Params, ...]:
        """``adjoint`` pulled back through ``fn(*inputs) -> Params``, its graph rebuilt here; detached."""
        if not self.autograd:
            _, pullback = vjp(fn, *inputs)  # type: ignore[misc]
            return tuple(_detached(p) for p in pullback(adjoint))
        leaves = tuple(_leaves(p) for p in inputs)
        with torch.enable_grad():
            out = fn(*leaves)
            keys = [k for k in out if out[k].requires_grad]
            flat = [v for p in leaves for v in p.values()]
            got = iter(torch.autograd.grad([out[k] for k in keys], flat, [adjoint[k] for k in keys], allow_unused=True))
        return tuple({k: torch.zeros_like(v) if (g := next(got)) is None else g for k, v in p.items()} for p in leaves)

    # -- evaluation -------------------------------------------------------------
    def adapt(self, params: Params, sx: Tensor, sy: Tensor, x: Tensor, steps: int) -> tuple[Params, Params, Params]:
        """Evaluation's adaptation: theta before and after ``steps`` first-order (graph-free) inner
        steps, and the context of the query inputs ``x``."""
        theta, phi = self.split(_detached(params))
        ctx = self.context(phi, sx, x)
        theta = self._per_task(theta, sx.shape[0])
        adapted = theta
        for i in range(steps):
            adapted = _detached(self.step(i, adapted, ctx, sx, sy, first_order=True))
        return theta, adapted, ctx

    def scores(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int):  # type: ignore[no-untyped-def]
        """Query metric before and after ``steps`` first-order (graph-free) inner steps."""
        theta, adapted, ctx = self.adapt(params, sx, sy, qx, steps)
        before = self.query(-1, theta, ctx, qx, qy)[1]
        after = self.query(steps - 1, adapted, ctx, qx, qy)[1]
        return before, after

    def predictions(self, params: Params, sx: Tensor, sy: Tensor, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """The network's outputs on ``x`` before and after the adaptation that ``scores`` measures."""
        theta, adapted, ctx = self.adapt(params, sx, sy, x, steps)
        before = self.forward(self._slot(0), theta, ctx, "q", x)
        return before.detach(), self.forward(self._slot(max(steps - 1, 0)), adapted, ctx, "q", x).detach()
