"""Every algorithm through the Ray engine with 2 workers: the same parameters as in-process, in float64."""

from __future__ import annotations

import pytest
import ray
import torch

from distmaml.config import load_config
from distmaml.run.assembly import assemble

BASE = [
    "precision=float64",
    "meta.batch_size=5",
    "meta.steps=3",
    "meta.val_every=0",
    "meta.val_tasks=4",
    "meta.test_tasks=5",
    "inner.steps=2",
    "inner.test_steps=3",  # past the training steps: per-step parameters reuse the last slot
    "model.hidden=[8,8]",
    "tracking.enabled=false",
    "engine.cpus_per_worker=0.5",
    "engine.driver_cpus=0.5",
    "batching=batched",  # not auto: it times the candidates in every process (tests/test_engine.py shows it)
    # MAML++ with every part changing within the run: loss weights anneal, order switches at step 1, cosine lr
    "mamlpp.msl_anneal_steps=2",
    "mamlpp.first_order_steps=1",
]
# MAML++'s per-step batch-norm needs a network with batch-norm: a tiny conv net on random images
CONV = ["data.family=noise", "model.name=conv4", "model.filters=3", "data.image_size=16", "data.ways=3"]
CONV += ["data.shots=1", "data.queries=2"]
# one batching for both runs: auto times per process, and Adam turns the rounding noise of a
# conv bias's zero gradient (batch-norm follows) into steps that differ between computations
CONV += ["batching=loop_channels_last"]

CASES = [pytest.param(a, [], id=a) for a in ("maml", "fomaml", "anil", "metasgd")]
CASES += [pytest.param("mamlpp", CONV, id="mamlpp-conv-bn")]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _run(run):
    config, engine = run.config, run.engine
    trainer = run.trainer(progress=False)
    try:
        while trainer.step < config.meta.steps:
            trainer.train_step()
        scores = trainer.meta_test()
    finally:
        engine.close()
    return trainer.params, scores


@pytest.mark.parametrize("algorithm, extra", CASES)
def test_two_workers_match_in_process(algorithm, extra):
    configs = [load_config("sinusoid", [*BASE, *extra, f"algorithm={algorithm}", f"workers={w}"]) for w in (0, 2)]
    ref_params, ref_scores = _run(assemble(configs[0]))
    params, scores = _run(assemble(configs[1]))
    assert params.keys() == ref_params.keys()
    own = {"metasgd": "lrs.", "mamlpp": "mamlpp."}.get(algorithm)
    if own:  # the algorithm's own meta-parameters travel and are learned too
        assert any(k.startswith(own) for k in params)
    init = assemble(configs[0]).params
    # every tensor moves, except a conv bias before batch-norm (and its rates): its gradient is exactly zero
    still = {k for k, v in ref_params.items() if torch.equal(v, init[k])}
    assert all(".bias" in k and "features." in k for k in still), f"did not move: {sorted(still)}"
    for k, v in ref_params.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")
    torch.testing.assert_close(scores.after, ref_scores.after, rtol=0, atol=1e-10)
