"""Same-shaped state tensors of a param group kept as rows of one stacked buffer.

The batched path steps a bucket of B same-shaped parameters with one call per stage on [B, ...]
tensors. Stacking the state afresh every step would copy every factor and basis (B d^2 numbers each)
twice per step; instead each parameter's state entry *is* a row view of one buffer, so once a bucket
is formed its buffers are used in place. A bucket whose membership changes (a parameter without a
gradient this step) is re-stacked once, by copy; a member left out of the new buffer must then get storage
of its own (:func:`own_storage`, which the optimizer base applies to every parameter not stepped), or its
row would keep the whole old buffer alive.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch


def _stacked_base(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The [B, ...] tensor whose rows are exactly ``tensors``, in order, or None."""
    base = tensors[0]._base
    if base is None or not base.is_contiguous() or tuple(base.shape) != (len(tensors), *tensors[0].shape):
        return None
    offset, row = base.storage_offset(), base.stride(0)
    for tensor in tensors:
        if tensor._base is not base or tensor.storage_offset() != offset:
            return None
        offset += row
    return base


def stacked_state(states: Sequence[Dict[str, Any]], key: str, index: Optional[int] = None) -> torch.Tensor:
    """[B, ...] buffer of ``state[key]`` (or ``state[key][index]``) over ``states``; rows are the entries.

    Entries that are not yet rows of one buffer are stacked into a new one and replaced by its rows.
    """
    tensors: List[torch.Tensor] = [s[key] if index is None else s[key][index] for s in states]
    base = _stacked_base(tensors)
    if base is None:
        base = torch.stack(tensors).contiguous()  # stack keeps the inputs' strides
        # one unbind makes every row view (half the time of indexing row by row)
        for state, row in zip(states, base.unbind(0)):
            if index is None:
                state[key] = row
            else:
                state[key][index] = row
    return base


def _flat_base(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The 1-D tensor that ``tensors`` tile, in order and back to back, or None."""
    base = tensors[0]._base
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    offset = base.storage_offset()
    for tensor in tensors:
        if tensor._base is not base or tensor.storage_offset() != offset or not tensor.is_contiguous():
            return None
        offset += tensor.numel()
    return base if offset == base.storage_offset() + base.numel() else None


def flat_state(states: Sequence[Dict[str, Any]], key: str) -> torch.Tensor:
    """1-D buffer holding ``state[key]`` of every state back to back; the entries are views of it.

    For tensors of different shapes stepped elementwise alike: one op over the buffer replaces one per
    tensor. Entries that do not tile one buffer yet are concatenated into a new one and replaced by views.
    """
    tensors: List[torch.Tensor] = [s[key] for s in states]
    base = _flat_base(tensors)
    if base is None:
        base = torch.cat([t.reshape(-1) for t in tensors])
        offset = 0
        for state, tensor in zip(states, tensors):
            state[key] = base[offset : offset + tensor.numel()].view(tensor.shape)
            offset += tensor.numel()
    return base


def own_storage(states: Sequence[Dict[str, Any]], key: str) -> None:
    """Replace ``state[key]`` by a copy in storage of its own wherever it is a view of a larger buffer (a
    row or slice of a bucket it no longer shares with anyone), so that it does not keep that buffer alive."""
    for state in states:
        tensor = state[key]
        if tensor._base is not None and tensor._base.numel() > tensor.numel():
            state[key] = tensor.clone(memory_format=torch.contiguous_format)
