"""Who steps each parameter, and which pieces travel where: decided once per parameter layout.

Positions are the flat (row-major) coordinates of the optimizer's mesh; every parameter's
:class:`~.placements.Layout` is on that mesh. Each parameter gets one of two roles:

* **local**: its update is elementwise, so every position steps the piece it holds, with state of the
  piece's shape; nothing is sent.
* **owned**: ``owner[q]`` is the position that steps the whole tensor for position ``q``. The owner
  receives the pieces of its shard group (the positions with its replicate coordinates, which together
  hold the whole tensor), runs the unchanged single-process math on the reassembled tensor, and sends
  each position in ``receivers`` its piece of the new values. By default each replica group has its own
  owner, at the same shard coordinates (no traffic between replicas, identical results in each);
  ``spread`` puts a single owner anywhere on the mesh, whose new values reach every position.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .ownership import assign_to_candidates
from .placements import Layout


@dataclass(frozen=True)
class Role:
    layout: Layout
    owner: Optional[Tuple[int, ...]]  # per position: who steps its copy; None for a local parameter
    counted: bool  # whether this position's share enters the gradient-norm sums (each gradient once)

    @property
    def is_local(self) -> bool:
        return self.owner is None

    # computed once per role (roles are planned once per layout and reused every step)
    @functools.cached_property
    def _owners(self) -> List[int]:
        return sorted(set(self.owner)) if self.owner is not None else []

    @functools.cached_property
    def _receivers(self) -> Dict[int, List[int]]:
        receivers: Dict[int, List[int]] = {}
        for position, owner in enumerate(self.owner or ()):
            receivers.setdefault(owner, []).append(position)
        return receivers

    def owners(self) -> List[int]:
        return self._owners

    def senders(self, owner: int) -> List[int]:
        """Positions whose pieces make up the whole tensor at ``owner``."""
        return self.layout.shard_group(owner)

    def receivers(self, owner: int) -> List[int]:
        return self._receivers.get(owner, [])


def _canonical(layout: Layout, position: int) -> bool:
    """Whether ``position`` is in the first replica group (replicate coordinates all zero)."""
    coordinate = layout.coordinate(position)
    return all(coordinate[axis] == 0 for axis in layout.replicate_axes)


def build_roles(
    layouts: Sequence[Layout], local: Sequence[bool], costs: Sequence[float], me: int, *, spread: bool
) -> List[Role]:
    """Each parameter's role, as seen from position ``me`` (the owners are the same on every position)."""
    size = layouts[0].size if layouts else 1
    owned = [i for i, is_local in enumerate(local) if not is_local]
    candidates = []
    for i in owned:
        layout = layouts[i]
        if spread:
            candidates.append([[q] for q in range(size)])
        else:
            group = len(layout.shard_group(0))
            candidates.append([
                sorted({layout.with_shard_coordinates(q, k) for q in range(size)}) for k in range(group)
            ])
    chosen = dict(zip(owned, assign_to_candidates([costs[i] for i in owned], candidates, size)))
    roles = []
    for i, layout in enumerate(layouts):
        if local[i]:
            roles.append(Role(layout, None, _canonical(layout, me)))
        elif spread:
            owner = chosen[i]
            roles.append(Role(layout, tuple([owner] * size), True))
        else:
            k = chosen[i]
            owner = tuple(layout.with_shard_coordinates(q, k) for q in range(size))
            roles.append(Role(layout, owner, _canonical(layout, me)))
    return roles


def owner_balance(roles: Sequence[Role], costs: Sequence[float]) -> Dict[str, float]:
    """max/mean of the owned work per position (1.0 is a perfect split)."""
    size = roles[0].layout.size if roles else 1
    loads = [0.0] * size
    for role, cost in zip(roles, costs):
        for owner in role.owners():
            loads[owner] += cost
    mean = sum(loads) / size
    return {"max": max(loads), "mean": mean, "max_over_mean": max(loads) / mean if mean > 0 else 1.0}
