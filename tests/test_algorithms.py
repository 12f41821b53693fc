"""Each algorithm's meta-gradient against independent plain-autograd computations, in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import forward_with, native_twin, reference_adaptation, reference_algorithm_gradient, reference_scores
from test_core import _conv, _image_batch, _mlp, _regression_batch

import distmaml
from distmaml.core import Algorithm, InnerLoop, MamlppOptions, TaskProgram, init_algorithm_params, meta_grad
from distmaml.core.algorithm import batchnorm_names, head_prefix, multi_step_weights
from distmaml.core.evaluate import score_tasks

ALGOS = ["maml", "fomaml", "anil", "metasgd", "mamlpp"]
LR, STEPS = 0.1, 3
MSL = MamlppOptions(msl_anneal_steps=10)  # at meta-step 4 the weights are mid-way through annealing


def _loss(model):
    return "mse" if model.__class__.__name__ == "MLP" else "cross_entropy"


def _algo(name, model, steps=STEPS, **kw):
    inner = InnerLoop(lr=LR, steps=steps, first_order=kw.pop("first_order", False), loss=_loss(model))
    return Algorithm(name=name, inner=inner, mamlpp=kw.pop("mamlpp", MSL), **kw)


def _meta(model, algo, seed=5):
    """Initial meta-parameters with the algorithm's own entries perturbed, so that a wrong slot shows."""
    g = torch.Generator().manual_seed(seed)
    meta = init_algorithm_params(model, algo)
    for k, v in meta.items():
        if k.startswith(("lrs.", "mamlpp.")):
            meta[k] = v * (1 + 0.5 * torch.rand(v.shape, generator=g, dtype=v.dtype))
    return meta


def _reference(model, meta, batch, algo, step, **kw):
    return reference_algorithm_gradient(
        model,
        meta,
        batch,
        name=algo.name,
        lr=LR,
        steps=algo.inner.steps,
        first_order=algo.first_order_at(step),
        loss=algo.inner.loss,
        weights=kw.pop("weights", algo.loss_weights(step, algo.inner.steps)),
        head=head_prefix(model) if algo.name == "anil" else None,
        bn=batchnorm_names(model) if algo.per_step_bn else (),
    )


def _close(actual, expected, tol=1e-10):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=tol, atol=tol, msg=f"parameter {k}")


CASES = [  # every batching candidate of core.batching, on the models it is a candidate for
    pytest.param(_mlp, _regression_batch, "vmap", id="mlp-vmap"),
    pytest.param(_mlp, _regression_batch, "loop", id="mlp-loop"),
    pytest.param(_mlp, _regression_batch, "batched", id="mlp-batched"),
    pytest.param(_conv, _image_batch, "loop", id="conv-loop"),
    pytest.param(_conv, _image_batch, "loop_channels_last", id="conv-loop_channels_last"),
    pytest.param(_conv, _image_batch, "vmap", id="conv-vmap"),
    pytest.param(_conv, _image_batch, "batched", id="conv-batched"),
]


@pytest.mark.parametrize("make_model, make_batch, batching", CASES)
@pytest.mark.parametrize("name", ALGOS)
def test_meta_gradient_matches_plain_autograd(make_model, make_batch, batching, name):
    model, batch = make_model(), make_batch()
    algo = _algo(name, model)
    meta, step = _meta(model, algo), 4
    expected, _ = _reference(model, meta, batch, algo, step)
    got = meta_grad(model, meta, batch, algo, batching=batching, step=step)
    _close({k: v / got.tasks for k, v in got.grads.items()}, expected)
    if name == "mamlpp":  # every per-step rate and batch-norm slot is in use and gets a gradient
        # except the rates of conv biases: batch-norm right after removes them, so their
        # gradients are 0 up to rounding (exactly 0 in some layouts)
        conv_biases = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        rates = {k: v for k, v in got.grads.items() if k.startswith("mamlpp.")}
        assert all(
            float(v.abs().sum()) > 0
            for k, v in rates.items()
            if k.removeprefix("mamlpp.lr.").rsplit(".", 1)[0] not in conv_biases
        )


@pytest.mark.parametrize("make_model, make_batch, batching", CASES)
@pytest.mark.parametrize("name", ALGOS)
def test_recomputed_inner_steps_give_the_same_meta_gradient(make_model, make_batch, batching, name):
    model, batch = make_model(), make_batch()
    meta = _meta(model, _algo(name, model))
    plain = meta_grad(model, meta, batch, _algo(name, model), batching=batching, step=4)
    recomputed = meta_grad(model, meta, batch, _algo(name, model, recompute=True), batching=batching, step=4)
    _close(recomputed.grads, plain.grads)
    torch.testing.assert_close(recomputed.loss, plain.loss, rtol=1e-12, atol=1e-12)


def _adapt_first_order(model, meta, sx, sy, lossf, adapted):
    """Plain first-order adaptation of the ``adapted`` names; returns all model parameters."""
    p = {k: meta[k].detach().clone() for k, _ in model.named_parameters()}
    for _ in range(STEPS):
        leaves = {k: p[k].requires_grad_(True) for k in adapted}
        g = torch.autograd.grad(lossf(forward_with(model, p, sx), sy), list(leaves.values()))
        p.update({k: (leaves[k] - LR * gk).detach() for k, gk in zip(adapted, g)})
    return p


@pytest.mark.parametrize("name", ["fomaml", "anil"])
def test_first_order_is_the_query_gradient_at_the_adapted_parameters(name):
    """FOMAML: dL_q/dθ'. First-order ANIL: the body's gradient comes from the query loss alone."""
    model, batch = _mlp(), _regression_batch(tasks=2)
    algo = _algo(name, model, first_order=True)
    meta = init_algorithm_params(model, algo)
    names = [k for k, _ in model.named_parameters()]
    adapted = [k for k in names if k.startswith("net.4.")] if name == "anil" else names
    expected = {k: torch.zeros_like(v) for k, v in meta.items()}
    for t in range(2):
        p = _adapt_first_order(model, meta, batch.support_x[t], batch.support_y[t], F.mse_loss, adapted)
        leaves = {k: v.requires_grad_(True) for k, v in p.items()}
        g = torch.autograd.grad(
            F.mse_loss(forward_with(model, leaves, batch.query_x[t]), batch.query_y[t]), list(leaves.values())
        )
        for k, gk in zip(leaves, g):
            expected[k] += gk / 2
    got = distmaml.meta_gradient(
        model, meta, *batch.slice(0, 2), inner_lr=LR, inner_steps=STEPS, first_order=True, loss="mse", algorithm=name
    )
    _close(got.grads, expected)


def _reference_scores(model, meta, batch, algo, steps):
    return reference_scores(
        model,
        meta,
        batch,
        name=algo.name,
        lr=LR,
        steps=steps,
        train_steps=algo.inner.steps,
        loss=algo.inner.loss,
        head=head_prefix(model) if algo.name == "anil" else None,
        bn=batchnorm_names(model) if algo.per_step_bn else (),
    )


@pytest.mark.parametrize("make_model, make_batch, batching", CASES)
@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("steps", [STEPS, STEPS + 2])
def test_evaluation_adapts_with_the_algorithm(make_model, make_batch, batching, name, steps):
    """Validation and meta-test adapt as the algorithm does (its rates, head, per-step slots), by plain autograd."""
    model, batch = make_model(), make_batch()
    algo = _algo(name, model)
    meta = _meta(model, algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # steps past the training steps warn (see the test below)
        got = score_tasks(model, meta, batch, algo, steps, batching=batching)
    before, after = _reference_scores(model, meta, batch, algo, steps)
    torch.testing.assert_close(got.before, before, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.after, after, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALGOS)
def test_plot_predictions_are_the_evaluated_adaptation(name):
    """``TaskProgram.predictions`` (the sinusoid plot) adapts as the meta-test does, for every algorithm."""
    model, batch = _mlp(), _regression_batch()
    algo = _algo(name, model)
    meta = _meta(model, algo)
    sx, sy, qx, _ = (x[1] for x in batch)
    grid = torch.linspace(-3, 3, 11, dtype=torch.float64).unsqueeze(-1).expand(11, 3).contiguous()
    got = TaskProgram(model, algo).predictions(meta, sx, sy, grid, STEPS)
    head = head_prefix(model) if name == "anil" else None
    want = reference_adaptation(
        model, meta, sx, sy, grid, name=name, lr=LR, steps=STEPS, train_steps=STEPS, loss="mse", head=head
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_anil_adapts_only_the_head_and_its_body_gets_gradient():
    model, batch = _conv(), _image_batch()
    assert head_prefix(model) == "head" and head_prefix(_mlp()) == "net.4"
    algo = _algo("anil", model)
    meta = init_algorithm_params(model, algo)
    before, after = score_tasks(model, meta, batch, algo, STEPS)
    ref_before, ref_after = _reference_scores(model, meta, batch, algo, STEPS)
    torch.testing.assert_close(before, ref_before, rtol=0, atol=1e-12)
    torch.testing.assert_close(after, ref_after, rtol=0, atol=1e-12)
    # not MAML's adaptation: with the body adapting too, the same tasks score differently
    mlp, regression = _mlp(), _regression_batch()
    anil, maml = _algo("anil", mlp), _algo("maml", mlp)
    p = init_algorithm_params(mlp, anil)
    anil_after = score_tasks(mlp, p, regression, anil, STEPS).after
    assert float((anil_after - score_tasks(mlp, p, regression, maml, STEPS).after).abs().max()) > 1e-6
    got = meta_grad(model, init_algorithm_params(model, algo), batch, algo)
    assert float(got.grads["features.0.weight"].abs().sum()) > 0  # the body is meta-learned
    # second-order ANIL differs from first-order ANIL in the body (the path through the head's adaptation)
    fo = meta_grad(model, init_algorithm_params(model, algo), batch, _algo("anil", model, first_order=True))
    assert float((got.grads["features.0.weight"] - fo.grads["features.0.weight"]).abs().max()) > 1e-8


def test_metasgd_rate_gradient_in_closed_form():
    """One step θ' = θ - α ⊙ g: dL_q/dα = -g ⊙ ∇L_q(θ') (element-wise), by plain autograd."""
    model, batch = _mlp(), _regression_batch(tasks=1)
    algo = _algo("metasgd", model, steps=1)
    meta = _meta(model, algo)
    names = [k for k, _ in model.named_parameters()]
    theta = {k: meta[k].detach().clone().requires_grad_(True) for k in names}
    g = torch.autograd.grad(
        F.mse_loss(forward_with(model, theta, batch.support_x[0]), batch.support_y[0]), list(theta.values())
    )
    adapted = {k: (theta[k] - meta["lrs." + k] * gk).detach().requires_grad_(True) for k, gk in zip(names, g)}
    gq = torch.autograd.grad(
        F.mse_loss(forward_with(model, adapted, batch.query_x[0]), batch.query_y[0]), list(adapted.values())
    )
    got = meta_grad(model, meta, batch, algo)
    for k, gk, gqk in zip(names, g, gq):
        torch.testing.assert_close(got.grads["lrs." + k], -gk * gqk, rtol=1e-10, atol=1e-12)
    assert {k for k in meta if k.startswith("lrs.")} == {"lrs." + k for k in names}
    assert all(torch.equal(init_algorithm_params(model, algo)["lrs." + k], torch.full_like(meta[k], LR)) for k in names)


def test_multi_step_loss_is_the_weighted_sum_of_per_step_gradients():
    model, batch = _conv(), _image_batch()
    algo = _algo("mamlpp", model)
    meta, step = _meta(model, algo), 4
    weights = algo.loss_weights(step, STEPS)
    assert len(set(weights)) == 2 and abs(sum(weights) - 1) < 1e-12
    expected = {k: torch.zeros_like(v) for k, v in meta.items()}
    for i, w in enumerate(weights):  # the gradient of each step's query loss on its own
        one_hot = [0.0] * STEPS
        one_hot[i] = 1.0
        g_i, _ = _reference(model, meta, batch, algo, step, weights=one_hot[: i + 1])
        for k in expected:
            expected[k] += w * g_i[k]
    got = meta_grad(model, meta, batch, algo, step=step)
    _close({k: v / got.tasks for k, v in got.grads.items()}, expected)


def test_multi_step_weights_anneal_to_the_last_step():
    assert multi_step_weights(4, 0, 100) == [0.25] * 4
    w = multi_step_weights(4, 100, 100)
    assert w[:3] == [0.03 / 4] * 3 and abs(w[3] - (1 - 3 * 0.03 / 4)) < 1e-15
    mid = multi_step_weights(4, 50, 100)
    assert abs(sum(mid) - 1) < 1e-12 and mid[0] < 0.25 < mid[3]
    algo = Algorithm(name="mamlpp", inner=InnerLoop(lr=0.1, steps=4), mamlpp=MamlppOptions(msl_anneal_steps=100))
    assert algo.loss_weights(100, 4) == [0.0, 0.0, 0.0, 1.0]
    off = Algorithm(name="mamlpp", inner=InnerLoop(lr=0.1, steps=4), mamlpp=MamlppOptions(multi_step_loss=False))
    assert off.loss_weights(0, 4) == [0.0, 0.0, 0.0, 1.0]


def test_per_step_batchnorm_gets_gradient_only_from_its_step():
    """First order: slot i's gradient is w_i dL_i/d(bn_i) at the adapted parameters, and nothing else."""
    model, batch = _conv(), _image_batch(tasks=2)
    opts = MamlppOptions(msl_anneal_steps=10, first_order_steps=100)
    algo = _algo("mamlpp", model, mamlpp=opts)
    meta, step = _meta(model, algo), 4
    weights = algo.loss_weights(step, STEPS)
    bn = batchnorm_names(model)
    assert not set(bn) & set(meta) and f"mamlpp.bn.{bn[0]}.{STEPS - 1}" in meta
    twin = native_twin(model)
    names = [k for k, _ in model.named_parameters() if k not in bn]
    expected = {f"mamlpp.bn.{k}.{i}": torch.zeros_like(meta[f"mamlpp.bn.{k}.{i}"]) for k in bn for i in range(STEPS)}
    for t in range(2):
        p = {k: meta[k].detach().clone() for k in names}
        for i in range(STEPS):
            slot = {k: meta[f"mamlpp.bn.{k}.{i}"].detach().clone().requires_grad_(True) for k in bn}
            leaves = {k: v.requires_grad_(True) for k, v in p.items()}
            frozen_slot = {k: v.detach() for k, v in slot.items()}
            inner = F.cross_entropy(
                forward_with(twin, {**leaves, **frozen_slot}, batch.support_x[t]), batch.support_y[t]
            )
            g = torch.autograd.grad(inner, list(leaves.values()))
            p = {k: (leaves[k] - meta[f"mamlpp.lr.{k}.{i}"] * gk).detach() for k, gk in zip(names, g)}
            q = F.cross_entropy(forward_with(twin, {**p, **slot}, batch.query_x[t]), batch.query_y[t])
            for k, gk in zip(bn, torch.autograd.grad(q, list(slot.values()))):
                expected[f"mamlpp.bn.{k}.{i}"] += weights[i] * gk / 2
    got = meta_grad(model, meta, batch.slice(0, 2), algo, step=step)
    _close({k: got.grads[k] / 2 for k in expected}, expected)
    # with the last step's loss only, earlier slots get no gradient at all in first order
    last_only = meta_grad(model, meta, batch.slice(0, 2), algo, step=10)
    for k in bn:
        assert float(last_only.grads[f"mamlpp.bn.{k}.0"].abs().max()) == 0.0
        assert float(last_only.grads[f"mamlpp.bn.{k}.{STEPS - 1}"].abs().max()) > 0.0


def test_derivative_order_annealing_switches_at_the_configured_step():
    model, batch = _mlp(), _regression_batch()
    algo = _algo("mamlpp", model, mamlpp=MamlppOptions(multi_step_loss=False, first_order_steps=3))
    meta = _meta(model, algo)
    for step, first_order in [(2, True), (3, False)]:
        expected, _ = reference_algorithm_gradient(
            model,
            meta,
            batch,
            name="mamlpp",
            lr=LR,
            steps=STEPS,
            first_order=first_order,
            loss="mse",
            weights=[0.0, 0.0, 1.0],
        )
        got = meta_grad(model, meta, batch, algo, step=step)
        _close({k: v / got.tasks for k, v in got.grads.items()}, expected)


def test_more_test_steps_reuse_the_last_slot_with_a_warning():
    model, batch = _conv(), _image_batch()
    algo = _algo("mamlpp", model, steps=2)
    meta = _meta(model, algo)
    with pytest.warns(UserWarning, match="inner.test_steps = 4 exceeds the 2 inner steps") as record:
        got = score_tasks(model, meta, batch, algo, 4)
    assert len(record) == 1
    # the same as a 4-step algorithm whose slots 2 and 3 are copies of slot 1
    longer = _algo("mamlpp", model, steps=4)
    extended = dict(meta)
    for k in list(meta):
        if k.startswith("mamlpp.") and k.endswith(".1"):
            extended[k[:-1] + "2"] = extended[k[:-1] + "3"] = meta[k]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = score_tasks(model, extended, batch, longer, 4)
    torch.testing.assert_close(got.after, want.after, rtol=0, atol=0)
    torch.testing.assert_close(got.before, want.before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["maml", "mamlpp"])
def test_inner_recompute_config_key_gives_the_same_shard(name):
    """``inner.recompute`` from the config reaches the core: the same flat meta-gradient to 1e-10."""
    from distmaml.config import load_config
    from distmaml.run.assembly import build_runner

    base = [
        "precision=float64",
        "inner.steps=4",
        "model.hidden=[8,8]",
        f"algorithm={name}",
        "mamlpp.msl_anneal_steps=9",
    ]
    plain, recomputed = (
        build_runner(load_config("sinusoid", [*base, f"inner.recompute={rc}"])) for rc in (False, True)
    )
    assert recomputed.algorithm.recompute and not plain.algorithm.recompute
    flat = plain.layout.flatten(init_algorithm_params(plain.model, plain.algorithm))
    a, b = plain.meta_grad(flat, 3, range(4)), recomputed.meta_grad(flat, 3, range(4))
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10)
    assert abs(b.loss - a.loss) < 1e-12


@pytest.mark.parametrize(
    "name, options, rate, network",
    [
        ("maml", {}, "fixed_rate", "WholeNetwork"),
        ("fomaml", {}, "fixed_rate", "WholeNetwork"),
        ("anil", {}, "fixed_rate", "HeadOnly"),
        ("metasgd", {}, "metasgd_rate", "WholeNetwork"),
        ("mamlpp", {}, "per_step_rate", "WholeNetwork"),
        ("mamlpp", {"learned_lrs": False}, "fixed_rate", "WholeNetwork"),
    ],
)
def test_an_algorithm_is_its_two_strategies_around_the_one_inner_step(name, options, rate, network):
    """Which rates and which network each algorithm's inner steps use; the step itself is ``inner_step``."""
    from distmaml.core import program

    algo = Algorithm(name=name, inner=InnerLoop(lr=0.1, steps=2), mamlpp=MamlppOptions(**options))
    p = TaskProgram(_conv(), algo)
    chosen = p.rate.__qualname__.split(".")[0]  # fixed_rate's closure is named fixed_rate.<locals>.<lambda>
    assert chosen == rate and type(p.network).__name__ == network
    params = init_algorithm_params(_conv(), algo)
    theta, phi = p.split(params)
    grads = {k: torch.full_like(v, 2.0) for k, v in theta.items()}
    stepped = program.inner_step(theta, grads, lambda k: p.rate(k, 1, phi))
    for k, v in theta.items():  # every rate starts at inner.lr: theta - 0.1 * 2 everywhere
        torch.testing.assert_close(stepped[k], v - 0.2)
