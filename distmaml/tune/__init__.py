"""Ray Tune sweeps over ``tune_spaces/*.yaml``: one trial is one full trainer run.

Importing this package loads neither Ray nor MLflow; ``run_sweep`` does.
"""

from distmaml.tune.report import TrialRow, render_text
from distmaml.tune.space import SpaceError, SweepSpec, load_space, with_overrides
from distmaml.tune.sweep import SweepResult, run_sweep

__all__ = [
    "SpaceError",
    "SweepResult",
    "SweepSpec",
    "TrialRow",
    "load_space",
    "render_text",
    "run_sweep",
    "with_overrides",
]
