"""Fused rotation out of the eigenbasis + parameter update, for a bucket.

U = Q_L N Q_R^T, then params <- (1 - decay) (params - step_size[b] U), computed in fp32 and stored in
the params' dtype (decay after the update: the SOAP reference's order). Stages, each one launch over
the whole bucket:
  1. T = N Q_R^T (plain batched product; skipped when a basis is absent);
  2. U = Q_L T, whose epilogue reads the params tile, applies the update and writes it back: U never
     goes to memory.

normalize (U <- U / (1e-30 + rms(U)) per matrix) needs the norm of the whole U before any tile can be
applied. It is taken from U itself: stage 2 writes U (fp32) and one partial sum of squares per tile,
then a third, elementwise launch applies the normalized update. Computing the norm from N instead
(||Q_L N Q_R^T||_F = ||N||_F for orthonormal bases) would skip writing and reading U, but it is exact
only for orthonormal bases; SOAP's are orthonormal only to rounding (and far from it under
``precision="bf16"``), and these ops are meant for the rest of the eigenbasis family too. The extra
traffic is 8 bytes per element, next to a product of 2 m n (m + n) FLOPs. The partial sums are reduced
by a deterministic ``sum`` rather than atomics, so the step is bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._triton_common import (
    INTERPRETED,
    batch_slices,
    batched_matmul,
    cast_rne,
    check_devices,
    check_float32,
    check_matrix_size,
    dot_precisions,
    launch_options,
    matmul_config,
    product_tile,
    rotation_prefers_cublas,
    strides,
    tile_coords,
    tile_grid,
)
from . import reference
from .reference import NORMALIZE_EPS, check_unrotate_args


@triton.jit
def _apply_update(p_ptrs, mask, update, step_size, decay, INTERPRETED: tl.constexpr):
    """p <- (1 - decay) (p - step_size * update), in fp32, stored in p's dtype."""
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    p = (p - step_size * update) * (1.0 - decay)
    tl.store(p_ptrs, cast_rne(p, p_ptrs.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _unrotate_apply_kernel(
    a_ptr, stride_ab, stride_am, stride_ak,
    b_ptr, stride_bb, stride_bk, stride_bn,
    p_ptr,
    step_ptr, decay,
    u_ptr, partial_ptr, partials_per_matrix,
    M, N, K,
    HAS_A: tl.constexpr, NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tile_m, tile_n = tile_coords(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    update = product_tile(
        a_ptr + batch * stride_ab, stride_am, stride_ak,
        b_ptr + batch * stride_bb, stride_bk, stride_bn,
        rows, cols, M, N, K,
        HAS_A, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_PRECISION, INTERPRETED,
    )
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    # U and the params are contiguous [B, M, N]: one int32 offset tile addresses either
    offsets = rows[:, None] * N + cols[None, :]
    if NORMALIZE:
        # out-of-range entries of the tile are 0 (masked loads), so they add nothing to the sum
        tl.store(u_ptr + batch * M * N + offsets, update, mask=mask)
        tl.store(partial_ptr + batch * partials_per_matrix + pid, tl.sum(update * update))
    else:
        _apply_update(p_ptr + batch * M * N + offsets, mask, update, tl.load(step_ptr + batch), decay, INTERPRETED)


@triton.jit
def _apply_normalized_kernel(
    u_ptr, sum_sq_ptr, p_ptr,
    step_ptr, decay, M, N,
    NORMALIZE_EPS: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = batch * M * N + rows[:, None] * N + cols[None, :]
    update = tl.load(u_ptr + offsets, mask=mask, other=0.0)
    rms = tl.sqrt_rn(tl.load(sum_sq_ptr + batch) / (M * N))
    update = tl.div_rn(update, NORMALIZE_EPS + rms)
    _apply_update(p_ptr + offsets, mask, update, tl.load(step_ptr + batch), decay, INTERPRETED)


# Elementwise tile of the normalize pass: 64 x 64 fp32 is 16 KiB per operand per program, enough to
# keep loads wide; not tuned (a memory-bound pass of 12-16 bytes per element).
_APPLY_BLOCK = 16 if INTERPRETED else 64


def unrotate_apply_(
    direction: torch.Tensor,
    q_left: Optional[torch.Tensor],
    q_right: Optional[torch.Tensor],
    params: torch.Tensor,
    *,
    step_size: Union[float, torch.Tensor],
    decay: float,
    normalize: bool = False,
    precision: str = "fp32",
) -> None:
    """U = Q_L N Q_R^T; params <- (1 - decay) (params - step_size[b] U), in place.

    Same contract as ``reference.unrotate_apply_``; direction, bases and step_size must be float32.
    Non-contiguous params are updated through a contiguous copy.
    """
    unrotate_apply_impl(direction, q_left, q_right, params, step_size=step_size, decay=decay, normalize=normalize,
                        precision=precision, route_to_cublas=not INTERPRETED)


def unrotate_apply_impl(direction, q_left, q_right, params, *, step_size, decay, normalize=False,
                        precision="fp32", route_to_cublas: bool = True) -> None:
    """``unrotate_apply_`` with the routing switch exposed (see ``rotate_adam.rotate_adam_impl``)."""
    check_unrotate_args(direction, q_left, q_right, params, step_size, decay, precision)
    routed_step_size = step_size
    if isinstance(step_size, float):
        step_size = torch.full((direction.shape[0],), step_size, dtype=torch.float32, device=direction.device)
    check_devices(direction, q_left, q_right, params, step_size)
    check_float32(direction=direction, q_left=q_left, q_right=q_right, step_size=step_size)
    check_matrix_size(direction, q_left, q_right)
    batch, m, n = direction.shape
    inner = tuple(k for k, basis in ((n, q_right), (m, q_left)) if basis is not None)
    if route_to_cublas and rotation_prefers_cublas(batch, m, n, inner, precision):
        reference.unrotate_apply_(direction, q_left, q_right, params, step_size=routed_step_size, decay=decay,
                                  normalize=normalize, precision=precision)
        return
    if direction.numel() == 0:
        return
    if q_left is not None:
        # U = Q_L X with X = N Q_R^T (first stage) or N.
        a = q_left
        b = batched_matmul(direction, q_right.mT, precision) if q_right is not None else direction
        k = m
    elif q_right is not None:
        a, b, k = direction, q_right.mT, n  # U = N Q_R^T
    else:
        a, b, k = direction, direction, m  # U = N: a is unused (HAS_A off)
    step_size = step_size.contiguous()
    config = matmul_config(batch, m, n, precision)
    grid = tile_grid(batch, m, n, config)
    if normalize:
        partials = grid[0]
        update = torch.empty((batch, m, n), dtype=torch.float32, device=direction.device)
        partial = torch.empty((batch, partials), dtype=torch.float32, device=direction.device)
    else:
        partials = 0
        update = partial = direction  # unused (NORMALIZE off)
    work = params if params.is_contiguous() else params.contiguous()
    prec, dot_prec = dot_precisions(precision)
    for part in batch_slices(batch):
        _unrotate_apply_kernel[(grid[0], part.stop - part.start)](
            a[part], *strides(a), b[part], *strides(b), work[part],
            step_size[part], float(decay), update[part], partial[part], partials,
            m, n, k,
            HAS_A=q_left is not None or q_right is not None, NORMALIZE=bool(normalize),
            PRECISION=prec, DOT_PRECISION=dot_prec, INTERPRETED=INTERPRETED, **launch_options(config),
        )
    if normalize:
        # a fixed-order sum over the tiles' partial sums: deterministic, unlike atomics
        sum_sq = partial.sum(dim=1)
        apply_tiles = triton.cdiv(m, _APPLY_BLOCK) * triton.cdiv(n, _APPLY_BLOCK)
        for part in batch_slices(batch):
            _apply_normalized_kernel[(apply_tiles, part.stop - part.start)](
                update[part], sum_sq[part], work[part], step_size[part], float(decay), m, n,
                NORMALIZE_EPS=NORMALIZE_EPS, INTERPRETED=INTERPRETED, BLOCK_M=_APPLY_BLOCK, BLOCK_N=_APPLY_BLOCK,
                enable_fp_fusion=False,
            )
    if work is not params:
        params.copy_(work)
