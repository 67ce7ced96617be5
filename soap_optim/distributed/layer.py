"""The one place that knows about ranks: which parameters this rank steps, with which tensors, and how
the results reach everyone. The optimizer math never sees it: the base's ``step`` asks it for the tensors
to step, sums the gradient check over ranks through it, and lets it bring the new values home.

The mode follows the parameters in ``param_groups`` whenever they change (frameworks such as accelerate
write FSDP2's DTensors there after the optimizer was built), checked at every ``step``, ``state_dict``
and ``load_state_dict`` by identity (a tuple compare when nothing changed):

* **single**: plain tensors and no ``process_group``: every parameter is stepped here, as it is.
* **replicated** (DDP with ``process_group=``): every rank holds every parameter and, after DDP's
  all-reduce, the same gradients. Each parameter has one owner (cost-balanced, :mod:`.ownership`); the
  owner alone keeps its state and steps it, and one all-to-all brings its new values to every rank.
* **sharded** (DTensor parameters: FSDP2, HSDP, tensor parallelism, on one device mesh of any number of
  dimensions): each rank's piece of each parameter comes from its placements (:mod:`.placements`).
  Parameters whose update is elementwise are stepped piece by piece with no communication; every other
  parameter has an owner in its shard group (:mod:`.plan`), which receives the pieces in one packed
  all-to-all, steps the whole tensor with the unchanged single-process math (batched with its other
  parameters of that shape), and returns the new pieces in a second one.

Checkpoints: see :mod:`.checkpoint`.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .exchange import CommStats, all_reduce_sum, all_to_all
from .placements import Layout, dtensor_layout, is_dtensor, replicated_layout, root_mesh, single_layout
from .plan import Role, build_roles

class WorkItem(NamedTuple):
    """A parameter this rank steps now: ``tensor`` and ``grad`` are what the math works on."""

    param: torch.Tensor  # the optimizer's parameter (the key of its state)
    tensor: torch.Tensor  # the parameter itself, its local piece, or a reassembled full copy
    grad: torch.Tensor  # the gradient matching ``tensor`` (raw: the base makes it effective)
    group_index: int
    param_index: int
    global_index: int  # position over all groups: torch's state_dict id
    counted: bool = True  # enters the gradient-norm sums (each gradient counted once over ranks)


def chunk_rows(rows: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of ``rank``'s dim-0 chunk, as torch.chunk (and so FSDP2's Shard(0)) splits ``rows``."""
    size = -(-rows // world_size) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


_SUPPORTED = (
    "FSDP2 / HSDP / tensor-parallel DTensor parameters (fully_shard, parallelize_module), or plain "
    "parameters with DDP and process_group="
)


def _is_flat_fsdp1(param: torch.Tensor) -> bool:
    """FSDP1 (FullyShardedDataParallel) hands optimizers flattened 1-D parameters it marks this way."""
    return bool(getattr(param, "_fsdp_flattened", False)) or type(param).__name__ == "FlatParameter"


class Distribution:
    """See the module docstring. One per optimizer."""

    def __init__(self, process_group=None, *, shard_over_replicas: bool = False) -> None:
        self._process_group = process_group
        self.shard_over_replicas = shard_over_replicas
        self._signature: Optional[Tuple[int, ...]] = None  # ids of the parameters the mode was derived from
        self._mode = "single"
        self._mesh = None
        self._group = None
        self._size, self._me = 1, 0
        self._layouts: Dict[Any, Layout] = {}
        self._roles: Optional[List[Role]] = None
        self._roles_key: Optional[Tuple] = None
        self._entries: List[Tuple[int, int, torch.Tensor]] = []
        # per group, the shapes and identities of the tensors it was given (add_param_group)
        self._built_shapes: List[List[Tuple[int, ...]]] = []
        self._built_ids: List[set] = []
        self._pending: Dict[int, torch.Tensor] = {}  # owned global index -> new full values
        self._ddp_mesh = None
        self.consolidated: Optional[Dict[str, Any]] = None  # this rank's last consolidate_state_dict result
        self.stats = CommStats()

    def __getstate__(self) -> Dict[str, Any]:
        # process groups and meshes do not pickle: a copied optimizer re-derives everything at its next use
        state = dict(self.__dict__)
        state.update(_process_group=None, _mesh=None, _group=None, _signature=None, _roles=None,
                     _roles_key=None, _layouts={}, _entries=[], _pending={}, _ddp_mesh=None,
                     consolidated=None)
        return state

    # ------------------------------------------------------------------ what the parameters say
    def record_group(self, optimizer, params: Sequence[torch.Tensor]) -> None:
        """Check a new param group's tensors (ValueError naming what is unsupported) and remember their
        shapes, so that a later swap for flat tensors (DeepSpeed ZeRO) is recognised."""
        self._refuse_flat(optimizer, params)
        self._derive(params, check_only=True)
        self._built_shapes.append([tuple(p.shape) for p in params])
        self._built_ids.append({id(p) for p in params})

    def _refuse_flat(self, optimizer, params: Sequence[torch.Tensor]) -> None:
        if not optimizer._needs_shapes():
            return
        if any(_is_flat_fsdp1(p) for p in params):
            raise ValueError(
                f"{type(optimizer).__name__} preconditions each weight matrix by its shape, but it was given "
                f"FSDP1's flattened 1-D parameters (FullyShardedDataParallel, with use_orig_params True or "
                f"False), where that structure is gone: it would silently run as an elementwise optimizer. "
                f"Use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version=2; Lightning: "
                f"ModelParallelStrategy), or DDP with process_group="
            )

    def _refuse_replaced_by_flat(self, optimizer, groups) -> None:
        """ValueError if parameters were swapped, after construction, for flat tensors of other shapes."""
        if not optimizer._needs_shapes():
            return
        for index, group in enumerate(groups):
            if index >= len(self._built_shapes):
                break
            built = self._built_shapes[index]
            now = [tuple(p.shape) for p in group["params"]]
            if now == built:
                continue
            # tensors put in after construction, all flat, where matrices were: not a user's surgery
            # (which removes parameters but adds none of its own), but a wrapper's flat partitions
            added = [p for p in group["params"] if id(p) not in self._built_ids[index]]
            if added and any(len(s) >= 2 for s in built) and all(len(s) <= 1 for s in now):
                raise ValueError(
                    f"{type(optimizer).__name__}: the parameters of param group {index} were replaced after "
                    f"construction by {len(now)} flat 1-D tensor(s) of shapes {now[:4]}{'...' if len(now) > 4 else ''} "
                    f"(it was built with shapes {built[:4]}{'...' if len(built) > 4 else ''}), as DeepSpeed "
                    f"ZeRO-1/2 and FSDP1 do with a client optimizer. The weight matrices it preconditions are "
                    f"gone, so it would silently run as an elementwise optimizer; nothing was modified. "
                    f"Supported: {_SUPPORTED}"
                )

    def sync(self, optimizer, groups) -> None:
        """Re-derive the mode and ranks if the parameters in ``groups`` changed since the last call."""
        params = [p for group in groups for p in group["params"]]
        signature = tuple(map(id, params))
        if signature == self._signature:
            return
        self._refuse_flat(optimizer, params)
        self._refuse_replaced_by_flat(optimizer, groups)
        self._derive(params)
        self._entries = [(gi, pi, p) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])]
        self._roles, self._roles_key, self._pending = None, None, {}
        self._signature = signature

    def _derive(self, params: Sequence[torch.Tensor], check_only: bool = False) -> None:
        kinds = {is_dtensor(p) for p in params}
        if len(kinds) > 1:
            if check_only:
                return  # a swap in progress (accelerate writes DTensors group by group); checked at the step
            raise ValueError(
                "soap_optim: DTensor (FSDP2) parameters cannot be mixed with plain tensors in one optimizer; "
                "apply fully_shard to the root module too, so that every parameter is a DTensor"
            )
        if True in kinds:
            if self._process_group is not None:
                raise ValueError(
                    "soap_optim: process_group= is for DDP over plain (replicated) parameters; DTensor "
                    "parameters (FSDP2, HSDP, tensor parallelism) carry their device mesh, so leave it unset. "
                    "For data parallelism over tensor-parallel modules, apply fully_shard on the data-parallel "
                    "slice of the mesh (mesh['dp']) instead of DDP"
                )
            meshes = {root_mesh(p.device_mesh) for p in params}
            if len(meshes) > 1:
                raise ValueError(
                    "soap_optim: all DTensor parameters of one optimizer must be on one device mesh or on "
                    "sub-meshes of one (apply fully_shard / parallelize_module with slices of the same mesh); "
                    "got meshes " + ", ".join(str(m) for m in meshes)
                )
            for param in params:
                placements = tuple(param.placements)
                if any(type(p).__name__ == "Partial" for p in placements):
                    raise ValueError(f"soap_optim: a parameter with a Partial placement {placements} cannot be stepped")
            if check_only:
                return
            self._mode, self._mesh = "sharded", next(iter(meshes))
            self._group, self._size, self._me = _flat_group(self._mesh)
        elif self._process_group is not None and params:
            if check_only:
                return
            self._mode, self._mesh = "replicated", None
            self._group = self._process_group
            self._size = torch.distributed.get_world_size(self._group)
            self._me = torch.distributed.get_rank(self._group)
        elif not check_only:
            self._mode, self._mesh, self._group, self._size, self._me = "single", None, None, 1, 0

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def group(self):
        return self._group

    @property
    def world_size(self) -> int:
        return self._size

    @property
    def rank(self) -> int:
        return self._me

    def invalidate(self) -> None:
        self._signature = None

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

    def _layout(self, param: torch.Tensor) -> Layout:
        if self._mode == "sharded":
            key = (tuple(param.shape), param.device_mesh, tuple(param.placements))
            if key not in self._layouts:
                self._layouts[key] = dtensor_layout(param)
            return self._layouts[key]
        if self._mode == "replicated":
            return replicated_layout(param.shape, range(self._size))
        return single_layout(param.shape)

    def plan(self, optimizer, groups, hypers, *, loading: bool = False) -> Optional[List[Role]]:
        """Each parameter's role, from shapes, placements and options alone (None on one process). Raises
        ValueError, before anything changes, if a change of options would move existing state (not when
        ``loading`` a state dict, which replaces it)."""
        self.sync(optimizer, groups)
        if self._mode == "single":
            return None
        key = tuple(optimizer._role_key(hyper) for hyper in hypers)
        if self._roles is not None and key == self._roles_key:
            return self._roles
        layouts, local, costs = [], [], []
        for gi, _, param in self._entries:
            hyper = hypers[gi]
            layouts.append(self._layout(param))
            local.append(
                self._mode == "sharded" and not hyper["orthograd"] and optimizer._is_elementwise(param.shape, hyper)
            )
            costs.append(optimizer._cost(param.shape, hyper))
        spread = self._mode == "replicated" or self.shard_over_replicas
        roles = build_roles(layouts, local, costs, self._me, spread=spread)
        if (
            not loading
            and self._roles is not None
            and [(r.owner) for r in roles] != [(r.owner) for r in self._roles]
            and any(optimizer.state.get(p) for _, _, p in self._entries)
        ):
            raise ValueError(
                "soap_optim: this change of options would move parameters between ranks (e.g. orthograd, "
                "normalize_grads or factorized toggled under FSDP2) after state was built; build a new optimizer"
            )
        self._roles, self._roles_key = roles, key
        return roles

    def steps_here(self, index: int) -> bool:
        """Whether this rank keeps state for the parameter at global ``index``."""
        if self._roles is None:
            return True
        role = self._roles[index]
        return role.is_local or self._me in role.owners()

    # ------------------------------------------------------------------ a step
    def gather(self, optimizer, groups, hypers) -> List[List[WorkItem]]:
        """Per group, the parameters this rank steps now, with the tensors to step."""
        roles = self.plan(optimizer, groups, hypers)
        work: List[List[WorkItem]] = [[] for _ in groups]
        if roles is None:  # one process: every parameter, as it is
            make = tuple.__new__  # WorkItem(...) without the keyword handling of a NamedTuple's __new__
            for index, (gi, pi, param) in enumerate(self._entries):
                grad = param.grad
                if grad is not None:
                    work[gi].append(make(WorkItem, (param, param, grad, gi, pi, index, True)))
            return work
        self._pending = {}
        owned: List[int] = []
        for index, (gi, pi, param) in enumerate(self._entries):
            if param.grad is None:
                continue
            role = roles[index]
            if role.is_local:
                work[gi].append(WorkItem(param, _local(param), _local(param.grad), gi, pi, index, role.counted))
            else:
                owned.append(index)
        for index, (full, grad) in self._exchange_to_owners(owned).items():
            gi, pi, param = self._entries[index]
            self._pending[index] = full
            work[gi].append(WorkItem(param, full, grad, gi, pi, index, roles[index].counted))
        for items in work:
            items.sort(key=lambda item: item.param_index)
        return work

    def _by_dtype(self, indices: Sequence[int]) -> Dict[torch.dtype, List[int]]:
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for index in indices:
            param = self._entries[index][2]
            if param.grad is not None and param.grad.dtype != param.dtype:
                raise ValueError(
                    f"soap_optim: a gradient of dtype {param.grad.dtype} for a {param.dtype} parameter; "
                    f"the owner path sends both in one buffer, so they must match"
                )
            by_dtype.setdefault(param.dtype, []).append(index)
        return by_dtype

    def _exchange_to_owners(self, owned: List[int]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """One all-to-all per dtype: each position's gradient and parameter pieces go to the owner whose
        shard group it is in; an owner gets back (whole parameter copy, whole gradient)."""
        me, size = self._me, self._size
        assembled: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for dtype, indices in self._by_dtype(owned).items():
            sends: List[List[torch.Tensor]] = [[] for _ in range(size)]
            receive_sizes = [0] * size
            for index in indices:
                role, param = self._roles[index], self._entries[index][2]
                for owner in role.owners():
                    senders = role.senders(owner)
                    if me in senders:
                        sends[owner] += [_local(param.grad).reshape(-1), _local(param).reshape(-1)]
                    if owner == me:
                        for source in senders:
                            receive_sizes[source] += 2 * role.layout.regions[source].numel
            device = _local(self._entries[indices[0]][2]).device
            per_source = all_to_all(self.stats, self._group, me, sends, receive_sizes, dtype, device)
            offsets = [0] * size
            for index in indices:
                role, param = self._roles[index], self._entries[index][2]
                if me not in role.owners():
                    continue
                full = torch.empty(param.shape, dtype=dtype, device=device)
                grad = torch.empty(param.shape, dtype=dtype, device=device)
                for source in role.senders(me):
                    region = role.layout.regions[source]
                    count = region.numel
                    chunk = per_source[source][offsets[source] : offsets[source] + 2 * count]
                    offsets[source] += 2 * count
                    region.insert(grad, chunk[:count])
                    region.insert(full, chunk[count:])
                assembled[index] = (full, grad)
        return assembled

    def scatter(self, optimizer) -> None:
        """After the math: the second all-to-all brings every position its piece of the new values."""
        if self._roles is not None:
            self._return_pieces()
        self.mark_others(optimizer)

    def _return_pieces(self) -> None:
        me, size = self._me, self._size
        owned = [i for i, (_, _, p) in enumerate(self._entries) if not self._roles[i].is_local and p.grad is not None]
        for dtype, indices in self._by_dtype(owned).items():
            sends: List[List[torch.Tensor]] = [[] for _ in range(size)]
            receive_sizes = [0] * size
            for index in indices:
                role = self._roles[index]
                if me in role.owners():
                    full = self._pending[index]
                    for target in role.receivers(me):
                        sends[target].append(role.layout.regions[target].extract(full).reshape(-1))
                receive_sizes[role.owner[me]] += role.layout.regions[me].numel
            device = _local(self._entries[indices[0]][2]).device
            per_source = all_to_all(self.stats, self._group, me, sends, receive_sizes, dtype, device)
            offsets = [0] * size
            for index in indices:
                role, param = self._roles[index], self._entries[index][2]
                owner = role.owner[me]
                local = _local(param)
                count = local.numel()
                local.copy_(per_source[owner][offsets[owner] : offsets[owner] + count].view(local.shape))
                offsets[owner] += count
        self._pending = {}

    def mark_others(self, optimizer) -> None:
        """An empty state entry for each parameter another rank steps, so that ``optimizer.state`` is never
        empty on a rank that owns nothing: DCP's ``get/set_optimizer_state_dict`` step an optimizer whose
        state is empty (to build it), which on that rank alone would wait forever in a collective."""
        if self._roles is None:
            return
        for index in range(len(self._entries)):
            if not self.steps_here(index):
                optimizer.state[self._entries[index][2]]  # defaultdict: creates {}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a CPU tensor in, a CPU tensor out; one small collective)."""
        if self._mode == "single":
            return tensor
        reduced = tensor.to(self._collective_device())
        all_reduce_sum(self.stats, self._group, self._size, reduced)
        return reduced.cpu()

    def _collective_device(self) -> torch.device:
        if self._mode == "sharded":
            return torch.device(self._mesh.device_type)
        backend = torch.distributed.get_backend(self._group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def role(self, index: int) -> Optional[Role]:
        return None if self._roles is None else self._roles[index]

    def plan_signature(self) -> List:
        """Per parameter: its local shape here and its owners (what a rank's share depends on)."""
        if self._roles is None:
            return []
        return [
            [list(role.layout.regions[self._me].local_shape), role.owners()] for role in self._roles
        ]

    def global_rank(self, group_rank: int) -> int:
        if self._group is None:
            return group_rank
        return torch.distributed.get_global_rank(self._group, group_rank)

    def checkpoint_mesh(self):
        """The device mesh a checkpoint's DTensors live on: the parameters' mesh, or under DDP a 1-D
        mesh of the process group (positions are its group ranks)."""
        if self._mode == "sharded":
            return self._mesh
        if self._ddp_mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._ddp_mesh = DeviceMesh.from_group(self._group, self._collective_device().type)
        return self._ddp_mesh


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _flat_group(mesh) -> Tuple[Any, int, int]:
    """(process group over every rank of ``mesh``, whose group ranks are the mesh's flat positions;
    its size; this rank's position)."""
    if mesh.ndim == 1:
        group = mesh.get_group()
        return group, torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    ranks = mesh.mesh.flatten().tolist()
    position = ranks.index(torch.distributed.get_rank())
    if ranks == list(range(torch.distributed.get_world_size())):
        return torch.distributed.group.WORLD, len(ranks), position
    flat = _FLAT_GROUPS.get(tuple(ranks))
    if flat is None:
        flat = _FLAT_GROUPS[tuple(ranks)] = torch.distributed.new_group(ranks=sorted(ranks))
    if sorted(ranks) != ranks:
        raise ValueError(f"soap_optim: a device mesh whose ranks {ranks} are not in ascending order is not supported")
    return flat, len(ranks), position


_FLAT_GROUPS: Dict[Tuple[int, ...], Any] = {}
