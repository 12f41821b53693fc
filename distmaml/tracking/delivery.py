"""Delivering an outbox to MLflow: in order, each record once, and a courier thread that waits out outages.

Every record kind is idempotent in MLflow, so a record sent again (delivered,
then a crash before ``state.json`` counted it, or a timeout whose request the
server did carry out) changes nothing:

- ``create``: the run carries the tag ``distmaml.outbox_key``; a run with the
  record's key already in the experiment is taken instead of a new one;
- ``metrics``: ``log_batch`` with each point's own step and timestamp (those
  of the training step, not of the delivery); MLflow's store drops a point
  identical in key, value, timestamp and step to one it holds;
- ``params``: the same value again is accepted;
- ``artifacts``: the same files overwrite themselves;
- ``model``: skipped when the run already has its logged model;
- ``status`` and ``end``: setting a status twice is setting it once.

What MLflow's client does not do, and this module does: MLflow's
asynchronous logging (``MLFLOW_ENABLE_ASYNC_LOGGING``, ``synchronous=False``)
keeps its queue in memory, logs a failed batch as an error and drops it
(``AsyncLoggingQueue._logging_loop``, MLflow 3.17), and loses the rest when the
process ends; its HTTP retries (bounded by ``probe.bound_http_retries``: 2
retries, 10 s per attempt) ride out a blip of seconds, not a restart.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distmaml.tracking.outbox import Outbox, State

OUTBOX_KEY_TAG = "distmaml.outbox_key"
RECHECK_SECONDS = 2.0
"""While the server does not answer, the courier asks ``GET /health`` this often."""
HEALTH_TIMEOUT = 2.0
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_MAX_PARAMS = 100  # and of params


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


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


class Unreachable(ConnectionError):
    """The tracking store did not answer (connection refused or reset, a timeout, a 5xx, a locked database)."""


def transient(error: BaseException) -> str | None:
    """Why ``error`` means "the store did not answer" (a short reason), or None for an error retrying cannot fix."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        text = str(error)
        if text.startswith("API request to") and "failed with" in text and "error code" not in text:
            if "Connection refused" in text:
                return "connection refused"
            return "timed out" if "timeout" in text.lower() or "timed out" in text.lower() else "no answer"
        if status >= 500:
            return f"HTTP {status}"
        return None
    import requests

    if isinstance(error, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return "connection refused" if "refused" in str(error).lower() else "no answer"
    name = type(error).__name__
    if name == "OperationalError":  # SQLAlchemy: a locked or unreachable database
        return "database unavailable"
    return None


def server_answers(uri: str) -> bool:
    """Whether ``uri``'s server answers ``GET /health`` now (a store without a server: True, try it)."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT):
            return True
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)  # behind a login: MLflow's client brings the credentials
    except (urllib.error.URLError, OSError):
        return False


class Delivery:
    """Sends an outbox's undelivered records to the MLflow store at ``uri``, in order, counting each.

    Args:
        outbox: the run's outbox.
        uri: the tracking URI (``tracking.uri``; ``distmaml sync --uri`` may name another).
        on_run_id: called with the MLflow run id once the run exists in MLflow.
    """

    def __init__(self, outbox: Outbox, uri: str, on_run_id: Callable[[str], None] | None = None) -> None:
        from mlflow import MlflowClient

        self.outbox = outbox
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.on_run_id = on_run_id
        self._experiment: str | None = None

    def send_pending(self) -> int:
        """Sends every undelivered record; their number. ``Unreachable`` when the store stops answering
        (the records sent until then stay counted); other errors of MLflow are raised as they are."""
        state = self.outbox.state()
        pending = self.outbox.pending()
        sent, i = 0, 0
        try:
            while i < len(pending):
                n, record = pending[i]
                if record["kind"] == "metrics":  # consecutive batches of metrics go in as few calls as MLflow takes
                    rows: list[list[Any]] = []
                    while i < len(pending) and pending[i][1]["kind"] == "metrics":
                        if rows and len(rows) + len(pending[i][1]["metrics"]) > _MAX_BATCH:
                            break
                        n = pending[i][0]
                        rows += pending[i][1]["metrics"]
                        i += 1
                    self._metrics(state, rows)
                else:
                    self._send(state, record)
                    i += 1
                state.delivered = n + 1
                self.outbox.save_state(state)
                sent = i
                if record["kind"] in ("artifacts", "model"):  # counted: never sent again
                    self.outbox.drop_files(record)
        except Exception as e:
            reason = transient(e)
            if reason is None:
                raise
            raise Unreachable(reason) from e
        return sent

    # -- one record -------------------------------------------------------------------
    def _send(self, state: State, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "create":
            self._create(state, record)
            return
        run_id = state.run_id
        if run_id is None:
            raise RuntimeError(f"{self.outbox.records}: a {kind!r} record before the run's 'create' record")
        if kind == "params":
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in record["params"].items()]
            for j in range(0, len(params), _MAX_PARAMS):
                self.client.log_batch(run_id, params=params[j : j + _MAX_PARAMS])
        elif kind == "status":
            self.client.update_run(run_id, status=record["status"])
        elif kind == "artifacts":
            folder = self.outbox.folder / record["dir"]
            if folder.is_dir():  # else delivered before: its files are dropped only once it is counted
                self.client.log_artifacts(run_id, str(folder), record.get("path"))
        elif kind == "model":
            if (self.outbox.folder / record["file"]).is_file():  # (the same)
                self._model(run_id, record)
        elif kind == "end":
            self.client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        else:
            raise RuntimeError(f"{self.outbox.records}: unknown record kind {kind!r}")

    def _metrics(self, state: State, rows: list[list[Any]]) -> None:
        from mlflow.entities import Metric

        assert state.run_id is not None, "metrics before the run's 'create' record"
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rows]
        self.client.log_batch(state.run_id, metrics=metrics)

    def _experiment_id(self, name: str) -> str:

        if self._experiment is None:
            self._experiment = experiment_id(self.client, name, self.uri)
        return self._experiment

    def _create(self, state: State, record: dict[str, Any]) -> None:
        if state.run_id is None:
            exp = self._experiment_id(record["experiment"])
            key = record["key"]
            found = self.client.search_runs([exp], filter_string=f"tags.`{OUTBOX_KEY_TAG}` = '{key}'", max_results=1)
            if found:  # created before, its id not yet counted
                state.run_id = found[0].info.run_id
            else:
                tags = {**record.get("tags", {}), OUTBOX_KEY_TAG: key}
                run = self.client.create_run(
                    exp, start_time=record.get("start_time"), tags=tags, run_name=record.get("run_name")
                )
                state.run_id = run.info.run_id
        if self.on_run_id is not None:
            self.on_run_id(state.run_id)

    def _model(self, run_id: str, record: dict[str, Any]) -> None:
        """The network as an MLflow PyTorch model (pickle format), unless the run already has it."""
        import mlflow
        import mlflow.pytorch
        import torch

        exp = self.client.get_run(run_id).info.experiment_id
        have = self.client.search_logged_models(experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'")
        if any(m.name == "model" and str(m.status) in ("READY", "LoggedModelStatus.READY") for m in have):
            return
        network = torch.load(self.outbox.folder / record["file"], weights_only=False)
        mlflow.set_tracking_uri(self.uri)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the run's own lines say where
        # start_run on an existing id resumes it (in this thread only); its exit marks the run FINISHED,
        # which the 'end' record that follows sets as well
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                network,
                name="model",
                serialization_format="pickle",
                # Given, not inferred: inference imports the model in a subprocess (seconds).
                pip_requirements=record["requirements"],
            )


class Courier:
    """A thread that keeps delivering an outbox while the run appends to it, and waits out outages.

    It sends whenever ``notify`` is called (the run appended records). When
    the store stops answering it says so once on stderr, lets the records pile
    up in the outbox, asks ``GET /health`` every ``RECHECK_SECONDS`` and, once
    answered, sends the backlog and says so. ``close`` ends it: everything is
    delivered, or the store does not answer (one more try first).

    Args:
        delivery: the outbox's delivery.
        offline: why the store did not answer a send just tried, if it did not.
    """

    def __init__(self, delivery: Delivery, offline: str | None = None) -> None:
        self.delivery = delivery
        self.error: BaseException | None = None
        """An error retrying cannot fix (MLflow refused a record); raised by the run at its next send."""
        self.offline_since: float | None = None
        self.outages = 0
        self._wake = threading.Event()
        self._closing = False
        if offline is not None:
            self._went_offline(offline)
        self._thread = threading.Thread(target=self._loop, name="distmaml-mlflow", daemon=True)
        self._thread.start()

    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    def notify(self) -> None:
        """New records are in the outbox."""
        self._wake.set()

    def close(self) -> bool:
        """Sends what the store takes (waiting while it answers), ends the thread; True if nothing is left."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        return self.error is None and not self.offline and self.delivery.outbox.undelivered() == 0

    def _say(self, line: str) -> None:
        print(f"distmaml: {line}", file=sys.stderr, flush=True)

    def _went_offline(self, reason: str) -> None:
        self.offline_since = time.monotonic()
        self.outages += 1
        self._say(
            f"the MLflow server at {self.delivery.uri} does not answer ({reason}); training goes on, "
            f"its records are kept in {self.delivery.outbox.folder} and sent when it answers again"
        )

    def _loop(self) -> None:
        next_check = 0.0
        while True:
            if self.offline and not self._closing:  # new records do not make it ask sooner
                self._wake.wait(timeout=max(0.0, next_check - time.monotonic()))
                if time.monotonic() < next_check and not self._closing:
                    self._wake.clear()  # woken by new records: they wait for the next check
                    continue
            else:
                self._wake.wait()
            self._wake.clear()
            closing = self._closing
            if self.offline and not server_answers(self.delivery.uri):
                if closing:
                    return
                next_check = time.monotonic() + RECHECK_SECONDS
                continue
            began = time.monotonic()
            try:
                sent = self.delivery.send_pending()
            except Unreachable as e:
                if not self.offline:
                    self._went_offline(str(e))
                next_check = time.monotonic() + RECHECK_SECONDS
                if closing:
                    return
                continue
            except BaseException as e:  # MLflow refused a record: the run raises it
                self.error = e
                return
            if self.offline_since is not None:
                away = time.monotonic() - self.offline_since
                self.offline_since = None
                self._say(
                    f"the MLflow server at {self.delivery.uri} is back after {away:.1f} s: "
                    f"{sent} records kept meanwhile sent in {time.monotonic() - began:.1f} s"
                )
            if closing:
                return


def pending_line(outbox: Outbox, uri: str, run_dir: str | Path | None) -> str:
    """The run's last line when records are left: how many wait, and the command that sends them
    (``run_dir`` None: a Tune trial's, whose checkpoint the sweep names at its end)."""
    where = (
        f"wait in {outbox.folder}; send them with 'distmaml sync {run_dir}'"
        if run_dir is not None
        else "wait in the trial's last checkpoint, which the sweep names at its end"
    )
    return f"the MLflow server at {uri} did not answer by the end of the run: {outbox.undelivered()} records {where}"
