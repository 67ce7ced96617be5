"""The one place that knows about ranks: who steps which parameter, with which tensors, and how the
results reach everyone. The optimizer math never sees it: the base's ``step`` asks it for the tensors
to step, sums the gradient check over ranks through it, and lets it bring the new values home.

Three modes, chosen from the parameters and the ``process_group`` keyword:

* **single** (one process; no keyword, plain tensors): every parameter is stepped here, as it is.
* **replicated** (DDP, ``process_group=...``): every rank holds every parameter and, after DDP's
  all-reduce, the same gradients. Each parameter has one owner rank (:mod:`.ownership`, from shapes and
  the optimizer's cost model); the owner alone keeps its state and steps it, and one
  ``all_gather_into_tensor`` of the owners' new values (a flat buffer per dtype, padded to the largest
  share) makes every replica a bitwise copy.
* **sharded** (FSDP2, DTensor parameters on a 1-D mesh with ``Shard(0)``): a parameter whose update is
  elementwise (Adam's, SOAP's unpreconditioned tensors) is stepped on its local shard, with local state,
  and no communication. Every other parameter has one owner: one ``all_to_all_single`` sends each rank's
  gradient and parameter rows to the owners (split sizes from the shapes and FSDP2's dim-0 chunking, the
  short or empty last shard included), the owner steps the reassembled full tensors with the unchanged
  single-process math, batched by shape with its other parameters, and a second ``all_to_all_single``
  returns each rank its rows of the new values. Factors, bases and moments live on the owner only.
  Adafactor's factored statistics, update clipping, SOAP's ``normalize_grads``, Shampoo's grafting
  norms and ``orthograd`` reduce over whole tensors, so those parameters take the owner path: every
  cross-row reduction is then the single-process one.

Checkpoints follow torch's conventions. ``state_dict()`` holds this rank's share: an owner's full,
plain tensors, and for shard-stepped parameters DTensors with the parameter's placements, so
``torch.distributed.checkpoint`` saves each entry once and reshards on load. ``load_state_dict`` takes
such a dict, or a single-process one (each rank keeps its share). ``consolidate_state_dict(to=0)``
gathers the single-process form on one rank (as ``ZeroRedundancyOptimizer`` does), so runs move
between 1 and N ranks either way.

Not supported (a ValueError says so before any step): 2-D meshes (HSDP), placements other than
``Shard(0)`` (tensor parallelism), DTensor parameters mixed with plain ones, and ``process_group``
together with DTensor parameters.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .ownership import assign_owners

LOCAL = -1  # role of a parameter stepped where it is (single process, or a shard-stepped DTensor)


@dataclass
class CommStats:
    """What this rank's optimizer steps have communicated since the last ``reset``: one count per
    collective call; the bytes it sent to and received from *other* ranks (a rank's own segment of an
    all-to-all stays local; an all-gather sends the rank's padded share to each other rank and receives
    theirs; an all-reduce counts a ring's 2 (W-1)/W of the buffer each way); and the wall time inside
    the calls (on CUDA, synchronized before and after each, so the time is the collective's)."""

    collectives: int = 0
    sent: int = 0
    received: int = 0
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return self.sent + self.received

    def reset(self) -> None:
        self.collectives, self.sent, self.received, self.seconds = 0, 0, 0, 0.0

    def run(self, collective, *tensors: torch.Tensor, sent: int, received: int, **kwargs) -> None:
        """``collective(*tensors, **kwargs)``, counted with the given off-rank byte counts."""
        on_cuda = any(t.is_cuda for t in tensors)
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        collective(*tensors, **kwargs)
        if on_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.collectives += 1
        self.sent += sent
        self.received += received


class WorkItem(NamedTuple):
    """A parameter this rank steps now: ``tensor`` and ``grad`` are what the math works on."""

    param: torch.Tensor  # the optimizer's parameter (the key of its state)
    tensor: torch.Tensor  # the parameter itself, its local shard, or a reassembled full copy
    grad: torch.Tensor  # the gradient matching ``tensor`` (raw: the base makes it effective)
    group_index: int
    param_index: int
    global_index: int  # position over all groups: torch's state_dict id


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "device_mesh")


def chunk_rows(rows: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of ``rank``'s dim-0 chunk, as torch.chunk (and so FSDP2) splits ``rows``."""
    size = -(-rows // world_size) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


class Distribution:
    """See the module docstring. One per optimizer; stateless between steps but for the cached roles."""

    def __init__(self, process_group=None) -> None:
        self._process_group = process_group
        self._mode: Optional[str] = None  # decided from the parameters (check_params)
        self._mesh = None
        self._roles: Optional[List[int]] = None  # per global index: LOCAL or the owner rank
        self._entries: List[Tuple[int, int, torch.Tensor]] = []
        self._pending: List[Tuple[torch.Tensor, torch.Tensor, int]] = []  # (param, full tensor, owner)
        self.stats = CommStats()

    # ------------------------------------------------------------------ mode and ranks
    def check_params(self, params: Sequence[torch.Tensor]) -> None:
        """ValueError for layouts this layer cannot step exactly; fixes the mode on first call."""
        kinds = {_is_dtensor(p) for p in params}
        mode = "sharded" if True in kinds else ("replicated" if self._process_group is not None else "single")
        if len(kinds) > 1 or (self._mode is not None and self._mode != mode and params):
            raise ValueError(
                "soap_optim: DTensor (FSDP2) parameters cannot be mixed with plain tensors in one optimizer; "
                "apply fully_shard to the root module too, so that every parameter is a DTensor"
            )
        if mode == "sharded":
            if self._process_group is not None:
                raise ValueError(
                    "soap_optim: process_group= is for DDP (replicated parameters); FSDP2 parameters carry "
                    "their device mesh, so leave it unset"
                )
            for param in params:
                mesh, placements = param.device_mesh, tuple(param.placements)
                if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]).__name__ != "Shard" or placements[0].dim != 0:
                    raise ValueError(
                        f"soap_optim supports FSDP2 parameters on a 1-D device mesh sharded on dim 0 (Shard(0)); "
                        f"got a {mesh.ndim}-D mesh with placements {placements}. HSDP (2-D meshes) and tensor "
                        f"parallelism are not supported yet"
                    )
                if self._mesh is not None and mesh != self._mesh:
                    raise ValueError("soap_optim: all FSDP2 parameters of one optimizer must share one device mesh")
                self._mesh = mesh
        if params:
            self._mode = mode

    @property
    def mode(self) -> str:
        return self._mode or "single"

    @property
    def group(self):
        if self.mode == "sharded":
            return self._mesh.get_group()
        return self._process_group

    @property
    def world_size(self) -> int:
        if self.mode == "single":
            return 1
        return torch.distributed.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if self.mode == "single":
            return 0
        return torch.distributed.get_rank(self.group)

    def invalidate(self) -> None:
        self._roles = None

    # ------------------------------------------------------------------ roles
    def num_params(self, groups) -> int:
        return sum(len(group["params"]) for group in groups)

    def first_index(self, groups, group_index: int) -> int:
        """The global index of the first parameter of group ``group_index``."""
        return sum(len(group["params"]) for group in groups[:group_index])

    def locate(self, groups, global_index: int) -> Tuple[int, int, torch.Tensor]:
        for group_index, group in enumerate(groups):
            if global_index < len(group["params"]):
                return group_index, global_index, group["params"][global_index]
            global_index -= len(group["params"])
        raise IndexError(global_index)

    def plan(self, optimizer, groups, hypers, *, loading: bool = False) -> List[int]:
        """Each parameter's role (LOCAL or its owner), from shapes and options alone. Raises ValueError,
        before anything changes, if a change of options would move existing state (not when ``loading``
        a state dict, which replaces it)."""
        entries = [(gi, pi, p) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])]
        if self.mode == "single":
            roles = [LOCAL] * len(entries)
        else:
            sharded = self.mode == "sharded"
            local = [
                sharded and not hypers[gi]["orthograd"] and optimizer._is_elementwise(p.shape, hypers[gi])
                for gi, _, p in entries
            ]
            owned = [i for i, is_local in enumerate(local) if not is_local]
            costs = [optimizer._cost(entries[i][2].shape, hypers[entries[i][0]]) for i in owned]
            roles = [LOCAL] * len(entries)
            for index, owner in zip(owned, assign_owners(costs, self.world_size)):
                roles[index] = owner
        if (
            not loading
            and self._roles is not None
            and roles != self._roles
            and [p for _, _, p in entries] == [p for _, _, p in self._entries]
            and any(optimizer.state.get(p) for _, _, p in entries)
        ):
            raise ValueError(
                "soap_optim: this change of options would move parameters between ranks (e.g. orthograd, "
                "normalize_grads or factorized toggled under FSDP2) after state was built; build a new optimizer"
            )
        self._roles, self._entries = roles, entries
        return roles

    # ------------------------------------------------------------------ a step
    def gather(self, optimizer, groups, hypers) -> List[List[WorkItem]]:
        """Per group, the parameters this rank steps now, with the tensors to step."""
        if self.mode == "single":  # every parameter, as it is
            work_single, index = [], 0
            for gi, group in enumerate(groups):
                items = []
                for pi, param in enumerate(group["params"]):
                    if param.grad is not None:
                        items.append(WorkItem(param, param, param.grad, gi, pi, index + pi))
                work_single.append(items)
                index += len(group["params"])
            return work_single
        roles = self.plan(optimizer, groups, hypers)
        work: List[List[WorkItem]] = [[] for _ in groups]
        self._pending = []
        remote: List[int] = []  # owner-stepped DTensor parameters with a gradient, in global order
        for index, (gi, pi, param) in enumerate(self._entries):
            if param.grad is None:
                continue
            role = roles[index]
            if role == LOCAL:
                if self.mode == "sharded":
                    work[gi].append(WorkItem(param, param.to_local(), param.grad.to_local(), gi, pi, index))
                else:
                    work[gi].append(WorkItem(param, param, param.grad, gi, pi, index))
            elif self.mode == "replicated":
                if role == self.rank:
                    work[gi].append(WorkItem(param, param, param.grad, gi, pi, index))
            else:
                remote.append(index)
        if remote:
            for index, (full, grad) in self._exchange_to_owners(remote).items():
                gi, pi, param = self._entries[index]
                work[gi].append(WorkItem(param, full, grad, gi, pi, index))
                self._pending.append((param, full, index))
        return work

    def _rows(self, param: torch.Tensor, rank: int) -> Tuple[int, int]:
        rows = param.shape[0] if param.dim() else 1
        return chunk_rows(rows, self.world_size, rank)

    def _local_piece(self, param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        start, end = self._rows(param, self.rank)
        local = tensor.to_local()
        if local.dim() and local.shape[0] != end - start:
            raise ValueError(
                f"soap_optim: a DTensor of shape {tuple(param.shape)} has {local.shape[0]} local rows on rank "
                f"{self.rank}, expected {end - start} (torch.chunk's split of dim 0, as FSDP2 shards)"
            )
        return local.reshape(-1)

    def _exchange_to_owners(self, remote: List[int]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """One all_to_all_single per dtype: every rank's gradient and parameter rows of each parameter go
        to its owner, which gets back (full parameter, full gradient) for the ones it owns."""
        world, me = self.world_size, self.rank
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for index in remote:
            param = self._entries[index][2]
            if param.grad.dtype != param.dtype:
                raise ValueError(
                    f"soap_optim: a gradient of dtype {param.grad.dtype} for a {param.dtype} FSDP2 parameter; "
                    f"the owner path sends both in one buffer, so they must match"
                )
            by_dtype.setdefault(param.dtype, []).append(index)
        assembled: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for dtype, indices in by_dtype.items():
            sends: List[List[torch.Tensor]] = [[] for _ in range(world)]
            receive_sizes = [0] * world
            for index in indices:
                param = self._entries[index][2]
                owner = self._roles[index]
                sends[owner] += [self._local_piece(param, param.grad), self._local_piece(param, param)]
                if owner == me:
                    row = math.prod(param.shape[1:])
                    for source in range(world):
                        start, end = self._rows(param, source)
                        receive_sizes[source] += 2 * (end - start) * row
            device = self._entries[indices[0]][2].to_local().device
            per_source = self._all_to_all(sends, receive_sizes, dtype, device)
            offsets = [0] * world
            for index in indices:
                if self._roles[index] != me:
                    continue
                param = self._entries[index][2]
                grads, values = [], []
                for source in range(world):
                    start, end = self._rows(param, source)
                    count = (end - start) * math.prod(param.shape[1:])
                    chunk = per_source[source][offsets[source] : offsets[source] + 2 * count]
                    offsets[source] += 2 * count
                    grads.append(chunk[:count])
                    values.append(chunk[count:])
                shape = param.shape
                assembled[index] = (torch.cat(values).view(shape).clone(), torch.cat(grads).view(shape))
        return assembled

    def _all_to_all(self, sends: List[List[torch.Tensor]], receive_sizes: List[int], dtype, device) -> List[torch.Tensor]:
        """One ``all_to_all_single``: ``sends[r]`` (flat pieces) to rank r; returns what each rank sent here."""
        me = self.rank
        send = torch.cat([torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device) for pieces in sends])
        received = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
        send_sizes = [sum(p.numel() for p in pieces) for pieces in sends]
        self.stats.run(
            torch.distributed.all_to_all_single, received, send, output_split_sizes=receive_sizes,
            input_split_sizes=send_sizes, group=self.group,
            sent=(sum(send_sizes) - send_sizes[me]) * send.element_size(),
            received=(sum(receive_sizes) - receive_sizes[me]) * send.element_size(),
        )
        return list(received.split(receive_sizes))

    def scatter(self, optimizer) -> None:
        """After the math: bring every rank the new values of what other ranks stepped."""
        if self.mode == "sharded":
            self._return_rows()
        elif self.mode == "replicated":
            self._all_gather_owned(optimizer)
        self.mark_others(optimizer)

    def mark_others(self, optimizer) -> None:
        """An empty state entry for each parameter another rank owns, so that ``optimizer.state`` is never
        empty on a rank that owns nothing: DCP's ``get/set_optimizer_state_dict`` step an optimizer whose
        state is empty (to build it), which on that rank alone would wait forever in a collective."""
        if self.mode == "single" or self._roles is None:
            return
        for index, role in enumerate(self._roles):
            if role not in (LOCAL, self.rank):
                optimizer.state[self._entries[index][2]]  # defaultdict: creates {}

    def _return_rows(self) -> None:
        """The second all_to_all_single: each owner sends every rank its rows of the new values."""
        world, me = self.world_size, self.rank
        remote = [index for index, (_, _, param) in enumerate(self._entries)
                  if self._roles[index] != LOCAL and param.grad is not None]
        if not remote:
            return
        fulls = {index: full for _, full, index in self._pending}
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for index in remote:
            by_dtype.setdefault(self._entries[index][2].dtype, []).append(index)
        for dtype, indices in by_dtype.items():
            sends: List[List[torch.Tensor]] = [[] for _ in range(world)]
            receive_sizes = [0] * world
            for index in indices:
                param, owner = self._entries[index][2], self._roles[index]
                row = math.prod(param.shape[1:])
                if owner == me:
                    full = fulls[index].reshape(param.shape[0] if param.dim() else 1, -1)
                    for target in range(world):
                        start, end = self._rows(param, target)
                        sends[target].append(full[start:end].reshape(-1))
                start, end = self._rows(param, me)
                receive_sizes[owner] += (end - start) * row
            device = self._entries[indices[0]][2].to_local().device
            per_source = self._all_to_all(sends, receive_sizes, dtype, device)
            offsets = [0] * world
            for index in indices:
                param, owner = self._entries[index][2], self._roles[index]
                local = param.to_local()
                count = local.numel()
                local.copy_(per_source[owner][offsets[owner] : offsets[owner] + count].view(local.shape))
                offsets[owner] += count
        self._pending = []

    def _all_gather_owned(self, optimizer) -> None:
        """One all_gather_into_tensor per dtype of every owner's parameter values (sent whole, not as
        deltas, so that replicas stay bitwise copies), padded to the largest per-rank share."""
        world, me = self.world_size, self.rank
        by_dtype: Dict[torch.dtype, List[List[torch.Tensor]]] = {}
        for index, (_, _, param) in enumerate(self._entries):
            by_dtype.setdefault(param.dtype, [[] for _ in range(world)])[self._roles[index]].append(param)
        for dtype, shares in by_dtype.items():
            sizes = [sum(p.numel() for p in share) for share in shares]
            width = max(sizes)
            if width == 0:
                continue
            device = shares[me][0].device if shares[me] else next(p for s in shares for p in s).device
            send = torch.zeros(width, dtype=dtype, device=device)
            if shares[me]:
                torch.cat([p.detach().reshape(-1) for p in shares[me]], out=send[: sizes[me]])
            gathered = torch.empty(world * width, dtype=dtype, device=device)
            all_gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
            off_rank = (world - 1) * width * send.element_size()
            self.stats.run(all_gather, gathered, send, group=self.group, sent=off_rank, received=off_rank)
            for rank, share in enumerate(shares):
                if rank == me or not share:
                    continue
                values = gathered[rank * width : rank * width + sizes[rank]].split([p.numel() for p in share])
                for param, value in zip(share, values):
                    param.detach().copy_(value.view(param.shape))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a CPU tensor in, a CPU tensor out; one small collective)."""
        if self.mode == "single":
            return tensor
        device = self._collective_device()
        reduced = tensor.to(device)
        ring = 2 * (self.world_size - 1) * reduced.numel() * reduced.element_size() // self.world_size
        self.stats.run(torch.distributed.all_reduce, reduced, group=self.group, sent=ring, received=ring)
        return reduced.cpu()

    def _collective_device(self) -> torch.device:
        if self.mode == "sharded":
            return torch.device(self._mesh.device_type)
        backend = torch.distributed.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ checkpoints
    def export_state_dict(self, optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """This rank's share in DCP's terms: shard-stepped state as DTensors with the parameter's
        placements, an owner's state as plain full tensors, and an empty entry for each parameter another
        rank owns (DCP's ``set_optimizer_state_dict`` expects an entry for every trained parameter)."""
        if self.mode == "single" or self._roles is None:
            return state_dict
        from torch.distributed.tensor import DTensor

        state = dict(state_dict["state"])
        for index, role in enumerate(self._roles):
            param = self._entries[index][2]
            if role not in (LOCAL, self.rank):
                if param.requires_grad:
                    state[index] = {}
                continue
            if role != LOCAL or index not in state or self.mode != "sharded":
                continue
            local_shape = param.to_local().shape

            def wrap(tensor, param=param, local_shape=local_shape):
                if tensor.dim() and tensor.shape == local_shape:
                    return DTensor.from_local(
                        tensor, param.device_mesh, param.placements, run_check=False,
                        shape=param.shape, stride=param.stride(),
                    )
                return tensor

            state[index] = _map_tensors(state[index], wrap)
        return {**state_dict, "state": state}

    def import_state(self, optimizer, param: torch.Tensor, value: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A loaded state entry as this rank keeps it, or None where another rank owns the parameter."""
        if self.mode == "single":
            return value
        index = next(i for i, (_, _, p) in enumerate(self._entries) if p is param)
        role = self._roles[index]
        if role != LOCAL:
            if role != self.rank:
                return None
            if any(_is_dtensor(t) for t in _leaves(value)):
                raise ValueError(
                    "soap_optim: a DTensor in the loaded state of a parameter that one rank steps whole; load "
                    "state saved by soap_optim (through DCP or a single-process state dict)"
                )
            return value
        start, end = self._rows(param, self.rank)

        def localize(tensor):
            if _is_dtensor(tensor):
                return tensor.to_local()
            if tensor.dim() and tensor.shape == param.shape:
                return tensor[start:end]
            return tensor

        return _map_tensors(value, localize)

    def local_shapes(self, param: torch.Tensor, expected: Any) -> Any:
        """``expected`` state shapes as this rank keeps them (a shard-stepped parameter's local rows)."""
        if self.mode != "sharded":
            return expected
        index = next(i for i, (_, _, p) in enumerate(self._entries) if p is param)
        if self._roles[index] != LOCAL:
            return expected
        local = tuple(param.to_local().shape)
        return _map_shapes(expected, lambda shape: local if tuple(shape) == tuple(param.shape) else shape)

    def consolidate(self, optimizer, state_dict: Dict[str, Any], to: int) -> Optional[Dict[str, Any]]:
        """The single-process state dict on rank ``to`` (None on the others); a collective."""
        if self.mode == "single":
            return state_dict
        payload = {index: _map_tensors(value, lambda t: t.detach().cpu()) for index, value in state_dict["state"].items()}
        gathered = [None] * self.world_size if self.rank == to else None
        torch.distributed.gather_object(payload, gathered, dst=self._global_rank(to), group=self.group)
        if self.rank != to:
            return None
        state = {}
        for index, (_, _, param) in enumerate(self._entries):
            role = self._roles[index]
            if role != LOCAL:
                if index in gathered[role]:
                    state[index] = gathered[role][index]
                continue
            pieces = [g[index] for g in gathered if index in g]
            if pieces:
                state[index] = _concatenate_rows(pieces, param)
        return {"state": state, "param_groups": state_dict["param_groups"]}

    def _global_rank(self, group_rank: int) -> int:
        return torch.distributed.get_global_rank(self.group, group_rank) if self.group is not None else group_rank


def _leaves(value: Any) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    _map_tensors(value, lambda t: found.append(t) or t)
    return found


def _map_shapes(expected: Any, fn) -> Any:
    if isinstance(expected, list):
        return [_map_shapes(e, fn) for e in expected]
    if expected is None:
        return None
    return fn(expected)


def _concatenate_rows(pieces: List[Any], param: torch.Tensor) -> Any:
    """One shard-stepped state entry from every rank's rows: tensors split by rows are concatenated in
    rank order; anything else (the step count) is the same everywhere and taken from the first."""
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        if first.dim() and first.dim() == param.dim() and first.shape[1:] == param.shape[1:]:
            return torch.cat(pieces)
        return first
    if isinstance(first, dict):
        return {k: _concatenate_rows([p[k] for p in pieces], param) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concatenate_rows([p[i] for p in pieces], param) for i in range(len(first)))
    return first
