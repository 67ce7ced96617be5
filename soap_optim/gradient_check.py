"""The gradient check every step runs before anything is modified.

Two parts, both pure (nothing here writes to a parameter, a gradient or optimizer state):

* :func:`check_structure`: sparse, complex or wrongly shaped gradients are a ``ValueError``;
* :func:`effective_gradient`: the gradient the optimizer's math will use: in the state's dtype,
  ``orthograd`` applied, sign-flipped under ``maximize``. The finiteness check runs on *this* tensor, so
  a float64 gradient that overflows float32 state, or an ``orthograd`` that overflows, is caught;
* :func:`squared_norms` and :func:`confirm_nonfinite`: the screen. One ``_foreach_norm`` over all
  gradients, squared in float64 (a sum over shards or ranks of these is still exact enough to decide
  on, and cannot overflow for float32 gradients); only when a squared norm is not finite are the
  flagged gradients looked at entry by entry, with an overflow-free norm for the finite-but-huge ones.
  :func:`squared_norm_bound` is its shortcut on one process: one sum, which decides alone where it is
  finite and far below every threshold (the common case).

The base optimizer sums the squared norms over ranks (one small all-reduce when distributed) so that
every rank reaches the same verdict.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .extras import orthogonal_gradient


def describe(group_index: int, param_index: int, shape) -> str:
    return f"parameter {param_index} of param group {group_index} (shape {tuple(shape)})"


def check_structure(optimizer_name: str, where, param: torch.Tensor, grad: torch.Tensor) -> None:
    """ValueError for a sparse, complex or wrongly shaped gradient of ``param`` (``where()`` describes
    the parameter; it is called only on error)."""
    if grad.is_sparse:
        raise ValueError(f"{optimizer_name} does not support sparse gradients ({where()})")
    if grad.is_complex():
        raise ValueError(f"{optimizer_name} does not support complex gradients ({where()})")
    if grad.shape != param.shape:
        raise ValueError(f"gradient of shape {tuple(grad.shape)} does not match {where()}")


def effective_gradient(
    param: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype, *, orthograd: bool, maximize: bool
) -> torch.Tensor:
    """The gradient the math uses, as a new tensor where anything changes (``grad`` is never written)."""
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    if orthograd:
        grad = orthogonal_gradient(param, grad)
    if maximize:
        grad = -grad
    return grad


def squared_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """||g||^2 of every gradient as one float64 vector (inf or NaN where a gradient is not finite, or
    where its norm overflowed its own dtype: :func:`confirm_nonfinite` tells which)."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm(list(grads))).to(torch.float64).square()


# the shortcut's flat copy: tensors of at most this many entries, at most _FLAT_TOTAL entries in all
_FLAT_EACH, _FLAT_TOTAL = 2**16, 2**22


def squared_norm_bound(grads: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sum of every gradient's squared norm (a 0-d float64: not finite where a gradient is not), for
    host tensors, or None for device tensors (where ``_foreach_norm`` is one fused launch).

    The screen's shortcut: on the CPU ``_foreach_norm`` loops over the tensors, each a reduction of its
    own; the small ones here are copied into one flat tensor and reduced once (a copy of at most
    ``_FLAT_TOTAL`` entries), the others get their norm each. A sum well below every threshold the
    screen compares with bounds every gradient's norm below them too, as :func:`squared_norms` would
    compute it (the sum's rounding is far inside a factor 2), so the screen decides nothing differently."""
    if not grads or not all(grad.is_cpu for grad in grads):
        return None
    flat, rest, total = [], [], 0
    for grad in grads:
        size = grad.numel()
        if size <= _FLAT_EACH and total + size <= _FLAT_TOTAL:
            flat.append(grad)
            total += size
        else:
            rest.append(grad)
    norms = list(torch._foreach_norm(rest)) if rest else []
    if flat:
        norms.append(torch.linalg.vector_norm(torch._utils._flatten_dense_tensors(flat)))
    return torch.stack(norms).to(torch.float64).square().sum()


def exact_norm(grad: torch.Tensor) -> float:
    """||grad||_F without overflow: scaled by the largest magnitude first (finite ``grad`` only)."""
    if grad.numel() == 0:
        return 0.0
    scale = grad.abs().amax().to(torch.float64)
    if not scale > 0:
        return 0.0
    return float(torch.linalg.vector_norm(grad.to(torch.float64) / scale) * scale)


def confirm_nonfinite(grads: Sequence[torch.Tensor]) -> Tuple[List[bool], List[float]]:
    """For gradients whose squared norm was not finite: whether each has a NaN/Inf entry, and for the
    finite ones their true squared norm (a Python float; may be inf only beyond float64's range)."""
    bad, squares = [], []
    for grad in grads:
        finite = bool(torch.isfinite(grad).all())
        bad.append(not finite)
        squares.append(exact_norm(grad) ** 2 if finite else math.nan)
    return bad, squares
