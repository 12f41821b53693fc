"""The polyfit example from Python, as in a notebook: callables instead of import paths.

    cd examples && python train_polyfit.py

``make`` comes from the package (pickled by reference; the package is shipped
to the workers as the job's runtime environment); ``Cubics`` is defined here,
in ``__main__`` (pickled by value, as a notebook's class would be).
"""

from __future__ import annotations

import torch
from polyfit.nets import make
from polyfit.tasks import Quadratics

import distmaml


class Cubics(Quadratics):
    """The same family with a cubic term: y = d x^3 + a x^2 + b x + c."""

    def _task(self, split, step, task_id):  # type: ignore[no-untyped-def]
        sx, sy, qx, qy = super()._task(split, step, task_id)
        g = torch.Generator().manual_seed(task_id * 7919 + step * 31 + len(split))
        d = torch.rand((), generator=g) - 0.5
        return sx, sy + d * sx**3, qx, qy + d * qx**3


if __name__ == "__main__":
    result = distmaml.train(
        "sinusoid",  # the recipe's schedule and inner loop; the network and the tasks are ours
        model=make,
        tasks=Cubics,
        workers=2,
        out="runs/cubics",
        overrides=["meta.steps=300", "tracking.enabled=false"],
        progress=True,
    )
    mt, before = result["meta_test"], result["meta_test_unadapted"]
    print(f"meta-test MSE {mt['mean']:.3f} ± {mt['ci95']:.3f}; without adaptation {before['mean']:.3f}")
