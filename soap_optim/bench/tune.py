"""``--tune``: each optimizer's own learning rate, chosen on a split that is not the reported one.

The grid is the task's shared lr times ``--tune-grid`` (by default 0.3, 1, 3, 6, so the shared lr is on
it). Every optimizer runs at every grid point on every seed. Where the task has a validation split
(text files or images that are neither trained on nor reported), the choice is the lowest mean final
validation loss over the seeds, and the reported numbers come from the same runs' reported split.
Least squares has no data to split: its lr is chosen on other problem instances (seeds shifted by
:data:`~.problems.SELECTION_SEED_OFFSET`), by the mean log10 of the final f/f0, and the chosen lr is then
run on the reported instances.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .optimizers import Hyper, OptimizerSpec
from .problems import Task
from .seeded import group, pairs, train_seeds
from .training import Run, final_value


def grid_of(shared_lr: float, multipliers: Sequence[float]) -> List[float]:
    """``shared_lr`` times each multiplier, rounded to 6 digits; the shared lr itself is always on it."""
    return sorted({shared_lr, *(float(f"{shared_lr * m:.6g}") for m in multipliers)})


def _criterion(run: Run, metric: str, log: bool) -> float:
    value = final_value(run, metric)
    if log:
        return math.log10(value) if 0 < value < math.inf else (math.inf if value > 0 else -math.inf)
    return value


def choose(runs: Sequence[Run], metric: str, log: bool = False) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Each optimizer's lr with the lowest mean selection value over seeds; and the whole grid.

    A failed or diverged seed makes its grid point's mean +inf, so it is never chosen.
    """
    scores: Dict[str, Dict[float, float]] = {}
    for (key, lr), members in group(runs).items():
        values = [_criterion(r, metric, log) for r in members]
        scores.setdefault(key, {})[lr] = sum(values) / len(values)
    chosen = {key: min(by_lr, key=lambda lr: (by_lr[lr], lr)) for key, by_lr in scores.items()}
    record = {
        "metric": f"mean log10 final {metric}" if log else f"mean final {metric}",
        "grid": {key: {f"{lr:g}": (v if math.isfinite(v) else None) for lr, v in sorted(by_lr.items())} for key, by_lr in scores.items()},
        "chosen": {key: chosen[key] for key in scores},
        "at_edge": sorted(key for key, by_lr in scores.items() if chosen[key] in (min(by_lr), max(by_lr))),
    }
    return chosen, record


def tune(
    task: Task,
    specs: Sequence[OptimizerSpec],
    hyper_at: Callable[[float], Hyper],
    grid: Sequence[float],
    seeds: Sequence[int],
    device,
    show: bool,
    also: Sequence[float] = (),
) -> Tuple[Dict[str, float], Dict[str, Any], List[Run]]:
    """(chosen lr per key, the grid record, runs on the reported seeds at the chosen lrs and at ``also``)."""
    hypers = [hyper_at(lr) for lr in grid]
    if task.has_validation:
        runs = train_seeds(task, pairs(specs, hypers), seeds, device, f"{task.name}: lr grid", show)
        chosen, record = choose(runs, "val_loss")
        return chosen, record, runs
    offset = task.selection_seed_offset or 0
    selection = train_seeds(task, pairs(specs, hypers), [s + offset for s in seeds], device, f"{task.name}: lr grid", show)
    chosen, record = choose(selection, "loss", log=True)
    record["selection_seeds"] = [s + offset for s in seeds]
    wanted = [(spec, hyper_at(lr)) for spec in specs for lr in sorted({chosen[spec.key], *also})]
    return chosen, record, train_seeds(task, wanted, seeds, device, f"{task.name}: chosen lr", show)
