"""The fast paths (distmaml.fastpath) and their plain fallbacks give the same numbers."""

from __future__ import annotations

import torch

from distmaml.fastpath import adam


def _steps(monkeypatch, available: bool) -> torch.Tensor:
    monkeypatch.setattr(adam, "_available", available)
    gen = torch.Generator().manual_seed(1)
    flat = torch.randn(1000, dtype=torch.float64, generator=gen).requires_grad_()
    opt = torch.optim.Adam([flat], lr=0.01, fused=True)
    for _ in range(5):
        flat.grad = torch.randn(1000, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            adam.step(opt, flat)
    assert int(opt.state[flat]["step"]) == 5
    return flat.detach().clone()


def test_the_fused_kernel_is_probed_and_found_on_this_torch(monkeypatch):
    monkeypatch.setattr(adam, "_available", None)
    assert adam.is_available()  # torch 2.14's kernel steps as torch.optim.Adam does, to the bit


def test_the_kernel_and_the_plain_step_agree_to_the_bit(monkeypatch):
    assert torch.equal(_steps(monkeypatch, True), _steps(monkeypatch, False))


def test_an_optimizer_the_kernel_does_not_fit_takes_the_plain_step(monkeypatch):
    """AMSGrad (and any non-fused group) never reaches the kernel: the values are torch.optim.Adam's."""
    monkeypatch.setattr(adam, "_available", True)
    results = []
    for direct in (True, False):
        flat = torch.ones(10, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([flat], lr=0.1, amsgrad=True)
        for i in range(3):
            flat.grad = torch.full((10,), float(i + 1), dtype=torch.float64)
            with torch.no_grad():
                adam.step(opt, flat) if direct else opt.step()
        results.append(flat.detach())
    assert torch.equal(results[0], results[1])
