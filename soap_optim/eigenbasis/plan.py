"""Which axes of a parameter get a Kronecker factor.

A :class:`Plan` is computed once per (shape, hyperparameters) and describes how a
gradient is laid out for the eigenbasis core:

* optionally permuted (``data_format="channels_last"`` for 4-D tensors, merge_dims only),
* reshaped to ``merged_shape`` (axes merged greedily while the product stays
  ``<= max_precond_dim``; without merge_dims it is the parameter's own shape),
* one factor per axis of ``merged_shape`` whose entry in ``preconditioned`` is True.

All optimizer state that lives in the eigenbasis is kept in the merged layout.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..validation import check_bool, check_choice, check_nonnegative_int

DATA_FORMATS = ("channels_first", "channels_last")
# channels_last assumes (O, H, W, I) storage; (0, 3, 1, 2) brings it to (O, I, H, W).
_CHANNELS_LAST_TO_FIRST = (0, 3, 1, 2)
_CHANNELS_FIRST_TO_LAST = (0, 2, 3, 1)


@dataclass(frozen=True)
class Plan:
    shape: Tuple[int, ...]
    permutation: Optional[Tuple[int, ...]]
    merged_shape: Tuple[int, ...]
    preconditioned: Tuple[bool, ...]

    @property
    def factor_dims(self) -> Tuple[Optional[int], ...]:
        """Size of each axis' factor, ``None`` where the axis is left alone."""
        return tuple(d if p else None for d, p in zip(self.merged_shape, self.preconditioned))

    @property
    def is_preconditioned(self) -> bool:
        return any(self.preconditioned)

    def to_merged(self, x: torch.Tensor) -> torch.Tensor:
        """Parameter layout -> merged layout (a view whenever no permutation is needed)."""
        if self.permutation is not None:
            x = x.permute(self.permutation)
        elif x.shape == self.merged_shape:
            return x  # nothing merged: skip the (per-step, per-tensor) reshape call
        return x.reshape(self.merged_shape)

    def from_merged(self, x: torch.Tensor) -> torch.Tensor:
        """Merged layout -> parameter layout."""
        if self.permutation is None:
            return x if x.shape == self.shape else x.reshape(self.shape)
        permuted_shape = tuple(self.shape[i] for i in self.permutation)
        return x.reshape(permuted_shape).permute(_CHANNELS_FIRST_TO_LAST)


def merge_shape(shape: Tuple[int, ...], max_precond_dim: int) -> Tuple[int, ...]:
    """Greedy left-to-right merge of adjacent axes while the product stays <= max_precond_dim.

    An axis that alone exceeds the limit is kept on its own; size-1 axes vanish; a tensor
    with nothing left (a scalar, or all ones) becomes ``(1,)``.
    """
    merged = []
    running = 1
    for size in shape:
        if running * size <= max_precond_dim:
            running *= size
        elif running > 1:
            merged.append(running)
            running = size
        else:
            merged.append(size)
    if running > 1 or not merged:
        merged.append(running)
    return tuple(merged)


@functools.lru_cache(maxsize=4096)
def make_plan(
    shape: Tuple[int, ...],
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    data_format: str = "channels_first",
    one_sided: bool = False,
    one_sided_dim: Optional[int] = None,
) -> Plan:
    """The factor layout SOAP (and the rest of the family) uses for a parameter of ``shape``.

    ``one_sided`` keeps a single factor: on merged axis ``one_sided_dim`` if given (and eligible),
    else on the smallest eligible axis (the first one on ties).
    """
    plan = _full_plan(tuple(int(s) for s in shape), max_precond_dim, merge_dims, precondition_1d, data_format)
    if not one_sided or not plan.is_preconditioned:
        return plan
    eligible = [axis for axis, p in enumerate(plan.preconditioned) if p]
    if one_sided_dim is None:
        keep = min(eligible, key=lambda axis: plan.merged_shape[axis])
    else:
        axes = len(plan.merged_shape)
        if not -axes <= one_sided_dim < axes:
            raise ValueError(
                f"Invalid one_sided_dim: {one_sided_dim} (a parameter of shape {tuple(shape)} has {axes} merged "
                f"axes {plan.merged_shape}: it must be in [{-axes}, {axes})"
            )
        keep = one_sided_dim % axes
    preconditioned = tuple(axis == keep and p for axis, p in enumerate(plan.preconditioned))
    return Plan(plan.shape, plan.permutation, plan.merged_shape, preconditioned)


def _full_plan(shape, max_precond_dim, merge_dims, precondition_1d, data_format) -> Plan:
    if math.prod(shape) == 0:
        # Nothing to precondition in an empty tensor.
        return Plan(shape, None, shape, tuple(False for _ in shape))
    if len(shape) == 1:
        size = shape[0]
        return Plan(shape, None, shape, (precondition_1d and size <= max_precond_dim,))
    permutation = None
    merged = shape
    if merge_dims:
        if data_format == "channels_last" and len(shape) == 4:
            permutation = _CHANNELS_LAST_TO_FIRST
            merged = tuple(shape[i] for i in permutation)
        merged = merge_shape(merged, max_precond_dim)
    return Plan(shape, permutation, merged, tuple(s <= max_precond_dim for s in merged))


def check_plan_options(group: Dict[str, Any]) -> None:
    """ValueError naming a bad dims-plan hyperparameter of a param group (SOAP, Shampoo)."""
    check_nonnegative_int("max_precond_dim", group["max_precond_dim"])
    check_choice("data_format", group["data_format"], DATA_FORMATS)
    for flag in ("merge_dims", "precondition_1d"):
        check_bool(flag, group[flag])
    if "one_sided" in group:
        check_bool("one_sided", group["one_sided"])
        dim = group["one_sided_dim"]
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise ValueError(f"Invalid one_sided_dim: {dim!r} (must be None or an int)")


def plan_for(param: torch.Tensor, group: Dict[str, Any]) -> Plan:
    """The plan of ``param`` under a param group's dims options (one-sided only where the group has it)."""
    return plan_for_shape(param.shape, group)


def unpreconditioned_plan(shape: Tuple[int, ...]) -> Plan:
    """The plan of a tensor that is stepped as it is: no merge, no permutation, no factor."""
    return Plan(tuple(shape), None, tuple(shape), (False,) * len(shape))


def plan_for_shape(shape, group: Dict[str, Any]) -> Plan:
    """The plan of a tensor of ``shape`` under a param group's dims options."""
    return make_plan(
        tuple(shape),
        max_precond_dim=group["max_precond_dim"],
        merge_dims=group["merge_dims"],
        precondition_1d=group["precondition_1d"],
        data_format=group["data_format"],
        one_sided=group.get("one_sided", False),
        one_sided_dim=group.get("one_sided_dim"),
    )
