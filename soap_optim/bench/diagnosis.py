"""Why SOAP loses a one-line swap, where it does: each suspect changed alone and measured over the seeds.

Run by ``--swap`` on every task where SOAP's mean final loss is above AdamW's under the AdamW recipe.
The suspects, each against the recipe's AdamW on the same seeds:

* the first step: SOAP's first ``step()`` only builds its preconditioner, so after k steps it has moved
  k - 1 times. "AdamW, first step skipped" is AdamW handicapped the same way: if it stays as good as
  AdamW, one step is not the gap;
* warm-up: SOAP with a linear warm-up over the first 5% of the steps (on top of the task's schedule),
  since its first updates use a preconditioner estimated from few gradients;
* beta2: SOAP with betas (0.9, 0.95), the recipe's beta1 and SOAP's default beta2 (the switch to SOAP's
  default betas is in the swap table itself);
* step size: SOAP's lr at 2x and 5x AdamW's (3x is in the swap table), to bracket the multiplier.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from .optimizers import BASELINE, Hyper, OptimizerSpec
from .problems import Task
from .seeded import Pair, aggregate, train_seeds

WARMUP_FRACTION = 0.05
LR_MULTIPLIERS = (2.0, 5.0)


def first_step_skipped(cls: type) -> type:
    """``cls`` whose first ``step()`` changes nothing (its gradients are dropped), as SOAP's first step."""

    def step(self, closure=None):
        if not getattr(self, "_skipped_first", False):
            self._skipped_first = True
            return None
        return cls.step(self, closure)

    return type(f"{cls.__name__}FirstStepSkipped", (cls,), {"step": step})


def warmed_up(cls: type, steps: int) -> type:
    """``cls`` whose lr is scaled by a linear ramp over its first ``steps`` steps, on top of what it is set to."""

    def step(self, closure=None):
        self._warmup_count = getattr(self, "_warmup_count", 0) + 1
        factor = min(1.0, self._warmup_count / max(1, steps))
        saved = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            return cls.step(self, closure)
        finally:
            for group, lr in zip(self.param_groups, saved):
                group["lr"] = lr

    return type(f"{cls.__name__}WarmedUp", (cls,), {"step": step})


def suspects(specs: Sequence[OptimizerSpec], recipe: Hyper, steps: int) -> List[Pair]:
    by_key = {spec.key: spec for spec in specs}
    adamw, soap = by_key[BASELINE], by_key["soap"]
    warmup = max(1, round(WARMUP_FRACTION * steps))
    chosen: List[Pair] = [
        (adamw, recipe),
        (soap, recipe),
        (replace(adamw, key="adamw-first-step-skipped", label="AdamW, first step skipped", cls=first_step_skipped(adamw.cls)), recipe),
        (replace(soap, key="soap-warmup", label=f"SOAP, +{warmup}-step linear warm-up", cls=warmed_up(soap.cls, warmup)), recipe),
        (replace(soap, key="soap-beta2", label="SOAP, betas (0.9, 0.95)"), recipe.with_(betas=(recipe.betas[0], 0.95))),
    ]
    for multiplier in LR_MULTIPLIERS:
        chosen.append((replace(soap, key=f"soap-lr-x{multiplier:g}", label=f"SOAP, lr x{multiplier:g}"),
                       recipe.with_(lr=recipe.lr * multiplier)))
    return chosen


def soap_loses(section: Dict[str, Any]) -> bool:
    """Whether SOAP's mean final loss is above AdamW's in an aggregated swap table."""
    table = section["optimizers"]
    soap = next((e for e in table.values() if e["key"] == "soap"), None)
    reference = table[section["reference"]]
    if soap is None or soap["final"]["mean"] is None:
        return soap is not None
    return reference["final"]["mean"] is not None and soap["final"]["mean"] > reference["final"]["mean"]


def diagnose(task: Task, specs: Sequence[OptimizerSpec], recipe: Hyper, seeds: Sequence[int], device, show: bool) -> Optional[Dict[str, Any]]:
    if not {BASELINE, "soap"} <= {spec.key for spec in specs}:
        return None
    runs = train_seeds(task, suspects(specs, recipe, task.steps), seeds, device, f"{task.name}: swap diagnosis", show)
    return aggregate(runs, (BASELINE, recipe.lr), target=task.target, extra=task.extra)
