"""Carrying moments kept in the eigenbasis across a basis refresh.

The first moment is rotated exactly into the new basis (project_back with the old bases, project
with the new ones). Second-moment statistics are not rotated: they are only permuted along each
axis with the re-sorted columns, as in the SOAP paper's implementation; ``refresh_bases_`` returns
the column orders so that each optimizer permutes whatever statistics it keeps.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..precision import full_float32_matmul
from .bases import refreshed_basis_if_any
from .projection import project, project_back

Orders = List[Optional[torch.Tensor]]


@full_float32_matmul()
def refresh_bases_(
    factors: Sequence[Optional[torch.Tensor]],
    bases: List[Optional[torch.Tensor]],
    exp_avg: Optional[torch.Tensor] = None,
    batch_dims: int = 0,
    tolerance: float = 0.0,
    estimates: Optional[List[Optional[torch.Tensor]]] = None,
) -> Orders:
    """In place: refresh every basis that has a factor and rotate ``exp_avg`` into the new bases.

    ``exp_avg`` is in the merged layout and the current eigenbasis (None: nothing to carry).
    Returns, per axis, the order of the old columns in the new basis (None: axis not refreshed; the
    identity for the matrices of a stack that kept their basis).
    With ``batch_dims=1`` everything is a stack over a leading batch axis (see ``projection``).
    ``tolerance`` > 0: only bases that drifted more than that from their factor's eigenbasis are
    refreshed (see ``bases.basis_drift``). A tensor none of whose bases changed (settled, or a fallback of
    ``bases``) keeps ``exp_avg`` bit for bit: decided per tensor on the device, with no host read.
    ``estimates`` (a list as long as ``bases``): filled in place with each axis's eigenvalue estimates
    diag(O^T F O) in the old basis, in the old columns' order, whether or not its basis changed (NaN for a
    matrix whose factor is not finite; None where there is no factor; see ``bases.BasisRefresh``).
    """
    old_bases = list(bases)
    orders: Orders = [None] * len(bases)
    changed: Optional[torch.Tensor] = None  # per tensor of the stack: a basis of it was refreshed
    for axis, (factor, basis) in enumerate(zip(factors, bases)):
        if factor is None:
            continue
        result = refreshed_basis_if_any(factor, basis, tolerance)
        if estimates is not None:
            estimates[axis] = result.estimates
        if result.basis is None:
            continue
        bases[axis], orders[axis] = result.basis, result.order
        changed = result.refreshed if changed is None else changed | result.refreshed
    if all(order is None for order in orders):
        return orders
    if exp_avg is not None:
        _copy_where_(exp_avg, project(project_back(exp_avg, old_bases, batch_dims), bases, batch_dims), changed)
    return orders


def _copy_where_(target: torch.Tensor, value: torch.Tensor, changed: torch.Tensor) -> None:
    """``target <- value`` for the tensors of the stack where ``changed`` (a device mask: no host read)."""
    target.copy_(torch.where(changed.reshape(changed.shape + (1,) * (target.dim() - changed.dim())), value, target))


def permute_axes_(x: torch.Tensor, orders: Orders, batch_dims: int = 0) -> None:
    """In place: reorder ``x`` along each axis ``i`` by ``orders[i]`` (None: leave that axis).

    A row statistic of a matrix is permuted with ``orders=[order_0]`` and a column one with
    ``orders=[order_1]``. With ``batch_dims`` leading batch axes each order is a [*batch, d] stack.
    """
    for index, order in enumerate(orders):
        if order is None:
            continue
        axis = index + batch_dims
        if batch_dims == 0:
            x.copy_(x.index_select(axis, order))
        else:
            # [*batch, d] -> [*batch, 1, .., d, .., 1], expanded to x's shape (gather needs a full index)
            shape = list(order.shape[:batch_dims]) + [1] * (x.dim() - batch_dims)
            shape[axis] = order.shape[-1]
            x.copy_(torch.gather(x, axis, order.reshape(shape).expand(x.shape)))
