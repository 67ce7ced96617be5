"""Kronecker factors of Shampoo's preconditioner.

For a tensor G with axes 1..K, the factor of axis k accumulates the mode-k Gram matrix
C_k = G_(k) G_(k)^T of the mode-k unfolding (for a matrix, C_0 = G G^T and C_1 = G^T G):

    F_k <- beta * F_k + (1 - beta) * C_k
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ..precision import full_float32_matmul


def unfold(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The mode-``axis`` unfolding G_(axis): [x.shape[axis], everything else]."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


@full_float32_matmul()
def mode_gram(x: torch.Tensor, axis: int) -> torch.Tensor:
    """G_(axis) G_(axis)^T: the Gram matrix of the mode-``axis`` unfolding of ``x``."""
    unfolded = unfold(x, axis)
    return unfolded @ unfolded.T


def zero_factors(factor_dims: Sequence[Optional[int]], *, dtype, device) -> List[Optional[torch.Tensor]]:
    """One zero d x d factor per preconditioned axis, ``None`` for the others."""
    return [None if d is None else torch.zeros(d, d, dtype=dtype, device=device) for d in factor_dims]


def without_overflowing_grams(grad: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """``grad``, with zeros for each tensor (the axes after ``batch_dims``) whose Gram matrices could overflow.

    Every entry of every mode-k Gram matrix is at most ||G||_F^2 in magnitude, so ||G||_F^2 <= max/4 keeps
    the Gram matrices, their EMA and the EMA's intermediate F - C finite. A larger G (float32 entries of
    ~1e19 and up) would turn the factor into inf/NaN for good; it contributes a zero Gram matrix instead
    (F <- beta F: same eigenbasis). No host sync; an ordinary gradient comes back bit for bit.
    """
    dims = tuple(range(batch_dims, grad.dim()))
    if not dims:
        return grad
    norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    return torch.where(norm <= math.sqrt(torch.finfo(grad.dtype).max / 4), grad, grad.new_zeros(()))


def halve_saturating_sums_(factors: Sequence[Optional[torch.Tensor]]) -> None:
    """In place: F <- F / 2 for every factor whose largest diagonal entry exceeds half the dtype's max.

    For running sums (``beta == 1``), called before each accumulation: a Gram matrix adds at most max/4
    to an entry (see ``without_overflowing_grams``) and a PSD factor's largest entry is on its diagonal,
    so a sum whose entries are at most max/2 stays finite (<= 3/4 max). Halving is exact, and the
    inverse root is scale-equivariant up to its relative damping: it only weighs the history down
    against the gradients still to come. No host sync; a factor below the limit is multiplied by 1.
    """
    for factor in factors:
        if factor is not None and factor.numel():
            limit = torch.finfo(factor.dtype).max / 2
            factor.mul_(torch.where(factor.diagonal().amax() > limit, 0.5, 1.0).to(factor.dtype))


@full_float32_matmul()
def update_factors_(
    factors: Sequence[Optional[torch.Tensor]], grad: torch.Tensor, beta: float, guard_overflow: bool = True
) -> None:
    """In place: F_k <- beta * F_k + (1 - beta) * C_k for every factor that exists.

    ``beta == 1`` is read as "accumulate": F_k <- F_k + C_k (AdaGrad-style sums, used by Shampoo).
    A gradient whose Gram matrices could overflow counts as zero (see ``without_overflowing_grams``);
    ``guard_overflow=False`` skips that check for gradients already known to be small enough.
    """
    if guard_overflow and any(factor is not None for factor in factors):
        grad = without_overflowing_grams(grad)
    for axis, factor in enumerate(factors):
        if factor is None:
            continue
        unfolded = unfold(grad, axis)
        # the EMA in the product's epilogue: F <- beta F + (1 - beta) G_(k) G_(k)^T, one BLAS call
        factor.addmm_(unfolded, unfolded.T, beta=beta, alpha=1.0 - beta if beta != 1.0 else 1.0)
