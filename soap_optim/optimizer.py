"""The base every soap_optim optimizer shares.

It owns what is the same for the whole family:

* ``step(closure)``: the closure runs with grad enabled; every gradient is checked (sparse,
  complex, non-finite) *before* any parameter or state is touched; then each group is stepped.
* argument validation per param group (also for ``add_param_group``), rolled back on error;
* ``load_state_dict``: shapes are checked against the parameters before anything is loaded, and
  optimizer state keeps its own precision (float32, float64 for float64 parameters) instead of
  being cast to the parameter's dtype as torch.optim would do for bf16/fp16 parameters.

Subclasses implement ``_validate_group``, ``_step_group`` and ``_expected_state_shapes``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from .extras import orthogonalize_grad_
from .validation import check_bool, check_choice


STATE_DTYPES = (None, torch.float32, torch.float64)


def state_dtype(param: torch.Tensor, group: Optional[Dict[str, Any]] = None) -> torch.dtype:
    """dtype of optimizer state for ``param``: the group's ``state_dtype`` if set, else float64 for
    float64 parameters and float32 for every other dtype (bf16/fp16 parameters get float32 state)."""
    chosen = None if group is None else group.get("state_dtype")
    if chosen is not None:
        return chosen
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _describe(group_index: int, param_index: int, param: torch.Tensor) -> str:
    return f"parameter {param_index} of param group {group_index} (shape {tuple(param.shape)})"


def _cast_state(value: Any, *, device, dtype) -> Any:
    """Copy ``value`` (a tensor, or a list/tuple/dict of them) with floating tensors in ``dtype``."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value.to(device=device, dtype=dtype, copy=True)
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _cast_state(v, device=device, dtype=dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_state(v, device=device, dtype=dtype) for v in value)
    return value


def _shape_mismatch(value: Any, expected: Any) -> Optional[str]:
    """None if ``value`` has the ``expected`` structure of shapes, else a description."""
    if isinstance(expected, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(expected):
            return f"expected a list of {len(expected)} entries, got {type(value).__name__}"
        for index, (v, e) in enumerate(zip(value, expected)):
            problem = _shape_mismatch(v, e)
            if problem is not None:
                return f"entry {index}: {problem}"
        return None
    if expected is None:
        return None if value is None else f"expected None, got a tensor of shape {tuple(value.shape)}"
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor of shape {tuple(expected)}, got {type(value).__name__}"
    if tuple(value.shape) != tuple(expected):
        return f"expected shape {tuple(expected)}, got {tuple(value.shape)}"
    return None


# ||G||_F above this (float32) may overflow a Gram matrix entry or its EMA (see without_overflowing_grams)
_GRAM_SAFE_NORM = math.sqrt(torch.finfo(torch.float32).max / 4)


class SoapOptimizerBase(torch.optim.Optimizer):
    """Shared machinery; not an optimizer by itself."""

    # set by each step's gradient check; True makes the factor updates guard against overflow
    _gradients_may_overflow = True

    def __init__(self, params, defaults: Dict[str, Any]) -> None:
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for param in group["params"]:
                if param.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters "
                        f"(got one of shape {tuple(param.shape)}); use torch.view_as_real"
                    )
                if not param.is_floating_point():
                    raise ValueError(f"{type(self).__name__} needs floating-point parameters, got {param.dtype}")
            check_bool("maximize", group["maximize"])
            check_bool("orthograd", group["orthograd"])
            check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
            self._validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- step
    def _check_gradients(self) -> None:
        """Reject sparse, complex and non-finite gradients before anything is modified."""
        grads: List[torch.Tensor] = []
        where: List[tuple] = []
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"({_describe(group_index, param_index, param)})"
                    )
                if grad.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex gradients "
                        f"({_describe(group_index, param_index, param)})"
                    )
                if grad.shape != param.shape:
                    raise ValueError(
                        f"gradient of shape {tuple(grad.shape)} does not match "
                        f"{_describe(group_index, param_index, param)}"
                    )
                if grad.numel():
                    grads.append(grad)
                    where.append((group_index, param_index, param))  # described only on error
        self._gradients_may_overflow = False
        if not grads:
            return
        # Fast screen: a NaN/Inf entry makes the L2 norm non-finite. The L2 norm is ~30x cheaper than
        # the max-abs norm on CPU (3 ms vs 100 ms for 4M numbers), but can overflow for huge finite
        # gradients, so a non-finite norm is confirmed entry by entry before raising. The same norms say
        # whether any gradient is large enough for its Gram matrices to overflow float32 (one host read
        # for both), so the per-tensor overflow guard of the factor updates runs only then.
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        finite, huge = torch.stack([norms.isfinite().all(), (norms > _GRAM_SAFE_NORM).any()]).tolist()
        self._gradients_may_overflow = huge or not finite
        if finite:
            return
        finite = torch.stack([g.isfinite().all().cpu() for g in grads])
        if not bool(finite.all()):
            first_bad = int((~finite).nonzero()[0])
            raise FloatingPointError(
                f"non-finite gradient (NaN or Inf) for {_describe(*where[first_bad])}; the step was not taken and "
                f"parameters and optimizer state are unchanged"
            )

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        for group in self.param_groups:
            if group["orthograd"]:
                for param in group["params"]:
                    if param.grad is not None:
                        orthogonalize_grad_(param, param.grad)
            self._step_group(group)
        return loss

    def _step_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- state_dict
    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        """For each state key: the expected shape, or a list of shapes / None for list entries."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        pairs = []
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {group_index} of the loaded state dict has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}"
                )
            hyper = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for param_index, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                if saved_id not in saved_state:
                    continue
                value = saved_state[saved_id]
                for key, expected in self._expected_state_shapes(param, hyper).items():
                    problem = _shape_mismatch(value.get(key), expected)
                    if problem is not None:
                        raise ValueError(
                            f"loaded state does not match {_describe(group_index, param_index, param)}: "
                            f"state[{key!r}]: {problem}"
                        )
                pairs.append((param, value, hyper))
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameter's dtype; keep the state's own precision.
        for param, value, hyper in pairs:
            restored = {
                key: (v.clone() if key == "step" and isinstance(v, torch.Tensor)
                      else _cast_state(v, device=param.device, dtype=state_dtype(param, hyper)))
                for key, v in value.items()
            }
            self.state[param] = restored
