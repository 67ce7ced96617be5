"""Argument checks shared by every optimizer: each raises ValueError naming the bad value.

Real-valued hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ...) may be Python numbers
(``int``, ``float`` and their subclasses, numpy's float64 included) or one-element floating-point tensors
of any shape (0-d, ``[1]``, ``[1, 1]``: what torch.optim takes, and what its LR schedulers and
``capturable`` users set); betas may be a tuple or a list. Anything else (a numpy float32, a tensor of
several elements) is rejected with a ValueError naming the argument, at construction, ``add_param_group``
or ``load_state_dict``, never mid-step. The step reads every value as the equal Python float (see
:func:`as_number`).
"""
from __future__ import annotations

import math
import numbers

import torch


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a Python number or a one-element (0-d, [1], [1, 1]) floating-point tensor, "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    # Python's int and float only (and their subclasses): other numbers.Real types, numpy's float32 first of
    # all, are not floats and would reach the math as what they are (torch.optim refuses them too)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a Python number (int or float) or a one-element floating-point tensor, got "
            f"{value!r} of type {type(value).__module__}.{type(value).__qualname__}"
        )
    return float(value)


def check_lr(lr) -> None:
    value = _as_float("lr", lr)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid learning rate: lr={value} (must be finite and >= 0)")


def check_betas(betas, *, allow_one: bool = False) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        value = _as_float(f"betas[{index}]", beta)
        upper_ok = value <= 1.0 if allow_one else value < 1.0
        if not (value >= 0.0 and upper_ok):
            bound = "[0, 1]" if allow_one else "[0, 1)"
            raise ValueError(f"Invalid beta parameter at index {index}: {value} (must be in {bound})")


def check_unit_interval(name: str, value, *, allow_one: bool = False) -> None:
    value = _as_float(name, value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value >= 0.0 and upper_ok):
        raise ValueError(f"Invalid {name}: {value} (must be in {'[0, 1]' if allow_one else '[0, 1)'})")


def check_non_negative(name: str, value) -> None:
    value = _as_float(name, value)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value} (must be finite and >= 0)")


def check_non_positive(name: str, value) -> None:
    value = _as_float(name, value)
    if not (value <= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value} (must be a finite number <= 0)")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def check_nonnegative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def as_number(value):
    """A one-element tensor hyperparameter as the equal Python float (tuples and lists element-wise, as a
    tuple); anything else as is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(as_number(v) for v in value)
    return value
