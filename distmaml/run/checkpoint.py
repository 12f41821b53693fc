"""Checkpoints: written atomically, the newest K kept, loaded with ``weights_only``.

A checkpoint holds what a run needs to continue exactly where it stopped:
the step, the meta-parameters, the outer optimizer's state and the resolved
config. Tasks are a pure function of (seed, step, id), so the step is all the
samplers need.

Run directories may be local folders or object-store URIs (``s3://bucket/runs/a``);
every read and write goes through ``distmaml.storage``.
"""

from __future__ import annotations

import io
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from distmaml import storage
from distmaml.errors import DistmamlError
from distmaml.storage import Location
from distmaml.typing import Params

_NAME = re.compile(r"^step_(\d{9})\.pt$")

PathLike = str | os.PathLike[str]


FORMAT = 1
"""The checkpoint format this distmaml writes and reads (``payload["format"]``)."""

KEYS = ("format", "step", "params", "optimizer", "config")
"""What a distmaml checkpoint holds, at least."""


class CheckpointError(DistmamlError, FileNotFoundError):
    """A run directory without a readable checkpoint; the message says what to pass instead."""


class CheckpointVersionError(CheckpointError):
    """A distmaml checkpoint in another format than this version's: never skipped for an older one."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns."""

    step: int
    """Meta-steps completed."""
    config: dict[str, Any]
    """The resolved config as a nested mapping."""
    params: Params
    """Meta-parameters, name -> tensor."""
    optimizer: dict[str, Any]
    """Outer optimizer state (``state_dict``)."""
    path: Location
    """The file read: a ``Path``, or a URI string for runs on an object store."""
    scheduler: dict[str, Any] | None = None
    """Meta learning-rate schedule state (``state_dict``), if the run has one."""


def checkpoint_dir(run_dir: PathLike) -> Location:
    return storage.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: PathLike) -> list[Location]:
    """Checkpoint files of a run (local paths or URIs), oldest first."""
    folder = checkpoint_dir(run_dir)
    return [storage.join(folder, n) for n in storage.listdir(folder) if _NAME.match(n)]


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    params: Params,
    optimizer: dict[str, Any],
    config: dict[str, Any],
    keep: int,
    scheduler: dict[str, Any] | None = None,
) -> Location:
    """Writes ``checkpoints/step_NNNNNNNNN.pt`` atomically and prunes all but the newest ``keep``."""
    buffer = io.BytesIO()
    payload = {
        "format": FORMAT,
        "step": step,
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "optimizer": optimizer,
        "config": config,
        "scheduler": scheduler,
    }
    torch.save(payload, buffer)
    path = storage.join(checkpoint_dir(run_dir), f"step_{step:09d}.pt")
    storage.write_bytes_atomic(path, buffer.getvalue())
    for old in list_checkpoints(run_dir)[:-keep]:
        storage.delete(old)
    return path


def _read(path: Location) -> Checkpoint:
    """One checkpoint file; ``CheckpointError`` for a file distmaml did not write or cannot read."""
    source = path if isinstance(path, os.PathLike) else io.BytesIO(storage.read_bytes(path))
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's failures vary by damage: unpickling, zip, type, EOF errors
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: unreadable, not a torch file it can load ({type(e).__name__}: {first}); {_PASS}"
        ) from None
    if not isinstance(payload, dict) or "format" not in payload:
        what = type(payload).__name__ if not isinstance(payload, dict) else "a dict without 'format'"
        raise CheckpointError(f"{path}: not a distmaml checkpoint (it holds {what}); {_PASS}")
    if payload["format"] != FORMAT:
        raise CheckpointVersionError(
            f"{path}: a checkpoint of format {payload['format']!r}, this distmaml reads format {FORMAT}; "
            "continue or evaluate it with the distmaml version that wrote it"
        )
    missing = [k for k in KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a distmaml checkpoint (no {', '.join(missing)}); {_PASS}")
    return Checkpoint(
        payload["step"], payload["config"], payload["params"], payload["optimizer"], path, payload.get("scheduler")
    )


_PASS = "pass a RUN_DIR written by 'distmaml train --out' or one of its checkpoints/step_*.pt"


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint:
    """The newest readable checkpoint of a run directory (or a checkpoint file).

    A corrupt newest checkpoint is reported on stderr and the one before it
    used; one of another format (``CheckpointVersionError``) stops the load,
    since the run went on with another version of distmaml.

    Example:
        >>> ckpt = distmaml.load_checkpoint("runs/sinusoid")
        >>> ckpt.step, ckpt.config["inner"]["lr"], list(ckpt.params)
        >>> distmaml.load_checkpoint("s3://bucket/runs/sinusoid").step
    """
    target = storage.location(run_dir)
    if storage.is_file(target):
        return _read(target)
    candidates = list_checkpoints(target)
    if not candidates:
        raise CheckpointError(
            f"{target}: no checkpoints found under {checkpoint_dir(target)}; "
            "pass the RUN_DIR given to 'distmaml train --out'"
        )
    for path in reversed(candidates):
        try:
            return _read(path)
        except CheckpointVersionError:
            raise
        except CheckpointError as e:  # a truncated or foreign file: fall back to the one before
            print(f"distmaml: {e}; using the one before it", file=sys.stderr)
    raise CheckpointError(f"{target}: every checkpoint is unreadable")


RUN_FILES = ("config.yaml", "result.json", "eval.json", "mlflow_run_id")
"""The files a run writes at the top of its folder (besides ``checkpoints/``)."""


def foreign_run_file(run_dir: PathLike) -> str | None:
    """The first of ``RUN_FILES`` in ``run_dir`` that distmaml did not write, or None.

    A ``config.yaml`` is distmaml's when it loads as a distmaml config; the
    other files are distmaml's only beside such a ``config.yaml``. A new run in
    that folder would overwrite them.
    """
    import yaml

    from distmaml.config import config_from_dict

    present = [n for n in RUN_FILES if storage.is_file(storage.join(run_dir, n))]
    if not present:
        return None
    if "config.yaml" not in present:
        return present[0]
    try:
        config_from_dict(yaml.safe_load(storage.read_bytes(storage.join(run_dir, "config.yaml"))))
    except Exception:  # not YAML, not a mapping, or keys and values distmaml does not know
        return "config.yaml"
    return None
