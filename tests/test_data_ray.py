"""``distmaml train --config glyphs_5w1s`` with the recipe's 2 Ray workers, end to end."""

from __future__ import annotations

import json

import pytest
import ray

from distmaml.cli import main
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
    sets += ["meta.val_tasks=10", "meta.test_tasks=20", "engine.startup_timeout=300"]
    args = ["train", "--config", "glyphs_5w1s", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["workers"] == 2 and result["steps"] == 4 and result["meta_test"]["tasks"] == 20
    assert result["meta_test"]["metric"] == "accuracy" and 0 <= result["meta_test"]["mean"] <= 1
    assert len(open_store(store).splits["test"].classes) == 200
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
