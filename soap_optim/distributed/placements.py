"""Where each rank's piece of a parameter lies in the whole tensor, from its ``(mesh, placements)``.

A piece is a :class:`Region`: per tensor dimension, either the whole extent or the sorted global indices
this mesh coordinate holds. The indices come from DTensor's own shard arithmetic
(``_get_shard_size_and_offsets``, applied mesh dimension by mesh dimension, left to right, exactly as
``compute_local_shape_and_global_offset`` does), so ``Shard(d)`` on any dimension, ``_StridedShard``
(FSDP on top of tensor parallelism), ``Replicate`` and uneven or empty shards are all what DTensor says
they are. A region is a product of per-dimension index sets, so extracting and inserting pieces is
indexing along each sharded dimension; contiguous index sets are kept as ``slice``s (the common case: a
plain ``Shard``), which keeps the per-step copies views where torch allows.

Mesh axes on which a parameter is sharded form its *shard axes*; the others are its *replicate axes*.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

Index = Union[slice, torch.Tensor]  # a contiguous range, or sorted global indices (int64)


def is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "device_mesh")


def is_shard(placement) -> bool:
    """``Shard(d)`` or ``_StridedShard`` (not a subclass of ``Shard`` in every torch release)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, (Shard, _StridedShard))


@dataclass(frozen=True)
class Region:
    """The part of a tensor of ``shape`` held at one mesh coordinate: ``index[d]`` per dimension."""

    shape: Tuple[int, ...]  # the whole tensor's shape
    index: Tuple[Index, ...]

    @property
    def local_shape(self) -> Tuple[int, ...]:
        return tuple(
            (ix.stop - ix.start) if isinstance(ix, slice) else int(ix.numel()) for ix in self.index
        )

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def extract(self, whole: torch.Tensor) -> torch.Tensor:
        """This region of ``whole`` (a tensor of ``shape``), as a tensor of ``local_shape``."""
        piece = whole
        for dim, ix in enumerate(self.index):
            if isinstance(ix, slice):
                if (ix.start, ix.stop) != (0, self.shape[dim]):
                    piece = piece.narrow(dim, ix.start, ix.stop - ix.start)
            else:
                piece = piece.index_select(dim, ix.to(piece.device))
        return piece

    def insert(self, whole: torch.Tensor, piece: torch.Tensor) -> None:
        """Write ``piece`` (``local_shape``) into this region of ``whole``, in place."""
        target = whole
        for dim, ix in enumerate(self.index):
            if isinstance(ix, slice) and (ix.start, ix.stop) != (0, self.shape[dim]):
                target = target.narrow(dim, ix.start, ix.stop - ix.start)
        _insert_indexed(target, piece.view(self.local_shape), [
            (dim, ix.to(whole.device)) for dim, ix in enumerate(self.index) if not isinstance(ix, slice)
        ])


def _insert_indexed(target: torch.Tensor, piece: torch.Tensor, indexed: List[Tuple[int, torch.Tensor]]) -> None:
    if not indexed:
        target.copy_(piece)
    elif len(indexed) == 1:
        dim, ix = indexed[0]
        target.index_copy_(dim, ix, piece)
    else:  # indices on several dimensions (strided shards of two dims): one slab at a time
        (dim, ix), rest = indexed[0], indexed[1:]
        rest = [(d - 1 if d > dim else d, i) for d, i in rest]
        for k, i in enumerate(ix.tolist()):
            _insert_indexed(target.select(dim, i), piece.select(dim, k), rest)


def _compact(index: torch.Tensor) -> Index:
    """A slice when ``index`` is a contiguous ascending range (the plain ``Shard`` case)."""
    if index.numel() == 0:
        return slice(0, 0)
    start, stop = int(index[0]), int(index[-1]) + 1
    if stop - start == index.numel() and bool((index == torch.arange(start, stop)).all()):
        return slice(start, stop)
    return index


def region_at(shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements) -> Region:
    """The region of a tensor of global ``shape`` held at ``coordinate`` of a mesh of ``mesh_shape``."""
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets

    shape = tuple(int(s) for s in shape)
    local = list(shape)
    offsets: dict = {}
    for mesh_dim, placement in enumerate(placements):
        if not is_shard(placement):
            continue
        dim = placement.dim if placement.dim >= 0 else placement.dim + len(shape)
        size, index = _get_shard_size_and_offsets(
            local[dim], mesh_shape[mesh_dim], coordinate[mesh_dim], placement, offsets.get(dim), shape[dim], False
        )
        local[dim] = size
        offsets[dim] = index[:0] if size == 0 else index
    index = tuple(
        _compact(offsets[d]) if d in offsets else slice(0, shape[d]) for d in range(len(shape))
    )
    return Region(shape, index)


@dataclass(frozen=True)
class Layout:
    """A parameter's distribution: its mesh (as the global ranks at each coordinate), placements, and
    every mesh coordinate's region. Plain tensors on a process group are a 1-D mesh with ``Replicate``."""

    ranks: torch.Tensor  # global rank at each mesh coordinate (the mesh's shape)
    shard_axes: Tuple[int, ...]
    replicate_axes: Tuple[int, ...]
    regions: Tuple[Region, ...]  # per flat mesh position (row-major over ``ranks``)

    @property
    def size(self) -> int:
        return self.ranks.numel()

    @functools.cached_property
    def _coordinates(self) -> List[Tuple[int, ...]]:
        shape = tuple(self.ranks.shape)
        return [tuple(int(c) for c in torch.unravel_index(torch.tensor(p), shape)) for p in range(self.size)]

    @functools.cached_property
    def _shard_groups(self) -> List[List[int]]:
        return [self._shard_group(position) for position in range(self.size)]

    def coordinate(self, position: int) -> Tuple[int, ...]:
        return self._coordinates[position]

    def position(self, coordinate: Sequence[int]) -> int:
        flat = 0
        for c, size in zip(coordinate, self.ranks.shape):
            flat = flat * int(size) + int(c)
        return flat

    def shard_group(self, position: int) -> List[int]:
        """Positions that share ``position``'s replicate coordinates: together they hold the whole tensor.
        (Computed once per layout: the step asks for them for every owned parameter.)"""
        return self._shard_groups[position]

    def _shard_group(self, position: int) -> List[int]:
        base = list(self.coordinate(position))
        positions = []
        sizes = [int(self.ranks.shape[a]) for a in self.shard_axes]
        for flat in range(math.prod(sizes)):
            coordinate = list(base)
            rest = flat
            for axis, size in reversed(list(zip(self.shard_axes, sizes))):
                coordinate[axis] = rest % size
                rest //= size
            positions.append(self.position(coordinate))
        return positions

    def with_shard_coordinates(self, position: int, shard_position: int) -> int:
        """The position with ``position``'s replicate coordinates and the shard coordinates of the
        ``shard_position``-th member of a shard group (row-major over the shard axes)."""
        return self.shard_group(position)[shard_position]


def root_mesh(mesh):
    """The mesh ``mesh`` was sliced from (itself if it was not): parameters on sub-meshes of one root
    (FSDP on ``mesh["dp"]`` beside tensor parallelism on the whole ``(dp, tp)`` mesh) share positions."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    return mesh if root is None else root


def placements_on_root(mesh, placements) -> tuple:
    """``placements`` on a sub-mesh, expressed on its root mesh (``Replicate`` on the other dimensions)."""
    from torch.distributed.tensor import Replicate

    root = root_mesh(mesh)
    if root is mesh or root == mesh:
        return tuple(placements)
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if not names or not root_names or any(name not in root_names for name in names):
        raise ValueError(
            f"soap_optim: a parameter on a sub-mesh {names} of the mesh {root_names} whose dimensions cannot be "
            f"matched by name (flattened mesh dimensions are not supported)"
        )
    on_root = [Replicate()] * root.ndim
    for name, placement in zip(names, placements):
        on_root[root_names.index(name)] = placement
    return tuple(on_root)


def make_layout(shape: Sequence[int], ranks: torch.Tensor, placements) -> Layout:
    """The :class:`Layout` of a tensor of global ``shape`` with ``placements`` on a mesh whose global rank
    at each coordinate is ``ranks`` (also usable without a process group, to plan from shapes)."""
    mesh_shape = tuple(ranks.shape)
    shard_axes = tuple(i for i, p in enumerate(placements) if is_shard(p))
    replicate_axes = tuple(i for i in range(len(placements)) if i not in shard_axes)
    regions = tuple(
        region_at(shape, mesh_shape, [int(c) for c in torch.unravel_index(torch.tensor(flat), mesh_shape)], placements)
        for flat in range(ranks.numel())
    )
    return Layout(ranks, shard_axes, replicate_axes, regions)


def dtensor_layout(param: torch.Tensor) -> Layout:
    """The :class:`Layout` of a DTensor parameter, on the root of its mesh."""
    mesh = root_mesh(param.device_mesh)
    placements = placements_on_root(param.device_mesh, param.placements)
    return make_layout(param.shape, mesh.mesh.detach().cpu().clone(), placements)


def replicated_layout(shape: Sequence[int], ranks: Sequence[int]) -> Layout:
    """A plain tensor held whole by every rank of ``ranks`` (DDP with ``process_group=``)."""
    whole = Region(tuple(int(s) for s in shape), tuple(slice(0, int(s)) for s in shape))
    return Layout(torch.tensor(list(ranks)), (), (0,), tuple(whole for _ in ranks))


def single_layout(shape: Sequence[int]) -> Layout:
    return replicated_layout(shape, [0])
