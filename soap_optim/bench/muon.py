"""torch.optim.Muon as a benchmark arm, set up the way torch's documentation describes.

Muon orthogonalizes the momentum of a 2-D weight (Newton-Schulz iterations) and is meant for the hidden
matrices only; the embeddings, the output layer and every other tensor (biases, norm gains, convolution
kernels) go to AdamW. One lr drives both, with ``adjust_lr_fn="match_rms_adamw"`` so that Muon's update
has AdamW's RMS at the same lr. :class:`MuonWithAdamW` holds the two optimizers behind one
``param_groups`` list, so schedulers, the benchmark's lr schedule and the memory count see one optimizer.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..groups import hidden_matrices

MUON_FLAG = "use_muon"  # param-group key saying which of the two optimizers steps the group


def split_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """Two parameter groups: the hidden matrices (Muon) and everything else (AdamW); empty ones dropped."""
    hidden = {id(p) for p in hidden_matrices(model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in hidden], MUON_FLAG: True},
        {"params": [p for p in model.parameters() if id(p) not in hidden], MUON_FLAG: False},
    ]
    return [group for group in groups if group["params"]]


class MuonWithAdamW:
    """``torch.optim.Muon`` on the groups flagged ``use_muon``, ``torch.optim.AdamW`` on the rest.

    Plain parameters (no flag) are split by shape: 2-D to Muon, the rest to AdamW (use
    :func:`split_groups` to keep embeddings and the output layer on AdamW). ``lr`` and
    ``weight_decay`` are shared; ``betas`` and ``eps`` are AdamW's; ``momentum`` and the other Muon
    arguments are Muon's (torch's defaults unless given).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        adjust_lr_fn: Optional[str] = "match_rms_adamw",
        **muon_kwargs: Any,
    ) -> None:
        muon_groups, adamw_groups = [], []
        for group in _as_groups(params):
            group = dict(group)
            use_muon = group.pop(MUON_FLAG, None)
            if use_muon is None:
                tensors = list(group.pop("params"))
                muon_groups.append({**group, "params": [p for p in tensors if p.dim() == 2]})
                adamw_groups.append({**group, "params": [p for p in tensors if p.dim() != 2]})
            else:
                (muon_groups if use_muon else adamw_groups).append(group)
        muon_groups = [g for g in muon_groups if g["params"]]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        self.optimizers: List[torch.optim.Optimizer] = []
        if muon_groups:
            self.optimizers.append(
                torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn, **muon_kwargs)
            )
        if adamw_groups:
            self.optimizers.append(torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True))
        if not self.optimizers:
            raise ValueError("MuonWithAdamW got no parameters")

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> Dict[torch.Tensor, Any]:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state_dict holds {len(saved)} optimizers, this one has {len(self.optimizers)}")
        for optimizer, entry in zip(self.optimizers, saved):
            optimizer.load_state_dict(entry)


def _as_groups(params: Iterable) -> List[Dict[str, Any]]:
    items = list(params)
    if items and isinstance(items[0], dict):
        return items
    return [{"params": items}]


def muon_available() -> Optional[str]:
    """None when torch has ``torch.optim.Muon``; else why the arm is skipped."""
    if getattr(torch.optim, "Muon", None) is None:
        return f"torch {torch.__version__} has no torch.optim.Muon (added in torch 2.9)"
    return None
