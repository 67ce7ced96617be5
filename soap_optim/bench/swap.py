"""``--swap``: the one-line swap. Every optimizer gets an AdamW user's settings, unchanged.

The recipe is torch.optim.AdamW's defaults (betas (0.9, 0.999), eps 1e-8, weight decay 0.01; none on
least squares, where it would move the optimum) at AdamW's best lr for the task (chosen on the
validation split by ``--tune``; without it, the task's shared lr), with the task's schedule. Every
optimizer runs with exactly that, and its other arguments at its class's defaults.

Where SOAP ends behind AdamW, :mod:`.diagnosis` measures each suspect alone. Beside them, two SOAP settings a user moving from AdamW could change, each measured: the lr
times ``--swap-lr-multiplier`` (SOAP's best lr is often a few times AdamW's), and SOAP's own default
betas (read from its signature).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Dict, List, Optional, Sequence

from .diagnosis import diagnose, soap_loses
from .optimizers import BASELINE, SOAP_DEFAULTS, Hyper, OptimizerSpec
from .problems import Task
from .seeded import Pair, aggregate, train_seeds
from .tune import grid_of, tune

USER_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults
SOAP_BETAS = SOAP_DEFAULTS["betas"]  # soap_optim.SOAP's defaults


def variants(specs: Sequence[OptimizerSpec], recipe: Hyper, multiplier: float) -> List[Pair]:
    """The recipe for every optimizer, then SOAP with the lr multiplier and SOAP with its own betas."""
    chosen: List[Pair] = [(spec, recipe) for spec in specs]
    soap = next((spec for spec in specs if spec.key == "soap"), None)
    if soap is not None:
        chosen.append((replace(soap, key="soap-lr-x", label=f"SOAP, lr x{multiplier:g}"), recipe.with_(lr=recipe.lr * multiplier)))
        chosen.append((replace(soap, key="soap-betas", label=f"SOAP, betas {SOAP_BETAS}"), recipe.with_(betas=SOAP_BETAS)))
    return chosen


def swap(
    task: Task, specs: Sequence[OptimizerSpec], settings, seeds: Sequence[int], device, lr: Optional[float] = None
) -> Dict[str, Any]:
    """The swap table at ``lr``; None: AdamW's best with ``--tune``, else the task's shared lr."""
    def recipe_at(lr: float) -> Hyper:
        return settings.hyper(lr, betas=USER_BETAS, **task.changes)

    section: Dict[str, Any] = {}
    tuned = lr is None and settings.tune
    lr = task.lrs[0] if lr is None else lr
    if tuned:
        baseline = [spec for spec in specs if spec.key == BASELINE]
        chosen, record, _ = tune(task, baseline, recipe_at, grid_of(lr, settings.tune_grid), seeds, device, settings.progress)
        lr = chosen[BASELINE]
        section["adamw_lr_grid"] = record
    recipe = recipe_at(lr)
    runs = train_seeds(task, variants(specs, recipe, settings.swap_lr_multiplier), seeds, device, f"{task.name}: swap", settings.progress)
    section["recipe"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(recipe).items()}
    section["lr_source"] = "AdamW's best on the validation split (--tune)" if tuned else "the task's shared lr, untuned"
    section.update(aggregate(runs, (BASELINE, lr), target=task.target, extra=task.extra))
    if soap_loses(section):
        section["diagnosis"] = diagnose(task, specs, recipe, seeds, device, settings.progress)
    return section
