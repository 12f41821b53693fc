"""``batching: compiled`` against the per-task loop by plain autograd, in float64.

Each compile takes tens of seconds on a busy 2-core machine, so the tests
keep to a few graphs of tiny networks (inductor's on-disk cache makes a
second run of the module faster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from test_core import _image_batch  # the conv tests' tasks

from distmaml.config import ConfigError, load_config
from distmaml.core import Algorithm, InnerLoop, MamlppOptions, init_algorithm_params, meta_grad, score_tasks
from distmaml.core.compiled import _GRAPHS
from distmaml.models import MLP, Conv4, sinusoid_mlp
from distmaml.run.assembly import assemble
from distmaml.typing import TaskBatch

TOL = 1e-10


def _close(actual, expected):
    assert actual.grads.keys() == expected.grads.keys()
    for k in expected.grads:
        torch.testing.assert_close(actual.grads[k], expected.grads[k], rtol=TOL, atol=TOL, msg=f"parameter {k}")
    torch.testing.assert_close(actual.loss, expected.loss, rtol=TOL, atol=TOL)
    torch.testing.assert_close(actual.metric, expected.metric, rtol=TOL, atol=TOL)
    assert actual.tasks == expected.tasks


def _sinusoid_batch(tasks, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64)
    phase = torch.pi * torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64)
    x = 10 * torch.rand(tasks, 2 * k, 1, generator=g, dtype=torch.float64) - 5
    y = amp * torch.sin(x + phase)
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def test_sinusoid_maml_matches_the_loop_and_compiles_once():
    torch.manual_seed(0)
    model = sinusoid_mlp().double()
    algo = Algorithm(name="maml", inner=InnerLoop(lr=0.01, steps=1, loss="mse"))
    params = init_algorithm_params(model, algo)
    compiled: list[str] = []

    def note(what: str, seconds: float) -> None:
        assert seconds > 0
        compiled.append(what)

    for seed in (0, 1):  # other tasks and parameters, same graph
        batch = _sinusoid_batch(4, seed=seed)
        got = meta_grad(model, params, batch, algo, batching="compiled", on_compile=note)
        _close(got, meta_grad(model, params, batch, algo, batching="loop"))
        params = {k: v + 0.01 * got.grads[k] for k, v in params.items()}
    assert compiled == ["maml (second order) on 4 tasks"]
    # evaluation has no second-order graph: it scores as batched does
    batch = _sinusoid_batch(4)
    scores = score_tasks(model, params, batch, algo, 3, batching="compiled")
    ref = score_tasks(model, params, batch, algo, 3, batching="loop")
    torch.testing.assert_close(scores.after, ref.after, rtol=TOL, atol=TOL)


@pytest.mark.slow
def test_conv4_batchnorm_mamlpp_across_the_switch_to_second_order():
    """Step 0 first order, steps 1 and 2 second order with other multi-step weights: two graphs."""
    torch.manual_seed(2)
    model = Conv4(ways=3, in_channels=1, image_size=8, filters=4, blocks=1).double()  # one block: compiles sooner
    opts = MamlppOptions(msl_anneal_steps=10, first_order_steps=1)
    algo = Algorithm(name="mamlpp", inner=InnerLoop(lr=0.1, steps=2), mamlpp=opts)
    params = init_algorithm_params(model, algo)
    torch.manual_seed(3)  # learned rates and per-step batch-norm slots apart from their initial values
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}
    batch = _image_batch(tasks=3, ways=3, shots=1, queries=2, size=8)
    compiled: list[str] = []
    for step in (0, 1, 2):
        assert algo.loss_weights(step, 2)[0] > 0  # every step's query loss counts, with weights that change
        got = meta_grad(
            model, params, batch, algo, batching="compiled", step=step, on_compile=lambda d, s: compiled.append(d)
        )
        _close(got, meta_grad(model, params, batch, algo, batching="loop", step=step))
    assert compiled == ["mamlpp (first order) on 3 tasks", "mamlpp (second order) on 3 tasks"]
    assert len(_GRAPHS[model]) == 2  # the step is not in the key, only what it changes


def test_recompute_with_compiled_is_refused():
    with pytest.raises(ConfigError, match=r"batching = 'compiled' with inner.recompute = true.*batching=loop"):
        load_config("sinusoid", ["batching=compiled", "inner.recompute=true"])
    algo = Algorithm(name="maml", inner=InnerLoop(lr=0.01, steps=1, loss="mse"), recompute=True)
    model = sinusoid_mlp().double()
    with pytest.raises(ValueError, match="batching = 'compiled' with recompute"):
        meta_grad(model, init_algorithm_params(model, algo), _sinusoid_batch(2), algo, batching="compiled")


def test_a_compiler_that_does_not_work_gets_one_line(tmp_path):
    """Inductor told to use a C++ compiler that does not exist (and an empty cache, so it must compile)."""
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-g++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    sets = ["batching=compiled", "meta.steps=1", "meta.batch_size=2", "workers=0", "tracking.enabled=false"]
    sets += ["meta.val_every=0", "meta.test_tasks=2"]
    cmd = [sys.executable, "-m", "distmaml", "train", "--config", "sinusoid", "--out", str(tmp_path / "run")]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("distmaml: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "batching = 'compiled': inductor failed" in lines[0] and "use batching: batched" in lines[0]
    assert "no-such-g++" in lines[0]


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _run(workers, batching):
    config = load_config(
        "sinusoid",
        [
            "precision=float64",
            "meta.batch_size=5",  # shards of 3 and 2 tasks: each worker compiles for its own count
            "meta.steps=2",
            "meta.val_every=0",
            "meta.test_tasks=4",
            "inner.steps=1",
            "tracking.enabled=false",
            "engine.cpus_per_worker=1",
            "engine.driver_cpus=0.5",
            f"workers={workers}",
            f"batching={batching}",
        ],
    )
    run = assemble(config)
    trainer = run.trainer(progress=False)
    try:
        while trainer.step < config.meta.steps:
            trainer.train_step()
        scores = trainer.meta_test()
        report = run.engine.batching()
    finally:
        run.engine.close()
    return trainer.params, scores, report


@pytest.mark.slow
def test_two_ray_workers_compiled_match_in_process_batched(ray_instance):
    ref, ref_scores, _ = _run(0, "batched")
    got, scores, report = _run(2, "compiled")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=TOL, msg=f"parameter {k}")
    torch.testing.assert_close(scores.after, ref_scores.after, rtol=0, atol=TOL)
    torch.testing.assert_close(scores.before, ref_scores.before, rtol=0, atol=TOL)
    assert report["choice"] == "compiled"
    # compiled at start-up, each worker for its shard's tasks, and not again during the steps
    assert [list(w["compiled"]) for w in report["workers"]] == [
        ["maml (second order) on 3 tasks"],
        ["maml (second order) on 2 tasks"],
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fomaml", "anil", "metasgd"])
def test_other_algorithms_match_the_loop(name):
    torch.manual_seed(1)
    model = MLP(3, (8, 8), 1).double()
    algo = Algorithm(name=name, inner=InnerLoop(lr=0.1, steps=2, loss="mse"))
    params = init_algorithm_params(model, algo)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}  # Meta-SGD's rates differ per element
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True))
    batch = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    _close(
        meta_grad(model, params, batch, algo, batching="compiled"),
        meta_grad(model, params, batch, algo, batching="loop"),
    )
