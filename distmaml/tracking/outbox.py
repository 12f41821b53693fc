"""The run's tracking outbox: every MLflow record of a run, kept in its folder until MLflow has it.

``RUN_DIR/tracking/`` holds:

- ``outbox.jsonl``: one JSON record per line, appended in the order the run
  made them (the run's creation, its params, each batch of metrics, each
  folder of artifacts, the model, the end). A line is written by one
  ``write`` call and flushed to disk (``fsync``) before the call returns; a
  line without its newline (a crash in the middle of the write) was never
  acknowledged and is dropped when the file is next opened or read, so no
  half record is ever delivered.
- ``state.json``: how many records MLflow has (a prefix of the outbox, in
  order) and the MLflow run id once it is known, replaced atomically after
  every delivery. A record delivered but not yet counted (a crash between the
  two) is sent again: every kind of record is idempotent in MLflow (see
  ``delivery``).
- ``artifacts/NNNNNN/``: the files of artifact and model records.
- ``lock``: held (``flock``) by the one process delivering this outbox, so
  ``distmaml sync`` does not race the run itself.

Record kinds (field ``kind``): ``create`` (experiment, run name, tags, start
time, the ``key`` that makes creating idempotent, the tracking URI),
``status`` (``RUNNING`` again on resume), ``params``, ``metrics`` (rows of
``[key, value, timestamp_ms, step]``), ``artifacts`` (a folder and its path in
the run's artifacts), ``model`` (a pickled network), ``end`` (status, end time).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmaml import storage

FOLDER = "tracking"
"""The outbox's folder inside a run directory."""
RECORDS = "outbox.jsonl"
STATE = "state.json"
ARTIFACTS = "artifacts"
LOCK = "lock"


class OutboxBusy(RuntimeError):
    """Another process (the run itself, or another ``distmaml sync``) is delivering this outbox."""


@dataclass
class State:
    """What MLflow already has of an outbox."""

    delivered: int = 0
    """Records ``0 .. delivered - 1`` are in MLflow."""
    run_id: str | None = None


def outbox_folder(path: str | Path) -> Path | None:
    """The outbox folder of ``path``: a run directory, a Tune checkpoint folder or the outbox folder itself.

    ``path`` may be in a bucket (``s3://...``: a sweep's ``--storage``); the folder returned is then a local
    copy of the outbox folder alone (``storage.cached_dir``), never of the rest of a checkpoint (its model).
    """
    for candidate in (storage.join(path, FOLDER), storage.location(path)):
        if storage.is_file(storage.join(candidate, RECORDS)):
            return storage.cached_dir(candidate)
    return None


def _complete_lines(data: bytes) -> list[bytes]:
    """The complete lines of ``data``: a last line without its newline is a write that never finished."""
    end = data.rfind(b"\n")
    return data[: end + 1].splitlines() if end >= 0 else []


class Outbox:
    """An outbox folder: append records, read what is not yet delivered, count deliveries.

    Args:
        folder: the outbox folder (created if missing).

    Example:
        >>> box = Outbox(Path("runs/a/tracking"))
        >>> box.append({"kind": "metrics", "metrics": [["train_loss", 0.5, 1733212800000, 1]]})
        0
        >>> [r["kind"] for _, r in box.pending()]
        ['metrics']
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records = self.folder / RECORDS
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self.count = self._repair()
        """Records in the outbox (the sequence number of the next one)."""
        self._offset = 0
        """Bytes of ``outbox.jsonl`` that ``pending`` has read (its records are numbered ``0 .. _read-1``)."""
        self._read = 0
        self._unread: list[tuple[int, dict[str, Any]]] = []

    def _repair(self) -> int:
        """Drops a half-written last line; returns the number of complete records."""
        if not self.records.exists():
            self.records.touch()
            return 0
        data = self.records.read_bytes()
        lines = _complete_lines(data)
        keep = sum(len(line) + 1 for line in lines)
        if keep != len(data):
            os.truncate(self.records, keep)
        return len(lines)

    # -- writing ------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> int:
        """Writes ``record`` as one line, on disk before this returns; its sequence number."""
        if self._fd is None:
            self._fd = os.open(self.records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = json.dumps(record, separators=(",", ":"), allow_nan=True).encode() + b"\n"
        os.write(self._fd, line)
        os.fsync(self._fd)
        n = self.count
        self.count += 1
        return n

    def artifact_dir(self) -> tuple[Path, str]:
        """A fresh folder for the files of the next record, and its path relative to the outbox."""
        rel = f"{ARTIFACTS}/{self.count:06d}"
        folder = self.folder / rel
        if folder.exists():  # left by a crash before its record was written
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder, rel

    def drop_files(self, record: dict[str, Any]) -> None:
        """Deletes the files of a delivered artifact or model record (its folder under ``artifacts/``)."""
        rel = record.get("dir") or str(Path(record["file"]).parent)
        shutil.rmtree(self.folder / rel, ignore_errors=True)

    # -- reading ------------------------------------------------------------------
    def all_records(self) -> list[dict[str, Any]]:
        """Every complete record, in order."""
        return [json.loads(line) for line in _complete_lines(self.records.read_bytes())]

    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        """``(sequence number, record)`` of every complete record not yet delivered, in order.

        Reads only what was appended since the last call (a long run's outbox is read once).
        """
        delivered = self.state().delivered
        with self.records.open("rb") as f:
            f.seek(self._offset)
            lines = _complete_lines(f.read())
        for line in lines:
            self._offset += len(line) + 1
            self._unread.append((self._read, json.loads(line)))
            self._read += 1
        self._unread = [(n, r) for n, r in self._unread if n >= delivered]
        return list(self._unread)

    def undelivered(self) -> int:
        """Records not yet in MLflow."""
        return max(0, self.count - self.state().delivered)

    # -- the delivery state ---------------------------------------------------------
    def state(self) -> State:
        path = self.folder / STATE
        if not path.is_file():
            return State()
        data = json.loads(path.read_text())
        return State(int(data.get("delivered", 0)), data.get("run_id"))

    def save_state(self, state: State) -> None:
        """Replaces ``state.json`` atomically (a crash leaves the old one or the new one)."""
        path = self.folder / STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"delivered": state.delivered, "run_id": state.run_id}) + "\n")
        os.replace(tmp, path)

    # -- the delivering process -------------------------------------------------------
    def lock(self) -> None:
        """Makes this process the outbox's only deliverer; ``OutboxBusy`` if another one is."""
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxBusy(f"{self.folder}: another process is sending this outbox") from None
        self._lock_fd = fd

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
