"""Carrying moments kept in the eigenbasis across a basis refresh.

The first moment is rotated exactly into the new basis (project_back with the old bases, project
with the new ones). The second moment is not rotated: it is only permuted along each axis with the
re-sorted columns, as in the SOAP paper's implementation.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .bases import refreshed_basis
from .projection import project, project_back


def refresh_bases_(
    factors: Sequence[Optional[torch.Tensor]],
    bases: List[Optional[torch.Tensor]],
    exp_avg: Optional[torch.Tensor],
    exp_avg_sq: Optional[torch.Tensor],
) -> None:
    """In place: refresh every basis that has a factor and carry the moments along.

    ``exp_avg`` / ``exp_avg_sq`` are in the merged layout and in the current eigenbasis; either may
    be None (an optimizer without that moment).
    """
    old_bases = list(bases)
    changed = False
    for axis, (factor, basis) in enumerate(zip(factors, bases)):
        if factor is None:
            continue
        result = refreshed_basis(factor, basis)
        if result is None:
            continue
        bases[axis], order = result
        changed = True
        if exp_avg_sq is not None:
            exp_avg_sq.copy_(exp_avg_sq.index_select(axis, order))
    if changed and exp_avg is not None:
        exp_avg.copy_(project(project_back(exp_avg, old_bases), bases))
