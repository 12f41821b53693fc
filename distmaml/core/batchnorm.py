"""Batch-norm that always normalises with the statistics of the batch it sees.

MAML adapts and evaluates every task with the statistics of that task's own
examples (no running statistics), so this layer has weight and bias but no
buffers: it is a pure function of its input and parameters, which is what
``torch.func.functional_call`` and ``vmap`` need.

Two implementations give the same values and gradients:

* ``explicit``: mean and variance written as tensor ops. Its second-order
  gradient is right under ``vmap`` (torch 2.14's native batch-norm gave a wrong
  second-order gradient under ``vmap``; ``tests/test_batchnorm.py`` checks ours
  in float64 against finite differences and a loop).
* ``native``: ``torch.nn.functional.batch_norm`` with ``training=True`` and no
  running statistics: one fused kernel, fewer saved intermediates. Used on the
  per-task loop path, where no ``vmap`` is involved.

The implementation is a property of each layer, not a process-wide switch:
``with_implementation(model, name)`` returns a view of a network (its own
module objects, the same parameter tensors) whose layers use ``name``; the
core's batching picks the view per call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLEMENTATIONS = ("explicit", "native")


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, implementation: str = "explicit") -> Tensor:
    """Normalises ``x_NC...`` over every dimension but the channel one (dim 1)."""
    if implementation == "native":
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return centred * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


class MetaBatchNorm(nn.Module):
    """Batch-norm with batch statistics only, for 1-d (N, C) or 2-d (N, C, H, W) inputs."""

    def __init__(self, num_features: int, eps: float = 1e-5, implementation: str = "explicit") -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"batch-norm implementation {implementation!r}: allowed {IMPLEMENTATIONS}")
        self.eps = eps
        self.implementation = implementation
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.weight, self.bias, self.eps, self.implementation)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, batch statistics only, {self.implementation}"


def with_implementation(model: nn.Module, implementation: str) -> nn.Module:
    """``model`` with every ``MetaBatchNorm`` computing by ``implementation``; ``model`` itself is unchanged.

    Layers are shallow copies that share the parameter tensors (no memory);
    a model already in that implementation (or without batch-norm) is
    returned as it is. The copy serves ``functional_call``, which supplies
    the parameters anyway.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"batch-norm implementation {implementation!r}: allowed {IMPLEMENTATIONS}")
    if all(m.implementation == implementation for m in model.modules() if isinstance(m, MetaBatchNorm)):
        return model

    def view(module: nn.Module) -> nn.Module:
        clone = copy.copy(module)
        for key, value in module.__dict__.items():  # own parameter, buffer and hook dicts; tensors shared
            if isinstance(value, dict):
                clone.__dict__[key] = type(value)(value)
        clone.__dict__["_modules"] = {k: None if m is None else view(m) for k, m in module._modules.items()}
        if isinstance(clone, MetaBatchNorm):
            clone.implementation = implementation
        return clone

    return view(model)


def with_batch_statistics(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with each of torch's batch-norm layers replaced by a ``MetaBatchNorm``; the names replaced.

    ``nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) keep running statistics
    that their forward pass updates in place: during adaptation that is a
    side effect the meta-gradient cannot see, under ``vmap`` an error, and in
    eval mode a different normalisation from MAML's. The replacement keeps
    the layer's name, ``weight``, ``bias`` and ``eps`` (so parameter names and
    values are unchanged), drops the running statistics and momentum, and
    normalises every call by the statistics of the batch it sees, as MAML does.
    ``model`` is changed in place and returned.

    Raises:
        ValueError: a layer without a learnable scale and shift (``affine=False``)
            or not yet initialised (``LazyBatchNorm``): the message names it.
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.lazy import LazyModuleMixin

    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BatchNorm):
            continue
        where = f"layer {name!r} ({type(module).__name__})"
        if isinstance(module, LazyModuleMixin):
            raise ValueError(f"{where} is not initialised yet; give it num_features (nn.BatchNorm2d(C))")
        if not module.affine:
            raise ValueError(f"{where} has affine=False: MAML's batch-norm learns its scale and shift; use affine=True")
        bn = MetaBatchNorm(module.num_features, eps=module.eps)
        with torch.no_grad():
            bn.weight = nn.Parameter(module.weight.detach().clone())
            bn.bias = nn.Parameter(module.bias.detach().clone())
        if name:
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_module(leaf, bn)
        else:
            model = bn
        replaced.append(name)
    return model, replaced
