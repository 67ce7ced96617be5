"""Optimizer state on several ranks, in the forms torch's checkpoint paths expect. Nothing is dropped:
every form is complete, or marked as one rank's share so that it can never be loaded as a whole.

* **Complete (DCP) form**, built when ``torch.distributed.checkpoint.state_dict`` asks for the state
  (``get_state_dict`` / ``get_optimizer_state_dict``, which every rank calls): every state tensor is a
  DTensor. A piece-stepped parameter's state has the parameter's placements; an owner's state is sent
  out to every rank as DTensors (parameter-shaped tensors with the parameter's placements, factors and
  bases ``Shard(0)`` over the parameter's shard axes and replicated over its replicate axes; under DDP,
  ``Shard(0)`` on a mesh of the process group). So DCP writes each piece once and reshards on load, and
  ``full_state_dict=True`` gathers every parameter's whole state, as it does for DTensors.
* **A rank's share**, from a plain ``state_dict()`` call under FSDP2: piece-stepped state as DTensors,
  an owner's state as plain full tensors, ``{}`` for what other ranks keep, and a ``soap_optim_share``
  entry naming the rank and the plan. It loads back only on the same rank of the same layout.
* **Single-process form**: ``consolidate_state_dict(to=r)`` gathers it on rank r (a collective); any
  optimizer, on any number of ranks, loads it. Under DDP with ``process_group=`` a plain ``state_dict()``
  returns it on a rank that just consolidated, and otherwise refuses (as ``ZeroRedundancyOptimizer``
  does): a rank-0-only ``torch.save(opt.state_dict())`` would otherwise save a fraction of the state.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch

from ..state_tree import map_tensors
from .exchange import all_to_all
from .placements import Region, is_dtensor, is_shard, placements_on_root, region_at

SHARE_KEY = "soap_optim_share"


def called_by_torch_checkpoint() -> bool:
    """Whether ``state_dict()`` runs inside ``torch.distributed.checkpoint.state_dict``'s
    ``_get_optim_state_dict``: an API that every rank calls, so the state may be gathered collectively."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code.co_name == "_get_optim_state_dict" and frame.f_globals.get("__name__", "").startswith(
            "torch.distributed.checkpoint"
        ):
            return True
        frame = frame.f_back
    return False


def leaves(value: Any) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    map_tensors(value, lambda t: found.append(t) or t)
    return found


def _contiguous_stride(shape) -> tuple:
    stride, running = [], 1
    for size in reversed(list(shape)):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


def _dtensor(local: torch.Tensor, mesh, placements, shape) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.contiguous(), mesh, tuple(placements), run_check=False, shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


class StatePlacement:
    """How an owner's state tensor of a given shape is laid out on the ranks in the complete form."""

    def __init__(self, distribution, index: int) -> None:
        self.role = distribution.role(index)
        self.param = distribution._entries[index][2]
        self.mesh = distribution.checkpoint_mesh()
        self.mesh_shape = tuple(self.mesh.mesh.shape)

    def placements(self, shape) -> tuple:
        from torch.distributed.tensor import Replicate, Shard

        if is_dtensor(self.param):
            on_root = placements_on_root(self.param.device_mesh, self.param.placements)
            if tuple(shape) == tuple(self.param.shape):
                return on_root
            return tuple(Shard(0) if is_shard(p) else Replicate() for p in on_root)
        return (Shard(0),)

    def region(self, shape, position: int) -> Region:
        if is_dtensor(self.param) and tuple(shape) == tuple(self.param.shape):
            return self.role.layout.regions[position]
        coordinate = [int(c) for c in torch.unravel_index(torch.tensor(position), self.mesh_shape)]
        return region_at(shape, self.mesh_shape, coordinate, self.placements(shape))


def _describe(value: Any) -> Any:
    """The structure of an owner's state entry, with 0-d tensors and numbers as values (picklable)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return ("scalar", value.detach().cpu().clone())
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_describe(v) for v in value)
    return value


def complete_state(distribution, optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The complete (DCP) form; a collective over the optimizer's ranks."""
    me, size = distribution.rank, distribution.world_size
    state = dict(state_dict["state"])
    owned = [i for i in range(len(distribution._entries)) if not distribution.role(i).is_local]
    # what the owners hold: the canonical owner (the one for position 0) describes each entry
    mine = {i: _describe(state[i]) for i in owned if distribution.role(i).owner[0] == me and i in state}
    described: List[Optional[Dict]] = [None] * size
    torch.distributed.all_gather_object(described, mine, group=distribution.group)
    structure = {i: d for part in described for i, d in part.items()}
    # one all-to-all per dtype sends each rank its pieces of every owner's tensors
    jobs = []  # (index, path, shape, dtype, placement helper)
    for index in owned:
        if index not in structure:
            continue
        helper = StatePlacement(distribution, index)
        for path, (shape, dtype) in _tensor_paths(structure[index]):
            jobs.append((index, path, shape, dtype, helper))
    pieces: Dict[tuple, torch.Tensor] = {}
    device = distribution._collective_device()
    for dtype in sorted({job[3] for job in jobs}, key=str):
        sends: List[List[torch.Tensor]] = [[] for _ in range(size)]
        receive_sizes = [0] * size
        selected = [job for job in jobs if job[3] == dtype]
        for index, path, shape, _, helper in selected:
            role = helper.role
            if me in role.owners():
                whole = _at(state[index], path).to(device)
                for target in role.receivers(me):
                    sends[target].append(helper.region(shape, target).extract(whole).reshape(-1))
            receive_sizes[role.owner[me]] += helper.region(shape, me).numel
        per_source = all_to_all(distribution.stats, distribution.group, me, sends, receive_sizes, dtype, device)
        offsets = [0] * size
        for index, path, shape, _, helper in selected:
            owner = helper.role.owner[me]
            region = helper.region(shape, me)
            chunk = per_source[owner][offsets[owner] : offsets[owner] + region.numel]
            offsets[owner] += region.numel
            pieces[(index, path)] = _dtensor(chunk.view(region.local_shape), helper.mesh, helper.placements(shape), shape)
    for index in owned:
        if index in structure:
            state[index] = _rebuild(structure[index], lambda path, index=index: pieces[(index, path)])
        else:
            state.pop(index, None)
    for index in range(len(distribution._entries)):
        role = distribution.role(index)
        if role.is_local and index in state and is_dtensor(distribution._entries[index][2]):
            state[index] = _wrap_local(distribution._entries[index][2], state[index])
    # in parameter order on every rank (torch.optim orders by when state was created, which differs
    # between ranks): full_state_dict gathers entry by entry, and the collectives must line up
    return {**state_dict, "state": {index: state[index] for index in sorted(state)}}


def _tensor_paths(described: Any, path: tuple = ()):
    if isinstance(described, tuple) and described and described[0] == "tensor":
        yield path, (described[1], described[2])
    elif isinstance(described, dict):
        for k, v in described.items():
            yield from _tensor_paths(v, path + (k,))
    elif isinstance(described, list):
        for k, v in enumerate(described):
            yield from _tensor_paths(v, path + (k,))


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def _rebuild(described: Any, tensor_at, path: tuple = ()) -> Any:
    if isinstance(described, tuple) and described and described[0] == "tensor":
        return tensor_at(path)
    if isinstance(described, tuple) and described and described[0] == "scalar":
        return described[1].clone()
    if isinstance(described, dict):
        return {k: _rebuild(v, tensor_at, path + (k,)) for k, v in described.items()}
    if isinstance(described, list):
        return [_rebuild(v, tensor_at, path + (k,)) for k, v in enumerate(described)]
    return described


def _wrap_local(param: torch.Tensor, value: Any) -> Any:
    """A piece-stepped parameter's state: tensors of the local piece's shape as DTensors like ``param``."""
    local_shape = param.to_local().shape

    def wrap(tensor):
        if tensor.dim() and tensor.shape == local_shape and not is_dtensor(tensor):
            return _dtensor(tensor, param.device_mesh, param.placements, param.shape)
        return tensor

    return map_tensors(value, wrap)


def share(distribution, optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """This rank's share, marked (see the module docstring)."""
    state = dict(state_dict["state"])
    for index, (_, _, param) in enumerate(distribution._entries):
        if not distribution.steps_here(index):
            state[index] = {}
        elif distribution.role(index).is_local and index in state and is_dtensor(param):
            state[index] = _wrap_local(param, state[index])
    marker = {"rank": distribution.rank, "world_size": distribution.world_size, "plan": distribution.plan_signature()}
    return {**state_dict, "state": state, SHARE_KEY: marker}


def check_share(distribution, state_dict: Dict[str, Any], name: str) -> None:
    """ValueError unless a loaded share belongs to this rank of this very layout."""
    marker = state_dict.get(SHARE_KEY)
    if marker is None:
        return
    here = {"rank": distribution.rank, "world_size": distribution.world_size, "plan": distribution.plan_signature()}
    if marker != here:
        raise ValueError(
            f"{name}: this state dict is rank {marker.get('rank')} of {marker.get('world_size')}'s share of a "
            f"distributed optimizer's state (the other ranks' parameters are not in it), and this optimizer is "
            f"{'rank %d of %d' % (here['rank'], here['world_size']) if here['world_size'] > 1 else 'one process'}"
            f"{' with another layout' if marker.get('rank') == here['rank'] and marker.get('world_size') == here['world_size'] else ''}. "
            f"Load it on the same rank of an identical run, or save a complete checkpoint instead: "
            f"torch.distributed.checkpoint (get_state_dict / get_optimizer_state_dict) or consolidate_state_dict(to=0)"
        )


def import_entry(distribution, index: int, value: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A loaded state entry as this rank keeps it (None where another rank steps the parameter).
    Complete-form DTensors of an owned parameter are gathered whole (a collective per tensor: every rank
    loads the same structure, so they run in the same order everywhere)."""
    role = distribution.role(index)
    param = distribution._entries[index][2]
    if role is None:
        if any(is_dtensor(t) for t in leaves(value)):
            return map_tensors(value, lambda t: t.full_tensor() if is_dtensor(t) else t)
        return value
    if not role.is_local:
        whole = map_tensors(value, lambda t: t.full_tensor() if is_dtensor(t) else t)
        return whole if distribution.rank in role.owners() else None
    region = role.layout.regions[distribution.rank]

    def localize(tensor):
        if is_dtensor(tensor):
            if tuple(tensor.placements) == tuple(param.placements) and tensor.device_mesh == param.device_mesh:
                return tensor.to_local()
            tensor = tensor.full_tensor()
        if tensor.dim() and tensor.shape == param.shape:
            return region.extract(tensor)
        return tensor

    return map_tensors(value, localize)


def global_view(value: Any) -> Any:
    """Shapes to validate a loaded entry against: a DTensor stands for its global shape."""
    return map_tensors(value, lambda t: torch.empty(t.shape, device="meta") if is_dtensor(t) else t)


def consolidate(distribution, state_dict: Dict[str, Any], to: int) -> Optional[Dict[str, Any]]:
    """The single-process state dict on rank ``to`` (None on the others); a collective."""
    me = distribution.rank
    payload = {}
    for index, value in state_dict["state"].items():
        role = distribution.role(index)
        if role is None or not value:
            continue
        if (role.is_local and role.counted) or (not role.is_local and role.owner[0] == me):
            payload[index] = map_tensors(value, lambda t: t.detach().cpu())
    gathered = [None] * distribution.world_size if me == to else None
    torch.distributed.gather_object(payload, gathered, dst=distribution.global_rank(to), group=distribution.group)
    if me != to:
        return None
    state = {}
    for index, (_, _, param) in enumerate(distribution._entries):
        role = distribution.role(index)
        if not role.is_local:
            source = gathered[role.owner[0]]
            if index in source:
                state[index] = source[index]
            continue
        pieces = {q: gathered[q][index] for q in range(distribution.world_size) if index in gathered[q]}
        if pieces:
            state[index] = _assemble(pieces, role, param)
    return {"state": state, "param_groups": state_dict["param_groups"]}


def _assemble(pieces: Dict[int, Any], role, param: torch.Tensor) -> Any:
    """One piece-stepped parameter's state from its canonical pieces: piece-shaped tensors reassembled
    by their regions; anything else (the step count) is the same everywhere and taken from the first."""
    first_position = min(pieces)
    first = pieces[first_position]

    def build(path):
        sample = _at(first, path)
        if isinstance(sample, torch.Tensor) and sample.dim() and tuple(sample.shape) == role.layout.regions[first_position].local_shape:
            whole = torch.empty(param.shape, dtype=sample.dtype)
            for position, piece in pieces.items():
                role.layout.regions[position].insert(whole, _at(piece, path))
            return whole
        return sample

    return _rebuild(_describe_paths(first), build)


def _describe_paths(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", None, None)
    if isinstance(value, dict):
        return {k: _describe_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe_paths(v) for v in value]
    return value
