"""Adam and AdamW with torch.optim's conventions, on the soap_optim base.

Its normalization m / (sqrt(v / bc2) + eps) and torch's AdamW order of the update (decay the weights,
then subtract the update) are shared with the family (``moment_math``). :func:`adam_` is the functional entry point;
it picks the batched ``torch._foreach_*`` implementation (the default) or the single-tensor
reference, which share one signature and are proven equal by the tests.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .dispatch import get_ops, wants_kernels
from .moment_math import first_moment_ema_, foreach_first_moment_ema_
from .optimizer import Screen, Slot, SoapOptimizerBase, advance_step_counts, new_step_count
from .validation import check_betas, check_bool, check_choice, check_lr, check_non_negative


def _single_tensor_adam_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    max_exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    guard_overflow: bool = False,
    cap_second_moment: bool = True,
) -> None:
    """The readable reference: one parameter at a time, torch.optim's single-tensor Adam op for op (its bits).

    Allocate first, modify last: every temporary of every parameter (the gradient in the state's dtype, a
    work copy of a low-precision parameter, the denominator) exists before the first tensor is modified,
    so an out-of-memory error leaves parameters and state as they were.
    """
    prepared = []
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        grad = grad.to(exp_avg.dtype)
        if maximize:
            grad = -grad
        work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
        if weight_decay != 0 and not decoupled_weight_decay:
            grad = grad.add(work, alpha=weight_decay)
        prepared.append((grad, work, torch.empty_like(exp_avg)))
    for index, (param, exp_avg, exp_avg_sq, step, (grad, work, denom)) in enumerate(
        zip(params, exp_avgs, exp_avg_sqs, steps, prepared)
    ):
        step += 1
        t = step.item()
        if guard_overflow:
            first_moment_ema_(exp_avg, grad, beta1)
        else:
            exp_avg.lerp_(grad, 1 - beta1)  # torch's bits
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if cap_second_moment:
            exp_avg_sq.clamp_(max=torch.finfo(exp_avg_sq.dtype).max)
        second = exp_avg_sq
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[index], exp_avg_sq, out=max_exp_avg_sqs[index])
            second = max_exp_avg_sqs[index]
        # decay, then theta -= (lr / bc1) * m / (sqrt(v) / bc2 ** 0.5 + eps) in one addcdiv
        if weight_decay != 0 and decoupled_weight_decay:
            work.mul_(1 - lr * weight_decay)
        torch.sqrt(second, out=denom).div_((1 - beta2**t) ** 0.5).add_(eps)
        work.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**t)))
        if work is not param:
            param.copy_(work)


def _foreach_adam_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    max_exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    guard_overflow: bool = False,
    cap_second_moment: bool = True,
) -> None:
    """Batched over tensors that share a device and state dtype; allocate first, modify last (as
    :func:`_single_tensor_adam_`): every bucket's temporaries exist before the first tensor is modified."""
    first_device, first_dtype = exp_avgs[0].device, exp_avgs[0].dtype
    if first_device.type == "cpu":  # is_cpu: no device object made per tensor
        uniform = all(e.dtype is first_dtype and e.is_cpu for e in exp_avgs)
    else:
        uniform = all(e.dtype is first_dtype and e.device == first_device for e in exp_avgs)
    if uniform:
        buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = {(first_device, first_dtype): []}
    else:
        buckets = {}
        for index, exp_avg in enumerate(exp_avgs):
            buckets.setdefault((exp_avg.device, exp_avg.dtype), []).append(index)
    prepared = []
    for (device, dtype), indices in buckets.items():
        pick = (lambda tensors: tensors) if uniform else (lambda tensors: [tensors[i] for i in indices])
        # Low-precision parameters are updated through a copy in the state's dtype.
        bucket_params, g = pick(params), pick(grads)
        work = [p if p.dtype is dtype else p.to(dtype) for p in bucket_params]
        if any(gi.dtype is not dtype for gi in g):
            g = [gi if gi.dtype is dtype else gi.to(dtype) for gi in g]
        if maximize:
            g = torch._foreach_neg(g)
        if weight_decay != 0 and not decoupled_weight_decay:
            g = torch._foreach_add(g, work, alpha=weight_decay)
        # the counts this step takes, read in one conversion (host counters) before anything is modified
        counters = pick(steps)
        ts = [t + 1 for t in torch.stack(counters).tolist()]
        v = pick(exp_avg_sqs)
        scalar = _scalar_operands(device, dtype)
        # the denominators' memory, allocated by the second moment's first op (v * beta2, the bits of the
        # in-place mul_): v's update then runs in it and is copied back, a pass fewer than a separate
        # allocation; under amsgrad the denominator is the running maximum, copied in below
        advance = advance_step_counts(counters)
        if all(t == ts[0] for t in ts):  # one count for the bucket (the rule): one number for each op
            bc2 = scalar(math.sqrt(1 - beta2 ** ts[0]))
            step_size = -lr / (1 - beta1 ** ts[0])
        else:
            bc2 = [math.sqrt(1 - beta2**t) for t in ts]
            step_size = [-lr / (1 - beta1**t) for t in ts]
        decay = scalar(1 - lr * weight_decay) if weight_decay != 0 and decoupled_weight_decay else None
        numbers = (decay, bc2, scalar(eps), step_size)
        prepared.append((dtype, bucket_params, work, g, torch._foreach_mul(v, scalar(beta2)), numbers, advance,
                         pick(exp_avgs), v, pick(max_exp_avg_sqs) if amsgrad else None))
    for dtype, bucket_params, work, g, denom, numbers, advance, m, v, v_max in prepared:
        decay, bc2, eps_operand, step_size = numbers
        if decay is not None:
            torch._foreach_mul_(work, decay)
        advance()
        if guard_overflow:
            foreach_first_moment_ema_(m, g, beta1)
        else:
            torch._foreach_lerp_(m, g, 1 - beta1)  # torch's bits
        torch._foreach_addcmul_(denom, g, g, value=1 - beta2)  # v * beta2 + (1 - beta2) * g * g
        if cap_second_moment:
            # a square that overflowed is capped at the dtype's max: the coordinate keeps moving, never inf
            torch._foreach_clamp_max_(denom, torch.finfo(dtype).max)
        torch._foreach_copy_(v, denom)
        if amsgrad:
            torch._foreach_maximum_(v_max, v)
            torch._foreach_copy_(denom, v_max)
        torch._foreach_sqrt_(denom)  # the bits of torch._foreach_sqrt(v), into memory allocated up front
        torch._foreach_div_(denom, bc2)
        if isinstance(eps_operand, torch.Tensor):
            torch._foreach_add_(denom, eps_operand, alpha=1.0)
        else:
            torch._foreach_add_(denom, eps_operand)
        if isinstance(step_size, list):
            torch._foreach_addcdiv_(work, m, denom, step_size)
        else:
            torch._foreach_addcdiv_(work, m, denom, value=step_size)
        for param, w in zip(bucket_params, work):
            if w is not param:
                param.copy_(w)


def _scalar_operands(device: torch.device, dtype: torch.dtype):
    """How a bucket's ops take a number: as a 0-d host tensor of the bucket's dtype for host tensors (a
    foreach op on the CPU loops over the tensors and would wrap a Python number into a new tensor for
    each, and a float64 one would take the type-promoting path; the op rounds a number to the tensors'
    dtype before it computes, exactly as this tensor is rounded, so the bits are the same), else the
    number itself (the device's fused foreach kernels take it as an argument)."""
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return lambda value: torch.tensor(value, dtype=dtype)
    return lambda value: value


def _kernel_adam_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    max_exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    *,
    ops: Any,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    guard_overflow: bool = False,
    cap_second_moment: bool = True,
) -> None:
    """Through the fused elementwise kernel (``soap_optim.kernels``' ``adam_``), one call per step count.

    torch's conventions map onto the kernel's: denom_scale = 1/sqrt(bc2), step_size = lr/bc1, and
    decoupled decay applied first. An L2 term and maximize are folded into the gradient beforehand.
    """
    del guard_overflow, cap_second_moment  # the kernel's multiply-add EMA is always overflow-safe, v capped
    if amsgrad:
        raise ValueError("amsgrad is not supported by the fused Adam kernel; use fused=False")
    by_step: Dict[int, List[int]] = {}
    for index, step in enumerate(steps):
        by_step.setdefault(int(step.item()) + 1, []).append(index)
    advance = advance_step_counts(steps)
    gradients = {}  # allocate first, modify last (as _single_tensor_adam_)
    for t, indices in by_step.items():
        g = [grads[i] for i in indices]
        if maximize:
            g = torch._foreach_neg(g)
        if weight_decay != 0 and not decoupled_weight_decay:
            g = [gi.to(exp_avgs[i].dtype) + weight_decay * params[i].to(exp_avgs[i].dtype) for gi, i in zip(g, indices)]
        gradients[t] = g
    advance()
    for t, indices in by_step.items():
        g = gradients[t]
        ops.adam_(
            [params[i] for i in indices], g, [exp_avgs[i] for i in indices], [exp_avg_sqs[i] for i in indices],
            beta1=beta1, beta2=beta2, eps=eps, step_size=lr / (1 - beta1**t),
            denom_scale=1 / math.sqrt(1 - beta2**t),
            decay=lr * weight_decay if decoupled_weight_decay else 0.0, decay_first=True,
        )


def adam_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    max_exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    *,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
    **hyper: Any,
) -> None:
    """Functional Adam/AdamW step over lists of tensors (state in its own dtype, params any float dtype).

    ``fused`` picks the elementwise kernel (see ``soap_optim.dispatch``; amsgrad never takes it by
    default); otherwise ``foreach=False`` runs the single-tensor reference and ``None``/``True`` the
    batched ``torch._foreach_*`` path. ``hyper``: lr, beta1, beta2, eps, weight_decay,
    decoupled_weight_decay, amsgrad, maximize, guard_overflow, cap_second_moment.

    The first moment is torch's ``lerp_`` (torch.optim.Adam's bits), which overflows for an entry of
    the gradient and one of the moment of opposite signs whose magnitudes sum past the dtype's max
    (torch.optim.AdamW turns NaN there). That needs a gradient entry above max/2 or one seen before,
    hence a gradient the base's check flags as huge: ``guard_overflow=True`` (set it for those steps)
    takes the multiply-add EMA, which stays finite (``moment_math.first_moment_ema_``). The fused
    kernel always computes the multiply-add.

    ``cap_second_moment`` (default True) caps v at the dtype's max, where a square overflowed. With every
    gradient norm at most sqrt(max)/2 (the base's limit) each g_i^2 <= max/4, so from any finite v <= max,
    beta2 v + (1 - beta2) g_i^2 < max: the cap cannot bind, and the optimizer skips it (one pass over
    every tensor less) for such steps; the bits are the same.
    """
    if not params:
        return
    if fused is None and hyper.get("amsgrad"):
        fused = False
    if wants_kernels(fused, exp_avgs):
        _kernel_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, ops=get_ops(True), **hyper)
        return
    impl = _single_tensor_adam_ if foreach is False else _foreach_adam_
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hyper)


# Below this gradient norm no square overflows the second moment, float32 or float64 (see adam_)
_SQUARE_SAFE_NORM = math.sqrt(torch.finfo(torch.float32).max) / 2


class Adam(SoapOptimizerBase):
    r"""Adam (Kingma & Ba, 2015) with torch.optim.Adam's exact conventions.

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-\nabla \text{ if maximize}) \\
        &\textbf{Adam: } g_t \leftarrow g_t + \lambda\theta_{t-1} \qquad
         \textbf{AdamW: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
         v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        &\hat v_t \leftarrow \max(\hat v_{t-1}, v_t) \text{ if amsgrad, else } v_t \\
        &\theta_t \leftarrow \theta_{t-1} - \gamma \frac{m_t / (1-\beta_1^t)}
              {\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}
        \end{aligned}

    Note that ``eps`` is added after bias correction (torch's convention; SOAP adds it before). One
    deliberate difference: where :math:`(1-\beta_2) g^2` overflows, :math:`v_t` is capped at the dtype's
    max instead of becoming +inf, so state stays finite and the coordinate keeps moving.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: added to the bias-corrected :math:`\sqrt{\hat v_t}`.
        weight_decay: :math:`\lambda`; an L2 term added to the gradient (``Adam``) or decoupled
            decay applied before the update (``AdamW``).
        amsgrad: keep the running maximum of :math:`v_t` (state ``max_exp_avg_sq``).
        foreach: ``None``/``True`` batch the group with ``torch._foreach_*``; ``False`` runs the
            single-tensor reference.
        fused: ``None``: the fused Triton kernel for float32/bf16/fp16 CUDA tensors when triton
            imports (not with amsgrad); ``True``: the kernel or an error saying why it cannot run;
            ``False``: never.
        maximize: maximize the objective instead of minimizing it.
        orthograd: replace each gradient by its part orthogonal to the weights, rescaled to the
            gradient's norm, before the step (see ``soap_optim.extras.orthogonalize_grad_``).
        state_dtype: dtype of all floating state: ``None`` (float32, float64 for float64
            parameters), ``torch.float32`` or ``torch.float64``.
        skip_nonfinite_grads: a step whose gradients (in the state's dtype) are not finite is skipped
            instead of raising ``FloatingPointError`` (nothing is modified either way; warned once,
            counted in each param group's ``skipped_steps``): for long bf16 runs without a GradScaler.
            ``"on_device"``: the same decided on the device, with no host read (see the README).
        process_group: sharded DDP (see ``soap_optim.distributed``): each rank keeps the state of, and
            steps, a cost-balanced share of the parameters, and one all-to-all per step brings every
            replica the new values. FSDP2 / HSDP / tensor-parallel (DTensor) parameters need no keyword.
        shard_over_replicas: on a mesh with replicate axes (HSDP), spread the owners of preconditioned
            parameters over the replicas too (state and preconditioner work per rank fall by the number of
            replicas; the new values travel to every replica). Default: each replica group steps its own.

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad),
    as in torch.optim.Adam. Floating state is float32 (float64 for float64 parameters), so bf16/fp16
    parameters are updated from float32 moments.
    """

    _decoupled_weight_decay = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        fused: Optional[bool] = None,
        orthograd: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        skip_nonfinite_grads: bool = False,
        process_group=None,
        shard_over_replicas: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            fused=fused,
            orthograd=orthograd,
            state_dtype=state_dtype,
            skip_nonfinite_grads=skip_nonfinite_grads,
        )
        super().__init__(params, defaults, process_group=process_group, shard_over_replicas=shard_over_replicas)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_bool("amsgrad", group["amsgrad"])
        check_choice("foreach", group["foreach"], (None, True, False))
        check_choice("fused", group["fused"], (None, True, False))
        if group["fused"] and group["amsgrad"]:
            raise ValueError("Invalid fused=True with amsgrad=True: the fused Adam kernel has no amsgrad")

    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        shapes = {"exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}
        if group["amsgrad"]:
            shapes["max_exp_avg_sq"] = tuple(param.shape)
        return shapes

    def _is_elementwise(self, shape: torch.Size, hyper: Dict[str, Any]) -> bool:
        return True

    def _math_allocates_first(self, hyper: Dict[str, Any], slots: List[Slot]) -> bool:
        # the PyTorch paths allocate first (see _single_tensor_adam_); the fused kernels are not known to
        return hyper["fused"] is False or hyper["amsgrad"] or not any(slot.param.is_cuda for slot in slots)

    def _step_group(self, group: Dict[str, Any], slots: List[Slot], screen: Screen) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        for slot in slots:
            state = slot.state
            if not state:
                state["step"] = new_step_count()
                state["exp_avg"] = torch.zeros_like(slot.param, dtype=slot.grad.dtype)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                # amsgrad switched on mid-run: the running maximum starts from the current moment.
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
            params.append(slot.param)
            grads.append(slot.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            foreach=group["foreach"],
            fused=group["fused"],
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=self._decoupled_weight_decay,
            amsgrad=group["amsgrad"],
            maximize=False,  # the base's effective gradient is already sign-flipped
            # torch's lerp_ EMA overflows only for entries above max/2, and no entry exceeds the norm
            guard_overflow=screen.largest_norm > torch.finfo(torch.float32).max / 2,
            cap_second_moment=screen.largest_norm > _SQUARE_SAFE_NORM,
        )


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019) with torch.optim.AdamW's exact conventions.

    Adam (see :class:`Adam` for the algorithm box) with decoupled weight decay in torch's order:
    :math:`\theta \leftarrow \theta(1 - \gamma\lambda)` first, then the Adam update computed from the
    gradient alone. Defaults as torch.optim.AdamW (``weight_decay=1e-2``).
    """

    _decoupled_weight_decay = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        fused: Optional[bool] = None,
        orthograd: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        skip_nonfinite_grads: bool = False,
        process_group=None,
        shard_over_replicas: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize, fused=fused,
            orthograd=orthograd, state_dtype=state_dtype, skip_nonfinite_grads=skip_nonfinite_grads,
            process_group=process_group,
            shard_over_replicas=shard_over_replicas,
        )
