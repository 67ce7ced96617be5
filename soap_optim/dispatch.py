"""Choosing the implementation of the per-step math, as torch.optim does with ``foreach``/``fused``.

* ``fused=None`` (default): the Triton kernels when every tensor is on CUDA and triton imports, else
  the batched pure-PyTorch twins (``soap_optim.kernels.reference``);
* ``fused=True``: the Triton kernels, or a clear error where they cannot run (CPU tensors are
  accepted only under ``TRITON_INTERPRET=1``);
* ``fused=False``: the batched pure-PyTorch twins.

``foreach=False`` bypasses both and runs the readable one-parameter-at-a-time path.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_ops(fused: Optional[bool], tensors: Iterable[torch.Tensor]):
    """The module-like namespace of batched step ops (factor_ema_, rotate_adam_, unrotate_apply_, adam_)."""
    from . import kernels

    if fused is None:
        fused = kernels.triton_available() and all(t.is_cuda for t in tensors)
    return kernels.get_ops(bool(fused))
