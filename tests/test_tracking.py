"""MLflow tracking of ``distmaml train``: params, batched metrics, artifacts, model, resume, URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmaml.cli import main
from distmaml.config import ConfigError
from distmaml.tracking import absolute_uri

STEPS, VAL_EVERY, LOG_EVERY = 12, 4, 5


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One Ray instance for the module; the tracked run uses the default 2 worker actors on it."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _train(run_dir: Path, db: Path, *extra: str) -> int:
    sets = [
        f"meta.steps={STEPS}",
        f"meta.val_every={VAL_EVERY}",
        "meta.checkpoint_every=4",
        "meta.batch_size=5",
        "meta.val_tasks=20",
        "meta.test_tasks=30",
        f"tracking.uri=sqlite:///{db}",
        f"tracking.log_every={LOG_EVERY}",
        *extra,
    ]
    args = ["train", "--quiet", "--out", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    db = root / "mlflow.db"
    assert _train(root / "run", db) == 0
    from mlflow import MlflowClient

    result = json.loads((root / "run" / "result.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return root, client, result


def test_run_id_in_result_json_and_params(tracked):
    root, client, result = tracked
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["inner.lr"] == "0.01"
    assert run.data.params["meta.steps"] == str(STEPS)
    assert run.data.params["workers"] == "2" and result["workers"] == 2  # the default: 2 Ray worker actors
    assert run.data.params["tracking.uri"] == f"sqlite:///{root / 'mlflow.db'}"
    assert (root / "run" / "mlflow_run_id").read_text().strip() == run.info.run_id
    # MLflow 3's UI opens an experiment of this kind in its model-training view
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert 0 <= result["tracking_seconds"] < 60


def test_metric_histories_match_the_run(tracked):
    root, client, result = tracked
    rid = result["mlflow_run_id"]
    for key in ("train_loss", "train_mse", "tasks_per_second", "worker_replacements"):
        history = client.get_metric_history(rid, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, STEPS + 1)), key
    val = sorted(client.get_metric_history(rid, "val_mse"), key=lambda m: m.step)
    assert [m.step for m in val] == [4, 8, 12]
    assert [m.value for m in val] == pytest.approx([v["metric"] for v in result["validation"]])
    metrics = client.get_run(rid).data.metrics
    assert metrics["test_mse"] == pytest.approx(result["meta_test"]["mean"])
    assert metrics["test_mse_ci95"] == pytest.approx(result["meta_test"]["ci95"])
    assert metrics["test_mse_unadapted"] == pytest.approx(result["meta_test_unadapted"]["mean"])


def test_artifacts_and_model(tracked):
    root, client, result = tracked
    rid = result["mlflow_run_id"]
    names = {a.path for a in client.list_artifacts(rid)}
    assert {"config.yaml", "result.json", "checkpoint", "plots"} <= names
    assert {a.path for a in client.list_artifacts(rid, "plots")} == {"plots/learning_curve.png", "plots/adaptation.png"}
    assert [a.path for a in client.list_artifacts(rid, "checkpoint")] == ["checkpoint/step_000000012.pt"]
    png = Path(client.download_artifacts(rid, "plots/adaptation.png", str(root)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import mlflow.pytorch

    import distmaml

    models = client.search_logged_models(experiment_ids=[client.get_run(rid).info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == rid
    from mlflow.models import Model

    flavors = Model.load(models[0].model_uri).flavors  # the pickle format names its pickle module
    assert flavors["python_function"]["pickle_module_name"] == "mlflow.pytorch.pickle_module"
    assert flavors["pytorch"]["model_data"] == "data"
    net = mlflow.pytorch.load_model(models[0].model_uri)
    ckpt = distmaml.load_checkpoint(root / "run")
    x = torch.linspace(-5, 5, 7).unsqueeze(-1)
    # the logged model is the final meta-parameters
    from torch.func import functional_call

    assert torch.equal(net(x), functional_call(net, ckpt.params, (x,)))


def test_resume_continues_the_same_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    db, run_dir = tmp_path / "m.db", tmp_path / "run"
    assert _train(run_dir, db, "tracking.log_model=false", "workers=0") == 0
    rid = json.loads((run_dir / "result.json").read_text())["mlflow_run_id"]
    # stop at step 8: drop the last checkpoint, resume
    (run_dir / "checkpoints" / "step_000000012.pt").unlink()
    assert main(["train", "--quiet", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "result.json").read_text())["mlflow_run_id"] == rid
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert len(client.search_runs([client.get_run(rid).info.experiment_id])) == 1
    steps = sorted(m.step for m in client.get_metric_history(rid, "val_mse"))
    assert steps == [4, 8, 12, 12]  # step 12 computed twice: before the "crash" and after the resume


def test_tracking_disabled_writes_no_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path / "run", tmp_path / "m.db", "tracking.enabled=false", "workers=0") == 0
    assert not (tmp_path / "m.db").exists() and not list(tmp_path.glob("ml*"))
    assert "mlflow_run_id" not in json.loads((tmp_path / "run" / "result.json").read_text())


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    assert absolute_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("sqlite:///sub/../x.db", tmp_path) == f"sqlite:///{tmp_path}/x.db"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    from distmaml.cli import _config_from_args, build_parser

    cfg = _config_from_args(build_parser().parse_args(["train"]))
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/mlruns", "mlruns"])
def test_file_store_uri_is_refused(uri, capsys):
    with pytest.raises(ConfigError, match="tracking.uri .* does not accept file stores; use sqlite:///mlflow.db"):
        absolute_uri(uri)
    assert main(["train", "--set", f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distmaml: error: tracking.uri") and "\n" not in err
