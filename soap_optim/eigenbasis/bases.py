"""Eigenbases of the Kronecker factors: the first one by eigh, later ones by one step of
power iteration followed by QR, with numerical fallbacks.

First basis:  eigh(F + 1e-30 I), columns reversed so that eigenvalues descend.
Refresh:      est = diag(O^T F O); order = argsort(est, descending);
              Q = QR(F O[:, order]).Q          (O is the current basis)

The refresh also returns ``order`` because moments kept in the eigenbasis must be permuted
along with the columns, and its estimates ``est``, which KL-SOAP keeps as eigenvalues (no product
of their own).

Fallbacks, decided per matrix on the device (``torch.where`` over the stack; no host read): a factor
with NaN/Inf never reaches eigh, a product or QR (a zero matrix goes in instead) and keeps the
previous basis (the identity for a first basis); so does a matrix whose decomposition comes back
non-finite. A decomposition that raises is known on the host: eigh is retried in float64 (then the
identity), a QR that raises keeps that matrix's previous basis; both warn at once.

Reporting the device-side fallbacks without a sync of their own: inside an optimizer step (see
:func:`counting_fallbacks`) each one is added to a small count tensor on the device, which the
optimizer reads together with the gradient norms at the next step's single host read (or at
``state_dict()``) and reports as a warning, once per kind and process. Called outside a step, these
functions read the decision at once and warn.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..precision import full_float32_matmul

# The jitter only matters for an exactly zero factor, where eigh then returns the identity.
_EIGH_JITTER = 1e-30
_warned = set()

# What a device-side fallback means, one entry per kind (the order of a count vector's entries).
FALLBACK_MESSAGES = (
    "soap_optim: a Kronecker factor is not finite; using the identity basis",
    "soap_optim: eigh returned non-finite eigenvectors; using the identity basis",
    "soap_optim: a Kronecker factor is not finite; keeping the previous basis",
    "soap_optim: QR refresh failed; keeping the previous basis",
    "soap_optim.Shampoo: a Kronecker factor is not finite; keeping the previous root",
)
_FIRST_FACTOR, _FIRST_EIGH, _REFRESH_FACTOR, _REFRESH_QR, ROOT_FACTOR = range(len(FALLBACK_MESSAGES))


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class FallbackCounts:
    """Device-side counts of the fallbacks of :data:`FALLBACK_MESSAGES`, one float64 vector per device."""

    def __init__(self) -> None:
        self._counts: Dict[torch.device, torch.Tensor] = {}

    def add(self, kind: int, kept: torch.Tensor) -> None:
        """Count the True entries of ``kept`` (a bool tensor on any device) as fallbacks of ``kind``."""
        counts = self._counts.get(kept.device)
        if counts is None:
            counts = self._counts[kept.device] = torch.zeros(len(FALLBACK_MESSAGES), dtype=torch.float64, device=kept.device)
        counts[kind] += kept.sum()

    def merge(self, other: "FallbackCounts") -> None:
        for device, counts in other._counts.items():
            mine = self._counts.get(device)
            self._counts[device] = counts if mine is None else mine + counts

    def take(self, device: torch.device) -> Optional[torch.Tensor]:
        """The counts so far, summed on ``device`` (None: nothing was counted), and start again from zero."""
        if not self._counts:
            return None
        counts = [c.to(device) for c in self._counts.values()]
        self._counts = {}
        return torch.stack(counts).sum(dim=0)


def report_fallbacks(counts: Sequence[float]) -> None:
    """Warn (once per kind and process) for every kind with a count above zero (host numbers)."""
    for message, count in zip(FALLBACK_MESSAGES, counts):
        if count > 0:
            _warn_once(message)


_counting: List[FallbackCounts] = []


@contextmanager
def counting_fallbacks(counts: FallbackCounts) -> Iterator[FallbackCounts]:
    """Inside the block, device-side fallbacks are added to ``counts`` instead of being read and reported."""
    _counting.append(counts)
    try:
        yield counts
    finally:
        _counting.pop()


def note_fallback(kind: int, kept: torch.Tensor) -> None:
    """Record the fallbacks of ``kind`` where ``kept`` (a bool tensor): counted on the device inside an
    optimizer step, read and warned at once outside one."""
    if _counting:
        _counting[-1].add(kind, kept)
    elif bool(kept.any()):  # outside an optimizer step: read it now
        _warn_once(FALLBACK_MESSAGES[kind])


def finite_matrices(x: torch.Tensor) -> torch.Tensor:
    """Per matrix of a [..., m, n] stack, whether all its entries are finite: a bool [...] tensor on the
    device, no host read. Below float64, from one float64 sum per matrix (finite entries cannot overflow
    it; a NaN/Inf entry makes it non-finite)."""
    if x.dtype == torch.float64:
        return torch.isfinite(x).flatten(-2).all(dim=-1)
    return torch.isfinite(x.sum(dim=(-2, -1), dtype=torch.float64))


def _where_matrices(mask: torch.Tensor, x: torch.Tensor, y) -> torch.Tensor:
    """``x`` for the matrices of the stack where ``mask`` (shape [...]), ``y`` elsewhere."""
    return torch.where(mask[..., None, None], x, y)


def _eigh(matrix: torch.Tensor) -> Optional[torch.Tensor]:
    """Eigenvectors (ascending eigenvalues) of a symmetric matrix; retried in float64 when eigh raises;
    None when it raises in float64 too. Non-finite vectors (without an exception) are the caller's to
    handle on the device: a retry decided by reading them would cost a host sync."""
    jitter = _EIGH_JITTER * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for attempt in (matrix + jitter, matrix.double() + jitter.double()):
        try:
            return torch.linalg.eigh(attempt)[1].to(matrix.dtype)
        except Exception:  # torch raises torch.linalg.LinAlgError, backends differ
            continue
    return None


def _orthonormal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the Householder QR of ``matrix``: the same Q as ``torch.linalg.qr`` (bit for bit), ~25%
    faster on CPU (46 vs 62 ms for 1024 x 1024, one thread) because R is never formed.

    A stack is decomposed one matrix at a time, each in its own allocation. Batched LAPACK calls work in
    one buffer where a matrix starts wherever the previous one ends, and on AVX-512 CPUs the kernels'
    rounding depends on that alignment (a 7 x 7 QR: different bits as the second matrix of a stack than
    alone). One matrix per call makes every basis independent of which other factors share its stack, so
    owners that batch a subset of the same-shaped factors (the distributed path) get one process's bits.
    """
    if matrix.dim() > 2:
        flat = matrix.reshape(-1, *matrix.shape[-2:])
        return torch.stack([_orthonormal_factor(m) for m in flat.unbind()]).reshape(matrix.shape)
    reflectors, tau = torch.geqrf(matrix.clone(memory_format=torch.contiguous_format))
    return torch.linalg.householder_product(reflectors, tau)


@full_float32_matmul()
def initial_basis(factor: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors of ``factor``, eigenvalues in descending order (the identity where the
    factor or its eigenvectors are not finite, or eigh raised in float32 and float64)."""
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    finite = finite_matrices(factor)
    vectors = _eigh(torch.where(finite, factor, 0.0))
    if vectors is None:
        _warn_once("soap_optim: eigh failed even in float64; using the identity basis")
        return identity
    found = finite_matrices(vectors)
    note_fallback(_FIRST_FACTOR, ~finite)
    note_fallback(_FIRST_EIGH, finite & ~found)
    # row-major like every later basis (eigh's vectors are column-major): a basis kept by a refresh's
    # fallback then keeps its layout too, and with it the rounding of the products it enters
    return torch.where(finite & found, vectors.flip(1), identity).contiguous()


def basis_drift(factor_basis: torch.Tensor, estimated: torch.Tensor) -> torch.Tensor:
    """Per matrix, how far the basis O is from diagonalizing F: the relative off-diagonal mass of O^T F O,

        drift = ||offdiag(O^T F O)||_F / ||O^T F O||_F = sqrt(1 - sum_i (o_i^T F o_i)^2 / ||F O||_F^2),

    read from the power step F O and its diagonal estimates alone (O orthonormal keeps Frobenius norms),
    so it costs no product. Computed in float64: a drift of 1e-2 is 1e-4 of the norm. A zero factor has
    drift 0 (nothing to refresh).
    """
    total = factor_basis.double().square().sum(dim=(-2, -1))
    diagonal = estimated.double().square().sum(dim=-1)
    ratio = torch.where(total > 0, diagonal / total.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    return (1 - ratio).clamp(min=0).sqrt()


class BasisRefresh(NamedTuple):
    """What :func:`refreshed_basis_if_any` computed for a [..., d, d] stack of factors F and bases O."""

    # diag(O^T F O) in the old bases, [..., d]: the power step's eigenvalue estimates (KL-SOAP keeps them);
    # NaN for a matrix whose factor is not finite (it has none)
    estimates: torch.Tensor
    # the new bases, the old columns' order in them ([..., d]: the identity for a matrix that kept its basis)
    # and which matrices took a new basis ([...]); all three None where the host knows that no matrix
    # changed (every QR raised, or none drifted), so that the caller can skip carrying its moments
    basis: Optional[torch.Tensor] = None
    order: Optional[torch.Tensor] = None
    refreshed: Optional[torch.Tensor] = None


def refreshed_basis(factor: torch.Tensor, basis: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """One power-iteration + QR step from ``basis``: returns (new basis, column order) or None.

    Works on one d x d pair or on [..., d, d] stacks (``order`` is then [..., d]). A matrix whose
    refresh is not possible (non-finite factor or QR) keeps its basis, with the identity order; None
    means that no matrix could be refreshed (every QR raised).
    """
    result = refreshed_basis_if_any(factor, basis, 0.0)
    return None if result.basis is None else (result.basis, result.order)


@full_float32_matmul()
def refreshed_basis_if_any(factor: torch.Tensor, basis: torch.Tensor, tolerance: float) -> BasisRefresh:
    """:func:`refreshed_basis` of a [..., d, d] stack, for the matrices whose :func:`basis_drift` exceeds
    ``tolerance`` only (0: every matrix), with the power step's eigenvalue estimates.

    A matrix left alone (settled, non-finite factor or QR) keeps its basis bit for bit and gets the
    identity order. Each matrix's decision and QR are its own, so a basis does not depend on which other
    factors share its stack. ``tolerance`` = 0 reads nothing on the host. ``tolerance`` > 0 reads the
    drift decisions once (a host sync): that read is what lets settled matrices skip their QR, the
    refresh's largest cost.
    """
    finite = finite_matrices(factor)
    note_fallback(_REFRESH_FACTOR, ~finite)
    factor = _where_matrices(finite, factor, 0.0)  # nothing non-finite reaches the products or QR
    # One product serves both the eigenvalue estimates diag(O^T F O) and the power iteration F O.
    factor_basis = factor @ basis
    estimated = (basis * factor_basis).sum(dim=-2)
    # a zeroed factor's estimates are zeros, not estimates: NaN says so (KL-SOAP then keeps its old ones)
    estimates = torch.where(finite.unsqueeze(-1), estimated, math.nan)
    order = torch.argsort(estimated, dim=-1, descending=True)
    wanted = None
    if tolerance > 0:
        drifted = finite & (basis_drift(factor_basis, estimated) > tolerance)
        wanted = drifted.reshape(-1).tolist()  # the one host read of a refresh with a tolerance
        if not any(wanted):
            return BasisRefresh(estimates)
    columns = torch.gather(factor_basis, -1, order.unsqueeze(-2).expand(factor_basis.shape))
    new_basis, raised = _orthonormal_factors(columns, basis, wanted)
    if raised:  # known on the host: LAPACK raised for these matrices
        _warn_once(FALLBACK_MESSAGES[_REFRESH_QR])
        if len(raised) == (len(wanted) - wanted.count(False) if wanted is not None else finite.numel()):
            return BasisRefresh(estimates)
        kept = torch.zeros(finite.numel(), dtype=torch.bool)
        kept[raised] = True
        finite = finite & ~kept.reshape(finite.shape).to(finite.device)
    found = finite_matrices(new_basis)
    note_fallback(_REFRESH_QR, finite & ~found)
    refreshed = finite & found
    if wanted is not None:
        refreshed = refreshed & drifted
    identity = torch.arange(order.shape[-1], device=order.device).expand(order.shape)
    order = torch.where(refreshed.unsqueeze(-1), order, identity)
    return BasisRefresh(estimates, _where_matrices(refreshed, new_basis, basis), order, refreshed)


def _orthonormal_factors(
    columns: torch.Tensor, basis: torch.Tensor, wanted: Optional[List[bool]]
) -> Tuple[torch.Tensor, List[int]]:
    """``_orthonormal_factor`` of each matrix of the stack ``columns`` where ``wanted`` (None: all of them),
    one matrix per call; ``basis``'s matrix elsewhere and where LAPACK raised. Returns the stack and the
    (flat) indices of the matrices whose QR raised."""
    flat_columns = columns.reshape(-1, *columns.shape[-2:])
    flat_basis = basis.reshape(-1, *basis.shape[-2:])
    out, raised = [], []
    for index, (matrix, previous) in enumerate(zip(flat_columns.unbind(), flat_basis.unbind())):
        if wanted is not None and not wanted[index]:
            out.append(previous)
            continue
        try:
            out.append(_orthonormal_factor(matrix))
        except Exception:  # torch raises torch.linalg.LinAlgError, backends differ
            raised.append(index)
            out.append(previous)
    return torch.stack(out).reshape(basis.shape), raised
