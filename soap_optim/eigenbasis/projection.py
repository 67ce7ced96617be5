"""Rotations into and out of an eigenbasis.

For a tensor X in the merged layout and one basis Q_k (or None) per axis:

    project(X)      = X x_1 Q_1^T x_2 Q_2^T ...   (a matrix: Q_L^T X Q_R)
    project_back(X) = X x_1 Q_1   x_2 Q_2   ...   (a matrix: Q_L X Q_R^T)

Axes without a basis are left as they are. With orthonormal bases the two are inverses.
``batch_dims=1`` treats the first axis of ``x`` as a batch of same-shaped tensors, each basis then being
a [B, d, d] stack (the batched path's buckets of matrices).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Bases = Sequence[Optional[torch.Tensor]]


def _mode_product(x: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """Y with Y[..., j, ...] = sum_i X[..., i, ...] * matrix[i, j] along ``axis``.

    A [B, d, d] ``matrix`` applies member b's matrix to x[b] (x's first axis is the batch).
    """
    if matrix.dim() == 3 and x.dim() == 2:
        # a batch of vectors (a 1-D tensor's bucket of one): member b's row times its matrix
        return (x.unsqueeze(1) @ matrix).squeeze(1)
    if matrix.dim() == 3 and x.dim() > 3:
        # broadcast member b's matrix over x[b]'s other axes
        matrix = matrix.view(matrix.shape[0], *([1] * (x.dim() - 3)), *matrix.shape[1:])
    if axis == x.dim() - 1:
        return x @ matrix
    if axis == 0 and x.dim() == 2:
        return matrix.T @ x
    return (x.movedim(axis, -1) @ matrix).movedim(-1, axis)


def project(x: torch.Tensor, bases: Bases, batch_dims: int = 0) -> torch.Tensor:
    """Rotate ``x`` into the eigenbasis: multiply axis k by Q_k^T."""
    for axis, basis in enumerate(bases):
        if basis is not None:
            x = _mode_product(x, basis, axis + batch_dims)
    return x


def project_back(x: torch.Tensor, bases: Bases, batch_dims: int = 0) -> torch.Tensor:
    """Rotate ``x`` out of the eigenbasis: multiply axis k by Q_k."""
    for axis, basis in enumerate(bases):
        if basis is not None:
            x = _mode_product(x, basis.mT, axis + batch_dims)
    return x
