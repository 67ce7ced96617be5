"""Adafactor (Shazeer & Stern, 2018) with an explicit learning rate.

The factored second moment is kept as pure functions (``moment_math.update_factored_moments_``,
``moment_math.factored_second_moment``) so that it can be checked alone and reused: the SOAP paper's
observation is that Adafactor run in the eigenbasis of Shampoo's factors is Shampoo with power 1/2
(see tests/test_adafactor.py).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .moment_math import (
    clip_by_rms_,
    decay_then_update_,
    factored_normalize,
    factored_shape,
    first_moment_ema_,
    update_factored_moments_,
)
from .optimizer import Screen, Slot, SoapOptimizerBase, new_step_count, state_dtype
from .validation import check_lr, check_non_negative, check_non_positive, check_unit_interval


class Adafactor(SoapOptimizerBase):
    r"""Adafactor with update clipping, optional momentum and decoupled weight decay.

    For a gradient :math:`G` of a 2-D-or-more tensor, viewed as an :math:`m \times n` matrix
    (``shape[0]`` by the product of the rest), with :math:`\mathbf{1}` a vector of ones:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1, \quad \hat\beta_{2,t} = 1 - t^{c} \quad (c = \text{beta2\_decay}) \\
        &r_t = \hat\beta_{2,t} r_{t-1} + (1-\hat\beta_{2,t})(G^2 + \epsilon_1)\mathbf{1}_n, \quad
         c_t = \hat\beta_{2,t} c_{t-1} + (1-\hat\beta_{2,t})\mathbf{1}_m^\top(G^2 + \epsilon_1) \\
        &\hat V_t = r_t c_t^\top / (\mathbf{1}_m^\top r_t)
          \quad (\text{0-D/1-D: } \hat V_t = \hat\beta_{2,t} \hat V_{t-1}
          + (1-\hat\beta_{2,t})(G^2 + \epsilon_1)) \\
        &U_t = G / \sqrt{\hat V_t}, \quad \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t) / d) \\
        &m_t = \beta_1 m_{t-1} + (1-\beta_1)\hat U_t \text{ if } \beta_1 \text{ is set, else } m_t = \hat U_t \\
        &\theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma m_t
        \end{aligned}

    The schedule :math:`\hat\beta_{2,t} = 1 - t^{-0.8}` is the paper's; it starts at 0, so no bias
    correction is needed. The step size :math:`\gamma` is ``lr`` as given (no relative step size, no
    scaling by the parameter's RMS), and the momentum, as in the paper, has no bias correction.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`.
        beta1: momentum of the clipped update, or ``None`` (default) for none (and no state for it).
        beta2_decay: :math:`c \le 0` in :math:`\hat\beta_{2,t} = 1 - t^c` (torch.optim.Adafactor's name).
        eps: :math:`\epsilon_1 > 0`, added to :math:`G^2` (the paper's 1e-30).
        d: update clipping threshold on the RMS of :math:`U_t`.
        weight_decay: :math:`\lambda`, decoupled, applied in torch.optim.AdamW's order.
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

    State per parameter: ``step``; ``exp_avg_sq_row`` (m) and ``exp_avg_sq_col`` (n) for factored
    tensors, ``exp_avg_sq`` (parameter-shaped) otherwise; ``exp_avg`` when ``beta1`` is set.
    Floating state is float32 (float64 for float64 parameters).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta1: Optional[float] = None,
        beta2_decay: float = -0.8,
        eps: float = 1e-30,
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        orthograd: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        skip_nonfinite_grads: bool = False,
        process_group=None,
        shard_over_replicas: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, beta1=beta1, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize,
            orthograd=orthograd,
            state_dtype=state_dtype,
            skip_nonfinite_grads=skip_nonfinite_grads,
        )
        super().__init__(params, defaults, process_group=process_group, shard_over_replicas=shard_over_replicas)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        check_lr(group["lr"])
        if group["beta1"] is not None:
            check_unit_interval("beta1", group["beta1"])
        check_non_positive("beta2_decay", group["beta2_decay"])
        for name in ("eps", "d"):
            check_non_negative(name, group[name])
            if not group[name] > 0:
                raise ValueError(f"Invalid {name}: {group[name]!r} (must be > 0)")
        check_non_negative("weight_decay", group["weight_decay"])

    def _check_can_step(self, hyper: Dict[str, Any], params) -> None:
        """``eps`` must stay positive in every state dtype it is used in: below the dtype's smallest subnormal
        (1.4e-45 in float32) it is stored as 0, and a zero gradient entry then gives 0 / 0 = NaN."""
        super()._check_can_step(hyper, params)
        for dtype in {state_dtype(param, hyper) for param in params}:
            if not torch.tensor(float(hyper["eps"]), dtype=dtype).item() > 0:
                raise ValueError(
                    f"Invalid eps: {hyper['eps']!r} is 0 in {dtype}, the dtype of the state it is added to "
                    f"(must be at least {torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps:.1e})"
                )

    def _max_grad_norm(self, shape: torch.Size, hyper: Dict[str, Any], dtype: torch.dtype) -> float:
        """No limit: the update is clipped to RMS <= d whatever the gradient (a saturated statistic only
        makes U larger before the clip), so every finite gradient gives a step of RMS <= lr * d."""
        return math.inf

    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        matrix = factored_shape(tuple(param.shape))
        if matrix is None:
            shapes = {"exp_avg_sq": tuple(param.shape)}
        else:
            shapes = {"exp_avg_sq_row": (matrix[0],), "exp_avg_sq_col": (matrix[1],)}
        if group["beta1"] is not None:
            shapes["exp_avg"] = tuple(param.shape)
        return shapes

    def _step_group(self, group: Dict[str, Any], slots: List[Slot], screen: Screen) -> None:
        for slot in slots:
            grad, state = slot.grad, slot.state
            matrix = factored_shape(tuple(slot.param.shape))
            if not state:
                state["step"] = new_step_count()
                if matrix is None:
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                else:
                    state["exp_avg_sq_row"] = grad.new_zeros(matrix[0])
                    state["exp_avg_sq_col"] = grad.new_zeros(matrix[1])
            if group["beta1"] is not None and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
            update = adafactor_direction_(grad, state, matrix, group)
            lr = float(group["lr"])
            decay_then_update_(slot.param, update, lr, lr * group["weight_decay"])


def adafactor_direction_(
    grad: torch.Tensor, state: Dict[str, Any], matrix: Optional[Tuple[int, int]], group: Dict[str, Any]
) -> torch.Tensor:
    """Advance one parameter's state with ``grad`` and return its (clipped, averaged) update."""
    state["step"] += 1
    step = state["step"].item()
    beta2 = 1.0 - step ** group["beta2_decay"]
    eps = group["eps"]
    if matrix is None:
        exp_avg_sq = state["exp_avg_sq"]
        # multiply-add rather than lerp_: an overflowed (inf) moment stays inf instead of turning NaN
        exp_avg_sq.mul_(beta2).add_(grad.square().add_(eps), alpha=1 - beta2).clamp_(max=torch.finfo(exp_avg_sq.dtype).max)
        update = grad / exp_avg_sq.sqrt()
    else:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        grad_matrix = grad.reshape(matrix)
        update_factored_moments_(row, col, grad_matrix, beta2, eps)
        update = factored_normalize(grad_matrix, row, col).reshape(grad.shape)
    update = clip_by_rms_(update, group["d"]).to(grad.dtype)
    if group["beta1"] is None:
        return update
    exp_avg = state["exp_avg"]
    first_moment_ema_(exp_avg, update, group["beta1"])
    return exp_avg
