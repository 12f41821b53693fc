"""Summaries of per-task scores: mean and 95% interval (1.96 standard errors)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def summarize(scores: Tensor, metric: str) -> dict[str, Any]:
    """``{"metric", "mean", "ci95", "tasks"}`` of per-task scores, as result.json holds it."""
    n = int(scores.numel())
    values = scores.double()
    mean = float(values.mean())
    std = float(values.std(unbiased=True)) if n > 1 else 0.0
    return {"metric": metric, "mean": mean, "ci95": 1.96 * std / math.sqrt(n), "tasks": n}


def describe(summary: dict[str, Any]) -> str:
    """``MSE 0.512 ± 0.041`` or ``accuracy 97.10% ± 0.32%``."""
    if summary["metric"] == "accuracy":
        return f"accuracy {100 * summary['mean']:.2f}% ± {100 * summary['ci95']:.2f}%"
    return f"MSE {summary['mean']:.4f} ± {summary['ci95']:.4f}"
