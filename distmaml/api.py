"""``distmaml.train(...)``: the trainer from Python, with your model and tasks as callables (notebooks).

The same run as ``distmaml train``: one assembly (``distmaml.run.assembly``), the
same engines, checkpoints, meta-test and MLflow run. What differs is that
the network and the task family may be callables instead of import paths;
the config records them as ``module:qualname`` (``__main__:make_net`` for a
notebook's function).

Callables reach Ray workers inside the worker's task program, pickled by
cloudpickle: by value when defined in a notebook, a script's ``__main__`` or
inside a function; by reference otherwise, when their package is shipped as
the job's runtime environment (``distmaml.run.shipping``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distmaml import storage
from distmaml.config import Config, apply_override, config_from_dict, load_recipe
from distmaml.errors import DistmamlError
from distmaml.run.usercode import import_path_of


class TrainError(DistmamlError):
    """A bad argument of ``distmaml.train``; the message says what to change."""


def _config_data(config: Config | Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config_from_dict(dict(config)).to_dict())
    return load_recipe(config)


def train(
    config: Config | Mapping[str, Any] | str = "sinusoid",
    *,
    model: Callable[[Config], Any] | None = None,
    tasks: Callable[[Config], Any] | None = None,
    out: str | Path | None = None,
    workers: int | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
    resume: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Meta-trains and meta-tests one run; returns what ``result.json`` holds.

    Args:
        config: a ``Config``, a nested mapping, or a recipe name or YAML path
            (``distmaml train --config``); ignored with ``resume``.
        model: ``model(config) -> nn.Module``, instead of ``model.name``.
        tasks: ``tasks(config) ->`` an object with ``loss`` and
            ``sample(split, step, task_ids)``, instead of ``data.family``.
        out: run directory (folder or bucket URI), as ``--out``; None keeps nothing.
        workers: Ray workers (0: in this process); None keeps the config's.
        overrides: ``key=value`` strings, as ``--set``.
        address: Ray address (``local``, ``auto``, ``host:port``); default ``RAY_ADDRESS`` or ``local``.
        resume: continue the run in ``out`` (its own config; pass the same ``model`` and ``tasks``).
        progress: show the progress bar.

    Example:
        >>> def make(config):
        ...     return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
        >>> result = distmaml.train("sinusoid", model=make, workers=2, overrides=["meta.steps=500"])
        >>> result["meta_test"]["mean"]
    """
    from distmaml.run.assembly import assemble, with_absolute_uri
    from distmaml.tracking.probe import check_tracking

    run_dir = storage.location(str(out)) if out is not None else None
    if resume:
        from distmaml.run.checkpoint import load_checkpoint

        if run_dir is None:
            raise TrainError("distmaml.train(resume=True) needs out=RUN_DIR, the run to continue")
        if overrides or workers is not None:
            raise TrainError("resume=True continues the run with its own config; drop overrides and workers")
        cfg = config_from_dict(load_checkpoint(run_dir).config)
    else:
        data = _config_data(config)
        for assignment in overrides:
            apply_override(data, assignment)
        if workers is not None:
            data["workers"] = workers
        if model is not None:
            data.setdefault("model", {})["name"] = import_path_of(model)
        if tasks is not None:
            data.setdefault("data", {})["family"] = import_path_of(tasks)
            data["data"]["loss"] = None  # the family's own
        cfg = with_absolute_uri(config_from_dict(data))
        if run_dir is not None and storage.listdir(storage.join(run_dir, "checkpoints")):
            raise TrainError(f"out={run_dir}: already holds a run; pass resume=True or another folder")
    if run_dir is not None:
        storage.check_writable(run_dir, "out")
    check_tracking(cfg)
    run = assemble(cfg, address, model=model, tasks=tasks)
    return run.fit(run_dir, progress=progress, resume=resume)
