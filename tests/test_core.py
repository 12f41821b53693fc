"""The meta-gradient against independent computations, in float64."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reference import query_loss_after_adaptation, reference_meta_gradient, reference_scores

import distmaml
from distmaml.core import Algorithm, InnerLoop, TaskProgram, meta_grad, score_tasks
from distmaml.core.batching import BATCHINGS, candidates
from distmaml.models import MLP, Conv4
from distmaml.typing import TaskBatch


def _regression_batch(tasks=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * k, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(tasks, 2 * k, 1, generator=g, dtype=torch.float64)
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def _image_batch(tasks=3, ways=3, shots=2, queries=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_s, n_q = ways * shots, ways * queries
    x = torch.randn(tasks, n_s + n_q, 1, size, size, generator=g, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots + queries)
    y = torch.stack([labels[torch.randperm(len(labels), generator=g)] for _ in range(tasks)])
    return TaskBatch(x[:, :n_s], y[:, :n_s], x[:, n_s:], y[:, n_s:])


def _mlp():
    torch.manual_seed(1)
    return MLP(3, (8, 8), 1).double()


def _conv():
    torch.manual_seed(2)
    return Conv4(ways=3, in_channels=1, image_size=16, filters=4).double()


CASES = [
    pytest.param(_mlp, _regression_batch, "mse", id="mlp-mse"),
    pytest.param(_conv, _image_batch, "cross_entropy", id="conv-bn-ce"),
]


def _assert_close(actual: dict, expected: dict, tol: float) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=tol, atol=tol, msg=f"parameter {k}")


# every batching candidate of each model (core.batching.candidates; checked below)
BATCHED_CASES = [pytest.param(_mlp, _regression_batch, "mse", b, id=f"mlp-mse-{b}") for b in ("vmap", "loop")] + [
    pytest.param(_conv, _image_batch, "cross_entropy", b, id=f"conv-bn-ce-{b}") for b in BATCHINGS
]


def test_the_cases_cover_every_candidate():
    assert candidates(_mlp()) == ("loop", "vmap", "batched") and candidates(_conv()) == BATCHINGS


@pytest.mark.parametrize("make_model, make_batch, loss, batching", BATCHED_CASES)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_plain_autograd(make_model, make_batch, loss, batching, first_order, steps):
    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    expected, expected_loss = reference_meta_gradient(
        model, params, batch, lr=0.1, steps=steps, first_order=first_order, loss=loss
    )
    got = distmaml.meta_gradient(
        model, None, *batch, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss, batching=batching
    )
    _assert_close(got.grads, expected, 1e-10)
    torch.testing.assert_close(got.loss, expected_loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make_model, make_batch, loss", CASES)
def test_second_order_matches_finite_differences(make_model, make_batch, loss):
    model, batch = make_model(), make_batch()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    got = distmaml.meta_gradient(model, params, *batch, inner_lr=0.1, inner_steps=2, loss=loss)
    name = next(k for k in params if k.endswith("weight"))
    eps = 1e-6
    for first in (0, 1):
        index = (first,) + (0,) * (params[name].dim() - 1)
        plus = {k: v.clone() for k, v in params.items()}
        minus = {k: v.clone() for k, v in params.items()}
        plus[name][index] += eps
        minus[name][index] -= eps
        fd = (
            query_loss_after_adaptation(model, plus, batch, lr=0.1, steps=2, loss=loss)
            - query_loss_after_adaptation(model, minus, batch, lr=0.1, steps=2, loss=loss)
        ) / (2 * eps)
        assert abs(float(got.grads[name][index]) - fd) < 1e-7 * max(1.0, abs(fd))


def test_second_order_differs_from_first_order():
    """The check above would pass for a first-order result if the second-order term vanished."""
    model, batch = _mlp(), _regression_batch()
    second = distmaml.meta_gradient(model, None, *batch, inner_lr=0.3, inner_steps=2, loss="mse")
    first = distmaml.meta_gradient(model, None, *batch, inner_lr=0.3, inner_steps=2, first_order=True, loss="mse")
    diff = max(float((second.grads[k] - first.grads[k]).abs().max()) for k in first.grads)
    assert diff > 1e-4


def test_first_order_builds_no_second_order_graph():
    """Training's inner step, first order: adapted parameters depend on the meta-parameters through the identity only."""
    model, batch = _mlp(), _regression_batch()
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    program = TaskProgram(model, Algorithm(name="fomaml", inner=InnerLoop(lr=0.1, steps=3, loss="mse")))
    assert program.first_order
    sx, sy, qx, _ = (x[0] for x in batch)
    adapted, phi = program.split(theta)
    ctx = program.context(phi, sx, qx)
    for i in range(3):
        adapted = program.step(i, adapted, ctx, sx, sy, program.first_order)
    for k, v in adapted.items():
        # v = ((theta - c1) - c2) - c3: a chain of subtractions ending at theta's leaf.
        node, depth = v.grad_fn, 0
        while node is not None and type(node).__name__ != "AccumulateGrad":
            inputs = [f for f, _ in node.next_functions if f is not None]
            assert len(inputs) == 1, f"{k}: {type(node).__name__} has {len(inputs)} differentiable inputs"
            node, depth = inputs[0], depth + 1
        assert node is not None and node.variable is theta[k]
        assert depth == 3


def test_sums_split_across_shards_equal_the_whole():
    model, batch = _conv(), _image_batch(tasks=5)
    params = dict(model.named_parameters())
    inner = InnerLoop(lr=0.1, steps=1)
    whole = meta_grad(model, params, batch, inner)
    parts = [meta_grad(model, params, batch.slice(a, b), inner) for a, b in [(0, 2), (2, 3), (3, 5)]]
    assert sum(p.tasks for p in parts) == whole.tasks == 5
    _assert_close({k: sum(p.grads[k] for p in parts) for k in params}, whole.grads, 1e-12)
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss)
    torch.testing.assert_close(sum(p.metric for p in parts), whole.metric)


@pytest.mark.parametrize("make_model, make_batch, loss", CASES)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_evaluation_adapts_as_plain_autograd(make_model, make_batch, loss, batching):
    """Validation and meta-test (``score_tasks``, through the algorithm's program) against plain SGD steps."""
    model, batch = make_model(), make_batch()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    algo = Algorithm(name="maml", inner=InnerLoop(lr=0.05, steps=1, loss=loss))
    got = score_tasks(model, params, batch, algo, 5, batching=batching)
    before, after = reference_scores(model, params, batch, name="maml", lr=0.05, steps=5, train_steps=1, loss=loss)
    torch.testing.assert_close(got.before, before, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.after, after, rtol=1e-10, atol=1e-10)
    if loss == "mse":  # and adaptation is not a no-op: five steps lower the mean query loss
        assert float(got.after.mean()) < 0.9 * float(got.before.mean())


def test_core_imports_no_ray_mlflow_or_pyarrow():
    code = (
        "import sys, distmaml.core, distmaml.tasks, distmaml.models; "
        "bad = [m for m in ('ray', 'mlflow', 'pyarrow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
