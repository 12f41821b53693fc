"""``distmaml train --config glyphs_5w1s`` with the recipe's 2 Ray workers, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from reference import reference_scores

from distmaml import load_checkpoint
from distmaml.bench.data import mapped_memory, write_synthetic_store
from distmaml.cli import main
from distmaml.config import config_from_dict, load_config
from distmaml.data.splitcache import cache_folder, cache_name
from distmaml.data.store import open_store
from distmaml.run.assembly import build_family, build_network, make_engine


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


@pytest.mark.slow
def test_the_ray_engines_two_workers_map_one_copy_of_the_train_split(ray_local, tmp_path):
    # the actors inherit the session's DISTMAML_CACHE (tests/conftest.py): the node's cache folder
    store = write_synthetic_store(tmp_path / "store", classes=40, train_classes=20, val_classes=10, images=20)
    sets = [f"data.path={store}", "data.family=store", "meta.batch_size=4", "model.filters=8", "workers=2"]
    config = load_config("glyphs_5w1s", [*sets, "engine.startup_timeout=300"])
    info = open_store(store)
    engine = make_engine(config)
    try:  # at start-up each worker has timed its batching on meta-train tasks
        pids = [d["pid"] for d in engine.describe()]
        file = cache_folder() / cache_name(info, "train")
        maps = [mapped_memory(file.parent, pid) for pid in pids]
        inodes = [
            {int(line.split()[4]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if str(file) in line}
            for pid in pids
        ]
    finally:
        engine.close()
    assert len(set(pids)) == 2 and all(m["Rss"] > 0 for m in maps)
    assert inodes == [{file.stat().st_ino}] * 2  # both actors read their tasks from the one file
