"""Parameter groups by a parameter's role in the model.

The eigenbasis optimizers see tensors, not modules, so they cannot tell an embedding or the output layer
from a hidden ``nn.Linear`` of the same shape. :func:`hidden_groups` makes that split from the model:

* the **hidden matrices** and every other tensor keep the optimizer's own settings;
* the **embeddings and the output layer** get ``max_precond_dim=0``: no axis is preconditioned, so SOAP
  steps them with Adam in the standard basis (Shampoo with its grafting optimizer).

This is the split torch's Muon recipe makes (Muon for hidden matrices, AdamW for the rest). It also
matches what the SOAP paper's language models did implicitly: their vocabulary axis (50257) is longer
than ``max_precond_dim`` (10000), so it never had a factor. A small vocabulary (a byte-level model's
256) would get one, and on the benchmark's language model that made SOAP slower and worse
(``benchmarks/README.md``, "The hidden-matrix split").
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn


def embedding_and_output_parameters(model: nn.Module) -> List[torch.Tensor]:
    """The parameters of every ``nn.Embedding``/``nn.EmbeddingBag`` and of the last ``nn.Linear`` (the
    output layer), each once (a weight tied between an embedding and the output layer included)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    modules = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))] + linears[-1:]
    found = {id(param) for module in modules for param in module.parameters()}
    return [p for p in model.parameters() if id(p) in found]


def hidden_matrices(model: nn.Module) -> List[torch.Tensor]:
    """The 2-D parameters that are neither an embedding nor the output layer.

    A bare 2-D parameter (a model that is one weight matrix) counts as hidden.
    """
    excluded = {id(p) for p in embedding_and_output_parameters(model)}
    return [p for p in model.parameters() if p.dim() == 2 and id(p) not in excluded]


def hidden_groups(model: nn.Module, **options: Any) -> List[Dict[str, Any]]:
    """Two parameter groups for SOAP or Shampoo: everything but the embeddings and the output layer with
    the optimizer's settings, and those with ``max_precond_dim=0`` (elementwise) plus ``options``.

    ``SOAP(soap_optim.hidden_groups(model), lr=...)``: the parameters of ``model.parameters()``, split;
    an empty group is left out.
    """
    edge = {id(p) for p in embedding_and_output_parameters(model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in edge]},
        {"params": [p for p in model.parameters() if id(p) in edge], "max_precond_dim": 0, **options},
    ]
    return [group for group in groups if group["params"]]
