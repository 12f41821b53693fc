"""The outer loop's gradient: query loss after adaptation, differentiated
through the inner loop with respect to the meta-parameters.

``meta_grad`` returns *sums* over the tasks it was given (the engine adds
shards and divides once by the meta-batch size); ``meta_gradient`` is the
public contract of docs/architecture.md and returns means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from distmaml.core.algorithm import Algorithm, InnerLoop, MamlppOptions, as_algorithm, init_algorithm_params
from distmaml.core.batching import ALLOWED_BATCHINGS, COMPILED, choose_batching
from distmaml.core.batchnorm import with_implementation
from distmaml.core.compiled import compiled_meta_grad
from distmaml.core.program import TaskProgram
from distmaml.typing import Params, TaskBatch


class MetaGradSum(NamedTuple):
    """What one shard of a meta-batch returns: sums over its tasks."""

    grads: Params
    loss: Tensor
    metric: Tensor
    tasks: int


class MetaGradient(NamedTuple):
    """The docs/architecture.md contract: means over the tasks of the batch."""

    grads: Params
    loss: Tensor


def batched_model(model: nn.Module, batch: TaskBatch, batching: str) -> tuple[str, nn.Module]:
    """The batching mode (one of ``core.batching.BATCHINGS``) and the network's view for it.

    Under ``vmap``, ``batched`` and ``compiled`` batch-norm is written out
    (torch's native one gave a wrong second-order gradient under ``vmap``); in
    the per-task loops it is torch's fused kernel. See ``core.batchnorm``.
    """
    mode = choose_batching(model, batch.support_x.device) if batching == "auto" else batching
    if mode not in ALLOWED_BATCHINGS:
        raise ValueError(f"batching = {mode!r}: allowed values are {', '.join(map(repr, ALLOWED_BATCHINGS))}")
    return mode, with_implementation(model, "explicit" if mode in ("vmap", "batched", COMPILED) else "native")


def _detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


def meta_grad(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    inner: InnerLoop | Algorithm,
    *,
    batching: str = "auto",
    step: int = 0,
    on_compile: Callable[[str, float], None] | None = None,
) -> MetaGradSum:
    """Sum over the batch's tasks of the query-loss gradient after adaptation.

    Args:
        model: network structure for ``functional_call``.
        params: meta-parameters, name -> tensor: the model's and the
            algorithm's own (``init_algorithm_params``).
        batch: T tasks, task dimension first.
        inner: the algorithm (an ``InnerLoop`` alone means MAML).
        batching: ``"vmap"`` (all tasks at once), ``"loop"`` (one task at a
            time: memory of one task's graph), ``"loop_channels_last"`` (the
            loop with NHWC images), ``"batched"`` (all tasks at once by plain
            autograd over vmap'ed forward passes) or ``"auto"``
            (``choose_batching``'s unmeasured rule; workers time the
            candidates, see ``core.batching``); or ``"compiled"``: the ``vmap``
            computation traced once and compiled by inductor, cached
            per network and settings (``core.compiled``; the first call of a
            new shape compiles for seconds to minutes).
        step: the meta-step; MAML++'s loss weights and derivative order depend on it.
        on_compile: with ``"compiled"``, called with a description and the
            seconds it took whenever a new graph was compiled.

    Returns:
        Summed gradients, summed query loss (after the last inner step) and
        metric, and the task count.
    """
    algorithm = as_algorithm(inner)
    if batching == COMPILED:
        g, loss, met = compiled_meta_grad(model, params, batch, algorithm, step, on_compile)
        return MetaGradSum(g, loss, met, batch.num_tasks)
    mode, net = batched_model(model, batch, batching)
    if mode == "batched" and algorithm.recompute:
        mode = "vmap"  # recomputation is written with torch.func (vjp per step); vmap carries it
    program = TaskProgram(
        net,
        algorithm,
        step,
        autograd=mode != "vmap",
        channels_last=mode == "loop_channels_last",
        batched=mode == "batched",
    )
    if algorithm.recompute:
        objective = program.recomputed_grad
    elif program.autograd:
        objective = program.autograd_grad_and_value
    else:
        objective = grad_and_value(program.objective, has_aux=True)
    theta = _detached(params)
    if mode == "batched":
        theta = {k: v.requires_grad_() for k, v in theta.items()}
        g, (_, (loss, met)) = program.autograd_grad_and_value(theta, *batch)
        return MetaGradSum(g, loss, met, batch.num_tasks)
    if mode == "vmap":
        g, (_, (loss, met)) = vmap(objective, in_dims=(None, 0, 0, 0, 0))(theta, *batch)
        return MetaGradSum({k: v.sum(0) for k, v in g.items()}, loss.sum(), met.sum(), batch.num_tasks)
    if program.autograd:
        theta = {k: v.requires_grad_() for k, v in theta.items()}
    total: Params = {k: torch.zeros_like(v) for k, v in theta.items()}
    loss_sum = torch.zeros((), dtype=next(iter(theta.values())).dtype, device=batch.support_x.device)
    met_sum = torch.zeros_like(loss_sum)
    for t in range(batch.num_tasks):
        g, (_, (loss, met)) = objective(theta, *(x[t] for x in batch))
        for k in total:
            total[k].add_(g[k])
        loss_sum += loss.detach()
        met_sum += met.detach()
    return MetaGradSum(total, loss_sum, met_sum, batch.num_tasks)


def meta_gradient(
    model: nn.Module,
    params: Params | None,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
    loss: str = "cross_entropy",
    batching: str = "auto",
    algorithm: str = "maml",
    mamlpp: MamlppOptions | None = None,
    recompute: bool = False,
    step: int = 0,
) -> MetaGradient:
    """Mean over tasks of the query-loss gradient after ``inner_steps`` steps.

    Task tensors carry the task dimension first (``x_TK...``). ``params`` is a
    name -> tensor dict; None uses the model's own parameters plus the
    algorithm's initial ones (``init_algorithm_params``).

    Keyword options beyond docs/architecture.md's contract: ``algorithm`` (``maml``,
    ``fomaml``, ``anil``, ``metasgd``, ``mamlpp``), ``mamlpp`` (its options),
    ``recompute`` (gradient checkpointing of the inner steps), ``step`` (the
    meta-step, for MAML++'s schedules) and ``batching``.

    Example:
        >>> model = distmaml.models.sinusoid_mlp()
        >>> mg = distmaml.meta_gradient(model, None, sx, sy, qx, qy,
        ...                             inner_lr=0.01, inner_steps=1, loss="mse")
        >>> mg.grads["net.0.weight"].shape, float(mg.loss)
    """
    batch = TaskBatch(support_x, support_y, query_x, query_y)
    inner = InnerLoop(lr=inner_lr, steps=inner_steps, first_order=first_order, loss=loss)
    algo = Algorithm(name=algorithm, inner=inner, mamlpp=mamlpp or MamlppOptions(), recompute=recompute)
    if params is None:
        params = init_algorithm_params(model, algo)
    s = meta_grad(model, params, batch, algo, batching=batching, step=step)
    n = s.tasks
    return MetaGradient({k: v / n for k, v in s.grads.items()}, s.loss / n)
