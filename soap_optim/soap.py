"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024)."""
from __future__ import annotations

import math
from collections import ChainMap, Counter
from functools import partial
from typing import Any, Callable, Dict, List, MutableMapping, NamedTuple, Optional, Tuple

import torch

from .eigenbasis import (
    Plan,
    initial_basis,
    plan_for_shape,
    unpreconditioned_plan,
    check_plan_options,
    project,
    project_back,
    permute_axes_,
    plan_for,
    refresh_bases_,
    update_factors_,
    without_overflowing_grams,
    zero_factors,
)
from .eigenbasis.kl import (
    eigenbasis_whiteners,
    estimates_of,
    initial_kl_factors_,
    new_eigenvalues,
    whitened_unfoldings,
)
from .buckets import bucket_pools, flat_state
from .dispatch import get_ops, resolve_ops
from .moment_math import apply_update_, factored_second_moment, first_moment_ema_, update_factored_moments_
from .newton_schulz import multiply_adds, nesterov_ratio, orthogonalize, rms_scale
from .optimizer import Screen, Slot, SoapOptimizerBase, advance_step_counts, new_step_count
from .pending_writes import PendingWrites
from .validation import (
    check_betas,
    check_bool,
    check_choice,
    check_lr,
    check_non_negative,
    check_positive_int,
)


# Inputs of the rotation products on the batched/fused path; accumulation is always float32
# (soap_optim.kernels.reference says what each rounds, the README what each costs).
ROTATION_PRECISIONS = ("fp32", "tf32x3", "tf32", "bf16")

# How the Kronecker factors are updated: Shampoo's Gram matrices, or the KL-minimizing whitened ones
# (soap_optim.eigenbasis.kl).
FACTOR_UPDATES = ("gram", "kl")


class SOAP(SoapOptimizerBase):
    r"""SOAP (ShampoO with Adam in the Preconditioner's eigenbasis).

    For every parameter, with gradient :math:`G` viewed in its merged layout (see ``merge_dims``)
    and one Kronecker factor :math:`F_k` with eigenbasis :math:`Q_k` per preconditioned axis:

    .. math::
        \begin{aligned}
        &\textbf{first step: } F_k \leftarrow (1-\beta_s) C_k(G),\;
            Q_k \leftarrow \mathrm{eigh}(F_k) \text{ (descending)};\ \theta \text{ unchanged} \\
        &\textbf{step } t \ge 1: \\
        &\quad \tilde G = G \times_1 Q_1^\top \times_2 Q_2^\top \cdots \\
        &\quad m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde G, \quad
              v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde G^2 \\
        &\quad u = \big(m_t / (\sqrt{v_t} + \epsilon)\big) \times_1 Q_1 \times_2 Q_2 \cdots
              \quad (\text{optionally } u \leftarrow u / \mathrm{rms}(u)) \\
        &\quad \theta \leftarrow (1 - \gamma\lambda)\big(\theta - \gamma
              \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} u\big) \\
        &\quad F_k \leftarrow \beta_s F_k + (1-\beta_s) C_k(G) \\
        &\quad \text{if } t \bmod f = 0:\ Q_k \leftarrow \mathrm{QR}(F_k Q_k[:, \pi_k]),\
              \pi_k = \mathrm{argsort}\downarrow \mathrm{diag}(Q_k^\top F_k Q_k);\
              v \text{ permuted by } \pi_k,\ m \text{ rotated into the new basis}
        \end{aligned}

    where :math:`C_k(G) = G_{(k)} G_{(k)}^\top` is the mode-k Gram matrix, :math:`\gamma` is ``lr``,
    :math:`\lambda` is ``weight_decay``, :math:`f` is ``precondition_frequency`` and
    :math:`\beta_s` is ``shampoo_beta`` (``betas[1]`` when negative).

    Defaults: ``betas=(0.9, 0.95)`` and ``precondition_frequency=2`` (``shampoo_beta`` follows
    ``betas[1]``), chosen by a seeded study on the benchmark's tasks (``benchmarks/README.md``,
    "Defaults"): on the language model each change alone lowered the final loss and both together most
    (2.09 -> 1.93 nats/byte, intervals apart); on least squares beta1 0.9 reached the target in 3/4 of
    the steps. The reference
    implementation (Vyas et al.) uses ``betas=(0.95, 0.95)`` and a refresh every 10 steps, tuned for
    360M-660M-parameter language models at large batch; ``SOAP(params, **SOAP.REFERENCE)`` restores all
    of its defaults. A refresh costs a few plain steps (QR of each factor's power step);
    ``refresh_tolerance`` skips the refreshes whose basis has not drifted.

    Memory-lean variants (section "space and time" of the paper), combinable:

    * ``one_sided=True``: a single factor per parameter, on the smallest eligible merged axis
      (or on merged axis ``one_sided_dim``); the other axes are left in the standard basis.
    * ``factorized=True``: for 2-D (merged) parameters the second moment in the eigenbasis is
      Adafactor-style factored, :math:`\hat v = r c^\top / \sum_i r_i` from row sums :math:`r` and
      column sums :math:`c` of :math:`\tilde G^2` (EMAs with :math:`\beta_2`).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate; also scales the decoupled weight decay.
        betas: Adam's (beta1, beta2) for the moments kept in the eigenbasis.
        shampoo_beta: EMA factor of the Kronecker factors; a negative value means ``betas[1]``.
        eps: added to :math:`\sqrt{v_t}` before bias correction.
        weight_decay: decoupled decay, applied to the already-updated weights.
        precondition_frequency: eigenbasis refresh period (read every step, so it can be scheduled).
        max_precond_dim: an axis longer than this gets no factor (identity on that axis); ``0``: no
            factor at all, Adam in the standard basis (``soap_optim.hidden_groups`` uses it for embeddings).
        merge_dims: merge adjacent axes while their product stays ``<= max_precond_dim``.
        precondition_1d: give 1-D tensors with ``n <= max_precond_dim`` an n x n factor.
        normalize_grads: rescale each tensor's update to unit RMS.
        data_format: ``"channels_first"`` or ``"channels_last"``. With ``merge_dims`` a 4-D tensor
            is permuted (0, 3, 1, 2) first under ``"channels_last"``, which assumes (O, H, W, I)
            storage. PyTorch conv weights are (O, I, kH, kW) whatever their memory format, so
            PyTorch users should keep ``"channels_first"``.
        correct_bias: Adam bias correction.
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
        one_sided: keep one factor per parameter (see above).
        one_sided_dim: merged axis to precondition when ``one_sided`` (default: the smallest).
        factorized: factored second moment for 2-D (merged) parameters (see above).
        foreach: ``None``/``True``: parameters of a group with the same merged shape (2-D or more)
            are stepped together through batched ops, unpreconditioned ones through one elementwise
            Adam; ``False``: one parameter at a time.
        fused: ``None``: Triton kernels for CUDA tensors when triton imports, else the batched
            PyTorch path; ``True``: Triton kernels or an error saying why they cannot run;
            ``False``: the batched PyTorch path.
        rotation_precision: inputs of the rotation products on the batched/fused path:
            ``"fp32"`` (default: float32 products), ``"tf32x3"`` (three TF32 tensor-core products,
            float32-level accuracy), ``"tf32"`` or ``"bf16"`` (operands rounded to nearest; float32
            accumulation always). The twins round exactly as the kernels do, and the user's global
            matmul settings never apply. The one-parameter path always uses ``"fp32"``.
        refresh_tolerance: ``0`` (default): every due refresh runs. ``> 0``: a due refresh of a
            basis :math:`Q` runs only where :math:`Q^\top F Q` has drifted from diagonal, relative
            off-diagonal Frobenius mass above the tolerance (read from the power step :math:`F Q`
            at no extra product); elsewhere the basis, the moments' order and :math:`m` stay as they
            are and the QR is skipped. Makes a frequent ``precondition_frequency`` cheap once the
            bases settle. Deciding which QRs to skip reads the device (one host sync per bucket and
            preconditioned axis on refresh steps); with ``0`` a refresh reads nothing.
        factor_update: ``"gram"`` (default): :math:`F_k` accumulates the mode-k Gram matrices as above.
            ``"kl"``: KL-SOAP (Lin et al., 2025, "Understanding and Improving Shampoo and SOAP via KL
            Minimization"): each factor accumulates its Gram matrix whitened by the other factors'
            inverses, all taken before the step's update,

            .. math::
                F_k \leftarrow \beta_s F_k + (1-\beta_s) \tfrac{d_k}{N}
                    G_{(k)} \big(\textstyle\bigotimes_{j \ne k} F_j^{-1}\big) G_{(k)}^\top
                \quad (\text{a matrix: } L \leftarrow \beta_s L + \tfrac{1-\beta_s}{n} G R^{-1} G^\top,\
                R \leftarrow \beta_s R + \tfrac{1-\beta_s}{m} G^\top L^{-1} G)

            with :math:`F_j^{-1} \approx Q_j \mathrm{diag}(\lambda_j)^{-1} Q_j^\top`, :math:`\lambda_j` the
            estimates :math:`\mathrm{diag}(Q_j^\top F_j Q_j)` of the last basis computation (state
            ``eigenvalues``; the refresh's power-step estimates, re-ordered like the columns), clamped
            below at 1e-6 of their largest. The first update starts from isotropic factors
            :math:`\rho I` whose Kronecker product has the first gradient's mean square
            (``soap_optim.eigenbasis.kl`` says why scale and isotropy matter). Everything else is
            SOAP's. Costs one more mode product per pair of axes per step (a refresh's estimates come
            from the :math:`F Q` of its power step). On every path (one-parameter, batched, fused: the
            kernels' factor op is fed the whitened unfoldings), with ``one_sided`` (a single factor: its
            Gram matrix, scaled) and ``factorized``.

        newton_schulz: the SOAP-basis + Newton-Schulz hybrid (``soap_optim.newton_schulz``). A merged
            matrix with a preconditioned axis takes, instead of Adam's ratio, the approximate polar factor of
            the ratio with Nesterov's look-ahead (Muon's five quintic Newton-Schulz iterations), scaled to
            AdamW's update RMS as Muon's ``match_rms_adamw`` does:

            .. math::
                u = Q_L\, \mathrm{NS}_5\Big(\frac{\beta_1 m_t + (1-\beta_1)\tilde G}{\sqrt{v_t}+\epsilon}\Big)
                    Q_R^\top, \qquad
                \theta \leftarrow (1-\gamma\lambda)\big(\theta - 0.2\sqrt{\max(m, n)}\,\gamma\, u\big)

            (no bias correction: the polar factor does not see scale). Since the polar factor commutes with
            the rotation, this is Muon's orthogonalization of SOAP's direction. Factors, bases and moments
            are SOAP's; other tensors keep SOAP's update. The orthogonalization makes a stale basis cheap:
            a refresh every 10 steps did as well as every 2 (``benchmarks/README.md``, "SOAP + Newton-Schulz",
            where it is measured against Muon). On every path; one more batched product chain per bucket.

    State per parameter: ``step`` (number of real updates; the first call only builds the
    preconditioner), ``exp_avg`` and ``exp_avg_sq`` (in the eigenbasis, in the merged layout),
    (``exp_avg_sq_row`` and ``exp_avg_sq_col`` instead of ``exp_avg_sq`` when factorized),
    ``factors`` and ``bases`` (one d x d matrix per merged axis, ``None`` where the axis is not
    preconditioned), and under ``factor_update="kl"`` ``eigenvalues`` (one [d] vector per factor;
    a checkpoint without them estimates them from factors and bases at the next step). All floating
    state is float32 (float64 for float64 parameters), whatever the parameter dtype, and stays so
    across ``load_state_dict``.

    Non-finite gradients raise ``FloatingPointError`` naming the parameter, before anything is
    modified (``torch.amp.GradScaler`` never calls ``step`` with them, so mixed precision is fine); so
    does a gradient whose Frobenius norm is above half the state dtype's max, which the rotation could
    overflow.
    """

    #: The reference implementation's defaults (Vyas et al.'s code): ``SOAP(params, **SOAP.REFERENCE)``.
    REFERENCE = dict(
        lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01, precondition_frequency=10,
        max_precond_dim=10000, merge_dims=False, precondition_1d=False, normalize_grads=False,
        data_format="channels_first", correct_bias=True,
    )

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: Tuple[float, float] = (0.9, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 2,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        maximize: bool = False,
        orthograd: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        skip_nonfinite_grads: bool = False,
        process_group=None,
        shard_over_replicas: bool = False,
        one_sided: bool = False,
        one_sided_dim: Optional[int] = None,
        factorized: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        rotation_precision: str = "fp32",
        refresh_tolerance: float = 0.0,
        factor_update: str = "gram",
        newton_schulz: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
            maximize=maximize,
            orthograd=orthograd,
            state_dtype=state_dtype,
            skip_nonfinite_grads=skip_nonfinite_grads,
            one_sided=one_sided,
            one_sided_dim=one_sided_dim,
            factorized=factorized,
            foreach=foreach,
            fused=fused,
            rotation_precision=rotation_precision,
            refresh_tolerance=refresh_tolerance,
            factor_update=factor_update,
            newton_schulz=newton_schulz,
        )
        super().__init__(params, defaults, process_group=process_group, shard_over_replicas=shard_over_replicas)

    _layout_keys = (
        "max_precond_dim", "merge_dims", "precondition_1d", "data_format", "one_sided", "one_sided_dim",
        "factorized", "state_dtype",
    )
    _optional_state_keys = ("eigenvalues",)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        shampoo_beta = group["shampoo_beta"]
        check_non_negative("shampoo_beta", abs(shampoo_beta))
        if not shampoo_beta < 1:
            raise ValueError(f"Invalid shampoo_beta: {shampoo_beta} (must be < 1; negative means betas[1])")
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive_int("precondition_frequency", group["precondition_frequency"])
        check_non_negative("refresh_tolerance", group["refresh_tolerance"])
        check_plan_options(group)
        for flag in ("normalize_grads", "correct_bias", "factorized", "newton_schulz"):
            check_bool(flag, group[flag])
        if group.get("rotate_second_moment", False) is not False:  # a param group saved by an older version
            raise ValueError(
                "rotate_second_moment was removed: carrying the second moment to a refreshed basis did not "
                "measurably help any benchmark task (benchmarks/README.md); a checkpoint that used it cannot "
                "be continued as it was. Set param_group['rotate_second_moment'] = False to continue with the "
                "second moment permuted as the reference does.")
        for flag in ("foreach", "fused"):
            if group[flag] is not None:
                check_bool(flag, group[flag])
        check_choice("rotation_precision", group["rotation_precision"], ROTATION_PRECISIONS)
        check_choice("factor_update", group["factor_update"], FACTOR_UPDATES)

    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        plan = plan_for(param, group)
        matrices = [None if d is None else (d, d) for d in plan.factor_dims]
        shapes = {"exp_avg": plan.merged_shape, "factors": matrices, "bases": matrices}
        if group["factor_update"] == "kl":  # optional: estimated from factors and bases when missing
            shapes["eigenvalues"] = [None if d is None else (d,) for d in plan.factor_dims]
        if _is_factored(plan, group):
            shapes["exp_avg_sq_row"], shapes["exp_avg_sq_col"] = plan.merged_shape[:1], plan.merged_shape[1:]
        else:
            shapes["exp_avg_sq"] = plan.merged_shape
        return shapes

    def _check_can_step(self, hyper: Dict[str, Any], params) -> None:
        super()._check_can_step(hyper, params)
        if hyper["one_sided"] and hyper["one_sided_dim"] is not None:
            for param in params:
                plan_for_shape(param.shape, hyper)  # ValueError for a one_sided_dim out of this shape's range

    def _is_elementwise(self, shape: torch.Size, hyper: Dict[str, Any]) -> bool:
        plan = plan_for_shape(shape, hyper)
        return (
            not plan.is_preconditioned
            and plan.merged_shape == tuple(shape)
            and not hyper["normalize_grads"]
            and not _is_factored(plan, hyper)
        )

    def _cost(self, shape: torch.Size, hyper: Dict[str, Any]) -> float:
        """Multiply-adds per step: the factor EMA and the rotations in and out (3 N d per preconditioned
        axis of length d, N elements), a refresh every f steps (F Q and QR, ~4 d^3 per factor, plus the
        first moment's rotation into the new basis, 2 N d), and a few elementwise passes."""
        plan = plan_for_shape(shape, hyper)
        numel = math.prod(plan.merged_shape)
        dims = [d for d in plan.factor_dims if d is not None]
        refresh = sum(4 * d**3 + 2 * numel * d for d in dims) / hyper["precondition_frequency"]
        cost = 3 * numel * sum(dims) + refresh + 10 * numel
        if hyper["factor_update"] == "kl":  # whitening by the other factors (the estimates: the refresh's F Q)
            cost += (len(dims) - 1) * numel * sum(dims)
        if _orthogonalizes(hyper, plan):
            cost += multiply_adds(plan.merged_shape)
        return cost

    # _max_grad_norm: the base's sqrt(max)/2. The rotation's partial sums are bounded by ||G||_F (orthonormal
    # columns, Cauchy-Schwarz), so the rotated entries, their squares and every EMA stay finite below it.

    def _math_allocates_first(self, hyper: Dict[str, Any], slots: List[Slot]) -> bool:
        # The PyTorch paths compute every new value before they write and hold the writes back (see
        # soap_optim.pending_writes); not so with the Triton kernels (the factor kernel is launched, and
        # compiled the first time, while the writes are applied).
        return hyper["foreach"] is False or not (
            hyper["fused"] is True or (hyper["fused"] is None and any(slot.param.is_cuda for slot in slots))
        )

    def _holds_writes(self, hyper: Dict[str, Any], slots: List[Slot]) -> bool:
        return True  # every path returns its writes (see _step_group)

    def _step_group(self, group: Dict[str, Any], slots: List[Slot], screen: Screen) -> PendingWrites:
        guard = screen.grams_may_overflow
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
        writes = PendingWrites()
        kl = group["factor_update"] == "kl"
        ready, kinds = [], []
        # a group's tensors come in a few shapes: one plan per shape, and with it which bucket kind its
        # tensors may join (a rotated matrix bucket, the elementwise bucket, or neither)
        plans: Dict[Tuple, Tuple[Plan, str]] = {}
        for slot in slots:
            shapes = (slot.param.shape, slot.shape)
            planned = plans.get(shapes)
            if planned is None:
                plan = plan_of(slot, group)
                if len(plan.merged_shape) >= 2 and plan.is_preconditioned:
                    kind = "matrix"
                elif (
                    not plan.is_preconditioned
                    and not group["normalize_grads"]
                    and plan.merged_shape == tuple(slot.param.shape)
                ):
                    kind = "elementwise"  # no rotation at all: plain Adam, batched over same-step tensors
                else:
                    kind = "single"
                planned = plans[shapes] = (plan, kind)
            plan, kind = planned
            grad = plan.to_merged(slot.grad)
            state = slot.state
            if not state:
                _init_state(state, plan, grad, shampoo_beta, factored=_is_factored(plan, group), guard=guard, kl=kl)
            else:
                ready.append((slot.param, grad, _match_eigenvalues(state, kl, writes), plan))
                kinds.append(kind)
        steps = next_steps([state for _, _, state, _ in ready], writes)
        make = tuple.__new__  # _Item(...) without the keyword handling of a NamedTuple's __new__ (one per tensor)
        ready = [make(_Item, (*fields, step)) for fields, step in zip(ready, steps)]
        if screen.storage_shared:  # before any bucketing: such parameters may land in different buckets
            stepped = _sequential_if_shared(ready, group, shampoo_beta, guard)
            ready = [item for item, done in zip(ready, stepped) if not done]
            kinds = [kind for kind, done in zip(kinds, stepped) if not done]
        if group["foreach"] is False:
            for item in ready:
                soap_update_(item.param, item.grad, item.state, item.plan, group, shampoo_beta, item.step, guard, writes)
            return writes
        buckets: Dict[Tuple, List[_Item]] = {}
        for item, kind in zip(ready, kinds):
            param, grad, state, plan, step = item
            if kind == "matrix" and "exp_avg_sq" in state:
                key = (plan.merged_shape, plan.preconditioned, grad.dtype, grad.device)
            elif kind == "elementwise" and "exp_avg_sq" in state:
                key = ("elementwise", grad.dtype, param.dtype, grad.device, step)
            else:
                soap_update_(param, grad, state, plan, group, shampoo_beta, step, guard, writes)
                continue
            buckets.setdefault(key, []).append(item)
        if buckets:
            participation = self.__dict__.setdefault("_participation", {})  # see buckets.bucket_pools
            ops = resolve_ops(group["fused"], (item.state["exp_avg"] for items in buckets.values() for item in items))
            for key, items in buckets.items():
                if key[0] == "elementwise":
                    soap_elementwise_update_(items, group, ops, writes)
                else:
                    soap_bucket_update_(items, group, shampoo_beta, ops, writes, guard, participation)
        return writes


class _Item(NamedTuple):
    param: torch.Tensor
    grad: torch.Tensor  # merged layout, state precision, sign-flipped under maximize
    state: MutableMapping[str, Any]  # the state, or a view with what the step's writes add (_match_eigenvalues)
    plan: Plan
    step: int = 0  # the step this update takes (state["step"] + 1, see next_steps)


def plan_of(slot: Slot, group: Dict[str, Any]) -> Plan:
    """The plan of a slot's parameter; a local shard of an elementwise-stepped parameter (FSDP2) is
    unpreconditioned and unmerged whatever its own shape."""
    if tuple(slot.param.shape) != tuple(slot.shape):
        return unpreconditioned_plan(tuple(slot.param.shape))
    return plan_for_shape(slot.shape, group)


def _is_factored(plan: Plan, group: Dict[str, Any]) -> bool:
    return group["factorized"] and len(plan.merged_shape) == 2


def _init_state(
    state: Dict[str, Any], plan: Plan, grad: torch.Tensor, shampoo_beta: float, factored: bool, guard: bool = True,
    kl: bool = False,
) -> None:
    """First step for a parameter: build factors and the first bases from ``grad``; no update. Under the KL
    factor update the factors start balanced and the eigenvalues are the first bases' (see ``eigenbasis.kl``)."""
    state["step"] = new_step_count()
    # contiguous whatever the gradient's strides (a channels_last merge gives a permuted view)
    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
    if factored:
        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[0])
        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[1])
    else:
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
    state["factors"] = zero_factors(plan.factor_dims, dtype=grad.dtype, device=grad.device)
    if kl:
        initial_kl_factors_(
            _as_batch_of_one(state["factors"]), grad.unsqueeze(0), shampoo_beta, get_ops(False).factor_ema_
        )
    else:
        update_factors_(state["factors"], grad, shampoo_beta, guard)
    state["bases"] = [None if f is None else initial_basis(f) for f in state["factors"]]
    if kl:
        state["eigenvalues"] = estimates_of(state["factors"], state["bases"])


def _match_eigenvalues(state: Dict[str, Any], kl: bool, writes: PendingWrites) -> MutableMapping[str, Any]:
    """The state as this step's math sees it, with ``eigenvalues`` exactly under the KL factor update:
    estimated from the factors and bases where the entry is missing (a checkpoint from before it, or a
    group switched to "kl"), dropped otherwise (so that a later switch back re-estimates instead of using
    stale values). Both changes are among ``writes``, so that a step that fails leaves the state as it
    was; until then the math sees new estimates through the returned view (the state itself where
    nothing is added), and decides by ``kl``, never by the entry, whether to use them."""
    if not kl:
        if "eigenvalues" in state:
            writes.update(partial(state.pop, "eigenvalues"))
            writes.relaid = True  # rows of a bucket's pool may be left unused
        return state
    if "eigenvalues" in state:
        return state
    added = {"eigenvalues": estimates_of(state["factors"], state["bases"])}
    writes.update(partial(state.update, added))
    return _StateWithAdded(added, state)


class _StateWithAdded(ChainMap):
    """A state (``maps[1]``) with the entries that its step's writes add (``maps[0]``): the math reads both;
    what it stores under the state's own keys (a bucket stacking the entries into its pools) goes to the
    state itself, what it stores under an added key (the rows of a new pool) stays with the addition."""

    def __setitem__(self, key: str, value: Any) -> None:
        (self.maps[0] if key in self.maps[0] else self.maps[1])[key] = value


def _whiteners(bases, eigenvalues: Optional[List[Optional[torch.Tensor]]]):
    """The KL update's whiteners Q diag(lambda)^{-1/2}, or None for the Gram update (no eigenvalues)."""
    return None if eigenvalues is None else eigenbasis_whiteners(bases, eigenvalues)


def soap_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Dict[str, Any],
    plan: Plan,
    group: Dict[str, Any],
    shampoo_beta: float,
    step: int,
    guard: bool = True,
    writes: Optional[PendingWrites] = None,
) -> None:
    """One SOAP step for one parameter; ``grad`` is in the merged layout and state precision.

    ``step``: the step this update takes (``state["step"] + 1``; the counter itself is the caller's, see
    ``next_steps``). Every new value is computed before anything is written; the writes are left in
    ``writes`` for the caller to apply, or applied at the end without it. ``guard=False`` skips the
    factor-overflow check (the caller knows the gradient is small enough)."""
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    bases = state["bases"]

    rotated = project(grad, bases)
    exp_avg = first_moment_ema_(state["exp_avg"].clone(), rotated, beta1)
    second = {key: state[key].clone() for key in _SECOND_MOMENTS if key in state}
    estimate = _second_moment_update_(second, rotated, beta2)
    if _orthogonalizes(group, plan):
        # as the bucket path does it, on a batch of one (see soap_optim.newton_schulz)
        ratio = nesterov_ratio(exp_avg, state["exp_avg"], estimate, beta1, group["eps"])
        update = project_back(orthogonalize(ratio.unsqueeze(0))[0], bases)
        step_size = lr * rms_scale(plan.merged_shape)
    else:
        step_size = _step_size(group, step)
        update = project_back(exp_avg / estimate.sqrt().add_(group["eps"]), bases)
    if group["normalize_grads"]:
        update = update / (1e-30 + update.square().mean().sqrt())
    new_param = param.clone()
    apply_update_(new_param, plan.from_merged(update), step_size, lr * group["weight_decay"])
    factor_grad = without_overflowing_grams(grad) if guard else grad

    now = writes is None
    writes = PendingWrites() if now else writes
    writes.copy(state["exp_avg"], exp_avg)
    for key, value in second.items():
        writes.copy(state[key], value)
    writes.copy(param, new_param)
    # a batch of one through the bucket path's factor op, so that both paths accumulate the same bits
    eigenvalues = state["eigenvalues"] if group["factor_update"] == "kl" else None  # see _match_eigenvalues
    whiteners = None if eigenvalues is None else _whiteners(_as_batch_of_one(bases), _as_batch_of_one(eigenvalues))
    writes.update(_bucket_factor_ema(
        _as_batch_of_one(state["factors"]), factor_grad.unsqueeze(0), shampoo_beta, get_ops(False), whiteners
    ))
    if step % group["precondition_frequency"] == 0:
        writes.refresh(partial(_refresh_one_, state, group))
        # a refreshed basis replaces the entry: a row of a bucket's pool would be left unused
        writes.relaid |= any(basis is not None and basis._base is not None for basis in bases)
    if now:
        writes.apply()


# the second-moment statistics a state may keep: the full one, or Adafactor-style row and column sums
_SECOND_MOMENTS = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")


def next_steps(states: List[Dict[str, Any]], writes: PendingWrites) -> List[int]:
    """The step each state takes now, ``state["step"] + 1``, with one host read; the counters advance (in
    one op) when ``writes`` are applied."""
    if not states:
        return []
    counters = [state["step"] for state in states]
    writes.update(advance_step_counts(counters))
    return [int(count) + 1 for count in torch.stack(counters).tolist()]


def _orthogonalizes(group: Dict[str, Any], plan: Plan) -> bool:
    """Whether a parameter takes the Newton-Schulz update: a merged matrix with a preconditioned axis, under
    ``newton_schulz`` (other tensors keep SOAP's Adam update)."""
    return group["newton_schulz"] and len(plan.merged_shape) == 2 and plan.is_preconditioned


def _step_size(group: Dict[str, Any], step: int) -> float:
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t) with bias correction, else lr."""
    lr = float(group["lr"])
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def _as_batch_of_one(tensors: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """[1, ...] views of ``tensors`` (None stays None): one parameter's state as a bucket of one."""
    return [None if t is None else t.unsqueeze(0) for t in tensors]


def _refresh_stack_(
    factors: List[Optional[torch.Tensor]], bases: List[Optional[torch.Tensor]], exp_avg: torch.Tensor,
    second_moments: List[torch.Tensor], group: Dict[str, Any], rows: Optional[List[int]] = None,
    install: Optional[Callable[[int, torch.Tensor], None]] = None,
    eigenvalues: Optional[List[Optional[torch.Tensor]]] = None,
) -> None:
    """Refresh a stack's bases ([B, d, d], None for an axis without one) and carry its moments ([B, *merged])
    to them: the full second moment, or the row and column sums (``second_moments``), permuted with the
    columns. ``rows``: only these members of the stack (those due, in a bucket whose members are at
    different steps), gathered into one smaller stack and written back. ``install(axis, new_stack)``: puts
    a new basis in place of copying it into the old one. ``eigenvalues`` ([B, d] per axis, the KL
    update's): replaced by the refresh's estimates, re-ordered like the columns (see ``eigenbasis.kl``).
    Everything is computed before anything is written, so an exception leaves the stack as it was (see
    ``pending_writes``)."""
    moments = [exp_avg, *second_moments]
    index = None if rows is None else torch.tensor(rows, device=exp_avg.device)
    if index is None:
        old_bases, carried = list(bases), [moment.clone() for moment in moments]
    else:
        factors = [None if f is None else f.index_select(0, index) for f in factors]
        old_bases = [None if b is None else b.index_select(0, index) for b in bases]
        carried = [moment.index_select(0, index) for moment in moments]
    values, estimates = None, None
    if eigenvalues is not None:
        old_values = [v if v is None or index is None else v.index_select(0, index) for v in eigenvalues]
        estimates = [None] * len(factors)  # the refresh's diag(O^T F O) in the old bases, from its power step
    new_bases = list(old_bases)
    orders = refresh_bases_(
        factors, new_bases, carried[0], batch_dims=1, tolerance=group["refresh_tolerance"], estimates=estimates
    )
    if eigenvalues is not None:
        values = new_eigenvalues(old_values, estimates, orders)
    refreshed = any(order is not None for order in orders)
    if refreshed:
        if len(second_moments) == 1:
            permute_axes_(carried[1], orders, batch_dims=1)
        else:
            permute_axes_(carried[1], orders[:1], batch_dims=1)
            permute_axes_(carried[2], orders[1:], batch_dims=1)
    # everything is computed: the writes follow (the estimates are kept even where no basis changed)
    if values is not None:
        for target, value in zip(eigenvalues, values):
            if target is not None:
                _write_rows(target, value, index)
    if not refreshed:
        return
    for target, value in zip(moments, carried):
        _write_rows(target, value, index)
    for axis, (target, old, new) in enumerate(zip(bases, old_bases, new_bases)):
        if new is old:
            continue
        if install is not None:
            install(axis, new)
        else:
            _write_rows(target, new, index)


def _write_rows(target: torch.Tensor, value: torch.Tensor, index: Optional[torch.Tensor]) -> None:
    """``target <- value``, or only the stack members at ``index`` (None: all of them)."""
    if index is None:
        target.copy_(value)
    else:
        target.index_copy_(0, index, value)


def _refresh_one_(state: Dict[str, Any], group: Dict[str, Any]) -> None:
    """Refresh one parameter's bases and carry its moments along (a due step), in place.

    One parameter is refreshed as a bucket of one, through the same batched products and QR as a
    bucket: with a rank-deficient factor the basis of its null space is whatever the rounding makes
    it, so both paths must round alike.
    """
    _refresh_stack_(
        _as_batch_of_one(state["factors"]), _as_batch_of_one(state["bases"]), state["exp_avg"].unsqueeze(0),
        [state[key].unsqueeze(0) for key in _SECOND_MOMENTS if key in state], group,
        # the new basis itself, in the QR's memory layout, which later products round by
        install=lambda axis, new: state["bases"].__setitem__(axis, new[0]),
        eigenvalues=_as_batch_of_one(state["eigenvalues"]) if group["factor_update"] == "kl" else None,
    )


def soap_bucket_update_(
    items: List[_Item], group: Dict[str, Any], shampoo_beta: float, ops, writes: PendingWrites, guard: bool = True,
    history: Optional[Dict] = None,
) -> None:
    """One SOAP step for a bucket of parameters with one merged shape (2-D or more), through batched ops.

    State lives in pools, one stacked [N, ...] buffer per entry kind with a row per member (see
    ``buckets``): used in place when every member takes part, else the members' rows are gathered and the
    new values written back into them; gradients and parameters are stacked for the step. A matrix is rotated on both sides inside the fused ops. A tensor of K >= 3 merged axes
    is rotated on axes 1..K-1 by batched products first and on axis K (the right side of its
    [rows, d_K] matrix view) inside the fused ops, whose epilogues hold the Adam update and the
    parameter update; mode products on different axes commute, so the order is free. The new moments
    and parameters are computed into buffers of their own and left in ``writes``, with the factor EMA
    and the refresh. ``history``: which members took part in earlier steps, per pool, kept by the caller
    (see ``buckets.bucket_pools``). The members' parameters are on storages of their own (see
    ``_sequential_if_shared``).
    """
    shape = items[0].plan.merged_shape
    preconditioned = items[0].plan.preconditioned
    states = [item.state for item in items]
    batch = len(items)
    axes = [k for k, p in enumerate(preconditioned) if p]
    kl = group["factor_update"] == "kl"  # then every state has eigenvalues: see _match_eigenvalues
    kinds = [("bases", k) for k in axes] + [("factors", k) for k in axes] + [("exp_avg", None), ("exp_avg_sq", None)]
    if kl:
        kinds += [("eigenvalues", k) for k in axes]
    pools, rows, relaid, apart = bucket_pools(states, kinds, history)
    writes.relaid |= relaid
    if apart:
        writes.apart.extend(pools)
    pool_of = dict(zip(kinds, pools))
    index = None if rows is None else torch.tensor(rows, device=pools[0].device)
    # every member: the pools themselves; some members: their rows gathered, new values written back into them
    stacked = {kind: pool if index is None else pool.index_select(0, index) for kind, pool in pool_of.items()}

    def per_axis(key, source):
        return [source[(key, k)] if p else None for k, p in enumerate(preconditioned)]

    stacked_bases, stacked_factors = per_axis("bases", stacked), per_axis("factors", stacked)
    stacked_eigenvalues = per_axis("eigenvalues", stacked) if kl else None
    grads = torch.stack([item.grad for item in items]).contiguous()  # stack keeps permuted strides
    exp_avg, exp_avg_sq = stacked[("exp_avg", None)], stacked[("exp_avg_sq", None)]
    if index is None:
        new_exp_avg, new_exp_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
    else:
        new_exp_avg, new_exp_avg_sq = exp_avg, exp_avg_sq  # gathered: already buffers of their own
    steps = [item.step for item in items]
    beta1, beta2 = group["betas"]
    precision = group["rotation_precision"]
    if len(shape) == 2:
        q_left, q_right, outer_bases = stacked_bases[0], stacked_bases[1], None
    else:
        q_left, q_right, outer_bases = None, stacked_bases[-1], stacked_bases[:-1]
    matrix = (batch, math.prod(shape[:-1]), shape[-1])  # the [B, rows, d_K] view the fused ops see

    orthogonal = _orthogonalizes(group, items[0].plan)
    previous_exp_avg = exp_avg.clone() if orthogonal and new_exp_avg is exp_avg else exp_avg
    rotated = grads if outer_bases is None else project(grads, outer_bases, batch_dims=1)
    direction = ops.rotate_adam_(
        rotated.reshape(matrix), q_left, q_right, new_exp_avg.view(matrix), new_exp_avg_sq.view(matrix),
        beta1=beta1, beta2=beta2, eps=group["eps"], precision=precision,
    )
    if outer_bases is not None:
        direction = project_back(direction.view(batch, *shape), outer_bases, batch_dims=1).reshape(matrix)
    if orthogonal:  # a matrix: no outer axes (soap_optim.newton_schulz)
        direction = orthogonalize(nesterov_ratio(new_exp_avg, previous_exp_avg, new_exp_avg_sq, beta1, group["eps"]))
        step_size = float(group["lr"]) * rms_scale(shape)
    elif all(t == steps[0] for t in steps):
        step_size = _step_size(group, steps[0])  # one float for the bucket (the usual case)
    else:
        step_size = torch.tensor([_step_size(group, t) for t in steps], dtype=grads.dtype, device=grads.device)
    # members share the merged shape, not necessarily their own shape (merge_dims): each uses its own plan
    params = torch.stack([item.plan.to_merged(item.param) for item in items]).contiguous()
    ops.unrotate_apply_(
        direction, q_left, q_right, params.view(matrix), step_size=step_size,
        decay=float(group["lr"]) * group["weight_decay"], normalize=group["normalize_grads"], precision=precision,
    )
    factor_grads = without_overflowing_grams(grads, batch_dims=1) if guard else grads

    for item, row in zip(items, params.unbind(0)):  # one unbind: every row view at once
        writes.copy(item.param, item.plan.from_merged(row))
    whiteners = _whiteners(stacked_bases, stacked_eigenvalues)
    factor_ema = _bucket_factor_ema(stacked_factors, factor_grads, shampoo_beta, ops, whiteners)
    if index is None:
        writes.copy(exp_avg, new_exp_avg)
        writes.copy(exp_avg_sq, new_exp_avg_sq)
        writes.update(factor_ema)
    else:
        factor_ema()  # into the gathered rows, which are the bucket's own
        for kind, value in ((("exp_avg", None), new_exp_avg), (("exp_avg_sq", None), new_exp_avg_sq),
                            *((("factors", k), stacked[("factors", k)]) for k in axes)):
            writes.copy_rows(pool_of[kind], index, value)
    frequency = group["precondition_frequency"]
    due = [t % frequency == 0 for t in steps]
    if not any(due):
        return
    # the refresh reads and writes the pools once the new values are in them: the whole of each pool at once
    # (one batched QR per axis, bases rewritten in place), or the due members' rows gathered and written back
    if index is None and all(due):
        due_rows = None
    else:
        due_rows = [row for row, is_due in zip(range(batch) if rows is None else rows, due) if is_due]
    writes.refresh(partial(
        _refresh_stack_, per_axis("factors", pool_of), per_axis("bases", pool_of), pool_of[("exp_avg", None)],
        [pool_of[("exp_avg_sq", None)]], group, due_rows,
        eigenvalues=per_axis("eigenvalues", pool_of) if kl else None,
    ))


def _sequential_if_shared(items: List[_Item], group: Dict[str, Any], shampoo_beta: float, guard: bool) -> List[bool]:
    """Step, one at a time and in order, the items whose parameter shares its storage with another item's;
    return whether each item was stepped here.

    Every path computes new parameters into buffers of their own and copies them back, so of two
    parameters on one storage only the last copy would survive. One at a time and written at once, each
    update is applied to the other's result, as torch.optim.AdamW does (only host metadata is read: no
    sync). Called once per group, before the items are bucketed (two views of one storage may have
    different shapes), and only where the step found parameters on one storage (``Screen.storage_shared``).
    """
    storages = [item.param.untyped_storage().data_ptr() for item in items]
    shared = {ptr for ptr, count in Counter(storages).items() if count > 1}
    for item, ptr in zip(items, storages):
        if ptr in shared:
            soap_update_(item.param, item.grad, item.state, item.plan, group, shampoo_beta, item.step, guard)
    return [ptr in shared for ptr in storages]


def _bucket_factor_ema(
    factors: List[Optional[torch.Tensor]], grads: torch.Tensor, beta: float, ops, whiteners=None
) -> Callable[[], None]:
    """F_k <- beta F_k + (1 - beta) C_k for a [B, *merged] stack through the fused factor op, returned as an
    update to apply later: what it reads is prepared now, so applying it writes in place and allocates
    nothing.

    A matrix updates both factors in one call; for K >= 3 axes, axis k's Gram matrix is the left
    factor of the [B, d_k, rest] unfolding (a copy, made now). With ``whiteners`` (the KL update), C_k is
    the Gram matrix of the whitened unfolding (``eigenbasis.kl``), one factor per call; every statistic is
    computed now, from the factors and bases before this step's update (simultaneous).
    """
    if whiteners is not None:
        unfoldings = whitened_unfoldings(grads, whiteners, factors)
        calls = [(factor, None, x) for factor, x in zip(factors, unfoldings) if factor is not None]
    elif grads.dim() == 3:
        calls = [(factors[0], factors[1], grads)]
    else:
        calls = [
            (factor, None, grads.movedim(axis + 1, 1).reshape(grads.shape[0], grads.shape[axis + 1], -1))
            for axis, factor in enumerate(factors)
            if factor is not None
        ]

    def apply() -> None:
        for left, right, grad in calls:
            ops.factor_ema_(left, right, grad, beta)

    return apply


def soap_elementwise_update_(items: List[_Item], group: Dict[str, Any], ops, writes: PendingWrites) -> None:
    """SOAP's step for parameters with no preconditioned axis and a common step count: Adam with the
    reference's conventions (eps before bias correction, decay after the update), one fused call.

    Two or more tensors are stepped as one flat vector: their moments live back to back in one buffer
    (see ``buckets.flat_state``), gradients and parameters are concatenated for the step, so the call
    costs a handful of ops (or one kernel launch) however many small tensors (biases, norm gains) the
    bucket holds. The new moments and parameters go to buffers of their own, left in ``writes``. The
    parameters are on storages of their own (see ``_sequential_if_shared``)."""
    beta1, beta2 = group["betas"]
    kwargs = dict(
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        step_size=_step_size(group, items[0].step),
        decay=float(group["lr"]) * group["weight_decay"],
        decay_first=False,
    )
    states = [item.state for item in items]
    params = [item.param for item in items]
    if len(items) == 1:
        # the entries where they are (a slice of a flat buffer, or storage of their own)
        exp_avg, exp_avg_sq, grad = states[0]["exp_avg"], states[0]["exp_avg_sq"], items[0].grad
        new_exp_avg, new_exp_avg_sq, new_params = exp_avg.clone(), exp_avg_sq.clone(), params[0].clone()
        writes.copy(exp_avg, new_exp_avg)
        writes.copy(exp_avg_sq, new_exp_avg_sq)
        ops.adam_(new_params, grad, new_exp_avg, new_exp_avg_sq, **kwargs)
        writes.copy(params[0], new_params)
        return
    new_moments = []
    for key in ("exp_avg", "exp_avg_sq"):
        flat, members, relaid = flat_state(states, key)
        writes.relaid |= relaid
        new = flat.clone() if members is None else flat  # some members: gathered, already a buffer of its own
        if members is None:
            writes.copy(flat, new)
        else:
            for entry, piece in zip(members, new.split([t.numel() for t in members])):
                writes.copy(entry, piece if entry.dim() == 1 else piece.view(entry.shape))
        new_moments.append(new)
    # 1-D tensors (biases, norm gains: the usual members) go to cat as they are, no reshape call each
    grad = torch.cat([g if g.dim() == 1 else g.reshape(-1) for g in (item.grad for item in items)])
    new_params = torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in params])
    ops.adam_(new_params, grad, *new_moments, **kwargs)
    for param, row in zip(params, new_params.split([p.numel() for p in params])):
        writes.copy(param, row if param.dim() == 1 else row.view_as(param))


def _second_moment_update_(state: Dict[str, Any], rotated: torch.Tensor, beta2: float) -> torch.Tensor:
    """In place: EMA of the squared rotated gradient in ``state``'s statistics; returns the second-moment
    estimate v (full or factored)."""
    if "exp_avg_sq" in state:
        exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
        # a square that overflowed is capped at the dtype's max (as in the kernels): never inf in state
        return exp_avg_sq.clamp_(max=torch.finfo(exp_avg_sq.dtype).max)
    # Adafactor's statistics (row and column sums of the squared rotated gradient), no eps
    update_factored_moments_(state["exp_avg_sq_row"], state["exp_avg_sq_col"], rotated, beta2, eps=0.0)
    return factored_second_moment(state["exp_avg_sq_row"], state["exp_avg_sq_col"])
