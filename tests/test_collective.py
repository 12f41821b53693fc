"""``engine.reduce: collective``: a Ray Train worker group that all-reduces among itself.

In float64, a run through the collective engine with 1, 2 or 3 workers ends
with the in-process engine's parameters (to 1e-10), scores the same held-out
tasks in the same order, and writes the same run directory (checkpoints,
``result.json``); its result comes back to the driver.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
from test_algorithms_ray import BASE as ALGORITHM_BASE
from test_algorithms_ray import CASES

from distmaml.config import ConfigError, load_config
from distmaml.run.assembly import assemble
from distmaml.run.checkpoint import list_checkpoints, load_checkpoint

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
    "batching=batched",  # auto times the candidates in every worker (seconds each); one case below keeps it
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


@pytest.mark.parametrize(
    ("workers", "batching", "node_sum"),
    [(1, "batched", "shm"), (2, "auto", "shm"), (3, "batched", "shm"), (2, "batched", "gloo")],
)
def test_collective_matches_in_process(workers, batching, node_sum, reference, tmp_path, monkeypatch):
    """On one node the step's sum goes through shared memory (engine.shm); DISTMAML_NODE_SUM=gloo: gloo's."""
    monkeypatch.setenv("DISTMAML_NODE_SUM", node_sum)
    ref_dir, ref_result = reference
    sets = [*BASE, "engine.reduce=collective", f"workers={workers}", f"batching={batching}"]
    run = assemble(load_config("sinusoid", sets))
    result = run.fit(tmp_path / "run", progress=False)
    assert run.engine.timing["sum"] == (node_sum if workers > 1 else "none")
    # Ray Train's PlacementGroupCleaner (which asks the State API without this cluster's address, so another
    # Ray on the machine confuses it) and Ray Datasets' DatasetManager (distmaml's workers read their own
    # tasks) were never started
    classes = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert "RayTrainWorker" in classes and not classes & {"PlacementGroupCleaner", "DatasetManager"}

    ref, got = load_checkpoint(ref_dir), load_checkpoint(tmp_path / "run")
    assert got.step == ref.step == 5
    assert got.params.keys() == ref.params.keys()
    init = assemble(load_config("sinusoid", [*BASE, "workers=0"])).params
    for k, v in ref.params.items():
        assert not torch.equal(v, init[k]), f"{k} did not move"
        torch.testing.assert_close(got.params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")
    # the same Adam state: a resumed run would go on identically
    assert len(ref.optimizer["state"]) == len(got.optimizer["state"]) == len(ref.params) > 0
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
    if batching == "auto":  # each worker timed the candidates on its shard; all compute with the fastest summed
        reports = result["batching"]["workers"]
        assert len(reports) == workers and all(set(b["seconds"]) == {"loop", "vmap", "batched"} for b in reports)
        assert all(b["memory"]["shared_by"] == workers for b in reports)  # one node: each plans with its part
        common = min(reports[0]["seconds"], key=lambda n: sum(b["seconds"][n] for b in reports))
        assert result["batching"]["choice"] == common
    else:
        assert result["batching"]["choice"] == batching
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [c.name for c in list_checkpoints(ref_dir)]

    timing = run.engine.timing  # for the benchmark: per-step compute of the slowest worker, rank 0's meta_batch
    assert timing["steps"] == 5 and 0 < timing["compute"] and 0 < timing["wall"]
    loop = timing["steps"] * 6 / result["tasks_per_second"]  # rank 0's training loop, seconds (6 tasks a step)
    assert timing["wall"] < loop and timing["compute"] < loop
    steady = timing["steady"]  # steps 2 to 4, the loop timed from the start of step 2 to that of step 5
    assert (
        steady["steps"] == 3 and 0 < steady["compute"] < steady["loop"] and 0 < steady["wall"] < steady["loop"] < loop
    )


def test_an_error_every_worker_raises_ends_the_group_at_once(tmp_path):
    """A meta-loss that turns NaN: every worker sees it in the reduced loss, rank 0 reports it, the driver
    raises it; the group is not restarted into the same error."""
    from distmaml.run.trainer import NonFiniteError

    sets = [*BASE, "engine.reduce=collective", "workers=2", "inner.lr=1e30", "engine.max_worker_failures=3"]
    with pytest.raises(NonFiniteError, match=r"meta-step 0: the meta-loss or meta-gradient is not finite"):
        assemble(load_config("sinusoid", sets)).fit(tmp_path / "nan", progress=False)
    assert [c.name for c in list_checkpoints(tmp_path / "nan")] == ["step_000000000.pt"]  # the last good state
    reports = [p for p in (tmp_path / "nan" / "train").glob("checkpoint_*") if p.is_dir()]
    assert len(reports) == 1 and (reports[0] / "error.pickle").is_file()
    assert (reports[0] / "checkpoints" / "step_000000000.pt").is_file()


def test_collective_needs_workers():
    with pytest.raises(ConfigError, match="engine.reduce = 'collective' needs workers"):
        load_config("sinusoid", ["engine.reduce=collective", "workers=0"])


def test_the_group_starts_no_placement_group_cleaner_whether_or_not_the_state_api_answers():
    """Ray Train's PlacementGroupCleaner asks the State API without the cluster's address: with a second Ray on
    the machine it failed with a traceback on the driver's console (CI, where the State API answered) or
    could ask the other Ray, find no controller and remove a living group's placement group. The group's
    trainer never starts it (nor the DatasetManager), on any cluster; Ray Train's own trainer still would."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from distmaml.engine.collective import _lean

    def names(trainer_class: type) -> set[str]:
        trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    unused = {"PlacementGroupCleanerCallback", "DatasetsCallback"}
    assert unused <= names(TorchTrainer)  # what is dropped exists in this Ray: the check below means something
    lean = names(_lean(TorchTrainer))
    assert not unused & lean and "BackendSetupCallback" in lean


# -- every algorithm through the group -----------------------------------------------------
# every algorithm: the cases and tiny settings of the driver engine's test (MAML++ on a conv net with batch-norm);
# maml (the default) through 1, 2 and 3 workers is test_collective_matches_in_process
@pytest.mark.slow
@pytest.mark.parametrize("algorithm, extra", [c for c in CASES if c.id != "maml"])
def test_each_algorithm_two_workers_match_in_process(algorithm, extra, tmp_path):
    sets = [*ALGORITHM_BASE, *extra, f"algorithm={algorithm}"]
    ref = assemble(load_config("sinusoid", [*sets, "workers=0"])).fit(tmp_path / "ref", progress=False)
    got = assemble(load_config("sinusoid", [*sets, "workers=2", "engine.reduce=collective"])).fit(
        tmp_path / "run", progress=False
    )
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "run")
    own = {"metasgd": "lrs.", "mamlpp": "mamlpp."}.get(algorithm)
    if own:  # the algorithm's own meta-parameters are reduced and learned too
        assert any(k.startswith(own) for k in b.params)
    assert a.params.keys() == b.params.keys()
    for k, v in a.params.items():
        torch.testing.assert_close(b.params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")
    assert got["meta_test"]["mean"] == pytest.approx(ref["meta_test"]["mean"], rel=0, abs=1e-10)


# -- the CLI: tracking, resume, evaluate ------------------------------------------------------
CLI_SETS = [
    "precision=float64", "meta.steps=6", "meta.batch_size=4", "meta.checkpoint_every=2", "meta.keep_checkpoints=5",
    "meta.val_every=3", "meta.val_tasks=4", "meta.test_tasks=6", "model.hidden=[8,8]", "tracking.log_every=1",
    "tracking.log_model=false", "engine.cpus_per_worker=0.5", "engine.driver_cpus=0.5", "batching=vmap",
]  # fmt: skip


@pytest.mark.slow
def test_cli_tracking_resume_evaluate(tmp_path, capsys):
    from mlflow import MlflowClient

    from distmaml.cli import main

    db = tmp_path / "m.db"
    sets = [*CLI_SETS, f"tracking.uri=sqlite:///{db}"]
    argv = ["train", "--config", "sinusoid", "--quiet", *(x for s in sets for x in ("--set", s))]
    run_dir = tmp_path / "run"
    assert main([*argv, "--workers", "2", "--set", "engine.reduce=collective", "--out", str(run_dir)]) == 0
    first = json.loads((run_dir / "result.json").read_text())
    rid = first["mlflow_run_id"]  # rank 0's MLflow run
    assert f"MLflow run {rid}" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.params["engine.reduce"] == "collective"
    assert sorted(m.step for m in client.get_metric_history(rid, "train_loss")) == [1, 2, 3, 4, 5, 6]

    # "stopped" after step 2: later checkpoints, the result and Ray Train's own record gone
    assert [c.name for c in list_checkpoints(run_dir)] == [f"step_{s:09d}.pt" for s in (2, 3, 4, 6)]
    for step in (3, 4, 6):
        (run_dir / "checkpoints" / f"step_{step:09d}.pt").unlink()
    (run_dir / "result.json").unlink()
    shutil.rmtree(run_dir / "train")
    assert main(["train", "--quiet", "--resume", str(run_dir)]) == 0
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["mlflow_run_id"] == rid and client.get_run(rid).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # steps 3 to 6 computed again after the resume
    assert sorted(m.step for m in client.get_metric_history(rid, "val_mse")) == [3, 3, 6, 6]

    # the same parameters as a run never stopped, in-process
    assert main([*argv, "--workers", "0", "--set", "tracking.enabled=false", "--out", str(tmp_path / "whole")]) == 0
    a, b = load_checkpoint(run_dir), load_checkpoint(tmp_path / "whole")
    assert a.step == b.step == 6
    for k, v in b.params.items():
        torch.testing.assert_close(a.params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")

    assert main(["evaluate", "--checkpoint", str(run_dir)]) == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["step"] == 6 and ev["meta_test"]["tasks"] == 6
    assert ev["meta_test"]["mean"] == pytest.approx(resumed["meta_test"]["mean"], rel=0, abs=1e-10)


# -- a sweep whose trials are collective groups -------------------------------------------------
@pytest.mark.slow
def test_tune_sweep_of_collective_trials(tmp_path, monkeypatch, capsys):
    """2 trials at once, each a 2-worker Ray Train group started from the trial; Tune sees each validation."""
    import yaml
    from mlflow import MlflowClient

    from distmaml.cli import main

    monkeypatch.chdir(tmp_path)
    space = {
        "name": "collective",
        "base": "sinusoid",
        "set": {
            "engine.reduce": "collective",
            "meta.steps": 4,
            "meta.batch_size": 4,
            "meta.val_every": 2,
            "meta.checkpoint_every": 1,
            "meta.val_tasks": 4,
            "meta.test_tasks": 4,
            "model.hidden": [8, 8],
            "tracking.log_every": 1,
            "tracking.log_model": False,
            "batching": "vmap",
        },
        "metric": "val_mse",
        "mode": "min",
        "search": "random",
        "scheduler": "fifo",
        "num_samples": 2,
        "max_concurrent": 2,  # two groups in one Ray at once, as a sweep on a cluster runs them (3 of its 4 CPUs)
        "max_failures": 0,
        "resources": {"workers": 2, "cpus_per_worker": 0.5, "driver_cpus": 0.5},
        "space": {"inner.lr": {"loguniform": [0.001, 0.1]}},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    storage = tmp_path / "results"
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--quiet", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    table = out.split("2 trials of collective, best first by val_mse (min):\n")[1].splitlines()
    assert all(line.split()[1] == "done" for line in table[2:4])

    # Tune saw validations 2 and 4 (the last with the meta-test), each with a run-directory checkpoint
    results = sorted(storage.glob("*/run_trial_*/result.json"))
    assert len(results) == 2, results
    for f in results:
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["step"] for r in lines] == [2, 4] and "test_mse" in lines[-1]
        assert all(r["workers"] == 2 and r["mlflow_run_id"] for r in lines)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("collective").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.params["engine.reduce"] == "collective" for c in children)
    assert all(sorted(m.step for m in client.get_metric_history(c.info.run_id, "val_mse")) == [2, 4] for c in children)

    best = next(line for line in out.splitlines() if line.startswith("best checkpoint: ")).split(": ", 1)[1]
    assert main(["evaluate", "--checkpoint", best, "--tasks", "4"]) == 0
    assert json.loads((Path(best) / "eval.json").read_text())["step"] == 4
