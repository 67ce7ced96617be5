"""Fused elementwise Adam: both moments, the update and the parameter write in one pass per tensor.

For the parameters SOAP leaves unrotated (biases, norms, axes above max_precond_dim). Per element:
read p, g, m, v; write p, m, v (fp32 moments: 4 + 4 + 4 + 4 bytes in, 4 + 4 out, plus p in its own
dtype), which is the floor for this update.

A list is handled one launch per tensor. A single launch over the whole list would need a table of
per-tensor pointers and dtypes; the per-tensor launches cost a few microseconds each, which matters
only for models with hundreds of tiny tensors, and a caller can avoid it by keeping such parameters
and their state in one flat buffer (a bucket), which this op then updates in one launch.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRETED, cast_rne, check_devices
from .reference import as_tensor_list, check_adam_args

# the largest float32: a second moment whose square overflowed is capped here instead of becoming inf
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)

# 1024 elements per program with 4 warps: 8 fp32 per thread per operand, wide enough for 128-bit
# loads. Not measured on a GPU; a memory-bound kernel is insensitive to it within 512-4096.
_BLOCK = 128 if INTERPRETED else 1024


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, step_ptr,
    numel, beta1, beta2, eps, step_size, denom_scale, decay,
    STEP_FROM_PTR: tl.constexpr, DECAY_FIRST: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg = beta1 * tl.load(m_ptr + offsets, mask=mask, other=0.0) + (1.0 - beta1) * grad
    exp_avg = tl.minimum(tl.maximum(exp_avg, -FLOAT32_MAX), FLOAT32_MAX)  # rounding past the max, as in the twin
    exp_avg_sq = beta2 * tl.load(v_ptr + offsets, mask=mask, other=0.0) + (1.0 - beta2) * grad * grad
    exp_avg_sq = tl.minimum(exp_avg_sq, FLOAT32_MAX)  # an overflowed square is capped, as in the twin
    tl.store(m_ptr + offsets, exp_avg, mask=mask)
    tl.store(v_ptr + offsets, exp_avg_sq, mask=mask)
    if STEP_FROM_PTR:
        step_size = tl.load(step_ptr)
    update = step_size * tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) * denom_scale + eps)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if DECAY_FIRST:
        p = p * (1.0 - decay) - update
    else:
        p = (p - update) * (1.0 - decay)
    tl.store(p_ptr + offsets, cast_rne(p, p_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def adam_(
    params: Union[torch.Tensor, Sequence[torch.Tensor]],
    grads: Union[torch.Tensor, Sequence[torch.Tensor]],
    exp_avg: Union[torch.Tensor, Sequence[torch.Tensor]],
    exp_avg_sq: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: Union[float, torch.Tensor],
    denom_scale: float = 1.0,
    decay: float = 0.0,
    decay_first: bool = False,
) -> None:
    """Elementwise Adam on a list of tensors (or one tensor), in place.

    Same contract as ``reference.adam_``; moments must be float32 and every tensor contiguous.
    """
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avg = as_tensor_list("exp_avg", exp_avg)
    exp_avg_sq = as_tensor_list("exp_avg_sq", exp_avg_sq)
    check_adam_args(params, grads, exp_avg, exp_avg_sq, step_size)
    step_from_ptr = isinstance(step_size, torch.Tensor)
    step_tensor = step_size.reshape(1).to(torch.float32) if step_from_ptr else None
    for index, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        check_devices(p, g, m, v, step_tensor)
        for name, tensor in (("params", p), ("grads", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if not tensor.is_contiguous():
                raise ValueError(f"the fused adam_ needs contiguous tensors, {name}[{index}] is not")
            if name.startswith("exp_avg") and tensor.dtype != torch.float32:
                raise ValueError(f"the fused adam_ needs float32 moments, {name}[{index}] is {tensor.dtype}")
        numel = p.numel()
        if numel == 0:
            continue
        _adam_kernel[(triton.cdiv(numel, _BLOCK),)](
            p, g, m, v, step_tensor if step_from_ptr else m,
            numel, float(beta1), float(beta2), float(eps),
            0.0 if step_from_ptr else float(step_size), float(denom_scale), float(decay),
            STEP_FROM_PTR=step_from_ptr, DECAY_FIRST=bool(decay_first), INTERPRETED=INTERPRETED, BLOCK=_BLOCK,
        )
