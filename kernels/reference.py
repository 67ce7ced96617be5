"""Pure-PyTorch twins of the fused SOAP kernels: the CPU path and the oracle of the kernel tests.

Every function here has a Triton launcher with the same name and signature in its own file
(``factor_ema.py``, ``rotate_adam.py``, ``unrotate_apply.py``, ``adam.py``). The argument checks live
here too and both versions call them, so the two reject bad input with the same ``ValueError``.

Layout: a *bucket* of B same-shaped parameters, each in SOAP's merged 2-D layout m x n, stacked into
one ``[B, m, n]`` tensor. The twins treat the bucket with batched ``torch.matmul`` (one bmm per
product), the kernels with one launch per stage over a (tiles, B) grid. A basis of ``None`` means the
identity on that side (an axis without a factor).

Precision: all math is done in float32 (float64 when the moments are float64, which only the twins
accept), with every product at IEEE float32 whatever the user's global matmul settings
(``soap_optim.precision``). ``precision`` picks how the operands of the rotation products are rounded,
and the twins round exactly as the kernels do, so both paths multiply the same numbers:

* ``"fp32"``: float32 operands, float32 products (CUDA cores in the kernels);
* ``"tf32x3"``: each operand split into a TF32 value and a TF32 remainder, three TF32 products summed
  (tensor cores; float32-level accuracy, relative error ~2^-22 per product);
* ``"tf32"``: operands rounded to TF32 (10 mantissa bits, to nearest even), one product;
* ``"bf16"``: operands rounded to bfloat16 (to nearest even), one product.

Products of TF32 or bf16 values are exact in float32, so the two paths differ only by the order of the
float32 sums. Within one op the products run in the same order as in the kernels (the right basis
first), so that the rounding of the intermediate product matches.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..moment_math import first_moment_ema_, foreach_first_moment_ema_
from ..precision import full_float32_matmul

PRECISIONS = ("fp32", "tf32x3", "tf32", "bf16")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Moments, factors and bases: float32 in the kernels; float64 is accepted by the twins only.
_STATE_DTYPES = (torch.float32, torch.float64)
# U / (NORMALIZE_EPS + rms(U)): the SOAP reference's normalize_grads.
NORMALIZE_EPS = 1e-30


# --------------------------------------------------------------------------- argument checks
def _check_dtype(name: str, tensor: torch.Tensor, allowed) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must have dtype in ({names}), got {tensor.dtype}")


def _check_bucket(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a [B, m, n] tensor (a bucket of stacked matrices), got {shape}")


def _check_shape(name: str, tensor: Optional[torch.Tensor], shape) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_factor_args(left, right, grad, beta) -> None:
    _check_bucket("grad", grad)
    _check_dtype("grad", grad, _FLOAT_DTYPES)
    batch, m, n = grad.shape
    _check_shape("left", left, (batch, m, m))
    _check_shape("right", right, (batch, n, n))
    for name, factor in (("left", left), ("right", right)):
        if factor is not None:
            _check_dtype(name, factor, _STATE_DTYPES)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def check_rotate_args(grad, q_left, q_right, exp_avg, exp_avg_sq, precision) -> None:
    _check_bucket("grad", grad)
    _check_dtype("grad", grad, _FLOAT_DTYPES)
    batch, m, n = grad.shape
    _check_shape("q_left", q_left, (batch, m, m))
    _check_shape("q_right", q_right, (batch, n, n))
    _check_shape("exp_avg", exp_avg, grad.shape)
    _check_shape("exp_avg_sq", exp_avg_sq, grad.shape)
    for name, tensor in (("q_left", q_left), ("q_right", q_right), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tensor is not None:
            _check_dtype(name, tensor, _STATE_DTYPES)
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise ValueError(f"exp_avg and exp_avg_sq must share a dtype, got {exp_avg.dtype} and {exp_avg_sq.dtype}")
    check_precision(precision)


def check_unrotate_args(direction, q_left, q_right, params, step_size, decay, precision) -> None:
    _check_bucket("direction", direction)
    _check_dtype("direction", direction, _STATE_DTYPES)
    batch, m, n = direction.shape
    _check_shape("q_left", q_left, (batch, m, m))
    _check_shape("q_right", q_right, (batch, n, n))
    _check_shape("params", params, direction.shape)
    _check_dtype("params", params, _FLOAT_DTYPES)
    for name, basis in (("q_left", q_left), ("q_right", q_right)):
        if basis is not None:
            _check_dtype(name, basis, _STATE_DTYPES)
    if not isinstance(step_size, float):
        if not isinstance(step_size, torch.Tensor) or tuple(step_size.shape) != (batch,):
            got = tuple(step_size.shape) if isinstance(step_size, torch.Tensor) else type(step_size).__name__
            raise ValueError(
                f"step_size must be a float (the same for every matrix) or a tensor of shape ({batch},) "
                f"(one per matrix), got {got}"
            )
        _check_dtype("step_size", step_size, _STATE_DTYPES)
    if not decay >= 0.0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    check_precision(precision)


def as_tensor_list(name: str, tensors) -> list:
    """A single tensor or a sequence of tensors, as a list."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    tensors = list(tensors)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"{name} must be a tensor or a sequence of tensors")
    return tensors


def check_adam_args(params, grads, exp_avg, exp_avg_sq, step_size) -> None:
    if not len(params) == len(grads) == len(exp_avg) == len(exp_avg_sq):
        raise ValueError(
            "params, grads, exp_avg and exp_avg_sq must have the same length, got "
            f"{len(params)}, {len(grads)}, {len(exp_avg)}, {len(exp_avg_sq)}"
        )
    for index, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        for name, tensor in (("grads", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if tensor.shape != p.shape:
                raise ValueError(
                    f"{name}[{index}] has shape {tuple(tensor.shape)}, params[{index}] has {tuple(p.shape)}"
                )
        _check_dtype(f"params[{index}]", p, _FLOAT_DTYPES)
        _check_dtype(f"grads[{index}]", g, _FLOAT_DTYPES)
        _check_dtype(f"exp_avg[{index}]", m, _STATE_DTYPES)
        _check_dtype(f"exp_avg_sq[{index}]", v, _STATE_DTYPES)
    if isinstance(step_size, torch.Tensor) and step_size.numel() != 1:
        raise ValueError(f"step_size must be a float or a one-element tensor, got shape {tuple(step_size.shape)}")


# --------------------------------------------------------------------------- helpers
def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest TF32 value (10 mantissa bits, ties to even; Inf and NaN kept), as a
    float32 tensor: the kernels' ``round_tf32`` on the same bits."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + ((bits >> 13) & 1) + 0xFFF) & 0xFFFFE000
    bits = torch.where((bits & 0x7F800000) == 0x7F800000, bits, rounded)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32).view(x.shape)


def _rounded(x: torch.Tensor, precision: str) -> torch.Tensor:
    """An input of a rotation product as the kernels see it (bf16/tf32: rounded to nearest)."""
    if precision == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if precision == "tf32":
        return round_tf32(x).to(x.dtype)
    return x


def _matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """[B, m, k] @ [B, k, n] (bmm directly: matmul would add broadcasting views around it)."""
    if precision == "tf32x3":
        a_hi, b_hi = round_tf32(a), round_tf32(b)
        a_lo, b_lo = round_tf32(a.float() - a_hi), round_tf32(b.float() - b_hi)
        # the kernels' three tensor-core products, small terms first
        product = torch.bmm(a_lo, b_hi).add_(torch.bmm(a_hi, b_lo)).add_(torch.bmm(a_hi, b_hi))
        return product.to(torch.promote_types(a.dtype, b.dtype))
    return torch.bmm(_rounded(a, precision), _rounded(b, precision))


# --------------------------------------------------------------------------- the four ops
@full_float32_matmul()
def factor_ema_(
    left: Optional[torch.Tensor], right: Optional[torch.Tensor], grad: torch.Tensor, beta: float
) -> None:
    """In place: L <- beta L + (1 - beta) G G^T and R <- beta R + (1 - beta) G^T G, per matrix.

    ``beta == 1`` accumulates: L <- L + G G^T. Either factor may be None (not updated).
    """
    check_factor_args(left, right, grad, beta)
    for factor, transpose_first in ((left, False), (right, True)):
        if factor is None:
            continue
        g = grad.to(factor.dtype)
        a, b = (g.mT, g) if transpose_first else (g, g.mT)
        # the EMA in the product's epilogue: F <- beta F + (1 - beta) A B, one BLAS call
        factor.baddbmm_(a, b, beta=beta, alpha=1.0 - beta if beta != 1.0 else 1.0)


@full_float32_matmul()
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

    The direction has the moments' dtype (float32 for the kernels).
    """
    check_rotate_args(grad, q_left, q_right, exp_avg, exp_avg_sq, precision)
    dtype = exp_avg.dtype
    rotated = grad.to(dtype)
    if q_right is not None:
        rotated = _matmul(rotated, q_right.to(dtype), precision)
    if q_left is not None:
        rotated = _matmul(q_left.to(dtype).mT, rotated, precision)
    first_moment_ema_(exp_avg, rotated, beta1)
    exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
    exp_avg_sq.clamp_(max=torch.finfo(exp_avg_sq.dtype).max)  # an overflowed square is capped, never inf
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=denom)


@full_float32_matmul()
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

    ``step_size``: one float for the whole bucket, or a [B] tensor (one per matrix, read on the device).
    With ``normalize``, U <- U / (1e-30 + sqrt(mean(U^2))) per matrix first. The update is computed in
    the direction's precision and stored in the params' dtype. The decay multiplies the already updated
    weights (the SOAP reference's order).
    """
    check_unrotate_args(direction, q_left, q_right, params, step_size, decay, precision)
    dtype = direction.dtype
    keep = 1.0 - decay
    # s U = scalar * (per_matrix * U): one float for the bucket, or a [B, 1, 1] scale per matrix
    if isinstance(step_size, float):
        scalar, per_matrix = step_size, None
    else:
        scalar, per_matrix = 1.0, step_size.to(dtype).view(-1, 1, 1)
    target = params if params.dtype == dtype else params.to(dtype)
    if normalize or precision != "fp32" or (q_left is None and q_right is None):
        # explicit U (normalize needs its RMS; rounded operands round N itself, as the kernels do)
        update = direction
        if q_right is not None:
            update = _matmul(update, q_right.to(dtype).mT, precision)
        if q_left is not None:
            update = _matmul(q_left.to(dtype), update, precision)
        if normalize:
            rms = update.square().mean(dim=(1, 2), keepdim=True).sqrt()
            update = update / (NORMALIZE_EPS + rms)
        if per_matrix is not None:
            update = per_matrix * update
        target.sub_(update, alpha=scalar).mul_(keep)
    else:
        # U is linear in N, so the last product's epilogue can apply the update:
        # (1 - decay)(P - s U) = (1 - decay) P - (1 - decay) s U, one BLAS call
        scaled = direction if per_matrix is None else direction * per_matrix
        if q_left is None:
            target.baddbmm_(scaled, q_right.to(dtype).mT, beta=keep, alpha=-keep * scalar)
        else:
            if q_right is not None:
                scaled = torch.bmm(scaled, q_right.to(dtype).mT)
            target.baddbmm_(q_left.to(dtype), scaled, beta=keep, alpha=-keep * scalar)
    if target is not params:
        params.copy_(target)


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

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2;  u = m / (sqrt(v) denom_scale + eps);
    ``decay_first`` (torch.optim.AdamW's order): p <- p (1 - decay) - step_size u;
    otherwise (SOAP's order): p <- (1 - decay) (p - step_size u).
    The math runs in the moments' dtype; p is stored back in its own dtype.
    ``step_size`` is a float or a one-element tensor (read on the device, no host sync).
    """
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avg = as_tensor_list("exp_avg", exp_avg)
    exp_avg_sq = as_tensor_list("exp_avg_sq", exp_avg_sq)
    check_adam_args(params, grads, exp_avg, exp_avg_sq, step_size)
    if not params:
        return
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avg)]
    foreach_first_moment_ema_(exp_avg, grads, beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
    torch._foreach_clamp_max_(exp_avg_sq, torch.finfo(exp_avg_sq[0].dtype).max)  # overflowed squares capped
    denom = torch._foreach_sqrt(exp_avg_sq)
    if denom_scale != 1.0:
        torch._foreach_mul_(denom, denom_scale)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avg, denom)
    if isinstance(step_size, torch.Tensor):
        torch._foreach_mul_(update, step_size.reshape(()).to(exp_avg[0].dtype))
    else:
        torch._foreach_mul_(update, step_size)
    # Work on copies in the moments' dtype where p is lower precision; copied back at the end.
    work = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avg)]
    if decay_first and decay != 0.0:
        torch._foreach_mul_(work, 1.0 - decay)
    torch._foreach_sub_(work, update)
    if not decay_first and decay != 0.0:
        torch._foreach_mul_(work, 1.0 - decay)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
