"""``MlflowCallback``: one trainer run as one MLflow run.

What a run records:

- params: the flattened config (``inner.lr``, ``data.shots``, ...);
- metrics per meta-step: ``train_loss``, ``train_<metric>``, ``tasks_per_second``,
  ``meta_lr``, ``worker_replacements``; per validation: ``val_<metric>``; at the end:
  ``test_<metric>``, ``test_<metric>_ci95``, ``test_<metric>_unadapted``;
- artifacts: ``config.yaml``, ``result.json``, the final checkpoint,
  ``plots/learning_curve.png``, for regression ``plots/adaptation.png``, and the
  network as an MLflow model (``model``, pickle format).

Nothing of this waits for MLflow: every record goes first into the run's
outbox (``RUN_DIR/tracking/``, see ``outbox``), on disk, and a courier thread
delivers it (see ``delivery``). A tracking server that stops answering
costs the run nothing but one line on stderr; its records reach MLflow when
it answers again, in order and once each, or, if the run ends first, with
``distmaml sync RUN_DIR``. Per-step metrics are buffered and appended as one
record every ``tracking.log_every`` steps (and at each validation), because
a database round trip per step would cost more than a sinusoid meta-step.

A run resumed from its run directory continues the same MLflow run: its id is
kept in ``RUN_DIR/mlflow_run_id``. In a sweep, the trial passes the sweep's
parent run id and the run becomes a nested child (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from torch import nn

from distmaml import storage
from distmaml.config import Config, dump_config
from distmaml.core import Algorithm
from distmaml.run.trainer import Callback, Trainer
from distmaml.storage import Location, atomic_write_text, write_json
from distmaml.tasks import TaskFamily
from distmaml.tracking.delivery import Courier, Delivery, Unreachable, pending_line
from distmaml.tracking.outbox import FOLDER, Outbox, State
from distmaml.tracking.uri import absolute_uri

RUN_ID_FILE = "mlflow_run_id"


class MlflowCallback(Callback):
    """Logs a trainer run to MLflow at ``config.tracking.uri``, through the run's outbox.

    Args:
        config: the run's resolved config (its ``tracking`` section is used).
        network: the run's network (for the logged model and the plots; not changed).
        algorithm: the run's algorithm (the plots adapt with it, as the meta-test does).
        family: the run's task family (the plots draw meta-test tasks from it).
        experiment: overrides ``tracking.experiment`` (a sweep uses its name).
        parent_run_id: makes this run a nested child of that run.
        run_name: shown in the MLflow UI (default: MLflow's generated name).
        tags: extra run tags.
        in_trial: a Tune trial's run (its folder is temporary: records left at the end are in its
            last Tune checkpoint, which the sweep names).

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
        in_trial: bool = False,
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
        self.in_trial = in_trial
        self.log_every = config.tracking.log_every
        self.run_id: str | None = None
        self.trainer: Trainer | None = None
        self.run_dir: Path | None = None
        """The run directory when it is a local folder (the outbox is in it), else None."""
        self.outbox: Outbox | None = None
        self.courier: Courier | None = None
        self._buffer: list[list[Any]] = []
        self.finished = False
        self.pending = 0
        """Records MLflow did not take by the end of the run (``distmaml sync`` sends them)."""
        self.seconds_logging = 0.0
        """Wall time the training loop spent in this callback (the overhead figure)."""

    # -- the run --------------------------------------------------------------
    def _open_outbox(self, trainer: Trainer) -> Outbox:
        """The outbox in the run directory; in a temporary folder of its own without a local one."""
        where = trainer.run_dir
        if isinstance(where, Path):
            self.run_dir = where.absolute()
            return Outbox(self.run_dir / FOLDER)
        return Outbox(Path(tempfile.mkdtemp(prefix="distmaml-outbox-")))

    def _got_run_id(self, run_id: str) -> None:
        """The run exists in MLflow: its id goes into the run directory (resume, Tune, evaluate read it)."""
        if run_id != self.run_id:
            self.run_id = run_id
            if self.trainer is not None and self.trainer.run_dir is not None:
                atomic_write_text(storage.join(self.trainer.run_dir, RUN_ID_FILE), run_id + "\n")

    def on_start(self, trainer: Trainer) -> None:
        t0 = time.perf_counter()
        self.trainer = trainer
        box = self.outbox = self._open_outbox(trainer)
        box.lock()
        id_file = storage.join(trainer.run_dir, RUN_ID_FILE) if trainer.run_dir is not None else None
        known = box.count > 0
        if trainer.resumed and not known and id_file is not None and storage.is_file(id_file):
            # a run directory from before the outbox: its run exists, continue it
            box.save_state(State(0, storage.read_bytes(id_file).decode().strip()))
        self.run_id = box.state().run_id
        if not known:
            tags = dict(self.tags)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            start = int(time.time() * 1000)
            box.append(
                {
                    "kind": "create",
                    "key": uuid.uuid4().hex,
                    "uri": self.uri,
                    "experiment": self.experiment,
                    "run_name": self.run_name,
                    "tags": tags,
                    "start_time": start,
                }
            )
        if trainer.resumed:
            box.append({"kind": "status", "status": "RUNNING"})
        if not known:
            box.append({"kind": "params", "params": {k: str(v) for k, v in sorted(self.config.flat().items())}})
        delivery = Delivery(box, self.uri, on_run_id=self._got_run_id)
        # The run's creation is sent here, before the first step: the run id is then in the run
        # directory from the start (a Tune checkpoint carries it). A server gone since the probe
        # costs one try under MLflow's bounded retries; the courier takes it from there.
        reason = None
        try:
            delivery.send_pending()
        except Unreachable as e:
            reason = str(e)
        self.courier = Courier(delivery, offline=reason)
        self.seconds_logging += time.perf_counter() - t0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            name = key if key in ("tasks_per_second", "meta_lr") else f"train_{key}"
            self._buffer.append([name, float(value), now, step])
        if self.trainer is not None:
            self._buffer.append(["worker_replacements", float(self.trainer.engine.replacements), now, step])
        if step % self.log_every == 0:
            self.flush()
        self.seconds_logging += time.perf_counter() - t0

    def on_validation(self, step: int, metrics: dict[str, float], checkpoint: Location | None) -> None:
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        self._buffer.extend([k, float(v), now, step] for k, v in metrics.items())
        self.flush()
        self.seconds_logging += time.perf_counter() - t0

    def flush(self) -> None:
        """Appends the buffered metrics to the outbox as one record and wakes the courier.

        An error MLflow gave for an earlier record (not an outage: a refusal) is raised here.
        """
        if self.courier is not None and self.courier.error is not None:
            raise self.courier.error
        if self._buffer and self.outbox is not None:
            batch, self._buffer = self._buffer, []
            self._append({"kind": "metrics", "metrics": batch})

    def _append(self, record: dict[str, Any]) -> None:
        assert self.outbox is not None and self.courier is not None
        self.outbox.append(record)
        self.courier.notify()

    def on_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self.flush()
        metric = trainer.metric
        now = int(time.time() * 1000)
        final = {
            f"test_{metric}": result["meta_test"]["mean"],
            f"test_{metric}_ci95": result["meta_test"]["ci95"],
            f"test_{metric}_unadapted": result["meta_test_unadapted"]["mean"],
        }
        self._append({"kind": "metrics", "metrics": [[k, float(v), now, trainer.step] for k, v in final.items()]})
        if self.run_id is not None:
            result["mlflow_run_id"] = self.run_id
        # Time the training loop waited on tracking (sends overlap the training in a thread).
        result["tracking_seconds"] = round(self.seconds_logging, 3)
        self._log_artifacts(trainer, result)
        self._append({"kind": "end", "status": "FINISHED", "end_time": int(time.time() * 1000)})
        self._close(result)
        self.finished = True

    def _close(self, result: dict[str, Any] | None = None) -> None:
        """Ends the courier: it sends what the server takes; a line says what is left, and where."""
        if self.courier is None or self.outbox is None:
            return
        courier, self.courier = self.courier, None
        courier.close()
        self.pending = self.outbox.undelivered()
        if self.pending:
            given = self.trainer.run_dir if self.trainer is not None else None
            where = None if self.in_trial else given if isinstance(given, Path) else self.outbox.folder
            print(f"distmaml: {pending_line(self.outbox, self.uri, where)}", file=sys.stderr, flush=True)
        if result is not None:
            if self.run_id is not None:
                result["mlflow_run_id"] = self.run_id
            result["tracking_pending"] = self.pending
            if self.trainer is not None and self.trainer.run_dir is not None:
                write_json(storage.join(self.trainer.run_dir, "result.json"), result)
        self.outbox.close()
        if self.run_dir is None and not self.pending:  # its temporary folder: nothing left to keep
            shutil.rmtree(self.outbox.folder, ignore_errors=True)
        if courier.error is not None:
            raise courier.error

    def fail(self, status: str = "FAILED") -> None:
        """Ends an unfinished run as ``status`` (FAILED: the trainer raised; KILLED: a scheduler stopped it).

        Buffered metrics are kept; a run that already reached ``on_end`` stays FINISHED.
        """
        if self.courier is None or self.finished:
            return
        try:
            self.flush()
        finally:
            self._append({"kind": "end", "status": status, "end_time": int(time.time() * 1000)})
            self._close()

    # -- artifacts ------------------------------------------------------------
    def _artifacts(self, path: str | None) -> Path:
        """A fresh outbox folder whose files go to the run's artifacts under ``path``; appended by ``_commit``."""
        assert self.outbox is not None
        folder, rel = self.outbox.artifact_dir()
        self._staged = {"kind": "artifacts", "dir": rel, "path": path}
        return folder

    def _commit(self) -> None:
        self._append(self._staged)

    def _log_artifacts(self, trainer: Trainer, result: dict[str, Any]) -> None:
        from distmaml.tracking import plots

        folder = self._artifacts(None)
        (folder / "config.yaml").write_text(dump_config(self.config))
        write_json(folder / "result.json", result)
        self._commit()
        if trainer.last_checkpoint is not None:
            folder = self._artifacts("checkpoint")
            _place(trainer.last_checkpoint, folder / storage.name(trainer.last_checkpoint))
            self._commit()
        folder = self._artifacts("plots")
        plots.learning_curve(trainer.history.train, trainer.history.val, trainer.metric, folder / "learning_curve.png")
        if self.config.data.family == "sinusoid":
            plots.sinusoid_adaptation(
                self.network,
                self.algorithm,
                self.family,
                trainer.params,
                self.config.test_steps,
                folder / "adaptation.png",
            )
        self._commit()
        if self.config.tracking.log_model:
            self._log_model(trainer)

    def _log_model(self, trainer: Trainer) -> None:
        """The network with the meta-learned parameters, pickled into the outbox; delivered as an MLflow
        PyTorch model (pickle format, ``delivery.Delivery._model``).

        MAML++'s per-step batch-norm goes in as its first step's (the network before adaptation).
        """
        from importlib.metadata import version

        import torch

        from distmaml.core.algorithm import network_params

        assert self.outbox is not None
        model = copy.deepcopy(self.network)
        weights = network_params(model, self.algorithm, trainer.params)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        folder, rel = self.outbox.artifact_dir()
        torch.save(model, folder / "network.pt")
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"distmaml=={version('distmaml')}"]
        self._append({"kind": "model", "file": f"{rel}/network.pt", "requirements": requirements})


def _place(source: Location, target: Path) -> None:
    """``source`` at ``target``: a hard link on the same file system (no copy), else a copy."""
    if isinstance(source, Path):
        try:
            os.link(source, target)
            return
        except OSError:
            shutil.copy2(source, target)
            return
    target.write_bytes(storage.read_bytes(source))
