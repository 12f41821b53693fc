"""Your own model and task family: ``package.module:attr`` import paths, or callables from Python.

``model.name`` and ``data.family`` take a built-in name or an import path
(uvicorn's and entry points' convention). The module is imported as ``python
-m`` would find it: from the current directory first, then the Python path.

* a model factory ``attr(config)`` returns a ``torch.nn.Module``. Torch's
  batch-norm layers become ``core.batchnorm.MetaBatchNorm`` (batch statistics
  only, as MAML normalises; running statistics dropped), and what the core
  cannot meta-train correctly is refused with the layer's name and the fix:
  dropout or other randomness (a task's gradient would not be a function of
  (seed, step, task id)), a layer that changes its buffers in the forward
  pass (adaptation would leave side effects the meta-gradient cannot see).
* a task family ``attr(config)`` returns an object with ``loss`` (``"mse"`` or
  ``"cross_entropy"``) and ``sample(split, step, task_ids)`` returning
  ``(support_x, support_y, query_x, query_y)``, task-first, a pure function of
  its arguments. ``UserTasks`` checks every batch it returns; ``check_run``
  checks, once on the driver, that a task does not depend on the other ids of
  the call (workers get different ranges) and that the network's output fits
  the targets (``mse`` would broadcast a mismatch silently).

Every refusal is a ``UserCodeError``: one line naming the setting and the fix.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distmaml.config import LOSS_NAMES, Config, is_import_path
from distmaml.core.batchnorm import with_batch_statistics
from distmaml.errors import DistmamlError
from distmaml.tasks.base import SPLITS, TaskFamily
from distmaml.typing import TaskBatch

ModelFactory = Callable[[Config], nn.Module]
FamilyFactory = Callable[[Config], Any]


class UserCodeError(DistmamlError, ValueError):
    """A user's model or task family that distmaml cannot use; the message names the setting and the fix."""


# -- import paths ------------------------------------------------------------------
def _on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as `python -m` does: the current directory first


def resolve(key: str, path: str) -> Any:
    """The object that ``path`` (``package.module:attr``) names, imported from the current directory or the path.

    Args:
        key: the setting, for the messages (``model.name``).
        path: ``package.module:attr``; ``attr`` may be dotted.
    """
    module_name, _, attr = path.partition(":")
    here = os.getcwd()
    _on_path(here)
    try:
        module: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise UserCodeError(
                f"{key} = {path!r}: no module {missing!r} in the current directory or on the Python path; "
                f"run from the folder that holds {missing.split('.')[0]}/ or pip install it"
            ) from None
        raise UserCodeError(
            f"{key} = {path!r}: importing {module_name} needs the module {missing!r}, which is not installed; "
            "install it (on every node of a cluster too)"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserCodeError(
                f"{key} = {path!r}: {module_name} has no attribute {attr!r}; it defines {', '.join(names) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(
            f"{key} = {path!r}: {attr} is a {type(obj).__name__}, not callable; name a function or class "
            "that takes the config"
        )
    return obj


def import_path_of(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a callable, as ``distmaml.train`` records it in the config (``model.name``)."""
    module = getattr(fn, "__module__", None) or "__main__"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    path = f"{module}:{qualname}"
    return path if is_import_path(path) else f"{module}:{type(fn).__qualname__}"


# -- the model ---------------------------------------------------------------------
def build_user_model(config: Config, factory: ModelFactory, label: str) -> nn.Module:
    """``factory(config)``, checked; torch's batch-norm layers replaced by the core's (batch statistics)."""
    model = factory(config)
    if not isinstance(model, nn.Module):
        raise UserCodeError(
            f"{label}: returned an object of type {type(model).__name__}, not a torch.nn.Module; return the "
            "network itself (for example nn.Sequential(...))"
        )
    if not any(True for _ in model.parameters()):
        raise UserCodeError(f"{label}: the network {type(model).__name__} has no parameters to meta-learn")
    for name, m in model.named_modules():
        p = getattr(m, "p", 0)
        if isinstance(m, nn.modules.dropout._DropoutNd) and p > 0 and m.training:  # the core never calls .eval()
            raise UserCodeError(
                f"{label}: layer {name!r} is {type(m).__name__}(p={p}): its random masks make a task's meta-gradient "
                "differ between runs and worker counts (tasks are a function of seed, step and task id); "
                "remove it or set p=0"
            )
    try:
        model, _ = with_batch_statistics(model)
    except ValueError as e:
        raise UserCodeError(f"{label}: {e}") from None
    return model


def check_model(model: nn.Module, x: Tensor, label: str) -> Tensor:
    """Runs ``model`` twice on ``x`` (one task's support inputs); refuses randomness and buffer updates.

    Returns the output. The layer named is the innermost whose output
    differs between two identical calls while its sub-layers' do not (its own
    forward draws random numbers), or whose buffer the call changed.
    """
    probe = copy.deepcopy(model)
    before = {k: b.clone() for k, b in probe.named_buffers()}
    calls: dict[str, list[tuple[list[Tensor], list[Tensor]]]] = {}  # per layer: (inputs, outputs) of each call

    def tensors(value: Any) -> list[Tensor]:
        items = value if isinstance(value, (tuple, list)) else [value]
        return [t.detach().clone() for t in items if torch.is_tensor(t)]

    def recorder(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, out: Any) -> None:
            calls.setdefault(name, []).append((tensors(args), tensors(out)))

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in probe.named_modules()]
    try:
        with torch.no_grad():
            first = probe(x)
            half = {n: len(v) for n, v in calls.items()}
            probe(x)
    finally:
        for h in handles:
            h.remove()
    for key, value in probe.named_buffers():
        if key in before and not torch.equal(before[key], value):
            owner, _, buffer = key.rpartition(".")
            layer = type(probe.get_submodule(owner)).__name__
            raise UserCodeError(
                f"{label}: layer {owner!r} ({layer}) changes its buffer {buffer!r} in the forward pass: adaptation "
                "would update it as a side effect; compute it from the input or keep it fixed "
                "(batch-norm: nn.BatchNorm1d/2d/3d, which distmaml replaces by batch statistics)"
            )

    def same(a: list[Tensor], b: list[Tensor]) -> bool:
        return len(a) == len(b) and all(s.shape == t.shape and torch.equal(s, t) for s, t in zip(a, b))

    # layers whose own forward is random: the same inputs, twice, gave different outputs
    random = [
        n
        for n, runs in calls.items()
        if any(same(a[0], b[0]) and not same(a[1], b[1]) for a, b in zip(runs[: half[n]], runs[half[n] :]))
    ]
    for name in random:
        if not any(o != name and (name == "" or o.startswith(name + ".")) for o in random):  # innermost
            where = f"layer {name!r} ({type(probe.get_submodule(name)).__name__})" if name else "its forward"
            raise UserCodeError(
                f"{label}: {where} gives different outputs for the same input and parameters: randomness makes a "
                "task's meta-gradient differ between runs and worker counts; remove it (dropout, noise) "
                "or draw it from the input"
            )
    if not torch.is_tensor(first):
        raise UserCodeError(f"{label}: the network returned a {type(first).__name__}; return one tensor")
    return first


# -- the task family ------------------------------------------------------------------
def _shapes(batch: Sequence[Any]) -> str:
    return ", ".join(str(tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__ for t in batch)


class UserTasks:
    """A user's task family, checked: ``sample`` returns a ``TaskBatch`` of tensors shaped as the contract says."""

    def __init__(self, family: Any, label: str) -> None:
        self.family = family
        self.label = label
        loss = getattr(family, "loss", None)
        if loss not in LOSS_NAMES:
            raise UserCodeError(
                f"{label}: its loss = {loss!r} is not one distmaml knows; set loss to 'mse' (regression) "
                "or 'cross_entropy' (classification)"
            )
        if not callable(getattr(family, "sample", None)):
            raise UserCodeError(f"{label}: {type(family).__name__} has no method sample(split, step, task_ids)")
        self.loss: str = loss

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> TaskBatch:
        ids = list(task_ids)
        out = self.family.sample(split, step, ids)
        self.check(out, split, step, ids)
        sx, sy, qx, qy = out
        if self.loss == "cross_entropy":
            sy, qy = sy.long(), qy.long()
        return TaskBatch(sx, sy, qx, qy)

    def check(self, out: Any, split: str, step: int, ids: list[int]) -> None:
        call = f"sample({split!r}, {step}, <{len(ids)} ids>)"
        want = "(support_x, support_y, query_x, query_y), each with the task dimension first"
        if not isinstance(out, (tuple, list)) or len(out) != 4 or not all(torch.is_tensor(t) for t in out):
            got = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
            raise UserCodeError(f"{self.label}: {call} returned {got}; return 4 tensors {want}")
        sx, sy, qx, qy = out
        bad = (
            any(t.dim() < 2 or t.shape[0] != len(ids) for t in out)
            or sx.shape[1] != sy.shape[1]
            or qx.shape[1] != qy.shape[1]
            or sx.shape[2:] != qx.shape[2:]
            or sy.shape[2:] != qy.shape[2:]
        )
        if bad:
            raise UserCodeError(
                f"{self.label}: {call} returned shapes {_shapes(out)}; want {want} "
                f"({len(ids)}), then examples (support_x and support_y alike, query_x and query_y alike)"
            )
        classes = self.loss == "cross_entropy"
        if classes and (sy.is_floating_point() or qy.is_floating_point() or sy.dim() != 2):
            raise UserCodeError(
                f"{self.label}: loss 'cross_entropy' needs integer class labels shaped (tasks, examples); "
                f"sample returned support_y {sy.dtype} {tuple(sy.shape)}"
            )
        if not classes and not (sy.is_floating_point() and qy.is_floating_point()):
            raise UserCodeError(f"{self.label}: loss 'mse' needs floating-point targets; sample returned {sy.dtype}")


def check_run(config: Config, model: nn.Module, family: TaskFamily, *, user_model: bool, user_family: bool) -> None:
    """Once, on the driver: the family's tasks are pure and independent of the other ids, the model fits them."""
    model_label = f"model.name = {config.model.name!r}"
    family_label = f"data.family = {config.data.family!r}"
    if user_family:
        for split in SPLITS:
            pair, again = family.sample(split, 0, [0, 1]), family.sample(split, 0, [0, 1])
            alone = family.sample(split, 0, [1])
            if not all(torch.equal(a, b) for a, b in zip(pair, again)):
                raise UserCodeError(
                    f"{family_label}: two calls of sample({split!r}, 0, [0, 1]) returned different tasks; sample must "
                    "be a pure function of (split, step, task_ids): seed a torch.Generator from them"
                )
            if not all(torch.equal(a[1:], b) for a, b in zip(pair, alone)):
                raise UserCodeError(
                    f"{family_label}: task 1 of sample({split!r}, 0, [0, 1]) differs from sample({split!r}, 0, [1]); "
                    "each task must depend only on (split, step, its own id), since workers sample different ranges"
                )
    batch = family.sample("train", 0, [0]).to(dtype=getattr(torch, config.precision))
    x, y = batch.support_x[0], batch.support_y[0]
    if user_model:
        out = check_model(model, x, model_label)
    else:
        with torch.no_grad():
            out = model(x)
    who = f"{model_label} with {family_label}"
    if family.loss == "mse" and tuple(out.shape) != tuple(y.shape):
        raise UserCodeError(
            f"{who}: the network's output {tuple(out.shape)} and a task's targets {tuple(y.shape)} differ in "
            "shape (mse would broadcast them); make them equal"
        )
    if family.loss == "cross_entropy" and (
        out.dim() != 2 or out.shape[0] != y.shape[0] or out.shape[1] <= int(y.max())
    ):
        raise UserCodeError(
            f"{who}: the network's output {tuple(out.shape)} is no score per class for the {y.shape[0]} examples "
            f"(labels up to {int(y.max())}); return (examples, classes)"
        )


def resolve_loss(config: Config, tasks: FamilyFactory | None = None) -> str:
    """Sets ``config.data.loss`` from the user's family (built here) unless already set; returns it."""
    if config.data.loss is None:
        factory = tasks or resolve("data.family", config.data.family)
        config.data.loss = UserTasks(factory(config), f"data.family = {config.data.family!r}").loss
    return config.data.loss
