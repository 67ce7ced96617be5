"""The distribution layer's planning, without a process group: regions from placements (against DTensor's
own offsets, and covering every element once per replica group), and owners per replica group or spread."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from soap_optim.distributed.ownership import assign_owners, assign_to_candidates
from soap_optim.distributed.placements import make_layout, region_at
from soap_optim.distributed.plan import build_roles

CASES = [
    ((7, 6), (4,), (Shard(0),)),
    ((7, 6), (4,), (Shard(1),)),
    ((5, 3), (4,), (Shard(0),)),  # an empty last shard
    ((12, 5), (2, 2), (_StridedShard(0, split_factor=2), Shard(0))),  # FSDP over colwise TP
    ((10, 12), (2, 2), (Shard(0), Shard(1))),  # FSDP over rowwise TP
    ((10,), (2, 2), (Shard(0), Replicate())),
    ((9, 4), (2, 2), (Replicate(), Shard(0))),  # HSDP
    ((13, 6, 2), (2, 2, 2), (Replicate(), _StridedShard(0, split_factor=2), Shard(0))),
    ((6, 6), (3, 2), (Shard(0), Shard(0))),
]


def _coordinates(mesh_shape):
    return list(itertools.product(*(range(s) for s in mesh_shape)))


@pytest.mark.parametrize("shape,mesh_shape,placements", CASES)
def test_regions_match_dtensor_offsets_and_cover_each_element_once_per_replica(shape, mesh_shape, placements):
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    whole = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape)
    counts = torch.zeros(shape)
    for coordinate in _coordinates(mesh_shape):
        region = region_at(shape, mesh_shape, coordinate, placements)
        local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
        assert region.local_shape == tuple(local_shape)
        piece = region.extract(whole)
        if piece.numel():
            # the first element of the piece sits at DTensor's global offset
            assert piece.reshape(-1)[0] == whole[tuple(offset)]
        marks = torch.zeros(shape)
        region.insert(marks, torch.ones(region.local_shape))
        counts += marks
        restored = torch.zeros(shape, dtype=torch.float64)
        region.insert(restored, piece)
        assert torch.equal(region.extract(restored), piece)
    replicas = 1
    for axis, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            replicas *= mesh_shape[axis]
    assert torch.equal(counts, torch.full(shape, float(replicas)))


def test_one_rank_candidates_are_the_classic_greedy():
    costs = [5.0, 3.0, 3.0, 2.0, 8.0, 1.0]
    # by hand, largest first onto the least-loaded rank: 8 -> r0; 5 -> r1; 3 -> r2; 3 -> r2 (loads 8, 5, 3);
    # 2 -> r1 (8, 5, 6); 1 -> r2 (8, 7, 6)
    assert assign_owners(costs, 3) == [1, 2, 2, 1, 0, 2]
    assert assign_to_candidates(costs, [[[r] for r in range(3)]] * len(costs), 3) == assign_owners(costs, 3)


def test_owners_one_per_replica_group_or_spread_over_replicas():
    ranks = torch.arange(4).view(2, 2)  # (replicate, shard)
    layouts = [make_layout((8, 4), ranks, (Replicate(), Shard(0))) for _ in range(4)]
    costs = [4.0, 3.0, 2.0, 1.0]
    default = build_roles(layouts, [False] * 4, costs, 0, spread=False)
    for role in default:
        owners = role.owners()
        assert len(owners) == 2  # one per replica group
        coordinates = [layouts[0].coordinate(o) for o in owners]
        assert {c[0] for c in coordinates} == {0, 1} and len({c[1] for c in coordinates}) == 1
        for position in range(4):  # each position's owner is in its own replica group
            assert layouts[0].coordinate(role.owner[position])[0] == layouts[0].coordinate(position)[0]
            assert sorted(role.senders(role.owner[position])) == sorted(layouts[0].shard_group(position))
    spread = build_roles(layouts, [False] * 4, costs, 0, spread=True)
    assert sorted(o for role in spread for o in role.owners()) == [0, 1, 2, 3]
    assert all(len(role.receivers(role.owners()[0])) == 4 for role in spread)
    # each gradient counted once: pieces in the first replica group, one owner per parameter
    local = build_roles(layouts, [True] * 4, costs, 2, spread=False)
    assert not any(role.counted for role in local)  # position 2 is (1, 0): the second replica group
    assert all(role.counted for role in build_roles(layouts, [True] * 4, costs, 1, spread=False))
