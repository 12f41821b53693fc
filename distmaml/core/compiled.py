"""Batching ``compiled``: the ``vmap`` meta-gradient traced once into a graph and compiled.

On small networks a meta-step's cost is mostly fixed per-call overhead:
Python, ``torch.func``'s transforms and the dispatcher, op by op, for every
inner step. Here the whole computation for a batch of tasks — the inner
steps, the second-order backward, the sums over tasks — is traced once by
``make_fx`` into a graph of aten operations, and inductor (C++ on the CPU, Triton on
a GPU) turns that graph into a few fused kernels. Later calls run the
compiled code only.

The graph is handed to inductor by ``torch._inductor.standalone_compile``,
its precompilation entry point, rather than through ``torch.compile``:
dynamo would trace the already traced graph again (4.8 s of a sinusoid
compile that took 0.4 s this way, inductor's cache warm) and check its
guards on every call. The graph's key below already decides when it
applies. Per call of the sinusoid graph on 13 tasks: 162 us against
205-290 us through ``torch.compile``'s wrapper.

A graph bakes in everything Python decided while it was traced, so it is
cached under a key of exactly those things (``graph_key``): the network (the
cache lives with it, ``_GRAPHS``), the algorithm with its settings, what the
meta-step changes (MAML++'s derivative order and which query losses count;
the annealed weights themselves are an input), the threads, and the shapes,
dtypes, strides and devices of parameters and tasks. The step itself is not
in the key: a run compiles once per distinct key (a new task count, e.g. a
last partial shard, or MAML++'s switch to second order), not per step.

It is traced from the ``vmap`` path with batch-norm written out (as
``vmap`` runs it): compiled, that path ran 2x (sinusoid MLP) to 2.3x
(conv4) faster than the same of the ``batched`` path, and compiled in a
third of the time.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from distmaml.core.algorithm import Algorithm
from distmaml.core.batchnorm import with_implementation
from distmaml.core.program import TaskProgram
from distmaml.typing import Params, TaskBatch

COMPILE_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}
"""Inductor options of these graphs only (config patches while compiling them, nothing global):
with the C++ wrapper a call of the sinusoid graph took about 0.65x the time of the Python wrapper's."""

Graph = Callable[[Params, TaskBatch, Tensor], tuple[Params, Tensor, Tensor]]
"""A compiled meta-gradient: (parameters, tasks, loss weights) -> summed gradients, loss and metric."""

_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Graph]] = weakref.WeakKeyDictionary()
"""Compiled graphs of each network (the module passed to ``meta_grad``), by ``graph_key``."""


class CompileError(RuntimeError):
    """``batching: compiled`` could not trace or compile the meta-gradient; the message says what to use instead."""


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def graph_key(algorithm: Algorithm, step: int, params: Params, batch: TaskBatch) -> tuple[Any, ...]:
    """What a compiled graph of ``algorithm`` at meta-step ``step`` depends on, beside the network.

    ``algorithm`` (a frozen dataclass: rates, steps, options are constants of
    the graph); from the step only what it changes: the derivative order and
    which query losses have a non-zero weight; the threads (inductor's CPU
    kernels are compiled for a thread count); each tensor's layout.
    """
    weights = algorithm.loss_weights(step, algorithm.inner.steps)
    return (
        algorithm,
        algorithm.first_order_at(step),
        tuple(w != 0 for w in weights),
        torch.get_num_threads(),
        tuple((k, _tensor_key(v)) for k, v in params.items()),
        tuple(_tensor_key(t) for t in batch),
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}"


def _trace(model: nn.Module, algorithm: Algorithm, step: int, params: Params, batch: TaskBatch) -> torch.fx.GraphModule:
    """``make_fx`` of the ``vmap`` meta-gradient, summed over tasks, with the loss weights as input."""
    from torch.fx.experimental.proxy_tensor import make_fx

    net = with_implementation(model, "explicit")  # torch's native batch-norm is wrong at second order under vmap

    def meta_grad_sum(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, w: Tensor) -> Any:
        program = TaskProgram(net, algorithm, step)
        program.weights = [w[i] if v else 0.0 for i, v in enumerate(program.weights)]
        objective = grad_and_value(program.objective, has_aux=True)
        g, (_, (loss, met)) = vmap(objective, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return {k: v.sum(0) for k, v in g.items()}, loss.sum(), met.sum()

    return make_fx(meta_grad_sum)(params, *batch, _weights(algorithm, step, batch.support_x))


def _inputs(params: Params, batch: TaskBatch, weights: Tensor) -> list[Any]:
    """The graph's inputs, flat, in the order ``make_fx`` traced them: the parameters (a dict, in its
    order: the key holds that order), the task tensors, the loss weights."""
    return [*params.values(), *batch, weights]


def _weights(algorithm: Algorithm, step: int, like: Tensor) -> Tensor:
    w = algorithm.loss_weights(step, algorithm.inner.steps)
    return torch.tensor(w, dtype=like.dtype, device=like.device)


def compiled_graph(
    model: nn.Module, algorithm: Algorithm, step: int, params: Params, batch: TaskBatch
) -> tuple[Graph, float]:
    """The compiled meta-gradient for these arguments, and the seconds spent compiling it (0.0: cached).

    The first call with a new ``graph_key`` traces and compiles (tens of
    seconds for a conv net; inductor keeps its compiled code on disk, so
    another process compiling the same graph takes less) and runs the graph
    once, so compile errors surface here.

    Raises:
        CompileError: tracing or compiling failed; one line naming the cause and another batching.
    """
    key = graph_key(algorithm, step, params, batch)
    graphs = _GRAPHS.setdefault(model, {})
    fn = graphs.get(key)
    if fn is not None:
        return fn, 0.0
    t0 = time.perf_counter()
    what = f"{type(model).__name__} under {algorithm.name} on {batch.num_tasks} tasks"
    try:
        gm = _trace(model, algorithm, step, params, batch)
    except Exception as e:
        raise CompileError(
            f"batching = 'compiled': the meta-gradient of {what} could not be traced ({_one_line(e)}); "
            "use batching: batched (or vmap, loop)"
        ) from e
    from torch._inductor import standalone_compile

    inputs = _inputs(params, batch, _weights(algorithm, step, batch.support_x))
    try:
        artifact = standalone_compile(
            gm, inputs, dynamic_shapes="from_example_inputs", options={"config_patches": COMPILE_OPTIONS}
        )
        with torch.no_grad():  # as every call runs it
            artifact(*inputs)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        raise CompileError(
            f"batching = 'compiled': inductor failed to compile the meta-gradient of {what} ({_one_line(e)}); "
            "use batching: batched (or vmap, loop), or fix the compiler (inductor needs a C++ compiler on CPUs)"
        ) from e

    def compiled(p: Params, tasks: TaskBatch, weights: Tensor) -> tuple[Params, Tensor, Tensor]:
        return artifact(*_inputs(p, tasks, weights))  # type: ignore[no-any-return]

    graphs[key] = compiled
    return compiled, time.perf_counter() - t0


def compiled_meta_grad(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    algorithm: Algorithm,
    step: int,
    on_compile: Callable[[str, float], None] | None = None,
) -> tuple[Params, Tensor, Tensor]:
    """Summed gradients, query loss and metric of the batch's tasks, by the compiled graph.

    ``on_compile(description, seconds)`` is called when a new graph was compiled.
    """
    if algorithm.recompute:
        raise ValueError(
            "batching = 'compiled' with recompute: a compiled graph does not keep the recomputation "
            "(inductor may merge it away); use batching: loop or vmap with recompute, or recompute off"
        )
    theta = {k: v.detach() for k, v in params.items()}
    fn, seconds = compiled_graph(model, algorithm, step, theta, batch)
    if seconds and on_compile is not None:
        order = "first" if algorithm.first_order_at(step) else "second"
        on_compile(f"{algorithm.name} ({order} order) on {batch.num_tasks} tasks", seconds)
    with torch.no_grad():  # the graph holds the backward pass itself; nothing outside differentiates it
        return fn(theta, batch, _weights(algorithm, step, batch.support_x))
