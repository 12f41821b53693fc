"""``distmaml tune``: a Ray Tune sweep over a search-space file, recorded in MLflow.

The driver checks the space against the cluster, opens one MLflow parent run
for the sweep, runs the trials (each a full trainer run in its own placement
group, logging a nested child run), then writes the sweep's outcome to the
parent run: the best config, a table of all trials, a plot of the metric
against each searched key.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmaml.config import config_from_dict, dump_config
from distmaml.storage import Location
from distmaml.tune.report import TrialRow, plot_metric_by_key, sort_rows, write_csv, write_markdown
from distmaml.tune.shared import TuneStorage, check_tracking_reach, other_machines, tune_storage
from distmaml.tune.space import SweepSpec, check_resources
from distmaml.tune.trial import TrialContext, run_trial


@dataclass
class SweepResult:
    """What ``run_sweep`` returns; ``rows`` are sorted best first."""

    rows: list[TrialRow]
    best: TrialRow | None
    parent_run_id: str | None
    storage: Location
    """Tune's storage: a local folder or a bucket URI (``s3://...``)."""
    tracking_uri: str | None = None
    experiment_id: str | None = None


def _searcher(spec: SweepSpec) -> Any:
    """Tune's search algorithm, seeded by the base config's ``seed``: the same space file samples the same trials."""
    seed = spec.base_config().seed
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=spec.max_concurrent or 0, random_state=seed)


def _scheduler(spec: SweepSpec) -> Any:
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        steps = spec.base_config().meta.steps
        return ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=min(spec.grace_period, steps),
            reduction_factor=spec.reduction_factor,
        )
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _open_parent(spec: SweepSpec, uri: str) -> tuple[Any, str, str]:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from distmaml.tracking.delivery import experiment_id

    client = MlflowClient(tracking_uri=uri)
    exp = experiment_id(client, spec.name, uri)
    run = client.create_run(exp, run_name=f"sweep {spec.name}", tags={"distmaml.sweep": spec.name})
    params = {
        "sweep.base": spec.base,
        "sweep.metric": spec.metric,
        "sweep.mode": spec.mode,
        "sweep.search": spec.search,
        "sweep.scheduler": spec.scheduler,
        "sweep.num_samples": spec.num_samples,
        "sweep.max_concurrent": spec.max_concurrent,
        "sweep.resources": spec.resources.bundles(),
        **{f"space.{d.key}": f"{d.kind}{list(d.args)}" for d in spec.dimensions},
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(spec.path), "space")
    return client, run.info.run_id, exp


def _rows(grid: Any, spec: SweepSpec, where: TuneStorage) -> list[TrialRow]:
    steps = spec.base_config().meta.steps
    rows = []
    for i, result in enumerate(grid):
        m = result.metrics or {}
        value = m.get(spec.metric)
        metric = float(value) if isinstance(value, (int, float)) else math.nan
        step = int(m.get("step", 0))
        status = "error" if result.error is not None else ("done" if step >= steps else "stopped")
        ckpt = str(where.locate(result.checkpoint.path)) if result.checkpoint is not None else None
        rows.append(
            TrialRow(
                trial=str(m.get("trial_id", f"trial_{i}")),
                status=status,
                values={k: result.config.get(k) for k in spec.keys},
                metric=metric,
                step=step,
                checkpoint=ckpt,
                mlflow_run_id=m.get("mlflow_run_id"),
                resumed_from=int(m.get("resumed_from", 0)),
            )
        )
    return sort_rows(rows, spec.mode)


def _waiting(rows: list[TrialRow]) -> dict[str, str]:
    """Trial -> its checkpoint folder, for trials whose last records MLflow has not taken (``distmaml sync``;
    a checkpoint in a bucket is read from a local copy, ``outbox_folder``)."""
    from distmaml.tracking.outbox import Outbox, outbox_folder

    out = {}
    for r in rows:
        try:
            folder = outbox_folder(r.checkpoint) if r.checkpoint else None
        except OSError as e:  # the bucket does not answer now: the trial's end is left as Tune gave it
            print(f"distmaml: trial {r.trial}: its checkpoint {r.checkpoint} cannot be read ({e}); if MLflow "
                  f"lacks the trial's end, send it with 'distmaml sync {r.checkpoint}'", file=sys.stderr)  # fmt: skip
            continue
        if folder is not None and Outbox(folder).undelivered():
            out[r.trial] = str(r.checkpoint)
    return out


def _deliver_checkpoints(rows: list[TrialRow], uri: str) -> dict[str, str]:
    """Sends MLflow at ``uri`` what each trial's last checkpoint counts as not yet sent; returns the
    trials whose records MLflow still lacks (its server does not answer, or refused them), trial -> checkpoint.

    A checkpoint's outbox is copied while the trial's courier is still sending, so its last metrics
    are usually counted there as not sent although MLflow has them. And a trial that a scheduler stops
    ends its records as its process ends (Tune does not wait for the trial's thread): its KILLED may
    never leave it. Every record is idempotent in MLflow, so sending the checkpoint's again is safe.
    A server that does not answer is asked once, not once per trial (each ask can take seconds).
    """
    from distmaml.tracking.delivery import server_answers
    from distmaml.tracking.sync import sync_run

    left = _waiting(rows)
    if not left or not server_answers(uri):
        return left
    for trial, folder in list(left.items()):
        try:
            sync_run(folder)
        except Exception:  # the line the sweep prints names the command that retries it
            if not server_answers(uri):  # gone meanwhile: the rest wait for 'distmaml sync' too
                break
            continue
        del left[trial]
    return left


def _close_parent(
    client: Any, parent: str, spec: SweepSpec, rows: list[TrialRow], best: TrialRow | None, waiting: dict[str, str]
) -> None:
    from mlflow.entities import Metric

    for r in rows:  # children of stopped or crashed trials never reached on_end
        if r.trial in waiting:  # its end is in its outbox, not yet in MLflow
            continue
        if r.mlflow_run_id and client.get_run(r.mlflow_run_id).info.status == "RUNNING":
            client.set_terminated(r.mlflow_run_id, status="KILLED" if r.status == "stopped" else "FAILED")
    now = int(time.time() * 1000)
    if best is not None:
        client.log_batch(parent, metrics=[Metric(f"best_{spec.metric}", best.metric, now, best.step)])
        client.set_tag(parent, "distmaml.best_trial", best.trial)
        client.set_tag(parent, "distmaml.best_checkpoint", best.checkpoint or "")
        if best.mlflow_run_id:
            client.set_tag(parent, "distmaml.best_run_id", best.mlflow_run_id)
    with tempfile.TemporaryDirectory(prefix="distmaml-sweep-") as tmp:
        folder = Path(tmp)
        if best is not None:
            best_cfg = config_from_dict(spec.trial_data(best.values))
            (folder / "best_config.yaml").write_text(dump_config(best_cfg))
            client.log_artifact(parent, str(folder / "best_config.yaml"))
        client.log_artifact(parent, str(write_csv(rows, spec, folder / "trials.csv")))
        client.log_artifact(parent, str(write_markdown(rows, spec, folder / "trials.md")))
        plot = plot_metric_by_key(rows, spec, folder / f"{spec.metric}_by_key.png")
        client.log_artifact(parent, str(plot), "plots")
    client.set_terminated(parent, status="FINISHED" if best is not None else "FAILED")


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    storage: str | Path = "ray_results",
    verbose: int = 1,
    exit_after_step: int | None = None,
) -> SweepResult:
    """Runs the sweep ``spec`` on the Ray cluster at ``address``: ``local``, ``auto``, ``host:port``;
    ``None`` means ``RAY_ADDRESS`` if set, else a Ray started here for the sweep alone.

    ``storage`` is Tune's storage for trial checkpoints and results: a local
    folder on one machine, a bucket URI (``s3://...``) that every node reaches
    on a cluster. ``exit_after_step`` is a test hook (see ``TrialContext``).

    Example:
        >>> result = run_sweep(load_space("tune_spaces/sinusoid.yaml"), storage="s3://bucket/sweeps")
        >>> result.best.checkpoint   # a run dir that ``distmaml evaluate --checkpoint`` takes
        's3://bucket/sweeps/sinusoid-.../run_trial_.../checkpoint_000002'
    """
    from ray import tune

    from distmaml.cluster.connect import connect
    from distmaml.cluster.placement import cluster_shape, cpu_threads
    from distmaml.run.assembly import user_runtime_env, with_absolute_uri

    where = tune_storage(storage)
    base = with_absolute_uri(spec.base_config())
    base_data = dict(spec.base_data, tracking=base.to_dict()["tracking"])
    data_path = base.data.path
    if data_path and "://" not in data_path and not Path(data_path).expanduser().is_absolute():
        # trials run in their own folders: a relative store path means the driver's directory
        base_data["data"] = dict(base_data.get("data", {}), path=str(Path(data_path).resolve()))
    # --address, else RAY_ADDRESS, else a Ray of its own: never a cluster a 'ray start' here merely recorded.
    # The job's runtime environment ships the user's code to every trial and worker.
    connect(address, log_to_driver=verbose > 0, runtime_env=user_runtime_env(base))
    cluster = cluster_shape()
    check_resources(spec, cluster.nodes, cluster.max_launches)
    if base.tracking.enabled:
        check_tracking_reach(base.tracking.uri, other_machines())

    client, parent, exp = _open_parent(spec, base.tracking.uri) if base.tracking.enabled else (None, None, None)
    ctx = TrialContext(
        base_data=base_data,
        experiment=spec.name,
        parent_run_id=parent,
        metric=spec.metric,
        address=address,
        threads=cpu_threads(spec.resources.driver_cpus),
        exit_after_step=exit_after_step,
    )
    bundles = spec.resources.bundles()
    if base.engine.reduce == "collective":  # a trial's Ray Train worker group reserves its own bundles
        bundles = bundles[:1]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx),
        tune.PlacementGroupFactory(bundles, strategy=base.engine.placement),
    )
    tuner = tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_searcher(spec),
            scheduler=_scheduler(spec),
            num_samples=spec.num_samples,
            # Tune's generator takes its limit itself (above); a Searcher gets a ConcurrencyLimiter here
            max_concurrent_trials=spec.max_concurrent if spec.search == "optuna" else None,
            # one process runs trial after trial: torch, MLflow and matplotlib are imported once
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=where.path,
            storage_filesystem=where.filesystem,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=verbose,
        ),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        if client is not None:
            client.set_terminated(parent, status="FAILED")
        raise
    rows = _rows(grid, spec, where)
    best = rows[0] if rows and math.isfinite(rows[0].metric) else None
    if client is not None and parent is not None:
        from distmaml.tracking.delivery import transient

        waiting = _deliver_checkpoints(rows, base.tracking.uri)
        for trial, folder in waiting.items():
            print(f"distmaml: trial {trial}: MLflow did not take its last records; send them with "
                  f"'distmaml sync {folder}'", file=sys.stderr)  # fmt: skip
        try:
            _close_parent(client, parent, spec, rows, best, waiting)
        except Exception as e:  # the sweep's own summary: the table below says the same
            if transient(e) is None:
                raise
            print(f"distmaml: the MLflow server at {base.tracking.uri} did not answer ({transient(e)}): "
                  f"the sweep's parent run {parent} lacks its summary", file=sys.stderr)  # fmt: skip
    uri = base.tracking.uri if base.tracking.enabled else None
    return SweepResult(
        rows=rows, best=best, parent_run_id=parent, storage=where.location, tracking_uri=uri, experiment_id=exp
    )
