"""Summaries of per-task scores: mean and 95% interval (1.96 standard errors)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from distmaml.config import Config


def summarize(scores: Tensor, metric: str) -> dict[str, Any]:
    """``{"metric", "mean", "ci95", "tasks"}`` of per-task scores, as result.json holds it."""
    n = int(scores.numel())
    values = scores.double()
    mean = float(values.mean())
    std = float(values.std(unbiased=True)) if n > 1 else 0.0
    return {"metric": metric, "mean": mean, "ci95": 1.96 * std / math.sqrt(n), "tasks": n}


def describe(summary: dict[str, Any]) -> str:
    """``MSE 0.512 ± 0.041`` or ``accuracy 97.10% ± 0.32%`` (no ``±`` part where ``ci95`` is None)."""
    ci95 = summary.get("ci95")
    if summary["metric"] == "accuracy":
        spread = "" if ci95 is None else f" ± {100 * ci95:.2f}%"
        return f"accuracy {100 * summary['mean']:.2f}%{spread}"
    return f"MSE {summary['mean']:.4f}" + ("" if ci95 is None else f" ± {ci95:.4f}")


def reference_entry(config: Config) -> dict[str, Any]:
    """``{"reference": {"metric", "mean", "ci95", "source"}}`` for ``result.json`` and ``eval.json``
    when the config states a published figure (``reference`` in its recipe), else ``{}``.

    It sits beside ``meta_test``, whose keys stay as they are; both in the same units.
    """
    summary = config.reference.summary()
    return {} if summary is None else {"reference": summary}
