"""Every option with every other: each algorithm x {sinusoid, glyphs} x {in-process, 2 Ray workers},
tracking on, through the real entry point (``distmaml.cli.main``), a few meta-steps each.

Each run must exit 0 with a finite meta-test, and leave an MLflow run marked
FINISHED holding the logged model, the learning curve and, for sinusoid, the
adaptation plot (which adapts with the algorithm's own inner loop).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray

from distmaml.cli import main
from distmaml.core import ALGORITHMS
from distmaml.data.glyphs import GlyphSpec, prepare_glyphs

TINY = ["meta.steps=2", "meta.batch_size=4", "meta.val_every=1", "meta.val_tasks=8", "meta.test_tasks=8"]
TINY += ["engine.cpus_per_worker=1", "engine.driver_cpus=1", "tracking.log_every=1"]
FAMILIES = {
    "sinusoid": ["model.hidden=[16,16]"],
    # the glyphs recipe turns tracking off; the matrix runs with it on, as `distmaml train` does by default
    "glyphs_5w1s": ["model.filters=4", "tracking.enabled=true"],
}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One Ray instance for the module; the 2-worker cells join it."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small glyph store, made once, and one MLflow database for every cell."""
    root = tmp_path_factory.mktemp("matrix")
    prepare_glyphs(root / "glyphs", GlyphSpec(classes=30, drawings=6, size=16, val_classes=5, test_classes=5))
    return root


def _cell(recipe: str, algorithm: str, workers: int, root: Path):
    run_dir = root / f"{recipe}-{algorithm}-{workers}"
    sets = [*TINY, *FAMILIES[recipe], f"algorithm={algorithm}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}"]
    if recipe != "sinusoid":
        sets.append(f"data.path={root / 'glyphs'}")
    argv = ["train", "--config", recipe, "--quiet", "--workers", str(workers), "--out", str(run_dir)]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 2 and result["workers"] == workers and result["meta_test"]["tasks"] == 8
    assert math.isfinite(result["meta_test"]["mean"]) and math.isfinite(result["meta_test_unadapted"]["mean"])

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm"] == algorithm and run.data.params["workers"] == str(workers)
    metric = result["meta_test"]["metric"]
    assert run.data.metrics[f"test_{metric}"] == pytest.approx(result["meta_test"]["mean"])
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    want = {"plots/learning_curve.png"} | ({"plots/adaptation.png"} if recipe == "sinusoid" else set())
    assert plots == want
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models].count(run.info.run_id) == 1
    return result


CELLS = [
    pytest.param(recipe, algorithm, workers, id=f"{recipe}-{algorithm}-{workers}w", marks=marks)
    for recipe in FAMILIES
    for algorithm in ALGORITHMS
    for workers, marks in ((0, ()), (2, (pytest.mark.slow,)))
]


@pytest.mark.parametrize("recipe, algorithm, workers", CELLS)
def test_every_algorithm_family_and_engine_with_tracking(recipe, algorithm, workers, root):
    result = _cell(recipe, algorithm, workers, root)
    learned = algorithm in ("metasgd", "mamlpp")
    # each evaluates as its paper does: learned rates with their training steps, MAML with the recipe's test steps
    assert result["inner_test_steps"] == (1 if learned and recipe == "sinusoid" else 10 if recipe == "sinusoid" else 3)
