"""``distmaml tune``: sweeps on a real Ray instance (2 CPUs), recorded in MLflow.

One Ray instance and one MLflow database serve the whole module; each test
writes its own space file (its own MLflow experiment) with tiny trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
import yaml

from distmaml.cli import main
from distmaml.cluster.capacity import NodeShape
from distmaml.config import config_from_dict
from distmaml.tune import SpaceError, load_space, run_sweep, with_overrides
from distmaml.tune.space import Resources, check_resources

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"
SEARCHED = ("inner.lr", "inner.steps", "data.shots")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The driver's working directory: the default ``sqlite:///mlflow.db`` lands here."""
    return tmp_path_factory.mktemp("sweeps")


@pytest.fixture
def here(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def _client(folder: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


def space_file(folder: Path, name: str, **fields) -> Path:
    """A sinusoid space of tiny in-process trials; ``fields`` replace top-level entries."""
    data = {
        "name": name,
        "base": "sinusoid",
        "set": {
            "meta.steps": 6,
            "meta.batch_size": 4,
            "meta.val_every": 2,
            "meta.checkpoint_every": 2,
            "meta.val_tasks": 8,
            "meta.test_tasks": 8,
            "tracking.log_every": 2,
            "tracking.log_model": False,
            "batching": "batched",  # not auto: every trial would time the candidates in each of its processes
        },
        "metric": "val_mse",
        "mode": "min",
        "search": "random",
        "scheduler": "fifo",
        "num_samples": 1,
        "max_failures": 0,
        "resources": {"workers": 0, "driver_cpus": 0.5},
        "space": {
            "inner.lr": {"loguniform": [0.001, 0.1]},
            "inner.steps": {"randint": [1, 2]},
            "data.shots": {"choice": [5, 10]},
        },
    }
    data.update(fields)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _children(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _trial_results(storage: Path) -> list[dict]:
    """The last result each trial reported, from Tune's own ``result.json`` (one JSON per line)."""
    out = []
    for f in sorted(storage.glob("*/run_trial_*/result.json")):
        lines = f.read_text().splitlines()
        out.append(json.loads(lines[-1]))
    return out


@pytest.mark.slow
def test_sweep_of_four_distributed_trials_in_mlflow(here, capsys):
    """4 trials, each with 2 worker actors in its own placement group (0.5 + 2 x 0.25 CPUs), 2 at a time."""
    space = space_file(
        here,
        "four",
        num_samples=4,
        resources={"workers": 2, "cpus_per_worker": 0.25, "driver_cpus": 0.5},
    )
    storage = here / "results-four"
    assert main(["tune", "--space", str(space), "--quiet", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out

    # the table, best first, then the best checkpoint
    table = out.split("4 trials of four, best first by val_mse (min):\n")[1].splitlines()
    header = table[0].split()
    rows = [line.split() for line in table[2:6]]
    metric_col = header.index("val_mse")
    values = [float(r[metric_col]) for r in rows]
    assert values == sorted(values) and all(r[1] == "done" for r in rows)
    best_checkpoint = next(line for line in out.splitlines() if line.startswith("best checkpoint: "))
    best_checkpoint = best_checkpoint.removeprefix("best checkpoint: ")

    # the tracking URI was made absolute in the driver's directory, before the trials saw it
    client = _client(here)
    parent, children = _children(client, "four")
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        params = child.data.params
        assert set(SEARCHED) <= set(params)
        assert 0.001 <= float(params["inner.lr"]) <= 0.1
        assert params["inner.steps"] in ("1", "2") and params["data.shots"] in ("5", "10")
        assert params["workers"] == "2" and params["tracking.uri"] == f"sqlite:///{here / 'mlflow.db'}"
        assert _steps(client, child.info.run_id, "val_mse") == [2, 4, 6]
        assert _steps(client, child.info.run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
        assert "test_mse" in child.data.metrics
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"checkpoint", "plots", "config.yaml"}
    best_child = min(children, key=lambda r: r.data.metrics["val_mse"])
    assert parent.data.metrics["best_val_mse"] == pytest.approx(best_child.data.metrics["val_mse"])
    assert parent.data.metrics["best_val_mse"] == pytest.approx(values[0], rel=1e-3)
    assert parent.data.tags["distmaml.best_run_id"] == best_child.info.run_id
    assert parent.data.tags["distmaml.best_checkpoint"] == best_checkpoint
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space", "best_config.yaml", "trials.csv", "trials.md", "plots"} <= names
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/val_mse_by_key.png"]
    best_cfg = yaml.safe_load(
        Path(client.download_artifacts(parent.info.run_id, "best_config.yaml", str(here))).read_text()
    )
    assert str(best_cfg["inner"]["lr"]) == best_child.data.params["inner.lr"]

    # each trial's workers ran in the trial's own placement group (bundles 1 and 2)
    results = _trial_results(storage)
    assert len(results) == 4
    for r in results:
        assert r["workers"] == 2 and r["trial_placement_group"]
        assert r["engine_placement_group"] == r["trial_placement_group"]
    assert len({r["trial_placement_group"] for r in results}) >= 2

    # the best checkpoint is a run directory that distmaml evaluate takes
    assert main(["evaluate", "--checkpoint", best_checkpoint, "--tasks", "8"]) == 0
    evaluated = json.loads((Path(best_checkpoint) / "eval.json").read_text())
    assert evaluated["step"] == 6 and evaluated["meta_test"]["tasks"] == 8
    assert evaluated["checkpoint"] == str(Path(best_checkpoint) / "checkpoints" / "step_000000006.pt")


@pytest.mark.slow
def test_asha_stops_the_clearly_worse_trial(here, capsys):
    """Two trials in order: meta.lr 0.01 learns, meta.lr 1e-6 does not; at the rung (step 20) ASHA stops it.

    The stopped trial's run ends KILLED in MLflow although Tune ends its process without waiting for it
    (CI once read RUNNING), and the sweep does not tell the user to send records MLflow already has."""
    path = space_file(
        here,
        "asha",
        set={
            "meta.steps": 40,
            "meta.batch_size": 4,
            "meta.val_every": 10,
            "meta.checkpoint_every": 10,
            "meta.val_tasks": 8,
            "meta.test_tasks": 8,
            "tracking.log_every": 10,
            "tracking.log_model": False,
            "batching": "batched",
        },
        search="grid",
        scheduler={"name": "asha", "grace_period": 20, "reduction_factor": 2},
        max_concurrent=1,
        space={"meta.lr": {"grid": [0.01, 1e-6]}},
    )
    result = run_sweep(load_space(path), storage=here / "results-asha", verbose=0)
    by_lr = {r.values["meta.lr"]: r for r in result.rows}
    good, bad = by_lr[0.01], by_lr[1e-6]
    assert (good.status, good.step) == ("done", 40)
    assert (bad.status, bad.step) == ("stopped", 20)
    assert good.metric < bad.metric and result.best is good
    assert "MLflow did not take" not in capsys.readouterr().err

    client = _client(here)
    _, children = _children(client, "asha")
    status = {c.data.params["meta.lr"]: c.info.status for c in children}
    assert status == {"0.01": "FINISHED", "1e-06": "KILLED"}
    stopped = next(c for c in children if c.data.params["meta.lr"] == "1e-06")
    assert _steps(client, stopped.info.run_id, "val_mse") == [10, 20]


@pytest.mark.slow
def test_killed_trial_resumes_from_its_checkpoint(here):
    """The trial's process dies (os._exit) after reporting step 2; Tune restarts it from that checkpoint."""
    path = space_file(here, "crash", max_failures=1)
    storage = here / "results-crash"
    result = run_sweep(load_space(path), storage=storage, verbose=0, exit_after_step=2)
    (row,) = result.rows
    assert (row.status, row.step, row.resumed_from) == ("done", 6, 2)
    assert len(list(storage.glob("*/run_trial_*/error.txt"))) == 1  # Tune saw the crash

    client = _client(here)
    _, (child,) = _children(client, "crash")  # the restarted trial continued the same MLflow run
    assert child.info.status == "FINISHED"
    # steps 1-2 ran before the crash, 3-6 after it: none twice, so nothing restarted from step 0
    assert _steps(client, child.info.run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(client, child.info.run_id, "val_mse") == [2, 4, 6]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from distmaml.data.glyphs import GlyphSpec, prepare_glyphs

    out = tmp_path_factory.mktemp("store") / "glyphs"
    prepare_glyphs(out, GlyphSpec(classes=16, drawings=8, size=16, val_classes=5, test_classes=5))
    return out


def _spaces() -> list:
    """Every shipped space; the image ones (conv4 trials) run with the slow tests."""
    return [
        pytest.param(p.stem, marks=() if p.stem == "sinusoid" else pytest.mark.slow)
        for p in sorted(SPACES.glob("*.yaml"))
    ]


@pytest.mark.parametrize("name", _spaces())
def test_every_shipped_space_runs_one_trial_of_two_steps(name, here, tiny_store):
    spec = load_space(SPACES / f"{name}.yaml")
    assert {"inner.lr", "inner.steps", "data.shots"} <= set(spec.keys)
    sets = ["meta.steps=2", "meta.val_every=1", "meta.checkpoint_every=1", "meta.batch_size=2"]
    sets += ["meta.val_tasks=2", "meta.test_tasks=2", "tracking.log_model=false"]
    if spec.base_config().loss != "mse":  # image spaces: a tiny glyph store instead of the real data
        sets += [f"data.path={tiny_store}", "data.queries=1", "model.filters=4"]
    spec = with_overrides(spec, num_samples=1, overrides=sets, resources=Resources(workers=0, driver_cpus=0.5))
    result = run_sweep(spec, storage=here / f"results-smoke-{name}", verbose=0)
    (row,) = result.rows
    assert (row.status, row.step) == ("done", 2) and math.isfinite(row.metric)
    assert row.checkpoint is not None and (Path(row.checkpoint) / "checkpoints" / "step_000000002.pt").is_file()
    assert main(["evaluate", "--checkpoint", row.checkpoint, "--tasks", "2"]) == 0  # a trial checkpoint is a run dir
    assert json.loads((Path(row.checkpoint) / "eval.json").read_text())["step"] == 2


def _bad(tmp_path: Path, **fields) -> Path:
    return space_file(tmp_path, "bad", **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"space": {"inner.rate": {"uniform": [0.1, 0.2]}}},
            r"space.inner.rate: unknown config key 'inner.rate'; known keys: inner.lr, inner.steps",
        ),
        (
            {"space": {"inner.lr": {"gaussian": [0.1, 0.2]}}},
            r"space.inner.lr: unknown distribution 'gaussian'; allowed: loguniform, uniform, randint, choice, grid",
        ),
        (
            {"space": {"inner.lr": {"uniform": [0.2, 0.1]}}},
            r"space.inner.lr.uniform = \[0.2, 0.1\]: low 0.2 is above high 0.1; swap them",
        ),
        (
            {"space": {"inner.lr": {"loguniform": [0, 0.1]}}},
            r"space.inner.lr.loguniform = \[0, 0.1\]: bounds must be positive",
        ),
        (
            {"space": {"inner.steps": {"randint": [1, 2.5]}}},
            r"space.inner.steps.randint = \[1, 2.5\]: bounds must be integers",
        ),
        ({"scheduler": "hyperband"}, r"scheduler = 'hyperband': allowed values are fifo, asha"),
        ({"metric": "val_accuracy"}, r"metric = 'val_accuracy': trials of this base report 'val_mse'; use it"),
        ({"resources": {"workers": 1, "cpus_per_worker": 0}}, r"resources.cpus_per_worker must be greater than 0"),
    ],
)
def test_bad_space_files_get_one_clear_line(tmp_path, capsys, fields, message):
    path = _bad(tmp_path, **fields)
    with pytest.raises(SpaceError, match=message):
        load_space(path)
    assert main(["tune", "--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distmaml: error: {path}") and "\n" not in err


def test_resources_the_cluster_can_never_hold_are_refused(here, capsys):
    """On the 2-CPU instance: 1 + 4 x 1 CPUs is too much in all; a 3-CPU bundle fits on no node."""
    path = space_file(here, "huge", resources={"workers": 4, "cpus_per_worker": 1, "driver_cpus": 1})
    assert main(["tune", "--space", str(path), "--quiet", "--storage", str(here / "results-huge")]) == 2
    err = capsys.readouterr().err.strip()
    assert "resources of one trial: the run needs 5 CPUs (driver 1 + 4 workers x 1) but the Ray cluster has" in err
    assert "lower workers or resources.cpus_per_worker or resources.driver_cpus" in err and "\n" not in err
    spec = load_space(space_file(here, "wide", resources={"workers": 1, "cpus_per_worker": 3, "driver_cpus": 1}))
    two_nodes = [NodeShape("node a", {"CPU": 2.0}), NodeShape("node b", {"CPU": 2.0})]
    with pytest.raises(
        SpaceError, match=r"the worker bundle \{'CPU': 3\} fits no node .*resources.cpus_per_worker to 2"
    ):
        check_resources(spec, two_nodes)
    # a node type the autoscaler can launch holds it: the trial waits for that node instead
    gpu_type = NodeShape("node type gpu_worker", {"CPU": 4.0, "GPU": 1.0}, count=2, launchable=True)
    check_resources(spec, [NodeShape("head", {"CPU": 0.0}), gpu_type], max_launches=2)
    assert _client(here).get_experiment_by_name("huge") is None  # refused before any MLflow run


def test_set_keys_shape_every_trial_and_its_bundles_alike(here):
    """``--set workers`` and ``engine.*`` change the trials' config and their placement group together."""
    path = space_file(here, "shaped", resources={"workers": 2, "cpus_per_worker": 0.25, "driver_cpus": 0.5})
    spec = load_space(path)
    assert spec.resources.bundles() == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}]
    sets = ["workers=3", "engine.cpus_per_worker=0.5", "engine.gpus_per_worker=1", "engine.driver_cpus=1"]
    shaped = with_overrides(spec, overrides=sets)
    assert shaped.resources.bundles() == [{"CPU": 1.0}] + 3 * [{"CPU": 0.5, "GPU": 1.0}]
    trial = config_from_dict(shaped.trial_data({"inner.lr": 0.01, "inner.steps": 1, "data.shots": 5}))
    assert (trial.workers, trial.engine.cpus_per_worker, trial.engine.gpus_per_worker) == (3, 0.5, 1.0)
    assert trial.engine.driver_cpus == 1.0
    # and the cluster check reads the new bundles: 3 GPUs on a node type with 1 GPU, 2 nodes at most
    gpu_type = NodeShape("node type gpu_worker", {"CPU": 4.0, "GPU": 1.0}, count=2, launchable=True)
    with pytest.raises(SpaceError, match=r"needs 3 GPUs \(3 workers x 1\)"):
        check_resources(shaped, [NodeShape("head", {"CPU": 2.0}), gpu_type], max_launches=2)
    # the space file's own set: agrees with resources, or is refused; searched resource keys are refused
    same = load_space(space_file(here, "set-workers", set={"workers": 1, "meta.batch_size": 4}, resources=None))
    assert same.resources.workers == 1 and same.base_config().workers == 1
    with pytest.raises(SpaceError, match=r"set.workers = 1 disagrees with resources.workers = 2; give it once"):
        load_space(space_file(here, "clash", set={"workers": 1}, resources={"workers": 2}))
    with pytest.raises(SpaceError, match=r"space.workers: a trial's resources are not searched"):
        load_space(space_file(here, "searched", space={"workers": {"choice": [1, 2]}}))
    with pytest.raises(SpaceError, match=r"--set inner.lr=0.1: inner.lr is searched by"):
        with_overrides(spec, overrides=["inner.lr=0.1"])


@pytest.mark.slow
def test_set_workers_reaches_the_trial_and_its_placement_group(here):
    """A real trial: ``--set workers=2`` on a space of 1 worker gives 2 workers in a group of 3 bundles."""
    path = space_file(here, "set-run", resources={"workers": 1, "cpus_per_worker": 0.25, "driver_cpus": 0.5})
    spec = with_overrides(load_space(path), overrides=["workers=2"])
    storage = here / "results-set-run"
    result = run_sweep(spec, storage=storage, verbose=0)
    assert result.rows[0].status == "done"
    (r,) = _trial_results(storage)
    assert r["workers"] == 2 and r["engine_placement_group"] == r["trial_placement_group"]
    group = ray.util.placement_group_table()[r["trial_placement_group"]]
    assert list(group["bundles"].values()) == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}]


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_the_same_space_file_samples_the_same_trials(tmp_path, search):
    """The searcher is seeded by the base config's ``seed``: a sweep can be repeated; another seed differs."""
    from ray.tune.experiment import Experiment

    from distmaml.tune.sweep import _searcher

    def draw(seed: int) -> list[dict]:
        path = space_file(tmp_path, f"seeded-{seed}", search=search, num_samples=4)
        data = yaml.safe_load(path.read_text())
        data["set"]["seed"] = seed
        path.write_text(yaml.safe_dump(data))
        spec = load_space(path)
        gen = _searcher(spec)
        if search == "random":
            gen.add_configurations([Experiment("x", run=lambda c: None, config=spec.param_space(), num_samples=4)])
            trials = [gen.next_trial().config for _ in range(4)]
        else:
            gen.set_search_properties(spec.metric, spec.mode, spec.param_space())
            trials = [gen.suggest(f"t{i}") for i in range(4)]
        return [{k: t[k] for k in spec.keys} for t in trials]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
