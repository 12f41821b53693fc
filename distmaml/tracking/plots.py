"""PNG plots logged as MLflow artifacts: the learning curve, sinusoid tasks before and after adaptation.

matplotlib runs on the Agg backend (no display); each function writes one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distmaml.core import Algorithm, TaskProgram
from distmaml.typing import Params


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(
    train: Sequence[tuple[int, float, float]], val: Sequence[tuple[int, float]], metric: str, path: Path
) -> Path:
    """Meta-train loss and metric per step (smoothed) and the validation metric, one figure."""
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        steps = [s for s, _, _ in train]
        for ax, column, label in ((ax_loss, 1, "meta-train loss"), (ax_metric, 2, f"meta-train {metric}")):
            values = torch.tensor([row[column] for row in train], dtype=torch.float64)
            ax.plot(steps, values.numpy(), alpha=0.3, color="C0", linewidth=0.8)
            window = max(1, len(values) // 50)
            if window > 1:
                smooth = values.unfold(0, window, 1).mean(1)
                ax.plot(steps[window - 1 :], smooth.numpy(), color="C0", label=f"{label} (mean of {window})")
            else:
                ax.lines[-1].set_label(label)
    if val:
        ax_metric.plot([s for s, _ in val], [v for _, v in val], "o-", color="C3", label=f"validation {metric}")
    for ax, title in ((ax_loss, "query loss after adaptation"), (ax_metric, metric)):
        ax.set_xlabel("meta-step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if metric == "mse" or ax is ax_loss:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sinusoid_adaptation(
    network: nn.Module, algorithm: Algorithm, family: Any, params: Params, steps: int, path: Path, tasks: int = 4
) -> Path:
    """A few meta-test sinusoid tasks: the true curve, the support points, the
    meta-learned prediction before adaptation and after ``steps`` inner steps.

    The adaptation is the algorithm's own (``TaskProgram.predictions``), the
    one the meta-test scores: learned rates, ANIL's head, per-step slots.
    ``family`` is a ``SinusoidTasks`` (``sample_one`` gives each task's amplitude and phase).
    """
    plt = _pyplot()
    program = TaskProgram(network, algorithm)
    dtype = next(network.parameters()).dtype
    params = {k: v.detach().to("cpu", dtype) for k, v in params.items()}
    grid = torch.linspace(-5.0, 5.0, 200, dtype=dtype).unsqueeze(-1)
    fig, axes = plt.subplots(1, tasks, figsize=(3.2 * tasks, 3.0), sharey=True)
    for i, ax in enumerate(axes):
        amp, phase, sx, sy, _, _ = family.sample_one("test", 0, i)
        sx, sy = sx.to(dtype), sy.to(dtype)
        before, after = program.predictions(params, sx, sy, grid, steps)
        g = grid.squeeze(-1).numpy()
        ax.plot(g, (amp * torch.sin(grid - phase)).squeeze(-1).numpy(), color="k", label="task")
        ax.plot(g, before.squeeze(-1).numpy(), "--", color="C0", label="before adaptation")
        ax.plot(g, after.squeeze(-1).numpy(), color="C3", label=f"after {steps} steps")
        ax.scatter(sx.squeeze(-1).numpy(), sy.squeeze(-1).numpy(), color="C2", zorder=3, s=14, label="support")
        ax.set_title(f"test task {i}: A={float(amp):.2f}, φ={float(phase):.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
