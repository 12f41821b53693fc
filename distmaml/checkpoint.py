"""Checkpoints: written atomically, the newest K kept, loaded with ``weights_only``.

A checkpoint holds what a run needs to continue exactly where it stopped:
the step, the meta-parameters, the outer optimizer's state and the resolved
config. Tasks are a pure function of (seed, step, id), so the step is all the
samplers need.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmaml.typing import Params

_NAME = re.compile(r"^step_(\d{9})\.pt$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


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
    path: Path
    scheduler: dict[str, Any] | None = None
    """Meta learning-rate schedule state (``state_dict``), if the run has one."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(
    run_dir: Path,
    step: int,
    params: Params,
    optimizer: dict[str, Any],
    config: dict[str, Any],
    keep: int,
    scheduler: dict[str, Any] | None = None,
) -> Path:
    """Writes ``checkpoints/step_NNNNNNNNN.pt`` atomically and prunes all but the newest ``keep``."""
    import io

    buffer = io.BytesIO()
    payload = {
        "format": 1,
        "step": step,
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "optimizer": optimizer,
        "config": config,
        "scheduler": scheduler,
    }
    torch.save(payload, buffer)
    path = checkpoint_dir(run_dir) / f"step_{step:09d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _read(path: Path) -> Checkpoint:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(
        payload["step"], payload["config"], payload["params"], payload["optimizer"], path, payload.get("scheduler")
    )


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint:
    """The newest readable checkpoint of a run directory (or a checkpoint file).

    A corrupt newest checkpoint is reported on stderr and the one before it used.

    Example:
        >>> ckpt = distmaml.load_checkpoint("runs/sinusoid")
        >>> ckpt.step, ckpt.config["inner"]["lr"], list(ckpt.params)
    """
    target = Path(run_dir)
    if target.is_file():
        return _read(target)
    candidates = list_checkpoints(target)
    if not candidates:
        raise FileNotFoundError(
            f"{target}: no checkpoints found under {checkpoint_dir(target)}; "
            "pass the RUN_DIR given to 'distmaml train --out'"
        )
    for path in reversed(candidates):
        try:
            return _read(path)
        except Exception as e:  # a truncated or foreign file: fall back to the one before
            print(
                f"distmaml: checkpoint {path} is unreadable ({type(e).__name__}); using the one before it",
                file=sys.stderr,
            )
    raise FileNotFoundError(f"{target}: every checkpoint is unreadable")
