"""How the tasks of a batch are batched: ``vmap`` over tasks or a loop.

The choice is measured, not guessed (``distmaml bench`` prints both). On the
2-core CPU this project is developed on (torch 2.14, 1 thread):

* sinusoid MLP 1-40-40-1, 25 tasks: ``vmap`` about 10x the tasks/s of a loop.
* 4-conv net, 64 filters, 5-way 1-shot with 15 queries: ``vmap`` 2.6x slower
  than a loop, with 17x the peak memory (every task's activations and
  double-backward graph live at once).

So networks with convolutions run as a loop over tasks, others under
``vmap``. On a GPU ``vmap`` would fill the device better, but the memory of
the whole meta-batch's second-order graph at once is the usual reason MAML
runs out of memory; we keep the loop there too until measured on a GPU.
``core.batching`` in the config (``auto`` | ``vmap`` | ``loop``) forces it.
"""

from __future__ import annotations

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def choose_batching(model: nn.Module, device: torch.device | str) -> str:
    """``"loop"`` for convolutional networks, ``"vmap"`` otherwise (see module docstring)."""
    del device  # the measured rule is the same on CPU; see module docstring for GPUs
    if any(isinstance(m, _CONV) for m in model.modules()):
        return "loop"
    return "vmap"
