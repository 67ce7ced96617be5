"""KL factor updates (Lin et al., "Understanding and Improving Shampoo and SOAP via KL Minimization").

Shampoo's and SOAP's factors F_k are fitted one at a time to the gradient's second moment; fitting
their Kronecker product to it jointly (minimizing a KL divergence between Gaussians) gives updates in
which each factor's statistic is whitened by the inverses of all the others. For a tensor G with N
entries and axes 1..K (a matrix G, m x n: L and R):

    F_k <- beta F_k + (1 - beta) d_k / N * G_(k) (x)_{j != k} F_j^{-1} G_(k)^T
    (a matrix:  L <- beta L + (1 - beta)/n G R^{-1} G^T,   R <- beta R + (1 - beta)/m G^T L^{-1} G)

with every F_j^{-1} taken before this step's update (simultaneous), an axis without a factor counting
as the identity (its size still counts in N / d_k, the product of the other axes' sizes). The inverse
never has to be formed: with a whitener W_j (any matrix with W_j W_j^T = F_j^{-1}),
G_(k) (x)_{j != k} F_j^{-1} G_(k)^T is the plain Gram matrix of the mode-k unfolding of
G x_{j != k} W_j^T, so the update is the Gram path's EMA on a whitened gradient. SOAP whitens with
its eigenbasis and eigenvalue estimates, W = Q diag(lambda)^{-1/2} (:func:`eigenbasis_whiteners`);
Shampoo with its inverse square roots (W = F^{-1/2}, symmetric).

First update. Before any factor exists, the update starts from the isotropic factors F_j = rho I with
rho = ms^{1/P} (ms = ||G||_F^2 / N the first gradient's mean square, P the number of factors): the
balanced Kronecker factorization of that mean square. So the first update is an ordinary KL update,

    F_k = beta rho I + (1 - beta) d_k / N G_(k) G_(k)^T / rho^{P-1},

whose eigenvectors are those of the plain Gram matrix and whose mean eigenvalue is rho. The scale is
not cosmetic even though SOAP only uses the eigenbasis: for stationary gradients with
E[g g^T] = A (x) B and factors a A, b B, the next factors are (beta a + (1 - beta)/b) A and
(beta b + (1 - beta)/a) B, so only a b = 1 is at rest (the split between the factors is free). A start
with a b far below 1 makes the next update overwrite the first gradient; one far above 1 makes every
later term negligible, freezing the first gradient's eigenbasis for ~log(a b)/(1 - beta) steps (a
plain Gram matrix, the others taken as the identity, is off by ms^{(P-1)/P}; zero eigenvalues clamped
to eps, by 1/eps). The isotropic part matters as much: a Gram matrix of one gradient is singular (rank
<= N / d_k), and the next update whitens by its inverse, so any component of the next gradient
outside its range would count 1/EIGENVALUE_FLOOR times (measured: eigenvalues 1e4 times the others'
after 8 steps of a 6 x 5 matrix). With beta rho I the smallest eigenvalue starts at beta rho and the
prior fades as beta^t, while the gradients fill the range (with beta = 1, Shampoo's running sums, the
update adds instead: F_k = rho I + ..., and the prior stays, as Shampoo's eps I does). A zero gradient leaves
the factors at zero.

Eigenvalue estimates (SOAP): lambda_k = diag(Q_k^T F_k Q_k) at the last basis computation (the
eigh at the first basis; at a refresh, the power step's estimates diag(O^T F O) in the old basis
O, re-ordered like the new columns). A non-finite estimate keeps the previous one; before inverting,
each is clamped below at :data:`EIGENVALUE_FLOOR` times its matrix's largest (all zero: the identity).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ..precision import full_float32_matmul
from .factors import without_overflowing_grams
from .projection import project

#: Smallest eigenvalue used in an inverse, relative to the largest of its matrix: relative (as Shampoo's
#: ``matrix_eps``) so that the update does not depend on the gradients' scale, and the same 1e-6 as
#: Shampoo's default (1 / the largest condition number of an inverse; above float32 eigenvalue rounding).
EIGENVALUE_FLOOR = 1e-6

Factors = Sequence[Optional[torch.Tensor]]


@full_float32_matmul()
def eigenvalue_estimates(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """diag(Q^T F Q) for a [..., d, d] factor and basis: [..., d], as a refresh estimates them from its
    power step (``bases.BasisRefresh.estimates``, the same ops): for the bases that no refresh made."""
    return (basis * (factor @ basis)).sum(dim=-2)


def new_eigenvalues(
    eigenvalues: Sequence[Optional[torch.Tensor]],
    estimates: Sequence[Optional[torch.Tensor]],
    orders: Sequence[Optional[torch.Tensor]],
) -> List[Optional[torch.Tensor]]:
    """Each ``estimates[k]`` re-ordered by ``orders[k]`` (None: as is), entry by entry where the estimate is
    finite, ``eigenvalues[k]`` elsewhere (a non-finite factor keeps its basis and its old estimates)."""
    out: List[Optional[torch.Tensor]] = []
    for values, estimate, order in zip(eigenvalues, estimates, orders):
        if values is None or estimate is None:
            out.append(values)
            continue
        if order is not None:
            estimate = torch.gather(estimate, -1, order)
        out.append(torch.where(torch.isfinite(estimate), estimate, values))
    return out


def inverse_sqrt_eigenvalues(eigenvalues: torch.Tensor) -> torch.Tensor:
    """max(lambda, EIGENVALUE_FLOOR * max(lambda))^{-1/2} per [..., d] row; a row without a positive
    finite entry gives ones (no information about that axis: no whitening)."""
    values = torch.where(torch.isfinite(eigenvalues), eigenvalues, torch.zeros_like(eigenvalues))
    largest = values.amax(dim=-1, keepdim=True)
    floor = (largest * EIGENVALUE_FLOOR).clamp_min(torch.finfo(values.dtype).tiny)
    scales = torch.maximum(values, floor).rsqrt()
    return torch.where(largest > 0, scales, torch.ones_like(scales))


def eigenbasis_whiteners(
    bases: Sequence[Optional[torch.Tensor]], eigenvalues: Sequence[Optional[torch.Tensor]]
) -> List[Optional[torch.Tensor]]:
    """W_k = Q_k diag(lambda_k)^{-1/2} (columns scaled), so that W_k W_k^T = Q_k diag(lambda_k)^{-1} Q_k^T."""
    return [
        None if basis is None else basis * inverse_sqrt_eigenvalues(values).unsqueeze(-2)
        for basis, values in zip(bases, eigenvalues)
    ]


def whitened_unfoldings(
    grad: torch.Tensor, whiteners: Sequence[Optional[torch.Tensor]], factors: Factors
) -> List[Optional[torch.Tensor]]:
    """Per factor k of a [B, *shape] stack: sqrt(d_k / N) times the mode-k unfolding of G x_{j != k} W_j^T,
    [B, d_k, N / d_k], zeroed per member where its Gram matrix could overflow (so that its Gram matrix is
    the KL statistic); None where there is no factor. The whitening can make a small gradient large
    (up to ||G|| / sqrt(EIGENVALUE_FLOOR * lambda_max) per axis), so the guard always applies."""
    out: List[Optional[torch.Tensor]] = []
    numel = math.prod(grad.shape[1:])
    for axis, factor in enumerate(factors):
        if factor is None:
            out.append(None)
            continue
        others = [None if j == axis else w for j, w in enumerate(whiteners)]
        whitened = project(grad, others, batch_dims=1)
        size = grad.shape[axis + 1]
        unfolded = whitened.movedim(axis + 1, 1).reshape(grad.shape[0], size, -1) * math.sqrt(size / numel)
        out.append(without_overflowing_grams(unfolded.contiguous(), batch_dims=1))
    return out


def kl_factor_ema_(
    factors: Factors, grad: torch.Tensor, whiteners: Sequence[Optional[torch.Tensor]], beta: float, factor_ema_
) -> None:
    """In place, for a [B, *shape] stack and its [B, d, d] factors: the KL update (module docstring) through
    ``factor_ema_(factor, None, x, beta)`` (F <- beta F + (1 - beta) x x^T; the kernels' op or its twin).
    All statistics are computed before any factor changes: the update is simultaneous."""
    unfoldings = whitened_unfoldings(grad, whiteners, factors)
    for factor, unfolded in zip(factors, unfoldings):
        if factor is not None:
            factor_ema_(factor, None, unfolded, beta)


def initial_kl_factors_(factors: Factors, grad: torch.Tensor, beta: float, factor_ema_) -> None:
    """In place, for a [B, *shape] stack: the first factors, one KL update from F_j = rho I with
    rho = ms^{1/P} (module docstring), overwriting ``factors``; a member with a zero gradient, or one whose
    Gram matrices could overflow (``without_overflowing_grams``), gets zeros."""
    count = sum(factor is not None for factor in factors)
    if count == 0:
        return
    grad = without_overflowing_grams(grad, batch_dims=1)  # as the Gram path: such a gradient counts as zero
    dims = tuple(range(1, grad.dim()))
    mean_square = grad.double().square().mean(dim=dims)
    positive = mean_square > 0
    mean_square = mean_square.clamp_min(torch.finfo(torch.float64).tiny)
    rho = torch.where(positive, mean_square.pow(1 / count), 0.0)
    # whitening by the others' rho^{-1/2} I: G times rho^{-(P-1)/2} = ms^{-(P-1)/(2P)}
    scale = torch.where(positive, mean_square.pow(-(count - 1) / (2 * count)), 0.0)
    for factor in factors:
        if factor is not None:
            eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
            factor.copy_(rho.to(factor.dtype).view(-1, 1, 1) * eye)
    scaled = grad * scale.to(grad.dtype).view(-1, *([1] * len(dims)))
    kl_factor_ema_(factors, scaled, [None] * len(factors), beta, factor_ema_)


def estimates_of(factors: Factors, bases: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """:func:`eigenvalue_estimates` of every (factor, basis) pair; None where there is no factor."""
    return [None if f is None else eigenvalue_estimates(f, b) for f, b in zip(factors, bases)]
