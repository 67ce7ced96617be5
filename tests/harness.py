"""Shared scaffolding of the fault, resume, mixed-precision, compile and long-run tests.

A tiny MLP with two same-shaped 4 x 4 weight matrices (so that SOAP's batched path forms a bucket of
two, with state kept as rows of stacked buffers) and a fresh, deterministic batch per step (so that a
resumed run sees exactly the data the uninterrupted run saw).

``ENTRIES`` is every optimizer configuration of ``registry.OPTIMIZERS`` plus SOAP with its default
implementation choice (``foreach=None, fused=None``), with precondition/root refresh periods chosen
so that "just before", "at" and "after" a refresh are different steps (see ``refresh_calls``).
"""
from __future__ import annotations

import io
from dataclasses import replace
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from registry import OPTIMIZERS, OptimizerEntry, iter_state_tensors
from soap_optim import SOAP, Shampoo

# SOAP refreshes its bases at state step 3, 6, 9 (the 4th, 7th, 10th call: the first call only builds
# the preconditioner); Shampoo recomputes its roots at calls 2, 5, 8.
_REFRESH_OVERRIDES = {SOAP: dict(precondition_frequency=3), Shampoo: dict(precondition_frequency=3, start_preconditioning_step=2)}


def _kind(entry: OptimizerEntry) -> type:
    return type(entry.make([nn.Parameter(torch.zeros(2, 2))]))


def _with_refresh_period(entry: OptimizerEntry) -> OptimizerEntry:
    extra = _REFRESH_OVERRIDES.get(_kind(entry), {})
    return replace(entry, hparams={**entry.hparams, **extra})


_soap = next(e for e in OPTIMIZERS if e.name == "soap")
ENTRIES: List[OptimizerEntry] = [_with_refresh_period(e) for e in OPTIMIZERS] + [
    _with_refresh_period(replace(_soap, name="soap-default-impl", hparams={**_soap.hparams, "foreach": None, "fused": None}))
]
SOAP_ENTRIES = [e for e in ENTRIES if _kind(e) is SOAP]


def entry_params(entries=None) -> list:
    return [
        pytest.param(e, id=e.name, marks=[pytest.mark.skip(reason=e.skip_reason)] if e.skip_reason else [])
        for e in (ENTRIES if entries is None else entries)
    ]


def kind(entry: OptimizerEntry) -> type:
    return _kind(entry)


def refresh_calls(entry: OptimizerEntry, total: int) -> List[int]:
    """1-based numbers of the ``step()`` calls that refresh a basis (SOAP) or a root (Shampoo)."""
    hp, cls = entry.hparams, _kind(entry)
    if cls is SOAP:
        f = hp["precondition_frequency"]
        return [c for c in range(2, total + 1) if (c - 1) % f == 0]
    if cls is Shampoo:
        f, start = hp["precondition_frequency"], hp["start_preconditioning_step"]
        return [c for c in range(start, total + 1) if (c - start) % f == 0]
    return []


def refreshed_key(entry: OptimizerEntry):
    """The state key that a refresh rewrites: SOAP's bases, Shampoo's roots, else None."""
    return {SOAP: "bases", Shampoo: "roots"}.get(_kind(entry))


# ----------------------------------------------------------------------------- model and data
def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batch(step: int, n: int = 16):
    """The data of global step ``step`` (the same in every run)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 4, generator=gen)
    return x, torch.tanh(x[:, :3] * 1.5) + 0.1 * torch.randn(n, 3, generator=gen)


def loss_at(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()


def train(model: nn.Module, opt, start: int, stop: int) -> List[float]:
    """Global steps ``start .. stop - 1``; returns the losses."""
    losses = []
    for step in range(start, stop):
        opt.zero_grad()
        loss = loss_at(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def params_of(model: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- checkpoints and state
def through_bytes(obj: Any, **load_kwargs) -> Any:
    """torch.save to memory and torch.load back (torch's default, weights_only loading)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_kwargs)


def serialized_size(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def groups_without_params(opt) -> List[Dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def non_finite_state(opt) -> Dict[str, str]:
    """{state key: "nan" or "inf"} over every parameter's floating state tensors."""
    found = {}
    for state in opt.state.values():
        for key, value in state.items():
            for t in iter_state_tensors(value):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    found[key] = "nan" if bool(t.isnan().any()) else "inf"
    return found


def floating_state_dtypes(opt) -> set:
    return {
        t.dtype
        for state in opt.state.values()
        for key, value in state.items()
        if key != "step"
        for t in iter_state_tensors(value)
        if t.is_floating_point()
    }
