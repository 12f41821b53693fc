"""``distmaml sync RUN_DIR``: sends what a run's outbox still holds to MLflow, and nothing twice.

A run whose tracking server was down when it ended leaves its last records
in ``RUN_DIR/tracking/`` (see ``outbox``). ``sync_run`` sends them in order
(the run's creation if it never reached MLflow, metrics with their own steps
and timestamps, artifacts, the model, the end status) and counts each as it
goes; a second call finds nothing left and changes nothing. It takes a run
directory, a Tune trial's checkpoint folder (which carries the trial's
outbox) or the outbox folder itself, on this machine or in a bucket
(``s3://...``: a sweep with ``--storage`` there). A folder in a bucket is
read into a local copy (``outbox.outbox_folder``) and sent from it; what was
sent is counted in that copy, and a sync of the same folder from another
machine sends it again, which MLflow takes once (every record is idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from distmaml import storage
from distmaml.errors import CANNOT_GO_ON, DistmamlError
from distmaml.storage import atomic_write_text
from distmaml.tracking.delivery import Delivery, Unreachable, server_answers
from distmaml.tracking.outbox import FOLDER, RECORDS, Outbox, OutboxBusy, outbox_folder
from distmaml.tracking.probe import CONNECT_TIMEOUT, bound_http_retries


class SyncError(DistmamlError):
    """``distmaml sync`` found no outbox (exit 2) or could not deliver it (``CANNOT_GO_ON``)."""


@dataclass
class Synced:
    """What ``sync_run`` did."""

    path: Path
    """The outbox folder."""
    uri: str
    run_id: str | None
    sent: int
    records: int
    status: str | None
    """The run's status in MLflow afterwards (FINISHED once its end record is in)."""


def _check(uri: str, where: str) -> None:
    from distmaml.cluster.reach import unreachable

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    why = unreachable(parsed.hostname or "localhost", port, CONNECT_TIMEOUT)
    if why is None and not server_answers(uri):
        why = "it does not answer GET /health"
    if why is not None:
        error = SyncError(
            f"sync {where}: no MLflow server answers at {uri} ({why}); start it, or name where it is now with --uri"
        )
        error.exit_code = CANNOT_GO_ON
        raise error


def sync_run(path: str | Path, uri: str | None = None) -> Synced:
    """Delivers the outbox of run directory ``path`` to MLflow at ``uri`` (default: the run's ``tracking.uri``).

    Example:
        >>> sync_run("runs/a").sent       # the records the server missed
        37
        >>> sync_run("runs/a").sent       # again: nothing left
        0
    """
    folder = outbox_folder(path)
    if folder is None:
        raise SyncError(
            f"sync {path}: no MLflow outbox there ({storage.join(path, FOLDER, RECORDS)} is missing); "
            "give the folder a run with tracking on wrote (its --out), or a Tune trial's checkpoint folder"
        )
    box = Outbox(folder)
    try:
        box.lock()
    except OutboxBusy:
        error = SyncError(
            f"sync {path}: a running process (the run itself, or another sync) is sending it; wait for it"
        )
        error.exit_code = CANNOT_GO_ON
        raise error from None
    try:
        records = box.all_records()
        target = uri or next((r["uri"] for r in records if r["kind"] == "create"), None)
        if target is None:
            raise SyncError(f"sync {path}: the outbox has no 'create' record naming its tracking URI; pass --uri")
        bound_http_retries()
        _check(target, str(path))
        run_dir = folder.parent if folder.name == FOLDER else None

        def remember(run_id: str) -> None:
            if run_dir is not None and (run_dir / "config.yaml").is_file():
                atomic_write_text(run_dir / "mlflow_run_id", run_id + "\n")

        delivery = Delivery(box, target, on_run_id=remember)
        try:
            sent = delivery.send_pending()
        except Unreachable as e:
            error = SyncError(
                f"sync {path}: the MLflow server at {target} stopped answering ({e}) with "
                f"{box.undelivered()} records left; run the same command again"
            )
            error.exit_code = CANNOT_GO_ON
            raise error from e
        state = box.state()
        status = delivery.client.get_run(state.run_id).info.status if state.run_id else None
        return Synced(folder, target, state.run_id, sent, len(records), status)
    finally:
        box.close()
