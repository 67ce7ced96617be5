"""The seeded form of a training task: ``--seeds N``, ``--tune`` and ``--swap``.

Returns one JSON-ready section per task with up to three tables, each aggregated over the same seeds
(``--seed``, ``--seed`` + 1, ...):

* ``shared``: every optimizer at the task's shared lr (AdamW's best on the default settings);
* ``best`` (with ``--tune``): every optimizer at its own best lr on the validation split, against
  AdamW at its own, with the grid in ``grid``;
* ``swap`` (with ``--swap``): every optimizer with an AdamW user's settings (:mod:`.swap`), and
  ``swap_shared`` the same at the task's shared lr where ``--tune`` found AdamW's best elsewhere.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import problems
from .optimizers import BASELINE, OptimizerSpec
from .seeded import aggregate, group, pairs, train_seeds
from .swap import swap
from .training import Run
from .tune import grid_of, tune


def seeds_of(settings) -> List[int]:
    return [settings.seed + i for i in range(settings.seeds)]


def _at(runs: Sequence[Run], lr_of: Dict[str, float]) -> List[Run]:
    return [run for (key, lr), members in group(runs).items() if lr_of.get(key) == lr for run in members]


def seeded_part(
    name: str, settings, specs: List[OptimizerSpec], device: torch.device, swap_specs: Optional[List[OptimizerSpec]] = None
) -> Dict[str, Any]:
    """``specs`` for the shared and own-best tables; ``swap_specs`` (default: the same) for the swap table."""
    task = problems.TASKS[name](settings, device, validation=settings.tune)
    seeds = seeds_of(settings)
    shared = task.lrs[0]

    def hyper_at(lr: float):
        return settings.hyper(lr, **task.changes)

    section: Dict[str, Any] = {
        "task": task.description,
        **task.info,
        "steps": task.steps,
        "eval_every": task.eval_every,
        "schedule": task.schedule_text,
        "seeds": seeds,
        "shared_lr": shared,
    }
    summary = dict(target=task.target, extra=task.extra)
    started = time.perf_counter()
    if settings.tune:
        chosen, record, runs = tune(task, specs, hyper_at, grid_of(shared, settings.tune_grid), seeds, device,
                                    settings.progress, also=[shared])
        section["grid"] = record
        section["shared"] = aggregate(_at(runs, {spec.key: shared for spec in specs}), (BASELINE, shared), **summary)
        section["best"] = aggregate(_at(runs, chosen), (BASELINE, chosen[BASELINE]), **summary)
    else:
        runs = train_seeds(task, pairs(specs, [hyper_at(shared)]), seeds, device, f"{task.name}: {len(seeds)} seeds", settings.progress)
        section["shared"] = aggregate(runs, (BASELINE, shared), **summary)
    section["seconds"] = {"tune" if settings.tune else "seeds": time.perf_counter() - started}
    if settings.swap:
        started = time.perf_counter()
        family = specs if swap_specs is None else swap_specs
        section["swap"] = swap(task, family, settings, seeds, device)
        if section["swap"]["recipe"]["lr"] != shared:
            section["swap_shared"] = swap(task, family, settings, seeds, device, lr=shared)
        section["seconds"]["swap"] = time.perf_counter() - started
    return section
