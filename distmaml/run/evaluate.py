"""``distmaml evaluate``: meta-test a checkpoint on held-out tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distmaml import storage
from distmaml.config import ConfigError, apply_override, config_from_dict
from distmaml.core.losses import METRIC_NAME
from distmaml.engine.protocol import ParamLayout
from distmaml.run.assembly import build_runner
from distmaml.run.checkpoint import load_checkpoint
from distmaml.run.results import reference_entry, summarize
from distmaml.run.trainer import check_scores
from distmaml.run.usercode import resolve_loss
from distmaml.storage import write_json


def evaluate_checkpoint(
    path: str | Path, *, tasks: int | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Meta-tests the newest checkpoint of ``path``; writes ``eval.json`` beside the run.

    Returns ``{"step", "meta_test", "meta_test_unadapted", "inner_test_steps"}`` and, for a recipe
    that states the figure it should reproduce, ``"reference"`` (``results.reference_entry``).
    """
    ckpt = load_checkpoint(path)
    data = ckpt.config
    for assignment in overrides or []:
        apply_override(data, assignment)
    data["workers"] = 0  # in this process, whichever engine trained it
    data.setdefault("engine", {})["reduce"] = "driver"
    config = config_from_dict(data)
    n = tasks or config.meta.test_tasks
    if n < 1:
        raise ConfigError(f"--tasks {n}: must be at least 1")
    runner = build_runner(config)
    flat = ParamLayout(ckpt.params).flatten(ckpt.params)
    scores = runner.evaluate(flat, "test", range(n), config.test_steps)
    check_scores(scores, config, f"meta-test of {ckpt.path}", config.test_steps)
    metric = METRIC_NAME[resolve_loss(config)]
    result = {
        "step": ckpt.step,
        "checkpoint": str(ckpt.path),
        "inner_test_steps": config.test_steps,
        "meta_test": summarize(scores.after, metric),
        "meta_test_unadapted": summarize(scores.before, metric),
        **reference_entry(config),
    }
    run_dir = storage.parent(storage.parent(ckpt.path))  # RUN_DIR/checkpoints/step_N.pt; a folder or a URI
    write_json(storage.join(run_dir, "eval.json"), result)
    return result
