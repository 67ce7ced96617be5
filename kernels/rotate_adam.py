"""Fused rotation into the eigenbasis + Adam moment update + direction, for a bucket.

G~ = Q_L^T G Q_R. With both bases this is two launches over the whole bucket:
  1. T = G Q_R (plain batched product, ``_triton_common.batched_matmul``);
  2. G~ = Q_L^T T, whose epilogue works on the fp32 accumulator tile: it reads exp_avg and exp_avg_sq,
     writes them updated, and writes direction = exp_avg / (sqrt(exp_avg_sq) + eps).
G~ itself never goes to memory. With one basis the single product carries the epilogue (G Q_R or
Q_L^T G, one launch); with none the epilogue runs on G directly.

The right product goes first: both orders cost 2 m n (m + n) FLOPs, and this one matches the twin's
order (which matters for the rounding of T under ``precision="bf16"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_common import (
    INTERPRETED,
    batch_slices,
    batched_matmul,
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
from .reference import check_rotate_args

# the largest float32: a second moment whose square overflowed is capped here instead of becoming inf
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _rotate_adam_kernel(
    a_ptr, stride_ab, stride_am, stride_ak,
    b_ptr, stride_bb, stride_bk, stride_bn,
    m_ptr, v_ptr, d_ptr,
    M, N, K,
    beta1, beta2, eps,
    HAS_A: tl.constexpr,
    PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    tile_m, tile_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rotated = product_tile(
        a_ptr + batch * stride_ab, stride_am, stride_ak,
        b_ptr + batch * stride_bb, stride_bk, stride_bn,
        rows, cols, M, N, K,
        HAS_A, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_PRECISION, INTERPRETED,
    )
    # Epilogue: Adam's moments in the eigenbasis, on the fp32 accumulator. exp_avg, exp_avg_sq and the
    # direction are contiguous [B, M, N] buffers, so one int32 offset tile serves all three (three
    # tiles of 64-bit pointers held next to the accumulator spilled registers in every configuration).
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    matrix = batch * M * N
    offsets = rows[:, None] * N + cols[None, :]
    exp_avg = beta1 * tl.load(m_ptr + matrix + offsets, mask=mask, other=0.0) + (1.0 - beta1) * rotated
    exp_avg = tl.minimum(tl.maximum(exp_avg, -FLOAT32_MAX), FLOAT32_MAX)  # rounding past the max, as in the twin
    tl.store(m_ptr + matrix + offsets, exp_avg, mask=mask)
    exp_avg_sq = beta2 * tl.load(v_ptr + matrix + offsets, mask=mask, other=0.0) + (1.0 - beta2) * rotated * rotated
    exp_avg_sq = tl.minimum(exp_avg_sq, FLOAT32_MAX)  # an overflowed square is capped, as in the twin
    tl.store(v_ptr + matrix + offsets, exp_avg_sq, mask=mask)
    # IEEE-rounded sqrt and division (tl.sqrt and "/" are approximate on NVIDIA GPUs): this is
    # elementwise work on a tile already in registers, so exactness costs nothing measurable.
    direction = tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)
    tl.store(d_ptr + matrix + offsets, direction, mask=mask)


def rotate_adam_(
    grad: torch.Tensor,
    q_left: Optional[torch.Tensor],
    q_right: Optional[torch.Tensor],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    precision: str = "fp32",
) -> torch.Tensor:
    """G~ = Q_L^T G Q_R; Adam's moments updated in place with G~; returns exp_avg / (sqrt(exp_avg_sq) + eps).

    Same contract as ``reference.rotate_adam_``; bases and moments must be float32, the direction is
    a new float32 [B, m, n] tensor. Non-contiguous moments are updated through contiguous copies.
    """
    return rotate_adam_impl(grad, q_left, q_right, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps,
                            precision=precision, route_to_cublas=not INTERPRETED)


def rotate_adam_impl(grad, q_left, q_right, exp_avg, exp_avg_sq, *, beta1, beta2, eps, precision="fp32",
                     route_to_cublas: bool = True) -> torch.Tensor:
    """``rotate_adam_`` with the routing switch exposed: buckets that ``rotation_prefers_cublas`` picks run
    as the twin (its ``torch.bmm`` products on the same rounded operands; the float32 sums of a product
    then come in cuBLAS's order instead of the tile's, the only difference). Off under the interpreter,
    whose tests are about the kernel."""
    check_rotate_args(grad, q_left, q_right, exp_avg, exp_avg_sq, precision)
    check_devices(grad, q_left, q_right, exp_avg, exp_avg_sq)
    check_float32(q_left=q_left, q_right=q_right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    check_matrix_size(grad, q_left, q_right)
    batch, m, n = grad.shape
    inner = tuple(k for k, basis in ((n, q_right), (m, q_left)) if basis is not None)
    if route_to_cublas and rotation_prefers_cublas(batch, m, n, inner, precision):
        return reference.rotate_adam_(grad, q_left, q_right, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps,
                                      precision=precision)
    direction = torch.empty((batch, m, n), dtype=torch.float32, device=grad.device)
    if direction.numel() == 0:
        return direction
    if q_left is not None:
        # C = Q_L^T X with X = G Q_R (first stage) or G.
        a = q_left.mT
        b = batched_matmul(grad, q_right, precision) if q_right is not None else grad
        k = m
    elif q_right is not None:
        a, b, k = grad, q_right, n  # C = G Q_R
    else:
        a, b, k = grad, grad, m  # C = G: a is unused (HAS_A off)
    prec, dot_prec = dot_precisions(precision)
    config = matmul_config(batch, m, n, precision)
    moments = [t if t.is_contiguous() else t.contiguous() for t in (exp_avg, exp_avg_sq)]
    tiles = tile_grid(batch, m, n, config)[0]
    for part in batch_slices(batch):
        _rotate_adam_kernel[(tiles, part.stop - part.start)](
            a[part], *strides(a), b[part], *strides(b), moments[0][part], moments[1][part], direction[part],
            m, n, k, float(beta1), float(beta2), float(eps),
            HAS_A=q_left is not None or q_right is not None,
            PRECISION=prec, DOT_PRECISION=dot_prec, INTERPRETED=INTERPRETED, **launch_options(config),
        )
    for target, work in zip((exp_avg, exp_avg_sq), moments):
        if work is not target:
            target.copy_(work)
    return direction
