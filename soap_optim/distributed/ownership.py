"""Who steps which parameter: decided from shapes alone, identically on every rank, with no communication.

Greedy longest-processing-time: parameters by decreasing cost (ties by index) each go to the candidate
whose busiest rank is least loaded so far (ties to the first candidate). A candidate is the set of ranks
that would each do the work: one rank, or, under HSDP's default, the one owner in each replica group.
With one-rank candidates this is the classic rule, whose makespan is within 4/3 of the best possible; for
the many similar matrices of a transformer it is close to even. Element count is the wrong measure for
SOAP: a refresh costs ~d^3 per factor, so a 4096 x 64 weight costs far more than eight 512 x 64 ones.
"""
from __future__ import annotations

from typing import Dict, List, Sequence


def assign_to_candidates(costs: Sequence[float], candidates: Sequence[Sequence[Sequence[int]]], size: int) -> List[int]:
    """For each item, the index of its chosen candidate; ``candidates[i]`` lists item i's options, each
    the ranks (in ``range(size)``) that would bear its cost."""
    loads = [0.0] * size
    chosen = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        best, best_load = 0, None
        for k, ranks in enumerate(candidates[index]):
            load = max(loads[r] for r in ranks)
            if best_load is None or load < best_load:
                best, best_load = k, load
        chosen[index] = best
        for rank in candidates[index][best]:
            loads[rank] += costs[index]
    return chosen


def assign_owners(costs: Sequence[float], world_size: int) -> List[int]:
    """The owning rank of each item, balancing the summed ``costs`` over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ranks = [[rank] for rank in range(world_size)]
    return assign_to_candidates(costs, [ranks] * len(costs), world_size)


def balance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> Dict[str, float]:
    """Per-rank cost totals and max/mean (1.0 is a perfect split)."""
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    mean = sum(loads) / world_size
    return {"max": max(loads), "mean": mean, "max_over_mean": max(loads) / mean if mean > 0 else 1.0}
