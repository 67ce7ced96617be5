"""Optimizer state entries are tensors nested in dicts, lists and tuples: one map over them."""
from __future__ import annotations

from typing import Any, Callable

import torch


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with every tensor ``t`` replaced by ``fn(t)``, in depth-first order; containers rebuilt
    with their own types, anything else kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value
