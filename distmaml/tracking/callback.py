"""``MlflowCallback``: one trainer run as one MLflow run.

What a run records:

- params: the flattened config (``inner.lr``, ``data.shots``, ...);
- metrics per meta-step: ``train_loss``, ``train_<metric>``, ``tasks_per_second``,
  ``meta_lr``, ``worker_replacements``; per validation: ``val_<metric>``; at the end:
  ``test_<metric>``, ``test_<metric>_ci95``, ``test_<metric>_unadapted``;
- artifacts: ``config.yaml``, ``result.json``, the final checkpoint,
  ``plots/learning_curve.png``, for regression ``plots/adaptation.png``, and the
  network as an MLflow model (``model``, pickle format).

Per-step metrics are buffered and written with one ``log_batch`` call every
``tracking.log_every`` steps, because a database round trip per step would
cost more than a sinusoid meta-step itself. Those calls run on one background
thread, overlapping the driver's wait for its workers; every validation waits
for them, so all metrics up to a checkpoint are in MLflow before it is
reported.

A run resumed from its run directory continues the same MLflow run: its id is
kept in ``RUN_DIR/mlflow_run_id``. In a sweep, the trial passes the sweep's
parent run id and the run becomes a nested child (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

import copy
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import nn

from distmaml import storage
from distmaml.checkpoint import atomic_write_text, write_json
from distmaml.config import Config, dump_config
from distmaml.core import Algorithm
from distmaml.storage import Location
from distmaml.tasks import TaskFamily
from distmaml.tracking.uri import absolute_uri
from distmaml.trainer import Callback, Trainer

RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_MAX_PARAMS = 100  # and of params


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing, with artifacts beside a SQLite database."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:////"):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / safe).as_uri()
    try:
        # The kind tag makes MLflow 3's UI open the experiment in its model-training
        # view (runs, charts, compare) instead of the GenAI view (traces).
        tags = {EXPERIMENT_KIND_TAG: "custom_model_development"}
        return str(client.create_experiment(name, artifact_location=location, tags=tags))
    except Exception:  # created meanwhile by a concurrent trial
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


class MlflowCallback(Callback):
    """Logs a trainer run to MLflow at ``config.tracking.uri``.

    Args:
        config: the run's resolved config (its ``tracking`` section is used).
        network: the run's network (for the logged model and the plots; not changed).
        algorithm: the run's algorithm (the plots adapt with it, as the meta-test does).
        family: the run's task family (the plots draw meta-test tasks from it).
        experiment: overrides ``tracking.experiment`` (a sweep uses its name).
        parent_run_id: makes this run a nested child of that run.
        run_name: shown in the MLflow UI (default: MLflow's generated name).
        tags: extra run tags.

    Example:
        >>> run = assemble(cfg)  # its callbacks: [MlflowCallback(cfg, network=..., algorithm=..., family=...)]
        >>> run.fit(run_dir)["mlflow_run_id"]
    """

    def __init__(
        self,
        config: Config,
        *,
        network: nn.Module,
        algorithm: Algorithm,
        family: TaskFamily,
        experiment: str | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.network = network
        self.algorithm = algorithm
        self.family = family
        self.uri = absolute_uri(config.tracking.uri)
        self.experiment = experiment or config.tracking.experiment
        self.parent_run_id = parent_run_id
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.log_every = config.tracking.log_every
        self.run_id: str | None = None
        self.client: Any = None
        self.trainer: Trainer | None = None
        self._buffer: list[Any] = []
        self.finished = False
        self.seconds_logging = 0.0
        """Wall time the training loop spent in this callback (the overhead figure)."""
        self.seconds_sending = 0.0
        """Wall time of the background ``log_batch`` calls (overlapping the training)."""
        self._sender: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []

    # -- the run --------------------------------------------------------------
    def on_start(self, trainer: Trainer) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        t0 = time.perf_counter()
        self.trainer = trainer
        self.client = MlflowClient(tracking_uri=self.uri)
        id_file = storage.join(trainer.run_dir, RUN_ID_FILE) if trainer.run_dir is not None else None
        if trainer.resumed and id_file is not None and storage.is_file(id_file):
            self.run_id = storage.read_bytes(id_file).decode().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = dict(self.tags)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            exp = experiment_id(self.client, self.experiment, self.uri)
            run = self.client.create_run(exp, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in sorted(self.config.flat().items())]
            for i in range(0, len(params), _MAX_PARAMS):
                self.client.log_batch(self.run_id, params=params[i : i + _MAX_PARAMS])
            if id_file is not None:
                atomic_write_text(id_file, self.run_id + "\n")
        self.seconds_logging += time.perf_counter() - t0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            name = key if key in ("tasks_per_second", "meta_lr") else f"train_{key}"
            self._buffer.append(Metric(name, float(value), now, step))
        if self.trainer is not None:
            self._buffer.append(Metric("worker_replacements", float(self.trainer.engine.replacements), now, step))
        if step % self.log_every == 0:
            self.flush()
        self.seconds_logging += time.perf_counter() - t0

    def on_validation(self, step: int, metrics: dict[str, float], checkpoint: Location | None) -> None:
        from mlflow.entities import Metric

        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self.flush(wait=True)
        self.seconds_logging += time.perf_counter() - t0

    def flush(self, wait: bool = False) -> None:
        """Hands the buffered metrics to the background sender; ``wait``: until all are written.

        An error of an earlier send is raised here.
        """
        if self._buffer and self.run_id is not None:
            batch, self._buffer = self._buffer, []
            if self._sender is None:
                self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmaml-mlflow")
            self._pending.append(self._sender.submit(self._send, batch))
        done = self._pending if wait else [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if f not in done]
        for f in done:
            f.result()

    def _send(self, batch: list[Any]) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(batch), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _MAX_BATCH])
        self.seconds_sending += time.perf_counter() - t0

    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None

    def on_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        self.flush(wait=True)
        self._close_sender()
        metric = trainer.metric
        now = int(time.time() * 1000)
        final = {
            f"test_{metric}": result["meta_test"]["mean"],
            f"test_{metric}_ci95": result["meta_test"]["ci95"],
            f"test_{metric}_unadapted": result["meta_test_unadapted"]["mean"],
        }
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, trainer.step) for k, v in final.items()])
        result["mlflow_run_id"] = self.run_id
        # Time the training loop waited on tracking (sends overlap the training in a thread).
        result["tracking_seconds"] = round(self.seconds_logging, 3)
        if trainer.run_dir is not None:
            write_json(storage.join(trainer.run_dir, "result.json"), result)
        self._log_artifacts(trainer, result)
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.finished = True

    def fail(self, status: str = "FAILED") -> None:
        """Ends an unfinished run as ``status`` (FAILED: the trainer raised; KILLED: a scheduler stopped it).

        Buffered metrics are kept; a run that already reached ``on_end`` stays FINISHED.
        """
        if self.run_id is None or self.finished:
            return
        try:
            self.flush(wait=True)
        finally:
            self._close_sender()
            self.client.set_terminated(self.run_id, status=status)

    # -- artifacts ------------------------------------------------------------
    def _log_artifacts(self, trainer: Trainer, result: dict[str, Any]) -> None:
        from distmaml.tracking import plots

        assert self.run_id is not None
        with tempfile.TemporaryDirectory(prefix="distmaml-mlflow-") as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(dump_config(self.config))
            write_json(folder / "result.json", result)
            self.client.log_artifact(self.run_id, str(folder / "config.yaml"))
            self.client.log_artifact(self.run_id, str(folder / "result.json"))
            if trainer.last_checkpoint is not None:
                checkpoint = str(trainer.last_checkpoint)
                if storage.is_uri(checkpoint):  # a run dir in a bucket: MLflow uploads local files only
                    (folder / "checkpoint").mkdir()
                    local = folder / "checkpoint" / storage.name(checkpoint)
                    local.write_bytes(storage.read_bytes(checkpoint))
                    checkpoint = str(local)
                self.client.log_artifact(self.run_id, checkpoint, "checkpoint")
            plot_dir = folder / "plots"
            plot_dir.mkdir()
            plots.learning_curve(
                trainer.history.train, trainer.history.val, trainer.metric, plot_dir / "learning_curve.png"
            )
            if self.config.data.family == "sinusoid":
                plots.sinusoid_adaptation(
                    self.network,
                    self.algorithm,
                    self.family,
                    trainer.params,
                    self.config.test_steps,
                    plot_dir / "adaptation.png",
                )
            self.client.log_artifacts(self.run_id, str(plot_dir), "plots")
        if self.config.tracking.log_model:
            self._log_model(trainer)

    def _log_model(self, trainer: Trainer) -> None:
        """The network with the meta-learned parameters, as an MLflow PyTorch model (pickle format).

        MAML++'s per-step batch-norm goes in as its first step's (the network before adaptation).
        """
        import mlflow
        import mlflow.pytorch
        import torch

        from distmaml import __version__
        from distmaml.core.algorithm import network_params

        model = copy.deepcopy(self.network)
        weights = network_params(model, self.algorithm, trainer.params)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        mlflow.set_tracking_uri(self.uri)
        # start_run on an existing id resumes it; its exit marks the run FINISHED, as on_end does next.
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                # Given, not inferred: inference imports the model in a subprocess (seconds).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"distmaml=={__version__}"],
            )
