"""A collective trial: the Ray Train worker group's reports relayed to Tune from the trial's own thread.

With ``engine.reduce: collective`` a trial's trainer runs in a Ray Train worker
group, not in the trial's process, and ``tune.report`` works only in the
trial's thread. The group's rank 0 reports at each checkpoint through
``ray.train.report`` (``assembly.GroupReporter``); ``TrainRelay``, a Ray Train
callback in the group's controller, puts each report (its metrics and
checkpoint) on a queue; the trial's thread takes them off and hands Tune what
``TuneReporter`` hands it for the driver engine: the validation metric and a
run-directory checkpoint at each validation, then the last validation with the
meta-test. When Tune stops the trial (``SystemExit`` from ``tune.report``) the
relay tells the controller, which ends the group at its next report.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from distmaml.engine.collective import RESULT_FILE, CollectiveEngine

DONE = "done"
"""Put on the queue by the trial when the group's fit returned or raised."""
POLL = 1.0
"""Seconds between the trial's looks at the queue while the group trains."""


class StoppedByTune(RuntimeError):
    """Tune stopped the trial; the group ends at its next report."""


class TrainRelay(UserCallback):
    """In the group's controller: every report onto ``reports``; stops the run once ``stop`` holds an item."""

    def __init__(self, reports: Queue, stop: Queue) -> None:
        self.reports = reports
        self.stop = stop

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not self.stop.empty():
            raise StoppedByTune("Tune stopped the trial")
        self.reports.put((dict(metrics[0]), checkpoint))


def fit_collective_trial(run: Any, run_dir: Path, *, resume: bool, metric: str, static: dict[str, Any]) -> None:
    """Trains ``run`` (a collective engine's run) in its worker group, reporting to Tune from this thread.

    Args:
        run: the trial's ``assembly.Run``; its engine is a ``CollectiveEngine``.
        run_dir: the trial's run directory on this node.
        resume: continue from the checkpoint already copied into ``run_dir``.
        metric: the sweep's metric (``val_mse``, ``val_accuracy``): reports without it are not Tune's.
        static: reported with every result (the trial's workers and placement groups, ``resumed_from``).
    """
    from ray import tune

    engine: CollectiveEngine = run.engine
    reports: Queue = Queue(maxsize=4, actor_options={"num_cpus": 0})
    stop: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    engine.callbacks.append(TrainRelay(reports, stop))
    outcome: list[BaseException | dict[str, Any]] = []

    def fit() -> None:
        try:
            outcome.append(run.fit(run_dir, progress=False, resume=resume))
        except BaseException as e:  # raised again in the trial's thread
            outcome.append(e)

    worker = threading.Thread(target=fit, name="distmaml-collective-fit", daemon=True)
    worker.start()
    steps = run.config.meta.steps
    try:
        while True:
            try:
                metrics, checkpoint = reports.get(timeout=POLL)
            except Empty:
                if not worker.is_alive():
                    break
                continue
            _relay(tune, metrics, checkpoint, metric, steps, static)
    except BaseException:
        stop.put(DONE)  # Tune stopped the trial (SystemExit) or the trial failed: end the group
        worker.join()
        raise
    finally:
        reports.shutdown()
        stop.shutdown()
    worker.join()
    if outcome and isinstance(outcome[0], BaseException):
        raise outcome[0]


def _relay(
    tune: Any, metrics: dict[str, Any], checkpoint: Any, metric: str, steps: int, static: dict[str, Any]
) -> None:
    """One Tune report from one of the group's: a validation (not the last), or the result."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        result_file = Path(folder) / RESULT_FILE
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            mt = result["meta_test"]
            last = result["validation"][-1]["metric"] if result["validation"] else float("nan")
            metrics = {metric: last, f"test_{mt['metric']}": mt["mean"], f"test_{mt['metric']}_ci95": mt["ci95"]}
            metrics["step"] = result["steps"]
            if "mlflow_run_id" in result:
                metrics["mlflow_run_id"] = result["mlflow_run_id"]
        elif metric not in metrics or int(metrics["step"]) >= steps:
            return  # a checkpoint without validation, or the last validation: reported with the result
        report = {**metrics, **static}
        id_file = Path(folder) / "mlflow_run_id"
        if id_file.is_file():
            report["mlflow_run_id"] = id_file.read_text().strip()
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
