"""Same-shaped state tensors of a param group kept as rows of one stacked buffer (a pool).

The batched path steps a bucket of B same-shaped parameters with one call per stage on [B, ...] tensors.
Stacking the state afresh every step would copy every factor and basis (B d^2 numbers each) twice per
step; instead each parameter's state entry *is* a row view of one pool per entry kind, and each member
keeps its row whether it has a gradient or not. A step in which every member takes part, in row order,
uses the pools in place. A step in which only some do (mixture-of-experts routing, LayerDrop, frozen
layers) gathers their rows (``index_select``: the copy that computing the new values into buffers of their
own needs anyway) and writes the new values back into the same rows (``index_copy_``): nothing is
re-stacked and no row is left without an owner, so the state holds no storage beyond its own bytes.

Entries that are not rows of one pool yet (a new state, a loaded one) are stacked into a new pool, which
may leave rows nobody uses in the pools they came from; :func:`release_unused_rows` (which the optimizer
base runs after such a step only) merges the members of such a pool into one again. Members that keep
taking part without the others (frozen layers) get pools of their own after a few steps, so that they
are stepped in place instead of gathered every step. Tensors stepped
elementwise (biases, norm gains: different shapes) share one flat buffer the same way (:func:`flat_state`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

# An entry kind: a state key, and the position in the key's list (None for a tensor entry).
Kind = Tuple[str, Optional[int]]


def _entry(state: Dict[str, Any], kind: Kind) -> torch.Tensor:
    key, index = kind
    return state[key] if index is None else state[key][index]


def _set_entry(state: Dict[str, Any], kind: Kind, value: torch.Tensor) -> None:
    key, index = kind
    if index is None:
        state[key] = value
    else:
        state[key][index] = value


def pooled_rows(tensors: Sequence[torch.Tensor]) -> Optional[Tuple[torch.Tensor, List[int]]]:
    """(pool, rows): the contiguous [N, ...] tensor of which ``tensors`` (of one shape: a bucket's entries
    of one kind) are rows, and their row numbers; or None when they are not distinct rows of one such
    tensor. Runs every step for every entry kind of a bucket: a few attribute reads per entry."""
    first = tensors[0]
    base = first._base
    if base is None or base.dim() != first.dim() + 1 or base.shape[1:] != first.shape or not base.is_contiguous():
        return None
    start, row = base.storage_offset(), base.stride(0)
    if row == 0 or not first.is_contiguous() or any(tensor._base is not base for tensor in tensors):
        return None
    offsets = [tensor.storage_offset() - start for tensor in tensors]
    if offsets == list(range(0, row * len(offsets), row)):  # every row in order, or the first ones
        return base, list(range(len(offsets)))
    rows = [offset // row for offset in offsets]
    if any(offset % row for offset in offsets) or len(set(rows)) != len(rows):
        return None
    return base, rows


def _stack_into_pool(states: Sequence[Dict[str, Any]], kind: Kind) -> torch.Tensor:
    """A new pool holding the entries of ``states`` in order; the entries become its rows."""
    pool = torch.stack([_entry(state, kind) for state in states]).contiguous()  # stack keeps the inputs' strides
    # one unbind makes every row view (half the time of indexing row by row)
    for state, row in zip(states, pool.unbind(0)):
        _set_entry(state, kind, row)
    return pool


def _concatenate_into_flat(states: Sequence[Dict[str, Any]], kind: Kind) -> torch.Tensor:
    """A new 1-D buffer holding the entries of ``states`` back to back; the entries become views of it."""
    tensors = [_entry(state, kind) for state in states]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for state, tensor, piece in zip(states, tensors, flat.split([t.numel() for t in tensors])):
        _set_entry(state, kind, piece.view(tensor.shape))
    return flat


# Steps in a row with the same members taking part after which they get pools of their own (frozen layers:
# the others are not coming back soon, and gathering the rows every step costs a copy in and out that a
# pool of their own does not). Random participation (experts) almost never repeats a set this often.
STEADY_STEPS = 3


class Pools(NamedTuple):
    pools: List[torch.Tensor]  # one per entry kind
    rows: Optional[List[int]]  # the states' rows in every pool (None: every row, in order)
    relaid: bool  # entries were stacked into new pools: the pools they left may hold rows nobody uses
    apart: bool  # the new pools hold members that keep taking part without the others: not to be merged back


def _steady(history: Dict[Tuple, Tuple[Tuple[int, ...], int]], pool: torch.Tensor, rows: List[int]) -> bool:
    """Whether these rows of ``pool`` have taken part alone for :data:`STEADY_STEPS` steps in a row,
    counting this one (``history``: the last rows and count per pool, updated here)."""
    if len(history) > 4096:  # pools long gone (a storage address may be reused: a miscount costs speed only)
        history.clear()
    key = (pool.device, pool.untyped_storage().data_ptr())
    last, count = history.get(key, ((), 0))
    count = count + 1 if last == tuple(rows) else 1
    history[key] = (tuple(rows), count)
    return count >= STEADY_STEPS


def bucket_pools(
    states: Sequence[Dict[str, Any]], kinds: Sequence[Kind], history: Optional[Dict] = None
) -> Pools:
    """The pool of every entry kind of ``states`` and the states' rows in them, one row order for all kinds.

    Entries that are not rows of one pool per kind, at the same rows for every kind, are stacked into new
    pools that hold just these states (the values stay as they are); so are the entries of states that
    took part without the rest of their pools for :data:`STEADY_STEPS` steps in a row (``history``: a dict
    kept by the caller between steps; None: never)."""
    pools: List[torch.Tensor] = []
    order: Optional[List[int]] = None
    for kind in kinds:
        found = pooled_rows([_entry(state, kind) for state in states])
        if found is None or (order is not None and found[1] != order):
            break
        pools.append(found[0])
        order = found[1]
    else:
        if order == list(range(len(states))) and all(pool.shape[0] == len(states) for pool in pools):
            return Pools(pools, None, False, False)
        if history is None or not _steady(history, pools[0], order):
            return Pools(pools, order, False, False)
        return Pools([_stack_into_pool(states, kind) for kind in kinds], None, True, True)
    return Pools([_stack_into_pool(states, kind) for kind in kinds], None, True, False)


def release_unused_rows(groups: Sequence[Sequence[Dict[str, Any]]], apart: Sequence[torch.Tensor] = ()) -> None:
    """Give no storage to rows nobody uses: wherever the entries on one storage (a pool, or a flat buffer
    of :func:`flat_state`) no longer cover it, re-stack them.

    ``groups``: the states of each param group, in parameter order. Where a pool has unused rows, the
    entries of its kind of every state of the same group and layout (the shapes of all its entries: what
    the members of a bucket share) are merged into one pool, in parameter order, those in storage of their
    own included (the members a new state or a loaded one brought); where a flat buffer has unused bytes,
    the slices of flat buffers of its kind in the group are concatenated into one. A bucket's members then
    stay in one pool (or flat buffer) whichever of them take part in a step; but the rows of the pools in
    ``apart`` (new pools of members that take part without the others, see :func:`bucket_pools`) stay
    where they are, and the others of their kind are merged without them. The values stay as they are.
    Allocates: if that fails, the layout stays as it was (the caller retries later)."""
    covered: Dict[Tuple, int] = defaultdict(int)
    sizes: Dict[Tuple, int] = {}
    classes: Dict[Tuple, List[Tuple[Dict[str, Any], Kind, Optional[Tuple]]]] = defaultdict(list)
    for group_index, states in enumerate(groups):
        for state in states:
            entries = [
                ((key, index), tensor)
                for key, value in state.items()
                for index, tensor in (enumerate(value) if isinstance(value, list) else [(None, value)])
                if isinstance(tensor, torch.Tensor) and tensor.numel()
            ]
            # states of one layout (shapes of every entry: what a bucket's members share) pool together
            layout = tuple((kind, tensor.shape, tensor.dtype, tensor.device) for kind, tensor in entries)
            for kind, tensor in entries:
                storage = tensor.untyped_storage()
                own = tensor.numel() * tensor.element_size()
                base = tensor._base
                is_row = base is not None and base.dim() == tensor.dim() + 1 and base.shape[1:] == tensor.shape
                where = None
                if storage.nbytes() != own:
                    where = (tensor.device, storage.data_ptr())
                    covered[where] += own
                    sizes[where] = storage.nbytes()
                if is_row or where is None:
                    classes[("row", group_index, layout, kind)].append((state, kind, where))
                else:  # a slice of a flat buffer (or of a storage shared without a view: a copy, a load)
                    classes[("flat", group_index, kind, tensor.dtype, tensor.device)].append((state, kind, where))
    unused = {where for where, size in sizes.items() if covered[where] != size}
    if not unused:
        return
    kept = {(pool.device, pool.untyped_storage().data_ptr()) for pool in apart}
    for name, members in classes.items():
        if not any(where in unused for _, _, where in members):
            continue
        # the whole class in one pool or flat buffer: its members then stay in one whichever take part
        kind = members[0][1]  # one kind per class
        moved = [state for state, _, where in members if where not in kept]
        if len(moved) == 1:
            _set_entry(moved[0], kind, _entry(moved[0], kind).clone(memory_format=torch.contiguous_format))
        elif name[0] == "row":
            _stack_into_pool(moved, kind)
        else:
            _concatenate_into_flat(moved, kind)


def _flat_base(tensors: Sequence[torch.Tensor]) -> Optional[Tuple[torch.Tensor, bool]]:
    """(base, whole): the 1-D tensor of which ``tensors`` are distinct contiguous slices, and whether they
    tile it, in order and back to back; or None."""
    base = tensors[0]._base
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    start = base.storage_offset()
    offset, in_order, spans = start, True, []
    for tensor in tensors:
        if tensor._base is not base or not tensor.is_contiguous():
            return None
        in_order = in_order and tensor.storage_offset() == offset
        spans.append((tensor.storage_offset(), tensor.numel()))
        offset = tensor.storage_offset() + tensor.numel()
    if not in_order:
        spans.sort()
        if any(first + size > second for (first, size), (second, _) in zip(spans, spans[1:])):
            return None  # overlapping slices
    return base, in_order and offset == start + base.numel()


def flat_state(states: Sequence[Dict[str, Any]], key: str) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]], bool]:
    """``state[key]`` of every state back to back in one 1-D tensor, for tensors of different shapes
    stepped elementwise alike (one op over it replaces one per tensor): (flat, members, relaid).

    * The entries tile one buffer, in order: that buffer, None, False (used in place).
    * They are some slices of one buffer (the members of a flat pool that take part in this step): their
      concatenation, the entries (to write the new values back into), False.
    * Otherwise they are concatenated into a new buffer and replaced by views of it: the buffer, None,
      True (the buffers they left may hold slices nobody uses: see :func:`release_unused_rows`).
    """
    tensors: List[torch.Tensor] = [s[key] for s in states]
    found = _flat_base(tensors)
    if found is not None:
        base, whole = found
        if whole:
            return base, None, False
        return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors]), tensors, False
    return _concatenate_into_flat(states, (key, None)), None, True
