"""``engine.reduce: collective``: a Ray Train worker group that all-reduces among itself.

In float64, a run through the collective engine with 1, 2 or 3 workers ends
with the in-process engine's parameters (to 1e-10), scores the same held-out
tasks in the same order, and writes the same run directory (checkpoints,
``result.json``); its result comes back to the driver.
"""

from __future__ import annotations

import json

import pytest
import ray
import torch

from distmaml.assembly import assemble
from distmaml.checkpoint import list_checkpoints, load_checkpoint
from distmaml.config import ConfigError, load_config

BASE = [
    "precision=float64",
    "meta.batch_size=6",
    "meta.steps=5",
    "meta.val_every=2",
    "meta.val_tasks=5",  # fewer than 2 per worker with 3: uneven shards, gathered in task order
    "meta.test_tasks=7",
    "inner.steps=2",
    "model.hidden=[8,8]",
    "tracking.enabled=false",
    "engine.cpus_per_worker=0.5",
    "engine.driver_cpus=0.5",
]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run: its run directory and result."""
    run_dir = tmp_path_factory.mktemp("collective") / "in-process"
    result = assemble(load_config("sinusoid", [*BASE, "workers=0"])).fit(run_dir, progress=False)
    return run_dir, result


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_collective_matches_in_process(workers, reference, tmp_path):
    ref_dir, ref_result = reference
    run = assemble(load_config("sinusoid", [*BASE, "engine.reduce=collective", f"workers={workers}"]))
    result = run.fit(tmp_path / "run", progress=False)

    ref, got = load_checkpoint(ref_dir), load_checkpoint(tmp_path / "run")
    assert got.step == ref.step == 5
    assert got.params.keys() == ref.params.keys()
    init = assemble(load_config("sinusoid", [*BASE, "workers=0"])).params
    for k, v in ref.params.items():
        assert not torch.equal(v, init[k]), f"{k} did not move"
        torch.testing.assert_close(got.params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")
    # the same Adam state: a resumed run would go on identically
    for a, b in zip(ref.optimizer["state"].values(), got.optimizer["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=1e-10)

    # the result reaches the driver and is what rank 0 wrote; validation and meta-test gathered in task order
    assert result == json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["workers"] == workers and result["steps"] == 5
    for key in ("meta_test", "meta_test_unadapted"):
        assert result[key]["tasks"] == 7
        assert result[key]["mean"] == pytest.approx(ref_result[key]["mean"], rel=0, abs=1e-10)
        assert result[key]["ci95"] == pytest.approx(ref_result[key]["ci95"], rel=0, abs=1e-10)
    assert [v["step"] for v in result["validation"]] == [2, 4, 5]
    for a, b in zip(result["validation"], ref_result["validation"]):
        assert a["metric"] == pytest.approx(b["metric"], rel=0, abs=1e-10)
    assert len(result["batching"]["workers"]) == workers
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [c.name for c in list_checkpoints(ref_dir)]

    timing = run.engine.timing  # for the benchmark: per-step compute of the slowest worker vs the step's wall
    assert timing["steps"] == 5 and 0 < timing["compute"] <= timing["wall"]


def test_collective_needs_workers():
    with pytest.raises(ConfigError, match="engine.reduce = 'collective' needs workers"):
        load_config("sinusoid", ["engine.reduce=collective", "workers=0"])
