"""Moment math shared by the family: pure functions on tensors, below every optimizer.

* the first-moment EMA that cannot overflow (:func:`first_moment_ema_`, :func:`foreach_first_moment_ema_`);
* Adam's normalization (:func:`adam_normalize`, also Shampoo's Adam graft);
* the two orders of applying an update with decoupled weight decay: torch.optim.AdamW's
  (:func:`decay_then_update_`: decay, then subtract) and the SOAP reference's (:func:`apply_update_`:
  subtract, then decay the updated weights);
* Adafactor's factored second moment (:func:`factored_shape`, :func:`update_factored_moments_`,
  :func:`factored_second_moment`), which SOAP(factorized=True) keeps in the eigenbasis, and its
  update clipping (:func:`clip_by_rms_`).

The optimizers import these; this module imports none of them.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def first_moment_ema_(exp_avg: torch.Tensor, x: torch.Tensor, beta1: float) -> torch.Tensor:
    """In place: exp_avg <- beta1 * exp_avg + (1 - beta1) * x, finite for all finite inputs.

    Multiply-add: both terms are at most the dtype's max, so opposite signs cannot overflow and equal
    signs give a convex combination, at most max before rounding; the clamp to [-max, max] takes
    back the last rounding. torch's ``lerp_`` (torch.optim.AdamW's EMA) computes x - exp_avg first,
    which overflows for opposite-sign entries whose magnitudes sum past the max.
    """
    limit = torch.finfo(exp_avg.dtype).max
    return exp_avg.mul_(beta1).add_(x, alpha=1 - beta1).clamp_(-limit, limit)


def foreach_first_moment_ema_(exp_avgs: List[torch.Tensor], xs: List[torch.Tensor], beta1: float) -> None:
    """:func:`first_moment_ema_` over lists of tensors of one dtype, through ``torch._foreach_*``."""
    if not exp_avgs:
        return
    limit = torch.finfo(exp_avgs[0].dtype).max
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, xs, alpha=1 - beta1)
    torch._foreach_clamp_min_(exp_avgs, -limit)
    torch._foreach_clamp_max_(exp_avgs, limit)


def adam_normalize(
    numerator: torch.Tensor, exp_avg_sq: torch.Tensor, bias_correction2: float, eps: float
) -> torch.Tensor:
    """numerator / (sqrt(exp_avg_sq / bias_correction2) + eps), torch.optim.Adam's denominator."""
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    return numerator / denom


def decay_then_update_(param: torch.Tensor, update: torch.Tensor, lr: float, decay: float) -> None:
    """theta <- theta * (1 - decay) - lr * update (torch.optim.AdamW's order), in the update's precision.

    SOAP's reference decays the already-updated weights instead (see :func:`apply_update_`).
    """
    target = param if param.dtype == update.dtype else param.to(update.dtype)
    if decay != 0:
        target.mul_(1 - decay)
    target.add_(update, alpha=-lr)
    if target is not param:
        param.copy_(target)


def apply_update_(param: torch.Tensor, update: torch.Tensor, step_size: float, decay: float) -> None:
    """theta <- (1 - decay) * (theta - step_size * update), computed in the update's precision.

    The decay multiplies the already-updated weights (the SOAP reference's order).
    """
    target = param if param.dtype == update.dtype else param.to(update.dtype)
    target.add_(update, alpha=-step_size)
    if decay > 0:
        target.add_(target, alpha=-decay)
    if target is not param:
        param.copy_(target)


def factored_shape(shape: Tuple[int, ...]) -> Optional[Tuple[int, int]]:
    """The matrix a tensor is factored as: (shape[0], rest) for 2-D and up, None for 0-D/1-D.

    Flattening the trailing axes (rather than factoring the last two, as the paper's code does for
    n-D tensors) keeps a conv weight (O, I, kH, kW) at O + I*kH*kW numbers instead of O*I*(kH + kW).
    """
    if len(shape) < 2:
        return None
    return (shape[0], math.prod(shape[1:]))


def update_factored_moments_(
    row: torch.Tensor, col: torch.Tensor, grad: torch.Tensor, beta2: float, eps: float
) -> None:
    """In place, for a matrix gradient G (m x n):

    row <- beta2 * row + (1 - beta2) * (G^2 + eps) 1_n      (length m)
    col <- beta2 * col + (1 - beta2) * 1_m^T (G^2 + eps)    (length n)
    """
    squared = grad.square().add_(eps)
    # multiply-add rather than lerp_: an overflowed (inf) statistic stays inf instead of inf - inf = NaN
    row.mul_(beta2).add_(squared.sum(dim=1), alpha=1 - beta2).clamp_(max=torch.finfo(row.dtype).max)
    col.mul_(beta2).add_(squared.sum(dim=0), alpha=1 - beta2).clamp_(max=torch.finfo(col.dtype).max)


def factored_second_moment(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The rank-1 reconstruction V = row col^T / sum(row) (sum(row) == sum(col) for exact moments).

    A zero sum (all-zero statistics) gives V = 0 rather than 0/0. A sum that overflowed gives V = +inf
    everywhere, as an overflowed full second moment does where it overflowed: no step, never NaN.
    """
    total = row.sum()
    estimate = torch.outer(row / total.clamp_min(torch.finfo(row.dtype).tiny), col)
    return torch.where(torch.isfinite(total), estimate, torch.full_like(estimate, math.inf))


def factored_normalize(grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """G / sqrt(V), V = row col^T / sum(row) (Adafactor's U), in float64 for float32 statistics.

    In float32, row / sum(row) underflows to 0 for a row that saw no gradient once the sum is large
    (gradients of ~1e15 with the default eps), and 0 / 0 is NaN; float64 holds every product and quotient
    of float32 numbers, so U is finite, and 0 wherever G is. Cast U after clipping it: before, an entry
    may exceed the float32 range. A V of 0 (only with an eps that vanishes in the statistics' dtype)
    gives U = 0 there. Where the statistics saturated at the dtype's max (gradients of ~1e19 and up in
    float32), V is finite but too small and the step is clipped instead.
    """
    wide = torch.float64 if grad.dtype in (torch.float16, torch.bfloat16, torch.float32) else grad.dtype
    moment = factored_second_moment(row.to(wide), col.to(wide))
    update = grad.to(wide) / moment.sqrt()
    return torch.where(moment > 0, update, update.new_zeros(()))


def clip_by_rms_(update: torch.Tensor, d: float) -> torch.Tensor:
    """In place: update / max(1, RMS(update) / d)."""
    if update.numel() == 0:
        return update
    rms = update.square().mean().sqrt()
    return update.div_(torch.clamp(rms / d, min=1.0))
