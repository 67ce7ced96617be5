"""Fused elementwise Adam: both moments, the update and the parameter write in one pass, for a whole list
of tensors in one launch per dtype pair.

For the parameters SOAP leaves unrotated (biases, norms, axes above max_precond_dim) and for
``soap_optim.AdamW``. Per element: read p, g, m, v; write p, m, v (fp32 moments: 4 + 4 + 4 + 4 bytes in,
4 + 4 out, plus p in its own dtype), which is the floor for this update.

One launch covers every tensor of the list whose (param dtype, grad dtype) pair is the same: the launch
gets tables of the tensors' addresses and, per program, which tensor and which block of it to update
(the multi-tensor-apply pattern of torch's fused optimizers). A model's hundreds of small tensors then
cost one launch instead of one each.

Whole or not at all: every tensor is checked (shapes, dtypes, devices) before the first launch. A
tensor whose four operands are dense with the same strides (contiguous, channels_last, any permuted
layout) is updated in place as the flat run of its storage; any other is updated through contiguous
copies, written back after the launch.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

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
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adam_kernel(
    p_table, g_table, m_table, v_table, numel_table, tensor_of, block_of, step_ptr,
    beta1, beta2, eps, step_size, denom_scale, decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr, DECAY_FIRST: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    tensor = tl.load(tensor_of + program)
    p_ptr = tl.load(p_table + tensor).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(g_table + tensor).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(m_table + tensor).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_table + tensor).to(tl.pointer_type(tl.float32))
    offsets = tl.load(block_of + program).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numel_table + tensor)
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
    tl.store(p_ptr + offsets, cast_rne(p, P_DTYPE, INTERPRETED), mask=mask)


def _dense_with_same_strides(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether all ``tensors`` are non-overlapping and dense with one stride pattern, so that element k
    of each one's storage run is the same logical element in all of them."""
    first = tensors[0]
    if any(t.stride() != first.stride() for t in tensors[1:]):
        return False
    if first.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(zip(first.stride(), first.shape)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


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

    Same contract as ``reference.adam_``; moments must be float32. Every check runs before the first
    launch, so a bad tensor anywhere in the list leaves all of them unchanged.
    """
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avg = as_tensor_list("exp_avg", exp_avg)
    exp_avg_sq = as_tensor_list("exp_avg_sq", exp_avg_sq)
    check_adam_args(params, grads, exp_avg, exp_avg_sq, step_size)
    step_from_ptr = isinstance(step_size, torch.Tensor)
    if not params:
        return
    device = check_devices(*params, *grads, *exp_avg, *exp_avg_sq, *([step_size] if step_from_ptr else []))
    for name, tensors, allowed in (("params", params, _TL_DTYPES), ("grads", grads, _TL_DTYPES),
                                   ("exp_avg", exp_avg, (torch.float32,)), ("exp_avg_sq", exp_avg_sq, (torch.float32,))):
        for index, tensor in enumerate(tensors):
            if tensor.dtype not in allowed:
                kinds = "float32" if len(allowed) == 1 else "float32, bfloat16 or float16"
                raise ValueError(f"the fused adam_ needs {kinds} {name}, {name}[{index}] is {tensor.dtype}")
    # ---- nothing can fail past this point: the launches below update every tensor
    step_tensor = step_size.reshape(1).to(device=device, dtype=torch.float32) if step_from_ptr else None
    groups: Dict[Tuple[torch.dtype, torch.dtype], List[Tuple[torch.Tensor, ...]]] = {}
    write_back: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for quad in zip(params, grads, exp_avg, exp_avg_sq):
        if quad[0].numel() == 0:
            continue
        if not _dense_with_same_strides(quad):
            copies = tuple(t.contiguous() for t in quad)
            write_back += [(t, c) for t, c in zip(quad, copies) if c is not t and t is not quad[1]]
            quad = copies
        groups.setdefault((quad[0].dtype, quad[1].dtype), []).append(quad)
    for (p_dtype, g_dtype), quads in groups.items():
        _launch(quads, device, p_dtype, g_dtype, step_tensor, beta1, beta2, eps,
                0.0 if step_from_ptr else float(step_size), denom_scale, decay, decay_first)
    for target, work in write_back:
        target.copy_(work)


def _launch(quads, device, p_dtype, g_dtype, step_tensor, beta1, beta2, eps, step_size, denom_scale, decay,
            decay_first) -> None:
    """One launch over ``quads`` (p, g, m, v), all with the same (param, grad) dtypes."""
    blocks = [triton.cdiv(q[0].numel(), _BLOCK) for q in quads]
    # One int64 table: addresses of p, g, m, v, the element counts, and per program its tensor and block.
    programs = sum(blocks)
    table = torch.empty(5 * len(quads) + 2 * programs, dtype=torch.int64)
    count = len(quads)
    for column, operand in enumerate(zip(*quads)):
        table[column * count:(column + 1) * count] = torch.tensor([t.data_ptr() for t in operand], dtype=torch.int64)
    table[4 * count:5 * count] = torch.tensor([q[0].numel() for q in quads], dtype=torch.int64)
    sizes = torch.tensor(blocks, dtype=torch.int64)
    tensor_of = torch.repeat_interleave(torch.arange(count, dtype=torch.int64), sizes)
    first_block = torch.cumsum(sizes, 0) - sizes
    table[5 * count:5 * count + programs] = tensor_of
    table[5 * count + programs:] = torch.arange(programs, dtype=torch.int64) - first_block[tensor_of]
    table = table.to(device, non_blocking=True) if device.type == "cuda" else table
    _adam_kernel[(programs,)](
        table, table[count:], table[2 * count:], table[3 * count:], table[4 * count:],
        table[5 * count:], table[5 * count + programs:],
        step_tensor if step_tensor is not None else table,
        float(beta1), float(beta2), float(eps), step_size, float(denom_scale), float(decay),
        P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype],
        STEP_FROM_PTR=step_tensor is not None, DECAY_FIRST=bool(decay_first), INTERPRETED=INTERPRETED, BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
