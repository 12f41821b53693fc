"""One Tune trial: one full trainer run, reporting to Tune at every validation.

The trial runs in a Ray actor inside its placement group (a driver bundle and
one bundle per worker). It builds its config from the sweep's base and the
sampled values, assembles its run with ``distmaml.run.assembly.assemble`` (worker
actors join the trial's placement group), and trains with two callbacks:
``MlflowCallback`` (a nested child run of the sweep's parent run) and
``TuneReporter``, which at every validation hands Tune the metric and a
checkpoint directory. A restarted trial (``FailureConfig``), on this node or
another, copies the checkpoint Tune gives it (from the sweep's ``--storage``,
a bucket on a cluster) into a fresh run directory and resumes from that step,
continuing the same MLflow child run. The run directory is a temporary folder
of the node the attempt runs on: nothing in it outlives the attempt except
what ``tune.report`` copied to the storage.

A Tune checkpoint directory is itself a run directory (``checkpoints/``,
``config.yaml``, ``mlflow_run_id``, and the MLflow outbox ``tracking/``), so
``distmaml evaluate --checkpoint`` takes it as it is, and ``distmaml sync``
sends from it what a tracking server that was down at the trial's end missed.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmaml.config import config_from_dict, set_dotted
from distmaml.fastpath import malloc
from distmaml.run.trainer import Callback, Trainer
from distmaml.storage import Location
from distmaml.tracking.outbox import FOLDER as OUTBOX
from distmaml.tracking.outbox import LOCK


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; passed with ``tune.with_parameters``."""

    base_data: dict[str, Any]
    """Nested config mapping: base recipe, ``set``, ``workers``, absolute ``tracking.uri``."""
    experiment: str
    parent_run_id: str | None
    metric: str
    address: str | None = None
    threads: int = 1
    exit_after_step: int | None = None
    """Test hook: the first attempt of each trial deletes its run directory and ends its process
    with ``os._exit`` after the first report at or past this step, as a lost node would: a real
    crash that Tune must recover from, with nothing left on the node's disk."""


class TuneReporter(Callback):
    """Reports the validation metric and a checkpoint to Tune at every validation."""

    def __init__(self, ctx: TrialContext, first_attempt: bool, static: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.first_attempt = first_attempt
        self.static = dict(static or {})
        """Reported with every result: the trial's workers and placement groups (see ``run_trial``)."""
        self.trainer: Trainer | None = None
        self.start_step = 0
        self._final: tuple[int, dict[str, float], Location | None] = (0, {}, None)

    def on_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.start_step = trainer.step

    def on_validation(self, step: int, metrics: dict[str, float], checkpoint: Location | None) -> None:
        assert self.trainer is not None
        if step >= self.trainer.config.meta.steps:
            # The last validation is reported from on_end, after the meta-test and after the
            # MLflow child run is complete: a scheduler may end the trial at its last report.
            self._final = (step, metrics, checkpoint)
            return
        self._report(step, metrics, checkpoint, {})
        if self.first_attempt and self.ctx.exit_after_step is not None and step >= self.ctx.exit_after_step:
            shutil.rmtree(Path(str(self.trainer.run_dir)).parent, ignore_errors=True)  # the attempt's temporary folder
            os._exit(17)

    def on_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        step, metrics, checkpoint = self._final
        if checkpoint is None:  # restored from the final checkpoint: nothing left to train
            step, metrics, checkpoint = trainer.step, trainer.validate(), trainer.last_checkpoint
        mt = result["meta_test"]
        extra = {f"test_{mt['metric']}": mt["mean"], f"test_{mt['metric']}_ci95": mt["ci95"]}
        self._report(step, metrics, checkpoint, extra)

    def _report(self, step: int, metrics: dict[str, float], checkpoint: Location | None, extra: dict[str, Any]) -> None:
        from ray import tune

        trainer = self.trainer
        assert trainer is not None and trainer.run_dir is not None and checkpoint is not None
        run_dir, checkpoint = Path(trainer.run_dir), Path(checkpoint)  # a trial's run is on its node's disk
        report: dict[str, Any] = {**metrics, **extra, **self.static, "step": step, "resumed_from": self.start_step}
        with tempfile.TemporaryDirectory(prefix="distmaml-ckpt-") as tmp:
            folder = Path(tmp)
            (folder / "checkpoints").mkdir()
            shutil.copy2(checkpoint, folder / "checkpoints" / checkpoint.name)
            for name in ("config.yaml", "mlflow_run_id", "result.json"):
                if (run_dir / name).is_file():
                    shutil.copy2(run_dir / name, folder / name)
            if (run_dir / OUTBOX).is_dir():  # what MLflow has not yet taken: 'distmaml sync' sends it from here
                shutil.copytree(run_dir / OUTBOX, folder / OUTBOX, ignore=shutil.ignore_patterns(LOCK, "*.tmp"))
            if (folder / "mlflow_run_id").is_file():
                report["mlflow_run_id"] = (folder / "mlflow_run_id").read_text().strip()
            # report() copies the folder into the trial's storage before returning
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def _placement_report(engine: Any) -> dict[str, Any]:
    """The trial's placement group and the one its worker actors run in (the same one, bundles 1..N),
    and the node the trial's own process runs on."""
    import ray
    from ray.util import get_current_placement_group

    trial_group = get_current_placement_group()
    placement = getattr(engine, "placement", None)
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "workers": engine.workers,
        "trial_placement_group": trial_group.id.hex() if trial_group is not None else "",
        "engine_placement_group": placement.group.id.hex() if placement is not None else "",
    }


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable: ``params`` are the sampled values of the searched dotted keys."""
    import torch
    from ray import tune

    from distmaml.run.assembly import assemble, is_collective

    torch.set_num_threads(max(1, ctx.threads))
    malloc.claim()  # a trial's own process: a runner built here keeps the memory it frees
    data = copy.deepcopy(ctx.base_data)
    for key, value in params.items():
        set_dotted(data, key, value)
    config = config_from_dict(data)

    context = tune.get_context()
    restored = tune.get_checkpoint()
    tracking = {
        "experiment": ctx.experiment,
        "parent_run_id": ctx.parent_run_id,
        "run_name": context.get_trial_name(),
        "tags": {"distmaml.trial_id": context.get_trial_id(), "distmaml.searched": ",".join(sorted(params))},
        "in_trial": True,
    }
    run = assemble(config, ctx.address, tracking=tracking)
    # Not Tune's trial folder: on another node, or after a node was lost, it is not there;
    # Tune's checkpoint, downloaded from the sweep's storage, is the truth.
    folder = Path(tempfile.mkdtemp(prefix=f"distmaml-{context.get_trial_id()}-"))
    run_dir = folder / "run"
    try:
        try:
            if restored is not None:
                with restored.as_directory() as saved:
                    shutil.copytree(saved, run_dir)
            else:
                run_dir.mkdir()  # Trainer.fit writes config.yaml into it
            static = _placement_report(run.engine)
            reporter = TuneReporter(ctx, first_attempt=restored is None, static=static)
        except BaseException:
            run.close()
            raise
        if is_collective(run.engine):  # the trainer runs in the group's workers: their reports are relayed
            from distmaml.run.checkpoint import load_checkpoint
            from distmaml.tune.relay import fit_collective_trial

            static["resumed_from"] = load_checkpoint(run_dir).step if restored is not None else 0
            try:
                fit_collective_trial(run, run_dir, resume=restored is not None, metric=ctx.metric, static=static)
            finally:
                run.close()
            return
        # Tune stops a trial (ASHA, or the end of the sweep) by raising SystemExit in report(): the child run ends KILLED
        run.fit(run_dir, progress=False, resume=restored is not None, callbacks=[reporter])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
