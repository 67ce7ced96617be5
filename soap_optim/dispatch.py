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
from typing import Iterable, Optional, Sequence

import torch

from .eigenbasis import update_factors_, without_overflowing_grams


def wants_kernels(fused: Optional[bool], states: Iterable[torch.Tensor]) -> bool:
    """Whether the Triton kernels should run, given the optimizer-state tensors they would update."""
    if fused is not None:
        return bool(fused)
    from . import kernels

    # the kernels keep float32 state; float64 state (float64 parameters, or state_dtype) takes the twins.
    # Decided for the whole group before anything runs, so that no launch can fail halfway through a
    # step: tensors spread over several devices also take the twins.
    states = list(states)
    return (
        all(s.is_cuda and s.dtype == torch.float32 for s in states)
        and len({s.device for s in states}) <= 1
        and kernels.triton_available()
    )


def get_ops(fused: bool):
    """The namespace of batched step ops (factor_ema_, rotate_adam_, unrotate_apply_, adam_).

    ``fused=True`` raises RuntimeError where the Triton kernels cannot run.
    """
    from . import kernels

    return kernels.get_ops(fused)


def update_factors_maybe_fused_(
    factors: Sequence[Optional[torch.Tensor]], grad: torch.Tensor, beta: float, fused: Optional[bool],
    guard_overflow: bool = True,
) -> None:
    """F_k <- beta F_k + (1 - beta) C_k for one tensor: a matrix's factors through the fused factor kernel
    when ``fused`` picks the kernels, everything else through the core's ``update_factors_``."""
    present = [f for f in factors if f is not None]
    if grad.dim() == 2 and present and wants_kernels(fused, present):
        rows = [None if f is None else f.unsqueeze(0) for f in factors]  # views: updated in place
        if guard_overflow:
            grad = without_overflowing_grams(grad)
        get_ops(True).factor_ema_(rows[0], rows[1], grad.unsqueeze(0), beta)
    else:
        update_factors_(factors, grad, beta, guard_overflow)


def factor_ema_for(fused: Optional[bool], factors: Sequence[Optional[torch.Tensor]]):
    """The factor op (``factor_ema_(factor, None, x, beta)``: F <- beta F + (1 - beta) x x^T on [B, ...] stacks)
    that ``fused`` picks for these factors: the Triton kernel's or its PyTorch twin."""
    present = [f for f in factors if f is not None]
    return get_ops(bool(present) and wants_kernels(fused, present)).factor_ema_


def fused_problem(tensors: Sequence[torch.Tensor], state_dtype: torch.dtype) -> Optional[str]:
    """Why ``fused=True`` cannot run for these parameters with state in ``state_dtype``, or None."""
    from . import kernels

    if state_dtype != torch.float32:
        return f"the fused kernels keep float32 state, and this group's state is {state_dtype}"
    if not kernels.triton_available():
        return "Triton cannot be imported"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"the fused kernels step one device per param group, and this group spans {sorted(map(str, devices))}"
    on_cpu = [t for t in tensors if not t.is_cuda]
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "the fused kernels need CUDA tensors (or Triton's CPU interpreter, TRITON_INTERPRET=1, for tests), "
            f"and a parameter is on {on_cpu[0].device}"
        )
    return None


def resolve_ops(fused: Optional[bool], states: Iterable[torch.Tensor]):
    """The batched step ops for the given optimizer-state tensors under the ``fused`` setting."""
    return get_ops(wants_kernels(fused, states))
