"""distmaml: MAML and its relatives, meta-trained across a Ray cluster.

The core is importable on its own and loads only torch:

    >>> import distmaml
    >>> mg = distmaml.meta_gradient(model, None, sx, sy, qx, qy, inner_lr=0.01, inner_steps=1, loss="mse")

and the trainer from Python, with your own network and tasks as callables:

    >>> result = distmaml.train("sinusoid", model=make_net, tasks=make_tasks, workers=2)
"""

from distmaml.core import meta_gradient
from distmaml.core.outer import MetaGradient

__version__ = "0.1.0"

__all__ = ["MetaGradient", "__version__", "load_checkpoint", "meta_gradient", "train"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # Lazy, so that ``import distmaml.core`` stays light.
    if name == "load_checkpoint":
        from distmaml.run.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "train":
        from distmaml.api import train

        return train
    raise AttributeError(f"module 'distmaml' has no attribute {name!r}")
