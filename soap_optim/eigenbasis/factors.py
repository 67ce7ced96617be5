"""Kronecker factors of Shampoo's preconditioner.

For a tensor G with axes 1..K, the factor of axis k accumulates the mode-k Gram matrix
C_k = G_(k) G_(k)^T of the mode-k unfolding (for a matrix, C_0 = G G^T and C_1 = G^T G):

    F_k <- beta * F_k + (1 - beta) * C_k
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def mode_gram(x: torch.Tensor, axis: int) -> torch.Tensor:
    """G_(axis) G_(axis)^T: the Gram matrix of the mode-``axis`` unfolding of ``x``."""
    unfolded = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return unfolded @ unfolded.T


def zero_factors(factor_dims: Sequence[Optional[int]], *, dtype, device) -> List[Optional[torch.Tensor]]:
    """One zero d x d factor per preconditioned axis, ``None`` for the others."""
    return [None if d is None else torch.zeros(d, d, dtype=dtype, device=device) for d in factor_dims]


def update_factors_(factors: Sequence[Optional[torch.Tensor]], grad: torch.Tensor, beta: float) -> None:
    """In place: F_k <- beta * F_k + (1 - beta) * C_k for every factor that exists.

    ``beta == 1`` is read as "accumulate": F_k <- F_k + C_k (AdaGrad-style sums, used by Shampoo).
    """
    for axis, factor in enumerate(factors):
        if factor is None:
            continue
        gram = mode_gram(grad, axis)
        if beta == 1.0:
            factor.add_(gram)
        else:
            factor.lerp_(gram, 1.0 - beta)
