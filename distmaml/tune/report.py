"""The outcome of a sweep: a table of trials sorted by the metric, and a plot of the metric per searched key."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmaml.tune.space import SweepSpec


@dataclass
class TrialRow:
    """One trial as the sweep's table shows it."""

    trial: str
    status: str
    """``done``, ``stopped`` (by the scheduler, before ``meta.steps``) or ``error``."""
    values: dict[str, Any]
    metric: float
    step: int
    checkpoint: str | None
    mlflow_run_id: str | None = None
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def sort_rows(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Best first; trials without a finite metric last."""

    def key(r: TrialRow) -> tuple[int, float]:
        if not math.isfinite(r.metric):
            return (1, 0.0)
        return (0, r.metric if mode == "min" else -r.metric)

    return sorted(rows, key=key)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: Sequence[TrialRow], spec: SweepSpec) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "status", *spec.keys, spec.metric, "step", "mlflow run"]
    body = [
        [
            r.trial,
            r.status,
            *(_fmt(r.values.get(k)) for k in spec.keys),
            _fmt(r.metric),
            str(r.step),
            r.mlflow_run_id or "-",
        ]
        for r in rows
    ]
    return header, body


def render_text(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """A fixed-width table for the terminal."""
    header, body = table(rows, spec)
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def write_markdown(rows: Sequence[TrialRow], spec: SweepSpec, path: Path) -> Path:
    header, body = table(rows, spec)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(rows: Sequence[TrialRow], spec: SweepSpec, path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", *spec.keys, spec.metric, "step", "resumed_from", "mlflow_run_id", "checkpoint"])
        for r in rows:
            w.writerow(
                [r.trial, r.status, *(r.values.get(k) for k in spec.keys), r.metric, r.step, r.resumed_from]
                + [r.mlflow_run_id or "", r.checkpoint or ""]
            )
    return path


def plot_metric_by_key(rows: Sequence[TrialRow], spec: SweepSpec, path: Path) -> Path:
    """One panel per searched key: each trial's metric against its value (log axis for loguniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = spec.dimensions
    fig, axes = plt.subplots(1, len(dims), figsize=(3.6 * len(dims), 3.2), squeeze=False)
    finite = [r for r in rows if math.isfinite(r.metric)]
    best = sort_rows(finite, spec.mode)[:1]
    for ax, dim in zip(axes[0], dims):
        values = [r.values.get(dim.key) for r in finite]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs: list[Any] = [float(v) for v in values if v is not None]
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        colors = ["C3" if r.status == "stopped" else "C0" for r in finite]
        ax.scatter(xs, [r.metric for r in finite], c=colors, s=22)
        if best:
            b = best[0].values.get(dim.key, 0.0)
            ax.scatter(
                [float(b) if numeric else xs[finite.index(best[0])]],
                [best[0].metric],
                marker="*",
                s=160,
                c="gold",
                edgecolors="k",
                zorder=3,
            )
        if dim.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{spec.name}: {spec.metric} per trial (star: best, red: stopped early)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
