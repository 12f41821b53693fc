"""Adam's step on one flat tensor through torch's fused kernel, without ``Optimizer.step`` around it.

``Optimizer.step`` spends tens of microseconds in Python around the fused
kernel (its profiler hook, device and capture checks, grouping the one
tensor). On the sinusoid MLP, whose meta-step takes a few milliseconds, that
was about 5% of the step (9 us of kernel against about 60 us in all; under
load 9 against 160 us); on ResNet-12's 12.5M parameters it is lost in the
kernel's own time (1.06x, within noise, on a CPU). The kernel,
``torch._fused_adam_``, is private: ``is_available`` probes it once per
process against ``torch.optim.Adam``'s own fused step, and ``step`` falls
back to ``optimizer.step()`` wherever the probe fails or the optimizer is
not a single fused, non-AMSGrad group whose state exists. State stays in the
optimizer (``step``, ``exp_avg``, ``exp_avg_sq``), so ``state_dict``, the
learning-rate schedule and resuming are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

_available: bool | None = None


def _kernel_step(optimizer: torch.optim.Optimizer, flat: Tensor) -> None:
    group = optimizer.param_groups[0]
    state = optimizer.state[flat]
    beta1, beta2 = group["betas"]
    grad = flat.grad
    assert grad is not None
    state["step"].add_(1)
    torch._fused_adam_(
        [flat],
        [grad],
        [state["exp_avg"]],
        [state["exp_avg_sq"]],
        [],
        [state["step"]],
        amsgrad=False,
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


def _probe() -> bool:
    """Three steps of a small float64 Adam, by ``Optimizer.step`` and by the kernel: the same to the bit."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(37, dtype=torch.float64, generator=gen)
    grads = [torch.randn(37, dtype=torch.float64, generator=gen) for _ in range(4)]
    results = []
    for direct in (False, True):
        flat = start.clone().requires_grad_()
        opt = torch.optim.Adam([flat], lr=0.01, fused=True)
        for i, g in enumerate(grads):
            flat.grad = g.clone()
            with torch.no_grad():
                if direct and i > 0:
                    _kernel_step(opt, flat)
                else:
                    opt.step()
        results.append(flat.detach())
    return torch.equal(results[0], results[1])


def is_available() -> bool:
    """Whether torch's fused Adam kernel is there and steps exactly as ``torch.optim.Adam`` does (cached)."""
    global _available
    if _available is None:
        try:
            _available = hasattr(torch, "_fused_adam_") and _probe()
        except (RuntimeError, TypeError):  # another torch's signature: the plain step
            _available = False
    return _available


def step(optimizer: torch.optim.Optimizer, flat: Tensor) -> None:
    """``optimizer.step()`` for an Adam over the one tensor ``flat``; the kernel directly where it may be.

    The first step goes through ``optimizer.step()``, which sets the state up.
    """
    group = optimizer.param_groups[0]
    direct = len(optimizer.param_groups) == 1 and group["fused"] and not group["amsgrad"]
    if direct and optimizer.state.get(flat) and flat.grad is not None and is_available():
        _kernel_step(optimizer, flat)
    else:
        optimizer.step()
