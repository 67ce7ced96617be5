"""Fused Kronecker-factor update: F <- beta F + (1 - beta) X X^T for a bucket, in place.

L uses X = G (a [m, n] matrix, L is m x m), R uses X = G^T (R is n x n); G^T is a strided view, not a
copy. One launch per factor covers the whole bucket: the grid is (tile pairs, B), and each program
reads its tile of F, adds the fresh Gram tile and writes it back in the same pass, so the Gram matrix
never goes to memory.

Symmetry: X X^T is symmetric, so only tiles on or above the diagonal are computed; an off-diagonal
tile is written twice, as itself and mirrored (each copy blended with its own old value, so a factor
that is not exactly symmetric is still updated exactly like the twin does it). With T tile rows this
runs T (T + 1) / 2 products instead of T^2: about half the FLOPs of the Gram, one of SOAP's three
rotation-sized stages, for the same bytes of F. Did it pay? Under the CPU interpreter, yes: with 16-wide
tiles, B = 3 at 40 x 40 and B = 2 at 64 x 64, the upper-only launch took 0.75x and 0.72x the time of the
full-square one (medians of 7, interleaved; the program counts are 6/9 and 10/16, the rest is the second
blended store of off-diagonal tiles). It is not yet measured on a GPU;
``benchmarks/kernel_bench.py --compare-symmetric`` times both there. What could eat the gain on a GPU
is the mirrored store, which writes a tile transposed and makes Triton convert the layout through
shared memory: small next to a K-long product loop, but not for a short K (a wide, short G on the R
side). ``factor_ema_impl(..., upper_only=False)`` keeps the plain full-square path available.

With bf16/fp16 gradients the products run on the 16-bit values directly (``"native"`` operands): a
product of two bf16 (or two fp16) numbers is exact in fp32 and the accumulation is fp32, so the result
is fp32 math at tensor-core speed.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._triton_common import (
    _SM_COUNT,
    INTERPRETED,
    batch_slices,
    check_devices,
    check_float32,
    check_matrix_size,
    launch_options,
    matmul_tile,
)
from .reference import check_factor_args

# A Gram matrix with K at least this many times its size D goes to cuBLAS when the kernel's upper-tile
# grid would not fill the GPU: the kernel gives each program one tile and the whole K loop, while
# cuBLAS splits K across programs. The embedding's 768 x 768 Gram from K = 50257 is 78 programs of
# 64 x 64 on 132 SMs, each running a 50257-long loop.
_TALL_K_RATIO = 8


def compiled_gram_configs():
    """Square tiles (the mirror of a tile must be a tile) the launcher can pick on a GPU: 64 x 64 with 8
    warps, the one without register spills on sm_90a for every operand dtype (with 4 warps the float32
    upper-triangle kernel spills 24 B per thread, 128-wide tiles 12-990 B; ``benchmarks/kernel_spills.py``)."""
    return [triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3)]


_INTERPRETED_GRAM = triton.Config({"BLOCK": 16, "BLOCK_K": 16}, num_warps=1)


def _upper_tiles(dim: int, block: int) -> int:
    tiles = triton.cdiv(dim, block)
    return tiles * (tiles + 1) // 2


def gram_config(batch: int, dim: int):
    """The tile for a bucket of D x D Grams: fixed (same shape, same tile, same bits on every rank and
    run); the single-entry list of ``compiled_gram_configs`` leaves room for a shape rule."""
    del batch, dim
    return _INTERPRETED_GRAM if INTERPRETED else compiled_gram_configs()[0]


def prefers_cublas(batch: int, dim: int, k: int) -> bool:
    """Whether a bucket of D x D Grams over K is better done by cuBLAS (``torch.baddbmm``): a tall K on
    a grid of the kernel's smallest tiles too small to fill the GPU."""
    block = compiled_gram_configs()[0].kwargs["BLOCK"]
    return k >= _TALL_K_RATIO * dim and batch * _upper_tiles(dim, block) < _SM_COUNT


@triton.jit
def _blend_store(f_ptrs, gram, mask, beta, ACCUMULATE: tl.constexpr):
    old = tl.load(f_ptrs, mask=mask, other=0.0)
    if ACCUMULATE:
        new = old + gram
    else:
        new = beta * old + (1.0 - beta) * gram
    tl.store(f_ptrs, new, mask=mask)


@triton.jit
def _upper_tile(pid):
    """(row, column) of the pid-th tile on or above the diagonal, numbered column by column:
    pid = col (col + 1) / 2 + row with row <= col. The float square root can be one off near perfect
    squares, which the two integer corrections fix."""
    col = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    col = tl.where((col + 1) * (col + 2) // 2 <= pid, col + 1, col)
    col = tl.where(col * (col + 1) // 2 > pid, col - 1, col)
    return pid - col * (col + 1) // 2, col


@triton.jit
def _gram_ema_kernel(
    x_ptr, stride_xb, stride_xd, stride_xk,
    f_ptr, stride_fb, stride_fr, stride_fc,
    D, K, beta,
    ACCUMULATE: tl.constexpr, UPPER_ONLY: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    if UPPER_ONLY:
        tile_r, tile_c = _upper_tile(pid)
    else:
        tiles = tl.cdiv(D, BLOCK)
        tile_r = pid // tiles
        tile_c = pid % tiles
    rows = tile_r * BLOCK + tl.arange(0, BLOCK)
    cols = tile_c * BLOCK + tl.arange(0, BLOCK)
    x = x_ptr + batch * stride_xb
    # (X X^T)[rows, cols]: A = X, B = X^T through swapped strides.
    gram = matmul_tile(
        x, stride_xd, stride_xk, x, stride_xk, stride_xd, rows, cols, D, D, K,
        BLOCK, BLOCK, BLOCK_K, PRECISION, "ieee", INTERPRETED,
    )
    f = f_ptr + batch * stride_fb
    mask = (rows[:, None] < D) & (cols[None, :] < D)
    _blend_store(f + rows[:, None] * stride_fr + cols[None, :] * stride_fc, gram, mask, beta, ACCUMULATE)
    if UPPER_ONLY:
        if tile_r != tile_c:
            # The mirror tile F[cols, rows] gets gram^T: element (i, j) of gram lands at F[j, i].
            mirror = f + cols[None, :] * stride_fr + rows[:, None] * stride_fc
            _blend_store(mirror, gram, mask, beta, ACCUMULATE)


def _gram_ema(factor: torch.Tensor, x: torch.Tensor, beta: float, upper_only: bool) -> None:
    """factor[i] <- beta factor[i] + (1 - beta) x[i] x[i]^T (beta == 1: accumulate), one launch."""
    batch, dim, k = x.shape
    if batch == 0 or dim == 0:
        return  # (k == 0 is a valid launch: the Gram is 0 and F is only scaled)
    precision = "native" if x.dtype in (torch.bfloat16, torch.float16) else "fp32"
    config = gram_config(batch, dim)
    block = config.kwargs["BLOCK"]
    tiles = _upper_tiles(dim, block) if upper_only else triton.cdiv(dim, block) ** 2
    for part in batch_slices(batch):
        _gram_ema_kernel[(tiles, part.stop - part.start)](
            x[part], x.stride(0), x.stride(1), x.stride(2),
            factor[part], factor.stride(0), factor.stride(1), factor.stride(2),
            dim, k, float(beta),
            ACCUMULATE=beta == 1.0, UPPER_ONLY=upper_only, PRECISION=precision, INTERPRETED=INTERPRETED,
            **launch_options(config),
        )


def factor_ema_impl(left, right, grad, beta, *, upper_only: bool = True, route_to_cublas: bool = True) -> None:
    """factor_ema_ with the symmetry switch exposed (the benchmark times both settings).

    ``route_to_cublas``: Grams that ``prefers_cublas`` picks run as ``torch.baddbmm`` (the twin, at IEEE
    float32); off under the interpreter, whose tests are about the kernel.
    """
    check_factor_args(left, right, grad, beta)
    check_devices(left, right, grad)
    check_float32(left=left, right=right)
    check_matrix_size(grad, left, right)
    batch, m, n = grad.shape
    for factor, x, dim, k in ((left, grad, m, n), (right, grad.mT, n, m)):
        if factor is None:
            continue
        if route_to_cublas and prefers_cublas(batch, dim, k):
            reference.factor_ema_(factor, None, x, beta)
        else:
            _gram_ema(factor, x, beta, upper_only)


def factor_ema_(
    left: Optional[torch.Tensor], right: Optional[torch.Tensor], grad: torch.Tensor, beta: float
) -> None:
    """In place: L <- beta L + (1 - beta) G G^T and R <- beta R + (1 - beta) G^T G, per matrix.

    ``beta == 1`` accumulates: L <- L + G G^T. Either factor may be None. Same contract as
    ``reference.factor_ema_``; factors must be float32.
    """
    factor_ema_impl(left, right, grad, beta, route_to_cublas=not INTERPRETED)
