"""Choosing the implementation of the per-step math, as torch.optim does with ``foreach``/``fused``.

* ``fused=None`` (default): the Triton kernels when every tensor is on CUDA and triton imports, else
  the batched pure-PyTorch twins (``soap_optim.kernels.reference``);
* ``fused=True``: the Triton kernels, or a clear error where they cannot run (CPU tensors are
  accepted only under ``TRITON_INTERPRET=1``);
* ``fused=False``: the batched pure-PyTorch twins.

``foreach=False`` bypasses both and runs the readable one-parameter-at-a-time path.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def wants_kernels(fused: Optional[bool], states: Iterable[torch.Tensor]) -> bool:
    """Whether the Triton kernels should run, given the optimizer-state tensors they would update."""
    if fused is not None:
        return bool(fused)
    from . import kernels

    # the kernels keep float32 state; float64 state (float64 parameters, or state_dtype) takes the twins
    states = list(states)
    return all(s.is_cuda and s.dtype == torch.float32 for s in states) and kernels.triton_available()


def get_ops(fused: bool):
    """The namespace of batched step ops (factor_ema_, rotate_adam_, unrotate_apply_, adam_).

    ``fused=True`` raises RuntimeError where the Triton kernels cannot run.
    """
    from . import kernels

    return kernels.get_ops(fused)


def resolve_ops(fused: Optional[bool], states: Iterable[torch.Tensor]):
    """The batched step ops for the given optimizer-state tensors under the ``fused`` setting."""
    return get_ops(wants_kernels(fused, states))
