"""Small, optimizer-independent helpers.

* :func:`orthogonal_gradient` (and in place, :func:`orthogonalize_grad_`): the "⊥Grad" of Prieto et al., "Grokking at the Edge of Numerical
  Stability" (2025): drop the gradient's component along the weights, keep its norm.
* :func:`param_groups_for_weight_decay`: the usual split of a model's parameters into a decayed
  group (weight matrices, conv kernels) and a non-decayed one (biases, norm layers, embeddings).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from .validation import check_non_negative


def _power_of_two_at_most(x: torch.Tensor) -> torch.Tensor:
    """2^floor(log2(x)) for a positive normal ``x`` (a 0-d tensor)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 1)


@torch.no_grad()
def orthogonal_gradient(param: torch.Tensor, grad: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    r"""``grad``'s part orthogonal to ``param``, rescaled to ``grad``'s norm, as a new tensor.

    With :math:`w` and :math:`g` the flattened tensors:

    .. math::
        g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle + \epsilon} w, \qquad
        g \leftarrow g_\perp \frac{\lVert g \rVert}{\lVert g_\perp \rVert + \epsilon}

    The whole tensor is one vector. A zero ``param`` leaves ``grad`` as it is (up to the
    :math:`\epsilon` in the norm ratio); ``eps`` only guards the divisions. The arithmetic is done in
    float32 (float64 for float64 tensors) on ``w`` and ``g`` divided by their largest magnitudes: the
    result does not depend on those scales, and no dot product overflows for finite inputs (a gradient
    near the dtype's max gives a finite result of the same norm).
    """
    if grad.shape != param.shape:
        raise ValueError(f"grad of shape {tuple(grad.shape)} does not match param of shape {tuple(param.shape)}")
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(dtype).tiny
    w = param.reshape(-1).to(dtype)
    g = grad.reshape(-1).to(dtype)
    if g.numel() == 0:
        return grad.clone()
    # powers of two, so that scaling is exact (a zero ``param`` gives back ``grad`` bit for bit)
    g_scale = _power_of_two_at_most(g.abs().amax().clamp_min(tiny))
    w = w / _power_of_two_at_most(w.abs().amax().clamp_min(tiny))
    g = g / g_scale
    along = torch.dot(w, g) / (torch.dot(w, w) + eps)
    perpendicular = g - along * w
    ratio = torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(perpendicular) + eps)
    return (perpendicular * ratio * g_scale).reshape(grad.shape).to(grad.dtype)


@torch.no_grad()
def orthogonalize_grad_(param: torch.Tensor, grad: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """In place: ``grad.copy_(orthogonal_gradient(param, grad, eps))``; returns ``grad``."""
    return grad.copy_(orthogonal_gradient(param, grad, eps))


# Modules whose own parameters (gains, shifts, lookup tables) are not decayed.
_NO_DECAY_MODULES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    nn.EmbeddingBag,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Split ``model``'s trainable parameters into ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": not_decayed, "weight_decay": 0.0}]`` (an empty group is left out).

    Not decayed: every parameter with at most one dimension (biases, norm gains), every parameter
    of a normalization layer or an embedding, and every parameter named ``bias``. A parameter shared
    by several modules (tied embeddings) is listed once, and is not decayed if any of its owners says
    so. Parameters with ``requires_grad=False`` are left out. Order follows ``model.parameters()``.
    """
    check_non_negative("weight_decay", weight_decay)
    no_decay = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, _NO_DECAY_MODULES) or param.dim() <= 1 or name == "bias":
                no_decay.add(id(param))
    decayed, not_decayed = [], []
    for param in model.parameters():
        if param.requires_grad:
            (not_decayed if id(param) in no_decay else decayed).append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
