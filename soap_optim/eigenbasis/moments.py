"""Carrying moments kept in the eigenbasis across a basis refresh.

The first moment is rotated exactly into the new basis (project_back with the old bases, project
with the new ones). Second-moment statistics are not rotated: they are only permuted along each
axis with the re-sorted columns, as in the SOAP paper's implementation; ``refresh_bases_`` returns
the column orders so that each optimizer permutes whatever statistics it keeps.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .bases import refreshed_basis
from .projection import project, project_back

Orders = List[Optional[torch.Tensor]]


def refresh_bases_(
    factors: Sequence[Optional[torch.Tensor]],
    bases: List[Optional[torch.Tensor]],
    exp_avg: Optional[torch.Tensor] = None,
) -> Orders:
    """In place: refresh every basis that has a factor and rotate ``exp_avg`` into the new bases.

    ``exp_avg`` is in the merged layout and the current eigenbasis (None: nothing to carry).
    Returns, per axis, the order of the old columns in the new basis (None: axis unchanged).
    """
    old_bases = list(bases)
    orders: Orders = [None] * len(bases)
    for axis, (factor, basis) in enumerate(zip(factors, bases)):
        if factor is None:
            continue
        result = refreshed_basis(factor, basis)
        if result is not None:
            bases[axis], orders[axis] = result
    if exp_avg is not None and any(order is not None for order in orders):
        exp_avg.copy_(project(project_back(exp_avg, old_bases), bases))
    return orders


def permute_axes_(x: torch.Tensor, orders: Orders, axes: Optional[Sequence[int]] = None) -> None:
    """In place: reorder ``x`` along each axis by ``orders[axis]``.

    ``axes[i]`` names the axis of ``x`` that follows ``orders[i]`` (default: the same index), so a
    row statistic of a matrix is permuted with ``orders=[order_0]`` and a column one with
    ``orders=[order_1]``.
    """
    for index, order in enumerate(orders):
        if order is not None:
            axis = index if axes is None else axes[index]
            x.copy_(x.index_select(axis, order))
