"""``distmaml train --config glyphs_5w1s`` with the recipe's 2 Ray workers, end to end."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from reference import reference_scores

from distmaml import load_checkpoint
from distmaml.assembly import build_family, build_network
from distmaml.cli import main
from distmaml.config import config_from_dict
from distmaml.data.store import open_store


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_glyph_recipe_trains_on_its_two_ray_workers(ray_local, tmp_path):
    # data.path: the store is prepared there on first use, by whichever process gets there first
    store = tmp_path / "glyphs"
    sets = [f"data.path={store}", "meta.steps=4", "meta.batch_size=4", "model.filters=8", "meta.val_every=2"]
    sets += ["meta.val_tasks=10", "meta.test_tasks=20", "engine.startup_timeout=300", "precision=float64"]
    args = ["train", "--config", "glyphs_5w1s", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["workers"] == 2 and result["steps"] == 4 and result["meta_test"]["tasks"] == 20
    assert result["meta_test"]["metric"] == "accuracy" and result["inner_test_steps"] == 3
    # an independent meta-test of the final parameters: plain autograd, torch's batch-norm (tests/reference.py)
    ckpt = load_checkpoint(tmp_path / "run")
    config = config_from_dict(ckpt.config)
    batch = build_family(config).sample("test", 0, range(20)).to(dtype=torch.float64)
    before, after = reference_scores(
        build_network(config), ckpt.params, batch, name="maml", lr=0.4, steps=3, train_steps=1, loss="cross_entropy"
    )
    assert result["meta_test"]["mean"] == pytest.approx(float(after.mean()), abs=1e-12)
    assert result["meta_test_unadapted"]["mean"] == pytest.approx(float(before.mean()), abs=1e-12)
    assert float(after.mean()) > float(before.mean())  # 3 steps on one shot per class beat chance (0.2) here
    assert len(open_store(store).splits["test"].classes) == 200
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
