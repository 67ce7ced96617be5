"""Who steps which parameter: decided from shapes alone, identically on every rank, with no communication.

Greedy longest-processing-time: parameters by decreasing cost (ties by index) each go to the rank with
the least cost so far (ties to the lowest rank). Its makespan is within 4/3 of the best possible; for
the many similar matrices of a transformer it is close to even. Element count is the wrong measure for
SOAP: a refresh costs ~d^3 per factor, so a 4096 x 64 weight costs far more than eight 512 x 64 ones.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, Sequence


def assign_owners(costs: Sequence[float], world_size: int) -> List[int]:
    """The owning rank of each item, balancing the summed ``costs`` over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


def balance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> Dict[str, float]:
    """Per-rank cost totals and max/mean (1.0 is a perfect split)."""
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    mean = sum(loads) / world_size
    return {"max": max(loads), "mean": mean, "max_over_mean": max(loads) / mean if mean > 0 else 1.0}
