"""Shampoo (Gupta et al., 2018) with grafting, on the shared eigenbasis core.

The dims plan (merge_dims, max_precond_dim, precondition_1d), the Kronecker factor updates and the
mode products are the core's (``make_plan``, ``update_factors_``, ``project``); the eigendecomposition
is the core's ``initial_basis`` (eigh with its float64 retry and fallbacks). What is Shampoo's own is
:func:`inverse_root` and the grafting of the preconditioned direction onto an elementwise optimizer's
step size.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import torch

from .dispatch import factor_ema_for, update_factors_maybe_fused_
from .eigenbasis.kl import initial_kl_factors_, kl_factor_ema_
from .precision import full_float32_matmul
from .eigenbasis.bases import ROOT_FACTOR, finite_matrices, note_fallback
from .eigenbasis import (
    Plan,
    check_plan_options,
    halve_saturating_sums_,
    initial_basis,
    plan_for,
    plan_for_shape,
    project,
    unpreconditioned_plan,
    zero_factors,
)
from .moment_math import adam_normalize, decay_then_update_, first_moment_ema_
from .optimizer import Screen, Slot, SoapOptimizerBase, new_step_count
from .validation import (
    check_betas,
    check_choice,
    check_lr,
    check_non_negative,
    check_positive_int,
    check_unit_interval,
)

GRAFTINGS = ("adam", "rmsprop", "sgd", "none")
FACTOR_UPDATES = ("gram", "kl")


@full_float32_matmul()
def inverse_root(
    factor: torch.Tensor, exponent: float, matrix_eps: float, previous: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(F + matrix_eps * lambda_max(F) * I)^(-exponent) for a symmetric PSD ``factor``.

    The damping is relative to the largest eigenvalue, so it does not depend on the scale of the
    gradients or on whether the factor is a sum or an average. Eigenvalues below zero (rounding)
    are clamped to zero first. A factor without a normal (non-subnormal) entry, an all-zero one
    included (no gradient seen on that axis, or one that has decayed away), gives the identity.
    A factor that is not finite gives ``previous`` (the identity when None), counted as a fallback.

    The factor is divided by a power of two near its largest entry before the eigendecomposition
    (exact), so a tiny or huge factor is decomposed as accurately as one of order 1 and its relative
    damping cannot underflow; the scale comes back in the root's eigenvalues (see ``root_eigenvalues``).
    Every decision is taken on the device (``torch.where``; no host read).
    """
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    finite = finite_matrices(factor)
    note_fallback(ROOT_FACTOR, ~finite)
    factor = torch.where(finite, factor, 0.0)
    largest = factor.abs().amax() if factor.numel() else factor.new_zeros(())
    # 2^floor(log2(max |F_ij|)): dividing by it is exact and leaves entries in [1, 2)
    scale = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 1)
    usable = largest >= torch.finfo(factor.dtype).tiny  # also False for a zero (or non-finite) factor
    normalized = torch.where(usable, factor, 0.0) / torch.where(usable, scale, 1.0)
    # The core's eigh (float64 retry, identity fallback); the eigenvalues are the Rayleigh quotients
    # diag(Q^T F Q), exact to rounding for eigenvectors.
    basis = initial_basis(normalized)
    values = (basis * (normalized @ basis)).sum(dim=0).clamp_min_(0)
    root = (basis * root_eigenvalues(values, scale, exponent, matrix_eps)) @ basis.T
    return torch.where(usable, root, torch.where(finite, identity, identity if previous is None else previous))


def root_eigenvalues(values: torch.Tensor, scale, exponent: float, matrix_eps: float) -> torch.Tensor:
    """(scale * (v + matrix_eps * max(v)))^(-exponent) for the eigenvalues ``v`` of a normalized factor,
    capped at sqrt of the dtype's max (``scale``: a number or a 0-d tensor).

    Computed through logarithms in float64, so neither the scale nor a zero damped eigenvalue
    (``matrix_eps=0`` and a singular factor) overflows on the way. The cap only binds where the exact
    root would exceed it (a zero or nearly zero damped eigenvalue, or a large ``exponent``); it keeps
    the root, and its product with a momentum or a second root, finite.
    """
    damped = values.double() + matrix_eps * values.max().double()
    log_cap = 0.5 * math.log(torch.finfo(values.dtype).max)
    log_scale = torch.log(scale.double()) if isinstance(scale, torch.Tensor) else math.log(scale)
    logs = (damped.log() + log_scale).mul_(-exponent)
    return logs.clamp_(max=log_cap).exp_().to(values.dtype)


def root_exponent(plan: Plan, exponent_override: Optional[float], factor_update: str = "gram") -> float:
    """Exponent p applied to every factor, (F_1 (x) ... (x) F_K)^(-p): 1/(2K) unless overridden; 1/2 under
    the KL factor update, whose factors' Kronecker product estimates the second moment itself."""
    if factor_update == "kl":
        return 0.5
    if exponent_override is not None:
        return float(exponent_override)
    return 1.0 / (2 * sum(plan.preconditioned))


class Shampoo(SoapOptimizerBase):
    r"""Shampoo with grafting, momentum and decoupled weight decay.

    For a parameter whose gradient :math:`G` has (merged) axes with Kronecker factors
    :math:`F_1, \dots, F_K` (see ``max_precond_dim``, ``merge_dims``, ``precondition_1d``):

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1, \quad m_t = \beta_1 m_{t-1} + (1-\beta_1) G, \quad
            \hat m_t = m_t / (1 - \beta_1^t) \\
        &F_k \leftarrow \beta_s F_k + (1-\beta_s) G_{(k)} G_{(k)}^\top
            \quad (\beta_s = 1: F_k \leftarrow F_k + G_{(k)} G_{(k)}^\top) \\
        &\text{if } t \ge t_0 \text{ and } (t - t_0) \bmod f = 0:\
            P_k \leftarrow (F_k + \epsilon_F \lambda_{\max}(F_k) I)^{-p},\quad p = 1/(2K) \\
        &\text{graft: } d_t = \hat m_t / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon),\
            v_t = \beta_2 v_{t-1} + (1-\beta_2) G^2 \quad (\text{"adam"}) \\
        &u_t = \begin{cases} d_t & t < t_0 \\
            S_t \, \lVert d_t \rVert_F / \lVert S_t \rVert_F,\
            S_t = \hat m_t \times_1 P_1 \times_2 P_2 \cdots & t \ge t_0 \end{cases} \\
        &\theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma u_t
        \end{aligned}

    so a matrix gets :math:`L^{-1/4} \hat M R^{-1/4}` rescaled to the norm of Adam's step. With
    "adam" grafting, the first ``start_preconditioning_step - 1`` steps are exactly
    ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` (eps after bias correction, decay
    :math:`\theta(1-\gamma\lambda)` before the update).

    Defaults: ``betas=(0.9, 0.95)`` and ``shampoo_beta=0.95`` (an EMA of the factors), chosen by the
    benchmark study (``benchmarks/README.md``, "Defaults"): on the badly conditioned least-squares task
    they reach a relative error of 1e-6 on every seed where Adam's beta2 0.999 with summed factors never
    does, and no task got worse; a refresh every 2 steps instead of 10 bought nothing measurable there
    and costs 1.3x-2.7x the step. ``Shampoo(params, **Shampoo.REFERENCE)`` restores the earlier
    defaults (Adam's betas (0.9, 0.999), AdaGrad-style sums ``shampoo_beta=1``).

    Momentum is on the gradient (``exp_avg``), before preconditioning: both the Shampoo direction
    and the graft are computed from :math:`\hat m_t`, which is what makes the reduction to AdamW exact.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (in the graft's units when grafting).
        betas: :math:`\beta_1` (momentum of the gradient) and :math:`\beta_2` (second moment of the
            "adam"/"rmsprop" graft).
        shampoo_beta: :math:`\beta_s` in [0, 1]; 1.0 sums the factors as AdaGrad does (the original
            Shampoo); below 1 (default 0.95) they are an exponential moving average.
        eps: the graft's epsilon (Adam's).
        matrix_eps: :math:`\epsilon_F`, damping of each factor relative to its largest eigenvalue
            (it caps a damped factor's condition number at 1/matrix_eps). 1e-6 was measured on the
            Kronecker quadratic of tests/test_shampoo.py (factor condition numbers ~1e5): 1e-8 and 1e-6
            reach 1e-3 relative error in 152-156 steps (default exponent, lr=1) in float32 and float64
            alike, 1e-4 needs 745, 1e-3 does not get there in 1000; 1e-6 stays clear of float32 eigh
            rounding (~1e-7 of the largest eigenvalue).
        weight_decay: :math:`\lambda`, decoupled, applied in torch.optim.AdamW's order.
        precondition_frequency: :math:`f`, inverse roots are recomputed every ``f`` steps.
        start_preconditioning_step: :math:`t_0`, the first step that uses the roots (the first
            roots are computed at that step, from all gradients so far). Before it: graft only.
        exponent_override: :math:`p`, the preconditioner is :math:`(F_1 \otimes \dots \otimes F_K)^{-p}`,
            i.e. every factor is raised to :math:`-p`. ``None`` means :math:`p = 1/(2K)` with
            :math:`K` the number of preconditioned axes (a matrix: :math:`L^{-1/4} G R^{-1/4}`).
            ``0.5`` is the SOAP paper's "Shampoo with power 1/2" (a matrix:
            :math:`L^{-1/2} G R^{-1/2}`, whatever :math:`K`).
        grafting: ``"adam"`` (bias-corrected, as AdamW), ``"rmsprop"`` (:math:`\hat m_t / (\sqrt{v_t}
            + \epsilon)`, no bias correction of :math:`v_t`), ``"sgd"`` (:math:`\hat m_t`), or
            ``"none"`` (the Shampoo direction unscaled; momentum SGD before :math:`t_0`).
        max_precond_dim, merge_dims, precondition_1d, data_format: the dims plan, exactly as in
            :class:`soap_optim.SOAP`. A tensor with no preconditioned axis takes the graft's step.
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
        fused: the Kronecker factor update of 2-D (merged) tensors through the fused Triton kernel:
            ``None`` for CUDA tensors with float32 state when triton imports, ``True`` always (an error
            where it cannot run), ``False`` never.
        factor_update: ``"gram"`` (default): the factors accumulate Gram matrices as above. ``"kl"``:
            KL-Shampoo (Lin et al., 2025, "Understanding and Improving Shampoo and SOAP via KL
            Minimization"): each factor accumulates its Gram matrix whitened by the other factors'
            inverses, :math:`F_k \leftarrow \beta_s F_k + (1-\beta_s) \tfrac{d_k}{N} G_{(k)}
            (\bigotimes_{j \ne k} F_j^{-1}) G_{(k)}^\top` (a matrix: :math:`L \leftarrow \beta_s L +
            \tfrac{1-\beta_s}{n} G R^{-1} G^\top` and likewise for R), and the preconditioner is
            :math:`(F_1 \otimes \dots \otimes F_K)^{-1/2}` (every factor to :math:`-1/2`, whatever K:
            the factors' product now estimates the gradient's second moment itself, as Adam's
            :math:`v` does). The inverses are the squares of the current roots
            :math:`(F_j + \epsilon_F \lambda_{\max} I)^{-1/2}` (so ``exponent_override`` must be None
            or 0.5), all from before the step's update; under KL the roots are also computed at step 1,
            after the first update, which starts from isotropic factors whose Kronecker product has the
            first gradient's mean square (``soap_optim.eigenbasis.kl`` says why). The paper runs
            KL-Shampoo without grafting; here ``grafting`` stays what you set (the paper's method is
            ``grafting="none", start_preconditioning_step=1``: on the benchmark's language model it beat
            the defaults, while KL with Adam grafting did worse; ``benchmarks/README.md``). Through the
            fused factor kernel where ``fused`` picks it (fed the whitened unfoldings).

    State per parameter (merged layout): ``step``, ``exp_avg``, ``exp_avg_sq`` (adam/rmsprop
    grafting only), ``factors`` and ``roots`` (one d x d matrix per axis, ``None`` for an axis that
    is not preconditioned; roots start as the identity). Floating state is float32 (float64 for
    float64 parameters).
    """

    #: The defaults before the benchmark study (Adam's betas, AdaGrad-style sums of the factors as in
    #: Gupta et al.): ``Shampoo(params, **Shampoo.REFERENCE)``.
    REFERENCE = dict(
        lr=1e-3, betas=(0.9, 0.999), shampoo_beta=1.0, eps=1e-8, matrix_eps=1e-6, weight_decay=1e-2,
        precondition_frequency=10, start_preconditioning_step=10, exponent_override=None, grafting="adam",
        max_precond_dim=10000, merge_dims=False, precondition_1d=False, data_format="channels_first",
    )

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.95),
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        matrix_eps: float = 1e-6,
        weight_decay: float = 1e-2,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 10,
        exponent_override: Optional[float] = None,
        grafting: str = "adam",
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        data_format: str = "channels_first",
        *,
        maximize: bool = False,
        orthograd: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        skip_nonfinite_grads: bool = False,
        process_group=None,
        shard_over_replicas: bool = False,
        fused: Optional[bool] = None,
        factor_update: str = "gram",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            matrix_eps=matrix_eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            exponent_override=exponent_override,
            grafting=grafting,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            data_format=data_format,
            maximize=maximize,
            orthograd=orthograd,
            state_dtype=state_dtype,
            skip_nonfinite_grads=skip_nonfinite_grads,
            fused=fused,
            factor_update=factor_update,
        )
        super().__init__(params, defaults, process_group=process_group, shard_over_replicas=shard_over_replicas)

    _layout_keys = ("max_precond_dim", "merge_dims", "precondition_1d", "data_format", "state_dtype")

    def _validate_group(self, group: Dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_unit_interval("shampoo_beta", group["shampoo_beta"], allow_one=True)
        check_non_negative("eps", group["eps"])
        check_non_negative("matrix_eps", group["matrix_eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive_int("precondition_frequency", group["precondition_frequency"])
        check_positive_int("start_preconditioning_step", group["start_preconditioning_step"])
        exponent = group["exponent_override"]
        if exponent is not None:
            if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real) or not (
                0 < exponent and math.isfinite(exponent)
            ):
                raise ValueError(
                    f"Invalid exponent_override: {exponent!r} (must be None or a finite number > 0; "
                    f"factors are raised to -exponent_override)"
                )
        check_choice("grafting", group["grafting"], GRAFTINGS)
        check_plan_options(group)
        check_choice("fused", group["fused"], (None, True, False))
        check_choice("factor_update", group["factor_update"], FACTOR_UPDATES)
        if group["factor_update"] == "kl" and exponent not in (None, 0.5):
            raise ValueError(
                f"Invalid exponent_override: {exponent!r} with factor_update='kl' (KL-Shampoo raises every "
                f"factor to -1/2 and whitens the factor updates with the squares of those roots: use None or 0.5)"
            )

    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        plan = plan_for(param, group)
        matrices = [None if d is None else (d, d) for d in plan.factor_dims]
        shapes = {"exp_avg": plan.merged_shape, "factors": matrices, "roots": matrices}
        if group["grafting"] in ("adam", "rmsprop"):
            shapes["exp_avg_sq"] = plan.merged_shape
        return shapes

    def _is_elementwise(self, shape: torch.Size, hyper: Dict[str, Any]) -> bool:
        plan = plan_for_shape(shape, hyper)
        return not plan.is_preconditioned and plan.merged_shape == tuple(shape)

    def _cost(self, shape: torch.Size, hyper: Dict[str, Any]) -> float:
        """Multiply-adds per step: factor EMA and preconditioning (2 N d per axis of length d), inverse
        roots by eigh (~10 d^3 per factor) every f steps, and a few elementwise passes."""
        plan = plan_for_shape(shape, hyper)
        numel = math.prod(plan.merged_shape)
        dims = [d for d in plan.factor_dims if d is not None]
        cost = 2 * numel * sum(dims) + sum(10 * d**3 for d in dims) / hyper["precondition_frequency"] + 10 * numel
        if hyper["factor_update"] == "kl":  # each factor's statistic whitened by the other roots
            cost += (len(dims) - 1) * numel * sum(dims)
        return cost

    def _max_grad_norm(self, shape: torch.Size, hyper: Dict[str, Any], dtype: torch.dtype) -> float:
        """The base's limit for the "adam"/"rmsprop" grafts (they square the gradient); none for "sgd" and
        "none", which never square it (the factors' Gram matrices are guarded by ``update_factors_``)."""
        if hyper["grafting"] in ("adam", "rmsprop"):
            return super()._max_grad_norm(shape, hyper, dtype)
        return math.inf

    def _step_group(self, group: Dict[str, Any], slots: List[Slot], screen: Screen) -> None:
        for slot in slots:
            plan = plan_for_shape(slot.shape, group)
            if tuple(slot.param.shape) != tuple(slot.shape):  # a local shard (FSDP2) of an elementwise tensor
                plan = unpreconditioned_plan(tuple(slot.param.shape))
            grad = plan.to_merged(slot.grad)
            state = slot.state
            if not state:
                state["step"] = new_step_count()
                state["exp_avg"] = torch.zeros_like(grad)
                state["factors"] = zero_factors(plan.factor_dims, dtype=grad.dtype, device=grad.device)
                state["roots"] = [
                    None if d is None else torch.eye(d, dtype=grad.dtype, device=grad.device)
                    for d in plan.factor_dims
                ]
            if group["grafting"] in ("adam", "rmsprop") and "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            direction = shampoo_direction_(grad, state, plan, group, guard_overflow=screen.grams_may_overflow)
            lr = float(group["lr"])
            decay_then_update_(slot.param, plan.from_merged(direction), lr, lr * group["weight_decay"])


def shampoo_direction_(
    grad: torch.Tensor, state: Dict[str, Any], plan: Plan, group: Dict[str, Any], guard_overflow: bool = True
) -> torch.Tensor:
    """Advance one parameter's state with ``grad`` (merged layout) and return its update direction."""
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = int(state["step"].item())
    exp_avg = state["exp_avg"]
    first_moment_ema_(exp_avg, grad, beta1)
    momentum = exp_avg / (1 - beta1**step)

    grafting = group["grafting"]
    graft = None
    if grafting in ("adam", "rmsprop"):
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).clamp_(max=torch.finfo(exp_avg_sq.dtype).max)
        bias_correction2 = 1 - beta2**step if grafting == "adam" else 1.0
        graft = adam_normalize(momentum, exp_avg_sq, bias_correction2, group["eps"])
    elif grafting == "sgd":
        graft = momentum

    if not plan.is_preconditioned:
        return momentum if graft is None else graft
    factors, roots = state["factors"], state["roots"]
    beta_s = group["shampoo_beta"]
    if beta_s == 1:
        halve_saturating_sums_(factors)
    kl = group["factor_update"] == "kl"
    if kl:
        # the roots are (F + eps I)^{-1/2}: their squares are the inverses the KL update whitens with
        rows = [None if f is None else f.unsqueeze(0) for f in factors]  # views: updated in place
        factor_ema_ = factor_ema_for(group["fused"], factors)
        if step == 1:
            initial_kl_factors_(rows, grad.unsqueeze(0), beta_s, factor_ema_)
        else:
            whiteners = [None if r is None else r.unsqueeze(0) for r in roots]
            kl_factor_ema_(rows, grad.unsqueeze(0), whiteners, beta_s, factor_ema_)
    else:
        update_factors_maybe_fused_(factors, grad, beta_s, group["fused"], guard_overflow)
    start = group["start_preconditioning_step"]
    due = step >= start and (step - start) % group["precondition_frequency"] == 0
    if due or (kl and step == 1):  # KL: the first factors' roots whiten the updates until t0
        exponent = root_exponent(plan, group["exponent_override"], group["factor_update"])
        for axis, factor in enumerate(factors):
            if factor is None:
                continue
            roots[axis] = inverse_root(factor, exponent, group["matrix_eps"], previous=roots[axis])
    if step < start:
        return momentum if graft is None else graft
    direction = project(momentum, roots)  # roots are symmetric: project == project_back
    if graft is None:
        return direction
    # Per-tensor grafting: the Shampoo direction with the graft's Frobenius norm (0 stays 0).
    norm = torch.linalg.vector_norm(direction)
    scale = torch.where(norm > 0, torch.linalg.vector_norm(graft) / norm, torch.zeros_like(norm))
    return direction.mul_(scale)
