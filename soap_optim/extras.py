"""Small, optimizer-independent helpers.

* :func:`orthogonalize_grad_`: the "⊥Grad" of Prieto et al., "Grokking at the Edge of Numerical
  Stability" (2025): drop the gradient's component along the weights, keep its norm.
* :func:`param_groups_for_weight_decay`: the usual split of a model's parameters into a decayed
  group (weight matrices, conv kernels) and a non-decayed one (biases, norm layers, embeddings).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from .validation import check_non_negative


@torch.no_grad()
def orthogonalize_grad_(param: torch.Tensor, grad: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    r"""In place: replace ``grad`` by its part orthogonal to ``param``, rescaled to the original norm.

    With :math:`w` and :math:`g` the flattened tensors:

    .. math::
        g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle + \epsilon} w, \qquad
        g \leftarrow g_\perp \frac{\lVert g \rVert}{\lVert g_\perp \rVert + \epsilon}

    The whole tensor is one vector. A zero ``param`` leaves ``grad`` as it is (up to the
    :math:`\epsilon` in the norm ratio); ``eps`` only guards the divisions. The arithmetic is done in
    float32 (float64 for float64 tensors) and ``grad`` is returned.
    """
    if grad.shape != param.shape:
        raise ValueError(f"grad of shape {tuple(grad.shape)} does not match param of shape {tuple(param.shape)}")
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    w = param.reshape(-1).to(dtype)
    g = grad.reshape(-1).to(dtype)
    along = torch.dot(w, g) / (torch.dot(w, w) + eps)
    perpendicular = g - along * w
    scale = torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(perpendicular) + eps)
    grad.copy_((perpendicular * scale).reshape(grad.shape))
    return grad


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
